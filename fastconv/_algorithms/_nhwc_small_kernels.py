"""The numba kernels of the channels_last passes for layers with few input channels (a network's
first layer: RGB or grey images), see :func:`fastconv._algorithms.nhwc.few_channels`.

Such a layer's tap (rr, ss, cc) is one input element per output position, and its output channels
are the vector lanes.  The input is read from a zero-padded NHWC copy (``xp``), so that every tap
of every position is inside it at a fixed offset (``toff``), and the weights as (taps, kp) rows, k
padded to kp, whole vectors.  Two loops are emitted as LLVM IR, the sums in registers:

* forward, per output position: ``y[pos, 0:kp] = sum_t xp[base(pos) + toff[t]] * wt[t, 0:kp]``
  (:func:`_tap_dot`);
* grad_weight, per output row and tap: ``gw[t, 0:kp] += sum_ox xp[base(row) + ox*sw*c + toff[t]] *
  gy[row, ox, 0:kp]`` (:func:`_row_dot`), the sums per part (a fixed block of output rows) added in
  order.

(As numba loops the 16 lanes stayed scalar once unrolled -- SLP cannot prove the arrays apart --
and a run-time-length loop paid the vectoriser's overlap checks on every tap: 8.5 and 2.3 ms on
ResNet-18's first layer, against PyTorch's 0.6.)  Padding taps multiply the copy's zeros, as the
NCHW kernels do (a non-finite weight gives NaN there too).  Neither pass depends on the thread
count.  Kept in a file of its own: numba's cache is per source file.
"""
import numpy as np
from llvmlite import ir
from numba import prange, types
from numba.extending import intrinsic

from .._jit import kernel, micro
from ._gemm_kernels import VBYTES, _lanes, _switch_rows, _vector_tools

_u = np.uint64

#: Most vectors of output channels the emitted loops keep in registers (128 float32 channels)
MAX_VECTORS = 8


