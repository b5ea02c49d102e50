"""Max- and average-pooling kernels, forward and backward.

Notation: planes ``p`` = n*c (each ``(h, w)``), window kh kw, stride sh sw, padding ph pw, dilation
dh dw, output oh ow.  Every kernel runs ``prange`` over planes: a plane's outputs, and for the
backward passes its input gradient, belong to one work item, so scatters never race.

Max-pool follows PyTorch's CPU kernel exactly: the window is clipped to the input, the running
maximum starts at -inf with the index of the first in-bounds element, and an element replaces it
when it is greater or NaN (so NaN propagates and ties keep the first position).  Indices are flat
positions ``ih*w + iw`` in each plane.
"""
import numpy as np
from numba import prange

from .._jit import kernel


@kernel
def _max_forward(x, y, idx, kh, kw, sh, sw, ph, pw, dh, dw, ninf):
    pp, h, w = x.shape
    oh, ow = y.shape[1], y.shape[2]
    for p in prange(pp):
        xp = x[p]
        for i in range(oh):
            h0 = i * sh - ph
            h1 = min(h0 + (kh - 1) * dh + 1, h)
            if h0 < 0:  # first in-bounds row of the window
                h0 += ((dh - 1 - h0) // dh) * dh
            for j in range(ow):
                w0 = j * sw - pw
                w1 = min(w0 + (kw - 1) * dw + 1, w)
                if w0 < 0:
                    w0 += ((dw - 1 - w0) // dw) * dw
                # starting from the first element is the same as PyTorch's (-inf, first index);
                # a window entirely in the padding gives (-inf, its first position) as PyTorch does
                b = xp[h0, w0] if h0 < h1 and w0 < w1 else ninf
                bi = h0 * w + w0
                for ih in range(h0, h1, dh):
                    for iw in range(w0, w1, dw):
                        v = xp[ih, iw]
                        # branch-free (selects, not jumps): random data mispredicts a branch half the time
                        upd = (v > b) | (v != v)
                        b = v if upd else b
                        bi = ih * w + iw if upd else bi
                y[p, i, j] = b
                idx[p, i, j] = bi


@kernel
def _max_backward(gy, idx, gx, bad):
    pp, hw = gx.shape
    m = gy.shape[1]
    for p in prange(pp):
        g = gx[p]
        g[:] = 0  # zeroed by the thread that scatters into it: parallel first touch
        for o in range(m):
            t = idx[p, o]
            if t < 0 or t >= hw:
                bad[p] = 1
            else:
                g[t] += gy[p, o]


@kernel
def _avg_forward(x, y, kh, kw, sh, sw, ph, pw, include_pad, zero):
    pp, h, w = x.shape
    oh, ow = y.shape[1], y.shape[2]
    for p in prange(pp):
        for i in range(oh):
            h0 = i * sh - ph
            h1 = min(h0 + kh, h + ph)
            for j in range(ow):
                w0 = j * sw - pw
                w1 = min(w0 + kw, w + pw)
                size = (h1 - h0) * (w1 - w0)
                a0, a1, b0, b1 = max(h0, 0), min(h1, h), max(w0, 0), min(w1, w)
                if a0 >= a1 or b0 >= b1:
                    y[p, i, j] = 0
                    continue
                div = size if include_pad else (a1 - a0) * (b1 - b0)
                acc = zero
                for ih in range(a0, a1):
                    for iw in range(b0, b1):
                        acc += x[p, ih, iw]
                y[p, i, j] = acc / div


@kernel
def _avg_backward(gy, gx, kh, kw, sh, sw, ph, pw, include_pad):
    pp, h, w = gx.shape
    oh, ow = gy.shape[1], gy.shape[2]
    for p in prange(pp):
        for i in range(oh):
            h0 = i * sh - ph
            h1 = min(h0 + kh, h + ph)
            for j in range(ow):
                w0 = j * sw - pw
                w1 = min(w0 + kw, w + pw)
                size = (h1 - h0) * (w1 - w0)
                a0, a1, b0, b1 = max(h0, 0), min(h1, h), max(w0, 0), min(w1, w)
                if a0 >= a1 or b0 >= b1:
                    continue
                div = size if include_pad else (a1 - a0) * (b1 - b0)
                v = gy[p, i, j] / div
                for ih in range(a0, a1):
                    for iw in range(b0, b1):
                        gx[p, ih, iw] += v


# --------------------------------------------------------------------------- Python drivers
def _planes(a):
    n, c, h, w = a.shape
    return np.ascontiguousarray(a).reshape(n * c, h, w)


def max_forward(x, p):
    y = np.empty(p.y_shape, dtype=x.dtype)
    idx = np.empty(p.y_shape, dtype=np.int64)
    if y.size:
        _max_forward(_planes(x), y.reshape(-1, p.oh, p.ow), idx.reshape(-1, p.oh, p.ow),
                     p.kh, p.kw, p.sh, p.sw, p.ph, p.pw, p.dh, p.dw, x.dtype.type(-np.inf))
    return y, idx


def max_backward(gy, idx, input_shape):
    """Scatter ``gy`` to the flat positions ``idx``; returns ``(grad_input, ok)``."""
    n, c, h, w = input_shape
    gx = np.empty((n * c, h * w), dtype=gy.dtype)
    bad = np.zeros(n * c, dtype=np.uint8)
    if gy.size == 0:
        gx[:] = 0
    elif gx.size:
        _max_backward(np.ascontiguousarray(gy).reshape(n * c, -1),
                      np.ascontiguousarray(idx, dtype=np.int64).reshape(n * c, -1), gx, bad)
    return gx.reshape(input_shape), not bad.any()


def avg_forward(x, p, count_include_pad):
    y = np.empty(p.y_shape, dtype=x.dtype)
    if y.size:
        _avg_forward(_planes(x), y.reshape(-1, p.oh, p.ow), p.kh, p.kw, p.sh, p.sw, p.ph, p.pw,
                     bool(count_include_pad), x.dtype.type(0))
    return y


def avg_backward(gy, p, count_include_pad):
    gx = np.zeros((p.n * p.c, p.h, p.w), dtype=gy.dtype)
    if gx.size:
        _avg_backward(_planes(gy), gx, p.kh, p.kw, p.sh, p.sw, p.ph, p.pw, bool(count_include_pad))
    return gx.reshape(p.n, p.c, p.h, p.w)
