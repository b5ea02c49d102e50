"""fastconv on Dask: images larger than memory, big batches, data-parallel training.

An optional extra (``pip install "fastconv[dask]"``); ``import fastconv`` never imports Dask.

* :func:`conv2d`, :func:`max_pool2d`, :func:`avg_pool2d`, :func:`relu` take dask arrays chunked over
  the batch **and** over ``H`` and ``W``.  Each output block is computed from the input rows and
  columns its windows read (the block's own rows plus a halo of ``dilation*(kernel-1)`` beyond them,
  gathered from as many neighbouring input blocks as needed, so chunks smaller than the kernel work),
  and output blocks start at window positions, so any stride is aligned.  Results equal the
  in-memory call: bitwise with ``algorithm='direct'`` and for the pools, within the algorithm's
  error otherwise (``'auto'`` may pick different algorithms for different block shapes).
* :func:`predict` runs a whole fastconv model over a batch chunked along its first axis.
* :func:`gradients` / :func:`train_step`: data-parallel training on a ``distributed.Client``.
* :class:`FastconvThreads` / :func:`setup_workers`: numba's pool per worker sized so that workers x
  threads x numba threads <= cores.

Notation: ``s`` stride, ``p0`` the padding before the first row (column), ``e = dilation*(k-1)+1``
the window's extent; output ``i`` reads input rows ``[i*s - p0, i*s - p0 + e)``.
"""
from __future__ import annotations

import copy
import math
import operator
import os
import uuid

import dask
import dask.array as da
import numpy as np
from dask.base import tokenize
from dask.highlevelgraph import HighLevelGraph

from . import _validation as V
from . import functional as F
from ._threads import max_threads, set_num_threads

try:
    from distributed import WorkerPlugin as _WorkerPlugin
except ImportError:  # pragma: no cover - the array ops need only dask.array
    _WorkerPlugin = object

__all__ = ["conv2d", "max_pool2d", "avg_pool2d", "relu", "predict", "gradients", "train_step",
           "FastconvThreads", "setup_workers"]


# --------------------------------------------------------------------------- inputs
def _as_dask(fn, x, ndim=4):
    """A float32/float64 dask array of ``ndim`` dims (a NumPy array becomes one chunk)."""
    if isinstance(x, np.ndarray):
        x = da.from_array(x, chunks=x.shape)
    if not isinstance(x, da.Array):
        raise TypeError(f"{fn}: input must be a dask.array.Array or numpy.ndarray, got {type(x).__name__}")
    if x.dtype not in V.FLOAT_DTYPES:
        raise TypeError(f"{fn}: input must have dtype float32 or float64, got {x.dtype}")
    if ndim is not None and x.ndim != ndim:
        raise ValueError(f"{fn}: input must be {ndim}-D, got {x.ndim}-D array of shape {x.shape}")
    if any(math.isnan(d) for c in x.chunks for d in c):
        raise ValueError(f"{fn}: input must have known chunk sizes, got {x.chunks} "
                         f"(call x.compute_chunk_sizes() first)")
    return x


def _meta(dtype, ndim=4):
    return np.empty((0,) * ndim, dtype=dtype)


# --------------------------------------------------------------------------- halo plans
def _bounds(chunks):
    b = [0]
    for c in chunks:
        b.append(b[-1] + c)
    return b


def _pieces(bounds, start, stop):
    """``[(block, slice within the block), ...]`` covering input rows ``[start, stop)``."""
    out = []
    for j in range(len(bounds) - 1):
        lo, hi = max(start, bounds[j]), min(stop, bounds[j + 1])
        if lo < hi:
            out.append((j, slice(lo - bounds[j], hi - bounds[j])))
    if not out:  # windows wholly inside a convolution's padding: an empty slice, all padding
        j = 0 if start < 0 else len(bounds) - 2
        out.append((j, slice(0, 0)))
    return out


def _output_blocks(bounds, size, s, p0, out):
    """Output blocks ``[(o0, o1), ...]``: output ``i`` goes with the input block holding the first row
    of its window (clipped to the input), so an output block is about an input block over the stride;
    input blocks that hold no window start (halo only, or chunks smaller than the stride) get none."""
    owner = []
    j = 0
    for i in range(out):
        a = min(max(i * s - p0, 0), size - 1)
        while a >= bounds[j + 1]:
            j += 1
        owner.append(j)
    blocks, o0 = [], 0
    for i in range(1, out + 1):
        if i == out or owner[i] != owner[o0]:
            blocks.append((o0, i))
            o0 = i
    return blocks


