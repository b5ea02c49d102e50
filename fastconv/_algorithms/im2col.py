"""im2col + GEMM convolution: forward and both gradients as BLAS matrix products, in bounded memory.

Notation: n c h w input; k r s weight (cg = c/g, kg = k/g per group g); oh ow output; sh sw stride;
ph pw top/left padding; dh dw dilation; a tap t = (c, r, s) of one group, tn = cg*r*s taps in the
order of ``w.reshape(k, tn)``; m output positions of one tile (whole output rows).

The column matrix of one image and group has one row per tap and one column per output position:
``col[t, i*ow + j] = x_pad[n, c, i*sh + r*dh, j*sw + s*dw]``.  Then, per image and group,

* forward:      ``y[n, g] (kg x oh*ow) = w[g] (kg x tn) . col (tn x oh*ow)``
* grad_weight:  ``gw[g] (kg x tn) += gy[n, g] (kg x oh*ow) . col.T``
* grad_input:   ``gcol = w[g].T . gy[n, g]`` scattered back (col2im) onto the input positions it
  was gathered from.

Tiles.  ``col`` is never built whole: one tile covers a block of output rows of one image and one
group (and, in the backward passes, a block of input channels, i.e. a block of taps).  Each numba
worker owns one buffer of the tile size, and the sum of all workers' buffers stays under
``p.workspace_limit``; a shape that cannot fit one output row of one channel block is refused by
:func:`supports`.  1x1 kernels with stride 1 and no padding need no column matrix: ``x[n, g]`` *is*
``col`` and the GEMM reads it in place.

GEMM.  Kernels call the BLAS ``?gemm`` that numba's ``np.dot`` uses (scipy's, through numba's
``numba_xxgemm`` helper) directly, so leading dimensions and ``beta`` are ours: the forward GEMM
writes straight into a row block of ``y``, grad_weight accumulates into ``gw`` with ``beta = 1``,
and grad_input reads ``gy`` in place -- no staging copies.  The symbol is resolved by name when a
cached kernel loads, so ``cache=True`` stays valid across processes.

One thread pool.  Work items (image, group, row block / channel block) are spread over numba's
workers with ``prange``, and BLAS runs single-threaded inside each: :class:`_SerialBlas` holds every
loaded BLAS library to one thread for the duration of a call (a library handle found once with
threadpoolctl; setting and restoring costs ~2 us, entering ``threadpool_limits`` ~1.8 ms).  With
both pools active, four 64x576x448 GEMMs in a ``prange`` took 112 ms instead of 1.2 ms here.

Race-freedom and determinism.  forward: each item writes its own block of ``y``.  grad_input: an
item owns whole input planes (image, channel block) and scatters only into them.  grad_weight: an
item owns a block of taps of one group (its columns of ``gw``) and reduces over its share of the
batch in a fixed order; when there are fewer channel blocks than workers the batch is split too,
into per-split partial sums added in split order after the parallel loop.  So results depend on
the thread count and the budget (through the split and the tile size) only by rounding, and a
given configuration always gives the same bits.
"""
import threading

import numba
import numpy as np
from numba import prange, types
from numba.np.linalg import ensure_blas

from .._jit import FASTMATH, kernel

# ---------------------------------------------------------------------------------------- BLAS
ensure_blas()  # numba's dot needs scipy; fail at import with numba's message rather than in a kernel
# numba's exported helper (numba/_lapack.c): column-major ?gemm with Py_ssize_t sizes; kind is
# 's' or 'd', trans 'n' or 't'.  Declared with void pointers so one kernel serves both dtypes.
_xxgemm = types.ExternalFunction("numba_xxgemm", types.intc(
    types.char, types.char, types.char, types.intp, types.intp, types.intp,
    types.voidptr, types.voidptr, types.intp, types.voidptr, types.intp,
    types.voidptr, types.voidptr, types.intp))
_N, _T = ord("n"), ord("t")

