"""Winograd F(m x m, 3 x 3) forward by panels of output channels, the batch's tiles as the columns.

The other Winograd forwards (:mod:`.winograd`, :mod:`.winograd_fused`, :mod:`.winograd_nhwc`) put
tiles on the micro-kernel's MR rows and the output channels on its NR columns, with all of ``U``
(``a*a * k * cg`` elements) transformed per call into memory and read back by the products.  On
the small planes of deep layers U dwarfs everything else: resnet50-3x3-512 (8x512x7x7) has 32
F(4x4) tiles and 37.7 MB of U, whose transform alone took 4.7 ms of a 10 ms forward (Zen 4, 2
threads), and 32 tiles fill 3 MR-row panels only 76%.  Here the roles turn round:

1. ``V[g][e][tp][c][l] = (B^T d B)[e]`` of every tile ``t = tp*NR + l`` of the batch (t = (img*th +
   ti)*tw + tj), in NR-column panels of the micro-kernel, gathered from the input through a table of
   offsets (any layout: NCHW, channels_last; zero in the padding and past the last tile), the
   transforms along the panel's NR tiles (:func:`._winograd_kpanel_kernels.transform_in`);
2. a work item is (group, panel of MR output channels, ``tpc`` tile panels): its ``U[e][i][c]`` is
   transformed block by block of ``cb`` input channels into the worker's L2 and used at once,
   ``M[e] (MR x tiles) += U[e] . V[e]`` on the micro-kernel reading U's rows in place; U never
   travels through memory.  The transform runs on vectors of channels, their nine taps gathered
   from the weight (:func:`._winograd_kpanel_kernels._emit_u`), in the layer's dtype: the other
   Winograd kernels compute U in float64 and round it once, which took 36 ns a kernel here against
   ~5 (a float32 U carries a few more roundings of the weights' size; the accuracy tests hold it
   to the same factor of im2col's error as the others);
3. ``Y = A^T M A (+ b)`` along the tiles, stored into the output (NCHW or NHWC) with the part of
   each tile inside it.

grad_input is this forward on the flipped, channel-swapped kernel, read from the layer's weight.
Notation, accuracy and NaN spreading are those of :mod:`.winograd` (same matrices; U as said in 2).
Results do not depend on the thread count: every output is computed by one item in a fixed order.
"""
from __future__ import annotations

import numba
import numpy as np

from .._config import result, scratch
from . import _winograd_kpanel_kernels as K
from . import gemm as G
from . import nhwc as _nhwc
from . import winograd as W  # the transform matrices (a cycle: used at call time)
from . import winograd_nhwc as WN

_U_BYTES = 256 << 10   # a block of U (a*a x MR x cb) per worker: with V's panels it stays in L2
_M_BYTES = 256 << 10   # an item's M (a*a x MR x tpc*NR)
_IN_BYTES = 128 << 10  # the input transform's gathered and column-transformed block