def _plan(chunks, size, s, p0, e, out, own_padding):
    """Per output block along one axis: ``(o0, o1, pieces, local)``.

    ``own_padding=False`` (convolution): the block reads rows ``[o0*s - p0, (o1-1)*s - p0 + e)``,
    the part outside the input is padded with explicit zeros (``local = (lead, trail)``) and the
    block is convolved without padding -- the same zeros the whole-array call pads with.

    ``own_padding=True`` (pooling, whose padding is -inf or changes the divisor): blocks whose windows
    stay inside the input read exactly those rows with no padding; a block whose windows reach past
    an edge reads from that edge and is pooled with the operation's own padding ``p0``, aligned so
    that its local outputs are whole-array outputs: from row 0 (local output ``j`` = output ``j``),
    or, at the far edge only, from row ``i0*s`` with ``i0 = o0 - ceil(p0/s)`` (local output ``j`` =
    output ``i0 + j``, the windows of the first ``o0 - i0`` touching the false leading padding are
    dropped).  ``local = (padding, first kept local output)``.
    """
    bounds = _bounds(chunks)
    plan = []
    for o0, o1 in _output_blocks(bounds, size, s, p0, out):
        lo, hi = o0 * s - p0, (o1 - 1) * s - p0 + e
        if not own_padding:
            start, stop = max(lo, 0), min(hi, size)
            local = (start - lo, hi - stop)
        elif lo >= 0 and hi <= size:
            start, stop, local = lo, hi, (0, 0)
        else:
            stop = size if hi > size else hi
            i0 = o0 - -(-p0 // s)
            if lo < 0 or i0 < 0:
                start, skip = 0, o0
            else:
                start, skip = i0 * s, o0 - i0
            local = (p0, skip)
        plan.append((o0, o1, _pieces(bounds, start, stop), local))
    return plan


def _assemble(parts, hpad=(0, 0), wpad=(0, 0)):
    """One contiguous array from a 2-D list of blocks (rows of H pieces, each a list of W pieces),
    with ``hpad``/``wpad`` rows/columns of zeros around it: one copy of each piece, into one fresh
    array (concatenating rows, then columns, then padding copied a block three times; measured here,
    1.2 s of copying against 2.2 s of convolution for 32 blocks of 16 x 258 x 258)."""
    if len(parts) == 1 and len(parts[0]) == 1 and not any(hpad) and not any(wpad):
        return parts[0][0]
    first = parts[0][0]
    hs = [r[0].shape[2] for r in parts]
    ws = [b.shape[3] for b in parts[0]]
    out = np.empty(first.shape[:2] + (hpad[0] + sum(hs) + hpad[1], wpad[0] + sum(ws) + wpad[1]), first.dtype)
    if any(hpad) or any(wpad):
        out[:, :, :hpad[0]] = 0
        out[:, :, out.shape[2] - hpad[1]:] = 0
        out[:, :, :, :wpad[0]] = 0
        out[:, :, :, out.shape[3] - wpad[1]:] = 0
    i = hpad[0]
    for row, dh in zip(parts, hs):
        j = wpad[0]
        for b, dw in zip(row, ws):
            out[:, :, i:i + dh, j:j + dw] = b
            j += dw
        i += dh
    return out


def _windowed(fn, x, op, plan_h, plan_w, c_blocks, c_chunks, extra_keys, extra_dsk, token):
    """Graph of one task per output block (batch block x channel block x H block x W block): the
    pieces of the input blocks its halo reaches, assembled and passed to ``op``."""
    name = f"{fn}-{token}"
    dsk = dict(extra_dsk)
    full = slice(None)
    for bn in range(len(x.chunks[0])):
        for bo, bc in enumerate(c_blocks):
            for i, (_, _, hpieces, hlocal) in enumerate(plan_h):
                for j, (_, _, wpieces, wlocal) in enumerate(plan_w):
                    parts = []
                    for ih, sh in hpieces:
                        row = []
                        for iw, sw in wpieces:
                            key = (x.name, bn, bc, ih, iw)
                            whole = (sh.stop - sh.start == x.chunks[2][ih]
                                     and sw.stop - sw.start == x.chunks[3][iw])
                            row.append(key if whole else (operator.getitem, key, (full, full, sh, sw)))
                        parts.append(row)
                    dsk[(name, bn, bo, i, j)] = (op, parts, hlocal, wlocal) + tuple(extra_keys)
    chunks = (x.chunks[0], c_chunks, tuple(b[1] - b[0] for b in plan_h), tuple(b[1] - b[0] for b in plan_w))
    graph = HighLevelGraph.from_collections(name, dsk, dependencies=[x])
    return da.Array(graph, name, chunks, meta=_meta(x.dtype))


class _ConvBlock:
    """Convolution of one output block (a class, not a tuple of arguments: dask would run a tuple
    that starts with a function as a task)."""

    def __init__(self, stride, dilation, groups, algorithm):
        self.stride, self.dilation, self.groups, self.algorithm = stride, dilation, groups, algorithm

    def __call__(self, parts, hlocal, wlocal, weight, bias=None):
        x = _assemble(parts, hlocal, wlocal)
        return F.conv2d(x, weight, bias, self.stride, 0, self.dilation, self.groups, algorithm=self.algorithm)


class _PoolBlock:
    """Max or average pooling of one output block; per axis ``(padding, first kept local output,
    output count)`` (see :func:`_plan`, ``own_padding=True``)."""

    def __init__(self, kind, kernel_size, stride, dilation, ceil_mode, count_include_pad):
        self.kind, self.kernel_size, self.stride, self.dilation = kind, kernel_size, stride, dilation
        self.ceil_mode, self.count_include_pad = ceil_mode, count_include_pad

    def __call__(self, parts, hlocal, wlocal):
        x = _assemble(parts)
        (ph, h0, nh), (pw, w0, nw) = hlocal, wlocal
        if self.kind == "max":
            y = F.max_pool2d(x, self.kernel_size, self.stride, (ph, pw), self.dilation, self.ceil_mode)
        else:
            y = F.avg_pool2d(x, self.kernel_size, self.stride, (ph, pw), self.ceil_mode, self.count_include_pad)
        if (h0, w0, nh, nw) == (0, 0) + y.shape[2:]:
            return y
        return np.ascontiguousarray(y[:, :, h0:h0 + nh, w0:w0 + nw])


# --------------------------------------------------------------------------- ops
def conv2d(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, *, algorithm="auto"):
    """2-D convolution of a dask array, chunked over the batch and over ``H`` and ``W``.

    Same arguments and result as :func:`fastconv.conv2d`; ``weight`` and ``bias`` are NumPy arrays
    (stored once in the graph).  The channel axis is rechunked to one chunk; the output has the
    input's batch chunks, one channel chunk, and spatial chunks of about (input chunk / stride).

    Parameters
    ----------
    x : dask.array.Array or numpy.ndarray, shape (N, C, H, W), float32 or float64
    weight, bias, stride, padding, dilation, groups, algorithm
        As :func:`fastconv.conv2d`.

    Returns
    -------
    y : dask.array.Array, shape (N, K, OH, OW), lazy

    Notes
    -----
    Each output block reads its own input rows plus a halo of ``dilation*(R-1)`` rows (``S``
    likewise) from as many neighbouring blocks as that takes, pads with zeros only where the
    whole-array call pads, and is convolved with ``padding=0``.  With ``algorithm='direct'`` the
    result is bitwise the in-memory result; other algorithms agree within their stated error.

    Examples
    --------
    >>> import numpy as np, dask.array as da, fastconv, fastconv.dask as fd
    >>> x = np.random.default_rng(0).standard_normal((2, 3, 20, 20)).astype(np.float32)
    >>> w = np.ones((4, 3, 3, 3), np.float32)
    >>> y = fd.conv2d(da.from_array(x, chunks=(1, 3, 7, 6)), w, padding=1, algorithm="direct")
    >>> y.shape, y.dtype
    ((2, 4, 20, 20), dtype('float32'))
    >>> bool((y.compute(scheduler="sync") == fastconv.conv2d(x, w, padding=1, algorithm="direct")).all())
    True
    """
    fn = "fastconv.dask.conv2d"
    x = _as_dask(fn, x)
    weight = V.as_float_array(fn, "weight", weight, 4, x.dtype)
    if bias is not None:
        bias = V.as_float_array(fn, "bias", bias, 1, x.dtype)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"{fn}: bias must have shape ({weight.shape[0]},) (out channels), got {bias.shape}")
    # validated as fastconv.conv2d validates, for an empty batch: no memory check for the whole image
    p = V.conv_params(fn, (0,) + x.shape[1:], weight.shape, x.dtype, stride, padding, dilation, groups)
    if not isinstance(algorithm, str):
        raise TypeError(f"{fn}: algorithm must be a str, got {type(algorithm).__name__}")
    F.conv2d(np.zeros((0,) + x.shape[1:], x.dtype), weight, bias, stride, padding, dilation, groups,
             algorithm=algorithm)  # an unknown algorithm, or one that cannot serve the case, raises here
    x = x.rechunk({1: -1})
    plan_h = _plan(x.chunks[2], p.h, p.sh, p.ph0, p.dh * (p.r - 1) + 1, p.oh, False)
    plan_w = _plan(x.chunks[3], p.w, p.sw, p.pw0, p.dw * (p.s - 1) + 1, p.ow, False)
    token = tokenize(x.name, weight, bias, p, algorithm)
    wkey = f"fastconv-weight-{tokenize(weight)}"
    extra = {wkey: weight}
    keys = [wkey]
    if bias is not None:
        bkey = f"fastconv-bias-{tokenize(bias)}"
        extra[bkey] = bias
        keys.append(bkey)
    op = _ConvBlock((p.sh, p.sw), (p.dh, p.dw), p.g, algorithm)
    return _windowed("fastconv-conv2d", x, op, plan_h, plan_w, [0], (p.k,), keys, extra, token)


