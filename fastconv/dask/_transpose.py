"""Transposed convolution of dask arrays chunked over the batch and over ``H`` and ``W``, and the
halo plan it shares with :func:`fastconv.dask.conv2d_backward`'s input gradient.

Along one axis a transposed convolution (stride ``s``, leading padding ``p0``, dilation ``d``, ``r``
taps) sends input row ``i`` through tap ``t`` to output row ``o = i*s - p0 + t*d``.  Output rows
``[o0, o1)`` therefore receive exactly the input rows ``i`` with
``o0 + p0 - (r-1)*d <= i*s <= o1 - 1 + p0``: a window ``[i0, i1)`` of the input.  The transposed
convolution of that window alone, without padding, puts row ``i`` tap ``t`` at local row
``(i - i0)*s + t*d``, i.e. output row ``o`` at local row ``o - (i0*s - p0)``; every output row of the
block gets all its terms there, so the block is a crop of the window's result (zeros where no input
row reaches, as in the whole-array call).
"""
from __future__ import annotations

import numpy as np
from dask.base import tokenize

from .. import _validation as V
from .. import functional as F
from .._select import select
from ._arrays import _as_dask, _assemble, _bounds, _pieces, _windowed


def _transpose_blocks(in_bounds, s, p0, out):
    """Default output blocks: output row ``o`` goes with the input block holding row
    ``floor((o + p0) / s)`` (the row its tap 0 comes from), so blocks are about ``s`` x the input's."""
    cuts = sorted({min(max(b * s - p0, 0), out) for b in in_bounds[1:-1]} | {0, out})
    return [(a, b) for a, b in zip(cuts, cuts[1:]) if a < b]


