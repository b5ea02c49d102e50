"""The numba kernel of the fused Winograd forward (:mod:`fastconv._algorithms.winograd_fused`, which
has the method and the notation): the tile transforms emitted as LLVM IR on whole vectors of
channels, and the parallel kernel that runs transform, products and inverse transform for one
block of tiles after the other while they stay in the worker's L2.

Kept in a file of its own: numba's cache is per source file and does not see an edit to a helper
inlined from another one (shared/NUMBA_NOTES.md).
"""
import numpy as np
from llvmlite import ir
from numba import prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from .._jit import kernel, serial
from ._gemm_kernels import VBYTES, _emit_ukernel, _switch_rows, _ukernel_types
from ._nhwc_kernels import _transpose_block
from .common import _gather, _zero, claim
from .gemm import _lanes, _tile_of, ukernel_rowptr, ukernel_strided

_u = np.uint64

# F(m, 3) matrices, as in winograd.py (kept here too: the emitted code hard-codes them; a test
# checks that both copies agree)
BT = {
    4: ((4, 0, -5, 0, 1, 0),
        (0, -4, -4, 1, 1, 0),
        (0, 4, -4, -1, 1, 0),
        (0, -2, -1, 2, 1, 0),
        (0, 2, -1, -2, 1, 0),
        (0, 4, 0, -5, 0, 1)),
    2: ((1, 0, -1, 0),
        (0, 1, 1, 0),
        (0, -1, 1, 0),
        (0, 1, 0, -1)),
}
AT = {
    4: ((1, 1, 1, 1, 1, 0),
        (0, 1, -1, 2, -2, 0),
        (0, 1, 1, 4, 4, 0),
        (0, 1, -1, 8, -8, 1)),
    2: ((1, 1, 1, 0),
        (0, 1, -1, -1)),
}


# ------------------------------------------------------------------------------ the thin tile
#: (MR, NV) of the micro-kernel for products with at most 16 float32 columns on AVX-512 (a 16-channel
#: U-Net layer's kg, its grad_weight's cg): the 14 x 32 tile computed half of its columns in vain
#: there; 16 rows of one vector keep 16 sums in flight with one load of B per step.
THIN_MR, THIN_NV = 16, 1


@intrinsic
def ukernel_rowptr_thin(typingctx, kc, a, offs, ioff, toff, zeros, pb, boff, c, coff, ldc, acc, rows):
    """:func:`fastconv._algorithms.gemm.ukernel_rowptr` on the THIN_MR x THIN_NV tile (B in panels of
    THIN_NV vectors)."""
    if not _ukernel_types(kc, a, ioff, pb, boff, c, coff, ldc, acc):
        return None
    if not (isinstance(offs, types.Array) and offs.dtype == types.int64 and offs.ndim == 1
            and isinstance(zeros, types.Array) and zeros.dtype == a.dtype and zeros.layout == "C"):
        return None
    sig = types.void(types.intp, a, offs, types.intp, types.intp, zeros, pb, types.intp, c, types.intp,
                     types.intp, types.intp, types.intp)

    def codegen(context, builder, sig_, args):
        idx = (0, 1, 3, 6, 7, 8, 9, 10, 11, 2, 4, 5)
        order = [args[i] for i in idx]
        osig = types.void(*[sig_.args[i] for i in idx])
        _switch_rows(builder, args[12], range(1, THIN_MR + 1), "rowptr_thin", lambda r: _emit_ukernel(
            context, builder, osig, order, THIN_MR, THIN_NV, VBYTES, rows=r, rowptr=(9, 10, 11)))
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def ukernel_strided_thin(typingctx, kc, pa, aoff, lda, pb, boff, ldb, c, coff, ldc, acc, rows):
    """:func:`fastconv._algorithms.gemm.ukernel_strided` on the THIN_MR x THIN_NV tile."""
    if not _ukernel_types(kc, pa, aoff, pb, boff, c, coff, ldc, acc):
        return None
    sig = types.void(types.intp, pa, types.intp, types.intp, pb, types.intp, types.intp, c, types.intp,
                     types.intp, types.intp, types.intp)

    def codegen(context, builder, sig_, args):
        idx = (0, 1, 2, 4, 5, 7, 8, 9, 10, 3, 6)
        order = [args[i] for i in idx]
        osig = types.void(*[sig_.args[i] for i in idx])
        _switch_rows(builder, args[11], range(1, THIN_MR + 1), "strided_thin", lambda r: _emit_ukernel(
            context, builder, osig, order, THIN_MR, THIN_NV, VBYTES, rows=r, ldb=10, lda=9))
        return context.get_dummy_value()

    return sig, codegen


