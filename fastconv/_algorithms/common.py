"""Pieces every convolution algorithm shares: padded (and phase-split) plane copies, the bias
gradient, and two kernel helpers -- an atomic work-item counter (``claim``) and fixed-size
arrays on a kernel's stack (``stack_rows``)."""
import numpy as np
from numba import prange, types
from numba.core import cgutils
from numba.extending import intrinsic
from numba.np.arrayobj import make_array, populate_array

from .._jit import kernel


@intrinsic
def claim(typingctx, counter):
    """``counter[0]`` before atomically adding 1 to it: the next unclaimed work item.

    Kernels whose items write disjoint outputs let each worker claim items until none are left
    instead of taking a fixed share: a worker whose core is also running another busy thread
    (PyTorch's OpenMP pool spins for ~10 ms of CPU after each of its calls, measured here) then
    does fewer items while the other does more.  Results do not depend on which worker ran an item.
    """
    if not (isinstance(counter, types.Array) and counter.dtype == types.int64 and counter.ndim == 1):
        return None

    def codegen(context, builder, sig, args):
        aryty = sig.args[0]
        ary = context.make_array(aryty)(context, builder, args[0])
        ptr = cgutils.get_item_pointer(context, builder, aryty, ary, [context.get_constant(types.intp, 0)])
        return builder.atomic_rmw("add", ptr, context.get_constant(types.int64, 1), "monotonic")

    return types.int64(counter), codegen


@kernel
def _bias_grad(gy, out):
    nn, kk_, m = gy.shape
    for k in prange(kk_):
        acc = 0.0  # float64 accumulation over the whole batch, one rounding at the end
        for n in range(nn):
            for o in range(m):
                acc += gy[n, k, o]
        out[k] = acc


@intrinsic
def stack_rows(typingctx, rows, cols, dtype):
    """An uninitialised C-contiguous ``(rows, cols)`` array in the calling kernel's stack frame
    (``rows``, ``cols`` literal ints).  LLVM knows that it aliases no other array and that its
    rows lie a constant distance apart, so loops storing into it need no runtime overlap checks
    (with four accumulator rows and four input rows: ~26 checks before every pass)."""
    if not (isinstance(rows, types.IntegerLiteral) and isinstance(cols, types.IntegerLiteral)):
        return None
    nr, nc, dt = rows.literal_value, cols.literal_value, dtype.dtype
    aty = types.Array(dt, 2, "C")

    def codegen(context, builder, sig, args):
        lty = context.get_data_type(dt)
        size = context.get_abi_sizeof(lty)
        data = cgutils.alloca_once(builder, lty, size=context.get_constant(types.intp, nr * nc))
        ary = make_array(aty)(context, builder)
        intp = lambda v: context.get_constant(types.intp, v)  # noqa: E731
        populate_array(ary, data=data, shape=[intp(nr), intp(nc)], strides=[intp(nc * size), intp(size)],
                       itemsize=intp(size), meminfo=None)
        return ary._getvalue()

    return aty(rows, cols, dtype), codegen


# Zero elements after every flat plane: kernels may round a run up to whole vectors (see SLACK users)
SLACK = 32


@kernel
def _pad_planes(x, out, sw, hp, wq, top, left, check, bad):
    # plane p of out holds, for phase f, row i, slot q at f*hp*wq + i*wq + q, the element
    # x[p, i - top, q*sw + f - left], or 0 outside x; top/left may be negative (a crop).  The
    # SLACK tail is zeroed.  With check, bad[p] = 1 when plane p of x holds a NaN or Inf.
    pp, h, w = x.shape
    for p in prange(pp):
        o = out[p]
        o[sw * hp * wq:] = 0
        nonfinite = x[p, 0, 0] * 0  # turns NaN once an Inf or NaN is multiplied in
        for f in range(sw):
            q_lo = max(0, (left - f + sw - 1) // sw)          # first slot with column >= 0
            q_hi = min(wq, (w + left - f + sw - 1) // sw)     # one past the last column < w
            for i in range(hp):
                r0 = f * hp * wq + i * wq
                xi = i - top
                if xi < 0 or xi >= h or q_hi <= q_lo:
                    o[r0:r0 + wq] = 0
                    continue
                o[r0:r0 + q_lo] = 0
                o[r0 + q_hi:r0 + wq] = 0
                c0 = q_lo * sw + f - left
                if sw == 1:
                    src = x[p, xi, c0:c0 + q_hi - q_lo]
                    o[r0 + q_lo:r0 + q_hi] = src
                    if check:
                        for j in range(src.shape[0]):
                            nonfinite += src[j] * 0
                else:
                    for j in range(q_hi - q_lo):
                        v = x[p, xi, c0 + j * sw]
                        o[r0 + q_lo + j] = v
                        if check:
                            nonfinite += v * 0
        if check and nonfinite != 0:
            bad[p] = 1


def pad_planes(a, top, bottom, left, right, sw=1, check_finite=False):
    """Zero-pad (negative: crop) the planes of ``a`` (n, c, h, w) and split columns by phase.

    Returns ``(planes, hp, wq, finite)``: ``planes`` of shape (n, c, sw*hp*wq + SLACK) holds padded
    element ``(i, j)`` at ``(j % sw)*hp*wq + i*wq + j // sw`` (``hp = h + top + bottom``,
    ``wq = ceil((w + left + right) / sw)``) followed by SLACK zeros; ``finite`` says whether ``a``
    is free of NaN/Inf (computed only with ``check_finite``, else True).  One parallel pass.
    """
    n, c, h, w = a.shape
    hp, wp = h + top + bottom, w + left + right
    wq = -(-wp // sw)
    out = np.empty((n * c, sw * hp * wq + SLACK), dtype=a.dtype)
    bad = np.zeros(n * c, dtype=np.uint8)
    if n * c:
        _pad_planes(np.ascontiguousarray(a).reshape(n * c, h, w), out, sw, hp, wq, top, left,
                    bool(check_finite), bad)
    return out.reshape(n, c, -1), hp, wq, not bad.any()


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
