"""The numba kernels of the implicit-GEMM algorithm (see :mod:`fastconv._algorithms.implicit` for the
method, the notation and the guarantees).

They live apart from the planning and cost code because numba's on-disk cache is keyed on the
source file's time stamp: an edit to the Python layer would otherwise recompile them.  (numba does
not track the functions a kernel inlines from other files: after an edit to ``gemm.py`` clear the
cache, ``python -m fastconv doctor --clear-cache`` or delete ``__pycache__/*.nbi``.)

Source layout.  Every kernel reads the input (or grad_output, for the transposed grad_input) as
flat planes of L elements, one per (image, channel): common.pad_planes' zero-padded planes whose
columns are split by phase ``iw % sw`` (or the raw planes when there is no padding and the column
stride is 1).  A tap t = (cc, rr, ss) of a group then starts at ``toff[t] = cc*L + (cs % sw)*hp*wq
+ rr*dh*wq + cs // sw`` (cs = ss*dw), and output position (i, j) of that tap reads
``toff[t] + i*rstep + j`` (rstep = sh*wq): each output row of each tap is one contiguous run.
"""
import numpy as np
from llvmlite import ir
from numba import prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from .._jit import kernel, micro
from ._im2col_kernels import _col2im_planes
from .common import claim as _claim
from .gemm import ISA, TILES, VBYTES, _macro, _pack_a, _tile_of, gemm_serial_packed

_u = np.uint64

_micro = micro

#: (rows of gy, taps) of grad_weight's dot-product tile per ISA: rows*taps accumulators, rows
#: vectors of gy and one tap vector live at once (AVX-512: 4*6 + 4 + 1 = 29 of 32 registers;
#: 16-register ISAs: 2*5 + 2 + 1 = 13)
DOT_TILES = {"avx512": (4, 6), "avx2": (2, 5), "portable": (2, 5)}


def _masked_tools(builder, fty, lanes):
    """(vector type, masked load, masked store, mask(limit)) for ``lanes`` elements of ``fty``."""
    vty = ir.VectorType(fty, lanes)
    vptr = vty.as_pointer()
    i1v = ir.VectorType(ir.IntType(1), lanes)
    i32 = ir.IntType(32)
    bits = "f32" if isinstance(fty, ir.FloatType) else "f64"
    mod = builder.module
    load = cgutils.get_or_insert_function(mod, ir.FunctionType(vty, [vptr, i32, i1v, vty]),
                                          f"llvm.masked.load.v{lanes}{bits}.p0")
    store = cgutils.get_or_insert_function(mod, ir.FunctionType(ir.VoidType(), [vty, vptr, i32, i1v]),
                                           f"llvm.masked.store.v{lanes}{bits}.p0")
    idx = ir.Constant(ir.VectorType(i32, lanes), list(range(lanes)))
    undef = ir.Constant(ir.VectorType(i32, lanes), ir.Undefined)
    zeros = ir.Constant(ir.VectorType(i32, lanes), [0] * lanes)

    def mask(limit):  # lanes l < limit (an i64; clamped to i32 range by the callers' sizes)
        lim = builder.trunc(limit, i32)
        v = builder.insert_element(undef, lim, ir.Constant(i32, 0))
        return builder.icmp_signed("<", idx, builder.shuffle_vector(v, undef, zeros))

    return vty, vptr, load, store, mask


def _float_arrays(*arrays):
    return all(isinstance(a, types.Array) and a.layout == "C" and a.ndim == 1 for a in arrays) and \
        arrays[0].dtype in (types.float32, types.float64) and all(a.dtype == arrays[0].dtype for a in arrays)