def _pool(fn, kind, x, kernel_size, stride, padding, dilation, ceil_mode, count_include_pad):
    x = _as_dask(fn, x)
    p = V.pool_params(fn, (0,) + x.shape[1:], kernel_size, stride, padding, dilation, ceil_mode)
    count_include_pad = V._bool(fn, "count_include_pad", count_include_pad)
    plan_h = _plan(x.chunks[2], p.h, p.sh, p.ph, p.dh * (p.kh - 1) + 1, p.oh, True)
    plan_w = _plan(x.chunks[3], p.w, p.sw, p.pw, p.dw * (p.kw - 1) + 1, p.ow, True)
    op = _PoolBlock(kind, (p.kh, p.kw), (p.sh, p.sw), (p.dh, p.dw), V._bool(fn, "ceil_mode", ceil_mode),
                    count_include_pad)
    # each task also carries its block's output count per axis
    plan_h = [(o0, o1, pieces, local + (o1 - o0,)) for o0, o1, pieces, local in plan_h]
    plan_w = [(o0, o1, pieces, local + (o1 - o0,)) for o0, o1, pieces, local in plan_w]
    token = tokenize(x.name, kind, p, ceil_mode, count_include_pad)
    return _windowed(f"fastconv-{kind}-pool2d", x, op, plan_h, plan_w, range(len(x.chunks[1])), x.chunks[1],
                     [], {}, token)


