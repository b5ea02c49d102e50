"""Fused element-wise kernels: the activations (relu, relu6, leaky_relu) and their backwards.

Notation: every array is flat and contiguous, ``e`` an element index, ``g`` the output gradient.

Each op is one pass over memory.  The NumPy chains they replace made two or three (relu6_backward's
``np.where((x > 0) & (x < 6), g, 0)``: two boolean temporaries, their ``&`` and the select: 0.8 ms
for MobileNet's 802,816-element stem activation at 1 thread, 16% of an epoch).  Work is split into
``nch`` contiguous chunks run ``prange``; outputs of chunks are disjoint, and every element's value
depends on its own inputs only, so results do not depend on the thread count.  ``out`` may be the
input itself (each element is read before it is written).

NaN follows PyTorch: the forward ops keep a NaN input NaN (``relu``/``relu6`` test ``x <= 0`` /
``x >= 6``, false for NaN); ``relu_backward`` passes the gradient where ``x`` is NaN
(``threshold_backward``), ``relu6_backward`` gives 0 there (``hardtanh_backward`` tests
``0 < x < 6``), ``leaky_relu_backward`` scales it (``x > 0`` is false).
"""
import numba
import numpy as np
from numba import prange

from .._jit import kernel

#: Elements per chunk at least (64 KiB of float32): a chunk should stream for longer than waking a
#: second thread takes.  A guess, not tuned: the calls that matter here (MobileNet's 0.1-0.8 M-element
#: activations) get one chunk per thread either way.
CHUNK = 1 << 14


# Unsigned indices: numba wraps a negative signed index around (a select per access), which keeps
# LLVM from vectorising these loops: relu_backward on 65,536 floats took 39 us with int64 indices,
# 7 with uint64 ones (1 thread).
_u = np.uint64


@kernel
def _relu(x, zero, out, nch):
    size = x.size
    for ch in prange(nch):
        for e in range(_u(ch * size // nch), _u((ch + 1) * size // nch)):
            v = x[e]
            out[e] = zero if v <= 0 else v


@kernel
def _relu_backward(g, x, zero, out, nch):
    size = x.size
    for ch in prange(nch):
        for e in range(_u(ch * size // nch), _u((ch + 1) * size // nch)):
            out[e] = zero if x[e] <= 0 else g[e]


@kernel
def _relu6(x, zero, six, out, nch):
    size = x.size
    for ch in prange(nch):
        for e in range(_u(ch * size // nch), _u((ch + 1) * size // nch)):
            v = x[e]
            out[e] = zero if v <= 0 else (six if v >= six else v)


@kernel
def _relu6_backward(g, x, zero, six, out, nch):
    size = x.size
    for ch in prange(nch):
        for e in range(_u(ch * size // nch), _u((ch + 1) * size // nch)):
            v = x[e]
            out[e] = g[e] if (v > 0) & (v < six) else zero


@kernel
def _leaky_relu(x, slope, out, nch):
    size = x.size
    for ch in prange(nch):
        for e in range(_u(ch * size // nch), _u((ch + 1) * size // nch)):
            v = x[e]
            out[e] = v if v > 0 else v * slope


@kernel
def _leaky_relu_backward(g, x, slope, out, nch):
    size = x.size
    for ch in prange(nch):
        for e in range(_u(ch * size // nch), _u((ch + 1) * size // nch)):
            out[e] = g[e] if x[e] > 0 else g[e] * slope


# --------------------------------------------------------------------------- Python drivers
def _chunks(size):
    return max(1, min(numba.get_num_threads(), size // CHUNK))


def relu(x, out):
    """``out[e] = max(x[e], 0)`` (NaN stays NaN); flat contiguous arrays of one dtype."""
    if x.size:
        _relu(x, x.dtype.type(0), out, _chunks(x.size))


def relu_backward(g, x, out):
    """``out[e] = 0 if x[e] <= 0 else g[e]``."""
    if x.size:
        _relu_backward(g, x, x.dtype.type(0), out, _chunks(x.size))


def relu6(x, out):
    """``out[e] = min(max(x[e], 0), 6)`` (NaN stays NaN)."""
    if x.size:
        t = x.dtype.type
        _relu6(x, t(0), t(6), out, _chunks(x.size))


def relu6_backward(g, x, out):
    """``out[e] = g[e] if 0 < x[e] < 6 else 0``."""
    if x.size:
        t = x.dtype.type
        _relu6_backward(g, x, t(0), t(6), out, _chunks(x.size))


def leaky_relu(x, slope, out):
    """``out[e] = x[e] if x[e] > 0 else slope * x[e]``."""
    if x.size:
        _leaky_relu(x, x.dtype.type(slope), out, _chunks(x.size))


def leaky_relu_backward(g, x, slope, out):
    """``out[e] = g[e] if x[e] > 0 else slope * g[e]``."""
    if x.size:
        _leaky_relu_backward(g, x, x.dtype.type(slope), out, _chunks(x.size))