@intrinsic
def copy_masked(typingctx, dst, doff, src, soff, nload, nstore, room):
    """``dst[doff + l] = src[soff + l]`` for l < nload and ``= 0`` for nload <= l < nstore, with
    nload <= nstore <= room <= NR (the GEMM tile's width for the dtype): up to NV vector loads and
    stores.  No source element at or past nload is read (a partial vector is a masked load); the
    destination may be written up to ``room`` (a vector that fits there is stored whole, whatever
    it leaves past nstore), and a vector that does not fit is a masked store.  One tap's run of a
    packed B panel: LLVM copies runs this short one element at a time.  Why ``room``: AMD's Zen 3
    runs a 256-bit masked store (VMASKMOVPS) as microcode, ~10x a plain store; with a masked store
    per vector, gemm's 1x1-256 forward ran at 18 GFLOP/s there against im2col's 37."""
    if not _float_arrays(dst, src):
        return None
    isz = dst.dtype.bitwidth // 8
    nv = TILES[ISA][isz][1]
    lanes = VBYTES // isz

    def codegen(context, builder, sig, args):
        d = context.make_array(sig.args[0])(context, builder, args[0])
        s = context.make_array(sig.args[2])(context, builder, args[2])
        fty = context.get_data_type(sig.args[0].dtype)
        vty, vptr, load, store, mask = _masked_tools(builder, fty, lanes)
        i32, i64 = ir.IntType(32), ir.IntType(64)
        sp = builder.gep(s.data, [args[3]])
        dp = builder.gep(d.data, [args[1]])
        zero = ir.Constant(vty, [0.0] * lanes)
        for v in range(nv):
            off = ir.Constant(i64, v * lanes)
            # vectors past the store range are skipped: a 7-element run (a 7x7 plane's rows) is
            # then one load and one store, not NV
            with builder.if_then(builder.icmp_signed(">", args[5], off), likely=True):
                src_v = builder.bitcast(builder.gep(sp, [off]), vptr)
                dst_v = builder.bitcast(builder.gep(dp, [off]), vptr)
                end = ir.Constant(i64, (v + 1) * lanes)
                with builder.if_else(builder.icmp_signed(">=", args[4], end), likely=True) as (whole, part):
                    with whole:
                        val_w = builder.load(src_v, align=isz)
                        bb_w = builder.block
                    with part:
                        val_p = builder.call(load, [src_v, ir.Constant(i32, isz), mask(builder.sub(args[4], off)),
                                                    zero])
                        bb_p = builder.block
                val = builder.phi(vty)
                val.add_incoming(val_w, bb_w)
                val.add_incoming(val_p, bb_p)
                with builder.if_else(builder.icmp_signed(">=", args[6], end), likely=True) as (fits, edge):
                    with fits:
                        builder.store(val, dst_v, align=isz)
                    with edge:
                        builder.call(store, [val, dst_v, ir.Constant(i32, isz), mask(builder.sub(args[5], off))])
        return context.get_dummy_value()

    return types.void(dst, types.intp, src, types.intp, types.intp, types.intp, types.intp), codegen


@intrinsic
def prefetch(typingctx, arr, off):
    """A hint to fetch the cache line holding ``arr.flat[off]`` (never faults, reads nothing: the
    offset may lie past the array's end)."""
    if not (isinstance(arr, types.Array) and isinstance(off, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        a = context.make_array(sig.args[0])(context, builder, args[0])
        i8p = ir.IntType(8).as_pointer()
        i32 = ir.IntType(32)
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]),
                                            "llvm.prefetch.p0")
        ptr = builder.bitcast(builder.gep(a.data, [args[1]]), i8p)
        builder.call(fn, [ptr, ir.Constant(i32, 0), ir.Constant(i32, 3), ir.Constant(i32, 1)])
        return context.get_dummy_value()

    return types.void(arr, off), codegen