def max_pool2d(x, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False):
    """2-D max pooling of a dask array chunked over the batch, channels, ``H`` and ``W``.

    Same arguments and (bitwise) result as :func:`fastconv.max_pool2d` (``return_indices`` is not
    offered: indices into a chunked plane would need a global offset per block).

    Examples
    --------
    >>> import numpy as np, dask.array as da, fastconv, fastconv.dask as fd
    >>> x = np.random.default_rng(0).standard_normal((2, 3, 11, 9))
    >>> y = fd.max_pool2d(da.from_array(x, chunks=(1, 2, 4, 5)), 3, stride=2, padding=1, ceil_mode=True)
    >>> bool((y.compute(scheduler="sync") == fastconv.max_pool2d(x, 3, 2, 1, ceil_mode=True)).all())
    True
    """
    return _pool("fastconv.dask.max_pool2d", "max", x, kernel_size, stride, padding, dilation, ceil_mode, True)


def avg_pool2d(x, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True):
    """2-D average pooling of a dask array chunked over the batch, channels, ``H`` and ``W``.

    Same arguments and (bitwise) result as :func:`fastconv.avg_pool2d`.

    Examples
    --------
    >>> import numpy as np, dask.array as da, fastconv, fastconv.dask as fd
    >>> x = np.random.default_rng(0).standard_normal((1, 2, 10, 10))
    >>> y = fd.avg_pool2d(da.from_array(x, chunks=(1, 1, 3, 4)), 3, 2, 1, count_include_pad=False)
    >>> bool((y.compute(scheduler="sync") == fastconv.avg_pool2d(x, 3, 2, 1, count_include_pad=False)).all())
    True
    """
    return _pool("fastconv.dask.avg_pool2d", "avg", x, kernel_size, stride, padding, 1, ceil_mode,
                 count_include_pad)


