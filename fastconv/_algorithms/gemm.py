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

from .. import _cpu
# the kernels, their register tiles and the IR intrinsics they inline (one file for numba's cache);
# re-exported: implicit, winograd, their kernel modules, tests and benchmarks import them from here
from ._gemm_kernels import (  # noqa: F401
    ISA, TILES, VBYTES, _blocks, _copy_nr, _fma_loop, _gemm_parallel, _lanes, _macro, _pack_a, _pack_b,
    _pack_bt_block, _peak, _round_up, _tile_of, _zero_block, gemm_serial, gemm_serial_packed, pack_a_all,
    tile, ukernel, ukernel_ldb, ukernel_rowptr, ukernel_rows, ukernel_segments, ukernel_spec, ukernel_strided,
    ukernel_taps)


# ---------------------------------------------------------------------------------------- Python
def blocking(dtype, caches=None, isa=None):
    """``int64[kc, mc, nc]``: cache blocks for ``dtype`` from the cache sizes (:mod:`_cpu`).

    kc: a kc x NR panel of packed B in half of L1d (the other half streams A and C);
    mc: an mc x kc block of packed A in half of L2; nc: a kc x nc block of B in at most half of L3,
    capped at 4096 columns.  kc lies in [64, 512], mc is a multiple of MR, nc of NR."""
    isz = np.dtype(dtype).itemsize
    caches = _cpu.cache_sizes() if caches is None else caches
    key = (isz, isa, caches["l1d"], caches["l2"], caches["l3"])
    blk = _BLOCKING.get(key)
    if blk is None:  # asked several times per convolution call: 4 us each
        mr, nr = tile(isz, isa)
        kc = int(min(512, max(64, caches["l1d"] // 2 // (nr * isz))))
        mc = int(min(1024 // mr * mr, max(mr, caches["l2"] // 2 // (kc * isz) // mr * mr)))
        nc = int(min(4096 // nr * nr, max(nr, caches["l3"] // 2 // (kc * isz) // nr * nr)))
        blk = _BLOCKING[key] = (kc, mc, nc)
    return np.array(blk, dtype=np.int64)


_BLOCKING: dict = {}


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
