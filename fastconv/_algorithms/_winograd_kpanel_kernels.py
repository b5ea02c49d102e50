"""The numba kernels of the Winograd forward by output-channel panels
(:mod:`fastconv._algorithms.winograd_kpanel`, which has the method and the notation).

The tiles' transforms are linear maps along one axis of a tile applied to long contiguous runs at
once (``_comb`` of the batch-wide kernels: one store stream, at most five load streams, which LLVM
vectorises), along a panel's NR tiles.  The weights' transform is emitted as LLVM IR
(:func:`_emit_u`): a vector of channels at a time, its nine taps gathered, the a*a results kept in
registers until stored (a numba loop writing 36 streams stays scalar).

Kept in a file of its own: numba's cache is per source file (shared/NUMBA_NOTES.md); ``_comb`` and
``_terms`` are called, not inlined, so an edit to them reaches these kernels.
"""
import numpy as np
from llvmlite import ir
from numba import prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from .._jit import kernel, micro
from ._gemm_kernels import ISA, TILES, VBYTES, _emit_ukernel, _switch_rows, _ukernel_types, _vector_tools
from ._winograd_nhwc_kernels import _comb, _terms
from .common import claim
from .gemm import _lanes, _tile_of, ukernel_rowptr

_u = np.uint64

# G of F(m, 3), as in winograd.py (a test checks both copies agree); _emit_u takes its coefficients
# from here, in an order that shares the rows' common terms
G = {
    4: ((1 / 4, 0, 0), (-1 / 6, -1 / 6, -1 / 6), (-1 / 6, 1 / 6, -1 / 6), (1 / 24, 1 / 12, 1 / 6),
        (1 / 24, -1 / 12, 1 / 6), (0, 0, 1)),
    2: ((1, 0, 0), (1 / 2, 1 / 2, 1 / 2), (1 / 2, -1 / 2, 1 / 2), (0, 0, 1)),
}


def _emit_u(context, builder, sig, args, m):
    # U[i*a + j] = sum_{r,s} G[i, r] G[j, s] g[r][s] for one vector of channels: the nine taps
    # gathered (channel l at w[woff + l*wcs + tap], tap mirrored with flip; lanes at or past n read
    # channel n - 1's), the a*a results stored as whole vectors at u[uoff + e*ue]
    w, woff, wcs, flip, n, u, uoff, ue = args
    wa = context.make_array(sig.args[0])(context, builder, w)
    ua = context.make_array(sig.args[5])(context, builder, u)
    fty = context.get_data_type(sig.args[0].dtype)
    isz = context.get_abi_sizeof(fty)
    lanes, vty, fma, splat = _vector_tools(builder, fty, isz, VBYTES)
    i32, i64 = ir.IntType(32), ir.IntType(64)
    iv = ir.VectorType(i32, lanes)
    pvty = ir.VectorType(ir.PointerType(fty), lanes)
    gather = cgutils.get_or_insert_function(
        builder.module, ir.FunctionType(vty, [pvty, i32, ir.VectorType(ir.IntType(1), lanes), vty]),
        f"llvm.masked.gather.v{lanes}f{8 * isz}.v{lanes}p0")

    def splat_i(x):
        v = builder.insert_element(ir.Constant(iv, ir.Undefined), x, ir.Constant(i32, 0))
        return builder.shuffle_vector(v, ir.Constant(iv, ir.Undefined), ir.Constant(ir.VectorType(i32, lanes), [0] * lanes))

    # 32-bit lane offsets from a scalar base pointer: one VGATHERDPS per vector (64-bit addresses
    # took two VGATHERQPS, and the gathers were half of the time)
    iota = ir.Constant(iv, list(range(lanes)))
    last = splat_i(builder.trunc(builder.sub(n, ir.Constant(i64, 1)), i32))
    lane = builder.select(builder.icmp_signed("<", iota, last), iota, last)
    rowoff = builder.mul(lane, splat_i(builder.trunc(wcs, i32)))
    flipped = builder.icmp_signed("!=", flip, ir.Constant(i64, 0))
    ones = ir.Constant(ir.VectorType(ir.IntType(1), lanes), [1] * lanes)
    undef = ir.Constant(vty, ir.Undefined)
    w0 = builder.gep(wa.data, [woff])
    g = []
    for t in range(9):
        p0 = builder.gep(w0, [builder.select(flipped, ir.Constant(i64, 8 - t), ir.Constant(i64, t))])
        # a vector of pointers (llvmlite's gep() types scalar indices only: built by hand)
        ptrs = ir.instructions.GEPInstr(builder.block, p0, [rowoff], False, "", source_etype=fty)
        ptrs.type = pvty
        builder._insert(ptrs)
        g.append(builder.call(gather, [ptrs, ir.Constant(i32, isz), ones, undef]))

    def mul(v, c):
        return builder.fmul(v, splat(ir.Constant(fty, c)))

    gm = G[m]

    def g1d(v0, v1, v2):  # (G v) for the a rows of G: rows 1 and 2 (and 3 and 4) share their terms
        s = builder.fadd(v0, v2)
        r12 = [mul(builder.fadd(s, v1), gm[1][1]), mul(builder.fsub(s, v1), gm[2][0])]
        if m == 2:
            return [v0, *r12, v2]
        p = builder.call(fma, [v0, splat(ir.Constant(fty, gm[3][0])), mul(v2, gm[3][2])])
        q = mul(v1, gm[3][1])
        return [mul(v0, gm[0][0]), *r12, builder.fadd(p, q), builder.fsub(p, q), v2]

    a = m + 2
    cols = [g1d(g[s], g[3 + s], g[6 + s]) for s in range(3)]  # cols[s][i] = (G g)[i][s]
    up = builder.gep(ua.data, [uoff])
    for i in range(a):
        row = g1d(cols[0][i], cols[1][i], cols[2][i])
        for j in range(a):
            dst = builder.gep(up, [builder.mul(ir.Constant(i64, i * a + j), ue)])
            builder.store(row[j], builder.bitcast(dst, vty.as_pointer()), align=isz)
    return context.get_dummy_value()