# ------------------------------------------------------------------------------ tile transforms
def _lincomb(builder, fma, coeffs, values, ty):
    # sum of c * v over the nonzero coefficients: +-1 as adds and subtracts, others as multiply-adds
    acc = None
    for cf, v in zip(coeffs, values):
        if cf == 0:
            continue
        if acc is None:
            acc = v if cf == 1 else builder.fneg(v) if cf == -1 else builder.fmul(_const(ty, cf), v)
        elif cf == 1:
            acc = builder.fadd(acc, v)
        elif cf == -1:
            acc = builder.fsub(acc, v)
        else:
            acc = builder.call(fma, [_const(ty, cf), v, acc])
    return acc if acc is not None else _const(ty, 0)


def _const(ty, v):
    if isinstance(ty, ir.VectorType):
        return ir.Constant(ty, [float(v)] * ty.count)
    return ir.Constant(ty, float(v))


def _emit_2d(builder, fma, ty, left, right, load, store):
    # out[i'][j'] = sum_{i,j} left[i'][i] in[i][j] right[j'][j]: column by column of the output,
    # the a values of one column of (in . right^T) live in registers, then left applies down it
    ni = len(left[0])
    nj = len(right[0])
    for jo, rrow in enumerate(right):
        t = [_lincomb(builder, fma, rrow, [load(i, j) if rrow[j] else None for j in range(nj)], ty)
             for i in range(ni)]
        for io, lrow in enumerate(left):
            store(io, jo, _lincomb(builder, fma, lrow, t, ty))


def _channel_loop(builder, nch, lanes, body):
    # body(ch, width) for ch = 0, lanes, ... while a whole vector fits, then width 1 for the rest
    i64 = ir.IntType(64)
    start = ir.Constant(i64, 0)
    for width in (lanes, 1):
        entry = builder.block
        loop = builder.append_basic_block(f"ch{width}.loop")
        more = builder.append_basic_block(f"ch{width}.body")
        done = builder.append_basic_block(f"ch{width}.done")
        builder.branch(loop)
        builder.position_at_end(loop)
        ch = builder.phi(i64)
        ch.add_incoming(start, entry)
        builder.cbranch(builder.icmp_signed("<=", builder.add(ch, ir.Constant(i64, width)), nch), more, done)
        builder.position_at_end(more)
        body(ch, width)
        ch.add_incoming(builder.add(ch, ir.Constant(i64, width)), builder.block)
        builder.branch(loop)
        builder.position_at_end(done)
        start = ch  # where the vector loop stopped, the single-channel loop starts


def _access(builder, base, off, width, fty):
    # pointer to `width` elements at base[off] (a vector pointer when width > 1)
    p = builder.gep(base, [off])
    return builder.bitcast(p, ir.VectorType(fty, width).as_pointer()) if width > 1 else p


def _tools(context, builder, sig, nbits):
    fty = context.get_data_type(sig)
    isz = context.get_abi_sizeof(fty)
    lanes = VBYTES // isz
    return fty, isz, lanes


def _fma_for(builder, ty):
    bits = 64 if (ty.element if isinstance(ty, ir.VectorType) else ty) == ir.DoubleType() else 32
    name = f"llvm.fmuladd.v{ty.count}f{bits}" if isinstance(ty, ir.VectorType) else f"llvm.fmuladd.f{bits}"
    return cgutils.get_or_insert_function(builder.module, ir.FunctionType(ty, [ty] * 3), name)


def _a_rows(m):
    # A (a x m), the transpose of A^T: grad_weight's transform of gy is A gy A^T
    return tuple(tuple(AT[m][j][i] for j in range(m)) for i in range(m + 2))


