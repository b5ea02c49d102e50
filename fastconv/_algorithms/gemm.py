"""A packed GEMM of our own: ``C (+)= A . B`` in float32 and float64, on numba's one thread pool.

Notation: C is m x n, A is m x k, B is k x n.  Every operand is a flat 1-D array plus an offset and
element strides: A[i, p] = a[aoff + i*ars + p*acs], B[p, j] = b[boff + p*brs + j*bcs],
C[i, j] = c[coff + i*ldc + j].  A transposed operand is the same data with its strides swapped,
so every transpose the convolutions need (w.T . gy, gy . col.T) costs nothing extra.

Structure (the BLIS loop nest):

* micro-kernel (:func:`ukernel`): an MR x NR tile of C, NR = NV vectors, kept in MR*NV vector
  registers over the whole KC loop; per k step it loads NV vectors of packed B, broadcasts MR
  scalars of packed A and issues MR*NV fused multiply-adds; the tile is stored (beta 0) or added
  (beta 1) once.  numba cannot express vector registers and LLVM does not keep ``acc[i, j] +=``
  sums in registers across a loop, so the kernel is emitted as LLVM IR (as common.mac_taps is).
  The vector width is a parameter of the emitter: the AVX-512 build is the same code with 64-byte
  vectors.
* packing: A in MC x KC blocks of MR-row micro-panels (``pa[panel*MR*kb + p*MR + i]``), B in
  KC x NC blocks of NR-column micro-panels (``pb[panel*NR*kb + p*NR + j]``); edges are zero-padded to
  whole panels so the micro-kernel never branches.  A bottom-edge tile runs a kernel with fewer
  rows (:func:`ukernel_rows`), a right-edge tile goes through a small buffer.  B's whole panels are
  copied in vectors row by row (:func:`_copy_nr`), or from a transposed B as lanes x lanes squares
  transposed in registers (:func:`_pack_bt_block`).  Products that share one A (im2col's weights)
  pack it once: :func:`pack_a_all` + :func:`gemm_serial_packed`.
* blocking: a KC x NR panel of B fills half of L1d, an MC x KC block of A half of L2, a KC x NC
  block of B at most half of L3 (:func:`blocking`), from :mod:`fastconv._cpu`.

Register tiles (:data:`TILES`): AVX2 has 16 vector registers: 6 x 2 accumulators + 2 B vectors +
1 broadcast = 15 (6x16 floats, 6x8 doubles).  AVX-512 has 32: 14 x 2 + 2 + 1 = 31 (14x32 floats).
Portable (16-byte vectors, 16 registers) keeps the AVX2 shape.  numba's on-disk cache is keyed by
the CPU's name and features, so a build for one ISA is never loaded on another.

Threads.  :func:`gemm` runs on numba's pool, in one parallel region: C is cut into blocks
(:func:`_split`: at least two per worker, along the side whose cut repacks less), and workers
claim blocks -- disjoint outputs, no races -- and run :func:`gemm_serial` on each, packing their own
panels.  :func:`gemm_serial` is also the single-thread entry for code already running inside a
numba worker (one GEMM per worker, as im2col does), with a per-worker workspace of
:func:`workspace_size` elements.  Every C element is summed by the same micro-kernel calls in the
same k order whatever the cut, so results are identical for every thread count.
"""
import threading
import time

import numba
import numpy as np
from llvmlite import ir
from numba import prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from .. import _cpu
from .._jit import kernel, serial
from .common import claim

#: (MR rows, NV vectors per row) of the micro-kernel per ISA and element size
TILES = {
    "avx512": {4: (14, 2), 8: (14, 2)},
    "avx2": {4: (6, 2), 8: (6, 2)},
    "portable": {4: (6, 2), 8: (6, 2)},
}
ISA = _cpu.isa()
VBYTES = _cpu.VECTOR_BYTES[ISA]


def tile(itemsize, isa=None):
    """(MR, NR) of the micro-kernel for an element size on ``isa`` (default: this CPU's)."""
    isa = ISA if isa is None else isa
    mr, nv = TILES[isa][itemsize]
    return mr, nv * _cpu.VECTOR_BYTES[isa] // itemsize


# ---------------------------------------------------------------------------------------- emitters
def _vector_tools(builder, fty, isz, vbytes):
    lanes = vbytes // isz
    vty = ir.VectorType(fty, lanes)
    fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vty, [vty] * 3),
                                         f"llvm.fmuladd.v{lanes}f{8 * isz}")
    i32 = ir.IntType(32)
    mask = ir.Constant(ir.VectorType(i32, lanes), [0] * lanes)

    def splat(scalar):
        v = builder.insert_element(ir.Constant(vty, ir.Undefined), scalar, ir.Constant(i32, 0))
        return builder.shuffle_vector(v, ir.Constant(vty, ir.Undefined), mask)

    return lanes, vty, fma, splat


