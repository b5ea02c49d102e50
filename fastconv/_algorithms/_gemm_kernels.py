"""The numba side of :mod:`fastconv._algorithms.gemm`: the register tiles, the micro-kernels and
packing copies emitted as LLVM IR (numba intrinsics), and the serial and parallel kernels that
inline them (packing, the macro-kernel, the blocked loops, the threaded driver's region).

They live in one file because numba's cache is kept per source file and does not see an edit to an
inlined helper in another one (shared/NUMBA_NOTES.md).  ``gemm.py`` holds the Python side
(blocking, workspace, the split into blocks, :func:`fastconv._algorithms.gemm.gemm`) and re-exports
every name here that other modules import from it.
"""
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
_u = np.uint64
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


def _emit_ukernel(context, builder, sig, args, mr, nv, vbytes, rows=None, ldb=None, rowptr=None, taps=None,
                  lda=None):
    # rows < mr: only the first rows of the tile (packed A panels keep their mr-row stride);
    # ldb: index of the argument holding B's row stride (default: packed panels, stride NR);
    # lda: index of the argument holding A's stride along p (default: packed panels, stride MR);
    # rowptr: (offsets array, tap offset, zeros array) argument indices: A is not packed, its row i
    # starts at pa[offsets[aoff + i] + tap offset] and runs along p (channels_last input rows, read
    # in place); a negative offset reads the zeros array instead (a tap in the padding);
    # taps (with rowptr): (tap list, its offset, tap count, offsets' tap pitch) argument indices:
    # the k loop runs over the listed taps t, each kc long, row i reading offsets[aoff + t*pitch + i]
    # and B from row t*kc of the panel, the tile kept in registers across all of them
    rows = mr if rows is None else rows
    if taps is not None:
        return _emit_ukernel_taps(context, builder, sig, args, mr, nv, vbytes, rows, rowptr, taps)
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
    rowp = _c_prefetch(context, builder, c, coffv, ldcv, rows, nr)

    if rowptr is not None:
        offs = context.make_array(sig.args[rowptr[0]])(context, builder, args[rowptr[0]])
        zeros = context.make_array(sig.args[rowptr[2]])(context, builder, args[rowptr[2]])
        arows = []
        for i in range(rows):
            o = builder.load(builder.gep(offs.data, [builder.add(aoffv, ir.Constant(i64, i))]))
            arows.append(builder.select(builder.icmp_signed("<", o, ir.Constant(i64, 0)), zeros.data,
                                        builder.gep(pa.data, [builder.add(o, args[rowptr[1]])])))
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
    if rowptr is None:
        ap = builder.gep(a0, [builder.mul(p, ir.Constant(i64, mr) if lda is None else args[lda])])
        arow = [builder.gep(ap, [ir.Constant(i64, i)]) for i in range(rows)]
    else:
        arow = [builder.gep(r0, [p]) for r0 in arows]
    new = _fma_step(builder, bp, arow, acc, (lanes, vty, fma, splat), isz, nv)
    p1 = builder.add(p, ir.Constant(i64, 1))
    body_end = builder.block
    p.add_incoming(p1, body_end)
    for i in range(rows):
        for v in range(nv):
            acc[i][v].add_incoming(new[i][v], body_end)
    builder.cbranch(builder.icmp_signed("<", p1, kcv), loop, done)

    builder.position_at_end(done)
    total = _tile_sums(builder, vty, zero, entry, new, body_end, rows, nv)
    _store_tile(builder, rowp, total, accv, vptr, lanes, isz, rows, nv)
    return context.get_dummy_value()


def _fma_step(builder, bp, arow, acc, tools, isz, nv):
    # one k step of the tile: NV vectors of B from bp, each row's A scalar (pointers arow)
    # broadcast, rows*NV fused multiply-adds into acc; returns the new sums
    lanes, vty, fma, splat = tools
    i64 = ir.IntType(64)
    bs = [builder.load(builder.bitcast(builder.gep(bp, [ir.Constant(i64, v * lanes)]), vty.as_pointer()),
                       align=isz) for v in range(nv)]
    return [[builder.call(fma, [splat(builder.load(a)), bs[v], row[v]]) for v in range(nv)]
            for a, row in zip(arow, acc)]


def _tile_sums(builder, vty, zero, entry, new, end, rows, nv):
    # the tile after the loops: zeros when they did not run (entered from ``entry``), else ``new``
    total = [[builder.phi(vty) for _ in range(nv)] for _ in range(rows)]
    for i in range(rows):
        for v in range(nv):
            total[i][v].add_incoming(zero, entry)
            total[i][v].add_incoming(new[i][v], end)
    return total


