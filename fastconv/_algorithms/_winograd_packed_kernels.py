"""The numba kernels of the Winograd algorithm's packed forward (:func:`pack_u`,
:func:`forward_packed`; see :mod:`fastconv._algorithms.winograd` for the method): the row
transforms, the lane shuffles emitted as LLVM IR, and the kernels that call or inline them, on
the GEMM's micro-kernel (:func:`fastconv._algorithms.gemm.ukernel_ldb`).

Apart from ``_winograd_kernels.py`` (grad_weight), which re-exports both
kernels, so that a file holds one pass's kernels with every helper they inline (numba's cache is
kept per source file).
"""
import numpy as np
from llvmlite import ir
from numba import prange, types
from numba.extending import intrinsic

from .._jit import kernel, micro, serial
from .common import claim as _claim
from .gemm import VBYTES, _tile_of, ukernel_ldb

_micro = micro

# The packed forward's row transforms are called, not inlined by numba: inlining them all into the
# parallel kernel took 35 s to compile per dtype, calls 1/3 of that (LLVM still inlines the small
# ones); each call runs over whole rows of slots, so the call costs nothing measurable.
_helper = serial


# --------------------------------------------------------------------------- packed forward
# The forward pass (and grad_input, a forward pass too) on fastconv's own micro-kernel.  A work item
# is R consecutive tile rows of one group, counted over (image, tile row), so it may span images.
# Its tiles get slots q = (row - row0)*(tw + 1) + j: one spare slot per tile row, so that for each
# input channel the whole item is transformed by a few long vector loops over contiguous data
# (the a input rows under every tile row copied zero-padded side by side, then the column
# transform down them, the m column phases, the row transform; the spare slot takes what spills
# past the row end), with the F(m, 3) coefficients written out.  Short loops over the 14 tiles of
# one tile row left those loops mostly in their scalar remainders: the transforms took 5.6 ms of
# the 6.8 ms of resnet50-3x3-64 (8 x 64 x 56 x 56) when the products took 1.2 ms.
# The a*a products M[e] (kg x slots) = U[e] (kg x cg) . v[e] run on the micro-kernel straight
# from v (row stride ldt, no packing: ukernel_ldb) against U packed once per call in MR-row panels;
# the output transform runs the same way backwards.  kc holds the constants (1, 2, 4, 5, 8) in the
# dtype, so that no arithmetic is promoted to float64.

_u = np.uint64


@_micro
def _zero(a, o, n):
    for i in range(n):
        a[o + i] = 0


@_helper
def _copy_rows(xf, xoff, xw, rb, d0, y0, x0, nrow, ld, ncol, hv, wv):
    # rb[d0 + r*ld + c] = x[y0 + r, x0 + c] (plane at xf[xoff], rows of xw) inside [0, hv) x [0, wv),
    # else 0; r < nrow, c < ncol.  Offsets, not views: a view inside a prange body is an atomic
    # reference count update on the owner, which the workers then fight over (gemm._macro).
    lo = min(ncol, max(0, -x0))
    hi = max(lo, min(ncol, wv - x0))
    for r in range(nrow):
        d = _u(d0 + r * ld)
        yy = y0 + r
        if yy < 0 or yy >= hv or hi == lo:
            _zero(rb, d, _u(ncol))
            continue
        _zero(rb, d, _u(lo))
        src = _u(xoff + yy * xw + x0 + lo)
        dd = d + _u(lo)
        for c in range(_u(hi - lo)):
            rb[dd + c] = xf[src + c]
        _zero(rb, d + _u(hi), _u(ncol - hi))


# Loops that vectorise: one output row per loop (a loop that stores several rows of one buffer
# while reading several of another needs more run-time overlap checks than LLVM allows, 8, and
# stays scalar), and unsigned indices (numba wraps a negative signed index around, a select per
# access that keeps LLVM from vectorising: _bt4 took 240 ns a call with int64 offsets, 43 with
# uint64 ones).  No int literal may meet a uint64 in arithmetic: numba makes that float64.