def _emit_ukernel(context, builder, sig, args, mr, nv, vbytes, rows=None, ldb=None):
    # rows < mr: only the first rows of the tile (packed A panels keep their mr-row stride);
    # ldb: index of the argument holding B's row stride (default: packed panels, stride NR)
    rows = mr if rows is None else rows
    kcv, _, aoffv, _, boffv, _, coffv, ldcv, accv = args[:9]
    pa, pb, c = (context.make_array(sig.args[i])(context, builder, args[i]) for i in (1, 3, 5))
    fty = context.get_data_type(sig.args[5].dtype)
    isz = context.get_abi_sizeof(fty)
    lanes, vty, fma, splat = _vector_tools(builder, fty, isz, vbytes)
    nr = nv * lanes
    i64 = ir.IntType(64)
    vptr = vty.as_pointer()
    a0 = builder.gep(pa.data, [aoffv])
    b0 = builder.gep(pb.data, [boffv])
    zero = ir.Constant(vty, [0.0] * lanes)

    entry = builder.block
    loop = builder.append_basic_block("ukernel.loop")
    done = builder.append_basic_block("ukernel.done")
    builder.cbranch(builder.icmp_signed(">", kcv, ir.Constant(i64, 0)), loop, done)

    builder.position_at_end(loop)
    p = builder.phi(i64)
    p.add_incoming(ir.Constant(i64, 0), entry)
    acc = [[builder.phi(vty) for _ in range(nv)] for _ in range(rows)]
    for row in acc:
        for a in row:
            a.add_incoming(zero, entry)
    bp = builder.gep(b0, [builder.mul(p, ir.Constant(i64, nr) if ldb is None else args[ldb])])
    bs = [builder.load(builder.bitcast(builder.gep(bp, [ir.Constant(i64, v * lanes)]), vptr), align=isz)
          for v in range(nv)]
    ap = builder.gep(a0, [builder.mul(p, ir.Constant(i64, mr))])
    new = []
    for i in range(rows):
        av = splat(builder.load(builder.gep(ap, [ir.Constant(i64, i)])))
        new.append([builder.call(fma, [av, bs[v], acc[i][v]]) for v in range(nv)])
    p1 = builder.add(p, ir.Constant(i64, 1))
    body_end = builder.block
    p.add_incoming(p1, body_end)
    for i in range(rows):
        for v in range(nv):
            acc[i][v].add_incoming(new[i][v], body_end)
    builder.cbranch(builder.icmp_signed("<", p1, kcv), loop, done)

    builder.position_at_end(done)
    total = [[builder.phi(vty) for _ in range(nv)] for _ in range(rows)]
    for i in range(rows):
        for v in range(nv):
            total[i][v].add_incoming(zero, entry)
            total[i][v].add_incoming(new[i][v], body_end)
    ptrs = []
    c0 = builder.gep(c.data, [coffv])
    for i in range(rows):
        row = builder.gep(c0, [builder.mul(ldcv, ir.Constant(i64, i))])
        ptrs.append([builder.bitcast(builder.gep(row, [ir.Constant(i64, v * lanes)]), vptr) for v in range(nv)])
    with builder.if_else(builder.icmp_signed("!=", accv, ir.Constant(accv.type, 0))) as (add, plain):
        with add:  # beta = 1: C += tile
            for i in range(rows):
                for v in range(nv):
                    old = builder.load(ptrs[i][v], align=isz)
                    builder.store(builder.fadd(old, total[i][v]), ptrs[i][v], align=isz)
        with plain:  # beta = 0: C is never read (it may hold garbage or NaN)
            for i in range(rows):
                for v in range(nv):
                    builder.store(total[i][v], ptrs[i][v], align=isz)
    return context.get_dummy_value()


def _ukernel_types(kc, pa, aoff, pb, boff, c, coff, ldc, acc):
    arrays = (pa, pb, c)
    if not all(isinstance(a, types.Array) and a.layout == "C" and a.ndim == 1 for a in arrays):
        return False
    return c.dtype in (types.float32, types.float64) and pa.dtype == c.dtype and pb.dtype == c.dtype


