"""Winograd F(m x m, 3 x 3) fused per block of tiles, on channels_last (NHWC) or NCHW arrays.

The batch-wide plan (:mod:`.winograd_nhwc`) runs its three steps each over a chunk of up to 24 MB
of transformed tiles, which travel through L3 or memory between the steps, and its transforms loop
over channel runs one 1-D row of a tile at a time (~33 ns a run: most of the time below 64
channels).  Here a work item is a block of ``tb`` tiles (a multiple of the micro-kernel's MR rows,
its V and M within half of L2) and one worker runs all three steps on it:

1. ``V[e][q][:] = (B^T d_q B)[e]``: the whole a x a transform of tile q on vectors of channels, in
   registers (:func:`._winograd_fused_kernels.transform_in`, emitted LLVM IR), read from the NHWC
   input in place (tiles touching the padding from a zero-filled copy of their patch);
2. ``M[e] (tb x kg) = V[e] (tb x cg) . U[e] (cg x kg)`` per group and element on the GEMM
   micro-kernel, V's rows read in place (``ukernel_rowptr``), U packed once per call in NR-column
   panels (:func:`pack_u`);
3. ``y = A^T M A + b`` per tile on vectors of output channels, into the NHWC output (the part of the
   tile inside it).

NCHW arrays are read and written without whole-array layout copies: a worker transposes the input
rows of the band of tile rows its block reaches (:func:`band`) into an NHWC strip in L2 and steps
1 to 3 read that; outputs go to a strip of m rows, transposed into the NCHW output per run of
tiles (:func:`._winograd_fused_kernels.forward_fused`; the copies took ~1 ms of 8x64x56x56's
3.2 ms forward, the strips ~0.65).

Notation, accuracy and NaN spreading as in :mod:`.winograd` (the same matrices; U computed in
float64 and rounded once by the batch-wide plan's :func:`.winograd_nhwc_kernels.transform_u`).
grad_input is this forward on the flipped, channel-swapped kernel (``flip``).  Results do not depend
on the thread count: every output is computed by one worker in a fixed order.
"""
from __future__ import annotations

import numba
import numpy as np

from .. import _cpu
from .._config import result, scratch
from . import _winograd_fused_kernels as K
from . import gemm as G
from . import winograd as W  # the transform matrices (a cycle: used at call time)
from . import winograd_nhwc as WN


def thin(p, pass_="forward"):
    """Whether the products run on the thin tile (``K.THIN_MR`` x ``K.THIN_NV`` vectors): float32 on
    AVX-512 where the columns they compute (the forward's kg, grad_weight's cg) fit in its 16; the
    14 x 32 tile computed half of its columns in vain there (4x16x128x128 16 -> 16, NHWC: forward 1.8 ->
    1.07 ms, grad_weight 1.8 -> 1.5)."""
    cols = p.kg if pass_ == "forward" else p.cg
    return p.itemsize == 4 and G.ISA == "avx512" and cols <= K.THIN_NV * G.VBYTES // 4


def _tile(p, pass_="forward"):
    """(MR, NR) of the products of ``pass_``."""
    if thin(p, pass_):
        return K.THIN_MR, K.THIN_NV * G.VBYTES // 4
    return G.tile(p.itemsize)