def _u_intrinsic(m):
    def typer(typingctx, w, woff, wcs, flip, n, u, uoff, ue):
        if not (isinstance(w, types.Array) and isinstance(u, types.Array) and w.dtype == u.dtype
                and w.dtype in (types.float32, types.float64) and w.ndim == 1 and u.ndim == 1):
            return None
        sig = types.void(w, types.int64, types.int64, types.int64, types.int64, u, types.int64, types.int64)
        return sig, lambda context, builder, sig, args: _emit_u(context, builder, sig, args, m)
    typer.__name__ = f"_u_vec{m}"
    typer.__doc__ = (f"U of F({m}x{m}, 3x3) for one vector of channels (see _emit_u): ``u[uoff + e*ue + l] = "
                     f"(G g G^T)[e]`` of channel l's taps ``w[woff + l*wcs + tap]`` (``8 - tap`` with flip).")
    return intrinsic(typer)


_u_vec4 = _u_intrinsic(4)
_u_vec2 = _u_intrinsic(2)


@micro
def _item(it, nmid, nblk, blk, total):
    # item it = (group*nmid + mid)*nblk + block: (group, mid, the block's first index (block*blk)
    # and its length, at most blk of total)
    b0 = (it % nblk) * blk
    return it // (nmid * nblk), (it // nblk) % nmid, b0, min(blk, total - b0)


@micro
def _transform(src, s0, tmp, t0, run, n, ai, ao, ti, tc, tn, dst, d0, dstep, ot, ct):
    # the separable 2-D transform of an ai x ai grid of runs (element k = i*ai + j's run of ``run``
    # at src[s0 + k*run]) by the ao x ai matrix whose rows' terms are (ti, tc, tn): down the columns
    # into tmp (ao x ai runs from t0), then along the rows, the first n of each run of element
    # e = i*ao + j written to dst[d0 + e*dstep]
    for i in range(ao):
        nt = _terms(ti, tc, tn, i, 0, ai, s0, ai * run, ot, ct)
        _comb(tmp, t0 + i * ai * run, src, ot, ct, nt, ai * run)
    for i in range(ao):
        for j in range(ao):
            nt = _terms(ti, tc, tn, j, 0, ai, t0 + i * ai * run, run, ot, ct)
            _comb(dst, d0 + (i * ao + j) * dstep, tmp, ot, ct, nt, n)