def relu(x):
    """:func:`fastconv.relu` block by block on a dask array of any shape and chunking.

    Examples
    --------
    >>> import numpy as np, dask.array as da, fastconv.dask as fd
    >>> fd.relu(da.from_array(np.array([-1.0, 0.0, 2.0]), chunks=2)).compute(scheduler="sync")
    array([0., 0., 2.])
    """
    x = _as_dask("fastconv.dask.relu", x, ndim=None)
    return x.map_blocks(F.relu, dtype=x.dtype, meta=_meta(x.dtype, x.ndim))


# --------------------------------------------------------------------------- models
def _lean(model, sample_shape, dtype):
    """A copy of ``model`` that has run on one sample of zeros, and the output of that run.

    Layers keep what their backward needs from the last forward (inputs, indices): a model used on
    a batch on the client would carry that batch's activations into every graph or scatter.  After
    a one-sample forward the copy carries one sample's.
    """
    lean = copy.deepcopy(model)
    lean(np.zeros((1,) + tuple(sample_shape), dtype))  # recording, so it replaces what the last forward kept
    return lean, _infer(lean, np.zeros((1,) + tuple(sample_shape), dtype))


class _Predict:
    """Runs the model on one batch block, on a private copy: layers keep what their backward needs
    (an input, indices), which would race between tasks sharing one worker's model and keep each
    block's activations alive after the task."""

    def __call__(self, model, x):
        return _infer(copy.deepcopy(model), x)


def predict(model, x, *, batch_chunk=None):
    """Run a fastconv model (anything called as ``model(x)`` on a NumPy batch) over a dask array
    chunked along its first axis, one task per batch block.

    Parameters
    ----------
    model : callable
        E.g. a :class:`fastconv.layers.Sequential`.  Stored once in the graph (one copy per worker,
        not one per task); each task runs a private copy of it.
    x : dask.array.Array or numpy.ndarray, shape (N, ...)
        The other axes are rechunked to one chunk each.
    batch_chunk : int, optional
        Rechunk the batch axis to this many samples per block.

    Returns
    -------
    dask.array.Array, shape (N, ...), lazy; the shape and dtype of one sample's output are found by
    running the model once, on the client, on one sample of zeros.

    Examples
    --------
    >>> import numpy as np, fastconv.dask as fd
    >>> from fastconv.layers import Conv2d, ReLU, MaxPool2d, Flatten, Linear, Sequential
    >>> net = Sequential(Conv2d(1, 4, 3, padding=1, rng=0), ReLU(), MaxPool2d(2), Flatten(), Linear(64, 10, rng=1))
    >>> x = np.random.default_rng(0).standard_normal((10, 1, 8, 8)).astype(np.float32)
    >>> y = fd.predict(net, x, batch_chunk=4)
    >>> y.chunks, bool(np.allclose(y.compute(scheduler="sync"), np.asarray(net(x)), rtol=1e-6, atol=1e-6))
    (((4, 4, 2), (10,)), True)
    """
    fn = "fastconv.dask.predict"
    if not callable(model):
        raise TypeError(f"{fn}: model must be callable (a fastconv model), got {type(model).__name__}")
    x = _as_dask(fn, x, ndim=None)
    if x.ndim < 1:
        raise ValueError(f"{fn}: input must have a batch axis, got a 0-D array")
    if batch_chunk is not None:
        if isinstance(batch_chunk, bool) or not isinstance(batch_chunk, (int, np.integer)) or batch_chunk < 1:
            raise ValueError(f"{fn}: batch_chunk must be a positive int, got {batch_chunk!r}")
    x = x.rechunk({0: int(batch_chunk) if batch_chunk else x.chunks[0], **{i: -1 for i in range(1, x.ndim)}})
    model, probe = _lean(model, x.shape[1:], x.dtype)
    name = f"fastconv-predict-{uuid.uuid4().hex}"  # a model has no cheap deterministic token
    mkey = f"fastconv-model-{uuid.uuid4().hex}"
    dsk = {mkey: model}
    tail = (0,) * (probe.ndim - 1)
    for i in range(len(x.chunks[0])):
        dsk[(name, i) + tail] = (_Predict(), mkey, (x.name, i) + (0,) * (x.ndim - 1))
    chunks = (x.chunks[0],) + tuple((d,) for d in probe.shape[1:])
    graph = HighLevelGraph.from_collections(name, dsk, dependencies=[x])
    return da.Array(graph, name, chunks, meta=_meta(probe.dtype, probe.ndim))