@intrinsic
def dot_tile(typingctx, a, aoffs, astep, b, boffs, bstep, nrows, ncols, res):
    """``res[i*NT + j] = sum over rows q < nrows, columns u < ncols of
    a[aoffs[i] + q*astep + u] * b[boffs[j] + q*bstep + u]`` for the whole DOT_TILES (MT x NT) tile:
    grad_weight's products over output positions, read straight from grad_output rows (a) and the
    input's tap runs (b), both contiguous along the positions, so neither is transposed or packed.
    MT*NT vector accumulators; a row's last vector is a masked load (nothing past ncols is read);
    each sum is reduced across lanes once at the end."""
    if not (_float_arrays(a, b, res) and isinstance(aoffs, types.Array) and aoffs.dtype == types.int64
            and isinstance(boffs, types.Array) and boffs.dtype == types.int64):
        return None
    isz = a.dtype.bitwidth // 8
    mt, nt = DOT_TILES[ISA]
    lanes = VBYTES // isz

    def codegen(context, builder, sig, args):
        av, aov, astepv, bv, bov, bstepv, nrowsv, ncolsv, resv = args
        A = context.make_array(sig.args[0])(context, builder, av)
        AO = context.make_array(sig.args[1])(context, builder, aov)
        B = context.make_array(sig.args[3])(context, builder, bv)
        BO = context.make_array(sig.args[4])(context, builder, bov)
        R = context.make_array(sig.args[8])(context, builder, resv)
        fty = context.get_data_type(sig.args[0].dtype)
        vty, vptr, load, store, mask = _masked_tools(builder, fty, lanes)
        i32, i64 = ir.IntType(32), ir.IntType(64)
        fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vty, [vty] * 3),
                                             f"llvm.fmuladd.v{lanes}f{8 * isz}")
        zero = ir.Constant(vty, [0.0] * lanes)
        c0, c1 = ir.Constant(i64, 0), ir.Constant(i64, 1)
        ap = [builder.gep(A.data, [builder.load(builder.gep(AO.data, [ir.Constant(i64, i)]))]) for i in range(mt)]
        bp = [builder.gep(B.data, [builder.load(builder.gep(BO.data, [ir.Constant(i64, j)]))]) for j in range(nt)]
        nvec = builder.udiv(builder.add(ncolsv, ir.Constant(i64, lanes - 1)), ir.Constant(i64, lanes))
        total = builder.mul(nvec, nrowsv)

        entry = builder.block
        loop = builder.append_basic_block("dot.loop")
        done = builder.append_basic_block("dot.done")
        builder.cbranch(builder.icmp_signed(">", total, c0), loop, done)
        builder.position_at_end(loop)
        q = builder.phi(i64)      # step
        v = builder.phi(i64)      # vector within the row
        ra = builder.phi(i64)     # row start in a
        rb = builder.phi(i64)     # row start in b
        acc = [[builder.phi(vty) for _ in range(nt)] for _ in range(mt)]
        for ph, init in ((q, c0), (v, c0), (ra, c0), (rb, c0)):
            ph.add_incoming(init, entry)
        for row in acc:
            for x in row:
                x.add_incoming(zero, entry)
        col = builder.mul(v, ir.Constant(i64, lanes))
        m = mask(builder.sub(ncolsv, col))
        oa = builder.add(ra, col)
        ob = builder.add(rb, col)
        avs = [builder.call(load, [builder.bitcast(builder.gep(ap[i], [oa]), vptr), ir.Constant(i32, isz), m, zero])
               for i in range(mt)]
        new = [[None] * nt for _ in range(mt)]
        for j in range(nt):
            bj = builder.call(load, [builder.bitcast(builder.gep(bp[j], [ob]), vptr), ir.Constant(i32, isz), m, zero])
            for i in range(mt):
                new[i][j] = builder.call(fma, [avs[i], bj, acc[i][j]])
        v1 = builder.add(v, c1)
        wrap = builder.icmp_signed("==", v1, nvec)
        q1 = builder.add(q, c1)
        body_end = builder.block
        q.add_incoming(q1, body_end)
        v.add_incoming(builder.select(wrap, c0, v1), body_end)
        ra.add_incoming(builder.select(wrap, builder.add(ra, astepv), ra), body_end)
        rb.add_incoming(builder.select(wrap, builder.add(rb, bstepv), rb), body_end)
        for i in range(mt):
            for j in range(nt):
                acc[i][j].add_incoming(new[i][j], body_end)
        builder.cbranch(builder.icmp_signed("<", q1, total), loop, done)

        builder.position_at_end(done)
        fin = [[builder.phi(vty) for _ in range(nt)] for _ in range(mt)]
        for i in range(mt):
            for j in range(nt):
                fin[i][j].add_incoming(zero, entry)
                fin[i][j].add_incoming(new[i][j], body_end)
        for i in range(mt):
            for j in range(nt):
                x = fin[i][j]
                h = lanes // 2
                while h >= 1:  # halves folded onto each other: log2(lanes) shuffles and adds
                    hi = builder.shuffle_vector(x, x, ir.Constant(ir.VectorType(i32, lanes),
                                                                   [(l + h) % lanes for l in range(lanes)]))
                    x = builder.fadd(x, hi)
                    h //= 2
                s = builder.extract_element(x, ir.Constant(i32, 0))
                builder.store(s, builder.gep(R.data, [ir.Constant(i64, i * nt + j)]))
        return context.get_dummy_value()

    sig = types.void(a, aoffs, types.intp, b, boffs, types.intp, types.intp, types.intp, res)
    return sig, codegen