def _transpose_plan(chunks, size, s, p0, d, r, blocks):
    """Per output block ``(o0, o1)`` along one axis: ``(o0, o1, pieces, (q0, o1 - o0))``, the input
    pieces of the window that reaches it and the block's first row in the window's unpadded result
    (``q0 < 0`` or a short result: rows no input reaches, zeros).  A block no input reaches gets an
    empty piece (its batch size still comes from the input)."""
    bounds = _bounds(chunks)
    plan = []
    for o0, o1 in blocks:
        i0 = min(max(-(-(o0 + p0 - (r - 1) * d) // s), 0), size)
        i1 = min(max((o1 - 1 + p0) // s + 1, 0), size)
        i1 = max(i1, i0)
        plan.append((o0, o1, _pieces(bounds, i0, i1), (o0 - (i0 * s - p0), o1 - o0)))
    return plan


def _crop(z, q0, n, axis):
    """Rows ``[q0, q0 + n)`` of ``z`` along ``axis`` (2 or 3), zeros where they fall outside it."""
    if q0 >= 0 and q0 + n <= z.shape[axis]:
        return z[:, :, q0:q0 + n] if axis == 2 else z[:, :, :, q0:q0 + n]
    shape = list(z.shape)
    shape[axis] = n
    y = np.zeros(shape, z.dtype)
    lo, hi = max(q0, 0), min(q0 + n, z.shape[axis])
    if lo < hi:
        if axis == 2:
            y[:, :, lo - q0:hi - q0] = z[:, :, lo:hi]
        else:
            y[:, :, :, lo - q0:hi - q0] = z[:, :, :, lo:hi]
    return y


class _TransposeBlock:
    """Transposed convolution of one output block from its input window (a class: dask would run a
    tuple that starts with a function as a task)."""

    def __init__(self, stride, dilation, groups, algorithm):
        self.stride, self.dilation, self.groups, self.algorithm = stride, dilation, groups, algorithm

    def __call__(self, parts, hlocal, wlocal, weight, bias=None):
        x = _assemble(parts)
        (qh, nh), (qw, nw) = hlocal, wlocal
        cout = weight.shape[1] * self.groups
        if min(x.shape[2:]) == 0:  # no input row or column reaches the block
            y = np.zeros((x.shape[0], cout, nh, nw), x.dtype)
        else:
            # fastconv clamps a stride beyond the extent a one-row window's result spans, and a stride
            # of 1 takes another kernel path (sums in another order: 4e-16 off in float64): a zero
            # row after it keeps the whole array's stride (and reaches only rows past the block)
            r, s = weight.shape[2:]
            eh, ew = self.dilation[0] * (r - 1) + 1, self.dilation[1] * (s - 1) + 1
            grow = (int(x.shape[2] == 1 and eh < self.stride[0]), int(x.shape[3] == 1 and ew < self.stride[1]))
            if any(grow):
                x = np.pad(x, ((0, 0), (0, 0), (0, grow[0]), (0, grow[1])))
            z = F.conv_transpose2d(x, weight, None, self.stride, 0, 0, self.groups, self.dilation,
                                   algorithm=self.algorithm)
            y = np.ascontiguousarray(_crop(_crop(z, qh, nh, 2), qw, nw, 3))
        if bias is not None:  # added after the sum, as the whole-array call does
            y += bias[:, None, None]
        return y


def _transposed(name, gy, weight, bias, stride, p0, dilation, groups, algorithm, blocks_h, blocks_w, token):
    """The graph of a transposed convolution of ``gy`` (channels in one chunk) onto output blocks
    ``blocks_h`` x ``blocks_w``, with leading paddings ``p0 = (ph0, pw0)``."""
    r, s = weight.shape[2:]
    plan_h = _transpose_plan(gy.chunks[2], gy.shape[2], stride[0], p0[0], dilation[0], r, blocks_h)
    plan_w = _transpose_plan(gy.chunks[3], gy.shape[3], stride[1], p0[1], dilation[1], s, blocks_w)
    wkey = f"fastconv-weight-{tokenize(weight)}"
    extra, keys = {wkey: weight}, [wkey]
    if bias is not None:
        bkey = f"fastconv-bias-{tokenize(bias)}"
        extra[bkey] = bias
        keys.append(bkey)
    op = _TransposeBlock(stride, dilation, groups, algorithm)
    return _windowed(name, gy, op, plan_h, plan_w, [0], (weight.shape[1] * groups,), keys, extra, token)


def conv_transpose2d(x, weight, bias=None, stride=1, padding=0, output_padding=0, groups=1, dilation=1, *,
                     algorithm="auto"):
    """2-D transposed convolution of a dask array, chunked over the batch and over ``H`` and ``W``.

    Same arguments and result as :func:`fastconv.conv_transpose2d`; ``weight`` and ``bias`` are
    NumPy arrays (stored once in the graph).  The channel axis is rechunked to one chunk; the output
    has the input's batch chunks, one channel chunk, and spatial chunks of about (input chunk x
    stride).

    Parameters
    ----------
    x : dask.array.Array or numpy.ndarray, shape (N, C_in, H, W), float32 or float64
    weight : numpy.ndarray, shape (C_in, C_out/groups, R, S), same dtype
    bias : numpy.ndarray, shape (C_out,), optional
    stride, padding, output_padding, groups, dilation, algorithm
        As :func:`fastconv.conv_transpose2d`.

    Returns
    -------
    y : dask.array.Array, shape (N, C_out, OH, OW), lazy
        ``OH = (H - 1)*sh - 2*ph + dh*(R - 1) + oph + 1`` and likewise ``OW``.

    Notes
    -----
    Output row ``o`` receives input row ``i`` through tap ``t`` where ``i*s - p + t*d = o``.  Each
    output block is the transposed convolution, without padding, of the input rows that reach it
    (its own rows over the stride plus a halo of about ``d*(R-1)/s`` rows before them, gathered
    from as many input blocks as that takes), cropped to the block; rows that no input reaches
    (``output_padding``, gaps of a stride larger than the kernel) are zeros plus the bias.  With
    ``algorithm='direct'`` the result is bitwise the in-memory result, but where direct's stride-1
    pass runs image by image (16 or more images x groups of small planes) for the whole batch and
    not for a block, or the reverse: that path sums in another order (about an ulp; the in-memory
    call differs as much between a batch and its halves).  Other algorithms agree within their
    stated error.

    Examples
    --------
    >>> import numpy as np, dask.array as da, fastconv, fastconv.dask as fd
    >>> x = np.random.default_rng(0).standard_normal((2, 3, 9, 8)).astype(np.float32)
    >>> w = np.ones((3, 4, 3, 3), np.float32)
    >>> y = fd.conv_transpose2d(da.from_array(x, chunks=(1, 3, 4, 3)), w, stride=2, padding=1,
    ...                         output_padding=1, algorithm="direct")
    >>> y.shape, y.dtype
    ((2, 4, 18, 16), dtype('float32'))
    >>> want = fastconv.conv_transpose2d(x, w, stride=2, padding=1, output_padding=1, algorithm="direct")
    >>> bool((y.compute(scheduler="sync") == want).all())
    True
    """
    fn = "fastconv.dask.conv_transpose2d"
    x = _as_dask(fn, x)
    weight = V.as_float_array(fn, "weight", weight, 4, x.dtype)
    # validated as fastconv.conv_transpose2d validates, for an empty batch (no memory check of the image)
    p, _ = V.transpose_params(fn, (0,) + x.shape[1:], weight.shape, x.dtype, stride, padding, output_padding,
                              dilation, groups)
    if bias is not None:
        bias = V.as_float_array(fn, "bias", bias, 1, x.dtype)
        if bias.shape[0] != p.c:
            raise ValueError(f"{fn}: bias must have shape ({p.c},) (out channels), got {bias.shape}")
    if not isinstance(algorithm, str):
        raise TypeError(f"{fn}: algorithm must be a str, got {type(algorithm).__name__}")
    if algorithm != "auto":  # an unknown name, or one that cannot serve the pass, raises here
        select(fn, algorithm, p, "grad_input", 1)
    x = x.rechunk({1: -1})
    # p is the convolution whose input gradient this is: its input is our output (p.h x p.w)
    blocks_h = _transpose_blocks(_bounds(x.chunks[2]), p.sh, p.ph0, p.h)
    blocks_w = _transpose_blocks(_bounds(x.chunks[3]), p.sw, p.pw0, p.w)
    token = tokenize(x.name, weight, bias, p, algorithm)
    # p's stride and dilation, as clamped for the whole array (a clamped stride means one input row)
    return _transposed("fastconv-conv-transpose2d", x, weight, bias, (p.sh, p.sw), (p.ph0, p.pw0),
                       (p.dh, p.dw), p.g, algorithm, blocks_h, blocks_w, token)