# --------------------------------------------------------------------------- data-parallel training
# The three functions below are the only code that knows how fastconv's layers run a backward pass
# and where gradients live.  Today: ``model.backward(loss_fn.backward())`` and ``Parameter.grad``;
# with a ``loss.backward()`` Module API only their bodies change.
def _loss_and_backward(model, loss_fn, x, y):
    """Forward, loss and backward of one shard; adds the gradients into the parameters, returns the loss.

    A loss that has its own ``backward`` (a tensor of an autograd Module API) is differentiated with
    ``loss.backward()``; a plain float with the layers' ``model.backward(loss_fn.backward())``.
    """
    loss = loss_fn(model(x), y)
    if hasattr(loss, "backward"):
        loss.backward()
        return float(loss.item())
    model.backward(loss_fn.backward(), input_grad=False)
    return float(loss)


def _infer(model, x):
    """``model(x)`` as a NumPy array, without recording a backward where the API records one."""
    try:
        from .autograd import no_grad
    except ImportError:
        out = model(x)
    else:
        with no_grad():
            out = model(x)
    return out if isinstance(out, np.ndarray) else np.asarray(getattr(out, "data", out))


def _zero_grads(model):
    for p in model.parameters():
        p.grad[...] = 0


def _grads(model):
    return [p.grad for p in model.parameters()]


def _shard_gradients(model, loss_fn, x, y, scale):
    """One shard on a worker: a private copy of the scattered model (tasks on one worker share it),
    forward, loss, backward; gradients and loss scaled by the shard's share of the batch."""
    model, loss_fn = copy.deepcopy(model), copy.deepcopy(loss_fn)
    _zero_grads(model)
    loss = _loss_and_backward(model, loss_fn, x, y)
    return [g * g.dtype.type(scale) for g in _grads(model)], loss * scale


def _sum_shards(*results):
    """Tree-reduction node: gradients added in the listed order (a fixed tree, so a fixed sum)."""
    grads = [g.copy() for g in results[0][0]]
    loss = results[0][1]
    for gs, lo in results[1:]:
        for a, b in zip(grads, gs):
            a += b
        loss += lo
    return grads, loss


def _get_client(fn, client):
    from distributed import Client, default_client
    if client is None:
        try:
            return default_client()
        except ValueError:
            raise ValueError(f"{fn}: client must be a distributed.Client (none given and no default "
                             f"client running)") from None
    if not isinstance(client, Client):
        raise TypeError(f"{fn}: client must be a distributed.Client, got {type(client).__name__}")
    return client


def _total_threads(client):
    return sum(w["nthreads"] for w in client.scheduler_info(n_workers=-1)["workers"].values()) or 1


def _shards(fn, client, x, y, shards):
    """Futures of ``(x_i, y_i)`` shards and their sizes.  NumPy inputs are split into ``shards``
    nearly equal parts (default: one per worker thread) and scattered; a dask ``x`` is split along its
    batch chunks (``y`` rechunked to match) and computed on the workers."""
    if isinstance(x, da.Array):
        y = da.asarray(y)
        x = x.rechunk({i: -1 for i in range(1, x.ndim)})
        y = y.rechunk((x.chunks[0],) + tuple((d,) for d in y.shape[1:]))
        xs, ys = x.to_delayed().ravel(), y.to_delayed().ravel()
        sizes = list(x.chunks[0])
        futs = client.compute([dask.delayed(tuple)([a, b]) for a, b in zip(xs, ys)])
        return [(f, s) for f, s in zip(futs, sizes) if s]
    if not isinstance(x, np.ndarray) or not isinstance(y, np.ndarray):
        raise TypeError(f"{fn}: x and y must both be numpy arrays, or x a dask array, got "
                        f"{type(x).__name__} and {type(y).__name__}")
    if x.shape[:1] != y.shape[:1] or x.shape[0] == 0:
        raise ValueError(f"{fn}: x and y must have the same positive batch size, got {x.shape} and {y.shape}")
    if shards is None:
        shards = _total_threads(client)
    if isinstance(shards, bool) or not isinstance(shards, (int, np.integer)) or shards < 1:
        raise ValueError(f"{fn}: shards must be a positive int, got {shards!r}")
    cuts = np.array_split(np.arange(x.shape[0]), min(int(shards), x.shape[0]))
    parts = [(x[c[0]:c[-1] + 1], y[c[0]:c[-1] + 1]) for c in cuts]
    futs = client.scatter(parts, hash=False)
    return list(zip(futs, [len(c) for c in cuts]))


