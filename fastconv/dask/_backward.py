"""The backward pass of a convolution on dask arrays chunked over the batch and over ``H`` and
``W``: the input gradient block by block as a transposed convolution of the output-gradient rows
that reach it, the weight and bias gradients as per-block partial sums reduced by a tree.
"""
from __future__ import annotations

import dask.array as da
import numpy as np
from dask.base import tokenize
from dask.highlevelgraph import HighLevelGraph

from .. import _validation as V
from .. import functional as F
from .._results import Conv2dGrads
from .._select import select
from ._arrays import _as_dask, _assemble, _bounds, _piece, _plan
from ._transpose import _transposed


class _GradWeightBlock:
    """Weight and bias gradients of one output-gradient block: the input rows its windows read,
    zero-padded where the whole-array call pads, correlated with it without padding."""

    def __init__(self, stride, dilation, groups, algorithm):
        self.stride, self.dilation, self.groups, self.algorithm = stride, dilation, groups, algorithm

    def __call__(self, parts, hlocal, wlocal, gy, weight):
        if gy.size == 0:
            return np.zeros(weight.shape, gy.dtype), np.zeros(weight.shape[0], gy.dtype)
        x = _assemble(parts, hlocal, wlocal)
        return F.conv2d_grad_weight(gy, x, weight, self.stride, 0, self.dilation, self.groups,
                                    algorithm=self.algorithm)


def _partial(parts, which):
    """One of a block's two partial sums, with a leading axis of one (the block's index)."""
    return parts[which][None]


def _grad_weight(gy, x, weight, p, algorithm, split_every, token):
    """Per (batch, H, W) block of ``gy`` the partial ``(grad_weight, grad_bias)``, summed by dask's
    tree reduction, ``split_every`` partials per task."""
    # output blocks as gy is chunked; each reads the x rows its windows cover (the conv2d plan)
    blocks_h = list(zip(_bounds(gy.chunks[2])[:-1], _bounds(gy.chunks[2])[1:]))
    blocks_w = list(zip(_bounds(gy.chunks[3])[:-1], _bounds(gy.chunks[3])[1:]))
    plan_h = _plan(x.chunks[2], p.h, p.sh, p.ph0, p.dh * (p.r - 1) + 1, p.oh, False, blocks_h)
    plan_w = _plan(x.chunks[3], p.w, p.sw, p.pw0, p.dw * (p.s - 1) + 1, p.ow, False, blocks_w)
    name = f"fastconv-conv2d-grad-block-{token}"
    wkey = f"fastconv-weight-{tokenize(weight)}"
    op = _GradWeightBlock((p.sh, p.sw), (p.dh, p.dw), p.g, algorithm)
    dsk = {wkey: weight}
    nb, nh, nw = len(gy.chunks[0]), len(plan_h), len(plan_w)
    for bn in range(nb):
        for i, (_, _, hpieces, hlocal) in enumerate(plan_h):
            for j, (_, _, wpieces, wlocal) in enumerate(plan_w):
                parts = [[_piece(x, (x.name, bn, 0, ih, iw), sh, sw, dsk, name) for iw, sw in wpieces]
                         for ih, sh in hpieces]
                dsk[(name, bn, i, j)] = (op, parts, hlocal, wlocal, (gy.name, bn, 0, i, j), wkey)
    graph = HighLevelGraph.from_collections(name, dsk, dependencies=[x, gy])
    blocks = [(bn, i, j) for bn in range(nb) for i in range(nh) for j in range(nw)]
    out = []
    for which, shape in ((0, weight.shape), (1, (weight.shape[0],))):
        # the partials along one leading axis, so that a task of the tree adds split_every of them
        pname = f"fastconv-conv2d-grad-{'weight' if which == 0 else 'bias'}-partial-{token}"
        layer = {(pname, b) + (0,) * len(shape): (_partial, (name,) + blk, which) for b, blk in enumerate(blocks)}
        g = HighLevelGraph.merge(graph, HighLevelGraph({pname: layer}, {pname: {name}}))
        chunks = ((1,) * len(blocks),) + tuple((d,) for d in shape)
        parts = da.Array(g, pname, chunks, meta=np.empty((0,) * (1 + len(shape)), gy.dtype))
        out.append(parts.sum(axis=0, split_every=split_every))
    return out