@intrinsic
def _dot_shape(typingctx, c):
    """(MT, NT) of :func:`dot_tile`, as constants."""
    if not (isinstance(c, types.Array) and c.dtype in (types.float32, types.float64)):
        return None
    mt, nt = DOT_TILES[ISA]
    ret = types.UniTuple(types.intp, 2)

    def codegen(context, builder, sig, args):
        return context.make_tuple(builder, ret, [context.get_constant(types.intp, mt),
                                                 context.get_constant(types.intp, nt)])

    return ret(c), codegen


# ---------------------------------------------------------------------------------------- helpers
@_micro
def _pack_panel(src, sb, toff, p0, kb, u0, nn, ow, oh, rstep, istep, pb, nr):
    # pb[p*nr + jj] = src[sb + n*istep + toff[p0 + p] + i*rstep + j] for the position
    # u0 + jj = (n*oh + i)*ow + j (image n, output row i, column j), jj < nn, and 0 for
    # nn <= jj < nr: the panel's positions fall into runs along output rows, each run one vector
    # copy per tap (written in increasing jj: a run's whole-vector store past its end is overwritten
    # by the next run's, and the last run zeroes the tail)
    d = 0
    u = u0
    while d < nn:
        ig = u // ow
        j = u - ig * ow
        n = ig // oh
        run = min(ow - j, nn - d)
        so = sb + n * istep + (ig - n * oh) * rstep + j
        st = nr - d if d + run == nn else run  # the last run also zeroes the panel's tail
        for p in range(kb):
            sp = so + toff[p0 + p]
            copy_masked(pb, p * nr + d, src, sp, run, st, nr - d)
            # the same run two panels on: every tap reads its own plane, so a panel's gather is kb
            # short runs on as many pages, more streams than the hardware prefetcher follows
            # (1x1-256: 256 planes, its panels' reads ran at 5 GB/s, sequential reads at 21)
            prefetch(src, sp + 2 * nr)
            prefetch(src, sp + 2 * nr + run - 1)
        d += run
        u += run


