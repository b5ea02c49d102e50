"""Winograd F(m x m, 3 x 3) over the tiles of the whole batch, on channels_last (NHWC) arrays.

The packed Winograd forward (:mod:`.winograd`) transforms one group's tiles a few tile rows at a
time and multiplies every such item by all of ``U``: right for wide planes, wasteful on the small
planes of deep layers (a 4x4 or 8x8 plane has 1-4 tiles per row, and a 512-channel ``U`` of 16.8 MB
streams from memory once per item).  Here the three steps each run over everything at once:

1. the input transform of every tile of the batch (t = (img*th + ti)*tw + tj, T of them):
   ``V[e][t][c] = (B^T d_tc B)[e]``, vectorised along the channels of the NHWC input;
2. a*a GEMMs per group, ``M[e] (T x kg) = V[e] (T x cg) . U[e]^T (cg x kg)`` on fastconv's packed
   GEMM (``U[g][e] = G g G^T`` computed per call in float64 and rounded once, as :mod:`.winograd`
   does), each reading its block of ``U`` once;
3. the output transform ``Y = A^T M A`` of every tile, along the channels, into the NHWC output.

grad_input is the forward on the flipped, channel-swapped kernel (read in place from the layer's
weight); grad_weight transforms the input the same way and gy by ``A gy A^T``, and its GEMMs reduce
over the tiles (:func:`grad_weight`); :func:`taps` (``G^T Mw G``) serves every Winograd grad_weight.

Notation as in :mod:`.winograd`: m the output tile (4 or 2), a = m + 2, e an element of the a x a
transformed tile, th x tw tiles per image.  With T large the tiles go in chunks so that V and M stay
under the workspace budget.  Accuracy and NaN spreading are those of :mod:`.winograd` (the same
transforms, the same float64 weight transform).

Threads: numba's one pool, workers claim tiles (transforms) or (group, element, tile block) GEMMs;
outputs are disjoint, and every sum runs in an order fixed by the problem: results do not depend on
the thread count.
"""
from __future__ import annotations

import numba
import numpy as np

from .. import _cpu
from .._config import result, scratch
from . import _winograd_nhwc_kernels as K
from . import gemm as G
from . import winograd as W  # the transform matrices and the packed plans' model (a cycle: used at call time)

_TABLES: dict = {}


def _table(mat, dtype):
    """(idx, cf, cnt) of a transform matrix's rows: the nonzero entries (see the kernels' module)."""
    key = (mat.tobytes(), mat.shape, np.dtype(dtype))
    if key not in _TABLES:
        rows = [[(j, v) for j, v in enumerate(row) if v != 0] for row in mat]
        idx = np.zeros((len(rows), max(len(r) for r in rows)), np.int64)
        cf = np.zeros(idx.shape, dtype)
        for r, terms in enumerate(rows):
            for t, (j, v) in enumerate(terms):
                idx[r, t], cf[r, t] = j, v
        _TABLES[key] = (idx, cf, np.array([len(r) for r in rows], np.int64))
    return _TABLES[key]


CHUNK_BYTES = 24 << 20  # V and M of one chunk of tiles (a chunk's three steps then run from L3)