@intrinsic
def ukernel(typingctx, kc, pa, aoff, pb, boff, c, coff, ldc, acc):
    """``C[i, j] (+)= sum_p pa[aoff + p*MR + i] * pb[boff + p*NR + j]`` for the whole MR x NR tile
    at ``c[coff + i*ldc + j]``, p < kc; adds to C when ``acc`` is nonzero, else overwrites it.

    MR x NR is this CPU's tile (:func:`tile`) for the dtype of ``c``; ``pa``, ``pb``, ``c`` are 1-D
    C-contiguous arrays of one dtype.  Nothing is bounds-checked: callers keep every access inside."""
    if not _ukernel_types(kc, pa, aoff, pb, boff, c, coff, ldc, acc):
        return None
    mr, nv = TILES[ISA][c.dtype.bitwidth // 8]
    sig = types.void(types.intp, pa, types.intp, pb, types.intp, c, types.intp, types.intp, types.intp)
    return sig, lambda context, builder, sig, args: _emit_ukernel(context, builder, sig, args, mr, nv, VBYTES)


@intrinsic
def ukernel_rows(typingctx, kc, pa, aoff, pb, boff, c, coff, ldc, acc, rows):
    """:func:`ukernel` for the first ``rows`` (1 .. MR-1, run time) rows of the tile only: the
    bottom edge of C without a spare tile and a copy (lenet5-c3's 16 = 6 + 6 + 4 rows).  One loop
    per row count, chosen by a switch."""
    if not _ukernel_types(kc, pa, aoff, pb, boff, c, coff, ldc, acc):
        return None
    mr, nv = TILES[ISA][c.dtype.bitwidth // 8]
    sig = types.void(types.intp, pa, types.intp, pb, types.intp, c, types.intp, types.intp, types.intp,
                     types.intp)

    def codegen(context, builder, sig, args):
        rowsv = args[9]
        exit_ = builder.append_basic_block("ukernel_rows.exit")
        switch = builder.switch(rowsv, exit_)
        for r in range(1, mr):
            case = builder.append_basic_block(f"ukernel_rows.{r}")
            switch.add_case(ir.Constant(rowsv.type, r), case)
            builder.position_at_end(case)
            _emit_ukernel(context, builder, sig, args, mr, nv, VBYTES, rows=r)
            builder.branch(exit_)
        builder.position_at_end(exit_)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def ukernel_ldb(typingctx, kc, pa, aoff, pb, boff, ldb, c, coff, ldc, acc, rows):
    """:func:`ukernel` (``rows`` == MR) or :func:`ukernel_rows` (``rows`` < MR) whose B is not a
    packed panel but NR columns of a row-major matrix with row stride ``ldb``:
    ``C[i, j] (+)= sum_p pa[aoff + p*MR + i] * pb[boff + p*ldb + j]``.  For B operands that their
    producer already writes row by row in L1/L2-sized blocks (Winograd's transformed tiles), where a
    copy into panels would cost as much as the product."""
    if not _ukernel_types(kc, pa, aoff, pb, boff, c, coff, ldc, acc):
        return None
    mr, nv = TILES[ISA][c.dtype.bitwidth // 8]
    sig = types.void(types.intp, pa, types.intp, pb, types.intp, types.intp, c, types.intp, types.intp,
                     types.intp, types.intp)

    def codegen(context, builder, sig, args):
        # the emitter reads (kc, pa, aoff, pb, boff, c, coff, ldc, acc) at fixed positions
        order = [args[i] for i in (0, 1, 2, 3, 4, 6, 7, 8, 9)] + [args[5]]
        osig = types.void(*[sig.args[i] for i in (0, 1, 2, 3, 4, 6, 7, 8, 9, 5)])
        rowsv = args[10]
        exit_ = builder.append_basic_block("ukernel_ldb.exit")
        switch = builder.switch(rowsv, exit_)
        for r in range(1, mr + 1):
            case = builder.append_basic_block(f"ukernel_ldb.{r}")
            switch.add_case(ir.Constant(rowsv.type, r), case)
            builder.position_at_end(case)
            _emit_ukernel(context, builder, osig, order, mr, nv, VBYTES, rows=r, ldb=9)
            builder.branch(exit_)
        builder.position_at_end(exit_)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def ukernel_spec(typingctx, kc, pa, aoff, pb, boff, c, coff, ldc, acc, mr, nv, vbytes):
    """:func:`ukernel` with an explicit tile: ``mr`` rows of ``nv`` vectors of ``vbytes`` bytes
    (literal ints).  Lets tests check another ISA's tile (e.g. AVX-512's 14 x 2 x 64 bytes) on
    this CPU, where LLVM splits the wide vectors into the ones it has."""
    if not _ukernel_types(kc, pa, aoff, pb, boff, c, coff, ldc, acc):
        return None
    if not all(isinstance(v, types.IntegerLiteral) for v in (mr, nv, vbytes)):
        return None
    MR, NV, VB = mr.literal_value, nv.literal_value, vbytes.literal_value
    sig = types.void(types.intp, pa, types.intp, pb, types.intp, c, types.intp, types.intp, types.intp,
                     mr, nv, vbytes)
    return sig, lambda context, builder, sig, args: _emit_ukernel(context, builder, sig, args, MR, NV, VB)


@intrinsic
def _lanes(typingctx, c):
    """Elements of one vector register for the dtype of array ``c``, as a constant."""
    if not (isinstance(c, types.Array) and c.dtype in (types.float32, types.float64)):
        return None
    lanes = VBYTES // (c.dtype.bitwidth // 8)
    return types.intp(c), lambda context, builder, sig, args: context.get_constant(types.intp, lanes)


@intrinsic
def _tile_of(typingctx, c):
    """(MR, NR) of :func:`ukernel` for the dtype of array ``c``, as constants."""
    if not (isinstance(c, types.Array) and c.dtype in (types.float32, types.float64)):
        return None
    mr, nr = tile(c.dtype.bitwidth // 8)
    ret = types.UniTuple(types.intp, 2)

    def codegen(context, builder, sig, args):
        return context.make_tuple(builder, ret, [context.get_constant(types.intp, mr),
                                                 context.get_constant(types.intp, nr)])

    return ret(c), codegen


@intrinsic
def _copy_nr(typingctx, dst, doff, src, soff):
    """``dst[doff:doff + NR] = src[soff:soff + NR]`` as NV unaligned vector loads and stores (NR of
    :func:`tile` for the dtype).  Packing B's full panels: LLVM copies runs as short as NR (16
    floats) one element at a time (its vector loops want 4 vectors and a runtime overlap check)."""
    if not (isinstance(dst, types.Array) and isinstance(src, types.Array) and dst.layout == "C"
            and src.layout == "C" and dst.dtype == src.dtype and dst.dtype in (types.float32, types.float64)):
        return None
    isz = dst.dtype.bitwidth // 8
    nv = TILES[ISA][isz][1]

    def codegen(context, builder, sig, args):
        d = context.make_array(sig.args[0])(context, builder, args[0])
        s = context.make_array(sig.args[2])(context, builder, args[2])
        fty = context.get_data_type(sig.args[0].dtype)
        lanes = VBYTES // isz
        vptr = ir.VectorType(fty, lanes).as_pointer()
        i64 = ir.IntType(64)
        sp = builder.gep(s.data, [args[3]])
        dp = builder.gep(d.data, [args[1]])
        vals = [builder.load(builder.bitcast(builder.gep(sp, [ir.Constant(i64, v * lanes)]), vptr), align=isz)
                for v in range(nv)]
        for v in range(nv):
            builder.store(vals[v], builder.bitcast(builder.gep(dp, [ir.Constant(i64, v * lanes)]), vptr), align=isz)
        return context.get_dummy_value()

    return types.void(dst, types.intp, src, types.intp), codegen


@intrinsic
def _pack_bt_block(typingctx, pb, d, b, s0, bcs):
    """One lanes x NR block of a B panel from a transposed B: for pp < lanes, jj < NR,
    ``pb[d + pp*NR + jj] = b[s0 + jj*bcs + pp]`` (lanes = elements per vector).  Reads NR rows of
    lanes elements as vectors and transposes each lanes x lanes square in registers with
    log2(lanes) rounds of shuffles (round h swaps bit h of the row and column index), where an
    element-wise copy would read or write one element at a time (grad_weight's ``gy . col.T``)."""
    if not (isinstance(pb, types.Array) and isinstance(b, types.Array) and pb.layout == "C"
            and b.layout == "C" and pb.dtype == b.dtype and pb.dtype in (types.float32, types.float64)):
        return None
    isz = pb.dtype.bitwidth // 8
    nv = TILES[ISA][isz][1]

    def codegen(context, builder, sig, args):
        dst = context.make_array(sig.args[0])(context, builder, args[0])
        src = context.make_array(sig.args[2])(context, builder, args[2])
        fty = context.get_data_type(sig.args[0].dtype)
        lanes = VBYTES // isz
        nr = nv * lanes
        vty = ir.VectorType(fty, lanes)
        vptr = vty.as_pointer()
        i32, i64 = ir.IntType(32), ir.IntType(64)
        base = builder.gep(src.data, [args[3]])
        dp = builder.gep(dst.data, [args[1]])
        for g in range(nv):
            rows = [builder.load(builder.bitcast(builder.gep(base, [builder.mul(args[4], ir.Constant(i64, g * lanes + j))]),
                                                 vptr), align=isz) for j in range(lanes)]
            h = 1
            while h < lanes:
                new = list(rows)
                for i in range(lanes):
                    if i & h:
                        continue
                    lo = [j if not (j & h) else lanes + j - h for j in range(lanes)]
                    hi = [j + h if not (j & h) else lanes + j for j in range(lanes)]
                    new[i] = builder.shuffle_vector(rows[i], rows[i + h], ir.Constant(ir.VectorType(i32, lanes), lo))
                    new[i + h] = builder.shuffle_vector(rows[i], rows[i + h], ir.Constant(ir.VectorType(i32, lanes), hi))
                rows = new
                h *= 2
            for pp in range(lanes):
                builder.store(rows[pp], builder.bitcast(builder.gep(dp, [ir.Constant(i64, pp * nr + g * lanes)]), vptr),
                              align=isz)
        return context.get_dummy_value()

    return types.void(pb, types.intp, b, types.intp, types.intp), codegen


@intrinsic
def _fma_loop(typingctx, n, seed, out):
    """The micro-kernel on registers alone: ``n`` steps of MR*NV fused multiply-adds on the
    accumulators with no loads or stores in the loop (MR broadcasts and NV vectors from ``seed``,
    loaded once); the sums land in ``out[0]`` so nothing is optimised away.  Measures the FMA peak
    the micro-kernel can reach: 2 * n * MR * NR flops."""
    if not (isinstance(seed, types.Array) and isinstance(out, types.Array) and seed.dtype == out.dtype
            and seed.dtype in (types.float32, types.float64) and seed.layout == "C" and out.layout == "C"):
        return None
    mr, nv = TILES[ISA][seed.dtype.bitwidth // 8]

    def codegen(context, builder, sig, args):
        nval = args[0]
        s, o = (context.make_array(sig.args[i])(context, builder, args[i]) for i in (1, 2))
        fty = context.get_data_type(sig.args[1].dtype)
        isz = context.get_abi_sizeof(fty)
        lanes, vty, fma, splat = _vector_tools(builder, fty, isz, VBYTES)
        i64 = ir.IntType(64)
        bs = [splat(builder.load(builder.gep(s.data, [ir.Constant(i64, v)]))) for v in range(nv)]
        avs = [splat(builder.load(builder.gep(s.data, [ir.Constant(i64, nv + i)]))) for i in range(mr)]
        zero = ir.Constant(vty, [0.0] * lanes)
        entry = builder.block
        loop = builder.append_basic_block("peak.loop")
        done = builder.append_basic_block("peak.done")
        builder.cbranch(builder.icmp_signed(">", nval, ir.Constant(i64, 0)), loop, done)
        builder.position_at_end(loop)
        t = builder.phi(i64)
        t.add_incoming(ir.Constant(i64, 0), entry)
        acc = [[builder.phi(vty) for _ in range(nv)] for _ in range(mr)]
        new = [[builder.call(fma, [avs[i], bs[v], acc[i][v]]) for v in range(nv)] for i in range(mr)]
        t1 = builder.add(t, ir.Constant(i64, 1))
        body_end = builder.block
        t.add_incoming(t1, body_end)
        for i in range(mr):
            for v in range(nv):
                acc[i][v].add_incoming(zero, entry)
                acc[i][v].add_incoming(new[i][v], body_end)
        builder.cbranch(builder.icmp_signed("<", t1, nval), loop, done)
        builder.position_at_end(done)
        phis = []
        for i in range(mr):  # all phis first: LLVM requires them at the top of the block
            for v in range(nv):
                ph = builder.phi(vty)
                ph.add_incoming(zero, entry)
                ph.add_incoming(new[i][v], body_end)
                phis.append(ph)
        tot = zero
        for ph in phis:
            tot = builder.fadd(tot, ph)
        sc = builder.extract_element(tot, ir.Constant(ir.IntType(32), 0))
        builder.store(sc, o.data)
        return context.get_dummy_value()

    return types.void(types.intp, seed, out), codegen


# ---------------------------------------------------------------------------------------- packing
_serial = serial


@_serial
def _pack_a(a, aoff, ars, acs, i0, mb, p0, kb, pa, paoff, mr):
    # pa[paoff + ib*kb + p*mr + ii] = A[i0 + ib + ii, p0 + p] for the mr-row panel starting at row
    # ib; rows past mb are zeros.  The read order follows A's unit stride.
    for ib in range(0, mb, mr):
        mm = min(mr, mb - ib)
        d0 = paoff + ib * kb
        if acs == 1:
            for ii in range(mm):
                s0 = aoff + (i0 + ib + ii) * ars + p0
                for p in range(kb):
                    pa[d0 + p * mr + ii] = a[s0 + p]
        else:
            for p in range(kb):
                s0 = aoff + (i0 + ib) * ars + (p0 + p) * acs
                d = d0 + p * mr
                for ii in range(mm):
                    pa[d + ii] = a[s0 + ii * ars]
        if mm < mr:
            for p in range(kb):
                for ii in range(mm, mr):
                    pa[d0 + p * mr + ii] = 0


@_serial
def _pack_b(b, boff, brs, bcs, p0, kb, j0, nb, pb, pboff, nr):
    # pb[pboff + jb*kb + p*nr + jj] = B[p0 + p, j0 + jb + jj] for the nr-column panel starting at
    # column jb; columns past nb are zeros.
    full = nb // nr if bcs == 1 else 0
    if full:  # whole panels row by row: each row of B is read once, front to back
        for p in range(kb):
            s0 = boff + (p0 + p) * brs + j0
            d = pboff + p * nr
            for q in range(full):
                _copy_nr(pb, d + q * nr * kb, b, s0 + q * nr)
    for jb in range(full * nr, nb, nr):
        nn = min(nr, nb - jb)
        d0 = pboff + jb * kb
        if bcs == 1:
            for p in range(kb):
                s0 = boff + (p0 + p) * brs + j0 + jb
                d = d0 + p * nr
                for jj in range(nn):
                    pb[d + jj] = b[s0 + jj]
                for jj in range(nn, nr):
                    pb[d + jj] = 0
        else:
            p1 = 0
            if brs == 1 and nn == nr:  # B given transposed: lanes x lanes squares in registers
                lanes = _lanes(pb)
                p1 = kb // lanes * lanes
                for p in range(0, p1, lanes):
                    _pack_bt_block(pb, d0 + p * nr, b, boff + p0 + p + (j0 + jb) * bcs, bcs)
            for jj in range(nn):
                s0 = boff + p0 * brs + (j0 + jb + jj) * bcs
                for p in range(p1, kb):
                    pb[d0 + p * nr + jj] = b[s0 + p * brs]
            if nn < nr:
                for p in range(kb):
                    for jj in range(nn, nr):
                        pb[d0 + p * nr + jj] = 0


@_serial
def _macro(kb, mb, nb, pa, paoff, ws, pboff, tmpoff, c, coff, ldc, acc):
    # C block (mb x nb at c[coff]) (+)= packed A block (pa[paoff:]) . packed B block (ws[pboff:]),
    # one micro-tile at a time; the B micro-panel (kb x nr) stays in L1 while the tiles down its
    # column are computed.  Partial tiles go through ws[tmpoff:tmpoff + mr*nr].  No slices here:
    # each view of an array is an atomic reference count update on its shared owner, and two
    # workers doing that on one owner's cache line ran 10x slower than one.
    mr, nr = _tile_of(c)
    for jr in range(0, nb, nr):
        nn = min(nr, nb - jr)
        for i0 in range(0, mb, mr):
            mm = min(mr, mb - i0)
            co = coff + i0 * ldc + jr
            if mm == mr and nn == nr:
                ukernel(kb, pa, paoff + i0 * kb, ws, pboff + jr * kb, c, co, ldc, acc)
            elif nn == nr:
                ukernel_rows(kb, pa, paoff + i0 * kb, ws, pboff + jr * kb, c, co, ldc, acc, mm)
            else:
                ukernel(kb, pa, paoff + i0 * kb, ws, pboff + jr * kb, ws, tmpoff, nr, 0)
                for ii in range(mm):
                    if acc:
                        for jj in range(nn):
                            c[co + ii * ldc + jj] += ws[tmpoff + ii * nr + jj]
                    else:
                        for jj in range(nn):
                            c[co + ii * ldc + jj] = ws[tmpoff + ii * nr + jj]


@_serial
def _zero_block(c, coff, ldc, m, n):
    for i in range(m):
        for j in range(n):
            c[coff + i * ldc + j] = 0


@_serial
def _round_up(a, b):
    return (a + b - 1) // b * b


@_serial
def _blocks(m, n, k, a, aoff, ars, acs, pa, b, boff, brs, bcs, beta, c, coff, ldc, ws, blk):
    # the loop nest; pa.size > 0: A comes packed (pack_a_all), else it is packed here into ws
    kc, mc, nc = blk[0], blk[1], blk[2]
    mr, nr = _tile_of(c)
    pboff = mc * kc
    tmpoff = mc * kc + kc * nc
    mp = (m + mr - 1) // mr * mr
    if k == 0:
        if beta == 0:
            _zero_block(c, coff, ldc, m, n)
        return
    for jc in range(0, n, nc):
        nb = min(nc, n - jc)
        for pc in range(0, k, kc):
            kb = min(kc, k - pc)
            _pack_b(b, boff, brs, bcs, pc, kb, jc, nb, ws, pboff, nr)
            acc = 1 if (beta != 0 or pc > 0) else 0
            for ic in range(0, m, mc):
                mb = min(mc, m - ic)
                # one call site of the macro-kernel: each one inlines six FMA loops (compile time)
                src, off = pa, pc * mp + ic * kb
                if pa.size == 0:
                    _pack_a(a, aoff, ars, acs, ic, mb, pc, kb, ws, 0, mr)
                    src, off = ws, 0
                _macro(kb, mb, nb, src, off, ws, pboff, tmpoff, c, coff + ic * ldc + jc, ldc, acc)


@_serial
def gemm_serial(m, n, k, a, aoff, ars, acs, b, boff, brs, bcs, beta, c, coff, ldc, ws, blk):
    """``C = A . B`` (beta 0) or ``C += A . B`` (beta 1) on the calling thread (see the module
    docstring for the operand layout).  ``blk`` = :func:`blocking`; ``ws`` a 1-D array of
    :func:`workspace_size` elements of C's dtype, owned by the caller (one per worker)."""
    _blocks(m, n, k, a, aoff, ars, acs, ws[:0], b, boff, brs, bcs, beta, c, coff, ldc, ws, blk)


@_serial
def pack_a_all(m, k, a, aoff, ars, acs, pa, blk):
    """Pack all of A (m x k) once for :func:`gemm_serial_packed`: when many products share one A
    (im2col's weights, one product per tile) it is then packed once, not once per product.
    ``pa`` needs :func:`packed_a_size` elements."""
    kc = blk[0]
    mr = _tile_of(pa)[0]
    mp = (m + mr - 1) // mr * mr
    for pc in range(0, k, kc):
        _pack_a(a, aoff, ars, acs, 0, m, pc, min(kc, k - pc), pa, pc * mp, mr)


@_serial
def gemm_serial_packed(m, n, k, pa, b, boff, brs, bcs, beta, c, coff, ldc, ws, blk):
    """:func:`gemm_serial` with A packed beforehand by :func:`pack_a_all` (same m, k, blk)."""
    _blocks(m, n, k, pa, 0, 0, 0, pa, b, boff, brs, bcs, beta, c, coff, ldc, ws, blk)


@kernel
def _gemm_parallel(m, n, k, a, ars, acs, b, brs, bcs, beta, c, ldc, wbuf, blk, bm, bn, ctr):
    # Items: the (bm x bn) blocks of C (bm a multiple of MR, bn of NR), disjoint; each is one
    # gemm_serial on the worker that claims it, in worker wid's workspace wbuf[wid].  The A rows
    # and B columns of a block are packed by its worker: a B column block is packed once per
    # block row of C and an A row block once per block column -- the caller splits C so that this
    # extra packing stays small.
    nw = wbuf.shape[0]
    ni = (m + bm - 1) // bm
    nj = (n + bn - 1) // bn
    items = ni * nj
    for wid in prange(nw):
        ws = wbuf[wid]
        for _ in range(items):
            it = claim(ctr)
            if it >= items:
                break
            i0 = (it // nj) * bm
            j0 = (it % nj) * bn
            gemm_serial(min(bm, m - i0), min(bn, n - j0), k, a, i0 * ars, ars, acs, b, j0 * bcs, brs, bcs,
                        beta, c, i0 * ldc + j0, ldc, ws, blk)


@kernel
def _peak(n, seed, out):
    for wid in prange(out.shape[0]):
        _fma_loop(n, seed, out[wid:wid + 1])


# ---------------------------------------------------------------------------------------- Python
def blocking(dtype, caches=None, isa=None):
    """``int64[kc, mc, nc]``: cache blocks for ``dtype`` from the cache sizes (:mod:`_cpu`).

    kc: a kc x NR panel of packed B in half of L1d (the other half streams A and C);
    mc: an mc x kc block of packed A in half of L2; nc: a kc x nc block of B in at most half of L3,
    capped at 4096 columns.  kc lies in [64, 512], mc is a multiple of MR, nc of NR."""
    isz = np.dtype(dtype).itemsize
    caches = _cpu.cache_sizes() if caches is None else caches
    mr, nr = tile(isz, isa)
    kc = int(min(512, max(64, caches["l1d"] // 2 // (nr * isz))))
    mc = int(min(1024 // mr * mr, max(mr, caches["l2"] // 2 // (kc * isz) // mr * mr)))
    nc = int(min(4096 // nr * nr, max(nr, caches["l3"] // 2 // (kc * isz) // nr * nr)))
    return np.array([kc, mc, nc], dtype=np.int64)


def packed_a_size(dtype, m, k):
    """Elements of :func:`pack_a_all`'s output for an m x k A: m rounded up to whole MR panels."""
    mr, _ = tile(np.dtype(dtype).itemsize)
    return -(-m // mr) * mr * k


def workspace_size(dtype, blk=None):
    """Elements of the per-call workspace :func:`gemm_serial` needs: A block, B block, edge tile."""
    kc, mc, nc = (int(v) for v in (blocking(dtype) if blk is None else blk))
    mr, nr = tile(np.dtype(dtype).itemsize)
    return mc * kc + kc * nc + mr * nr


def _flat(x):
    """(1-D C-contiguous view starting at x's first element, row stride, column stride) in
    elements; arrays with negative or unaligned strides are copied first."""
    isz = x.itemsize
    if any(s < 0 or s % isz for s in x.strides):
        x = np.ascontiguousarray(x)
    rs, cs = (s // isz for s in x.strides)
    span = 1 + (x.shape[0] - 1) * rs + (x.shape[1] - 1) * cs
    return np.lib.stride_tricks.as_strided(x, shape=(span,), strides=(isz,)), rs, cs


def _ceil(a, b):
    return -(-a // b)


def _split(m, n, k, mr, nr, mc, nthreads):
    """(bm, bn): blocks of C handed to the workers.  One block on one thread; else at least two
    blocks per worker (a busy core then does fewer), cutting the side whose cut repacks less:
    cutting n repacks A (m*k) once per extra column block, cutting m repacks B (k*n) once per extra
    row block.  bm stays a multiple of MR (and of mc when m is cut coarsely), bn of NR."""
    if nthreads <= 1:
        return -(-m // mr) * mr, -(-n // nr) * nr
    want = 2 * nthreads
    best = None
    for ni in range(1, want + 1):
        nj = -(-want // ni)
        bm = _ceil(_ceil(m, ni), mr) * mr
        bn = _ceil(_ceil(n, nj), nr) * nr
        ni_, nj_ = _ceil(m, bm), _ceil(n, bn)
        if ni_ * nj_ < min(want, -(-m // mr) * -(-n // nr)):
            continue
        extra = (nj_ - 1) * m * k + (ni_ - 1) * k * n
        if best is None or extra < best[0]:
            best = (extra, bm, bn)
    if best is None:
        return mr, nr
    return best[1], best[2]


_WS = threading.local()


def _workspace(dtype, nw, size):
    """Per-worker packing buffers, kept for the next call on this Python thread: fresh pages
    would be faulted in on every call."""
    key = np.dtype(dtype)
    ws = getattr(_WS, "bufs", None)
    if ws is None:
        ws = _WS.bufs = {}
    buf = ws.get(key)
    if buf is None or buf.shape[0] < nw or buf.shape[1] < size:
        buf = ws[key] = np.empty((nw, size), dtype=dtype)
    return buf[:nw]


def gemm(a, b, c=None, beta=0, threads=None, blk=None):
    """``a @ b`` (beta 0) or ``c + a @ b`` (beta 1, into ``c``) with fastconv's own GEMM.

    Parameters
    ----------
    a : (m, k) float32 or float64 array, any strides (``x.T`` costs nothing)
    b : (k, n) array of the same dtype, any strides
    c : (m, n) array with unit column stride, optional
        The output; allocated when None.  With ``beta=1`` it is added to.
    beta : 0 or 1
    threads : int, optional
        Workers of numba's pool to use (default: numba's current thread count).
    blk : int64[kc, mc, nc], optional
        Cache blocks (default :func:`blocking`); mc a multiple of MR, nc of NR.  Tests pass small
        ones to cross every block boundary on small matrices.

    Returns
    -------
    c : (m, n) array

    Examples
    --------
    >>> import numpy as np
    >>> from fastconv._algorithms.gemm import gemm
    >>> a = np.arange(6, dtype=np.float32).reshape(2, 3)
    >>> gemm(a, a.T)
    array([[ 5., 14.],
           [14., 50.]], dtype=float32)
    """
    a, b = np.asarray(a), np.asarray(b)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0]:
        raise ValueError(f"gemm: a and b must be (m, k) and (k, n), got {a.shape} and {b.shape}")
    if a.dtype != b.dtype or a.dtype not in (np.float32, np.float64):
        raise TypeError(f"gemm: a and b must both be float32 or float64, got {a.dtype} and {b.dtype}")
    if beta not in (0, 1):
        raise ValueError(f"gemm: beta must be 0 or 1, got {beta!r}")
    m, k = a.shape
    n = b.shape[1]
    if c is None:
        if beta:
            raise ValueError("gemm: beta=1 needs c")
        c = np.empty((m, n), dtype=a.dtype)
    elif c.shape != (m, n) or c.dtype != a.dtype or (n > 1 and c.strides[1] != c.itemsize) or \
            (m > 1 and (c.strides[0] < n * c.itemsize or c.strides[0] % c.itemsize)):
        raise ValueError(f"gemm: c must be a writable ({m}, {n}) {a.dtype} array with unit column "
                         f"stride, got {c.shape} {c.dtype} strides {c.strides}")
    if m == 0 or n == 0:
        return c
    if k == 0:
        if not beta:
            c[...] = 0
        return c
    af, ars, acs = _flat(a)
    bf, brs, bcs = _flat(b)
    ldc = c.strides[0] // c.itemsize if m > 1 else n
    span = (m - 1) * ldc + n
    cf = np.lib.stride_tricks.as_strided(c, shape=(span,), strides=(c.itemsize,))
    mr, nr = tile(a.itemsize)
    blk = blocking(a.dtype) if blk is None else np.asarray(blk, dtype=np.int64)
    kc, mc, nc = (int(v) for v in blk)
    if min(kc, mc, nc) < 1 or mc % mr or nc % nr:
        raise ValueError(f"gemm: blk must hold positive kc, mc (multiple of {mr}), nc (multiple of {nr}), "
                         f"got {blk.tolist()}")
    nthreads = numba.get_num_threads() if threads is None else int(threads)
    bm, bn = _split(m, n, k, mr, nr, mc, nthreads)
    items = -(-m // bm) * -(-n // bn)
    nw = max(1, min(nthreads, items))
    wbuf = _workspace(a.dtype, nw, workspace_size(a.dtype, blk))
    prev = numba.get_num_threads()
    numba.set_num_threads(max(1, min(nw, numba.config.NUMBA_NUM_THREADS)))
    try:
        _gemm_parallel(m, n, k, af, ars, acs, bf, brs, bcs, int(beta), cf, ldc, wbuf, blk, bm, bn,
                       np.zeros(1, np.int64))
    finally:
        numba.set_num_threads(prev)
    return c


CLOCK = time.perf_counter  # benchmarks on a shared machine set time.process_time


def peak_gflops(dtype=np.float32, threads=1, steps=20_000_000 // 12):
    """GFLOP/s of the micro-kernel's FMAs on registers alone (no loads), summed over ``threads``
    workers: the ceiling a GEMM built on it can reach on this machine."""
    seed = np.full(32, 1e-8, dtype=dtype)
    out = np.zeros(threads, dtype=dtype)
    mr, nr = tile(np.dtype(dtype).itemsize)
    prev = numba.get_num_threads()
    numba.set_num_threads(threads)
    try:
        _peak(10, seed, out)
        t0 = CLOCK()
        _peak(steps, seed, out)
        dt = CLOCK() - t0
        if CLOCK is time.process_time:  # CPU seconds of all workers: per worker
            dt /= threads
    finally:
        numba.set_num_threads(prev)
    return 2.0 * steps * mr * nr * threads / dt / 1e9