def conv2d_backward(grad_output, x, weight, stride=1, padding=0, dilation=1, groups=1, *, algorithm="auto",
                    split_every=None):
    """Gradients of :func:`fastconv.dask.conv2d` with respect to input, weight and bias, on dask
    arrays chunked over the batch and over ``H`` and ``W``.

    Same arguments and results as :func:`fastconv.conv2d_backward`, as lazy dask arrays.

    Parameters
    ----------
    grad_output : dask.array.Array or numpy.ndarray, shape (N, K, OH, OW)
        Any chunking; its batch axis is rechunked like ``x``'s and its channels to one chunk.
    x : dask.array.Array or numpy.ndarray, shape (N, C, H, W), float32 or float64 (both the same)
    weight : numpy.ndarray, shape (K, C/groups, R, S)
    stride, padding, dilation, groups, algorithm
        As :func:`fastconv.conv2d_backward` (``algorithm`` serves both passes of every block).
    split_every : int >= 2, optional
        How many partial sums each task of the weight-gradient tree adds (dask's default if None).

    Returns
    -------
    Conv2dGrads
        ``(grad_input (N, C, H, W) chunked like x, grad_weight (K, C/groups, R, S), grad_bias (K,))``,
        dask arrays; the last two are one chunk each.

    Notes
    -----
    ``grad_input``: each of ``x``'s blocks is the transposed convolution of the ``grad_output`` rows
    that reach it (see :func:`fastconv.dask.conv_transpose2d`); bitwise the in-memory result with
    ``algorithm='direct'`` (but where only one of the whole batch and a block runs direct's
    image-by-image stride-1 path: about an ulp).  ``grad_weight`` and ``grad_bias``: per block of ``grad_output``, the
    input rows its windows read (zeros where the whole-array call pads) and the block give a partial
    sum (:func:`fastconv.conv2d_grad_weight`); a tree adds them, in another order than the in-memory
    call, so they agree within rounding (float32: a few ulps of the largest partial per level).

    Examples
    --------
    >>> import numpy as np, dask.array as da, fastconv, fastconv.dask as fd
    >>> rng = np.random.default_rng(0)
    >>> x, w = rng.standard_normal((2, 3, 12, 10)), rng.standard_normal((4, 3, 3, 3))
    >>> gy = rng.standard_normal((2, 4, 6, 5))
    >>> g = fd.conv2d_backward(da.from_array(gy, chunks=(1, 4, 2, 3)), da.from_array(x, chunks=(1, 3, 5, 4)),
    ...                        w, stride=2, padding=1, algorithm="direct")
    >>> g.grad_input.chunks == ((1, 1), (3,), (5, 5, 2), (4, 4, 2)), g.grad_weight.shape, g.grad_bias.shape
    (True, (4, 3, 3, 3), (4,))
    >>> gx, gw, gb = da.compute(*g, scheduler="sync")
    >>> want = fastconv.conv2d_backward(gy, x, w, stride=2, padding=1, algorithm="direct")
    >>> bool((gx == want.grad_input).all()), np.allclose(gw, want.grad_weight), np.allclose(gb, want.grad_bias)
    (True, True, True)
    """
    fn = "fastconv.dask.conv2d_backward"
    x = _as_dask(fn, x)
    grad_output = _as_dask(fn, grad_output, name="grad_output")
    if grad_output.dtype != x.dtype:
        raise TypeError(f"{fn}: grad_output must have the same dtype as the input ({x.dtype}), "
                        f"got {grad_output.dtype}")
    weight = V.as_float_array(fn, "weight", weight, 4, x.dtype)
    # validated as fastconv.conv2d_backward validates, for an empty batch (no memory check of the image)
    p = V.conv_params(fn, (0,) + x.shape[1:], weight.shape, x.dtype, stride, padding, dilation, groups)
    want = (x.shape[0],) + p.y_shape[1:]
    if grad_output.shape != want:
        raise ValueError(f"{fn}: grad_output must have the output's shape {want}, got {grad_output.shape}")
    if split_every is not None and (isinstance(split_every, bool) or not isinstance(split_every, (int, np.integer))
                                    or split_every < 2):
        raise ValueError(f"{fn}: split_every must be None or an int >= 2, got {split_every!r}")
    if not isinstance(algorithm, str):
        raise TypeError(f"{fn}: algorithm must be a str, got {type(algorithm).__name__}")
    if algorithm != "auto":  # an unknown name, or one that cannot serve a pass, raises here
        for pass_ in ("grad_input", "grad_weight"):
            select(fn, algorithm, p, pass_, 1)
    c_chunks = x.chunks[1]
    x = x.rechunk({1: -1})
    grad_output = grad_output.rechunk({0: x.chunks[0], 1: -1})
    token = tokenize(grad_output.name, x.name, weight, p, algorithm, split_every)
    blocks_h = list(zip(_bounds(x.chunks[2])[:-1], _bounds(x.chunks[2])[1:]))
    blocks_w = list(zip(_bounds(x.chunks[3])[:-1], _bounds(x.chunks[3])[1:]))
    gx = _transposed("fastconv-conv2d-grad-input", grad_output, weight, None, (p.sh, p.sw), (p.ph0, p.pw0),
                     (p.dh, p.dw), p.g, algorithm, blocks_h, blocks_w, token)
    if gx.chunks[1] != c_chunks:
        gx = gx.rechunk({1: c_chunks})
    gw, gb = _grad_weight(grad_output, x, weight, p, algorithm, split_every, token)
    return Conv2dGrads(gx, gw, gb)