def _tb(p, m, nthreads, pass_="forward"):
    """Tiles per item: V and M (a*a x tb x (c + k)) within half of L2, whole MR-row panels, and at
    least 4 items per worker where the batch has the tiles."""
    mr, _ = _tile(p, pass_)
    a2 = (m + 2) ** 2
    total = WN.tiles(p, m)[2]
    fit = _cpu.cache_sizes()["l2"] // 2 // (a2 * (p.c + p.k) * p.itemsize)
    spread = -(-total // (4 * nthreads))
    return max(mr, min(fit, spread) // mr * mr)


def stride(n, itemsize):
    """Elements from one transformed element's rows to the next in V, M and Wg: at least ``n``
    (tiles x channels), an odd number of 64-byte lines.  With tb * c elements, 3584 in all three
    of 8x64x56x56 (tb 56), 4x128x56x56 (28) and 4x32x128x128 (112), the 36 rows of a tile's
    transform lay 14336 bytes apart, on two 4 KiB offsets (L1 sets) only: its input transform
    took 0.65 ms of 8x64x56x56's 2.5 ms forward, 0.35 with 37 lines between them."""
    lines = -(-n * itemsize // 64) | 1
    return lines * 64 // itemsize


def band(p, m, tb):
    """Tile rows an NCHW caller's worker stages at once: those a block of ``tb`` tiles can reach
    (the input rows of r tile rows are r*m + 2: one at a time F(2x2) transposed each input row
    twice, F(4x4) 1.5 times), at most a quarter of L2 of input rows."""
    th, tw, _ = WN.tiles(p, m)
    row = (tw * m + 2) * p.c * p.itemsize
    fit = max(1, (_cpu.cache_sizes()["l2"] // 4 // row - 2) // m)
    return max(1, min(th, -(-tb // tw) + 1, fit))


def _staged_words(p, m, tb):
    """Elements of an NCHW caller's staged rows per worker: a band's input rows (tw*m + 2 columns,
    padding included) and its rows of outputs (forward: one tile row's m) or of gy (grad_weight:
    the band's)."""
    tw = WN.tiles(p, m)[1]
    r = band(p, m, tb)
    return (r * m + 2) * (tw * m + 2) * p.c + r * m * tw * m * p.k


def _worker_words(p, m, tb):
    """Elements per worker: V, M, a border tile's patch (NHWC) or the staged rows (NCHW), and the
    micro-kernel's edge tile."""
    mr, nr = G.tile(p.itemsize)  # the thin tile has fewer elements
    a2 = (m + 2) ** 2
    return (a2 * (stride(tb * p.c, p.itemsize) + stride(tb * p.k, p.itemsize))
            + max(a2 * p.c, _staged_words(p, m, tb)) + mr * nr)


def plan(p, m, nthreads):
    """``(tb, words, fixed)`` (tiles per item, elements per worker, bytes shared: U packed)
    within ``p.workspace_limit``, or why it does not fit."""
    mr, nr = _tile(p)
    a2 = (m + 2) ** 2
    npan = -(-p.kg // nr)
    fixed = p.g * a2 * npan * nr * p.cg * p.itemsize
    return _fit(p, _tb(p, m, nthreads), mr, nthreads, fixed, lambda tb: _worker_words(p, m, tb),
                f"transformed weights and {mr} tiles per worker")


def _fit(p, tb, mr, nthreads, fixed, words_of, what):
    """``(tb, words, fixed)`` with ``tb`` halved (in whole MR panels) until the workers' ``words_of(tb)``
    elements and the ``fixed`` bytes fit ``p.workspace_limit``; below MR tiles the refusal, naming
    ``what`` the bytes are."""
    while True:
        words = words_of(tb)
        if fixed + nthreads * words * p.itemsize <= p.workspace_limit:
            return tb, words, fixed
        if tb <= mr:
            return (f"needs at least {fixed + nthreads * words * p.itemsize} bytes of workspace ({what}), "
                    f"workspace_limit is {p.workspace_limit}")
        tb = max(mr, tb // 2 // mr * mr)


def pack_u(w, p, m, flip=False):
    """U of the forward (or with ``flip`` of grad_input, from the layer's weight ``w``) in the
    products' panels: ``pu[(((gi*a2 + e)*npan + jp)*cg + c)*NR + j] = U[gi][e][jp*NR + j][c]``,
    zero past kg; returns (pu, npan)."""
    a = m + 2
    nw = numba.get_num_threads()
    _, nr = _tile(p)
    npan = -(-p.kg // nr)
    pu = scratch("winograd.pu", (p.g * a * a * npan * p.cg * nr,), p.dtype)
    K.pack_u(np.ascontiguousarray(w).reshape(-1), W._G[m], flip, p.g, p.kg, p.cg, npan, pu,
             np.empty((nw, 9 * nr)), np.empty((nw, 3 * a * nr)))
    return pu, npan


def forward(xh, w, b, p, m, tb, flip=False, out=None, nchw=False):
    """The forward of the NHWC input ``xh`` (N, H, W, C), C-contiguous, with F(m x m, 3 x 3) fused
    per ``tb`` tiles: the (N, OH, OW, K) C-contiguous output (``out`` when given).  With ``nchw``
    the input is C-contiguous (N, C, H, W) and so is the output (N, K, OH, OW), rows staged per
    worker (:func:`._winograd_fused_kernels.forward_fused`).  With ``flip``, ``w`` is the
    layer's weight and the pass grad_input's (``p`` its transposed problem)."""
    dt = p.dtype
    mr, nr = G.tile(p.itemsize)
    a2 = (m + 2) ** 2
    shape = (p.n, p.k, p.oh, p.ow) if nchw else (p.n, p.oh, p.ow, p.k)
    y = result(shape, dt) if out is None else out
    if p.n == 0:
        return y
    pu, npan = pack_u(w, p, m, flip)
    nw = numba.get_num_threads()
    ev, em = stride(tb * p.c, p.itemsize), stride(tb * p.k, p.itemsize)
    vbuf = scratch("winograd.fv", (nw, a2 * ev), dt)
    mbuf = scratch("winograd.fm", (nw, a2 * em), dt)
    bias = np.ascontiguousarray(b, dtype=dt) if b is not None else np.zeros(p.k, dt)
    one = np.zeros((nw, 1), dt)  # the other layout's buffers
    if nchw:
        tw = WN.tiles(p, m)[1]
        r = band(p, m, tb)
        pbuf = one
        sbuf = scratch("winograd.fs", (nw, (r * m + 2) * (tw * m + 2) * p.c), dt)
        obuf = scratch("winograd.fo", (nw, m * tw * m * p.k), dt)
    else:
        r, pbuf, sbuf, obuf = 1, scratch("winograd.fp", (nw, a2 * p.c), dt), one, one
    K.forward_fused(xh.reshape(-1), p.n, p.h, p.w, p.c, p.k, p.g, p.oh, p.ow, p.ph0, p.pw0, m, pu, npan, bias,
                    y.reshape(-1), tb, ev, em, vbuf, mbuf, pbuf, np.zeros((nw, max(mr, K.THIN_MR)), np.int64),
                    np.zeros(1, dt), np.zeros((nw, mr * nr), dt), np.zeros(1, np.int64), thin(p), nchw, r, sbuf,
                    obuf)
    return y


# Model, seconds, fitted to 44 timed forwards (2-core Xeon, AVX-512, 2026-12-04, float32, 2 threads,
# F(4x4) and F(2x2), NHWC, 1x1 to 128x128 planes with 3-512 channels, V/M rows at odd-line
# strides; rms error 12%, worst 0.86x / 1.30x): the products at 153 GFLOP/s per thread over the
# rows and columns they compute (whole MR-row panels of each item's tiles, whole NR-column panels
# of output channels), the transforms per transformed element of a channel vector (F(4x4) 0.18 ns,
# F(2x2) 0.12 ns; a per-tile term fitted to zero), U's packing 1.4 ns per element (one pass over
# it, scattered panel writes), 83 us per call.  Per-thread terms scale by the vector width on
# other CPUs.  An NCHW caller's rows staged in and out (forward_fused) cost the bytes of the
# input and the output at _STAGE_RATE[m] over the NHWC kernel's time (measured with aligned arrays
# on 9 layers, 2 threads: F(4x4) 15-50 GB/s, 8x64x56x56 0.66 ms for 12.8 MB; F(2x2), whose a rows
# per tile row are twice its m, 9-18 GB/s; grad_weight's staging of x and gy alike or cheaper).
_GEMM_RATE = 153e9 * G.VBYTES / 64
_TRANSFORM = {4: 1.79e-10, 2: 1.23e-10}
_U_ELEM, _CALL = 1.39e-9, 8.3e-5
_STAGE_RATE = {4: 20e9, 2: 13e9}


def cost(p, m, tb, nthreads):
    """Modelled seconds of the fused forward with F(m x m, 3 x 3) in blocks of ``tb`` tiles, with an
    NCHW caller's staged rows."""
    mr, nr = _tile(p)
    lanes = G.VBYTES // p.itemsize
    a2 = (m + 2) ** 2
    total = WN.tiles(p, m)[2]
    scale = p.itemsize / 4
    workers = 1.0 + 0.9 * (nthreads - 1)
    rows = total // tb * -(-tb // mr) * mr + -(-(total % tb) // mr) * mr
    kgp = -(-p.kg // nr) * nr
    gemm = 2.0 * a2 * p.g * rows * kgp * p.cg / (_GEMM_RATE * 4 / p.itemsize)
    vectors = -(-p.c // lanes) + -(-p.k // lanes)
    trans = scale * total * _TRANSFORM[m] * a2 * vectors * lanes
    upack = scale * _U_ELEM * a2 * p.g * kgp * p.cg
    staged = max(1, p.n) * (p.c * p.h * p.w + p.k * p.oh * p.ow) * p.itemsize
    return _CALL + (gemm + trans) / workers + upack + staged / _STAGE_RATE[m]


# ---------------------------------------------------------------------------------- grad_weight
def gw_plan(p, m, nthreads):
    """``(tb, words, fixed)`` of grad_weight: tiles per item, elements per worker (V, Wg, the
    patches or an NCHW caller's staged rows, the edge tile, the sums), bytes shared (the summed
    sums), within ``p.workspace_limit``; or why it does not fit."""
    mr, nr = G.tile(p.itemsize)
    a2 = (m + 2) ** 2
    isz = p.itemsize
    sums = a2 * p.k * p.cg
    # V and Wg sized as the forward's V and M
    return _fit(p, _tb(p, m, nthreads, "grad_weight"), mr, nthreads, sums * isz,
                lambda tb: (a2 * (stride(tb * p.c, isz) + stride(tb * p.k, isz)) + nr
                            + max(a2 * p.c + m * m * p.k, _staged_words(p, m, tb)) + mr * nr + sums),
                f"a*a x k x c/groups sums per worker and {mr} tiles")


def grad_weight(gyh, xh, p, m, tb, nchw=False):
    """grad_weight from NHWC ``gyh`` (N, OH, OW, K) and ``xh`` (N, H, W, C), both C-contiguous (with
    ``nchw``: NCHW ones, rows staged per worker), with F(m x m, 3 x 3) fused per ``tb`` tiles: each
    worker adds ``Wg[e]^T V[e]`` of its fixed share of the tile blocks into sums of its own, the
    sums are added in worker order and ``G^T Mw G`` gives the 3 x 3 taps in float64
    (:func:`.winograd_nhwc.taps`)."""
    dt = p.dtype
    mr, nr = G.tile(p.itemsize)
    a2 = (m + 2) ** 2
    gw = np.zeros(p.w_shape, dt)
    if p.n == 0:
        return gw
    nw = numba.get_num_threads()
    sums = scratch("winograd.gsums", (nw, a2 * p.k * p.cg), dt)
    sums.fill(0)
    ev, ew = stride(tb * p.c, p.itemsize), stride(tb * p.k, p.itemsize)
    args = (xh.reshape(-1), gyh.reshape(-1), p.n, p.h, p.w, p.c, p.k, p.g, p.oh, p.ow, p.ph0, p.pw0, m, tb, ev, ew,
            scratch("winograd.fv", (nw, a2 * ev + nr), dt), scratch("winograd.fw", (nw, a2 * ew), dt))
    if nchw:  # the staged rows of x in sbuf, of gy in gbuf
        tw = WN.tiles(p, m)[1]
        r = band(p, m, tb)
        pbuf = np.zeros((nw, 1), dt)
        sbuf = scratch("winograd.fs", (nw, (r * m + 2) * (tw * m + 2) * p.c), dt)
        gbuf = scratch("winograd.fo", (nw, r * m * tw * m * p.k), dt)
    else:  # a border tile's patches of x and gy
        r, sbuf = 1, np.zeros((nw, 1), dt)
        pbuf = scratch("winograd.fp", (nw, a2 * p.c), dt)
        gbuf = scratch("winograd.fg", (nw, m * m * p.k), dt)
    K.grad_weight_fused(*args, pbuf, gbuf, sums, np.zeros((nw, mr * nr), dt), thin(p, "grad_weight"), nchw, r, sbuf)
    mw = sums[0].copy()
    for i in range(1, nw):
        mw += sums[i]
    WN.taps(mw, p, m, gw)
    return gw


# Model of grad_weight, seconds, fitted like the forward's to 23 timed runs (same machine and day,
# F(2x2), 1x1 to 128x128 planes, 3-512 channels, odd-line strides; rms error 8%, worst 0.85x /
# 1.15x): the products at 214 GFLOP/s per thread (held at the first fit's rate: a free fit traded
# it against the transforms) over whole MR x NR tiles of the k x cg sums, each item's read-modify-
# write of the worker's sums 0.20 ns per element, the two transforms 0.17 ns per transformed
# element of a channel vector, zeroing / adding / transforming the sums 0.69 ns per element of
# one copy, 50 us per call.  Fitted on F(2x2) only; for F(4x4) it reads 10-20% high and ranks the
# two tiles as measured on 8 of 9 layers (the miss: 32x32x14x14, 0.47 ms taken, 0.41 left).
_GW_RATE = 214e9 * G.VBYTES / 64
_GW_SUMS, _GW_TRANSFORM, _GW_FIXED, _GW_CALL = 1.97e-10, 1.72e-10, 6.9e-10, 5.0e-5


def gw_cost(p, m, tb, nthreads):
    """Modelled seconds of the fused grad_weight with F(m x m, 3 x 3) in blocks of ``tb`` tiles, with
    an NCHW caller's staged rows (x and gy)."""
    mr, nr = _tile(p, "grad_weight")
    lanes = G.VBYTES // p.itemsize
    a2 = (m + 2) ** 2
    total = WN.tiles(p, m)[2]
    scale = p.itemsize / 4
    workers = 1.0 + 0.9 * (nthreads - 1)
    gemm = 2.0 * a2 * p.g * -(-p.kg // mr) * mr * -(-p.cg // nr) * nr * total / (_GW_RATE * 4 / p.itemsize)
    sums = scale * _GW_SUMS * -(-total // tb) * a2 * p.k * p.cg
    trans = scale * _GW_TRANSFORM * total * a2 * (-(-p.c // lanes) + -(-p.k // lanes)) * lanes
    fixed = scale * _GW_FIXED * 3 * a2 * p.k * p.cg
    staged = max(1, p.n) * (p.c * p.h * p.w + p.k * p.oh * p.ow) * p.itemsize
    return _GW_CALL + (gemm + sums + trans) / workers + fixed + staged / _STAGE_RATE[m]
