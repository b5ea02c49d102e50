"""Pieces every convolution algorithm shares: the padded input copy and the bias gradient."""
import numpy as np
from numba import prange

from .._jit import kernel


@kernel
def _bias_grad(gy, out):
    nn, kk_, m = gy.shape
    for k in prange(kk_):
        acc = 0.0  # float64 accumulation over the whole batch, one rounding at the end
        for n in range(nn):
            for o in range(m):
                acc += gy[n, k, o]
        out[k] = acc


def pad_input(x, p):
    """A contiguous copy of ``x`` zero-padded to ``(n, c, hp, wp)`` (``x`` itself when no padding)."""
    if not p.padded:
        return np.ascontiguousarray(x)
    xp = np.zeros((p.n, p.c, p.hp, p.wp), dtype=x.dtype)
    xp[:, :, p.ph0:p.ph0 + p.h, p.pw0:p.pw0 + p.w] = x
    return xp


def bias_grad(gy):
    """``gy.sum(axis=(0, 2, 3))`` accumulated in float64, parallel over channels."""
    n, k = gy.shape[0], gy.shape[1]
    out = np.zeros(k, dtype=gy.dtype)
    if gy.size:
        _bias_grad(np.ascontiguousarray(gy).reshape(n, k, -1), out)
    return out
