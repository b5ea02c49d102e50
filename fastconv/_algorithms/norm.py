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

from .._jit import kernel


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
                v = yr[j]
                g = gr[j] if (not v <= 0) and (relu or v < hi) else zero
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
            v = yr[j]
            g = gr[j] if (not v <= 0) and (relu or v < hi) else zero
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


# --------------------------------------------------------------------------- Python drivers
def planes(a):
    """``a`` (N, C, *spatial) as a contiguous ``(n, c, m)`` view or copy."""
    n, c = a.shape[0], a.shape[1]
    return np.ascontiguousarray(a).reshape(n, c, -1)


def moments(x3):
    """Per-channel batch mean and biased variance of ``x3`` (n, c, m), float64."""
    c = x3.shape[1]
    mean = np.empty(c, np.float64)
    var = np.empty(c, np.float64)
    _moments(x3, mean, var)
    return mean, var


def affine(x3, a, d, out3):
    _affine(x3, a.astype(x3.dtype), d.astype(x3.dtype), out3)


def grad_sums(gy3, x3, mean):
    c = x3.shape[1]
    s1 = np.empty(c, np.float64)
    s2 = np.empty(c, np.float64)
    _grad_sums(gy3, x3, mean.astype(x3.dtype), s1, s2)
    return s1, s2


def affine2(gy3, x3, a, b, d, out3):
    dt = x3.dtype
    _affine2(gy3, x3, a.astype(dt), b.astype(dt), d.astype(dt), out3)


#: The activations batch norm fuses: name -> (upper clamp, whether a NaN output passes the gradient).
ACTIVATIONS = {"relu": (np.inf, True), "relu6": (6.0, False)}


def affine_act(x3, a, d, act, out3):
    dt = x3.dtype
    _affine_act(x3, a.astype(dt), d.astype(dt), dt.type(0), dt.type(ACTIVATIONS[act][0]), out3)


def grad_sums_act(gy3, y3, x3, mean, act):
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
    _affine2_act(gy3, y3, x3, a.astype(dt), b.astype(dt), d.astype(dt), dt.type(hi), relu, dt.type(0), out3)


def masked_scale(x, keep, scale, out):
    """``out[...] = x * keep * scale``; all arrays flat and contiguous."""
    if x.size:
        _masked_scale(x, keep, x.dtype.type(scale), x.dtype.type(0), out)