def _dims(p, m):
    """(MR, NR, a, tiles of the batch, NR-tile panels) of F(m x m, 3 x 3) on ``p``."""
    mr, nr = G.tile(p.itemsize)
    total = WN.tiles(p, m)[2]
    return mr, nr, m + 2, total, -(-total // nr)


def _blocks(p, m):
    """(cb, tpc, cbi): input channels per block of U, tile panels per item, channels per block of
    the input transform."""
    mr, nr, a, _, ntp = _dims(p, m)
    a2 = a * a
    lanes = G.VBYTES // p.itemsize
    nb = -(-p.cg // max(lanes, _U_BYTES // (a2 * mr * p.itemsize)))
    cb = -(-(-(-p.cg // nb)) // lanes) * lanes  # whole vectors: U's rows are stored a vector at a time
    tpc = max(1, min(ntp, _M_BYTES // (a2 * mr * nr * p.itemsize)))
    cbi = max(1, min(p.cg, _IN_BYTES // (2 * a2 * nr * p.itemsize)))
    return cb, tpc, cbi


def _words(p, m):
    """(shared bytes, bytes per worker)."""
    mr, nr, a, total, ntp = _dims(p, m)
    a2 = a * a
    cb, tpc, cbi = _blocks(p, m)
    sl = mr * tpc * nr
    shared = p.g * a2 * ntp * nr * p.cg * p.itemsize + ntp * a2 * nr * 8 + 3 * total * 8
    worker = (a2 * mr * cb + a2 * sl + (m * a + m * m) * sl + 2 * a2 * cbi * nr) * p.itemsize
    return shared, worker


def plan(p, m, nthreads):
    """``(tiles per item, words, fixed)`` in :mod:`.winograd`'s plan form (``words`` the bytes per
    worker), or the reason it does not fit ``p.workspace_limit``."""
    shared, worker = _words(p, m)
    need = shared + nthreads * worker
    if need > p.workspace_limit:
        return (f"needs {need} bytes of workspace (transformed tiles of the batch and per-worker "
                f"blocks), workspace_limit is {p.workspace_limit}")
    return _blocks(p, m)[1], worker, shared


# Model, seconds on one thread, fitted on the 2-core Zen 4 (AVX-512, 2026-12-04, float32, 2 threads,
# 8x512x7x7, 32x512x4x4, 8x256x14x14, 16x256x6x6 and 8x64x56x56 at F(4x4) and F(2x2)): the products
# at 110 GFLOP/s per thread over the MR-row panels of output channels and NR-column panels of tiles
# they compute (8x512x7x7's F(4x4) products ran at ~220 on two); U's transform 0.3 ns per element,
# recomputed by each item of a panel; the input transform (a gather through the table of offsets)
# 1.2 ns per element of V; the output transform and its scattered stores 0.75 ns per element of M
# and of the output tiles.
_GEMM_RATE = 110e9 * G.VBYTES / 64
_U_ELEM = 0.3e-9
_V_ELEM = 1.2e-9
_Y_ELEM = 0.75e-9


def cost(p, m, tpc, nthreads):
    """Modelled seconds of the forward with F(m x m, 3 x 3), ``tpc`` tile panels per item."""
    mr, nr, a, _, ntp = _dims(p, m)
    a2 = a * a
    ntc = -(-ntp // tpc)
    kgp = -(-p.kg // mr) * mr
    scale = p.itemsize / 4
    gemm = 2.0 * a2 * p.g * kgp * p.cg * ntp * nr / (_GEMM_RATE * 4 / p.itemsize)
    u = scale * _U_ELEM * a2 * p.g * kgp * p.cg * ntc
    v = scale * (_V_ELEM * a2 * ntp * nr * p.c + _Y_ELEM * (a2 + m * m) * ntp * nr * p.k)
    return 3e-5 + (gemm + u) / _workers(p.g * (kgp // mr) * ntc, nthreads) + v / _workers(ntp, nthreads)


def _workers(items, nthreads):
    """Workers' worth of time ``items`` equal items take on ``nthreads`` (the last round runs
    part-full: 3 output-channel panels of a 32-channel layer kept one of two workers idle a third
    of the time), each extra worker counted at 0.9."""
    rounds = -(-items // nthreads)
    return max(1.0, items / rounds) * (0.9 + 0.1 / max(1, nthreads))


_TABLES: dict = {}


def _patches(p, m, size, top, left, h, w, xs):
    """The tiles' patch offsets: element k = i*size + j of the size x size patch of tile t = tp*NR
    + l (rows from ti*m - top, columns from tj*m - left of an h x w plane with element strides
    ``xs`` (n, c, h, w)) at ``[(tp*size*size + k)*NR + l]``, -1 outside the plane and past the last
    tile."""
    _, nr = G.tile(p.itemsize)
    th, tw, total = WN.tiles(p, m)
    ntp = -(-total // nr)
    t = np.arange(ntp * nr)
    img, ti, tj = t // (th * tw), (t // tw) % th, t % tw
    iy = ti[:, None] * m - top + np.arange(size)[None, :]   # (tiles, size) rows of the patch
    ix = tj[:, None] * m - left + np.arange(size)[None, :]
    off = img[:, None, None] * xs[0] + iy[:, :, None] * xs[2] + ix[:, None, :] * xs[3]
    ok = ((t < total)[:, None, None] & ((iy >= 0) & (iy < h))[:, :, None] & ((ix >= 0) & (ix < w))[:, None, :])
    off = np.where(ok, off, -1).reshape(ntp, nr, size * size)
    return np.ascontiguousarray(off.transpose(0, 2, 1)).reshape(-1).astype(np.int64)


def _tables(p, m, xs, ys):
    """(toffs, ybase, vr, vc) of the tiles for element strides ``xs`` of the input and ``ys`` of the
    output, both (n, c, h, w): the input patches' offsets (:func:`_patches`), each tile's first
    output and the rows and columns of it inside the output."""
    key = (p.n, p.h, p.w, p.oh, p.ow, p.ph0, p.pw0, m, xs, ys, G.tile(p.itemsize))
    got = _TABLES.get(key)
    if got is not None:
        return got
    th, tw, total = WN.tiles(p, m)
    toffs = _patches(p, m, m + 2, p.ph0, p.pw0, p.h, p.w, xs)
    t = np.arange(total)
    img, ti, tj = t // (th * tw), (t // tw) % th, t % tw
    ybase = (img * ys[0] + ti * m * ys[2] + tj * m * ys[3]).astype(np.int64)
    vr = np.minimum(m, p.oh - ti * m).astype(np.int64)
    vc = np.minimum(m, p.ow - tj * m).astype(np.int64)
    if len(_TABLES) > 64:
        _TABLES.clear()
    got = _TABLES[key] = (toffs, ybase, vr, vc)
    return got


def _flat(x):
    """(1-D view of x's memory, element strides) for a C-contiguous or channels_last x; else of a
    C-contiguous copy."""
    if not (x.flags.c_contiguous or _nhwc.is_channels_last(x)):
        x = np.ascontiguousarray(x)
    isz = x.itemsize
    flat = np.lib.stride_tricks.as_strided(x, shape=(x.size,), strides=(isz,))
    return flat, tuple(s // isz for s in x.strides)


def forward(x, w, b, p, m, tpc, flip=False, nhwc_out=False):
    """The forward of ``x`` (N, C, H, W) in NCHW or channels_last memory with F(m x m, 3 x 3): the
    output, (N, K, OH, OW) C-contiguous, or (N, OH, OW, K) C-contiguous with ``nhwc_out``.  With
    ``flip``, ``w`` is the layer's weight and the pass grad_input's (``p`` its transposed problem)."""
    dt = p.dtype
    mr, nr, a, total, ntp = _dims(p, m)
    a2 = a * a
    y = result((p.n, p.oh, p.ow, p.k) if nhwc_out else (p.n, p.k, p.oh, p.ow), dt)
    if p.n == 0 or y.size == 0:
        return y
    ys = (p.oh * p.ow * p.k, 1, p.ow * p.k, p.k) if nhwc_out else (p.k * p.oh * p.ow, p.oh * p.ow, p.ow, 1)
    xf, xs = _flat(x)
    toffs, ybase, vr, vc = _tables(p, m, xs, ys)
    cb, _, cbi = _blocks(p, m)
    nw = numba.get_num_threads()
    v = scratch("winograd.kv", (p.g * a2 * ntp * p.cg * nr,), dt)
    bi, bc, bn = WN._table(W._BT[m], dt)
    ai, ac, an = WN._table(W._AT[m], dt)
    K.transform_in(xf, xs[1], toffs, v, p.cg, p.g, a, a, ntp, cbi, bi, bc, bn,
                   scratch("winograd.kin", (nw, 2 * a2 * cbi * nr), dt), np.zeros((nw, 8), np.int64),
                   np.zeros((nw, 8), dt), np.zeros(1, dt), np.zeros(1, np.int64))
    wf = np.ascontiguousarray(w).reshape(-1)
    if flip:  # tap of (kk, c) = w[g*cg + c, kk, 8 - tap] (this call's kg and cg are the layer's cg, kg)
        wgs, wks, wcs = p.cg * p.kg * 9, 9, p.kg * 9
    else:
        wgs, wks, wcs = p.kg * p.cg * 9, p.cg * 9, 9
    sl = mr * tpc * nr
    bias = np.ascontiguousarray(b, dtype=dt) if b is not None else np.zeros(1, dt)
    K.products_out(wf, wgs, wks, wcs, 1 if flip else 0, v, ntp, p.cg, p.kg, p.g, a, m, cb, tpc, total,
                   y.reshape(-1), ybase, vr, vc, ys[1], ys[2], ys[3], bias, b is not None, ai, ac, an,
                   scratch("winograd.ku", (nw, a2 * mr * cb), dt), np.arange(mr, dtype=np.int64) * cb, np.zeros(1, dt),
                   scratch("winograd.km", (nw, a2 * sl), dt), scratch("winograd.ks", (nw, (m * a + m * m) * sl), dt),
                   np.zeros((nw, 8), np.int64), np.zeros((nw, 8), dt), np.zeros(1, np.int64))
    return y


def forward_nhwc(xh, w, b, p, m, tpc, flip=False):
    """:func:`forward` of a C-contiguous NHWC input ``xh`` (N, H, W, C), in NHWC (N, OH, OW, K)."""
    return forward(_nhwc.channels_last_view(xh), w, b, p, m, tpc, flip, nhwc_out=True)


# ----------------------------------------------------------------------------------- grad_weight
def _gw_blocks(p, m):
    """(cb, cbi, cbc): input channels per item (a multiple of NR), gy's and x's channels per block of
    their transforms."""
    mr, nr, a, _, _ = _dims(p, m)
    a2 = a * a
    nb = -(-p.cg // max(nr, _U_BYTES // (a2 * mr * p.itemsize)))
    cb = -(-(-(-p.cg // nb)) // nr) * nr
    cbi = max(1, min(p.kg, _IN_BYTES // ((m + a) * m * nr * p.itemsize)))
    cbc = max(1, min(p.cg, _IN_BYTES // (2 * a2 * p.itemsize)))
    return cb, cbi, cbc


def gw_plan(p, m, nthreads):
    """grad_weight's ``(cb, bytes per worker, shared bytes)``, or the reason it does not fit
    ``p.workspace_limit``."""
    mr, nr, a, _, ntp = _dims(p, m)
    a2 = a * a
    cb, cbi, cbc = _gw_blocks(p, m)
    ldv = -(-p.cg // nr) * nr
    shared = (p.g * a2 * ntp * nr * (p.kg + ldv)) * p.itemsize + ntp * nr * (a2 + m * m) * 8 + p.k * p.cg * 9 * p.itemsize
    worker = (a2 * mr * cb + (3 * a + 9) * mr * cb + (m + a) * m * cbi * nr + 2 * a2 * cbc) * p.itemsize
    need = shared + nthreads * worker
    if need > p.workspace_limit:
        return (f"needs {need} bytes of workspace (transformed tiles of the batch and per-worker "
                f"blocks), workspace_limit is {p.workspace_limit}")
    return cb, worker, shared


# Model, seconds on one thread (Zen 4, 2026-12-04, float32, 2 threads; 8x512x7x7, 32x512x4x4,
# 32x256x8x8, 16x256x6x6, 8x128x28x28, 8x64x56x56: 6.2 / 6.5 / 5.7 / 2.7 / 6.3 / 11.1 ms measured,
# 6.9 / 6.9 / 5.9 / 3.2 / 5.8 / 7.7 modelled): the products at the forward's rate over the MR-row
# panels of output channels, whole NR columns of input channels and NR-tile panels; the two
# transforms per transformed element; the taps' transform per element of Mw.
_GW_V_ELEM = 1.2e-9
_GW_TAPS = 0.5e-9


def gw_cost(p, m, cb, nthreads):
    """Modelled seconds of grad_weight with F(m x m, 3 x 3)."""
    mr, nr, a, _, ntp = _dims(p, m)
    a2 = a * a
    tiles = ntp * nr
    kgp = -(-p.kg // mr) * mr
    cgp = -(-p.cg // nr) * nr
    scale = p.itemsize / 4
    # the k loop of a micro-kernel call is one NR-tile panel long: its tile's load and store
    # weigh as ~8 more steps
    gemm = 2.0 * a2 * p.g * kgp * cgp * tiles * (nr + 8) / nr / (_GEMM_RATE * 4 / p.itemsize)
    taps = scale * _GW_TAPS * a2 * p.g * kgp * cgp
    cb, cbi, cbc = _gw_blocks(p, m)
    # the transforms' work plus ~25 ns per call of their 1-D passes (one tile per item along the
    # channels: 32x32x14x14's 512 tiles made 21,500 calls)
    trans = scale * _GW_V_ELEM * a2 * tiles * (p.c + p.k) + _CALL * (
        tiles * p.g * -(-p.cg // cbc) * (m + 2) * (m + 3) + tiles // nr * p.g * -(-p.kg // cbi) * (m + 2) * (m + 3))
    items = p.g * (kgp // mr) * -(-p.cg // cb)
    return 3e-5 + (gemm + taps) / _workers(items, nthreads) + trans / _workers(tiles, nthreads)


_CALL = 25e-9


def grad_weight(gy, x, p, m, cb):
    """grad_weight (K, C/groups, 3, 3) C-contiguous from ``gy`` (N, K, OH, OW) and ``x`` (N, C, H,
    W), each NCHW or channels_last, with F(m x m, 3 x 3): ``gw_kc = G^T [sum over the batch's tiles
    of (A gy_k A^T) (.) (B^T d_c B)] G`` as :mod:`.winograd` states it, the sums on the micro-kernel
    by panels of output channels (:func:`._winograd_kpanel_kernels.gw_products`)."""
    dt = p.dtype
    mr, nr, a, _, ntp = _dims(p, m)
    a2 = a * a
    gw = np.empty(p.w_shape, dt)
    if p.n == 0 or gw.size == 0:
        gw[...] = 0
        return gw
    cb, cbi, cbc = _gw_blocks(p, m)
    ldv = -(-p.cg // nr) * nr
    nw = numba.get_num_threads()
    gf, gs = _flat(gy)
    xf, xs = _flat(x)
    tx = _tables(p, m, xs, (0, 0, 0, 0))[0]
    tg = _patches(p, m, m, 0, 0, p.oh, p.ow, gs)
    wg = scratch("winograd.kwg", (p.g * a2 * ntp * p.kg * nr,), dt)
    ai, ac, an = WN._table(np.ascontiguousarray(W._AT[m].T), dt)
    K.transform_in(gf, gs[1], tg, wg, p.kg, p.g, m, a, ntp, cbi, ai, ac, an,
                   scratch("winograd.kin", (nw, (m + a) * m * cbi * nr), dt), np.zeros((nw, 8), np.int64),
                   np.zeros((nw, 8), dt), np.zeros(1, dt), np.zeros(1, np.int64))
    vc = scratch("winograd.kvc", (p.g * a2 * ntp * nr * ldv,), dt)
    bi, bc, bn = WN._table(W._BT[m], dt)
    K.transform_in_c(xf, xs[1], tx, vc, p.cg, ldv, p.g, a, ntp * nr, cbc, bi, bc, bn,
                     scratch("winograd.kinc", (nw, 2 * a2 * cbc), dt), np.zeros((nw, 8), np.int64),
                     np.zeros((nw, 8), dt), np.zeros(1, dt), np.zeros(1, np.int64))
    gi, gc, gn = WN._table(np.ascontiguousarray(W._G[m].T), dt)
    K.gw_products(wg, vc, ntp, ldv, p.cg, p.kg, p.g, a, cb, gw.reshape(-1), gi, gc, gn,
                  scratch("winograd.kgm", (nw, a2 * mr * cb), dt), scratch("winograd.kgs", (nw, (3 * a + 9) * mr * cb), dt),
                  np.arange(mr, dtype=np.int64) * nr, np.zeros(1, dt), np.zeros((nw, 8), np.int64),
                  np.zeros((nw, 8), dt), np.zeros(1, np.int64))
    return gw


def grad_weight_nhwc(gyh, xh, p, m, cb):
    """:func:`grad_weight` of C-contiguous NHWC ``gyh`` (N, OH, OW, K) and ``xh`` (N, H, W, C)."""
    return grad_weight(_nhwc.channels_last_view(gyh), _nhwc.channels_last_view(xh), p, m, cb)