def _patch_transform(mat_of, name, doc):
    # an intrinsic (src, soff, rs, cs, dst, doff, es, nch, m): dst[doff + e*es + ch] = (L d L^T)[e]
    # for ch < nch, d[i, j] = src[soff + i*rs + j*cs + ch] the square input patch, L = mat_of(m)
    def typer(typingctx, src, soff, rs, cs, dst, doff, es, nch, m):
        if not (isinstance(src, types.Array) and isinstance(dst, types.Array) and src.dtype == dst.dtype
                and src.dtype in (types.float32, types.float64) and isinstance(m, types.IntegerLiteral)):
            return None
        mat = mat_of(m.literal_value)
        na = len(mat)
        sig = types.void(src, types.intp, types.intp, types.intp, dst, types.intp, types.intp, types.intp, m)

        def codegen(context, builder, sig_, args):
            s_, soffv, rsv, csv, d_, doffv, esv, nchv, _ = args
            sa = context.make_array(sig_.args[0])(context, builder, s_)
            da = context.make_array(sig_.args[4])(context, builder, d_)
            fty, isz, lanes = _tools(context, builder, sig_.args[0].dtype, 0)
            i64 = ir.IntType(64)

            def body(ch, width):
                ty = ir.VectorType(fty, width) if width > 1 else fty
                fma = _fma_for(builder, ty)
                s0 = builder.add(soffv, ch)
                d0 = builder.add(doffv, ch)
                cache = {}

                def load(i, j):
                    if (i, j) not in cache:
                        off = builder.add(s0, builder.add(builder.mul(rsv, ir.Constant(i64, i)),
                                                          builder.mul(csv, ir.Constant(i64, j))))
                        cache[i, j] = builder.load(_access(builder, sa.data, off, width, fty), align=isz)
                    return cache[i, j]

                def store(io, jo, v):
                    off = builder.add(d0, builder.mul(esv, ir.Constant(i64, io * na + jo)))
                    builder.store(v, _access(builder, da.data, off, width, fty), align=isz)

                _emit_2d(builder, fma, ty, mat, mat, load, store)

            _channel_loop(builder, nchv, lanes, body)
            return context.get_dummy_value()

        return sig, codegen

    typer.__name__ = name
    typer.__doc__ = doc
    return intrinsic(typer)


transform_in = _patch_transform(lambda m: BT[m], "transform_in", """\
    ``dst[doff + (i'*a + j')*es + ch] = (B^T d B)[i', j']`` for ch < nch, where
    ``d[i, j] = src[soff + i*rs + j*cs + ch]`` is the a x a input patch of F(m, 3) (``m`` a
    constant, 4 or 2): whole vectors of channels, then single ones.""")

transform_gy = _patch_transform(_a_rows, "transform_gy", """\
    grad_weight's ``dst[doff + (i'*a + j')*es + ch] = (A g A^T)[i', j']`` for ch < nch, where
    ``g[i, j] = src[soff + i*rs + j*cs + ch]`` is an m x m tile of the output gradient.""")


@intrinsic
def transform_out(typingctx, src, soff, es, dst, doff, rs, cs, nch, mi, mj, bias, boff, m):
    """``dst[doff + i'*rs + j'*cs + ch] = (A^T M A)[i', j'] + bias[boff + ch]`` for i' < mi,
    j' < mj (the part of the m x m output tile inside the output), ch < nch, where
    ``M[i, j] = src[soff + (i*a + j)*es + ch]``; ``m`` a constant, 4 or 2."""
    if not (isinstance(src, types.Array) and isinstance(dst, types.Array) and isinstance(bias, types.Array)
            and src.dtype == dst.dtype == bias.dtype and src.dtype in (types.float32, types.float64)
            and isinstance(m, types.IntegerLiteral)):
        return None
    mm = m.literal_value
    at = AT[mm]
    a = mm + 2
    sig = types.void(src, types.intp, types.intp, dst, types.intp, types.intp, types.intp, types.intp, types.intp,
                     types.intp, bias, types.intp, m)

    def codegen(context, builder, sig_, args):
        s_, soffv, esv, d_, doffv, rsv, csv, nchv, miv, mjv, b_, boffv, _ = args
        sa = context.make_array(sig_.args[0])(context, builder, s_)
        da = context.make_array(sig_.args[3])(context, builder, d_)
        ba = context.make_array(sig_.args[10])(context, builder, b_)
        fty, isz, lanes = _tools(context, builder, sig_.args[0].dtype, 0)
        i64 = ir.IntType(64)
        full = builder.and_(builder.icmp_signed("==", miv, ir.Constant(i64, mm)),
                            builder.icmp_signed("==", mjv, ir.Constant(i64, mm)))

        def body(ch, width):
            ty = ir.VectorType(fty, width) if width > 1 else fty
            fma = _fma_for(builder, ty)
            s0 = builder.add(soffv, ch)
            d0 = builder.add(doffv, ch)
            bv = builder.load(_access(builder, ba.data, builder.add(boffv, ch), width, fty), align=isz)
            cache = {}

            def load(i, j):
                if (i, j) not in cache:
                    off = builder.add(s0, builder.mul(esv, ir.Constant(i64, i * a + j)))
                    cache[i, j] = builder.load(_access(builder, sa.data, off, width, fty), align=isz)
                return cache[i, j]

            def store(io, jo, v):
                off = builder.add(d0, builder.add(builder.mul(rsv, ir.Constant(i64, io)),
                                                  builder.mul(csv, ir.Constant(i64, jo))))
                inside = builder.or_(full, builder.and_(builder.icmp_signed(">", miv, ir.Constant(i64, io)),
                                                        builder.icmp_signed(">", mjv, ir.Constant(i64, jo))))
                with builder.if_then(inside, likely=True):
                    builder.store(builder.fadd(v, bv), _access(builder, da.data, off, width, fty), align=isz)

            _emit_2d(builder, fma, ty, at, at, load, store)

        _channel_loop(builder, nchv, lanes, body)
        return context.get_dummy_value()

    return sig, codegen


