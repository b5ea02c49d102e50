"""The numba kernels of the channels_last (NHWC) convolution passes (see
:mod:`fastconv._algorithms.nhwc` for the method and the notation) and the layout conversions.

The GEMM kernels take flat C-contiguous arrays: the input ``x[((n*h + iy)*w + ix)*c + ch]``, the
output ``y[pos*k + kk]`` with ``pos = (n*oh + oy)*ow + ox``, taps ordered ``t = (rr*s + ss)*cg + cc``
(the order in which one output position's taps lie in an NHWC input: runs of cg contiguous
channels) -- the forward's weights packed in NR-column panels over those taps
(:func:`pack_weights`), col2im's as ``wg[g][kk, t]``.  The depthwise loops take (positions,
channels) 2-D arrays (see their comment).

(numba does not see an edit to the GEMM helpers inlined from ``_gemm_kernels.py``: clear this
file's ``__pycache__/*.nbi`` after one, or run ``python -m fastconv doctor --clear-cache``.)
"""
import functools

import numpy as np
from llvmlite import ir
from numba import prange, types
from numba.extending import intrinsic
from numba.np.arrayobj import make_array

from .._jit import entry, kernel, micro, serial
from ._blas import _N, _T as _TR, _chars, _gemm
from ._gemm_kernels import VBYTES, _vector_tools
from ._implicit_kernels import prefetch
from .common import claim
from .gemm import _copy_nr, _macro, _pack_a, _tile_of, ukernel_rowptr, ukernel_segments, ukernel_taps

_u = np.uint64

# a plane transpose walks tiles of this many elements of an axis
_T = 64


def _shuffle(builder, a, b, lanes):
    return builder.shuffle_vector(a, b, ir.Constant(ir.VectorType(ir.IntType(32), len(lanes)), lanes))


@intrinsic
def _transpose_block(typingctx, src, soff, ls, dst, doff, ld):
    """``dst[doff + j*ld + i] = src[soff + i*ls + j]`` for i, j < L, L the lanes of a 32-byte vector
    (8 of a 4-byte dtype, 4 of an 8-byte one, moved as integers: bit for bit): L vector loads, the
    transpose in registers (log2(L) rounds of shuffles, which LLVM lowers to the unpack/shuffle/
    permute instructions of the CPU's ISA), L vector stores."""
    if not (isinstance(src, types.Array) and isinstance(dst, types.Array) and src.dtype == dst.dtype
            and src.layout == "C" and dst.layout == "C" and getattr(src.dtype, "bitwidth", 0) in (32, 64)):
        return None
    sig = types.void(src, types.intp, types.intp, dst, types.intp, types.intp)

    def codegen(context, builder, sig_, args):
        s = make_array(sig_.args[0])(context, builder, args[0])
        d = make_array(sig_.args[3])(context, builder, args[3])
        isz = sig_.args[0].dtype.bitwidth // 8
        lanes = 32 // isz
        pty = ir.VectorType(ir.IntType(8 * isz), lanes).as_pointer()

        def at(base, off, step, i):
            o = builder.add(off, builder.mul(step, ir.Constant(step.type, i)))
            return builder.bitcast(builder.gep(base, [o]), pty)

        v = [builder.load(at(s.data, args[1], args[2], i), align=isz) for i in range(lanes)]
        sh = functools.partial(_shuffle, builder)
        if lanes == 8:
            # rows (2i, 2i+1) interleaved by pairs of lanes, then by quads, then halves
            t = []
            for i in range(0, 8, 2):
                t += [sh(v[i], v[i + 1], [0, 8, 1, 9, 4, 12, 5, 13]), sh(v[i], v[i + 1], [2, 10, 3, 11, 6, 14, 7, 15])]
            lo, hi = [0, 1, 8, 9, 4, 5, 12, 13], [2, 3, 10, 11, 6, 7, 14, 15]
            q = [sh(t[0], t[2], lo), sh(t[0], t[2], hi), sh(t[1], t[3], lo), sh(t[1], t[3], hi),
                 sh(t[4], t[6], lo), sh(t[4], t[6], hi), sh(t[5], t[7], lo), sh(t[5], t[7], hi)]
            first, last = [0, 1, 2, 3, 8, 9, 10, 11], [4, 5, 6, 7, 12, 13, 14, 15]
            r = [sh(q[i], q[i + 4], first) for i in range(4)] + [sh(q[i], q[i + 4], last) for i in range(4)]
        else:
            t = [sh(v[0], v[1], [0, 4, 2, 6]), sh(v[0], v[1], [1, 5, 3, 7]),
                 sh(v[2], v[3], [0, 4, 2, 6]), sh(v[2], v[3], [1, 5, 3, 7])]
            r = [sh(t[0], t[2], [0, 1, 4, 5]), sh(t[1], t[3], [0, 1, 4, 5]),
                 sh(t[0], t[2], [2, 3, 6, 7]), sh(t[1], t[3], [2, 3, 6, 7])]
        for j in range(lanes):
            builder.store(r[j], at(d.data, args[4], args[5], j), align=isz)
        return context.get_dummy_value()

    return sig, codegen