def _infrastructure_errors():
    """Errors that say a worker or a connection went away, not that the step itself is wrong."""
    from distributed import KilledWorker
    from distributed.client import FutureCancelledError
    from distributed.comm.core import CommClosedError
    import asyncio
    return (KilledWorker, FutureCancelledError, CommClosedError, asyncio.CancelledError, OSError, TimeoutError)


def gradients(model, loss_fn, x, y, *, client=None, shards=None, split_every=2, retries=1):
    """A batch's loss and parameter gradients, computed shard by shard on a Dask cluster.

    The model (its weights) is scattered once, to every worker (``broadcast=True``); each shard is
    a task -- forward, loss and backward on a private copy of the model -- whose gradients, scaled by
    the shard's share of the batch, are summed by a tree reduction on the workers.  Only the sum
    comes back.  The result equals the single-process gradients of the whole batch up to rounding.

    Parameters
    ----------
    model : fastconv model
        E.g. a :class:`fastconv.layers.Sequential`; only ``model(x)``, ``model.parameters()`` and the
        backward call in ``_loss_and_backward`` are used.
    loss_fn : fastconv loss, e.g. :class:`fastconv.layers.CrossEntropyLoss`
        Its ``reduction`` ('mean', the default, or 'sum') says how shards are weighted.
    x, y : numpy.ndarray, or x a dask array chunked along the batch
        The batch and its targets.
    client : distributed.Client, optional
        Default: the current client.  ``Client("tcp://scheduler:8786")`` runs on a real cluster.
    shards : int, optional
        Shards of a NumPy batch (default: the number of worker threads).
    split_every : int
        Fan-in of the tree reduction (>= 2).
    retries : int
        Times the whole step is run again after a worker or connection is lost (the step has no
        side effect until it returns, so a rerun neither loses nor double-counts a shard).

    Returns
    -------
    loss : float
    grads : list of ndarray
        In ``model.parameters()`` order.

    Raises
    ------
    RuntimeError
        The step failed on every attempt because workers or connections were lost; the last
        error is chained.
    """
    fn = "fastconv.dask.gradients"
    client = _get_client(fn, client)
    if isinstance(split_every, bool) or not isinstance(split_every, (int, np.integer)) or split_every < 2:
        raise ValueError(f"{fn}: split_every must be an int >= 2, got {split_every!r}")
    if isinstance(retries, bool) or not isinstance(retries, (int, np.integer)) or retries < 0:
        raise ValueError(f"{fn}: retries must be an int >= 0, got {retries!r}")
    reduction = getattr(loss_fn, "reduction", "mean")
    errors = _infrastructure_errors()
    last = None
    for attempt in range(int(retries) + 1):
        try:
            return _gradients_once(fn, client, model, loss_fn, x, y, shards, int(split_every), reduction)
        except errors as exc:
            last = exc
    raise RuntimeError(f"{fn}: the step failed on all {int(retries) + 1} attempts because workers or "
                       f"connections were lost; last error: {type(last).__name__}: {last}") from last


def _gradients_once(fn, client, model, loss_fn, x, y, shards, split_every, reduction):
    parts = _shards(fn, client, x, y, shards)
    total = sum(n for _, n in parts)
    # hash=False: a new key every step (a content hash of a model may fall back on its id, and
    # would then hand the workers last step's weights)
    lean, _ = _lean(model, x.shape[1:], x.dtype)  # without the activations of a client-side forward
    model_f = client.scatter(lean, broadcast=True, hash=False)
    level = [client.submit(_shard_task, model_f, loss_fn, f, n / total if reduction == "mean" else 1.0,
                           pure=False) for f, n in parts]
    while len(level) > 1:
        level = [client.submit(_sum_shards, *level[i:i + split_every], pure=False)
                 for i in range(0, len(level), split_every)]
    grads, loss = level[0].result()
    return loss, grads


def _shard_task(model, loss_fn, xy, scale):
    return _shard_gradients(model, loss_fn, xy[0], xy[1], scale)


