"""Pieces every convolution algorithm shares: padded (and phase-split) plane copies, the bias
gradient, three kernel helpers -- an atomic work-item counter (``claim``), fixed-size arrays on a
kernel's stack (``stack_rows``) and a register-blocked multiply-accumulate over a table of taps
(``mac_taps``) -- and the GEMM algorithms' worker count (``_workers``, ``_threads``) and
transposed geometry (``_transposed``)."""
import dataclasses
import functools

import numba
import numpy as np
from llvmlite import ir
from numba import prange, types
from numba.core import cgutils
from numba.extending import intrinsic
from numba.np.arrayobj import make_array, populate_array

from .._config import result
from .._jit import SLACK, kernel, micro  # SLACK: zero elements after every flat plane (see _jit)

_u = np.uint64


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
    out = result((n * c, sw * hp * wq + SLACK), a.dtype)
    bad = np.zeros(n * c, dtype=np.uint8)
    if n * c:
        _pad_planes(np.ascontiguousarray(a).reshape(n * c, h, w), out, sw, hp, wq, top, left,
                    bool(check_finite), bad)
    return out.reshape(n, c, -1), hp, wq, not bad.any()


@micro
def _gather_run(src, s0, step, dst, d0, n):
    for v in range(_u(n)):
        dst[_u(d0) + v] = src[_u(s0) + _u(step) * v]


@micro
def _scatter_run(src, s0, dst, d0, step, n):
    for v in range(_u(n)):
        dst[_u(d0) + _u(step) * v] = src[_u(s0) + v]


@micro
def _gather(src, s0, step, dst, d0, n):
    # dst[d0 + v] = src[s0 + step*v], v < n.  Unsigned offsets (numba's wraparound code for signed
    # ones kept such copies scalar), and steps 1 and 2 as constants in copies of their own: LLVM
    # vectorises a constant step, not a run-time one
    if step == 1:
        _gather_run(src, s0, 1, dst, d0, n)
    elif step == 2:
        _gather_run(src, s0, 2, dst, d0, n)
    else:
        _gather_run(src, s0, step, dst, d0, n)


@micro
def _scatter(src, s0, dst, d0, step, n):
    # dst[d0 + step*v] = src[s0 + v], v < n (as _gather)
    if step == 1:
        _scatter_run(src, s0, dst, d0, 1, n)
    elif step == 2:
        _scatter_run(src, s0, dst, d0, 2, n)
    else:
        _scatter_run(src, s0, dst, d0, step, n)


@micro
def _zero(dst, d0, n):
    for v in range(_u(n)):
        dst[_u(d0) + v] = 0


# im2col and implicit call these two from Python: the input into padded planes, and grad_input's
# padded planes back into (n*c, h, w).  Flat arrays, _gather / _scatter, no views per row (one
# process, 2 threads, ms before / after: 8x64x56x56 padded by 1 0.44 / 0.28, 8x128x56x56 split by
# column phase for stride 2 1.51 / 0.84, 8x512x7x7 0.49 / 0.25, 8x3x224x224 stride 2 0.40 / 0.27).
@kernel
def _unsplit(gq, gx, sw, hp, wq, top, left):
    # gx[p, ih, iw] = the padded, phase-split plane element of (ih + top, iw + left): per phase f the
    # columns iw with (iw + left) % sw == f read one contiguous run of its row (a division and a
    # remainder per element took 0.5 of a 1.3 ms stride-2 grad_input, 32x16x28x28)
    pp, h, w = gx.shape
    ll = gq.shape[1]
    gf = gq.reshape(-1)
    xf = gx.reshape(-1)
    for p in prange(pp):
        for ih in range(h):
            d0 = (p * h + ih) * w
            row = p * ll + (ih + top) * wq
            for f in range(sw):
                iw0 = (f - left) % sw  # the first column of phase f
                base = f * hp * wq + row + (iw0 + left) // sw
                cnt = (w - iw0 + sw - 1) // sw
                _scatter(gf, base, xf, d0 + iw0, sw, cnt)