def tiles(p, m):
    """(th, tw, T): tiles per image column and row, and of the whole batch."""
    th, tw = -(-p.oh // m), -(-p.ow // m)
    return th, tw, max(1, p.n) * th * tw


def _worker_words(p, m):
    """Elements each worker owns: the two transforms' tile scratch and the GEMM's workspace."""
    a = m + 2
    return a * a * p.c + m * a * p.k + G.workspace_size(p.dtype)


def plan(p, m, nthreads):
    """``(tc, words, fixed)``: tiles per chunk, elements per worker, bytes shared (U, the chunk's V and
    M, and the NHWC copies of an NCHW caller's input and output) within ``p.workspace_limit``; or
    the reason it does not fit."""
    a2 = (m + 2) ** 2
    isz = p.itemsize
    total = tiles(p, m)[2]
    per_tile = a2 * (p.c + p.k) * isz
    words = _worker_words(p, m)
    copies = max(1, p.n) * (p.c * p.h * p.w + p.k * p.oh * p.ow) * isz
    fixed = a2 * p.k * p.cg * isz + copies
    spare = p.workspace_limit - fixed - nthreads * words * isz
    tc = min(total, CHUNK_BYTES // per_tile, spare // per_tile)
    if tc < 1:
        need = fixed + nthreads * words * isz + per_tile
        return (f"needs at least {need} bytes of workspace (transformed weights, layout copies and one "
                f"tile), workspace_limit is {p.workspace_limit}")
    return tc, words, fixed + tc * per_tile


# Model, seconds on one thread, fitted to 24 timed forwards (2-core AMD EPYC, AVX2, 2026-12-03,
# float32, 2 threads, F(2x2) and F(4x4) on 4x4 to 128x128 planes with 16-512 channels; within 15%
# on 20 of them): per element of V and of the output transform's writes 1.9 ns (it carries V's and
# M's trips through memory and the GEMM's packing of V, which grow with the same count), per run of
# channels a transform loops over 33 ns, per element of U 2.8 ns (written once, read by the GEMMs),
# and the GEMMs' multiply-adds at 224 GFLOP/s per 256-bit thread beyond that.  An NCHW caller's
# two layout conversions move their bytes at _CONVERT_RATE (4x16x128x128 float32, 4.2 MB each way,
# in 0.17-0.23 ms on 2 threads).
# Refitted on the 2-core Xeon (AVX-512, 2026-12-04, 64 timed forwards and grad_weights, F(2x2) and
# F(4x4), 4x4 to 128x128 planes with 3-512 channels; rms error 9% where the EPYC's constants read
# 61%, up to 2.9x high on wide small-plane layers, so that the fused plan was taken at 10.2 ms for
# 32x512x4x4 where this one runs in 6.2): 1.03 ns per element, 55 ns per run, 1.01 ns per element
# of U, 340 GFLOP/s per thread.
if G.ISA == "avx512":
    _ELEM, _RUN, _U_ELEM = 1.03e-9, 55e-9, 1.01e-9
    _GEMM_RATE = 340e9
else:
    _ELEM, _RUN, _U_ELEM = 1.9e-9, 33e-9, 2.8e-9
    _GEMM_RATE = 224e9 * G.VBYTES / 32
_CONVERT_RATE = 12e9


def cost(p, m, tc, nthreads, pass_="forward"):
    """Modelled seconds of the forward (or ``pass_='grad_weight'``) with F(m x m, 3 x 3) in chunks
    of ``tc`` tiles, with an NCHW caller's layout conversions."""
    a = m + 2
    a2 = a * a
    _, _, total = tiles(p, m)
    mr, _ = G.tile(p.itemsize)
    scale = p.itemsize / 4
    workers = 1.0 + 0.9 * (nthreads - 1)
    runs = total * (2 * a2 + m * a + m * m)
    elems = total * (a2 * p.c + (m * a + (a2 if pass_ == "grad_weight" else m * m)) * p.k)
    trans = scale * (_ELEM * elems + _RUN * runs + _U_ELEM * a2 * p.k * p.cg)
    rows = -(-total // tc) * -(-tc // mr) * mr
    gemm = 2.0 * a2 * p.g * rows * p.kg * (p.cg + 8) / (_GEMM_RATE * 4 / p.itemsize)
    moved = 2 * max(1, p.n) * (p.c * p.h * p.w + p.k * p.oh * p.ow) * p.itemsize
    # U beyond twice the L2 is read from memory by every chunk's GEMMs (a bandwidth the workers
    # share): 8x512x7x7 and 32x512x4x4 at F(2x2), 16.8 MB of U, read 11-15% low without it and ran
    # 8.5 ms interleaved with gemm's 7.0 on the loaded VM (6.2-6.3 alone)
    ubytes = a2 * p.k * p.cg * p.itemsize
    stream = -(-total // tc) * ubytes / _U_STREAM_RATE if ubytes > 2 * _cpu.cache_sizes()["l2"] else 0.0
    return 3e-5 + (trans + gemm) / workers + moved / _CONVERT_RATE + stream


_U_STREAM_RATE = 20e9  # bytes per second of U streamed by the GEMMs (see cost)


def _buffers(p, m, tc, nw):
    """A chunk's V and M (grad_weight: Wg), the workers' transform scratch (input side, output side)
    and term slots, the GEMM's blocking and workspace; all but the slots kept between calls."""
    dt = p.dtype
    a = m + 2
    return (scratch("winograd.v", (a * a * tc * p.c,), dt), scratch("winograd.m", (a * a * tc * p.k,), dt),
            scratch("winograd.tin", (nw, a * a * p.c), dt), scratch("winograd.tout", (nw, m * a * p.k), dt),
            np.zeros((nw, 8), np.int64), np.zeros((nw, 8), dt), G.blocking(dt),
            G._workspace(dt, nw, G.workspace_size(dt)))


def forward(xh, w, b, p, m, tc, flip=False, out=None):
    """The forward pass of an NHWC input ``xh`` (N, H, W, C), C-contiguous, with F(m x m, 3 x 3) in
    chunks of ``tc`` tiles: the output, (N, OH, OW, K) C-contiguous.  With ``flip``, ``w`` is the
    layer's weight and the pass grad_input's (``p`` its transposed problem): the kernel flipped and
    its channels swapped.  ``out``: an (N, OH, OW, K) C-contiguous array to write into.

    U, V and M and the workers' scratch are kept between calls (:func:`fastconv._config.scratch`):
    fresh pages cost ~2.6 us each here, and 32x256x8x8 with F(4x4) took 19 ms instead of 7.4 with
    its 30 MB allocated afresh on every call."""
    dt = p.dtype
    a = m + 2
    a2 = a * a
    nw = numba.get_num_threads()
    th, tw, total = tiles(p, m)
    u = scratch("winograd.u", (p.g * a2 * p.kg * p.cg,), dt)
    gi, gc, gn = _table(W._G[m], np.float64)
    K.transform_u(np.ascontiguousarray(w).reshape(-1), flip, u, p.k, p.cg, p.kg, a, gi, gc, gn,
                  np.empty((nw, (9 + 3 * a) * p.cg)), np.zeros((nw, 8), np.int64), np.zeros((nw, 8)))
    bi, bc, bn = _table(W._BT[m], dt)
    ai, ac, an = _table(W._AT[m], dt)
    y = result((p.n, p.oh, p.ow, p.k), dt) if out is None else out
    bb = np.ascontiguousarray(b) if b is not None else np.zeros(1, dt)
    tc = min(tc, total)
    v, mm, tin, tout, ot, ct, blk, ws = _buffers(p, m, tc, nw)
    mr = G.tile(p.itemsize)[0]
    xf = xh.reshape(-1)
    yf = y.reshape(-1)
    # GEMM items: (group, element, block of tiles), at least 4 per worker
    blocks = max(1, -(-4 * nw // (p.g * a2)))
    for t0 in range(0, total, tc):
        tn = min(tc, total - t0)
        K.transform_in(xf, v, p.h, p.w, p.c, t0, tn, th, tw, m, a, p.ph0, p.pw0, bi, bc, bn, tin, ot, ct,
                       np.zeros(1, np.int64))
        tb = -(-tn // (blocks * mr)) * mr  # tiles per GEMM item: whole MR-row panels
        K.products(v, u, mm, tn, p.c, p.k, p.cg, p.kg, p.g, a2, tb, ws, blk, np.zeros(1, np.int64))
        K.transform_out(mm, yf, bb, b is not None, p.oh, p.ow, p.k, t0, tn, th, tw, m, a, ai, ac, an, tout, ot, ct,
                        np.zeros(1, np.int64))
    return y


def grad_weight(gyh, xh, p, m, tc):
    """grad_weight from NHWC ``gyh`` (N, OH, OW, K) and ``xh`` (N, H, W, C), both C-contiguous, with
    F(m x m, 3 x 3) in chunks of ``tc`` tiles: the transposed bilinear algorithm of :mod:`.winograd`
    over the whole batch's tiles, ``Mw[e] (kg x cg) = sum_t Wg[e][t]^T V[e][t]`` (``Wg = A gy A^T``
    per tile) as one GEMM per group and element reducing over the tiles (chunk after chunk, in
    order), then ``G^T Mw G`` to the 3 x 3 taps in float64."""
    dt = p.dtype
    a = m + 2
    a2 = a * a
    gw = np.zeros(p.w_shape, dt)
    if p.n == 0:
        return gw
    nw = numba.get_num_threads()
    th, tw, total = tiles(p, m)
    tc = min(tc, total)
    bi, bc, bn = _table(W._BT[m], dt)
    ai, ac, an = _table(np.ascontiguousarray(W._AT[m].T), dt)  # the rows of A (a x m)
    mw = scratch("winograd.u", (a2 * p.k * p.cg,), dt)  # U's place: a pass holds one or the other
    v, wg, tin, tgy, ot, ct, blk, ws = _buffers(p, m, tc, nw)
    for t0 in range(0, total, tc):
        tn = min(tc, total - t0)
        K.transform_in(xh.reshape(-1), v, p.h, p.w, p.c, t0, tn, th, tw, m, a, p.ph0, p.pw0, bi, bc, bn, tin, ot,
                       ct, np.zeros(1, np.int64))
        K.transform_gy(gyh.reshape(-1), wg, p.oh, p.ow, p.k, t0, tn, th, tw, m, a, ai, ac, an, tgy, ot, ct,
                       np.zeros(1, np.int64))
        K.products_gw(wg, v, mw, tn, p.c, p.k, p.cg, p.kg, p.g, a2, 1 if t0 else 0, ws, blk, np.zeros(1, np.int64))
    taps(mw, p, m, gw)
    return gw


def taps(mw, p, m, gw):
    """``gw`` (the weight's shape) ``= G^T Mw G`` per output and input channel, in float64, from
    grad_weight's sums ``Mw`` (a*a x k x cg, flat)."""
    a = m + 2
    nw = numba.get_num_threads()
    gi, gc, gn = _table(np.ascontiguousarray(W._G[m].T), np.float64)
    K.transform_taps(mw.reshape(-1), gw.reshape(-1), p.k, p.cg, a, gi, gc, gn, np.empty((nw, (3 * a + 9) * p.cg)),
                     np.zeros((nw, 8), np.int64), np.zeros((nw, 8)))


# ------------------------------------------------------------------- channels_last callers' passes
def _native_plan(p, pass_):
    """The NHWC plan of the pass for a channels_last caller: :mod:`.winograd`'s choice for ``p`` where
    that is the batch-wide or the fused one; else the fused one where it fits (the others would
    convert the caller's arrays to NCHW and back: 8x64x56x56's forward took 4.1 ms that way, 2.8
    fused in place); else None."""
    if W._dilated(p):
        return None
    pl = W._cached_plan(p, pass_)
    if isinstance(pl, str):
        return None
    if pl.batch or pl.fused or pl.kpanel:
        return pl
    pl = W._cached_plan(p, pass_, fused=True)
    return None if isinstance(pl, str) else pl


def _nhwc_forward(pl):
    """The NHWC forward function of plan ``pl``: this module's, the fused one or the one by
    output-channel panels."""
    from . import winograd_fused, winograd_kpanel
    return winograd_fused.forward if pl.fused else winograd_kpanel.forward_nhwc if pl.kpanel else forward


def native_forward(xh, w, b, p):
    """The forward of an NHWC input (N, H, W, C), in NHWC, where Winograd's plan is an NHWC one (then
    no layout conversion); None where it is not."""
    pl = _native_plan(p, "forward")
    return None if pl is None else _nhwc_forward(pl)(xh, w, b, p, pl.m, pl.rb)


def native_grad_input(gyh, w, p):
    """grad_input of an NHWC ``gyh`` (N, OH, OW, K), in NHWC, as :func:`native_forward`."""
    q = W._transposed(p)
    pl = _native_plan(q, "forward")
    return None if pl is None else _nhwc_forward(pl)(gyh, w, None, q, pl.m, pl.rb, flip=True)


def native_grad_weight(gyh, xh, p):
    """grad_weight from NHWC ``gyh`` and ``xh``, as :func:`native_forward`."""
    pl = _native_plan(p, "grad_weight")
    if pl is None:
        return None
    from . import winograd_fused, winograd_kpanel
    return (winograd_fused.grad_weight if pl.fused else winograd_kpanel.grad_weight_nhwc if pl.kpanel
            else grad_weight)(gyh, xh, p, pl.m, pl.rb)