# ---------------------------------------------------------------------------------------- kernels
@kernel
def pack_weights(w, pa, aoffs, rows, kdim, ars, acs, blk):
    # pa[i] = pack_a_all of the (rows[i] x kdim) matrix A[t, q] = w[aoffs[i] + t*ars + q*acs]:
    # a group's weights (kg x tn) for the forward pass, a channel block's rows of the transposed
    # weights (taps x kg) for grad_input's col2im.  Items are (matrix, kc block, MR-row panel), so
    # that one matrix is packed by every worker: 512x512x3x3 weights (9.4 MB) took 1.9 ms packed
    # by one worker (a prange over the one group), 0.9 ms by two.
    kc = blk[0]
    mr = _tile_of(pa)[0]
    nmat = pa.shape[0]
    nkb = (kdim + kc - 1) // kc
    npan = 1
    for i in range(nmat):
        npan = max(npan, (rows[i] + mr - 1) // mr)
    for it in prange(nmat * nkb * npan):
        i = it // (nkb * npan)
        rest = it - i * (nkb * npan)
        kbi = rest // npan
        i0 = (rest - kbi * npan) * mr
        m = rows[i]
        if i0 < m:
            pc = kbi * kc
            kb = min(kc, kdim - pc)
            mp = (m + mr - 1) // mr * mr
            # one panel: _pack_a's rows i0 .. i0 + mr of this kc block, at pack_a_all's offset
            _pack_a(w, aoffs[i], ars, acs, i0, min(mr, m - i0), pc, kb, pa[i], pc * mp + i0 * kb, mr)


@kernel
def pack_weights_flipped(w, pa, kgo, cgo, rs, blk, bad):
    # pa[gi] = pack_a_all of grad_input's kernel as a forward one (common.transposed_weight: w
    # flipped, in/out channels swapped per group), read straight from the layer's weights w
    # (g*kgo, cgo, r, s): row cc < cgo, column q = kk*rs + tt (kk < kgo) of group gi is
    # w[((gi*kgo + kk)*cgo + cc)*rs + rs - 1 - tt].  bad[item] = 1 where the item's panel holds an
    # inf or NaN (grad_input then scatters instead; see implicit.grad_input).  Items as
    # pack_weights'.  Flipping into a copy, checking it with np.isfinite and packing that took
    # three passes over 9.4 MB for 512x512x3x3 (~4 ms at 2 threads against an 8 ms product).
    kc = blk[0]
    mr = _tile_of(pa)[0]
    nmat = pa.shape[0]
    kdim = kgo * rs
    nkb = (kdim + kc - 1) // kc
    npan = (cgo + mr - 1) // mr
    mp = npan * mr
    for it in prange(nmat * nkb * npan):
        gi = it // (nkb * npan)
        rest = it - gi * (nkb * npan)
        kbi = rest // npan
        i0 = (rest - kbi * npan) * mr
        pc = kbi * kc
        kb = min(kc, kdim - pc)
        mm = min(mr, cgo - i0)
        d0 = pc * mp + i0 * kb
        dst = pa[gi]
        kk = pc // rs
        tt = pc - kk * rs
        for p in range(kb):
            # the mm rows of column q: one tap of mm consecutive input channels, rs apart in w
            s0 = _u(((gi * kgo + kk) * cgo + i0) * rs + rs - 1 - tt)
            d = _u(d0 + p * mr)
            for ii in range(_u(mm)):
                dst[d + ii] = w[s0 + ii * _u(rs)]
            for ii in range(mm, mr):
                dst[d + ii] = 0
            tt += 1
            if tt == rs:
                tt = 0
                kk += 1
        probe = w[0] * 0  # stays 0 unless the panel holds an inf or NaN (vectorised pass)
        for e in range(_u(d0), _u(d0 + kb * mr)):
            probe += dst[e] * 0
        bad[it] = 0 if probe == 0 else 1


#: Weights of an item (mblk rows x all taps, bytes) up to which a forward of two kc blocks of taps
#: runs panel by panel through both (:func:`forward`): half of a 2 MiB L2.  One process, 2 threads:
#: resnet50-1x1-256 (256 taps) 5.14 -> 4.84 ms, 5.32 -> 5.14; alexnet-c1 (363) even; at three
#: blocks and more behind (resnet50-3x3-64, 576 taps: 7.62 -> 7.82)
PANEL_MAJOR_BYTES = 1 << 20


@kernel
def forward(src, toff, pa, b, y, wbuf, ctr, has_bias, g, kg, oh, ow, goh, gow, rstep, npos, mblk, staged, blk):
    # src (n, c, L) planes; toff (tn,) tap offsets within a group; pa (g, packed A) the weights;
    # b (k,); y (n*k*oh*ow,) written here; wbuf (nw, kc*NR + MR*NR [+ mblk*npos staging]).
    # Item = (group, block of mblk rows of the weights, block of npos output positions).  Its block
    # of y is computed by k-blocks of kc taps; each B panel (kc x NR positions) is gathered straight
    # from src and used by every MR-row panel of the block while it sits in L1.  Positions of one
    # image are written in place (row pitch oh*ow, bias pre-filled); staged (small planes), a block
    # runs over the positions of all images in a row and goes through staging, then into y.
    # The gather sees goh x gow output planes: (oh, ow), or (1, oh*ow) where the source's rows
    # follow each other (1x1 kernels read in place), so that a panel is one run per tap.
    nn, c, ll = src.shape
    k = b.shape[0]
    cg = c // g
    tn = toff.shape[0]
    kc = blk[0]
    plane = oh * ow
    nbi = (plane + npos - 1) // npos
    npb = (nn * plane + npos - 1) // npos if staged else nn * nbi
    nrb = (kg + mblk - 1) // mblk
    items = g * nrb * npb
    nw = wbuf.shape[0]
    flat = src.reshape(nn * c * ll)
    panel_major = kc < tn <= 2 * kc and mblk * tn * pa.itemsize <= PANEL_MAJOR_BYTES
    for wid in prange(nw):
        ws = wbuf[wid]
        mr, nr = _tile_of(ws)
        tmpoff = kc * nr
        stoff = tmpoff + mr * nr
        mp = (kg + mr - 1) // mr * mr
        for _ in range(items):
            it = _claim(ctr)
            if it >= items:
                break
            pbi = it % npb
            ri = (it // npb) % nrb
            gi = it // (npb * nrb)
            q0 = ri * mblk
            mb = min(mblk, kg - q0)
            if staged:
                u0 = pbi * npos
                m = min(npos, nn * plane - u0)
                cc = ws
                coff = stoff
                ldc = npos
            else:
                n = pbi // nbi
                bi = pbi - n * nbi
                u0 = n * plane + bi * npos
                m = min(npos, plane - bi * npos)
                cc = y
                coff = (n * k + gi * kg + q0) * plane + bi * npos
                ldc = plane
                if has_bias:
                    for q in range(mb):
                        bq = b[gi * kg + q0 + q]
                        yq = _u(coff + q * plane)  # unsigned: a vector fill, not a scalar loop
                        for j in range(_u(m)):
                            y[yq + j] = bq
            sb = gi * cg * ll
            pag = pa[gi]
            # kc blocks outer, panels inner; or, panel_major, every kc block of one panel before the
            # next panel: its C tiles then stay in L1 between blocks instead of coming back from
            # memory (the item's weights, all blocks, fit in half of L2 then)
            nkb = (tn + kc - 1) // kc
            npn = (m + nr - 1) // nr
            for outer in range(npn if panel_major else nkb):
                for inner in range(nkb if panel_major else npn):
                    pc = (inner if panel_major else outer) * kc
                    jr = (outer if panel_major else inner) * nr
                    kb = min(kc, tn - pc)
                    nn_ = min(nr, m - jr)
                    acc = 1 if ((has_bias and not staged) or pc > 0) else 0
                    _pack_panel(flat, sb, toff, pc, kb, u0 + jr, nn_, gow, goh, rstep, c * ll, ws, nr)
                    _macro(kb, mb, nn_, pag, pc * mp + q0 * kb, ws, 0, tmpoff, cc, coff + jr, ldc, acc)
            if staged:
                # by runs within one image: a division per element (u // plane) cost more than the
                # products on 12x12 planes (16x128x12x12 1x1 forward 0.75 ms, 0.33 by runs)
                for q in range(mb):
                    bq = b[gi * kg + q0 + q]  # zeros without a bias
                    jj = 0
                    while jj < m:
                        u = u0 + jj
                        n = u // plane
                        off = u - n * plane
                        run = min(plane - off, m - jj)
                        yo = _u((n * k + gi * kg + q0 + q) * plane + off)
                        so = _u(stoff + q * npos + jj)
                        for t in range(_u(run)):
                            y[yo + t] = ws[so + t] + bq
                        jj += run


@kernel
def grad_weight(gy, src, toff, gw, nw, ctr, g, kg, oh, ow, rstep, rows, tblk):
    # gy (n*k*oh*ow,); src (n, c, L); toff (tn,); gw (k*tn,) zeroed, accumulated here; nw workers.
    # Item = (group, block of tblk taps): it owns those columns of the group's rows
    # of gw and sums over images and blocks of `rows` output rows in a fixed order.
    nn, c, ll = src.shape
    tn = toff.shape[0]
    k = gw.shape[0] // tn
    cg = c // g
    plane = oh * ow
    ntb = (tn + tblk - 1) // tblk
    items = g * ntb
    flat = src.reshape(nn * c * ll)
    for wid in prange(nw):
        mt, nt = _dot_shape(gw)
        aoffs = np.empty(mt, np.int64)
        boffs = np.empty(nt, np.int64)
        res = np.empty(mt * nt, gw.dtype)
        for _ in range(items):
            it = _claim(ctr)
            if it >= items:
                break
            ti = it % ntb
            gi = it // ntb
            t0 = ti * tblk
            t1 = min(tn, t0 + tblk)
            for n in range(nn):
                sb = (n * c + gi * cg) * ll
                gb = (n * k + gi * kg) * plane
                for i0 in range(0, oh, rows):
                    nr_ = min(rows, oh - i0)
                    for q0 in range(0, kg, mt):
                        mm = min(mt, kg - q0)
                        for i in range(mt):
                            aoffs[i] = gb + min(q0 + i, kg - 1) * plane + i0 * ow
                        for tt in range(t0, t1, nt):
                            nn_ = min(nt, t1 - tt)
                            for j in range(nt):
                                boffs[j] = sb + toff[min(tt + j, t1 - 1)] + i0 * rstep
                            dot_tile(gy, aoffs, ow, flat, boffs, rstep, nr_, ow, res)
                            for i in range(mm):
                                o = (gi * kg + q0 + i) * tn + tt
                                for j in range(nn_):
                                    gw[o + j] += res[i * nt + j]


@kernel
def col_tiles(gy, pa, gq, wbuf, ctr, g, k, r, s, sh, sw, dh, dw, hp, wq, oh, ow, cb, rb, blk, cbuf):
    # grad_input by col2im: gy (n*k*oh*ow,); pa (g*ncb, packed W.T rows of a channel block);
    # gq (n, c, L) zeroed padded planes, scattered into here; wbuf (nw, GEMM workspace);
    # cbuf (nw, cb*r*s*rb*ow) column tiles.  Item = (image, group, block of cb channels): it owns
    # those planes of gq.  Per block of rb output rows: col = W.T[block] . gy[rows], then col2im.
    nn, c, ll = gq.shape
    kg = k // g
    cg = c // g
    ncb = (cg + cb - 1) // cb
    plane = oh * ow
    items = nn * g * ncb
    nw = wbuf.shape[0]
    for wid in prange(nw):
        ws = wbuf[wid]
        col = cbuf[wid]
        for _ in range(items):
            it = _claim(ctr)
            if it >= items:
                break
            ci = it % ncb
            gi = (it // ncb) % g
            n = it // (ncb * g)
            c0 = ci * cb
            nc = min(cb, cg - c0)
            tb = nc * r * s
            gp = gq[n]
            for i0 in range(0, oh, rb):
                i1 = min(oh, i0 + rb)
                m = (i1 - i0) * ow
                gemm_serial_packed(tb, m, kg, pa[gi * ncb + ci], gy, (n * k + gi * kg) * plane + i0 * ow, plane, 1,
                                   0, col, 0, m, ws, blk)
                _col2im_planes(col, gp, 0, m, gi * cg + c0, nc, i0, i1, r, s, sh, sw, dh, dw, hp, wq, ow)
