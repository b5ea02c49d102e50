"""A fully convolutional model over an image chunked over ``H`` and ``W``: one task per output tile
runs every layer on the input tile plus the halo the whole stack needs (see :func:`predict_tiles`).

Chaining :func:`fastconv.dask.conv2d` layer by layer keeps every intermediate block until the next
layer's neighbours have read their halo: a band of block rows per layer, so a worker's memory grows
with the image's width (measured: 1.3 GB at 2 x 3 x 4096^2, 2.8 GB at 8192^2, 3 -> 16 -> 16 -> 8
channels in 1024^2 chunks).  A tile that runs the whole stack holds only its own activations.
"""
from __future__ import annotations

import numpy as np
from dask.highlevelgraph import HighLevelGraph

import dask.array as da

from .. import _validation as V
from .. import functional as F
from ._arrays import _PoolBlock, _assemble, _bounds, _meta, _output_blocks, _piece, _pieces, _plan


def _layers(fn, model):
    """The model's layers in order (nested ``Sequential`` flattened)."""
    from ..layers import Sequential
    if not isinstance(model, Sequential):
        raise TypeError(f"{fn}: a model over an input chunked over H and W must be a "
                        f"fastconv.layers.Sequential, got {type(model).__name__}; chunk only the batch axis")
    out = []
    for layer in model.layers:
        out.extend(_layers(fn, layer) if isinstance(layer, Sequential) else [layer])
    return out


class _Step:
    """One layer, detached from the model (copies of its arrays, so later changes to the model or
    activations it keeps from a forward are not in the graph): ``kind`` 'conv' | 'max' | 'avg' |
    'pointwise', the validated params ``p``, per axis ``(stride, leading padding, window extent,
    output size)`` for the first three, and ``args``: (weight, bias, algorithm) for 'conv',
    the :class:`_PoolBlock` for the pools, (function, extra arguments) for 'pointwise'."""

    def __init__(self, kind, p=None, axes=None, args=()):
        self.kind, self.p, self.axes, self.args = kind, p, axes, args


def _copy_of(a):
    return None if a is None else np.array(getattr(a, "data", a), copy=True)


def _identity(x):
    return x


def _steps(fn, layers, shape, dtype):
    """Per layer a :class:`_Step`, walking the shape ``(C, H, W)`` through the model; raises for a
    layer whose output at a position depends on more than its window."""
    from .._layers_basic import AvgPool2d, Conv2d, MaxPool2d, ReLU
    from ..layers_extra import BatchNorm2d, Dropout, LeakyReLU, ReLU6
    steps = []
    for i, layer in enumerate(layers):
        if isinstance(layer, Conv2d):
            p = V.conv_params(fn, (0,) + shape, layer.weight.shape, dtype, layer.stride, layer.padding,
                              layer.dilation, layer.groups)
            axes = ((p.sh, p.ph0, p.dh * (p.r - 1) + 1, p.oh), (p.sw, p.pw0, p.dw * (p.s - 1) + 1, p.ow))
            steps.append(_Step("conv", p, axes, (_copy_of(layer.weight), _copy_of(layer.bias), layer.algorithm)))
            shape = (p.k, p.oh, p.ow)
        elif isinstance(layer, (MaxPool2d, AvgPool2d)):
            dil = getattr(layer, "dilation", (1, 1))
            p = V.pool_params(fn, (0,) + shape, layer.kernel_size, layer.stride, layer.padding, dil,
                              layer.ceil_mode)
            axes = ((p.sh, p.ph, p.dh * (p.kh - 1) + 1, p.oh), (p.sw, p.pw, p.dw * (p.kw - 1) + 1, p.ow))
            kind = "max" if isinstance(layer, MaxPool2d) else "avg"
            steps.append(_Step(kind, p, axes, _PoolBlock(kind, (p.kh, p.kw), (p.sh, p.sw), (p.dh, p.dw),
                                                         layer.ceil_mode, getattr(layer, "count_include_pad", True))))
            shape = (shape[0], p.oh, p.ow)
        elif isinstance(layer, ReLU):
            steps.append(_Step("pointwise", args=(F.relu, ())))
        elif isinstance(layer, ReLU6):
            steps.append(_Step("pointwise", args=(F.relu6, ())))
        elif isinstance(layer, LeakyReLU):
            steps.append(_Step("pointwise", args=(F.leaky_relu, (layer.negative_slope,))))
        elif isinstance(layer, Dropout) and not layer.training:
            steps.append(_Step("pointwise", args=(_identity, ())))
        elif isinstance(layer, BatchNorm2d) and not layer.training and layer.track_running_stats:
            steps.append(_Step("pointwise", args=(F.batch_norm, (
                _copy_of(layer.running_mean), _copy_of(layer.running_var), _copy_of(layer.weight),
                _copy_of(layer.bias), False, 0.0, layer.eps))))
        else:
            what = type(layer).__name__
            if isinstance(layer, (BatchNorm2d, Dropout)) and layer.training:
                what += " in training mode (it mixes positions or draws a mask per call; call model.eval())"
            elif isinstance(layer, BatchNorm2d):
                what += " without running statistics (it normalises by the batch's)"
            raise ValueError(f"{fn}: layer {i} ({what}) cannot run tile by tile over H and W; a spatially "
                             f"chunked input needs a model of Conv2d, MaxPool2d, AvgPool2d, ReLU, ReLU6, "
                             f"LeakyReLU, and BatchNorm2d/Dropout in eval mode; chunk only the batch axis")
    return steps, shape


