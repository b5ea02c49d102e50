"""Batch-normalisation and element-wise kernels (batch norm forward and backward, dropout's scaled mask).

Notation: ``x`` is viewed as ``(n, c, m)`` with ``m`` the product of the spatial sizes; per-channel
vectors have length ``c``.  Reductions run ``prange`` over channels (each channel's sums belong to one
work item, accumulated in float64 in a fixed order, so results do not depend on the thread count);
element-wise passes run ``prange`` over the ``n*c`` planes, whose outputs are disjoint.

The backward pass is written as one per-channel affine map of ``(gy, x)``:
``gx = a[c]*gy + b[c]*x + d[c]``.  In training mode, with ``M = n*m``, ``S1 = sum(gy)`` and
``S2 = sum(gy*(x-mean))``: ``a = w*invstd``, ``b = -w*invstd**3*S2/M``, ``d = -a*S1/M - b*mean``
(the derivative of ``w*(x-mean)*invstd`` through the batch mean and variance).  In eval mode the
statistics are constants: ``b = d = 0``.

Batch norm fused with the activation after it (``relu``, or ``relu6`` with ``hi = 6``): the forward
clamps ``a*x + d`` as it stores it; the backward masks ``gy`` by the fused output ``y`` as it reads
it (``gy`` where ``0 < y < hi``, and also where ``y`` is NaN for relu, as ``threshold_backward``),
so the activation's own pass over memory, its output and its gradient array disappear.
"""
import numpy as np
from numba import prange

from .._jit import kernel, micro
from ._nhwc_kernels import block_sums
from .nhwc import channels_last_view, is_channels_last, to_nhwc


@micro
def _act_grad(g, v, hi, relu, zero):
    # the gradient g through the fused activation whose output is v: passed where 0 < v < hi, and
    # where v is NaN for relu (as threshold_backward); zero elsewhere
    return g if (not v <= 0) and (relu or v < hi) else zero


@kernel
def _moments(x, mean, var):
    """Per-channel mean and biased variance (two passes: no cancellation for large means)."""
    n, c, m = x.shape
    cnt = n * m
    for k in prange(c):
        s = 0.0
        for i in range(n):
            for j in range(m):
                s += x[i, k, j]
        mu = s / cnt
        q = 0.0
        for i in range(n):
            for j in range(m):
                d = x[i, k, j] - mu
                q += d * d
        mean[k] = mu
        var[k] = q / cnt


@kernel
def _grad_sums(gy, x, mean, s1, s2):
    """Per-channel ``sum(gy)`` and ``sum(gy * (x - mean))``."""
    n, c, m = x.shape
    for k in prange(c):
        a = 0.0
        b = 0.0
        mu = mean[k]
        for i in range(n):
            for j in range(m):
                g = gy[i, k, j]
                a += g
                b += g * (x[i, k, j] - mu)
        s1[k] = a
        s2[k] = b


@kernel
def _affine(x, a, d, out):
    """``out[i, k, :] = a[k] * x[i, k, :] + d[k]``."""
    n, c, m = x.shape
    for p in prange(n * c):
        i, k = p // c, p % c
        ak, dk = a[k], d[k]
        xr, orow = x[i, k], out[i, k]
        for j in range(m):
            orow[j] = ak * xr[j] + dk


@kernel
def _affine2(gy, x, a, b, d, out):
    """``out[i, k, :] = a[k] * gy[i, k, :] + b[k] * x[i, k, :] + d[k]``."""
    n, c, m = x.shape
    for p in prange(n * c):
        i, k = p // c, p % c
        ak, bk, dk = a[k], b[k], d[k]
        gr, xr, orow = gy[i, k], x[i, k], out[i, k]
        for j in range(m):
            orow[j] = ak * gr[j] + bk * xr[j] + dk


@kernel
def _affine_act(x, a, d, zero, hi, out):
    """``out[i, k, :] = clamp(a[k] * x[i, k, :] + d[k], 0, hi)`` (NaN stays NaN)."""
    n, c, m = x.shape
    for p in prange(n * c):
        i, k = p // c, p % c
        ak, dk = a[k], d[k]
        xr, orow = x[i, k], out[i, k]
        for j in range(m):
            v = ak * xr[j] + dk
            orow[j] = zero if v <= 0 else (hi if v >= hi else v)


@kernel
def _grad_sums_act(gy, y, x, mean, hi, relu, zero, s1, s2):
    """``_grad_sums`` of the gradient masked by the fused output ``y``."""
    n, c, m = x.shape
    for k in prange(c):
        a = 0.0
        b = 0.0
        mu = mean[k]
        for i in range(n):
            gr, yr, xr = gy[i, k], y[i, k], x[i, k]
            for j in range(m):
                g = _act_grad(gr[j], yr[j], hi, relu, zero)
                a += g
                b += g * (xr[j] - mu)
        s1[k] = a
        s2[k] = b