@serial
def _patch(x, img, y0, x0, h, w, c, a, pt):
    # pt[(i*a + j)*c + ch] = x[img, y0 + i, x0 + j, ch] inside the input, else 0 (a border tile).
    # Runs copied with unsigned offsets (common._gather): with signed ones they stayed scalar
    for i in range(a):
        yy = y0 + i
        for j in range(a):
            xx = x0 + j
            d = (i * a + j) * c
            if 0 <= yy < h and 0 <= xx < w:
                _gather(x, ((img * h + yy) * w + xx) * c, 1, pt, d, c)
            else:
                _zero(pt, d, c)


@serial
def _transform_tile(x, img, y0, x0, h, w, c, m, v, q, ev, pt):
    # V[e][q][:] (at v[e*ev + q*c]) of tile q (patch at input row y0, column x0; any part may lie
    # in the padding)
    a = m + 2
    if 0 <= y0 and y0 + a <= h and 0 <= x0 and x0 + a <= w:
        _tile_in(x, ((img * h + y0) * w + x0) * c, w * c, c, m, v, q, ev)
    else:
        _patch(x, img, y0, x0, h, w, c, a, pt)
        _tile_in(pt, 0, a * c, c, m, v, q, ev)


@serial
def _tile_in(src, soff, rs, c, m, v, q, ev):
    # V[e][q][:] of the NHWC patch at src[soff] (rows rs apart): transform_in with m a constant
    if m == 4:
        transform_in(src, soff, rs, c, v, q * c, ev, c, 4)
    else:
        transform_in(src, soff, rs, c, v, q * c, ev, c, 2)


@serial
def _tile_out(mm, q, k, em, dst, doff, rs, mi, mj, bias, m):
    # the m x m output tile q (its mi x mj inside the output) plus bias into the NHWC dst[doff]
    if m == 4:
        transform_out(mm, q * k, em, dst, doff, rs, k, k, mi, mj, bias, 0, 4)
    else:
        transform_out(mm, q * k, em, dst, doff, rs, k, k, mi, mj, bias, 0, 2)


@serial
def _products(v, mm, pu, tn, ev, em, c, k, g, cg, kg, a2, npan, offs, zeros, tmp, thin):
    # M[e][q][gi*kg + j] = sum_c V[e][q][gi*cg + c] U[gi][e][c][j] for the block's tn tiles (V[e][q]
    # at v[e*ev + q*c], M[e][q] at mm[e*em + q*k]): per
    # element and panel of NR output channels, the MR-row tiles read V's rows in place (the thin
    # tile's 16 x 16 where kg <= 16)
    mr, nr = _tile_of(mm)
    if thin:
        mr, nr = THIN_MR, THIN_NV * _lanes(mm)
    for gi in range(g):
        for e in range(a2):
            for jp in range(npan):
                j0 = jp * nr
                nn = min(nr, kg - j0)
                boff = ((gi * a2 + e) * npan + jp) * cg * nr
                for i0 in range(0, tn, mr):
                    rows = min(mr, tn - i0)
                    for i in range(rows):
                        offs[i] = e * ev + (i0 + i) * c + gi * cg
                    co = e * em + i0 * k + gi * kg + j0
                    full = nn == nr
                    if thin:
                        if full:
                            ukernel_rowptr_thin(cg, v, offs, 0, 0, zeros, pu, boff, mm, co, k, 0, rows)
                        else:
                            ukernel_rowptr_thin(cg, v, offs, 0, 0, zeros, pu, boff, tmp, 0, nr, 0, rows)
                    elif full:
                        ukernel_rowptr(cg, v, offs, 0, 0, zeros, pu, boff, mm, co, k, 0, rows)
                    else:
                        ukernel_rowptr(cg, v, offs, 0, 0, zeros, pu, boff, tmp, 0, nr, 0, rows)
                    if not full:
                        for i in range(rows):
                            for j in range(nn):
                                mm[co + i * k + j] = tmp[i * nr + j]