@_micro
def _bt4(src, so, lds, dst, do, ldd, n, kc):
    # dst[do + i*ldd + q] = sum_u B^T[i, u] src[so + u*lds + q] for F(4, 3), q < n
    k4, k5, k2 = kc[2], kc[3], kc[1]
    s0 = _u(so)
    ls = _u(lds)
    s1 = s0 + ls
    s2 = s1 + ls
    s3 = s2 + ls
    s4 = s3 + ls
    s5 = s4 + ls
    d = _u(do)
    ld = _u(ldd)
    nn = _u(n)
    for q in range(nn):
        dst[d + q] = k4 * src[s0 + q] - k5 * src[s2 + q] + src[s4 + q]
    d += ld
    for q in range(nn):
        dst[d + q] = src[s3 + q] + src[s4 + q] - k4 * (src[s1 + q] + src[s2 + q])
    d += ld
    for q in range(nn):
        dst[d + q] = k4 * (src[s1 + q] - src[s2 + q]) + src[s4 + q] - src[s3 + q]
    d += ld
    for q in range(nn):
        dst[d + q] = k2 * (src[s3 + q] - src[s1 + q]) + src[s4 + q] - src[s2 + q]
    d += ld
    for q in range(nn):
        dst[d + q] = k2 * (src[s1 + q] - src[s3 + q]) + src[s4 + q] - src[s2 + q]
    d += ld
    for q in range(nn):
        dst[d + q] = k4 * src[s1 + q] - k5 * src[s3 + q] + src[s5 + q]


@_micro
def _bt2(src, so, lds, dst, do, ldd, n):
    # F(2, 3): B^T = [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]]
    s0 = _u(so)
    ls = _u(lds)
    s1 = s0 + ls
    s2 = s1 + ls
    s3 = s2 + ls
    d = _u(do)
    ld = _u(ldd)
    nn = _u(n)
    for q in range(nn):
        dst[d + q] = src[s0 + q] - src[s2 + q]
    d += ld
    for q in range(nn):
        dst[d + q] = src[s1 + q] + src[s2 + q]
    d += ld
    for q in range(nn):
        dst[d + q] = src[s2 + q] - src[s1 + q]
    d += ld
    for q in range(nn):
        dst[d + q] = src[s1 + q] - src[s3 + q]


@_helper
def _bt_cols(rb, tb, w, n, m, kc):
    # tb[r'*w + c] = sum_r B^T[r', r] rb[r*w + c], c < n
    if m == 4:
        _bt4(rb, 0, w, tb, 0, w, n, kc)
    else:
        _bt2(rb, 0, w, tb, 0, w, n)


def _shuffle_args(src, dst, factor):
    ok = (isinstance(src, types.Array) and isinstance(dst, types.Array) and src.layout == "C" and dst.layout == "C"
          and src.dtype == dst.dtype and src.dtype in (types.float32, types.float64)
          and isinstance(factor, types.IntegerLiteral))
    return ok


@intrinsic
def _deinterleave(typingctx, src, so, dst, do, ldd, factor):
    """One vector of each phase: ``dst[do + s*ldd + i] = src[so + factor*i + s]`` for s < factor,
    i < lanes (one vector register of the dtype).  LLVM leaves such stride-``factor`` loops scalar
    (its cost model on x86); here they are factor vector loads and factor shuffles."""
    if not _shuffle_args(src, dst, factor):
        return None
    f = factor.literal_value
    isz = src.dtype.bitwidth // 8

    def codegen(context, builder, sig, args):
        sa = context.make_array(sig.args[0])(context, builder, args[0])
        da = context.make_array(sig.args[2])(context, builder, args[2])
        fty = context.get_data_type(sig.args[0].dtype)
        lanes = VBYTES // isz
        i32, i64 = ir.IntType(32), ir.IntType(64)
        wide = builder.load(builder.bitcast(builder.gep(sa.data, [args[1]]), ir.VectorType(fty, f * lanes).as_pointer()),
                            align=isz)
        undef = ir.Constant(ir.VectorType(fty, f * lanes), ir.Undefined)
        vptr = ir.VectorType(fty, lanes).as_pointer()
        for ph in range(f):
            mask = ir.Constant(ir.VectorType(i32, lanes), [ph + f * i for i in range(lanes)])
            vec = builder.shuffle_vector(wide, undef, mask)
            off = builder.add(args[3], builder.mul(args[4], ir.Constant(i64, ph)))
            builder.store(vec, builder.bitcast(builder.gep(da.data, [off]), vptr), align=isz)
        return context.get_dummy_value()

    return types.void(src, types.intp, dst, types.intp, types.intp, factor), codegen