# Serial helpers, compiled into the calling parallel kernel (not cached on their own).
_micro = numba.njit(fastmath=FASTMATH, nogil=True, inline="always")


@_micro
def _gemm(kind, ta, tb, m, n, kk, alpha, a, lda, b, ldb, beta, c, ldc):
    # Row-major C (m x n, row pitch ldc) = alpha * op(A) . op(B) + beta * C, where a, b, c are 1-D
    # views starting at each matrix's first element.  A row-major matrix is the column-major
    # transpose, so this is the column-major C.T = op(B).T . op(A).T with the same trans flags.
    _xxgemm(kind, tb, ta, n, m, kk, alpha.ctypes, b.ctypes, ldb, a.ctypes, lda, beta.ctypes,
            c.ctypes, ldc)


@_micro
def _cdiv(a, b):
    return -((-a) // b)


@_micro
def _valid_cols(ss, sw, pw, dw, w, ow):
    # output columns j whose input column j*sw - pw + ss*dw lies in [0, w)
    lo = max(0, _cdiv(pw - ss * dw, sw))
    hi = min(ow, _cdiv(w + pw - ss * dw, sw))
    return lo, max(lo, hi)


@_micro
def _im2col(xn, col, c0, nc, i0, i1, r, s, sh, sw, ph, pw, dh, dw, ow):
    # col[t*m + (i - i0)*ow + j] for the taps of channels c0 .. c0+nc-1 and output rows i0 .. i1-1
    h, w = xn.shape[1], xn.shape[2]
    m = (i1 - i0) * ow
    for cc in range(nc):
        xc = xn[c0 + cc]
        for rr in range(r):
            for ss in range(s):
                t0 = ((cc * r + rr) * s + ss) * m
                lo, hi = _valid_cols(ss, sw, pw, dw, w, ow)
                iw0 = lo * sw - pw + ss * dw
                for i in range(i0, i1):
                    o = t0 + (i - i0) * ow
                    ih = i * sh - ph + rr * dh
                    if ih < 0 or ih >= h or hi == lo:
                        col[o:o + ow] = 0
                        continue
                    col[o:o + lo] = 0
                    col[o + hi:o + ow] = 0
                    if sw == 1:
                        col[o + lo:o + hi] = xc[ih, iw0:iw0 + hi - lo]
                    else:
                        for j in range(hi - lo):
                            col[o + lo + j] = xc[ih, iw0 + j * sw]


@_micro
def _col2im(col, gn, c0, nc, i0, i1, r, s, sh, sw, ph, pw, dh, dw, ow):
    # the transpose of _im2col: gn[c0 + cc, ih, iw] += col[...] for every in-bounds tap
    h, w = gn.shape[1], gn.shape[2]
    m = (i1 - i0) * ow
    for cc in range(nc):
        gc = gn[c0 + cc]
        for rr in range(r):
            for ss in range(s):
                t0 = ((cc * r + rr) * s + ss) * m
                lo, hi = _valid_cols(ss, sw, pw, dw, w, ow)
                if hi == lo:
                    continue
                iw0 = lo * sw - pw + ss * dw
                for i in range(i0, i1):
                    ih = i * sh - ph + rr * dh
                    if ih < 0 or ih >= h:
                        continue
                    o = t0 + (i - i0) * ow + lo
                    if sw == 1:
                        dst = gc[ih, iw0:iw0 + hi - lo]
                        src = col[o:o + hi - lo]
                        for j in range(hi - lo):
                            dst[j] += src[j]
                    else:
                        for j in range(hi - lo):
                            gc[ih, iw0 + j * sw] += col[o + j]


# ---------------------------------------------------------------------------------------- kernels
@kernel
def _forward(x, wt, b, y, buf, kind, has_bias, g, r, s, sh, sw, ph, pw, dh, dw, oh, ow, rb, direct):
    # x (n, c, h, w); wt (k*tn,); y (n*k*oh*ow,); buf (nw, >= tn*rb*ow).  Item = (image, group, row
    # block), dealt round-robin to the nw workers.  direct: x[n, g] is the column matrix (1x1).
    nn, c, h, w = x.shape
    k = b.shape[0]
    kg, cg = k // g, c // g
    tn = cg * r * s
    nw = buf.shape[0]
    nrb = (oh + rb - 1) // rb
    items = nn * g * nrb
    plane = oh * ow
    xf = x.reshape(-1)
    for wid in prange(nw):
        col = buf[wid]
        one = np.ones(1, dtype=y.dtype)
        beta = np.full(1, 1.0 if has_bias else 0.0, dtype=y.dtype)
        for it in range(wid, items, nw):
            ib = it % nrb
            gi = (it // nrb) % g
            n = it // (nrb * g)
            i0 = ib * rb
            i1 = min(oh, i0 + rb)
            m = (i1 - i0) * ow
            y0 = (n * k + gi * kg) * plane + i0 * ow
            if has_bias:
                for q in range(kg):
                    y[y0 + q * plane:y0 + q * plane + m] = b[gi * kg + q]
            if direct:
                _gemm(kind, _N, _N, kg, m, tn, one, wt[gi * kg * tn:], tn,
                      xf[(n * c + gi * cg) * h * w + i0 * ow:], h * w, beta, y[y0:], plane)
            else:
                _im2col(x[n], col, gi * cg, cg, i0, i1, r, s, sh, sw, ph, pw, dh, dw, ow)
                _gemm(kind, _N, _N, kg, m, tn, one, wt[gi * kg * tn:], tn, col, m, beta, y[y0:], plane)


@kernel
def _grad_input(gy, wt, gx, buf, kind, g, cg, r, s, sh, sw, ph, pw, dh, dw, oh, ow, rb, cb, direct):
    # gy (n*k*oh*ow,); wt (k*tn,); gx (n, c, h, w), zeroed unless direct; buf (nw, >= cb*r*s*rb*ow).
    # Item = (image, group, block of cb input channels): it owns those planes of gx, so the
    # col2im scatter never races.  direct (1x1): the GEMM writes gx[n, channels] in place.
    nn, c, h, w = gx.shape
    kg = wt.shape[0] // (cg * r * s) // g
    k = kg * g
    tn = cg * r * s
    nw = buf.shape[0]
    ncb = (cg + cb - 1) // cb
    nrb = (oh + rb - 1) // rb
    items = nn * g * ncb
    plane = oh * ow
    gxf = gx.reshape(-1)
    for wid in prange(nw):
        col = buf[wid]
        one = np.ones(1, dtype=gx.dtype)
        zero = np.zeros(1, dtype=gx.dtype)
        for it in range(wid, items, nw):
            ci = it % ncb
            gi = (it // ncb) % g
            n = it // (ncb * g)
            c0 = ci * cb
            nc = min(cb, cg - c0)
            t0 = c0 * r * s
            tb = nc * r * s
            for ib in range(nrb):
                i0 = ib * rb
                i1 = min(oh, i0 + rb)
                m = (i1 - i0) * ow
                g0 = (n * k + gi * kg) * plane + i0 * ow
                a = wt[gi * kg * tn + t0:]
                if direct:
                    x0 = (n * c + gi * cg + c0) * h * w + i0 * ow
                    _gemm(kind, _T, _N, tb, m, kg, one, a, tn, gy[g0:], plane, zero, gxf[x0:], h * w)
                else:
                    _gemm(kind, _T, _N, tb, m, kg, one, a, tn, gy[g0:], plane, zero, col, m)
                    _col2im(col, gx[n], gi * cg + c0, nc, i0, i1, r, s, sh, sw, ph, pw, dh, dw, ow)


@kernel
def _grad_weight(gy, x, gwp, buf, kind, g, k, r, s, sh, sw, ph, pw, dh, dw, oh, ow, rb, cb, direct):
    # gy (n*k*oh*ow,); x (n, c, h, w); gwp (nsplit, k*tn) zeroed; buf (nw, >= cb*r*s*rb*ow).
    # Item = (batch split, group, block of cb channels): it owns columns t0 .. t0+tb-1 of the
    # group's rows of gwp[split] and accumulates into them with beta = 1 in image, row order.
    nn, c, h, w = x.shape
    nsplit = gwp.shape[0]
    kg, cg = k // g, c // g
    tn = cg * r * s
    nw = buf.shape[0]
    ncb = (cg + cb - 1) // cb
    nrb = (oh + rb - 1) // rb
    items = nsplit * g * ncb
    plane = oh * ow
    per = (nn + nsplit - 1) // nsplit
    xf = x.reshape(-1)
    for wid in prange(nw):
        col = buf[wid]
        one = np.ones(1, dtype=x.dtype)
        for it in range(wid, items, nw):
            ci = it % ncb
            gi = (it // ncb) % g
            sp = it // (ncb * g)
            c0 = ci * cb
            nc = min(cb, cg - c0)
            t0 = c0 * r * s
            tb = nc * r * s
            out = gwp[sp, gi * kg * tn + t0:]
            for n in range(sp * per, min(nn, (sp + 1) * per)):
                for ib in range(nrb):
                    i0 = ib * rb
                    i1 = min(oh, i0 + rb)
                    m = (i1 - i0) * ow
                    g0 = (n * k + gi * kg) * plane + i0 * ow
                    if direct:
                        x0 = (n * c + gi * cg + c0) * h * w + i0 * ow
                        _gemm(kind, _N, _T, kg, tb, m, one, gy[g0:], plane, xf[x0:], h * w, one, out, tn)
                    else:
                        _im2col(x[n], col, gi * cg + c0, nc, i0, i1, r, s, sh, sw, ph, pw, dh, dw, ow)
                        _gemm(kind, _N, _T, kg, tb, m, one, gy[g0:], plane, col, m, one, out, tn)


# ---------------------------------------------------------------------------------------- one pool
class _SerialBlas:
    """Hold the BLAS that kernels call to one thread while they run (re-entrant, thread-safe).

    The first entrant saves each library's thread count and sets 1; the last one out restores it.
    Library handles are looked up once (threadpoolctl), so entering costs a few microseconds.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._depth = 0
        self._libs = None
        self._saved = ()

    def _find(self):
        from threadpoolctl import ThreadpoolController
        import scipy.linalg.cython_blas  # noqa: F401  (the BLAS numba calls must be loaded to be found)
        # numpy's own BLAS (a separate library in wheels) is not called inside kernels and belongs
        # to fastconv.set_num_threads; a BLAS that numpy and scipy share is limited like scipy's.
        return [lib for lib in ThreadpoolController().lib_controllers
                if lib.user_api == "blas" and "numpy" not in lib.filepath]

    def __enter__(self):
        with self._lock:
            if self._depth == 0:
                if self._libs is None:
                    self._libs = self._find()
                self._saved = [(lib, lib.get_num_threads()) for lib in self._libs]
                for lib, nt in self._saved:
                    if nt != 1:
                        lib.set_num_threads(1)
            self._depth += 1
        return self

    def __exit__(self, *exc):
        with self._lock:
            self._depth -= 1
            if self._depth == 0:
                for lib, nt in self._saved:
                    if nt != 1:
                        lib.set_num_threads(nt)
        return False


serial_blas = _SerialBlas()


# ---------------------------------------------------------------------------------------- planning
_TILE_BYTES = 1 << 20   # target column tile per worker: stays in L2 while the GEMM packs it
_KIND = {np.dtype(np.float32): ord("s"), np.dtype(np.float64): ord("d")}


def _direct(p):
    """1x1, stride 1, no padding: the input planes are the column matrix."""
    return p.r == 1 and p.s == 1 and p.sh == 1 and p.sw == 1 and not p.padded


def _min_workspace(p, pass_):
    """Bytes of the smallest tile: one output row of all taps (forward) or of one channel's taps."""
    if _direct(p):
        return 0
    taps = p.cg * p.r * p.s if pass_ == "forward" else p.r * p.s
    return taps * p.ow * p.itemsize


def _workers(p, row_bytes, items):
    """How many workers to use: numba's thread count, fewer if the budget or the items are short."""
    nw = max(1, min(numba.get_num_threads(), items))
    if row_bytes:
        nw = max(1, min(nw, p.workspace_limit // row_bytes))
    return nw


def _rows_per_tile(p, row_bytes, nw, want_items):
    """Output rows per tile: within the budget (all workers' buffers), near _TILE_BYTES, and small
    enough that there are ``want_items`` tiles in one image's rows when that helps parallelism."""
    if not row_bytes:
        return max(1, -(-p.oh // max(1, want_items)))
    cap = p.workspace_limit // (nw * row_bytes)
    rb = max(1, min(p.oh, cap, max(1, _TILE_BYTES // row_bytes)))
    if want_items > 1:
        rb = min(rb, max(1, -(-p.oh // want_items)))
    return max(1, min(rb, cap))


def _buffer(nw, nbytes, dtype):
    return np.empty((nw, max(1, nbytes // np.dtype(dtype).itemsize)), dtype=dtype)


# ---------------------------------------------------------------------------------------- passes
def forward(x, w, b, p):
    x = np.ascontiguousarray(x)
    tn = p.cg * p.r * p.s
    direct = _direct(p)
    row_bytes = 0 if direct else tn * p.ow * p.itemsize
    nthreads = numba.get_num_threads()
    # split an image's rows only when there are fewer (image, group) pairs than workers
    want = -(-nthreads // (p.n * p.g)) if p.n * p.g < nthreads else 1
    nw = _workers(p, row_bytes, p.n * p.g * max(1, min(p.oh, want)))
    rb = _rows_per_tile(p, row_bytes, nw, want)
    buf = _buffer(nw, rb * row_bytes, p.dtype)
    y = np.empty(p.y_shape, dtype=p.dtype)
    has_bias = b is not None
    bb = np.ascontiguousarray(b) if has_bias else np.zeros(p.k, p.dtype)
    with serial_blas:
        _forward(x, np.ascontiguousarray(w).reshape(-1), bb, y.reshape(-1), buf, _KIND[p.dtype],
                 has_bias, p.g, p.r, p.s, p.sh, p.sw, p.ph0, p.pw0, p.dh, p.dw, p.oh, p.ow, rb, direct)
    return y


def _channel_blocks(p, items_without, nthreads):
    """Channels per block in the backward passes: split a group's channels only as far as needed
    to give every worker an item."""
    if items_without >= nthreads:
        return p.cg
    parts = min(p.cg, -(-nthreads // items_without))
    return -(-p.cg // parts)


def grad_input(gy, w, p):
    gy = np.ascontiguousarray(gy).reshape(-1)
    direct = _direct(p)
    nthreads = numba.get_num_threads()
    cb = _channel_blocks(p, p.n * p.g, nthreads)
    # the budget may force smaller channel blocks: one row of cb channels' taps must fit per worker
    if not direct:
        cb = max(1, min(cb, p.workspace_limit // (p.r * p.s * p.ow * p.itemsize)))
    row_bytes = 0 if direct else cb * p.r * p.s * p.ow * p.itemsize
    items = p.n * p.g * -(-p.cg // cb)
    nw = _workers(p, row_bytes, items)
    rb = _rows_per_tile(p, row_bytes, nw, 1)
    buf = _buffer(nw, rb * row_bytes, p.dtype)
    gx = (np.empty if direct else np.zeros)(p.x_shape, dtype=p.dtype)
    with serial_blas:
        _grad_input(gy, np.ascontiguousarray(w).reshape(-1), gx, buf, _KIND[p.dtype], p.g, p.cg,
                    p.r, p.s, p.sh, p.sw, p.ph0, p.pw0, p.dh, p.dw, p.oh, p.ow, rb, cb, direct)
    return gx


def grad_weight(gy, x, p):
    gy = np.ascontiguousarray(gy).reshape(-1)
    x = np.ascontiguousarray(x)
    direct = _direct(p)
    nthreads = numba.get_num_threads()
    tn = p.cg * p.r * p.s
    cb = _channel_blocks(p, p.g, nthreads)
    if not direct:
        cb = max(1, min(cb, p.workspace_limit // (p.r * p.s * p.ow * p.itemsize)))
    row_bytes = 0 if direct else cb * p.r * p.s * p.ow * p.itemsize
    blocks = p.g * -(-p.cg // cb)
    # fewer (group, channel block) items than workers: split the batch into partial sums, if the
    # extra gw copies leave room in the budget for a row per worker
    nsplit = 1
    if blocks < nthreads and p.n > 1:
        nsplit = min(p.n, -(-nthreads // blocks))
        while nsplit > 1 and ((nsplit - 1) * p.k * tn * p.itemsize
                              + min(nthreads, nsplit * blocks) * row_bytes > p.workspace_limit):
            nsplit -= 1
    extra = (nsplit - 1) * p.k * tn * p.itemsize if nsplit > 1 else 0
    nw = max(1, min(nthreads, nsplit * blocks))
    if row_bytes:
        nw = max(1, min(nw, (p.workspace_limit - extra) // row_bytes))
    cap = (p.workspace_limit - extra) // (nw * row_bytes) if row_bytes else p.oh
    rb = max(1, min(p.oh, cap, max(1, _TILE_BYTES // row_bytes) if row_bytes else p.oh))
    buf = _buffer(nw, rb * row_bytes, p.dtype)
    gwp = np.zeros((nsplit, p.k * tn), dtype=p.dtype)
    with serial_blas:
        _grad_weight(gy, x, gwp, buf, _KIND[p.dtype], p.g, p.k, p.r, p.s, p.sh, p.sw, p.ph0, p.pw0,
                     p.dh, p.dw, p.oh, p.ow, rb, cb, direct)
    gw = gwp[0]
    for i in range(1, nsplit):
        gw += gwp[i]
    return gw.reshape(p.w_shape)


# ---------------------------------------------------------------------------------------- registry
_INT_MAX = 2**31 - 1  # BLAS sizes and leading dimensions are 32-bit ints


def supports(p, pass_):
    """Every stride, padding, dilation and group count; refuses a budget below one output row."""
    if max(p.h * p.w, p.oh * p.ow, p.k * p.cg * p.r * p.s) > _INT_MAX:
        return "a plane or the weight matrix has more than 2**31 - 1 elements (BLAS int sizes)"
    need = _min_workspace(p, pass_)
    if need > p.workspace_limit:
        return (f"needs at least {need} bytes of workspace for one output row, "
                f"workspace_limit is {p.workspace_limit}")
    return None


def cost(p, pass_):
    """Seconds: per-call overhead + GEMM flops at a rate that falls for thin matrices + gather bytes.

    Constants measured on the 2-core AVX-512 build machine (shared, so rough): ~100 GFLOP/s float32
    for GEMMs with all three sizes >= 64 on 2 threads (half in float64), ~4 GB/s effective for the
    strided gather/scatter of the column matrix, ~30 us of fixed cost per call.
    """
    tn = p.cg * p.r * p.s
    m = p.oh * p.ow
    rate = 100e9 if p.itemsize == 4 else 50e9
    # thin GEMMs (few output channels per group, few taps or positions) run far below peak
    for dim in (p.kg, tn, m):
        rate *= min(1.0, dim / 64.0)
    flops = 2.0 * p.macs
    moved = 0 if _direct(p) else p.n * p.g * tn * m * p.itemsize * (2 if pass_ == "grad_input" else 1)
    return 3e-5 + flops / max(rate, 1e8) + moved / 4e9