@serial
def _tiling(n, c, k, g, oh, ow, m, tb):
    # (a*a, c/g, k/g, tiles per column, per row, in the batch, blocks of tb tiles)
    th = (oh + m - 1) // m
    tw = (ow + m - 1) // m
    total = n * th * tw
    return (m + 2) * (m + 2), c // g, k // g, th, tw, total, (total + tb - 1) // tb


# ------------------------------------------------------------------- NCHW arrays, staged per tile row
@serial
def _stage_rows(x, img, y0, h, w, c, rows, wp, pw, st):
    # st[(i*wp + pw + xx)*c + ch] = x[img, ch, y0 + i, xx] of the NCHW array x for i < rows, zero
    # in the padding (rows outside [0, h), columns outside [0, w) of the wp staged): one tile row's
    # patches, read by the transforms as an NHWC image.  L channels at a time, each plane's rows
    # read in order: L streams of contiguous rows (row by row over all channels, 384 short
    # streams per tile row, left 8x64x56x56's reads to memory latency)
    lanes = 32 // x.itemsize
    r0 = max(0, -y0)
    r1 = min(rows, h - y0)
    x0 = max(0, -pw)  # the input columns staged: [x0, x1) (grad_input's padding may be negative)
    x1 = min(w, wp - pw)
    for i in range(rows):
        d0 = i * wp * c
        if r0 <= i < r1:
            for d in range(d0, d0 + (pw + x0) * c):
                st[d] = 0
            for d in range(d0 + (pw + x1) * c, d0 + wp * c):
                st[d] = 0
        else:
            for d in range(d0, d0 + wp * c):
                st[d] = 0
    ch = 0
    while ch < c:
        nb = min(lanes, c - ch)
        for i in range(r0, r1):
            s0 = ((img * c + ch) * h + y0 + i) * w
            d0 = (i * wp + pw) * c + ch
            xx = x0
            if nb == lanes:
                while xx + lanes <= x1:
                    _transpose_block(x, s0 + xx, h * w, st, d0 + xx * c, c)
                    xx += lanes
            for j in range(xx, x1):
                for cc in range(nb):
                    st[d0 + j * c + cc] = x[s0 + cc * h * w + j]
        ch += nb