def _tile_plans(steps, chunks, axis):
    """Along one axis: the output tiles (the last layer's blocks, as chaining the dask ops would
    chunk them) and per tile ``(input rows [a, b), [per layer: ((o0, o1), local)])`` where ``local``
    is the layer's block padding of :func:`fastconv.dask._arrays._plan` (None for a pointwise layer).

    Walking back from a tile's output rows, each layer must produce exactly the rows the next one
    reads; so in the task every layer's input is exactly its window rows, nothing to slice."""
    bounds = _bounds(chunks)
    sizes = [bounds[-1]]
    for st in steps:  # output blocks layer by layer: each goes with the block holding its first row
        if st.axes:
            s, p0, e, out = st.axes[axis]
            blocks = _output_blocks(bounds, bounds[-1], s, p0, out)
            bounds = [0] + [b[1] for b in blocks]
        sizes.append(bounds[-1])
    tiles = list(zip(bounds[:-1], bounds[1:]))
    plans = []
    for lo, hi in tiles:
        per_layer = []
        for li in range(len(steps) - 1, -1, -1):
            st = steps[li]
            if st.axes is None:
                per_layer.append(((lo, hi), None))
                continue
            s, p0, e, out = st.axes[axis]
            ((_, _, pieces, local),) = _plan((sizes[li],), sizes[li], s, p0, e, out, st.kind != "conv", [(lo, hi)])
            ((_, rows),) = pieces  # one chunk, so one piece: the rows this layer reads
            per_layer.append(((lo, hi), local))
            lo, hi = rows.start, rows.stop
        per_layer.reverse()
        plans.append(((lo, hi), per_layer))
    return tiles, plans


class _TileRun:
    """Every layer of the model on one input tile (a class: dask would run a tuple that starts with
    a function as a task)."""

    def __init__(self, plan_h, plan_w):
        self.plan_h, self.plan_w = plan_h, plan_w

    def __call__(self, parts, steps):
        tile = x = _assemble(parts)  # in the thread's scratch buffer: never returned (below)
        for st, (out_h, loc_h), (out_w, loc_w) in zip(steps, self.plan_h, self.plan_w):
            p = st.p
            if st.kind == "pointwise":
                f, extra = st.args
                x = f(x, *extra)
                continue
            nh, nw = out_h[1] - out_h[0], out_w[1] - out_w[0]
            if st.kind == "conv":
                weight, bias, algorithm = st.args
                if x.shape[2] + sum(loc_h) == 0 or x.shape[3] + sum(loc_w) == 0:
                    x = np.zeros((x.shape[0], p.k, nh, nw), x.dtype)  # no row to read: none to write
                    continue
                # zeros only where the whole-image call pads (an image edge), else the rows are there
                xp = np.pad(x, ((0, 0), (0, 0), loc_h, loc_w)) if any(loc_h) or any(loc_w) else x
                x = F.conv2d(xp, weight, bias, (p.sh, p.sw), 0, (p.dh, p.dw), p.g, algorithm=algorithm)
            else:  # the pool of a chunked max_pool2d / avg_pool2d block, on the tile's rows
                x = st.args.pool(x, loc_h + (nh,), loc_w + (nw,))
        x = np.ascontiguousarray(x)
        return x.copy() if np.may_share_memory(x, tile) else x


def predict_tiles(fn, model, x):
    """The graph of ``model`` over ``x`` (N, C, H, W) chunked over H and W: one task per (batch
    block, output tile), reading its input tile plus the stack's halo from the neighbouring blocks."""
    import uuid
    layers = _layers(fn, model)
    x = x.rechunk({1: -1})
    steps, out_shape = _steps(fn, layers, x.shape[1:], x.dtype)
    tiles_h, plans_h = _tile_plans(steps, x.chunks[2], 0)
    tiles_w, plans_w = _tile_plans(steps, x.chunks[3], 1)
    name = f"fastconv-predict-tiles-{uuid.uuid4().hex}"  # a model has no cheap deterministic token
    skey = f"fastconv-model-steps-{uuid.uuid4().hex}"
    dsk = {skey: steps}
    bh, bw = _bounds(x.chunks[2]), _bounds(x.chunks[3])
    for bn in range(len(x.chunks[0])):
        for i, ((a, b), per_h) in enumerate(plans_h):
            for j, ((c, d), per_w) in enumerate(plans_w):
                parts = [[_piece(x, (x.name, bn, 0, ih, iw), sh, sw, dsk, name) for iw, sw in _pieces(bw, c, d)]
                         for ih, sh in _pieces(bh, a, b)]
                dsk[(name, bn, 0, i, j)] = (_TileRun(per_h, per_w), parts, skey)
    chunks = (x.chunks[0], (out_shape[0],), tuple(t[1] - t[0] for t in tiles_h), tuple(t[1] - t[0] for t in tiles_w))
    graph = HighLevelGraph.from_collections(name, dsk, dependencies=[x])
    return da.Array(graph, name, chunks, meta=_meta(x.dtype))