def _c_prefetch(context, builder, c, coffv, ldcv, rows, nr):
    # C's rows prefetched (for writing) before the k loop: the tile is stored once at its end, and
    # with C out of cache the 2*MR line misses stalled it; 1024^3, 1 thread: 62-68 -> 72-74 GF/s
    i64 = ir.IntType(64)
    c0 = builder.gep(c.data, [coffv])
    rowp = [builder.gep(c0, [builder.mul(ldcv, ir.Constant(i64, i))]) for i in range(rows)]
    i8p = ir.IntType(8).as_pointer()
    i32 = ir.IntType(32)
    pf = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]),
                                        "llvm.prefetch.p0")
    for row in rowp:
        for e in (0, nr - 1):  # the row's first and last element: the lines it spans
            builder.call(pf, [builder.bitcast(builder.gep(row, [ir.Constant(i64, e)]), i8p),
                              ir.Constant(i32, 1), ir.Constant(i32, 3), ir.Constant(i32, 1)])
    return rowp


def _store_tile(builder, rowp, total, accv, vptr, lanes, isz, rows, nv):
    # C = tile (acc 0: C is never read, it may hold garbage or NaN) or C += tile
    i64 = ir.IntType(64)
    ptrs = [[builder.bitcast(builder.gep(row, [ir.Constant(i64, v * lanes)]), vptr) for v in range(nv)]
            for row in rowp]
    with builder.if_else(builder.icmp_signed("!=", accv, ir.Constant(accv.type, 0))) as (add, plain):
        with add:
            for i in range(rows):
                for v in range(nv):
                    old = builder.load(ptrs[i][v], align=isz)
                    builder.store(builder.fadd(old, total[i][v]), ptrs[i][v], align=isz)
        with plain:
            for i in range(rows):
                for v in range(nv):
                    builder.store(total[i][v], ptrs[i][v], align=isz)


def _emit_outer_inner(builder, tools, isz, rows, nv, go, nouter, setup, label):
    # for j < nouter (entered if go): pointers, count = setup(j); for p < count (>= 1):
    # tile += A_p x B_p, with (bp, [row pointers]) = pointers(p); the tile in registers throughout.
    # Returns the tile after the loops (zeros where they did not run).
    lanes, vty, _, _ = tools
    i64 = ir.IntType(64)
    zero64 = ir.Constant(i64, 0)
    zero = ir.Constant(vty, [0.0] * lanes)
    entry = builder.block
    outer = builder.append_basic_block(f"{label}.outer")
    inner = builder.append_basic_block(f"{label}.loop")
    latch = builder.append_basic_block(f"{label}.next")
    done = builder.append_basic_block(f"{label}.done")
    builder.cbranch(go, outer, done)

    builder.position_at_end(outer)
    j = builder.phi(i64)
    j.add_incoming(zero64, entry)
    acc0 = [[builder.phi(vty) for _ in range(nv)] for _ in range(rows)]
    for row in acc0:
        for a in row:
            a.add_incoming(zero, entry)
    pointers, count = setup(j)
    builder.branch(inner)

    builder.position_at_end(inner)
    p = builder.phi(i64)
    p.add_incoming(zero64, outer)
    acc = [[builder.phi(vty) for _ in range(nv)] for _ in range(rows)]
    for i in range(rows):
        for v in range(nv):
            acc[i][v].add_incoming(acc0[i][v], outer)
    bp, arow = pointers(p)
    new = _fma_step(builder, bp, arow, acc, tools, isz, nv)
    p1 = builder.add(p, ir.Constant(i64, 1))
    p.add_incoming(p1, inner)
    for i in range(rows):
        for v in range(nv):
            acc[i][v].add_incoming(new[i][v], inner)
    builder.cbranch(builder.icmp_signed("<", p1, count), inner, latch)

    builder.position_at_end(latch)
    j1 = builder.add(j, ir.Constant(i64, 1))
    j.add_incoming(j1, latch)
    for i in range(rows):
        for v in range(nv):
            acc0[i][v].add_incoming(new[i][v], latch)
    builder.cbranch(builder.icmp_signed("<", j1, nouter), outer, done)

    builder.position_at_end(done)
    return _tile_sums(builder, vty, zero, entry, new, latch, rows, nv)