@kernel
def _affine2_act(gy, y, x, a, b, d, hi, relu, zero, out):
    """``_affine2`` of the gradient masked by the fused output ``y``."""
    n, c, m = x.shape
    for p in prange(n * c):
        i, k = p // c, p % c
        ak, bk, dk = a[k], b[k], d[k]
        gr, yr, xr, orow = gy[i, k], y[i, k], x[i, k], out[i, k]
        for j in range(m):
            g = _act_grad(gr[j], yr[j], hi, relu, zero)
            orow[j] = ak * g + bk * xr[j] + dk


@kernel
def _masked_scale(x, keep, scale, zero, out):
    """``out = x * (scale if keep else 0)`` over flat arrays (dropout forward and backward).  A
    product, not a select, so a NaN in a dropped position stays NaN, as in PyTorch."""
    size = x.size
    nch = min(size, 64)
    for ch in prange(nch):
        for e in range(ch * size // nch, (ch + 1) * size // nch):
            out[e] = x[e] * (scale if keep[e] else zero)


# --------------------------------------------------------------------------- channels_last (rows)
# A channels_last (N, C, H, W) array is an (R, C) matrix of rows (R = N*H*W positions) in memory:
# the same passes run along the channels of each row (vectors of channels, no transposing copy).
# Reductions split the rows into a fixed number of blocks (ROW_BLOCKS, from R alone) with float64
# partial sums per block and channel, added in block order: the bits do not depend on the threads.
ROW_BLOCKS = 64


def row_blocks(rows):
    """(blocks, rows per block) of the reductions over ``rows`` rows."""
    nb = max(1, min(rows, ROW_BLOCKS))
    per = -(-rows // nb)
    return -(-rows // per), per


@kernel
def _moments_rows(x, mean, var, parts, per):
    r, c = x.shape
    nb = parts.shape[0]
    for b in prange(nb):
        block_sums(x, parts, b, per)
    for k in range(c):
        s = 0.0
        for b in range(nb):
            s += parts[b, k]
        mean[k] = s / r
    for b in prange(nb):
        for k in range(c):
            parts[b, k] = 0.0
        for i in range(b * per, min(r, (b + 1) * per)):
            for k in range(c):
                d = x[i, k] - mean[k]
                parts[b, k] += d * d
    for k in range(c):
        q = 0.0
        for b in range(nb):
            q += parts[b, k]
        var[k] = q / r


@kernel
def _grad_sums_rows(gy, y, x, mean, hi, relu, masked, zero, s1, s2, p1, p2, per):
    """``_grad_sums`` (``_grad_sums_act`` with ``masked``) of (R, C) rows."""
    r, c = x.shape
    nb = p1.shape[0]
    for b in prange(nb):
        for k in range(c):
            p1[b, k] = 0.0
            p2[b, k] = 0.0
        for i in range(b * per, min(r, (b + 1) * per)):
            for k in range(c):
                g = _act_grad(gy[i, k], y[i, k], hi, relu, zero) if masked else gy[i, k]
                p1[b, k] += g
                p2[b, k] += g * (x[i, k] - mean[k])
    for k in range(c):
        a = 0.0
        q = 0.0
        for b in range(nb):
            a += p1[b, k]
            q += p2[b, k]
        s1[k] = a
        s2[k] = q


@kernel
def _affine_rows(x, a, d, act, zero, hi, out, per):
    """``_affine`` (``_affine_act`` with ``act``) of (R, C) rows."""
    r, c = x.shape
    for b in prange((r + per - 1) // per):
        for i in range(b * per, min(r, (b + 1) * per)):
            for k in range(c):
                v = a[k] * x[i, k] + d[k]
                if act:
                    v = zero if v <= 0 else (hi if v >= hi else v)
                out[i, k] = v


@kernel
def _affine2_rows(gy, y, x, a, b, d, hi, relu, masked, zero, out, per):
    """``_affine2`` (``_affine2_act`` with ``masked``) of (R, C) rows."""
    r, c = x.shape
    for blk in prange((r + per - 1) // per):
        for i in range(blk * per, min(r, (blk + 1) * per)):
            for k in range(c):
                g = _act_grad(gy[i, k], y[i, k], hi, relu, zero) if masked else gy[i, k]
                out[i, k] = a[k] * g + b[k] * x[i, k] + d[k]


# --------------------------------------------------------------------------- Python drivers
def planes(a):
    """``a`` (N, C, *spatial) as a contiguous ``(n, c, m)`` view or copy."""
    n, c = a.shape[0], a.shape[1]
    return np.ascontiguousarray(a).reshape(n, c, -1)


def view(a, rows=None):
    """The kernels' view of ``a``: (R, C) rows of a channels_last array (``rows`` True, or None and
    ``a`` is one; a transposed copy when ``a`` is in the other layout), else contiguous (n, c, m)
    planes."""
    if rows is None:
        rows = is_channels_last(a)
    if rows:
        return to_nhwc(a).reshape(-1, a.shape[1])
    return planes(a)


def empty_like(x):
    """A new array of ``x``'s shape and dtype in its layout (channels_last stays channels_last)."""
    if is_channels_last(x):
        n, c, h, w = x.shape
        return channels_last_view(np.empty((n, h, w, c), x.dtype))
    return np.empty(x.shape, x.dtype)


def flats(out, *arrays):
    """1-D views (copies where the layout differs) of ``arrays`` in the memory order of ``out``
    (channels_last or C-contiguous), then ``out``'s own: element-wise kernels then read and write
    matching elements whatever the layout."""
    if is_channels_last(out):
        return [to_nhwc(a).reshape(-1) for a in (*arrays, out)]
    return [np.ascontiguousarray(a).reshape(-1) for a in arrays] + [out.reshape(-1)]


def moments(x3):
    """Per-channel batch mean and biased variance of ``x3`` ((n, c, m) planes or (R, C) rows), float64."""
    c = x3.shape[1]
    mean = np.empty(c, np.float64)
    var = np.empty(c, np.float64)
    if x3.ndim == 2:
        nb, per = row_blocks(x3.shape[0])
        _moments_rows(x3, mean, var, np.empty((nb, c), np.float64), per)
    else:
        _moments(x3, mean, var)
    return mean, var


#: The activations batch norm fuses: name -> (upper clamp, whether a NaN output passes the gradient).
ACTIVATIONS = {"relu": (np.inf, True), "relu6": (6.0, False)}


def _rows_sums(gy3, y3, x3, mean, act):
    c = x3.shape[1]
    s1 = np.empty(c, np.float64)
    s2 = np.empty(c, np.float64)
    dt = x3.dtype
    nb, per = row_blocks(x3.shape[0])
    hi, relu = ACTIVATIONS[act] if act is not None else (np.inf, True)
    _grad_sums_rows(gy3, x3 if y3 is None else y3, x3, mean.astype(dt), dt.type(hi), relu, act is not None,
                    dt.type(0), s1, s2, np.empty((nb, c), np.float64), np.empty((nb, c), np.float64), per)
    return s1, s2


def affine(x3, a, d, out3):
    if x3.ndim == 2:
        dt = x3.dtype
        _affine_rows(x3, a.astype(dt), d.astype(dt), False, dt.type(0), dt.type(0), out3, row_blocks(x3.shape[0])[1])
        return
    _affine(x3, a.astype(x3.dtype), d.astype(x3.dtype), out3)


def grad_sums(gy3, x3, mean):
    if x3.ndim == 2:
        return _rows_sums(gy3, None, x3, mean, None)
    c = x3.shape[1]
    s1 = np.empty(c, np.float64)
    s2 = np.empty(c, np.float64)
    _grad_sums(gy3, x3, mean.astype(x3.dtype), s1, s2)
    return s1, s2


def affine2(gy3, x3, a, b, d, out3):
    dt = x3.dtype
    if x3.ndim == 2:
        _affine2_rows(gy3, x3, x3, a.astype(dt), b.astype(dt), d.astype(dt), dt.type(0), True, False, dt.type(0),
                      out3, row_blocks(x3.shape[0])[1])
        return
    _affine2(gy3, x3, a.astype(dt), b.astype(dt), d.astype(dt), out3)


def affine_act(x3, a, d, act, out3):
    dt = x3.dtype
    if x3.ndim == 2:
        _affine_rows(x3, a.astype(dt), d.astype(dt), True, dt.type(0), dt.type(ACTIVATIONS[act][0]), out3,
                     row_blocks(x3.shape[0])[1])
        return
    _affine_act(x3, a.astype(dt), d.astype(dt), dt.type(0), dt.type(ACTIVATIONS[act][0]), out3)


def grad_sums_act(gy3, y3, x3, mean, act):
    if x3.ndim == 2:
        return _rows_sums(gy3, y3, x3, mean, act)
    c = x3.shape[1]
    s1 = np.empty(c, np.float64)
    s2 = np.empty(c, np.float64)
    dt = x3.dtype
    hi, relu = ACTIVATIONS[act]
    _grad_sums_act(gy3, y3, x3, mean.astype(dt), dt.type(hi), relu, dt.type(0), s1, s2)
    return s1, s2


def affine2_act(gy3, y3, x3, a, b, d, act, out3):
    dt = x3.dtype
    hi, relu = ACTIVATIONS[act]
    if x3.ndim == 2:
        _affine2_rows(gy3, y3, x3, a.astype(dt), b.astype(dt), d.astype(dt), dt.type(hi), relu, True, dt.type(0),
                      out3, row_blocks(x3.shape[0])[1])
        return
    _affine2_act(gy3, y3, x3, a.astype(dt), b.astype(dt), d.astype(dt), dt.type(hi), relu, dt.type(0), out3)


def masked_scale(x, keep, scale, out):
    """``out[...] = x * keep * scale``; all arrays flat and contiguous."""
    if x.size:
        _masked_scale(x, keep, x.dtype.type(scale), x.dtype.type(0), out)