@kernel
def transform_in(x, xsc, toffs, v, cg, g, ai, a, ntp, cb, bi, bc, bn, buf, ot, ct, zeros, ctr):
    """``V[grp][e][tp][c][l] = (B d B^T)[e]`` of tile ``tp*NR + l``'s ai x ai patch ``d`` of channel
    ``grp*cg + c``, at ``v[(((grp*a*a + e)*ntp + tp)*cg + c)*NR + l]``, for the a x ai transform
    ``B`` given by its rows' terms ``(bi, bc, bn)``: the forward's input transform (ai = a, ``B^T``
    of the module's notation), or grad_weight's transform of gy (ai = m, ``A``).

    The patch element k = i*ai + j of that tile is ``x[(grp*cg + c)*xsc + toffs[(tp*ai*ai + k)*NR +
    l]]`` (any layout: the offsets hold the image, row and column strides) or zero where the offset
    is negative (padding, and the tiles past the last that fill the last panel).  Items are (group,
    panel, block of ``cb`` channels), claimed; ``buf`` (workers x (ai + a)*ai*cb*NR) holds a block's
    gathered patches and their column transform."""
    nw = buf.shape[0]
    _, nr = _tile_of(v)
    a2 = a * a
    p2 = ai * ai
    ncb = -(-cg // cb)
    items = g * ntp * ncb
    half = p2 * cb * nr
    zero = zeros[0]  # (a literal 0 in the select below made the loop float64)
    for wid in prange(nw):
        bb = buf[wid]
        o_, c_ = ot[wid], ct[wid]
        while True:
            it = claim(ctr)
            if it >= items:
                break
            grp, tp, c0, cn = _item(it, ntp, ncb, cb, cg)
            # gathered patches: d[k][cc][l] at bb[(k*cb + cc)*nr + l] (unsigned indices and a select:
            # LLVM still keeps the loop scalar on Zen 4, whose gathers its cost model finds dear)
            for k in range(p2):
                trow = _u((tp * p2 + k) * nr)
                for cc in range(cn):
                    base = _u((grp * cg + c0 + cc) * xsc)
                    dst = _u((k * cb + cc) * nr)
                    for ll in range(_u(nr)):
                        o = toffs[trow + ll]
                        val = x[base + _u(max(o, 0))]
                        bb[dst + ll] = val if o >= 0 else zero
            # V[e] = (B d B^T)[e] at v[(((grp*a*a + e)*ntp + tp)*cg + c0)*nr ...], the column pass at bb[half:]
            _transform(bb, 0, bb, half, cb * nr, cn * nr, ai, a, bi, bc, bn, v,
                       ((grp * a2 * ntp + tp) * cg + c0) * nr, ntp * cg * nr, o_, c_)


@kernel
def transform_in_c(x, xsc, toffs, v, cg, ldv, g, a, tp_all, cb, bi, bc, bn, buf, ot, ct, zeros, ctr):
    """grad_weight's input transform along the channels: ``V[grp][e][t][c] = (B^T d B)[e]`` of tile
    t's a x a patch ``d`` of channel ``grp*cg + c``, at ``v[((grp*a*a + e)*tp_all + t)*ldv + c]``
    for every tile t < tp_all (``toffs`` as :func:`transform_in`'s, NR tiles a panel; the tiles
    past the last are zeros).  Items are (group, tile, block of ``cb`` channels), claimed; ``buf``
    (workers x 2*a*a*cb) holds a block's gathered patch and its column transform."""
    nw = buf.shape[0]
    _, nr = _tile_of(v)
    a2 = a * a
    ncb = -(-cg // cb)
    items = g * tp_all * ncb
    half = a2 * cb
    zero = zeros[0]
    for wid in prange(nw):
        bb = buf[wid]
        o_, c_ = ot[wid], ct[wid]
        while True:
            it = claim(ctr)
            if it >= items:
                break
            grp, t, c0, cn = _item(it, tp_all, ncb, cb, cg)
            cbase = (grp * cg + c0) * xsc
            for k in range(a2):
                o = toffs[((t // nr) * a2 + k) * nr + t % nr]
                dst = k * cb
                if o < 0:
                    for cc in range(cn):
                        bb[dst + cc] = zero
                else:
                    src = _u(cbase + o)
                    for cc in range(_u(cn)):
                        bb[_u(dst) + cc] = x[src + cc * _u(xsc)]
            _transform(bb, 0, bb, half, cb, cn, a, a, bi, bc, bn, v, (grp * a2 * tp_all + t) * ldv + c0,
                       tp_all * ldv, o_, c_)


@intrinsic
def ukernel_rowptr_ldb(typingctx, kc, a, offs, ioff, toff, zeros, pb, boff, ldb, c, coff, ldc, acc, rows):
    """:func:`fastconv._algorithms.gemm.ukernel_rowptr` whose B is not a packed panel but NR columns
    of a row-major matrix with row stride ``ldb``: ``C[i, j] (+)= sum_p a[offs[ioff + i] + toff + p]
    * pb[boff + p*ldb + j]``."""
    if not _ukernel_types(kc, a, ioff, pb, boff, c, coff, ldc, acc):
        return None
    if not (isinstance(offs, types.Array) and offs.dtype == types.int64 and offs.ndim == 1
            and isinstance(zeros, types.Array) and zeros.dtype == a.dtype and zeros.layout == "C"):
        return None
    mr, nv = TILES[ISA][c.dtype.bitwidth // 8]
    sig = types.void(types.intp, a, offs, types.intp, types.intp, zeros, pb, types.intp, types.intp, c,
                     types.intp, types.intp, types.intp, types.intp)

    def codegen(context, builder, sig_, args):
        # the emitter reads (kc, pa, aoff, pb, boff, c, coff, ldc, acc) at fixed positions, then
        # the row offsets, the tap offset, the zeros and B's row stride
        idx = (0, 1, 3, 6, 7, 9, 10, 11, 12, 2, 4, 5, 8)
        order = [args[i] for i in idx]
        osig = types.void(*[sig_.args[i] for i in idx])
        _switch_rows(builder, args[13], range(1, mr + 1), "rowptr_ldb", lambda r: _emit_ukernel(
            context, builder, osig, order, mr, nv, VBYTES, rows=r, rowptr=(9, 10, 11), ldb=12))
        return context.get_dummy_value()

    return sig, codegen


@kernel
def gw_products(wg, vc, ntp, ldv, cg, kg, g, a, cb, gw, gti, gtc, gtn, mbuf, sbuf, offs, zeros, ot, ct, ctr):
    """grad_weight by panels of output channels.  Items (group, panel of MR output channels, block
    of ``cb`` input channels), claimed: ``Mw[e] (MR x cb) = sum_t W[e][k][t] . V[e][t][c]`` on the
    micro-kernel (W = the transformed gy, ``wg[(((grp*a*a + e)*ntp + tp)*kg + kk)*NR + l]`` for tile
    ``tp*NR + l``, its rows read in place through ``offs``; V = :func:`transform_in_c`'s, rows of
    ``ldv``), accumulated over the tile panels, then ``G^T Mw G`` to the 3 x 3 taps (terms of
    ``G^T``'s rows ``(gti, gtc, gtn)``) stored into ``gw[kk, c, :, :]`` (flat, C-contiguous)."""
    nw = mbuf.shape[0]
    mr, nr = _tile_of(wg)
    a2 = a * a
    nkp = -(-kg // mr)
    ncb = -(-cg // cb)
    items = g * nkp * ncb
    sl = mr * cb
    tp_all = ntp * nr
    for wid in prange(nw):
        mb, ob = mbuf[wid], sbuf[wid]
        o_, c_ = ot[wid], ct[wid]
        while True:
            it = claim(ctr)
            if it >= items:
                break
            grp, kp, c0, cn = _item(it, nkp, ncb, cb, cg)
            k0 = kp * mr
            rows = min(mr, kg - k0)
            for e in range(a2):
                for cp in range(0, cn, nr):
                    for tp in range(ntp):
                        ukernel_rowptr_ldb(nr, wg, offs, 0, (((grp * a2 + e) * ntp + tp) * kg + k0) * nr, zeros,
                                           vc, ((grp * a2 + e) * tp_all + tp * nr) * ldv + c0 + cp, ldv,
                                           mb, e * sl + cp, cb, 1 if tp > 0 else 0, rows)
            # along the rows: s[r][v] = sum_j G[j, v] Mw[r*a + j]  (all MR x cb at once)
            for r in range(a):
                for vv in range(3):
                    nt = _terms(gti, gtc, gtn, vv, 0, a, r * a * sl, sl, o_, c_)
                    _comb(ob, (r * 3 + vv) * sl, mb, o_, c_, nt, sl)
            # down the columns: tap[u][v] = sum_r G[r, u] s[r][v]
            for u in range(3):
                for vv in range(3):
                    nt = _terms(gti, gtc, gtn, u, 0, a, vv * sl, 3 * sl, o_, c_)
                    _comb(ob, (3 * a + u * 3 + vv) * sl, ob, o_, c_, nt, sl)
            for i in range(rows):
                dst = ((grp * kg + k0 + i) * cg + c0) * 9
                for cc in range(cn):
                    for tap in range(9):
                        gw[dst + cc * 9 + tap] = ob[(3 * a + tap) * sl + i * cb + cc]


@kernel
def products_out(w, wgs, wks, wcs, flip, v, ntp, cg, kg, g, a, m, cb, tpc, ntiles,
                 y, ybase, vr, vc, ysk, ysh, ysw, bias, has_bias, ai, ac, an,
                 up, offs, zeros, mbuf, sbuf, ot, ct, ctr):
    """Items (group, panel of MR output channels, ``tpc`` panels of NR tiles), claimed: the panel's
    transformed weights ``U[e][i][c]`` for a block of ``cb`` input channels at a time (a multiple
    of the vector width) into the worker's ``up`` (from the taps ``w[grp*wgs + kk*wks + c*wcs +
    tap]``, ``tap`` mirrored with ``flip``), the a*a products ``M[e] (MR x tiles) += U[e] . V[e]`` on the micro-kernel (U's
    rows read in place through ``offs``), then ``Y = A^T M A (+ b)`` of every tile along the
    tiles, stored to ``y[ybase[t] + kk*ysk + r*ysh + q*ysw]`` for the ``vr[t] x vc[t]`` part of
    the tile inside the output."""
    nw = up.shape[0]
    mr, nr = _tile_of(y)
    lanes = _lanes(y)
    a2 = a * a
    nkp = -(-kg // mr)
    ntc = -(-ntp // tpc)
    items = g * nkp * ntc
    ldm = tpc * nr
    sl = mr * ldm
    ys = m * a * sl  # y4 after the row transform's m*a*MR*ldm
    for wid in prange(nw):
        ub, mb, ob = up[wid], mbuf[wid], sbuf[wid]
        o_, c_ = ot[wid], ct[wid]
        while True:
            it = claim(ctr)
            if it >= items:
                break
            grp, kp, tc0, tpn = _item(it, nkp, ntc, tpc, ntp)
            k0 = kp * mr
            rows = min(mr, kg - k0)
            for c0 in range(0, cg, cb):
                cn = min(cb, cg - c0)
                for i in range(rows):
                    wo = grp * wgs + (k0 + i) * wks + c0 * wcs
                    for cc in range(0, cn, lanes):
                        if m == 4:
                            _u_vec4(w, wo + cc * wcs, wcs, flip, cn - cc, ub, i * cb + cc, mr * cb)
                        else:
                            _u_vec2(w, wo + cc * wcs, wcs, flip, cn - cc, ub, i * cb + cc, mr * cb)
                for e in range(a2):
                    vb = ((grp * a2 + e) * ntp + tc0) * cg + c0
                    for tp in range(tpn):
                        ukernel_rowptr(cn, ub, offs, 0, e * mr * cb, zeros, v, (vb + tp * cg) * nr,
                                       mb, e * sl + tp * nr, ldm, 1 if c0 > 0 else 0, rows)
            # Y = A^T M A of all MR x ldm at once: the column pass at ob[0:], Y[r*m + q] at ob[ys + ...]
            _transform(mb, 0, ob, 0, sl, sl, a, m, ai, ac, an, ob, ys, sl, o_, c_)
            for i in range(rows):
                kk = grp * kg + k0 + i
                bv = bias[kk] if has_bias else 0
                for tp in range(tpn):
                    for ll in range(nr):
                        t = (tc0 + tp) * nr + ll
                        if t >= ntiles:
                            break
                        yb = ybase[t] + kk * ysk
                        src = ys + i * ldm + tp * nr + ll
                        for r in range(vr[t]):
                            for q in range(vc[t]):
                                val = ob[src + (r * m + q) * sl]
                                y[yb + r * ysh + q * ysw] = val + bv if has_bias else val