def _emit_ukernel_taps(context, builder, sig, args, mr, nv, vbytes, rows, rowptr, taps):
    # _emit_ukernel's rowptr kernel with an outer loop over a list of taps (see there)
    kcv, _, aoffv, _, boffv, _, coffv, ldcv, accv = args[:9]
    pa, pb, c = (context.make_array(sig.args[i])(context, builder, args[i]) for i in (1, 3, 5))
    offs, zeros, tl = (context.make_array(sig.args[i])(context, builder, args[i])
                       for i in (rowptr[0], rowptr[2], taps[0]))
    toffv, tloffv, ntv, ldov = args[rowptr[1]], args[taps[1]], args[taps[2]], args[taps[3]]
    fty = context.get_data_type(sig.args[5].dtype)
    isz = context.get_abi_sizeof(fty)
    tools = _vector_tools(builder, fty, isz, vbytes)
    nr = nv * tools[0]
    i64 = ir.IntType(64)
    zero64 = ir.Constant(i64, 0)
    b0 = builder.gep(pb.data, [boffv])
    rowp = _c_prefetch(context, builder, c, coffv, ldcv, rows, nr)

    def setup(j):  # per tap: the rows' starts and B's first row
        t = builder.load(builder.gep(tl.data, [builder.add(tloffv, j)]))
        base = builder.add(aoffv, builder.mul(t, ldov))
        arows = []
        for i in range(rows):
            o = builder.load(builder.gep(offs.data, [builder.add(base, ir.Constant(i64, i))]))
            arows.append(builder.select(builder.icmp_signed("<", o, zero64), zeros.data,
                                        builder.gep(pa.data, [builder.add(o, toffv)])))
        bt = builder.gep(b0, [builder.mul(builder.mul(t, kcv), ir.Constant(i64, nr))])
        return (lambda p: (builder.gep(bt, [builder.mul(p, ir.Constant(i64, nr))]),
                           [builder.gep(r0, [p]) for r0 in arows])), kcv

    go = builder.and_(builder.icmp_signed(">", ntv, zero64), builder.icmp_signed(">", kcv, zero64))
    total = _emit_outer_inner(builder, tools, isz, rows, nv, go, ntv, setup, "ukernel_taps")
    _store_tile(builder, rowp, total, accv, tools[1].as_pointer(), tools[0], isz, rows, nv)
    return context.get_dummy_value()