@kernel
def _split_planes(x, out, sw, hp, wq, top, left):
    # pad_planes' layout (zero padding, columns split by phase iw % sw, SLACK zeros)
    pp, h, w = x.shape
    ll = out.shape[1]
    xf = x.reshape(-1)
    of = out.reshape(-1)
    for p in prange(pp):
        ob = p * ll
        for f in range(sw):
            q_lo = max(0, (left - f + sw - 1) // sw)
            q_hi = max(q_lo, min(wq, (w + left - f + sw - 1) // sw))
            c0 = q_lo * sw + f - left
            for i in range(hp):
                d0 = ob + f * hp * wq + i * wq
                xi = i - top
                if xi < 0 or xi >= h:
                    _zero(of, d0, wq)
                    continue
                _zero(of, d0, q_lo)
                s0 = (p * h + xi) * w + c0
                _gather(xf, s0, sw, of, d0 + q_lo, q_hi - q_lo)
                _zero(of, d0 + q_hi, wq - q_hi)
        _zero(of, ob + sw * hp * wq, ll - sw * hp * wq)


def pad_input(x, p):
    """A contiguous copy of ``x`` zero-padded to ``(n, c, hp, wp)`` (``x`` itself when no padding)."""
    if not p.padded:
        return np.ascontiguousarray(x)
    xp = np.zeros((p.n, p.c, p.hp, p.wp), dtype=x.dtype)
    xp[:, :, p.ph0:p.ph0 + p.h, p.pw0:p.pw0 + p.w] = x
    return xp


def transposed_weight(w, groups):
    """The kernel of the transposed convolution: ``w`` (K, C/g, R, S) flipped in both spatial axes
    with its in/out channels swapped within each group, as a contiguous (C, K/g, R, S) array.

    ``grad_input`` of a stride-1 convolution is the forward correlation of the output gradient with
    this kernel; every algorithm that computes it that way takes it from here.
    """
    k, cg, r, s = w.shape
    kg = k // groups
    wf = np.asarray(w)[:, :, ::-1, ::-1].reshape(groups, kg, cg, r, s).transpose(0, 2, 1, 3, 4)
    return np.ascontiguousarray(wf).reshape(groups * cg, kg, r, s)


def bias_grad(gy):
    """``gy.sum(axis=(0, 2, 3))`` accumulated in float64, parallel over channels."""
    n, k = gy.shape[0], gy.shape[1]
    out = np.zeros(k, dtype=gy.dtype)
    if gy.size:
        _bias_grad(np.ascontiguousarray(gy).reshape(n, k, -1), out)
    return out


@intrinsic
def mac_taps(typingctx, out, q0, j0, x, xbase, offs, wt, k0, b, ntaps, nq, nv):
    """``out[q0 + q, j0 + l] = b[k0 + q] + sum_t wt[k0 + q, t] * x.flat[xbase + offs[t] + l]`` for
    ``q < nq`` and ``l < nv * lanes`` (``lanes`` = 32 bytes of the dtype; ``nq``, ``nv`` literal ints).

    The ``nq * nv`` vector sums stay in registers over all ``ntaps`` taps (one fused multiply-add
    per tap, taps in order) and are stored once: with ``nq = 4, nv = 3``, 12 accumulators, 3 input
    loads, 4 weight broadcasts and 1 offset per tap, so the loop is bound by the FMA units, not by
    loads and stores as a loop that keeps its sums in memory is (lenet5-c3's block, one thread:
    31 -> 75 GFLOP/s).  numba cannot express vector registers and LLVM does not keep the sums of
    ``acc[j] += w * x[j]`` loops in registers across taps, hence this intrinsic.  ``out`` and
    ``wt`` are C-contiguous 2-D arrays, ``x`` any C-contiguous array (read through its flat data),
    ``offs`` int64; nothing is bounds-checked: callers keep every read inside ``x``."""
    if not (isinstance(nq, types.IntegerLiteral) and isinstance(nv, types.IntegerLiteral)):
        return None
    if not all(isinstance(a, types.Array) and a.layout == "C" for a in (out, x, offs, wt, b)):
        return None
    NQ, NV = nq.literal_value, nv.literal_value

    def codegen(context, builder, sig, args):
        outv, q0v, j0v, xv, xbv, offv, wtv, k0v, bv, ntv = args[:10]
        o, xa, of, wa, ba = (context.make_array(sig.args[i])(context, builder, args[i])
                             for i in (0, 3, 5, 6, 8))
        fty = context.get_data_type(sig.args[0].dtype)
        isz = context.get_abi_sizeof(fty)
        lanes = 32 // isz
        vty = ir.VectorType(fty, lanes)
        i32, i64 = ir.IntType(32), ir.IntType(64)
        fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vty, [vty] * 3),
                                             f"llvm.fmuladd.v{lanes}f{8 * isz}")
        splat_mask = ir.Constant(ir.VectorType(i32, lanes), [0] * lanes)

        def splat(scalar):
            v = builder.insert_element(ir.Constant(vty, ir.Undefined), scalar, ir.Constant(i32, 0))
            return builder.shuffle_vector(v, ir.Constant(vty, ir.Undefined), splat_mask)

        tn = builder.extract_value(wa.shape, 1)
        wrows, init = [], []
        for q in range(NQ):
            kq = builder.add(k0v, ir.Constant(i64, q))
            wrows.append(builder.gep(wa.data, [builder.mul(kq, tn)]))
            init.append(splat(builder.load(builder.gep(ba.data, [kq]))))
        xb = builder.gep(xa.data, [xbv])
        entry = builder.block
        loop = builder.append_basic_block("mac_taps.loop")
        done = builder.append_basic_block("mac_taps.done")
        builder.cbranch(builder.icmp_signed(">", ntv, ir.Constant(i64, 0)), loop, done)

        builder.position_at_end(loop)
        t = builder.phi(i64)
        t.add_incoming(ir.Constant(i64, 0), entry)
        acc = [[builder.phi(vty) for _ in range(NV)] for _ in range(NQ)]
        for q in range(NQ):
            for v in range(NV):
                acc[q][v].add_incoming(init[q], entry)
        xp = builder.gep(xb, [builder.load(builder.gep(of.data, [t]))])
        xs = [builder.load(builder.bitcast(builder.gep(xp, [ir.Constant(i64, v * lanes)]), vty.as_pointer()),
                           align=isz) for v in range(NV)]
        new = []
        for q in range(NQ):
            wv = splat(builder.load(builder.gep(wrows[q], [t])))
            new.append([builder.call(fma, [wv, xs[v], acc[q][v]]) for v in range(NV)])
        t1 = builder.add(t, ir.Constant(i64, 1))
        body_end = builder.block
        t.add_incoming(t1, body_end)
        for q in range(NQ):
            for v in range(NV):
                acc[q][v].add_incoming(new[q][v], body_end)
        builder.cbranch(builder.icmp_signed("<", t1, ntv), loop, done)

        builder.position_at_end(done)
        total = [[builder.phi(vty) for _ in range(NV)] for _ in range(NQ)]  # phis first in a block
        for q in range(NQ):
            for v in range(NV):
                total[q][v].add_incoming(init[q], entry)
                total[q][v].add_incoming(new[q][v], body_end)
        pitch = builder.sdiv(builder.extract_value(o.strides, 0), ir.Constant(i64, isz))
        for q in range(NQ):
            row_q = builder.add(q0v, ir.Constant(i64, q))
            row = builder.gep(o.data, [builder.add(builder.mul(row_q, pitch), j0v)])
            for v in range(NV):
                builder.store(total[q][v], builder.bitcast(builder.gep(row, [ir.Constant(i64, v * lanes)]),
                                                           vty.as_pointer()), align=isz)
        return context.get_dummy_value()

    sig = types.void(out, types.intp, types.intp, x, types.intp, offs, wt, types.intp, b, types.intp, nq, nv)
    return sig, codegen


@intrinsic
def copy_vector(typingctx, dst, doff, src, soff):
    """``dst.flat[doff:doff + lanes] = src.flat[soff:soff + lanes]`` as one unaligned vector load
    and store (``lanes`` = 32 bytes of the dtype); nothing is bounds-checked.

    For short runs (im2col's gather of 8-31 element rows): LLVM's vectorised copy loops need a run
    of 4 x lanes elements and an overlap check before they take their vector path, so such runs
    are copied one element at a time.  ``dst`` and ``src`` are C-contiguous arrays of one dtype."""
    if not (isinstance(dst, types.Array) and isinstance(src, types.Array) and dst.layout == "C"
            and src.layout == "C" and dst.dtype == src.dtype):
        return None

    def codegen(context, builder, sig, args):
        d = context.make_array(sig.args[0])(context, builder, args[0])
        s = context.make_array(sig.args[2])(context, builder, args[2])
        fty = context.get_data_type(sig.args[0].dtype)
        isz = context.get_abi_sizeof(fty)
        vty = ir.VectorType(fty, 32 // isz).as_pointer()
        v = builder.load(builder.bitcast(builder.gep(s.data, [args[3]]), vty), align=isz)
        builder.store(v, builder.bitcast(builder.gep(d.data, [args[1]]), vty), align=isz)
        return context.get_dummy_value()

    return types.void(dst, types.intp, src, types.intp), codegen


# ---------------------------------------------------------------------------------------- helpers
def _workers(items):
    """Workers for ``items`` work items: at most numba's thread count."""
    return max(1, min(numba.get_num_threads(), items))


class _threads:
    """numba's thread count held to ``nw`` for one call (a kernel without per-worker buffers runs
    ``prange(nw)``; fewer threads than workers would leave items to fewer workers, not drop them)."""

    def __init__(self, nw):
        self.nw = nw

    def __enter__(self):
        self.prev = numba.get_num_threads()
        n = max(1, min(self.nw, numba.config.NUMBA_NUM_THREADS))
        self.changed = n != self.prev  # most calls already run on nw threads: ~1 us a setting saved
        if self.changed:
            numba.set_num_threads(n)

    def __exit__(self, *exc):
        if self.changed:
            numba.set_num_threads(self.prev)
        return False


@functools.lru_cache(maxsize=512)
def _transposed(p):
    """grad_input as a forward convolution (stride 1, padding within the dilated kernel's extent),
    or None: the correlation of gy, padded by the extent less the forward padding, with the
    flipped, channel-swapped kernel."""
    eh, ew = p.dh * (p.r - 1), p.dw * (p.s - 1)
    if p.sh != 1 or p.sw != 1 or max(p.ph0, p.ph1) > eh or max(p.pw0, p.pw1) > ew:
        return None
    return dataclasses.replace(p, c=p.k, h=p.oh, w=p.ow, k=p.c, ph0=eh - p.ph0, ph1=eh - p.ph1,
                               pw0=ew - p.pw0, pw1=ew - p.pw1, oh=p.h, ow=p.w)