@kernel
def transpose_planes(src, dst):
    """``dst[i, b, a] = src[i, a, b]`` for C-contiguous (n, A, B) ``src`` and (n, B, A) ``dst``.
    Both axes at least one vector's lanes long: tiles of _T x _T, transposed in L x L blocks in
    registers (:func:`_transpose_block`; the element loop stored one element per 64-byte line and
    ran at 1/3-1/5 of a copy's speed: 4x16x128x128 float32 0.63 -> 0.17 ms, a copy 0.13).  A
    shorter axis (a stem's 3 channels): tiles of the longer one, the inner loop along it, so the
    strided side steps by the shorter (the other order, NCHW planes of 128x128 read 32 rows at a
    time 64 KiB apart, hit one L1 set and took 4.4 ms for 4x32x128x128 instead of ~1)."""
    n, na, nb = src.shape
    lanes = 32 // src.itemsize  # 4- and 8-byte dtypes only (:func:`_transpose_block`)
    if min(na, nb) >= lanes:
        fs = src.reshape(src.size)
        fd = dst.reshape(dst.size)
        ta = (na + _T - 1) // _T
        tb = (nb + _T - 1) // _T
        for it in prange(n * ta * tb):
            i = it // (ta * tb)
            rest = it - i * ta * tb
            a0 = (rest // tb) * _T
            b0 = (rest % tb) * _T
            a1 = min(na, a0 + _T)
            b1 = min(nb, b0 + _T)
            s0 = i * na * nb
            a = a0
            while a + lanes <= a1:
                b = b0
                while b + lanes <= b1:
                    _transpose_block(fs, s0 + a * nb + b, nb, fd, s0 + b * na + a, na)
                    b += lanes
                for bb in range(b, b1):
                    for aa in range(a, a + lanes):
                        fd[s0 + bb * na + aa] = fs[s0 + aa * nb + bb]
                a += lanes
            for aa in range(a, a1):
                for bb in range(b0, b1):
                    fd[s0 + bb * na + aa] = fs[s0 + aa * nb + bb]
    elif na <= nb:
        tb = (nb + _T - 1) // _T
        for it in prange(n * tb):
            i = it // tb
            b0 = (it % tb) * _T
            b1 = min(nb, b0 + _T)
            for a in range(na):
                for b in range(b0, b1):
                    dst[i, b, a] = src[i, a, b]
    else:
        ta = (na + _T - 1) // _T
        for it in prange(n * ta):
            i = it // ta
            a0 = (it % ta) * _T
            a1 = min(na, a0 + _T)
            for b in range(nb):
                for a in range(a0, a1):
                    dst[i, b, a] = src[i, a, b]


@serial
def _position(pos, plane, ow, sh, sw, ph, pw):
    # (image, top row, left column) of output position pos's window: its tap (0, 0) in the input,
    # possibly in the padding
    img = pos // plane
    rem = pos - img * plane
    oy = rem // ow
    return img, oy * sh - ph, (rem - oy * ow) * sw - pw


@serial
def _gather_b(x, h, w, cin, c0, cg, oh, ow, sh, sw, ph, pw, dh, dw, s, p0, kb, j0, nb, pb, pboff, nr):
    # the GEMM's packed B (pb[pboff + jb*kb + p*nr + jj] = B[p0 + p, j0 + jb + jj], columns past nb
    # zero) with B = the column matrix of grad_weight: row p is output position p0 + p, column j a
    # tap.  Positions are decoded once, then panel by panel (its taps fixed) the rows are copied
    # in order -- as NR-vectors where one channel run covers the panel row.  (Decoding taps per
    # position and panel, two integer divisions each, took as long as the products.)
    plane = oh * ow
    iy0 = np.empty(kb, np.int64)
    ix0 = np.empty(kb, np.int64)
    base = np.empty(kb, np.int64)
    seg = np.empty((5, nr + 1), np.int64)  # a panel row's channel runs: row, column, channel, offset, length
    for p in range(kb):
        img, iy0[p], ix0[p] = _position(p0 + p, plane, ow, sh, sw, ph, pw)
        base[p] = img * h * w * cin + c0
    for jb in range(0, nb, nr):
        nn = min(nr, nb - jb)
        d0 = pboff + jb * kb
        t = (j0 + jb) // cg
        cc = j0 + jb - t * cg
        if nn == nr and cc + nr <= cg:  # every row of the panel is one channel run: vectors
            rr = t // s
            ry = rr * dh
            rx = (t - rr * s) * dw
            for p in range(kb):
                iy = iy0[p] + ry
                ix = ix0[p] + rx
                d = d0 + p * nr
                if 0 <= iy < h and 0 <= ix < w:
                    _copy_nr(pb, d, x, base[p] + (iy * w + ix) * cin + cc)
                else:
                    for q in range(nr):
                        pb[d + q] = 0
            continue
        # the panel row's channel runs are the same for every position: listed once (a division
        # per run and position, and signed offsets that kept the run copies scalar, made the
        # gather most of a 16-channel layer's grad_weight: 32x16x28x28 -> 32 at stride 2, 0.75 ms)
        nseg = 0
        tt = t
        c1 = cc
        jj = 0
        while jj < nn:
            rr = tt // s
            run = min(cg - c1, nn - jj)
            seg[0, nseg], seg[1, nseg], seg[2, nseg] = rr * dh, (tt - rr * s) * dw, c1
            seg[3, nseg], seg[4, nseg] = jj, run
            nseg += 1
            jj += run
            c1 = 0
            tt += 1
        for p in range(kb):
            d = d0 + p * nr
            for sg in range(nseg):
                iy = iy0[p] + seg[0, sg]
                ix = ix0[p] + seg[1, sg]
                dd = _u(d + seg[3, sg])
                ln = _u(seg[4, sg])
                if 0 <= iy < h and 0 <= ix < w:
                    src = _u(base[p] + (iy * w + ix) * cin + seg[2, sg])
                    for q in range(ln):
                        pb[dd + q] = x[src + q]
                else:
                    for q in range(ln):
                        pb[dd + q] = 0
            for q in range(nn, nr):
                pb[d + q] = 0


@kernel
def grad_weight(gy, x, h, w, cin, oh, ow, sh, sw, ph, pw, dh, dw, s, g, cg, kg, m, part, per, wbuf, blk, bm,
                bn, ctr):
    """``part[q][g][j, t] = sum_pos gy[pos, g*kg + j] * A_g[pos, t]`` over the positions of split q
    (``q*per ..``; part (S, g, kg, tn), taps last); the caller adds the S splits in order.

    Items (split, group, block of bm output channels, block of bn taps) own disjoint blocks of
    part; per cache block of positions the taps are gathered into the packed B panel and gy's block
    is packed as A.  The splits make the reduction over positions parallel without re-packing gy
    for every block of taps (a block of 64 taps per item packed all of gy four times over for
    resnet50-1x1-256); their count depends on m only, so the bits do not depend on the threads."""
    kc, mc, nc = blk[0], blk[1], blk[2]
    mr, nr = _tile_of(part)
    ns = part.shape[0]
    tn = part.shape[3]
    kt = g * kg
    pboff = mc * kc
    tmpoff = mc * kc + kc * nc
    ni = (kg + bm - 1) // bm
    nj = (tn + bn - 1) // bn
    items = ns * g * ni * nj
    nw = wbuf.shape[0]
    flat = part.reshape(part.size)
    for wid in prange(nw):
        ws = wbuf[wid]
        for _ in range(items):
            it = claim(ctr)
            if it >= items:
                break
            q = it // (g * ni * nj)
            rest = it - q * g * ni * nj
            gi = rest // (ni * nj)
            rest = rest - gi * ni * nj
            i0 = (rest // nj) * bm
            j0 = (rest % nj) * bn
            mi = min(bm, kg - i0)
            nj_ = min(bn, tn - j0)
            p0 = q * per
            p1 = min(m, p0 + per)
            base = (q * g + gi) * kg * tn
            for jc in range(j0, j0 + nj_, nc):
                nb = min(nc, j0 + nj_ - jc)
                for pc in range(p0, p1, kc):
                    kb = min(kc, p1 - pc)
                    _gather_b(x, h, w, cin, gi * cg, cg, oh, ow, sh, sw, ph, pw, dh, dw, s, pc, kb, jc, nb,
                              ws, pboff, nr)
                    for ic in range(i0, i0 + mi, mc):
                        mb = min(mc, i0 + mi - ic)
                        # A = gy's columns transposed: A[i, p] = gy[(pc + p)*kt + gi*kg + ic + i]
                        _pack_a(gy, gi * kg, 1, kt, ic, mb, pc, kb, ws, 0, mr)
                        _macro(kb, mb, nb, ws, 0, ws, pboff, tmpoff, flat, base + ic * tn + jc, tn,
                               1 if pc > p0 else 0)


@kernel
def grad_weight_taps(gy, x, h, w, cin, oh, ow, sh, sw, ph, pw, dh, dw, r, s, g, cg, kg, m, part, per, nsub,
                     segbuf, ctr):
    """``part[q][g][t][cc, j] = sum_pos x_g[pos + tap t, cc] * gy[pos, g*kg + j]`` over the
    positions of split q (``q*per ..``; part (S, g, r*s, cg, kg)): per tap, a product of the input's
    channels at the shifted positions and the output gradient's, both read in place
    (``ukernel_segments``: one tile of MR input channels x NR output channels in registers over all
    the split's positions, one segment per output row whose tap lies inside the input).  No packing
    and no gathered column matrix; kg must be a multiple of NR.  Items (split, group, tap, one of
    ``nsub`` runs of its (channel tile, panel) pairs) own disjoint blocks of part: the tap's segments
    are listed once per item (then moved by each tile's channel and panel offsets), and the split's
    rows of x and gy are still in L1/L2 from the previous tile (items of single tiles listed the
    segments anew each).  Every tile is one call over the same segments whatever the items: the bits
    do not depend on ``nsub`` or the threads.  The caller adds the S splits in order."""
    mr, nr = _tile_of(part)
    ns = part.shape[0]
    taps = r * s
    kt = g * kg
    plane = oh * ow
    npan = kg // nr
    pairs = (cg + mr - 1) // mr * npan
    per_sub = (pairs + nsub - 1) // nsub
    items = ns * g * taps * nsub
    nw = segbuf.shape[0]
    flat = part.reshape(part.size)
    for wid in prange(nw):
        segs = segbuf[wid]
        for _ in range(items):
            it = claim(ctr)
            if it >= items:
                break
            sub = it % nsub
            rest = it // nsub
            t = rest % taps
            rest //= taps
            gi = rest % g
            q = rest // g
            rr = t // s
            ss = t - rr * s
            nseg = _tap_segments(segs, q * per, min(m, q * per + per), plane, ow, sh, sw, ph, pw, h, w,
                                 rr * dh, ss * dw, cin, gi * cg, kt, gi * kg)
            da = 0  # the segments' current channel and panel offsets
            db = 0
            for u in range(sub * per_sub, min(pairs, (sub + 1) * per_sub)):
                cc0 = (u // npan) * mr
                j0 = (u % npan) * nr
                for e in range(nseg):
                    segs[3 * e] += cc0 - da
                    segs[3 * e + 1] += j0 - db
                da = cc0
                db = j0
                coff = (((q * g + gi) * taps + t) * cg + cc0) * kg + j0
                ukernel_segments(nseg, segs, 0, x, sw * cin, gy, kt, flat, coff, kg, 0, min(mr, cg - cc0))


@serial
def _tap_segments(segs, p0, p1, plane, ow, sh, sw, ph, pw, h, w, ry, rx, cin, c0, kt, j0):
    # grad_weight_taps' segments for positions p0 .. p1-1 and the tap at offset (ry, rx): per output
    # row, its positions whose tap lies inside the input, as (x offset, gy offset, count)
    nseg = 0
    pos = p0
    lo_x = 0 if pw - rx <= 0 else (pw - rx + sw - 1) // sw  # first output column reading ix >= 0
    hi_x = (w - 1 + pw - rx) // sw + 1  # one past the last reading ix <= w - 1
    while pos < p1:
        img = pos // plane
        rem = pos - img * plane
        oy = rem // ow
        ox0 = rem - oy * ow
        ox1 = min(ow, ox0 + (p1 - pos))
        iy = oy * sh - ph + ry
        if 0 <= iy < h:
            lo = max(ox0, lo_x)
            hi = min(ox1, hi_x)
            if hi > lo:
                segs[3 * nseg] = ((img * h + iy) * w + lo * sw - pw + rx) * cin + c0
                segs[3 * nseg + 1] = (img * plane + oy * ow + lo) * kt + j0
                segs[3 * nseg + 2] = hi - lo
                nseg += 1
        pos += ox1 - ox0
    return nseg


@kernel
def grad_input_col2im(gy, pbw, h, w, cin, oh, ow, sh, sw, ph, pw, dh, dw, r, s, g, cg, kg, n, gx, offbuf,
                      tbuf, zeros, bm, ldt, ctr):
    """``gx = col2im(gy . w)`` per (image, group): a block of bm positions' column rows
    ``col[pos, t] = sum_j gy[pos, g*kg + j] * wg[g][j, t]`` into the worker's tile (row pitch
    ``ldt``, whole NR panels), then added tap run by tap run into the input positions it came from.
    The product reads gy's rows in place (``ukernel_rowptr``) against the weights packed once per
    call into NR-column panels over the taps (``pbw``, :func:`.nhwc.grad_input`), where a packed
    GEMM per block repacked both.  Items own whole (image, group) slices of gx (zeroed here), so the
    scatter's sums never race and run in one order."""
    mr, nr = _tile_of(gx)
    kt = g * kg
    plane = oh * ow
    npan = ldt // nr
    items = n * g
    nw = tbuf.shape[0]
    for wid in prange(nw):
        tile = tbuf[wid]
        offs = offbuf[wid]
        for _ in range(items):
            it = claim(ctr)
            if it >= items:
                break
            img = it // g
            gi = it - img * g
            c0 = gi * cg
            if cg == cin:  # one group: the image's slice is contiguous
                gx[img * h * w * cin:(img + 1) * h * w * cin] = 0
            else:
                for iy in range(h):
                    for ix in range(w):
                        o = _u(((img * h + iy) * w + ix) * cin + c0)
                        for cc in range(_u(cg)):
                            gx[o + cc] = 0
            for q0 in range(0, plane, bm):
                mb = min(bm, plane - q0)
                for i in range(mb):
                    offs[i] = (img * plane + q0 + i) * kt + gi * kg
                for jp in range(npan):
                    boff = (gi * npan + jp) * kg * nr
                    for i in range(0, mb, mr):
                        ukernel_rowptr(kg, gy, offs, i, 0, zeros, pbw, boff, tile, i * ldt + jp * nr, ldt, 0,
                                       min(mr, mb - i))
                for i in range(mb):
                    # the taps inside the input as ranges, offsets unsigned: a bounds test per tap
                    # and signed indices left the cg-lane adds scalar (32x16x28x28 -> 32 at stride
                    # 2: the scatter 0.33 -> 0.13 ms)
                    _, iy0, ix0 = _position(q0 + i, plane, ow, sh, sw, ph, pw)
                    r0 = 0 if iy0 >= 0 else (dh - 1 - iy0) // dh
                    r1 = min(r, (h - iy0 + dh - 1) // dh)
                    s0 = 0 if ix0 >= 0 else (dw - 1 - ix0) // dw
                    s1 = min(s, (w - ix0 + dw - 1) // dw)
                    for rr in range(r0, r1):
                        orow = ((img * h + iy0 + rr * dh) * w + ix0) * cin + c0
                        srow = i * ldt + rr * s * cg
                        for ss in range(s0, s1):
                            o = _u(orow + ss * dw * cin)
                            src = _u(srow + ss * cg)
                            for cc in range(_u(cg)):
                                gx[o + cc] += tile[src + cc]


# ---------------------------------------------------------------------------------------- in place
@kernel
def pack_weights(w, g, kg, cg, r, s, pb, nr, bad, flipped):
    """The weights (k, cg, r, s) as NR-column panels over taps t = (rr*s + ss)*cg + cc:
    ``pb[((gi*npan + jp)*tn + t)*nr + jj] = w[gi*kg + jp*nr + jj, cc, rr, ss]``, zero past kg;
    ``bad[gi*npan + jp]`` = 1 where that panel holds a non-finite weight (a finiteness check for
    free: a separate ``np.isfinite(w).all()`` took 2-3 ms of 9.4 MB).  Channel by channel: each
    weight row's r*s taps are read together and each panel row (nr outputs of one tap) written
    together (jj outermost wrote one element per 64-byte line: 2.8 ms for 512x512x3x3).

    With ``flipped``, the transposed convolution's kernel (``common.transposed_weight``: flipped,
    in/out channels swapped per group) read straight from the forward's weights ``w`` (g*cg, kg,
    r, s) -- kg and cg being the transposed convolution's: ``pb[...] = w[gi*cg + cc, jp*nr + jj,
    r-1-rr, s-1-ss]``, one channel cc of a panel reading nr*r*s contiguous weights (flipping and
    swapping first cost a 9.4 MB copy, 2 ms for 512x512x3x3)."""
    npan = (kg + nr - 1) // nr
    for it in prange(g * npan):
        _pack_weight_panel(w, g, kg, cg, r, s, pb, nr, bad, flipped, it)


@entry
def pack_weights_serial(w, g, kg, cg, r, s, pb, nr, bad, flipped):
    """:func:`pack_weights` on the calling thread, for small weights (no parallel region to launch)."""
    npan = (kg + nr - 1) // nr
    for it in range(g * npan):
        _pack_weight_panel(w, g, kg, cg, r, s, pb, nr, bad, flipped, it)


@micro
def _pack_weight_panel(w, g, kg, cg, r, s, pb, nr, bad, flipped, it):
    # panel it = gi*npan + jp of pack_weights
    tn = r * s * cg
    rs = r * s
    npan = (kg + nr - 1) // nr
    sj, st = (rs, -1) if flipped else (tn, 1)  # steps of the source index per output, per tap
    gi = it // npan
    jp = it - gi * npan
    d0 = it * tn * nr
    nn = min(nr, kg - jp * nr)
    for cc in range(cg):
        if flipped:
            src0 = ((gi * cg + cc) * kg + jp * nr) * rs + rs - 1
        else:
            src0 = (gi * kg + jp * nr) * tn + cc * rs
        for t in range(rs):
            d = _u(d0 + (t * cg + cc) * nr)
            s0 = src0 + t * st
            for jj in range(_u(nn)):
                pb[d + jj] = w[_u(s0 + jj * sj)]
            for jj in range(nn, nr):
                pb[d + jj] = 0
    # stays 0 unless a weight is inf or NaN: a pass over the packed panel, which LLVM vectorises
    # (summed in the gather above, a chain of dependent adds took 4 cycles a weight: 64x32x3x3
    # packed in 21 us)
    probe = w[0] * 0
    for e in range(_u(d0), _u(d0 + tn * nr)):
        probe += pb[e] * 0
    bad[it] = 0 if probe == 0 else 1


@serial
def _tile(kb, a, offs, ioff, toff, zeros, pbw, boff, c, co, ldc, acc, rows, nn, tmp, nr):
    # one ukernel_rowptr tile into c (row pitch ldc); a panel of nn < nr real columns through tmp
    if nn == nr:
        ukernel_rowptr(kb, a, offs, ioff, toff, zeros, pbw, boff, c, co, ldc, acc, rows)
        return
    ukernel_rowptr(kb, a, offs, ioff, toff, zeros, pbw, boff, tmp, 0, nr, 0, rows)
    for ii in range(rows):
        for jj in range(nn):
            if acc:
                c[co + ii * ldc + jj] += tmp[ii * nr + jj]
            else:
                c[co + ii * ldc + jj] = tmp[ii * nr + jj]


@serial
def _tile_taps(kb, a, offs, ioff, ldo, tlo, nt, zeros, pbw, boff, c, co, ldc, rows, nn, tmp, nr):
    # one ukernel_taps tile (the listed taps at offs[tlo:tlo + nt]) written into c (row pitch ldc);
    # a panel of nn < nr real columns through tmp.  One call site: each inlines MR tile variants
    # (~3 s of compile per dtype)
    full = nn == nr
    ukernel_taps(kb, a, offs, ioff, ldo, offs, tlo, nt, 0, zeros, pbw, boff, c if full else tmp, co if full else 0,
                 ldc if full else nr, 0, rows)
    if full:
        return
    for ii in range(rows):
        for jj in range(nn):
            c[co + ii * ldc + jj] = tmp[ii * nr + jj]


@serial
def _all_taps(x, offs, bm, mb, i0, h, w, cin, dh, dw, r, s, gi, cg, kg, kt, npan, jp0, jp1, tn, zeros, pbw, y, tmp, mr,
              nr):
    # the item's tiles with every tap in one micro-kernel call each (ukernel_taps; cg <= kc, so a
    # tap is one channel block), written into y: the rows of tap t at offs[4bm + t*bm ...], the
    # tap list (all of them, padding rows reading zeros) at offs[(4 + r*s)*bm ...]
    ntap = r * s
    tr = 4 * bm
    tl = tr + ntap * bm
    for t in range(ntap):
        rr = t // s
        _tap_rows(offs, bm, mb, rr, t - rr * s, h, w, dh, dw, cin, gi * cg, tr + t * bm)
        offs[tl + t] = t
    for jp in range(jp0, jp1):  # a panel's weights for all taps (r*s*cg x nr) stay in L1/L2 across the tiles
        j0 = jp * nr
        boff = (gi * npan * tn + jp * tn) * nr
        for i in range(0, mb, mr):
            _tile_taps(cg, x, offs, tr + i, bm, tl, ntap, zeros, pbw, boff, y, (i0 + i) * kt + gi * kg + j0, kt,
                       min(mr, mb - i), min(nr, kg - j0), tmp, nr)


@serial
def _row_tiles(kb, a, offs, obase, toff, zeros, pbw, bbase, tn, jp0, jp1, y, i0, mb, kt, ycol, kg, tmp, acc, mr, nr):
    # C[i0 .. i0+mb, ycol + jp0*nr .. ycol + min(kg, jp1*nr)] (+)= the item's rows (ukernel_rowptr:
    # offs[obase + i] + toff) . the packed weights' kb-row block at bbase of panels jp0 .. jp1 - 1;
    # panels past kg through tmp
    for jp in range(jp0, jp1):
        j0 = jp * nr
        nn = min(nr, kg - j0)
        boff = bbase + jp * tn * nr
        for i in range(0, mb, mr):
            if jp == jp0:  # the next tile's rows, on their first use (8x256x56x56 1x1: 6.1-6.6 -> 5.5 ms)
                for ii in range(i + mr, min(mb, i + 2 * mr)):
                    o = offs[obase + ii]
                    if o >= 0:
                        for q in range(0, kb, 16):
                            prefetch(a, o + toff + q)
            _tile(kb, a, offs, obase + i, toff, zeros, pbw, boff, y, (i0 + i) * kt + ycol + j0, kt, acc,
                  min(mr, mb - i), nn, tmp, nr)


@serial
def _add_bias(y, bias, i0, mb, kt, c0, j0, j1):
    # columns c0 + j0 .. c0 + j1 of the item's rows
    for i in range(mb):
        o = (i0 + i) * kt + c0
        for j in range(j0, j1):
            y[o + j] += bias[c0 + j]


@serial
def _tap_rows(offs, bm, mb, rr, ss, h, w, dh, dw, cin, c0, dst):
    # offs[dst + i]: row i's tap (rr, ss) in the input (channel c0), -1 in the padding.  No branch
    # (a select; LLVM vectorises the loop): with a branch per row and tap, the offsets of 3x3 taps
    # cost about as much as the products of 16-channel layers
    dy = rr * dh
    dx = ss * dw
    for i in range(_u(mb)):  # unsigned indices: no wraparound code in the way of vectorising
        iy = offs[_u(bm) + i] + dy
        ix = offs[_u(2 * bm) + i] + dx
        inside = (iy >= 0) & (iy < h) & (ix >= 0) & (ix < w)
        v = ((offs[i] * h + iy) * w + ix) * cin + c0
        offs[_u(dst) + i] = v if inside else -1


@serial
def _positions(offs, bm, mb, pos0, plane, ow, sh, sw, ph, pw):
    # offs[i], offs[bm + i], offs[2bm + i] = _position(pos0 + i, ...) for i < mb, stepping along
    # the output rows (two divisions per position cost as much as a 16-channel tile's products)
    img, top, left = _position(pos0, plane, ow, sh, sw, ph, pw)
    rem = pos0 - img * plane
    oy = rem // ow
    ox = rem - oy * ow
    for i in range(mb):
        offs[i] = img
        offs[bm + i] = top
        offs[2 * bm + i] = left
        ox += 1
        left += sw
        if ox == ow:
            ox = 0
            left = -pw
            oy += 1
            top += sh
            if oy == plane // ow:
                oy = 0
                top = -ph
                img += 1


@kernel
def forward_rows(x, h, w, cin, oh, ow, sh, sw, ph, pw, dh, dw, r, s, g, cg, kg, pbw, bias, has_bias, y, m,
                 wbuf, offbuf, skip, alltaps, order, keys, cbuf, zeros, blk, bm, pb, ctr):
    """:func:`forward` reading A in place: the NHWC input holds every in-bounds tap of every output
    position, so a tile's rows are the positions' channel runs (``ukernel_rowptr``) and a tap in the
    padding reads ``zeros``: no padded copy (it took 10% of resnet50-3x3-s2's forward) and nothing
    gathered.  Weights come packed (:func:`pack_weights`).  Items (block of bm positions, group,
    block of ``pb`` NR-column panels of output channels); per tap the item's rows are listed
    (``offbuf[wid, 3*bm:4*bm]``, -1 in the padding), then per cache block of channels the B
    micro-panel stays in L1 across the item's tiles, the item's C block (bm x pb*NR) in L2.  Every
    item streams its panels' packed weights once: splitting the output channels rather than the
    positions keeps that to one pass over the weights where they are large and the positions few
    (see nhwc._rows_plan).

    With ``skip`` (small planes: a 4x4 plane with 3x3 taps and padding 1 has 31% of its
    position-taps in the padding; 7x7, 18%) the taps in the padding are skipped.  Items are then
    runs of ``order``, the output positions sorted by their windows' in-bounds tap ranges
    (``keys[oy*ow + ox]`` = ((rlo*(r+1) + rhi)*(s+1) + slo)*(s+1) + shi, taps [rlo, rhi) x
    [slo, shi) inside), so the rows of a tile mostly share one; a tile runs only the taps some row
    of it has inside the input (rows outside read ``zeros`` as before), into the worker's C block
    ``cbuf`` (bm x kg), copied to ``y`` by position at the end with the bias.  Weights must be
    finite: a skipped tap adds nothing where the zeros would have given 0 * inf = NaN.
    ``offbuf[wid]`` holds 4*bm int64 (10*bm with ``skip``: ``_sorted_positions``,
    ``_tile_ranges``).

    With ``alltaps`` (cg <= kc, one channel block per tap; not with ``skip``) a tile's taps are
    summed in one ``ukernel_taps`` call instead of one call per tap (:func:`_all_taps`;
    ``offbuf[wid]`` then holds (4 + r*s)*bm + r*s int64): thin groups' per-tap calls reloaded and
    stored the C tile every cg steps."""
    kc = blk[0]
    mr, nr = _tile_of(y)
    tn = r * s * cg
    kt = g * kg
    npan = (kg + nr - 1) // nr
    plane = oh * ow
    nblk = (m + bm - 1) // bm
    npb = (npan + pb - 1) // pb
    items = nblk * g * npb
    nw = wbuf.shape[0]
    for wid in prange(nw):
        tmp = wbuf[wid]
        offs = offbuf[wid]
        cb = cbuf[wid]
        for _ in range(items):
            it = claim(ctr)
            if it >= items:
                break
            jp0 = (it % npb) * pb
            jp1 = min(npan, jp0 + pb)
            gi = (it // npb) % g
            i0 = (it // (npb * g)) * bm
            mb = min(bm, m - i0)
            j0 = jp0 * nr  # the item's output channels in the group: j0 .. j1
            j1 = min(kg, jp1 * nr)
            if skip:
                _sorted_positions(offs, bm, mb, i0, order, keys, plane, ow, sh, sw, ph, pw)
                _tile_ranges(offs, bm, mb, r, s, mr)
            else:
                # each position's image and top-left tap (may lie in the padding)
                _positions(offs, bm, mb, i0, plane, ow, sh, sw, ph, pw)
            if alltaps:
                _all_taps(x, offs, bm, mb, i0, h, w, cin, dh, dw, r, s, gi, cg, kg, kt, npan, jp0, jp1, tn, zeros, pbw,
                          y, tmp, mr, nr)
            for t in range(0 if alltaps else r * s):
                rr = t // s
                ss = t - rr * s
                _tap_rows(offs, bm, mb, rr, ss, h, w, dh, dw, cin, gi * cg, 3 * bm)
                for cc0 in range(0, cg, kc):
                    boff = (gi * npan * tn + t * cg + cc0) * nr
                    if skip:
                        _row_tiles_skip(min(kc, cg - cc0), x, offs, bm, mb, cc0, zeros, pbw, boff, tn, jp0, jp1,
                                        cb, kg, tmp, rr, ss, cc0 == 0, mr, nr)
                    else:
                        _row_tiles(min(kc, cg - cc0), x, offs, 3 * bm, cc0, zeros, pbw, boff, tn, jp0, jp1, y,
                                   i0, mb, kt, gi * kg, kg, tmp, 0 if t == 0 and cc0 == 0 else 1, mr, nr)
            if skip:
                for i in range(mb):
                    o = offs[4 * bm + i] * kt + gi * kg
                    rlo, rhi, slo, shi = _window(offs[5 * bm + i], r, s)
                    empty = rlo >= rhi or slo >= shi
                    for j in range(j0, j1):
                        v = 0 if empty else cb[i * kg + j]
                        y[o + j] = v + bias[gi * kg + j] if has_bias else v
            elif has_bias:
                _add_bias(y, bias, i0, mb, kt, gi * kg, j0, j1)


@serial
def _sorted_positions(offs, bm, mb, i0, order, keys, plane, ow, sh, sw, ph, pw):
    # the item's positions, order[i0 : i0+mb]: offs[0:bm] image, [bm:2bm] top row, [2bm:3bm] left
    # column, [4bm:5bm] position, [5bm:6bm] its window's key (see forward_rows)
    for i in range(mb):
        pos = order[i0 + i]
        offs[i], offs[bm + i], offs[2 * bm + i] = _position(pos, plane, ow, sh, sw, ph, pw)
        offs[4 * bm + i] = pos
        offs[5 * bm + i] = keys[pos % plane]


@serial
def _window(key, r, s):
    # (rlo, rhi, slo, shi) of a window key ((rlo*(r+1) + rhi)*(s+1) + slo)*(s+1) + shi
    q = key // ((s + 1) * (s + 1))
    return q // (r + 1), q % (r + 1), (key // (s + 1)) % (s + 1), key % (s + 1)


@serial
def _tile_ranges(offs, bm, mb, r, s, mr):
    # per tile of mr sorted rows, at offs[6bm + 4*ti ...]: the union of its rows' tap ranges
    # (rlo, rhi, slo, shi); empty (r, 0, s, 0) when every row's window lies in the padding
    for ti in range((mb + mr - 1) // mr):
        rlo, rhi, slo, shi = r, 0, s, 0
        for i in range(ti * mr, min(mb, ti * mr + mr)):
            c, d, a, b = _window(offs[5 * bm + i], r, s)
            if c < d and a < b:
                rlo, rhi, slo, shi = min(rlo, c), max(rhi, d), min(slo, a), max(shi, b)
        o = 6 * bm + 4 * ti
        offs[o], offs[o + 1], offs[o + 2], offs[o + 3] = rlo, rhi, slo, shi


@serial
def _row_tiles_skip(kb, a, offs, bm, mb, toff, zeros, pbw, bbase, tn, jp0, jp1, cb, kg, tmp, rr, ss, first, mr, nr):
    # _row_tiles into the item's C block cb (mb x kg, sorted rows; panels jp0 .. jp1 - 1) for tap
    # (rr, ss), skipping the tiles whose rows all have that tap in the padding; a tile's first tap
    # computed assigns
    for jp in range(jp0, jp1):
        j0 = jp * nr
        nn = min(nr, kg - j0)
        boff = bbase + jp * tn * nr
        for i in range(0, mb, mr):
            o = 6 * bm + 4 * (i // mr)
            if rr < offs[o] or rr >= offs[o + 1] or ss < offs[o + 2] or ss >= offs[o + 3]:
                continue
            acc = 0 if first and rr == offs[o] and ss == offs[o + 2] else 1
            _tile(kb, a, offs, 3 * bm + i, toff, zeros, pbw, boff, cb, i * kg + j0, kg, acc, min(mr, mb - i), nn,
                  tmp, nr)


@kernel
def forward_im2row(x, h, w, cin, oh, ow, sh, sw, ph, pw, dh, dw, r, s, g, cg, kg, pbw, bias, has_bias, y, m,
                   wbuf, offbuf, rowbuf, blk, bm, ctr):
    """:func:`forward_rows` for narrow groups (a stem's 3 channels: one micro-kernel call per tap
    would reload the C tile every 3 steps): per item the positions' taps are first copied into
    rows of ``rowbuf`` (bm x tn, the worker's: per kernel row one run of s*cg elements where the
    taps are adjacent in memory, zeros in the padding), then each tile's rows are read there by
    ``ukernel_rowptr`` over whole cache blocks of taps.  (Gathering straight into packed panels
    wrote one element per MR-strided slot and took as long as the products.)"""
    kc = blk[0]
    mr, nr = _tile_of(y)
    tn = r * s * cg
    kt = g * kg
    npan = (kg + nr - 1) // nr
    plane = oh * ow
    nblk = (m + bm - 1) // bm
    items = nblk * g
    nw = wbuf.shape[0]
    for wid in prange(nw):
        tmp = wbuf[wid]
        offs = offbuf[wid]
        rb = rowbuf[wid]
        for _ in range(items):
            it = claim(ctr)
            if it >= items:
                break
            gi = it % g
            i0 = (it // g) * bm
            mb = min(bm, m - i0)
            for i in range(mb):
                img, iy0, ix0 = _position(i0 + i, plane, ow, sh, sw, ph, pw)
                d = i * tn
                offs[i] = d
                lo = min(s, max(0, (-ix0 + dw - 1) // dw))  # taps left of the input
                hi = max(lo, min(s, (w - 1 - ix0) // dw + 1)) if w - 1 - ix0 >= 0 else lo
                for rr in range(r):
                    iy = iy0 + rr * dh
                    if iy < 0 or iy >= h:
                        for q in range(s * cg):
                            rb[d + q] = 0
                        d += s * cg
                        continue
                    for q in range(lo * cg):
                        rb[d + q] = 0
                    src = ((img * h + iy) * w + ix0) * cin + gi * cg
                    if dw == 1 and cin == cg:  # the row's taps inside the input: one run
                        for q in range(lo * cg, hi * cg):
                            rb[d + q] = x[src + q]
                    else:
                        for ss in range(lo, hi):
                            o = src + ss * dw * cin
                            for cc in range(cg):
                                rb[d + ss * cg + cc] = x[o + cc]
                    for q in range(hi * cg, s * cg):
                        rb[d + q] = 0
                    d += s * cg
            for pc in range(0, tn, kc):
                _row_tiles(min(kc, tn - pc), rb, offs, 0, pc, rb, pbw, (gi * npan * tn + pc) * nr, tn, 0, npan, y,
                           i0, mb, kt, gi * kg, kg, tmp, 0 if pc == 0 else 1, mr, nr)
            if has_bias:
                _add_bias(y, bias, i0, mb, kt, gi * kg, 0, kg)


# ---------------------------------------------------------------------------------------- depthwise
# One filter per channel (groups == channels == out channels): the channels of one position are
# contiguous, so every tap of an output row is one multiply-add over a row of positions x channels,
# vectorised along the channels.  Arrays are 2-D (positions, channels) and the channel loop indexes
# the last axis with its own counter: with flat indices (row offset + channel) numba's wraparound
# check stayed in the loop and it ran scalar, 30x slower.  Taps in the padding are skipped (the
# caller sends non-finite weights, whose products with the padding's zeros would be NaN, to the NCHW
# kernels).
def _vector_args(context, builder, sig, args, which):
    """IR: the arrays among ``args`` at the positions ``which`` (the first one's dtype and second
    dimension, c, are the kernel's), its element size, vector lanes, vector type, FMA, c and a zero
    vector."""
    arrays = tuple(context.make_array(sig.args[i])(context, builder, args[i]) for i in which)
    fty = context.get_data_type(sig.args[which[0]].dtype)
    isz = context.get_abi_sizeof(fty)
    lanes, vty, fma, _ = _vector_tools(builder, fty, isz, VBYTES)
    return (arrays, isz, lanes, vty, fma, builder.extract_value(arrays[0].shape, 1),
            ir.Constant(vty, [0.0] * lanes))


def _row_ptr(builder, xa, za, row, off, c):
    """IR: the pointer to element ``off`` of row ``row`` (c elements a row) of array ``xa``, or to
    the zeros array ``za`` where ``row`` is negative (a tap in the padding)."""
    ptr = builder.gep(xa.data, [builder.add(builder.mul(row, c), off)])
    return builder.select(builder.icmp_signed("<", row, ir.Constant(ir.IntType(64), 0)), za.data, ptr)


def _counted_loop(builder, q0, q1, name):
    """IR: the head of a loop over q from q0 while q < q1 (skipped when q0 >= q1): (body block, exit
    block, q's phi), the builder at the top of the body.  The body's end adds q's next value to the
    phi and branches back or out itself."""
    before = builder.block
    body = builder.append_basic_block(name)
    after = builder.append_basic_block(name + ".end")
    builder.cbranch(builder.icmp_signed("<", q0, q1), body, after)
    builder.position_at_end(body)
    q = builder.phi(ir.IntType(64))
    q.add_incoming(q0, before)
    return body, after, q


@intrinsic
def _madd9(typingctx, y, yi, x, xi, wt, bias, has_bias, npos, step, dw, zeros, ystep):
    """``y[yi + q*ystep, :] = (bias if has_bias else 0) + sum_t x[xi[t] + q*step, :] * wt[t, :]`` for
    the ``npos`` positions q of a run (``step`` input rows apart: the stride) over the nine taps ``xi``
    (a 9-tuple of rows; -1: the tap lies in the padding and reads ``zeros``, c of them), in vectors
    along the channels (a multiple of the vector width), the nine terms in tap order by fused
    multiply-adds.  ``dw``: the taps' column dilation (with ``step`` 1 and ``dw`` 1 neighbouring
    positions share their input columns).  numba's own loop for this stayed scalar: eighteen loads
    from runtime offsets exceed LLVM's budget of runtime alias checks against the store (2.3 ms for
    8x128x56x56 before)."""
    arrays = (y, x, wt, bias, zeros)
    if not all(isinstance(a, types.Array) and a.layout == "C" for a in arrays):
        return None
    if not (isinstance(xi, types.UniTuple) and xi.count == 9):
        return None
    sig = types.void(y, types.intp, x, xi, wt, bias, types.boolean, types.intp, types.intp, types.intp, zeros,
                     types.intp)

    def codegen(context, builder, sig, args):
        _, yiv, _, xiv, _, _, hb, npv, stv, dwv, _, ysv = args
        (ya, xa, wa, ba, za), isz, lanes, vty, fma, c, zero = _vector_args(context, builder, sig, args,
                                                                          (0, 2, 4, 5, 10))
        i64 = ir.IntType(64)
        vptr = vty.as_pointer()
        xstep = builder.mul(stv, c)
        wb = [builder.gep(wa.data, [builder.mul(c, ir.Constant(i64, t))]) for t in range(9)]

        def tap(row, off):
            return _row_ptr(builder, xa, za, row, off, c)

        def run(q0, q1, u, tag, slide):
            # positions q0 .. q1-1 (a multiple of u of them), u at a time: u independent chains of
            # nine dependent FMAs per channel vector, in tap order (one chain alone waits out the
            # FMA latency).  With ``slide`` (stride 1, dilation 1) the u positions' taps of a kernel
            # row are u + 2 neighbouring input columns, each loaded once: loads, not FMAs, bound
            # this loop (19 a position-vector otherwise; 16x16x48x48 0.40 ms on one thread)
            outer, done, q = _counted_loop(builder, q0, q1, f"madd9.pos{tag}")
            loop = builder.append_basic_block(f"madd9.loop{tag}")
            nextpos = builder.append_basic_block(f"madd9.next{tag}")
            yb = [builder.gep(ya.data, [builder.mul(builder.add(yiv, builder.mul(builder.add(q, ir.Constant(i64, k)), ysv)),
                                                    c)])
                  for k in range(u)]
            if slide:  # column j of kernel row rr: input row xi[3*rr] + q + j
                xb = [[tap(builder.extract_value(xiv, 3 * rr), builder.mul(builder.add(q, ir.Constant(i64, j)), c))
                       for j in range(u + 2)] for rr in range(3)]
            else:
                xb = []
                for k in range(u):
                    qx = builder.mul(builder.add(q, ir.Constant(i64, k)), xstep)
                    xb.append([tap(builder.extract_value(xiv, t), qx) for t in range(9)])
            builder.branch(loop)
            builder.position_at_end(loop)
            ch = builder.phi(i64)
            ch.add_incoming(ir.Constant(i64, 0), outer)

            def load(base):
                return builder.load(builder.bitcast(builder.gep(base, [ch]), vptr), align=isz)

            init = builder.select(hb, load(ba.data), zero)
            acc = [init] * u
            for rr in range(3):
                cols = [load(xb[rr][j]) for j in range(u + 2)] if slide else None
                for ss in range(3):
                    t = 3 * rr + ss
                    wt_ = load(wb[t])
                    acc = [builder.call(fma, [cols[k + ss] if slide else load(xb[k][t]), wt_, acc[k]])
                           for k in range(u)]
            for k in range(u):
                builder.store(acc[k], builder.bitcast(builder.gep(yb[k], [ch]), vptr), align=isz)
            nxt = builder.add(ch, ir.Constant(i64, lanes))
            ch.add_incoming(nxt, builder.block)
            builder.cbranch(builder.icmp_signed("<", nxt, c), loop, nextpos)
            builder.position_at_end(nextpos)
            qn = builder.add(q, ir.Constant(i64, u))
            q.add_incoming(qn, nextpos)
            builder.cbranch(builder.icmp_signed("<", qn, q1), outer, done)
            builder.position_at_end(done)

        u = 4
        main = builder.mul(builder.sdiv(npv, ir.Constant(i64, u)), ir.Constant(i64, u))
        one = ir.Constant(i64, 1)
        slide = builder.and_(builder.icmp_signed("==", stv, one), builder.icmp_signed("==", dwv, one))
        with builder.if_else(slide) as (then, otherwise):
            with then:
                run(ir.Constant(i64, 0), main, u, "s", True)
            with otherwise:
                run(ir.Constant(i64, 0), main, u, "g", False)
        run(main, npv, 1, "1", False)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def _dot9(typingctx, part, poff, gy, g0, x, xi, npos, step, dw, zeros):
    """``part[poff + t*c : ... + c] += sum_q gy[g0 + q, :] * x[xi[t] + q*step, :]`` for the nine
    taps t (``xi`` a 9-tuple of input rows; -1: the tap lies in the padding and reads ``zeros``, c
    of them) over the ``npos`` positions q of a run, in vectors along the channels (a multiple of
    the vector width): nine accumulators per channel vector, each summing the run's terms in
    position order by fused multiply-adds, then one add into ``part``.  With ``step`` 1 and ``dw``
    1, four positions at a time share their input columns (six loads per kernel row, not twelve)."""
    arrays = (part, gy, x, zeros)
    if not all(isinstance(a, types.Array) and a.layout == "C" for a in arrays):
        return None
    if not (isinstance(xi, types.UniTuple) and xi.count == 9):
        return None
    sig = types.void(part, types.intp, gy, types.intp, x, xi, types.intp, types.intp, types.intp, zeros)

    def codegen(context, builder, sig, args):
        _, poffv, _, g0v, _, xiv, npv, stv, dwv, _ = args
        (ga, pa, xa, za), isz, lanes, vty, fma, c, zero = _vector_args(context, builder, sig, args, (2, 0, 4, 9))
        i64 = ir.IntType(64)
        vptr = vty.as_pointer()
        nil = ir.Constant(i64, 0)
        u = 4
        main = builder.mul(builder.sdiv(npv, ir.Constant(i64, u)), ir.Constant(i64, u))
        one = ir.Constant(i64, 1)
        slide = builder.and_(builder.icmp_signed("==", stv, one), builder.icmp_signed("==", dwv, one))
        main = builder.select(slide, main, nil)  # without slide every position takes the one-at-a-time loop
        rows = [builder.extract_value(xiv, t) for t in range(9)]
        pbase = builder.gep(pa.data, [poffv])
        gbase = builder.gep(ga.data, [builder.mul(g0v, c)])
        xstep = builder.mul(stv, c)

        def tap(row, off):
            return _row_ptr(builder, xa, za, row, off, c)

        entry = builder.block
        chloop = builder.append_basic_block("dot9.ch")
        done = builder.append_basic_block("dot9.done")
        builder.cbranch(builder.icmp_signed(">", c, nil), chloop, done)
        builder.position_at_end(chloop)
        ch = builder.phi(i64)
        ch.add_incoming(nil, entry)

        def vload(ptr):
            return builder.load(builder.bitcast(builder.gep(ptr, [ch]), vptr), align=isz)

        def qloop(q0, q1, acc_in, width, tag):
            # positions q0 .. q1-1, ``width`` at a time; returns the accumulators after them
            before = builder.block
            body, after, q = _counted_loop(builder, q0, q1, f"dot9.q{tag}")
            acc = [builder.phi(vty) for _ in range(9)]
            for t in range(9):
                acc[t].add_incoming(acc_in[t], before)
            g = [vload(builder.gep(gbase, [builder.mul(builder.add(q, ir.Constant(i64, k)), c)])) for k in range(width)]
            new = list(acc)
            if width > 1:  # slide: column j of kernel row rr is input row rows[3*rr] + q + j
                for rr in range(3):
                    cols = [vload(tap(rows[3 * rr], builder.mul(builder.add(q, ir.Constant(i64, j)), c)))
                            for j in range(width + 2)]
                    for ss in range(3):
                        for k in range(width):
                            new[3 * rr + ss] = builder.call(fma, [g[k], cols[k + ss], new[3 * rr + ss]])
            else:
                qx = builder.mul(q, xstep)
                for t in range(9):
                    new[t] = builder.call(fma, [g[0], vload(tap(rows[t], qx)), new[t]])
            qn = builder.add(q, ir.Constant(i64, width))
            end = builder.block
            q.add_incoming(qn, end)
            for t in range(9):
                acc[t].add_incoming(new[t], end)
            builder.cbranch(builder.icmp_signed("<", qn, q1), body, after)
            builder.position_at_end(after)
            out = []
            for t in range(9):
                ph_ = builder.phi(vty)
                ph_.add_incoming(acc_in[t], before)
                ph_.add_incoming(new[t], end)
                out.append(ph_)
            return out

        acc = qloop(nil, main, [zero] * 9, u, "4")
        acc = qloop(main, npv, acc, 1, "1")
        for t in range(9):
            ptr = builder.bitcast(builder.gep(pbase, [builder.add(builder.mul(c, ir.Constant(i64, t)), ch)]), vptr)
            builder.store(builder.fadd(builder.load(ptr, align=isz), acc[t]), ptr, align=isz)
        nxt = builder.add(ch, ir.Constant(i64, lanes))
        ch.add_incoming(nxt, builder.block)
        builder.cbranch(builder.icmp_signed("<", nxt, c), chloop, done)
        builder.position_at_end(done)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def _lanes_of(typingctx, a):
    """Elements of ``a``'s dtype in one vector of this CPU's width."""
    if not isinstance(a, types.Array):
        return None
    lanes = VBYTES // (a.dtype.bitwidth // 8)
    return types.intp(a), lambda context, builder, sig, args: ir.Constant(ir.IntType(64), lanes)


@micro
def _tap(row, col, w):
    # the input row of a tap: ``row`` (the input row's first position, -1 outside the input) + col,
    # or -1 where the column lies in the padding
    return row + col if row >= 0 and 0 <= col < w else -1


@kernel
def dw_forward(x, n, h, w, oh, ow, sh, sw, ph, pw, dh, dw, r, s, wt, bias, has_bias, y, zeros):
    """``y[(n*oh + oy)*ow + ox, ch] = bias[ch] + sum_{rr, ss} x[(n*h + iy)*w + ix, ch] * wt[rr*s + ss, ch]``
    with ``iy = oy*sh - ph + rr*dh``, ``ix = ox*sw - pw + ss*dw``; items are output rows (disjoint).
    ``zeros``: c zeros, what a 3x3 layer's taps in the padding read."""
    c = x.shape[1]
    for it in prange(n * oh):
        img = it // oh
        oy = it - img * oh
        yo = it * ow
        iy0 = oy * sh - ph
        if r == 3 and s == 3 and c % _lanes_of(y) == 0:
            # 3x3: nine-term sums per channel vector (19 loads and stores per 9 FMAs, not 36), the
            # columns whose taps all lie inside the rows in runs, the others one by one
            ia = min(ow, max(0, (pw + sw - 1) // sw))
            ib = max(ia, min(ow, (w - 1 - 2 * dw + pw) // sw + 1))
            base = img * h * w
            x0 = base + iy0 * w if 0 <= iy0 < h else -1
            x1 = base + (iy0 + dh) * w if 0 <= iy0 + dh < h else -1
            x2 = base + (iy0 + 2 * dh) * w if 0 <= iy0 + 2 * dh < h else -1
            for ox in range(ow):
                if ox == ia and ib > ia:  # the run
                    a = ia * sw - pw
                    _madd9(y, yo + ia, x, (_tap(x0, a, w), _tap(x0, a + dw, w), _tap(x0, a + 2 * dw, w),
                                           _tap(x1, a, w), _tap(x1, a + dw, w), _tap(x1, a + 2 * dw, w),
                                           _tap(x2, a, w), _tap(x2, a + dw, w), _tap(x2, a + 2 * dw, w)),
                           wt, bias, has_bias, ib - ia, sw, dw, zeros, 1)
                if ia <= ox < ib:
                    continue
                a = ox * sw - pw
                _madd9(y, yo + ox, x, (_tap(x0, a, w), _tap(x0, a + dw, w), _tap(x0, a + 2 * dw, w),
                                       _tap(x1, a, w), _tap(x1, a + dw, w), _tap(x1, a + 2 * dw, w),
                                       _tap(x2, a, w), _tap(x2, a + dw, w), _tap(x2, a + 2 * dw, w)),
                       wt, bias, has_bias, 1, sw, dw, zeros, 1)
            continue
        # other kernels (and channel counts off the vector width) by tap
        for ox in range(ow):
            for ch in range(c):
                y[yo + ox, ch] = bias[ch] if has_bias else 0
        for rr in range(r):
            iy = iy0 + rr * dh
            if iy < 0 or iy >= h:
                continue
            xrow = (img * h + iy) * w
            for ss in range(s):
                off = ss * dw - pw
                ox0 = max(0, (-off + sw - 1) // sw)
                ox1 = min(ow, (w - 1 - off) // sw + 1) if w - 1 - off >= 0 else 0
                t = rr * s + ss
                for ox in range(ox0, ox1):
                    xi = xrow + ox * sw + off
                    yi = yo + ox
                    for ch in range(c):
                        y[yi, ch] += x[xi, ch] * wt[t, ch]


@micro
def _gi_row(num, img, sh, oh, ow):
    # the first position of the output row whose tap row lands on the input row (num = iy + ph -
    # rr*dh), -1 where none does
    return (img * oh + num // sh) * ow if num >= 0 and num % sh == 0 and num // sh < oh else -1


@micro
def _gi_col(num, sw, ow):
    # the output column whose tap column lands on the input column (num = ix + pw - ss*dw), or -1
    return num // sw if num >= 0 and num % sw == 0 and num // sw < ow else -1


@micro
def _gi_tap(row, col):
    # gy's position of a tap from output row position ``row`` and column ``col`` (-1: none)
    return row + col if row >= 0 and col >= 0 else -1


@kernel
def dw_grad_input(gy, n, h, w, oh, ow, sh, sw, ph, pw, dh, dw, r, s, wt, gx, zeros):
    """``gx[(n*h + iy)*w + ix, ch] = sum gy[(n*oh + oy)*ow + ox, ch] * wt[rr*s + ss, ch]`` over the
    taps and output positions with ``oy*sh - ph + rr*dh == iy`` and ``ox*sw - pw + ss*dw == ix``:
    gathered per input row (disjoint items), so nothing is scattered."""
    c = gy.shape[1]
    if r == 3 and s == 3 and c % _lanes_of(gx) == 0:
        # 3x3: each input position's (up to nine) taps summed in registers and stored once, by
        # _madd9 on gy with the taps that do not land on an output position reading ``zeros``
        # (tap by tap, nine read-modify-write passes per row: 16x32x48x48 stride 2 0.40 ms).
        # cols[ix, ss]: the output column of tap column ss landing on input column ix, or -1;
        # cols[ix, 3]: 1 where every tap column of ix's stride phase lands inside the output.  The
        # input columns of one phase (ix = cls + j*sw) with that flag take consecutive output
        # columns per tap: runs for _madd9 (gy one position apart, gx sw apart)
        cols = np.empty((w, 4), np.int64)
        for ix in range(w):
            inner = 1
            for ss in range(3):
                num = ix + pw - ss * dw
                cols[ix, ss] = _gi_col(num, sw, ow)
                if num % sw == 0 and cols[ix, ss] < 0:
                    inner = 0
            cols[ix, 3] = inner
        for it in prange(n * h):
            img = it // h
            iy = it - img * h
            g0 = _gi_row(iy + ph, img, sh, oh, ow)
            g1 = _gi_row(iy + ph - dh, img, sh, oh, ow)
            g2 = _gi_row(iy + ph - 2 * dh, img, sh, oh, ow)
            for cls in range(min(sw, w)):
                nj = (w - cls + sw - 1) // sw
                j = 0
                while j < nj:
                    ix = cls + j * sw
                    j1 = j + 1
                    if cols[ix, 3]:
                        while j1 < nj and cols[cls + j1 * sw, 3]:
                            j1 += 1
                    c0, c1, c2 = cols[ix, 0], cols[ix, 1], cols[ix, 2]
                    _madd9(gx, it * w + ix, gy, (_gi_tap(g0, c0), _gi_tap(g0, c1), _gi_tap(g0, c2),
                                                 _gi_tap(g1, c0), _gi_tap(g1, c1), _gi_tap(g1, c2),
                                                 _gi_tap(g2, c0), _gi_tap(g2, c1), _gi_tap(g2, c2)),
                           wt, zeros, False, j1 - j, 1, 0, zeros, sw)
                    j = j1
        return
    # flat arrays, unsigned offsets; each row is zeroed here, so the caller allocates gx without a
    # fill (that fill was the cost: 32x32x28x28 stride 2 0.43 -> 0.21 ms once it went)
    gxf = gx.reshape(gx.size)
    gyf = gy.reshape(gy.size)
    wtf = wt.reshape(wt.size)
    for it in prange(n * h):
        img = it // h
        iy = it - img * h
        go = it * w * c
        for e in range(_u(w * c)):
            gxf[go + e] = 0
        for rr in range(r):
            num = iy + ph - rr * dh
            if num < 0 or num % sh != 0 or num // sh >= oh:
                continue
            grow = (img * oh + num // sh) * ow
            for ss in range(s):
                off = ss * dw - pw  # ix = ox*sw + off
                t = _u((rr * s + ss) * c)
                ox0 = max(0, (-off + sw - 1) // sw)
                ox1 = min(ow, (w - 1 - off) // sw + 1) if w - 1 - off >= 0 else 0
                for ox in range(ox0, ox1):
                    gi = _u(go + (ox * sw + off) * c)
                    src = _u((grow + ox) * c)
                    for ch in range(_u(c)):
                        gxf[gi + ch] += gyf[src + ch] * wtf[t + ch]


@kernel
def dw_grad_weight(gy, x, n, h, w, oh, ow, sh, sw, ph, pw, dh, dw, r, s, part, rows_per, zeros):
    """``part[b, rr*s + ss, ch]`` = the sum over output rows ``b*rows_per ..`` of
    ``gy[pos, ch] * x[tap's input position, ch]``: fixed row blocks (not one per worker), so the
    caller's sum over blocks gives the same bits for every thread count.  Each block first sums
    per tap and output column (``acc[t, ox, ch]``: a tap's run along a row's positions and
    channels), then over the columns in order.  Adding every position into ``part[b, t, :]``
    directly chained each add to the store before it (ms, 2 threads: 16x32x48x48 0.70 -> 0.45,
    8x128x56x56 2.1 -> 1.5; cutting the rows into L1-sized column blocks, or going tap by tap,
    measured slower).  3x3 layers over whole channel vectors sum in registers instead (below).
    ``zeros``: c zeros, what their taps in the padding read."""
    c = gy.shape[1]
    nb = part.shape[0]
    gyf = gy.reshape(gy.size)
    xf = x.reshape(x.size)
    rowlen = ow * c
    if r == 3 and s == 3 and c % _lanes_of(gy) == 0:
        # 3x3: per output row, a run of the columns whose taps all lie inside the rows and the
        # other columns one by one, each summed per tap in registers by _dot9 (the taps in the
        # padding read ``zeros``) and added to the block's sums (2 threads: 16x16x48x48 0.30-0.33 ->
        # 0.13 ms, 8x128x56x56 2.1-2.3 -> 1.2; PyTorch's channels_last 0.15-0.18, 1.7)
        pf = part.reshape(part.size)
        ia = min(ow, max(0, (pw + sw - 1) // sw))
        ib = max(ia, min(ow, (w - 1 - 2 * dw + pw) // sw + 1))
        for b in prange(nb):
            po = b * 9 * c
            for e in range(_u(9 * c)):
                pf[po + e] = 0
            for it in range(b * rows_per, min(n * oh, (b + 1) * rows_per)):
                img = it // oh
                iy0 = (it - img * oh) * sh - ph
                base = img * h * w
                x0 = base + iy0 * w if 0 <= iy0 < h else -1
                x1 = base + (iy0 + dh) * w if 0 <= iy0 + dh < h else -1
                x2 = base + (iy0 + 2 * dh) * w if 0 <= iy0 + 2 * dh < h else -1
                for ox in range(ow):
                    if ia < ox < ib:
                        continue
                    a = ox * sw - pw
                    run = ox == ia and ib > ia
                    _dot9(pf, po, gy, it * ow + ox, x, (_tap(x0, a, w), _tap(x0, a + dw, w), _tap(x0, a + 2 * dw, w),
                                                        _tap(x1, a, w), _tap(x1, a + dw, w), _tap(x1, a + 2 * dw, w),
                                                        _tap(x2, a, w), _tap(x2, a + dw, w), _tap(x2, a + 2 * dw, w)),
                          ib - ia if run else 1, sw, dw, zeros)
        return
    for b in prange(nb):
        acc = np.zeros(r * s * rowlen, dtype=part.dtype)
        for it in range(b * rows_per, min(n * oh, (b + 1) * rows_per)):
            img = it // oh
            oy = it - img * oh
            grow = it * ow
            for rr in range(r):
                iy = oy * sh - ph + rr * dh
                if iy < 0 or iy >= h:
                    continue
                xrow = (img * h + iy) * w
                for ss in range(s):
                    off = ss * dw - pw
                    ox0 = max(0, (-off + sw - 1) // sw)
                    ox1 = min(ow, (w - 1 - off) // sw + 1) if w - 1 - off >= 0 else 0
                    if ox1 <= ox0:
                        continue
                    ao = (rr * s + ss) * rowlen
                    if sw == 1:  # the row's positions and channels are one run in gy, x and acc
                        a0 = _u(ao + ox0 * c)
                        g0 = _u((grow + ox0) * c)
                        x0 = _u((xrow + ox0 + off) * c)
                        for q in range(_u((ox1 - ox0) * c)):
                            acc[a0 + q] += gyf[g0 + q] * xf[x0 + q]
                    else:
                        for ox in range(ox0, ox1):
                            a0 = _u(ao + ox * c)
                            g0 = _u((grow + ox) * c)
                            x0 = _u((xrow + ox * sw + off) * c)
                            for ch in range(_u(c)):
                                acc[a0 + ch] += gyf[g0 + ch] * xf[x0 + ch]
        for t in range(r * s):
            for ch in range(c):
                part[b, t, ch] = 0
            for ox in range(ow):
                a0 = _u(t * rowlen + ox * c)
                for ch in range(_u(c)):
                    part[b, t, ch] += acc[a0 + ch]


@kernel
def sum_rows(g, part, per):
    """``part[b, ch]`` = the float64 sum of ``g[i, ch]`` over the rows of block b (``per`` rows
    each): the bias gradient of an NHWC output gradient, in fixed blocks (thread-invariant bits)."""
    for b in prange(part.shape[0]):
        block_sums(g, part, b, per)


@micro
def block_sums(a, part, b, per):
    # part[b, ch] = the sum of a[i, ch] over rows b*per .. (b+1)*per - 1 of the (R, C) array a, in
    # row order (sum_rows; batch norm's channels_last moments)
    rows, c = a.shape
    for ch in range(c):
        part[b, ch] = 0
    for i in range(b * per, min(rows, (b + 1) * per)):
        for ch in range(c):
            part[b, ch] += a[i, ch]


# ---------------------------------------------------------------------------------------- 1x1 GEMMs
# A 1x1, stride-1, unpadded, ungrouped layer in NHWC is one matrix product over the batch's P
# positions (nhwc.pointwise_*): y (P x k) = x (P x c) . w.T, gx (P x c) = gy (P x k) . w,
# gw (k x c) = gy.T . x.  Each worker calls the BLAS ?gemm on one thread (_blas.serial_blas) for
# the blocks it claims: blocks of rows of y or gx; for gw (fixed parts of the positions) x (fixed
# blocks of its columns), each part summed by the caller in order.  The cut comes from the
# problem alone, so the bits do not depend on the thread count.
@kernel
def pointwise_rows(a, lda, w, transw, bias, has_bias, c, ldc, m, kk, rows, cols, fn, ints, ctr):
    # c[i, :] (ldc wide) = a[i, :kk] . op(w) (+ bias) for i < m, by blocks of `rows` rows x `cols`
    # columns of c; op(w) is w.T for an (ldc x kk) w (transw = 1, the forward) or w for a
    # (kk x ldc) w (grad_input)
    nw = ints.shape[0]
    ncb = (ldc + cols - 1) // cols
    items = (m + rows - 1) // rows * ncb
    for wid in prange(nw):
        iv = ints[wid]
        tr = _chars()
        one = np.ones(1, dtype=c.dtype)
        beta = np.ones(1, dtype=c.dtype) if has_bias else np.zeros(1, dtype=c.dtype)
        for _ in range(items):
            it = claim(ctr)
            if it >= items:
                break
            rb = it // ncb
            c0 = (it - rb * ncb) * cols
            r0 = rb * rows
            mb = min(rows, m - r0)
            nb = min(cols, ldc - c0)
            if has_bias:
                for i in range(r0, r0 + mb):
                    for j in range(c0, c0 + nb):
                        c[i * ldc + j] = bias[j]
            if transw:
                _gemm(fn, iv, tr, _N, _TR, mb, nb, kk, one, a[r0 * lda:], lda, w[c0 * kk:], kk, beta,
                      c[r0 * ldc + c0:], ldc)
            else:
                _gemm(fn, iv, tr, _N, _N, mb, nb, kk, one, a[r0 * lda:], lda, w[c0:], ldc, beta,
                      c[r0 * ldc + c0:], ldc)


@kernel
def pointwise_gw(gy, x, part, k, c, m, per, cols, fn, ints, ctr):
    # part[q] (k x c, flat) = gy[rows q].T . x[rows q] over parts of `per` positions, by blocks of `cols`
    # columns: item (q, column block) writes part[q][:, c0:c0 + cb]
    nw = ints.shape[0]
    nq = part.shape[0]
    ncb = (c + cols - 1) // cols
    items = nq * ncb
    for wid in prange(nw):
        iv = ints[wid]
        tr = _chars()
        one = np.ones(1, dtype=part.dtype)
        zero = np.zeros(1, dtype=part.dtype)
        for _ in range(items):
            it = claim(ctr)
            if it >= items:
                break
            q = it // ncb
            c0 = (it - q * ncb) * cols
            r0 = q * per
            mq = min(per, m - r0)
            dst = part[q]
            _gemm(fn, iv, tr, _TR, _N, k, min(cols, c - c0), mq, one, gy[r0 * k:], k, x[r0 * c + c0:], c, zero,
                  dst[c0:], c)