def _positions(nv):
    """Output positions the forward's loop sums at once for nv vectors of output channels: enough
    independent sums to cover the fused multiply-add's latency (one chain of 4-cycle FMAs per tap
    left 3 of 4 cycles idle), at most 16 accumulators."""
    return max(1, min(8, 16 // nv))


def _emit_dot(context, builder, sig, args, nv, by_table):
    # P = _positions(nv) columns q of sums, each nv vectors, over i < n:
    #   by_table (the forward, q an output position): out[o0 + q*kp + v*L ...] =
    #       sum_i x[x0 + q*xstep + tab[i]] * b[b0 + i*kp + v*L ...]
    #   else (grad_weight, q a tap): out[o0 + q*kp + v*L ...] +=
    #       sum_i x[x0 + tab[q] + i*xstep] * b[b0 + i*kp + v*L ...]
    # columns at or past nq repeat the last one and are not stored; the sums are phis of one loop
    x, x0, tab, n, b, b0, kp, out, o0, _, xstep, nq = args
    xa = context.make_array(sig.args[0])(context, builder, x)
    ta = context.make_array(sig.args[2])(context, builder, tab)
    ba = context.make_array(sig.args[4])(context, builder, b)
    oa = context.make_array(sig.args[7])(context, builder, out)
    fty = context.get_data_type(sig.args[0].dtype)
    isz = context.get_abi_sizeof(fty)
    lanes, vty, fma, splat = _vector_tools(builder, fty, isz, VBYTES)
    i64 = ir.IntType(64)
    zero = ir.Constant(vty, [0.0] * lanes)
    npos = _positions(nv)
    last = builder.sub(nq, ir.Constant(i64, 1))
    cols = [builder.select(builder.icmp_signed("<", ir.Constant(i64, q), nq), ir.Constant(i64, q), last)
            for q in range(npos)]
    if by_table:
        xbs = [builder.gep(xa.data, [builder.add(x0, builder.mul(col, xstep))]) for col in cols]
    else:
        xbs = [builder.gep(xa.data, [builder.add(x0, builder.load(builder.gep(ta.data, [col])))]) for col in cols]
    bb = builder.gep(ba.data, [b0])
    entry = builder.block
    loop = builder.append_basic_block("dot.loop")
    done = builder.append_basic_block("dot.done")
    builder.cbranch(builder.icmp_signed(">", n, ir.Constant(i64, 0)), loop, done)
    builder.position_at_end(loop)
    i = builder.phi(i64)
    i.add_incoming(ir.Constant(i64, 0), entry)
    acc = [[builder.phi(vty) for _ in range(nv)] for _ in range(npos)]
    for row in acc:
        for a_ in row:
            a_.add_incoming(zero, entry)
    off = builder.load(builder.gep(ta.data, [i])) if by_table else builder.mul(i, xstep)
    brow = builder.gep(bb, [builder.mul(i, kp)])
    bv = [builder.load(builder.bitcast(builder.gep(brow, [ir.Constant(i64, v * lanes)]), vty.as_pointer()),
                       align=isz) for v in range(nv)]
    new = []
    for q in range(npos):
        xv = splat(builder.load(builder.gep(xbs[q], [off])))
        new.append([builder.call(fma, [xv, bv[v], acc[q][v]]) for v in range(nv)])
    i1 = builder.add(i, ir.Constant(i64, 1))
    end = builder.block
    i.add_incoming(i1, end)
    for q in range(npos):
        for v in range(nv):
            acc[q][v].add_incoming(new[q][v], end)
    builder.cbranch(builder.icmp_signed("<", i1, n), loop, done)
    builder.position_at_end(done)
    totals = [[builder.phi(vty) for _ in range(nv)] for _ in range(npos)]  # (phis first in their block)
    for q in range(npos):
        for v in range(nv):
            totals[q][v].add_incoming(zero, entry)
            totals[q][v].add_incoming(new[q][v], end)
    ob = builder.gep(oa.data, [o0])
    for q in range(npos):
        def store(q=q):
            row = builder.gep(ob, [builder.mul(ir.Constant(i64, q), kp)])
            for v in range(nv):
                p = builder.bitcast(builder.gep(row, [ir.Constant(i64, v * lanes)]), vty.as_pointer())
                total = totals[q][v]
                if not by_table:
                    total = builder.fadd(builder.load(p, align=isz), total)
                builder.store(total, p, align=isz)
        if q == 0:
            store()
        else:
            with builder.if_then(builder.icmp_signed("<", ir.Constant(i64, q), nq)):
                store()


def _dot_intrinsic(by_table):
    def typer(typingctx, x, x0, step, n, b, b0, kp, out, o0, nv, pstep, np_):
        arrays = (x, b, out)
        if not all(isinstance(a, types.Array) and a.ndim == 1 and a.layout == "C" for a in arrays):
            return None
        if not (x.dtype == b.dtype == out.dtype and x.dtype in (types.float32, types.float64)):
            return None
        if not (isinstance(step, types.Array) and step.dtype == types.int64 and step.ndim == 1):
            return None
        sig = types.void(x, types.intp, step, types.intp, b, types.intp, types.intp, out, types.intp, types.intp,
                         types.intp, types.intp)

        def codegen(context, builder, sig_, args):
            _switch_rows(builder, args[9], range(1, MAX_VECTORS + 1), "dot",
                         lambda nv: _emit_dot(context, builder, sig_, args, nv, by_table))
            return context.get_dummy_value()
        return sig, codegen
    typer.__name__ = "_tap_dot" if by_table else "_row_dot"
    typer.__doc__ = (
        "``out[o0 + p*kp + j] = sum_{i < n} x[x0 + p*pstep + step[i]] * b[b0 + i*kp + j]`` for the "
        "positions p < min(np_, _positions(nv)) and j < nv vectors' lanes: the taps of a few output "
        "positions (step: their offsets)." if by_table else
        "``out[o0 + q*kp + j] += sum_{i < n} x[x0 + step[q] + i*pstep] * b[b0 + i*kp + j]`` for the taps "
        "q < min(np_, _positions(nv)) (step: their offsets) and j < nv vectors' lanes: a few taps along a row "
        "of output positions.")
    return intrinsic(typer)


_tap_dot = _dot_intrinsic(True)
_row_dot = _dot_intrinsic(False)


@micro
def _npos(nv):
    # _positions' rule inside the kernels (the emitted loops take it at compile time)
    return max(1, min(8, 16 // nv))


@kernel
def forward(xp, hp, wp, c, oh, ow, sh, sw, toff, wt, kp, bias, has_bias, y, n, k, rows):
    """``y[b, oy, ox, kk] = bias[kk] + sum_t xp[((b*hp + oy*sh)*wp + ox*sw)*c + toff[t]] * wt[t, kk]``:
    every tap t of the zero-padded NHWC input ``xp`` (n x hp x wp x c, flat) at offset ``toff[t]``
    from its position's first element, ``wt`` (taps x kp, flat; kp a multiple of the vector width,
    zero past k).  Each worker takes a block of output rows (rows dealt out in turn ran slower on two
    threads than on one: 1.0 against 0.46 ms on 16x3x96x96 -> 16); ``rows`` (workers x ow*kp) are
    their scratch rows."""
    nw = rows.shape[0]
    lanes = _lanes(y)
    nv = kp // lanes
    npos = _npos(nv)
    nt = toff.size
    total = n * oh
    for wid in prange(nw):
        acc = rows[wid]
        for q in range(wid * total // nw, (wid + 1) * total // nw):  # a block of output rows each
            b = q // oh
            oy = q - b * oh
            x0 = ((b * hp + oy * sh) * wp) * c
            for ox in range(0, ow, npos):
                _tap_dot(xp, x0 + ox * sw * c, toff, nt, wt, 0, kp, acc, ox * kp, nv, sw * c, ow - ox)
            yo = _u(q * ow * k)
            ku = _u(k)
            kpu = _u(kp)
            for ox in range(_u(ow)):
                for kk in range(ku):
                    v = acc[ox * kpu + kk]
                    y[yo + ox * ku + kk] = v + bias[kk] if has_bias else v


@kernel
def grad_weight(gy, xp, hp, wp, c, oh, ow, sh, sw, toff, n, k, kp, per, parts, gyrow):
    """``parts[q, t, kk] = sum over the output rows of part q (rows q*per .. q*per + per - 1 of the
    n*oh) and their columns ox of gy[b, oy, ox, kk] * xp[(b*hp + oy*sh)*wp*c + ox*sw*c + toff[t]]``
    (``xp`` the zero-padded NHWC input, flat; kk < kp, zero past k); gy flat NHWC.  Items are the
    parts (disjoint sums), each over its rows in order; ``gyrow`` (parts x ow*kp) holds an output
    row of gy padded to kp channels."""
    np_ = parts.shape[0]
    lanes = _lanes(gy)
    nv = kp // lanes
    npos = _npos(nv)
    nt = toff.size
    kpu = _u(kp)
    ku = _u(k)
    for pq in prange(np_):
        acc = parts[pq].reshape(-1)
        g = gyrow[pq]
        for i in range(acc.size):
            acc[i] = 0
        for i in range(g.size):
            g[i] = 0
        for q in range(pq * per, min(n * oh, (pq + 1) * per)):
            b = q // oh
            oy = q - b * oh
            go = _u(q * ow * k)
            for ox in range(_u(ow)):
                for kk in range(ku):
                    g[ox * kpu + kk] = gy[go + ox * ku + kk]
            x0 = ((b * hp + oy * sh) * wp) * c
            for t in range(0, nt, npos):
                _row_dot(xp, x0, toff[t:], ow, g, 0, kp, acc, t * kp, nv, sw * c, nt - t)


@kernel
def pad_input(x, n, h, w, c, ph, pw, xp, hp, wp):
    """``xp`` (n x hp x wp x c, flat) = the NHWC input ``x`` (n x h x w x c, flat) at rows ph.. and
    columns pw.., zeros around (and where x is cut off: rows or columns past hp or wp)."""
    rw = wp * c
    for q in prange(n * hp):
        b = q // hp
        iy = q - b * hp - ph
        d = _u(q * rw)
        if iy < 0 or iy >= h:
            for j in range(_u(rw)):
                xp[d + j] = 0
            continue
        lo = _u(pw * c)
        cols = min(w, wp - pw)
        hi = lo + _u(max(cols, 0) * c)
        for j in range(lo):
            xp[d + j] = 0
        src = _u((b * h + iy) * w * c)
        for j in range(hi - lo):
            xp[d + lo + j] = x[src + j]
        for j in range(hi, _u(rw)):
            xp[d + j] = 0