def _switch_rows(builder, rowsv, counts, label, emit):
    # one block per row count in ``counts`` (``emit(rows)`` fills it), chosen by a switch on ``rowsv``
    exit_ = builder.append_basic_block(f"{label}.exit")
    switch = builder.switch(rowsv, exit_)
    for r in counts:
        case = builder.append_basic_block(f"{label}.{r}")
        switch.add_case(ir.Constant(rowsv.type, r), case)
        builder.position_at_end(case)
        emit(r)
        builder.branch(exit_)
    builder.position_at_end(exit_)


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
        _switch_rows(builder, rowsv, range(1, mr), "ukernel_rows",
                     lambda rr: _emit_ukernel(context, builder, sig, args, mr, nv, VBYTES, rows=rr))
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
        _switch_rows(builder, rowsv, range(1, mr + 1), "ukernel_ldb",
                     lambda rr: _emit_ukernel(context, builder, osig, order, mr, nv, VBYTES, rows=rr, ldb=9))
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def ukernel_strided(typingctx, kc, pa, aoff, lda, pb, boff, ldb, c, coff, ldc, acc, rows):
    """:func:`ukernel_ldb` whose A is not a packed panel either: the tile's ``rows`` (1 .. MR) rows
    of A for one p are contiguous and the next p starts ``lda`` further on,
    ``C[i, j] (+)= sum_p pa[aoff + p*lda + i] * pb[boff + p*ldb + j]``.  For products that reduce
    over rows both operands hold row by row (Winograd's grad_weight: tiles x channels)."""
    if not _ukernel_types(kc, pa, aoff, pb, boff, c, coff, ldc, acc):
        return None
    mr, nv = TILES[ISA][c.dtype.bitwidth // 8]
    sig = types.void(types.intp, pa, types.intp, types.intp, pb, types.intp, types.intp, c, types.intp,
                     types.intp, types.intp, types.intp)

    def codegen(context, builder, sig, args):
        # the emitter reads (kc, pa, aoff, pb, boff, c, coff, ldc, acc) at fixed positions
        idx = (0, 1, 2, 4, 5, 7, 8, 9, 10, 3, 6)
        order = [args[i] for i in idx]
        osig = types.void(*[sig.args[i] for i in idx])
        rowsv = args[11]
        _switch_rows(builder, rowsv, range(1, mr + 1), "ukernel_strided",
                     lambda rr: _emit_ukernel(context, builder, osig, order, mr, nv, VBYTES, rows=rr, ldb=10,
                                              lda=9))
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def ukernel_rowptr(typingctx, kc, a, offs, ioff, toff, zeros, pb, boff, c, coff, ldc, acc, rows):
    """:func:`ukernel` (``rows`` == MR) or :func:`ukernel_rows` (``rows`` < MR) whose A is not
    packed: row i of the tile reads ``a[offs[ioff + i] + toff + p]``, p < kc, or ``zeros[p]`` where
    ``offs[ioff + i]`` is negative.  For a channels_last input, whose output positions' taps are
    runs of contiguous channels read in place (``offs`` the positions' tap rows, -1 in the padding,
    ``toff`` the channel block): ``C[i, j] (+)= sum_p A[i, p] * pb[boff + p*NR + j]``."""
    if not _ukernel_types(kc, a, ioff, pb, boff, c, coff, ldc, acc):
        return None
    if not (isinstance(offs, types.Array) and offs.dtype == types.int64 and offs.ndim == 1):
        return None
    if not (isinstance(zeros, types.Array) and zeros.dtype == a.dtype and zeros.layout == "C"):
        return None
    mr, nv = TILES[ISA][c.dtype.bitwidth // 8]
    sig = types.void(types.intp, a, offs, types.intp, types.intp, zeros, pb, types.intp, c, types.intp,
                     types.intp, types.intp, types.intp)

    def codegen(context, builder, sig, args):
        # the emitter reads (kc, pa, aoff, pb, boff, c, coff, ldc, acc) at fixed positions
        idx = (0, 1, 3, 6, 7, 8, 9, 10, 11, 2, 4, 5)
        order = [args[i] for i in idx]
        osig = types.void(*[sig.args[i] for i in idx])
        rowsv = args[12]
        _switch_rows(builder, rowsv, range(1, mr + 1), "ukernel_rowptr",
                     lambda rr: _emit_ukernel(context, builder, osig, order, mr, nv, VBYTES, rows=rr,
                                              rowptr=(9, 10, 11)))
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def ukernel_taps(typingctx, kc, a, offs, ioff, ldo, tl, tloff, nt, toff, zeros, pb, boff, c, coff, ldc, acc,
                 rows):
    """:func:`ukernel_rowptr` summed over ``nt`` taps in one call, the tile kept in registers: for
    each listed tap ``t = tl[tloff + j]``, row i of the tile reads
    ``a[offs[ioff + t*ldo + i] + toff + p]`` (``zeros[p]`` where that offset is negative) against B's
    rows ``t*kc + p`` of the panel,
    p < kc: ``C[i, j] (+)= sum_t sum_p A_t[i, p] * pb[boff + (t*kc + p)*NR + j]``.  For groups of
    few channels per tap (kc = cg), where one call per tap reloaded and stored the C tile every
    cg steps."""
    if not _ukernel_types(kc, a, ioff, pb, boff, c, coff, ldc, acc):
        return None
    for arr, dt in ((offs, types.int64), (tl, types.int64), (zeros, a.dtype)):
        if not (isinstance(arr, types.Array) and arr.dtype == dt and arr.ndim == 1 and arr.layout == "C"):
            return None
    mr, nv = TILES[ISA][c.dtype.bitwidth // 8]
    sig = types.void(types.intp, a, offs, types.intp, types.intp, tl, types.intp, types.intp, types.intp, zeros,
                     pb, types.intp, c, types.intp, types.intp, types.intp, types.intp)

    def codegen(context, builder, sig, args):
        # the emitter reads (kc, pa, aoff, pb, boff, c, coff, ldc, acc) at fixed positions, then
        # (offs, toff, zeros) and (tl, tloff, nt, ldo)
        idx = (0, 1, 3, 10, 11, 12, 13, 14, 15, 2, 8, 9, 5, 6, 7, 4)
        order = [args[i] for i in idx]
        osig = types.void(*[sig.args[i] for i in idx])
        rowsv = args[16]
        _switch_rows(builder, rowsv, range(1, mr + 1), "ukernel_taps",
                     lambda rr: _emit_ukernel(context, builder, osig, order, mr, nv, VBYTES, rows=rr,
                                              rowptr=(9, 10, 11), taps=(12, 13, 14, 15)))
        return context.get_dummy_value()

    return sig, codegen


def _emit_ukernel_segments(context, builder, sig, args, mr, nv, vbytes, rows):
    # ukernel_segments: (nseg, segs, soff, pa, lda, pb, ldb, c, coff, ldc, acc, rows)
    nsegv, _, soffv, _, ldav, _, ldbv, _, coffv, ldcv, accv = args[:11]
    segs, pa, pb, c = (context.make_array(sig.args[i])(context, builder, args[i]) for i in (1, 3, 5, 7))
    fty = context.get_data_type(sig.args[7].dtype)
    isz = context.get_abi_sizeof(fty)
    tools = _vector_tools(builder, fty, isz, vbytes)
    nr = nv * tools[0]
    i64 = ir.IntType(64)
    rowp = _c_prefetch(context, builder, c, coffv, ldcv, rows, nr)

    def setup(j):  # per segment: A's and B's starts and its length (>= 1)
        so = builder.add(soffv, builder.mul(j, ir.Constant(i64, 3)))
        aoff, boff, ln = (builder.load(builder.gep(segs.data, [builder.add(so, ir.Constant(i64, e))]))
                          for e in range(3))
        a0 = builder.gep(pa.data, [aoff])
        b0 = builder.gep(pb.data, [boff])

        def pointers(p):
            ap = builder.gep(a0, [builder.mul(p, ldav)])
            return builder.gep(b0, [builder.mul(p, ldbv)]), [builder.gep(ap, [ir.Constant(i64, i)])
                                                             for i in range(rows)]
        return pointers, ln

    go = builder.icmp_signed(">", nsegv, ir.Constant(i64, 0))
    total = _emit_outer_inner(builder, tools, isz, rows, nv, go, nsegv, setup, "ukernel_seg")
    _store_tile(builder, rowp, total, accv, tools[1].as_pointer(), tools[0], isz, rows, nv)
    return context.get_dummy_value()


@intrinsic
def ukernel_segments(typingctx, nseg, segs, soff, pa, lda, pb, ldb, c, coff, ldc, acc, rows):
    """One tile summed over a list of runs of k in one call, kept in registers: for segment
    ``s < nseg`` with ``(ao, bo, n) = segs[soff + 3*s : soff + 3*s + 3]`` (n >= 1),
    ``C[i, j] (+)= sum_s sum_{p < n} pa[ao + p*lda + i] * pb[bo + p*ldb + j]`` for the tile's ``rows``
    (1 .. MR) rows.  Neither operand is packed: for a channels_last grad_weight, A's rows are a tap's
    input channels at consecutive output positions of one output row (``lda`` = stride x channels)
    and B's the output gradient's channels at those positions, each segment the positions of one
    output row whose tap lies inside the input."""
    if not _ukernel_types(nseg, pa, soff, pb, lda, c, coff, ldc, acc):
        return None
    if not (isinstance(segs, types.Array) and segs.dtype == types.int64 and segs.ndim == 1 and segs.layout == "C"):
        return None
    mr, nv = TILES[ISA][c.dtype.bitwidth // 8]
    sig = types.void(types.intp, segs, types.intp, pa, types.intp, pb, types.intp, c, types.intp, types.intp,
                     types.intp, types.intp)

    def codegen(context, builder, sig, args):
        rowsv = args[11]
        _switch_rows(builder, rowsv, range(1, mr + 1), "ukernel_segments",
                     lambda rr: _emit_ukernel_segments(context, builder, sig, args, mr, nv, VBYTES, rr))
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
    # ib; rows past mb are zeros.  The read order follows A's unit stride.  Indices unsigned:
    # numba's wraparound code for signed ones kept the copies scalar (512 x 4608 weights on one
    # thread: 2.66 -> 1.26 ms)
    mru = _u(mr)
    for ib in range(0, mb, mr):
        mm = min(mr, mb - ib)
        d0 = paoff + ib * kb
        if acs == 1:
            for ii in range(mm):
                s0 = _u(aoff + (i0 + ib + ii) * ars + p0)
                d = _u(d0 + ii)
                for p in range(_u(kb)):
                    pa[d + p * mru] = a[s0 + p]
        else:
            for p in range(kb):
                s0 = _u(aoff + (i0 + ib) * ars + (p0 + p) * acs)
                d = _u(d0 + p * mr)
                for ii in range(_u(mm)):
                    pa[d + ii] = a[s0 + ii * _u(ars)]
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