@serial
def _band_end(row, tlast, tw, th, band):
    # the last tile row staged with `row`: the item's last, the image's last, or band - 1 further
    return min(tlast // tw, (row // th + 1) * th - 1, row + band - 1)


@serial
def _unstage_rows(so, y, row, th, tj0, tj1, m, k, oh, ow, owp):
    # the outputs of tiles tj0 .. tj1 of tile row `row` (image row // th), staged NHWC in so
    # ((i*owp + ox)*k + ch), into the NCHW output y: L channels at a time, each plane's rows
    # written in order
    lanes = 32 // so.itemsize
    img = row // th
    oy0 = (row % th) * m
    ox0 = tj0 * m
    nx = min(ow, (tj1 + 1) * m) - ox0
    ch = 0
    while ch < k:
        nb = min(lanes, k - ch)
        for i in range(min(m, oh - oy0)):
            s0 = (i * owp + ox0) * k + ch
            d0 = ((img * k + ch) * oh + oy0 + i) * ow + ox0
            xx = 0
            if nb == lanes:
                while xx + lanes <= nx:
                    _transpose_block(so, s0 + xx * k, k, y, d0 + xx, oh * ow)
                    xx += lanes
            for j in range(xx, nx):
                for cc in range(nb):
                    y[d0 + cc * oh * ow + j] = so[s0 + j * k + cc]
        ch += nb


@kernel
def forward_fused(x, n, h, w, c, k, g, oh, ow, ph, pw, m, pu, npan, bias, y, tb, ev, em, vbuf, mbuf, pbuf, offbuf,
                  zeros, tbuf, ctr, thin, nchw, band, sbuf, obuf):
    """The forward of ``x`` into ``y`` (flat, C-contiguous; NHWC n x h x w x c into n x oh x ow x k,
    or with ``nchw`` NCHW into NCHW) with F(m x m, 3 x 3): items are blocks of ``tb`` tiles (t =
    (img*th + ti)*tw + tj), claimed by the workers; per item the input transform into the worker's
    V (a*a x tb x c), the a*a products on the micro-kernel against the packed U (``pu``, see
    winograd_fused.pack_u) into its M (a*a x tb x k), then the output transform plus ``bias``
    (``thin``: the products on the THIN tile, U packed in its panels).  Element e's rows of V
    start at ``e*ev``, of M at ``e*em`` (strides chosen by the caller,
    :func:`.winograd_fused.stride`).  Items write disjoint output tiles.

    NHWC: tiles read from x in place (border tiles from a zero-filled patch in ``pbuf``), outputs
    written into y.  NCHW, without whole-array copies: the input rows of up to ``band`` tile rows of
    one image that an item reaches (band*m + 2 rows) are transposed into the worker's ``sbuf``
    ((band*m + 2) x (tw*m + 2) x c, zero in the padding) when its first tile needs them and the
    tiles transformed from there; outputs go into the worker's ``obuf`` (m x tw*m x k) and each run
    of an item's tiles in one tile row is transposed into y.  Both transposes stay in L2
    (8x64x56x56: the two whole-array copies took 1.0 of a 3.5 ms forward)."""
    a2, cg, kg, th, tw, total, items = _tiling(n, c, k, g, oh, ow, m, tb)
    a = m + 2
    wp = tw * m + 2
    owp = tw * m
    nw = vbuf.shape[0]
    for wid in prange(nw):
        v = vbuf[wid]
        mm = mbuf[wid]
        pt = pbuf[wid]
        st = sbuf[wid]
        so = obuf[wid]
        offs = offbuf[wid]
        tmp = tbuf[wid]
        for _ in range(items):
            it = claim(ctr)
            if it >= items:
                break
            t0 = it * tb
            tn = min(tb, total - t0)
            first = 0
            last = -1
            for q in range(tn):
                t = t0 + q
                row = t // tw
                tj = t % tw
                if not nchw:
                    _transform_tile(x, row // th, (row % th) * m - ph, tj * m - pw, h, w, c, m, v, q, ev, pt)
                    continue
                if row > last:
                    first = row
                    last = _band_end(row, t0 + tn - 1, tw, th, band)
                    _stage_rows(x, row // th, (row % th) * m - ph, h, w, c, (last - row) * m + a, wp, pw, st)
                _tile_in(st, ((row - first) * m * wp + tj * m) * c, wp * c, c, m, v, q, ev)
            _products(v, mm, pu, tn, ev, em, c, k, g, cg, kg, a2, npan, offs, zeros, tmp, thin)
            cur = -1
            tj0 = 0
            tj1 = 0
            for q in range(tn):
                t = t0 + q
                row = t // tw
                tj = t % tw
                oy0 = (row % th) * m
                mi, mj = min(m, oh - oy0), min(m, ow - tj * m)
                if not nchw:
                    _tile_out(mm, q, k, em, y, (((row // th) * oh + oy0) * ow + tj * m) * k, ow * k, mi, mj, bias, m)
                    continue
                if row != cur:
                    if cur >= 0:
                        _unstage_rows(so, y, cur, th, tj0, tj1, m, k, oh, ow, owp)
                    cur = row
                    tj0 = tj
                tj1 = tj
                _tile_out(mm, q, k, em, so, tj * m * k, owp * k, mi, mj, bias, m)
            if nchw:
                _unstage_rows(so, y, cur, th, tj0, tj1, m, k, oh, ow, owp)


@serial
def _u_column(w, gm, flip, gi, j0, nn, c, kg, cg, a, a2, npan, jp, nr, pu, ws, ts):
    # pack_u for input channel c of one group's panel of output channels j0 .. j0 + nn.  Indices
    # unsigned (numba's wraparound code for signed ones is in the way of LLVM's vectorising): 2
    # threads, same process, 64x64 / 128x128 / 256x256 weights 0.10 / 0.43 / 2.3 -> 0.08 / 0.34 /
    # 1.9 ms.  What is left is mostly writing U, 4x the weights for F(4x4, 3x3) (9.4 MB for
    # 256x256: 0.93 ms of plain stores on one core)
    nru = _u(nr)
    if flip:  # the taps of output channel j: 9 in a row, from j0*9 on (channel c's block of kg*9)
        src, step, tstep = ((gi * cg + c) * kg + j0) * 9 + 8, 9, -1
    else:  # ... at a stride of cg*9
        src, step, tstep = ((gi * kg + j0) * cg + c) * 9, cg * 9, 1
    for t in range(9):
        d = _u(t * nr)
        st = _u(src + t * tstep)
        for jj in range(_u(nn)):
            ws[d + jj] = w[st + jj * _u(step)]
        for jj in range(nn, nr):
            ws[d + jj] = 0
    for r in range(3):  # along the kernel row: t[r][j] = sum_s G[j, s] g[r][s]
        for j in range(a):
            g0, g1, g2 = gm[j, 0], gm[j, 1], gm[j, 2]
            d = _u((r * a + j) * nr)
            s0 = _u(3 * r * nr)
            for jj in range(nru):
                ts[d + jj] = g0 * ws[s0 + jj] + g1 * ws[s0 + nru + jj] + g2 * ws[s0 + 2 * nru + jj]
    for i in range(a):  # down the kernel column: U[i][j] = sum_r G[i, r] t[r][j]
        g0, g1, g2 = gm[i, 0], gm[i, 1], gm[i, 2]
        for j in range(a):
            base = _u(((((gi * a2 + i * a + j) * npan + jp) * cg) + c) * nr)
            t0 = _u(j * nr)
            t1 = _u((a + j) * nr)
            t2 = _u((2 * a + j) * nr)
            for jj in range(nru):
                pu[base + jj] = g0 * ts[t0 + jj] + g1 * ts[t1 + jj] + g2 * ts[t2 + jj]


@kernel
def pack_u(w, gm, flip, g, kg, cg, npan, pu, wt, tt):
    """U of F(m, 3) (``gm`` its a x 3 matrix G, float64) for every group, element, output channel j
    and input channel c of the problem, computed in float64 and rounded once, straight into the
    products' panels: ``pu[(((gi*a2 + e)*npan + jp)*cg + c)*NR + jj] = (G g G^T)[e]`` of output
    channel ``jp*NR + jj`` (zero past kg).  The taps g: ``w[((gi*kg + j)*cg + c)*9 + t]``, or with
    ``flip`` (grad_input's kernel, read from the layer's weight of shape (g*cg, kg, 3, 3)) the flipped
    ``w[((gi*cg + c)*kg + j)*9 + 8 - t]``.  Items (group, panel, input channel) write disjoint runs;
    the loops over a panel's NR channels are contiguous and vectorise.  ``wt`` (workers x 9*NR) and
    ``tt`` (workers x 3*a*NR) float64 scratch."""
    a = gm.shape[0]
    a2 = a * a
    nr = wt.shape[1] // 9
    cb = 16  # input channels per item: a worker reads each weight's taps as one run
    ncb = (cg + cb - 1) // cb
    items = g * npan * ncb
    nw = wt.shape[0]
    for wid in prange(nw):
        ws = wt[wid]
        ts = tt[wid]
        for it in range(wid, items, nw):
            jp = (it // ncb) % npan
            gi = it // (ncb * npan)
            j0 = jp * nr
            nn = min(nr, kg - j0)
            for c in range((it % ncb) * cb, min(cg, (it % ncb + 1) * cb)):
                _u_column(w, gm, flip, gi, j0, nn, c, kg, cg, a, a2, npan, jp, nr, pu, ws, ts)


@serial
def _gy_tile(gy, img, oy0, ox0, oh, ow, k, m, wg, q, ew, gp):
    # Wg[e][q][:] (at wg[e*ew + q*k]) = (A g A^T)[e] of output tile q (outputs from oy0, ox0; zero
    # beyond the output)
    if oy0 + m <= oh and ox0 + m <= ow:
        src, soff, rs = gy, ((img * oh + oy0) * ow + ox0) * k, ow * k
    else:
        for i in range(m):
            for j in range(m):
                d = (i * m + j) * k
                if oy0 + i < oh and ox0 + j < ow:
                    _gather(gy, ((img * oh + oy0 + i) * ow + ox0 + j) * k, 1, gp, d, k)
                else:
                    _zero(gp, d, k)
        src, soff, rs = gp, 0, m * k
    _tile_gy(src, soff, rs, k, m, wg, q, ew)


@serial
def _tile_gy(src, soff, rs, k, m, wg, q, ew):
    # Wg[e][q][:] of the NHWC m x m gy tile at src[soff] (rows rs apart): transform_gy with m a
    # constant
    if m == 4:
        transform_gy(src, soff, rs, k, wg, q * k, ew, k, 4)
    else:
        transform_gy(src, soff, rs, k, wg, q * k, ew, k, 2)


@serial
def _sums(wg, v, sm, tn, ev, ew, c, k, g, cg, kg, a2, tmp, thin):
    # Mw[e][gi*kg + i][j] += sum_q Wg[e][q][gi*kg + i] V[e][q][gi*cg + j] over the block's tn tiles:
    # MR output channels by NR input channels per micro-kernel call, both operands read in place
    # (the thin tile's 16 x 16 where cg <= 16)
    mr, nr = _tile_of(sm)
    if thin:
        mr, nr = THIN_MR, THIN_NV * _lanes(sm)
    for gi in range(g):
        for e in range(a2):
            for j0 in range(0, cg, nr):
                nn = min(nr, cg - j0)
                for i0 in range(0, kg, mr):
                    rows = min(mr, kg - i0)
                    ao = e * ew + gi * kg + i0
                    bo = e * ev + gi * cg + j0
                    co = (e * k + gi * kg + i0) * cg + j0
                    if nn == nr:
                        if thin:
                            ukernel_strided_thin(tn, wg, ao, k, v, bo, c, sm, co, cg, 1, rows)
                        else:
                            ukernel_strided(tn, wg, ao, k, v, bo, c, sm, co, cg, 1, rows)
                    else:  # the last columns: the tile into tmp, its nn real columns added
                        if thin:
                            ukernel_strided_thin(tn, wg, ao, k, v, bo, c, tmp, 0, nr, 0, rows)
                        else:
                            ukernel_strided(tn, wg, ao, k, v, bo, c, tmp, 0, nr, 0, rows)
                        for i in range(rows):
                            for j in range(nn):
                                sm[co + i * cg + j] += tmp[i * nr + j]


@kernel
def grad_weight_fused(x, gy, n, h, w, c, k, g, oh, ow, ph, pw, m, tb, ev, ew, vbuf, wbuf, pbuf, gbuf, sums, tbuf,
                      thin, nchw, band, sbuf):
    """grad_weight's sums ``Mw[e] (k x cg per group) = sum_tiles Wg[e]^T V[e]`` with F(m x m, 3 x 3)
    from the input ``x`` and output gradient ``gy`` (flat, C-contiguous, both NHWC or with ``nchw``
    both NCHW): items are blocks of ``tb`` tiles, worker ``wid`` takes items wid, wid + workers,
    ... (fixed shares: each worker's sums, in ``sums[wid]`` (a*a*k*cg, zeroed by the caller), add
    the same tiles in the same order on every call); per item the input transform into V (a*a x
    tb x c, as the forward, element e at ``e*ev``), the transform of gy's tiles into Wg (a*a x tb
    x k, element e at ``e*ew``) and the a*a products added into the worker's sums (``thin``: on
    the THIN tile).  NHWC: tiles read in place (border tiles through the patches ``pbuf`` and
    ``gbuf``).  NCHW: per band of up to ``band`` tile rows an item reaches, their input rows into
    the worker's ``sbuf`` (as :func:`forward_fused`) and their rows of gy into ``gbuf`` (band*m x
    tw*m x k, zero past the output), transposed in L2, the tiles transformed from there."""
    a2, cg, kg, th, tw, total, items = _tiling(n, c, k, g, oh, ow, m, tb)
    a = m + 2
    wp = tw * m + 2
    owp = tw * m
    nw = vbuf.shape[0]
    for wid in prange(nw):
        v = vbuf[wid]
        wg = wbuf[wid]
        pt = pbuf[wid]
        st = sbuf[wid]
        gp = gbuf[wid]
        sm = sums[wid]
        tmp = tbuf[wid]
        for it in range(wid, items, nw):
            t0 = it * tb
            tn = min(tb, total - t0)
            first = 0
            last = -1
            for q in range(tn):
                t = t0 + q
                row = t // tw
                tj = t % tw
                img = row // th
                oy0 = (row % th) * m
                if not nchw:
                    _transform_tile(x, img, oy0 - ph, tj * m - pw, h, w, c, m, v, q, ev, pt)
                    _gy_tile(gy, img, oy0, tj * m, oh, ow, k, m, wg, q, ew, gp)
                    continue
                if row > last:
                    first = row
                    last = _band_end(row, t0 + tn - 1, tw, th, band)
                    _stage_rows(x, img, oy0 - ph, h, w, c, (last - row) * m + a, wp, pw, st)
                    _stage_rows(gy, img, oy0, oh, ow, k, (last - row + 1) * m, owp, 0, gp)
                _tile_in(st, ((row - first) * m * wp + tj * m) * c, wp * c, c, m, v, q, ev)
                _tile_gy(gp, ((row - first) * m * owp + tj * m) * k, owp * k, k, m, wg, q, ew)
            _sums(wg, v, sm, tn, ev, ew, c, k, g, cg, kg, a2, tmp, thin)