@intrinsic
def _interleave(typingctx, src, so, lds, dst, do, bias, factor, div):
    """One vector of each phase back into a row, plus a scalar: ``dst[do + factor*i + s] =
    src[so + s*lds + i] + bias`` for s < factor, i < lanes / div (the output transform's last
    step; div = 2 for half vectors)."""
    if not _shuffle_args(src, dst, factor) or not isinstance(div, types.IntegerLiteral):
        return None
    f = factor.literal_value
    dv = div.literal_value
    isz = src.dtype.bitwidth // 8

    def codegen(context, builder, sig, args):
        sa = context.make_array(sig.args[0])(context, builder, args[0])
        da = context.make_array(sig.args[3])(context, builder, args[3])
        fty = context.get_data_type(sig.args[0].dtype)
        lanes = VBYTES // isz // dv
        i32, i64 = ir.IntType(32), ir.IntType(64)
        vty = ir.VectorType(fty, lanes)
        vecs = []
        for ph in range(f):
            off = builder.add(args[1], builder.mul(args[2], ir.Constant(i64, ph)))
            vecs.append(builder.load(builder.bitcast(builder.gep(sa.data, [off]), vty.as_pointer()), align=isz))
        # concatenate pairwise into one factor*lanes vector, then interleave with one shuffle
        while len(vecs) > 1:
            n = vecs[0].type.count
            mask = ir.Constant(ir.VectorType(i32, 2 * n), list(range(2 * n)))
            vecs = [builder.shuffle_vector(vecs[i], vecs[i + 1], mask) for i in range(0, len(vecs), 2)]
        cat = vecs[0]
        wty = ir.VectorType(fty, f * lanes)
        mask = ir.Constant(ir.VectorType(i32, f * lanes), [(k % f) * lanes + k // f for k in range(f * lanes)])
        out = builder.shuffle_vector(cat, ir.Constant(wty, ir.Undefined), mask)
        b = builder.insert_element(ir.Constant(wty, ir.Undefined), args[5], ir.Constant(i32, 0))
        b = builder.shuffle_vector(b, ir.Constant(wty, ir.Undefined), ir.Constant(ir.VectorType(i32, f * lanes),
                                                                                  [0] * (f * lanes)))
        out = builder.fadd(out, b)
        builder.store(out, builder.bitcast(builder.gep(da.data, [args[4]]), wty.as_pointer()), align=isz)
        return context.get_dummy_value()

    return types.void(src, types.intp, types.intp, dst, types.intp, src.dtype, factor, div), codegen


@intrinsic
def _lanes_of(typingctx, a):
    """Elements of one vector register for the dtype of array ``a``, as a constant."""
    if not (isinstance(a, types.Array) and a.dtype in (types.float32, types.float64)):
        return None
    lanes = VBYTES // (a.dtype.bitwidth // 8)
    return types.intp(a), lambda context, builder, sig, args: context.get_constant(types.intp, lanes)


@_helper
def _split_phases(src, so, ph, lp, n, m):
    # ph[s*lp + q] = src[so + m*q + s], q < n, s < m: the m column phases of a row, then two
    # shifted copies of phases 0 and 1 (ph[(m + s)*lp + q] = ph[s*lp + q + 1]: the next tile's first
    # columns), so that the row transform reads a rows of slots like the column transform.
    # src must hold m*(n rounded up to a vector) elements from so.
    lanes = _lanes_of(ph)
    if m == 4:
        for q in range(0, n, lanes):
            _deinterleave(src, so + 4 * q, ph, q, lp, 4)
    else:
        for q in range(0, n, lanes):
            _deinterleave(src, so + 2 * q, ph, q, lp, 2)
    for s in range(2):
        d = _u((m + s) * lp)
        o = _u(s * lp + 1)
        for q in range(_u(n - 1)):
            ph[d + q] = ph[o + q]
        ph[(m + s) * lp + n - 1] = 0


@_helper
def _bt_row(ph, lp, v, voff, ldv, n, m, kc):
    # v[voff + s'*ldv + q] = sum_s B^T[s', s] d_s(q), d_s(q) = ph[s*lp + q] the column phases
    if m == 4:
        _bt4(ph, 0, lp, v, voff, ldv, n, kc)
    else:
        _bt2(ph, 0, lp, v, voff, ldv, n)


@_helper
def _at(src, so, lds, dst, do, ldd, n, m, kc):
    # dst[do + i*ldd + q] = sum_u A^T[i, u] src[so + u*lds + q], i < m, q < n
    s0 = _u(so)
    ls = _u(lds)
    s1 = s0 + ls
    s2 = s1 + ls
    s3 = s2 + ls
    d = _u(do)
    ld = _u(ldd)
    nn = _u(n)
    if m == 4:
        k2, k4, k8 = kc[1], kc[2], kc[4]
        s4 = s3 + ls
        s5 = s4 + ls
        for q in range(nn):
            dst[d + q] = src[s0 + q] + src[s1 + q] + src[s2 + q] + src[s3 + q] + src[s4 + q]
        d += ld
        for q in range(nn):
            dst[d + q] = src[s1 + q] - src[s2 + q] + k2 * (src[s3 + q] - src[s4 + q])
        d += ld
        for q in range(nn):
            dst[d + q] = src[s1 + q] + src[s2 + q] + k4 * (src[s3 + q] + src[s4 + q])
        d += ld
        for q in range(nn):
            dst[d + q] = src[s1 + q] - src[s2 + q] + k8 * (src[s3 + q] - src[s4 + q]) + src[s5 + q]
    else:  # A^T = [[1, 1, 1, 0], [0, 1, -1, -1]]
        for q in range(nn):
            dst[d + q] = src[s0 + q] + src[s1 + q] + src[s2 + q]
        d += ld
        for q in range(nn):
            dst[d + q] = src[s1 + q] - src[s2 + q] - src[s3 + q]


@_helper
def _store_row(t2, to, lt, yf, yo, nfull, ncol, m, bias, spill):
    # yf[yo + m*j + ci] = t2[to + ci*lt + j] + bias for output columns m*j + ci < ncol, in vectors
    # of m interleaved phases.  spill: the row may be overrun by less than one more row (the next
    # output row, which this worker writes next), so whole vectors cover it.  Otherwise whole
    # tiles go in full vectors, then half vectors, the last one overlapping the one before (the
    # same values written twice), and only a partial last tile element by element.
    lanes = _lanes_of(t2)
    half = lanes // 2
    j = 0
    if spill:
        jv = (ncol + m - 1) // m
        while j < jv:
            if m == 4:
                _interleave(t2, to + j, lt, yf, yo + 4 * j, bias, 4, 1)
            else:
                _interleave(t2, to + j, lt, yf, yo + 2 * j, bias, 2, 1)
            j += lanes
        return
    while j + lanes <= nfull:
        if m == 4:
            _interleave(t2, to + j, lt, yf, yo + 4 * j, bias, 4, 1)
        else:
            _interleave(t2, to + j, lt, yf, yo + 2 * j, bias, 2, 1)
        j += lanes
    if j < nfull and nfull >= half:
        while j < nfull:
            j = min(j, nfull - half)
            if m == 4:
                _interleave(t2, to + j, lt, yf, yo + 4 * j, bias, 4, 2)
            else:
                _interleave(t2, to + j, lt, yf, yo + 2 * j, bias, 2, 2)
            j += half
    for col in range(m * j, ncol):
        yf[yo + col] = t2[to + (col % m) * lt + col // m] + bias


@kernel
def pack_u(w, gm, pu, g, mr):
    # pu[((e*g + gi)*kgp + ip)*cg + cc*mr + i] = (G w[gi*kg + ip + i, cc] G^T)[e], e = r*a + s, in
    # float64 rounded once: U of each group in mr-row panels (rows past kg zero), kgp = kg rounded
    # up to mr.  w (k, cg, 9).  One panel per iteration, its mr rows innermost, so that each write
    # run is mr contiguous elements (row-major iteration scattered them: 26 ms for 512 x 512).
    k, cg = w.shape[0], w.shape[1]
    a = gm.shape[0]
    kg = k // g
    kgp = (kg + mr - 1) // mr * mr
    npn = kgp // mr
    for pn in prange(g * npn):
        gi = pn // npn
        ip = (pn - gi * npn) * mr
        t = np.empty((a, 3))
        out = np.empty((a * a, mr))
        for cc in range(cg):
            for i in range(mr):
                row = ip + i
                if row >= kg:
                    for e in range(a * a):
                        out[e, i] = 0
                    continue
                gg = w[gi * kg + row, cc]
                for r in range(a):
                    for s in range(3):
                        t[r, s] = gm[r, 0] * gg[s] + gm[r, 1] * gg[3 + s] + gm[r, 2] * gg[6 + s]
                for r in range(a):
                    for s in range(a):
                        out[r * a + s, i] = t[r, 0] * gm[s, 0] + t[r, 1] * gm[s, 1] + t[r, 2] * gm[s, 2]
            for e in range(a * a):
                base = ((e * g + gi) * kgp + ip) * cg + cc * mr
                for i in range(mr):
                    pu[base + i] = out[e, i]


@kernel
def forward_packed(xf, pu, b, yf, buf, kc, ctr, nn, c, xh, xw, k, oh, ow, m, g, ph0, pw0, hv, wv, th, tw, rows,
                   ldt):
    # xf the (n, c, h, w) input flat; pu from pack_u; b (k,); yf the (n, k, oh, ow) output flat;
    # an item is `rows` tile rows; ldt >= rows*(tw + 1), a multiple of NR.  buf (nw, words):
    # v (a*a*ev) | mm (a*a*em) | rb, tb (a*rows*wrow each) | ph (a*lp) | t1 (m*a*ldt) | t2 (m*m*ldt)
    # + 64 (whole-vector reads past t2's end).  v[e] (cg x ldt) starts at e*ev, ev = cg*ldt + 16:
    # the 16-element skew keeps the a*a rows a transform reads or writes for one channel out of
    # one L1 set (cg*ldt*4 bytes is a multiple of 4 KiB whenever cg is a power of two and ldt a
    # multiple of 16; resnet50-3x3-64's output transform ran 2x slower that way).
    a = m + 2
    ee = a * a
    kg, cg = k // g, c // g
    mr, nr = _tile_of(b)
    lanes = _lanes_of(b)
    kgp = (kg + mr - 1) // mr * mr
    sl = tw + 1          # slots per tile row
    wrow = m * sl        # copied input columns per tile row (>= m*tw + 2)
    lw = rows * wrow
    lp = rows * sl + 17  # + a vector of spill: _split_phases writes whole vectors
    nfull = min(tw, ow // m)
    # whole vectors may run past a row's end into the next row when that stays within it
    spill = (((ow + m - 1) // m + lanes - 1) // lanes) * lanes * m <= 2 * ow
    trows = nn * th
    nper = (trows + rows - 1) // rows
    items = g * nper
    nw = buf.shape[0]
    for wid in prange(nw):
        wk = buf[wid]
        ev = cg * ldt + 16
        em = kg * ldt + 16
        o1 = ee * ev
        o2 = o1 + ee * em
        o3 = o2 + a * lw
        o4 = o3 + a * lw
        o5 = o4 + a * lp
        o6 = o5 + m * a * ldt
        v = wk[:o1]
        mm = wk[o1:o2]
        rb = wk[o2:o3]
        tb = wk[o3:o4]
        ph = wk[o4:o5]
        t1 = wk[o5:o6]
        t2 = wk[o6:]
        for _ in range(items):
            it = _claim(ctr)
            if it >= items:
                break
            gi = it // nper
            r0 = (it - gi * nper) * rows
            nr_ = min(rows, trows - r0)
            ns = nr_ * sl
            for cc in range(cg):
                for ri in range(nr_):
                    n = (r0 + ri) // th
                    ti = r0 + ri - n * th
                    _copy_rows(xf, (n * c + gi * cg + cc) * xh * xw, xw, rb, ri * wrow, m * ti - ph0, -pw0, a, lw,
                               wrow, hv, wv)
                _bt_cols(rb, tb, lw, nr_ * wrow, m, kc)
                for r in range(a):
                    _split_phases(tb, r * lw, ph, lp, ns, m)
                    _bt_row(ph, lp, v, r * a * ev + cc * ldt, ev, ns, m, kc)
            npan = (ns + nr - 1) // nr
            for e in range(ee):
                ub = (e * g + gi) * kgp * cg
                for jp in range(npan):
                    for ip in range(0, kg, mr):
                        ukernel_ldb(cg, pu, ub + ip * cg, v, e * ev + jp * nr, ldt,
                                    mm, e * em + ip * ldt + jp * nr, ldt, 0, min(mr, kg - ip))
            for q in range(kg):
                kk = gi * kg + q
                bias = b[kk]
                for s in range(a):  # down the columns: t1[(i*a + s)*ldt + q]
                    _at(mm, s * em + q * ldt, a * em, t1, s * ldt, a * ldt, ns, m, kc)
                for i in range(m):  # along the rows: t2[(i*m + j)*ldt + q]
                    _at(t1, i * a * ldt, ldt, t2, i * m * ldt, ldt, ns, m, kc)
                for ri in range(nr_):
                    n = (r0 + ri) // th
                    ti = r0 + ri - n * th
                    nrow = min(m, oh - m * ti)
                    for i in range(nrow):
                        _store_row(t2, i * m * ldt + ri * sl, ldt, yf, ((n * k + kk) * oh + m * ti + i) * ow, nfull,
                                   ow, m, bias, i < nrow - 1 and spill)