def train_step(model, loss_fn, optimizer, x, y, *, client=None, shards=None, split_every=2, retries=1):
    """One data-parallel training step: :func:`gradients` on the cluster, then one optimiser step on
    the client (``optimizer.zero_grad()``, gradients added to ``.grad``, ``optimizer.step()``), as the
    single-process step ``zero_grad(); loss_fn(model(x), y); backward; step()``.

    Returns
    -------
    float
        The batch's loss (before the step).

    Examples
    --------
    >>> import numpy as np
    >>> from distributed import Client, LocalCluster
    >>> from fastconv.layers import Conv2d, ReLU, Flatten, Linear, Sequential, CrossEntropyLoss, SGD
    >>> import fastconv.dask as fd
    >>> net = Sequential(Conv2d(1, 4, 3, rng=0), ReLU(), Flatten(), Linear(4 * 6 * 6, 3, rng=1))
    >>> opt, loss_fn = SGD(net.parameters(), lr=0.1), CrossEntropyLoss()
    >>> x = np.random.default_rng(0).standard_normal((16, 1, 8, 8)).astype(np.float32)
    >>> y = np.arange(16) % 3
    >>> with LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=":0") as cluster, \\
    ...         Client(cluster) as client:
    ...     losses = [fd.train_step(net, loss_fn, opt, x, y, client=client) for _ in range(10)]
    >>> losses[-1] < losses[0]
    True
    """
    loss, grads = gradients(model, loss_fn, x, y, client=client, shards=shards, split_every=split_every,
                            retries=retries)
    optimizer.zero_grad()
    for p, g in zip(model.parameters(), grads):
        p.grad += g
    optimizer.step()
    return loss


# --------------------------------------------------------------------------- threads on workers
def _cores():
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return os.cpu_count() or 1


class FastconvThreads(_WorkerPlugin):
    """Worker plugin: size numba's pool (and numpy's BLAS) in each worker so that the worker threads
    of one host times fastconv's threads stay within its cores.

    Register with :func:`setup_workers` (or ``client.register_plugin(FastconvThreads())``); workers
    that join later (a restarted one) get it too.

    Parameters
    ----------
    threads : int, optional
        fastconv threads per worker thread.  Default: ``max(1, cores // threads_on_this_host)``,
        where ``threads_on_this_host`` is the sum of ``nthreads`` of the workers the scheduler knows
        on the worker's host when it starts (itself included).

    Notes
    -----
    Several worker threads call fastconv's parallel kernels at once, which numba's ``workqueue``
    threading layer does not allow (it aborts the process); fastconv selects the ``'threadsafe'``
    layer (OpenMP or TBB) unless ``NUMBA_THREADING_LAYER`` is set, and this plugin refuses to set up
    a multi-threaded worker whose layer is ``workqueue``.
    """

    name = "fastconv-threads"
    idempotent = False

    def __init__(self, threads=None):
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, (int, np.integer))
                                    or threads < 1):
            raise ValueError(f"FastconvThreads: threads must be a positive int, got {threads!r}")
        self.threads = threads
        self.chosen = None

    async def setup(self, worker):
        import numba
        nthreads = worker.state.nthreads
        if nthreads > 1 and numba.threading_layer() == "workqueue":
            raise RuntimeError(
                f"FastconvThreads: worker {worker.address} runs {nthreads} threads but numba's threading "
                f"layer is 'workqueue', which aborts on concurrent parallel calls; unset "
                f"NUMBA_THREADING_LAYER (fastconv then picks 'threadsafe') or use threads_per_worker=1")
        n = self.threads
        if n is None:
            host = worker.address.rsplit(":", 1)[0]
            here = nthreads
            try:
                info = await worker.scheduler.identity()
                here = sum(w["nthreads"] for a, w in info["workers"].items()
                           if a.rsplit(":", 1)[0] == host and a != worker.address) + nthreads
            except Exception:  # the scheduler may be busy; then count this worker only
                pass
            n = max(1, _cores() // max(here, 1))
        n = min(int(n), max_threads())
        set_num_threads(n)
        self.chosen = n


def setup_workers(client=None, threads=None):
    """Register :class:`FastconvThreads` on every worker of ``client``; returns ``{worker: threads}``.

    Examples
    --------
    >>> from distributed import Client, LocalCluster
    >>> import fastconv.dask as fd
    >>> with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=":0") as c, \\
    ...         Client(c) as client:
    ...     sorted(fd.setup_workers(client, threads=1).values())
    [1]
    """
    client = _get_client("fastconv.dask.setup_workers", client)
    client.register_plugin(FastconvThreads(threads))

    def _report(dask_worker):
        return dask_worker.plugins[FastconvThreads.name].chosen

    return client.run(_report)
