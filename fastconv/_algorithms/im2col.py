"""im2col + GEMM convolution: forward and both gradients as BLAS matrix products, in bounded memory.

Notation: n c h w input; k r s weight (cg = c/g, kg = k/g per group g); oh ow output; sh sw stride;
ph pw top/left padding; dh dw dilation; a tap t = (c, r, s) of one group, tn = cg*r*s taps in the
order of ``w.reshape(k, tn)``; m output positions of one tile.

The column matrix of one image and group has one row per tap and one column per output position:
``col[t, i*ow + j] = x_pad[n, c, i*sh + r*dh, j*sw + s*dw]``.  Then, per image and group,

* forward:      ``y[n, g] (kg x oh*ow) = w[g] (kg x tn) . col (tn x oh*ow)``
* grad_weight:  ``gw[g] (kg x tn) += gy[n, g] (kg x oh*ow) . col.T``
* grad_input:   ``gcol = w[g].T . gy[n, g]`` scattered back (col2im) onto the input positions it
  was gathered from; with stride 1 and wide groups instead the forward correlation of the padded
  ``gy`` with the flipped, channel-swapped kernel (a gather, no scatter; see :func:`_transposed`).

Gather.  By default the input is first copied once into zero-padded planes whose columns are split
by phase ``iw % sw`` (common.pad_planes' layout): every tap of every output row is then one
contiguous run of ow elements, copied with no bounds checks or strides (5-15x faster than a
bounds-checked strided gather here).  Without padding and with column stride 1 the input's own
planes have that layout, and the gather reads them in place (no copy, one parallel region less:
lenet5-c1/-c3 forward and grad_weight -11 to -20%).  When the copy does not fit the budget, the
gather reads the raw planes with bounds checks instead.

Tiles.  ``col`` is never built whole: a tile is a block of output rows of one image, or several
whole images when planes are small (< 256 positions: one GEMM for several images, through a
staging buffer), of one group -- and in the backward passes, of a block of input channels (a
block of taps).  Each numba worker owns one tile buffer, and the padded copy plus all workers'
buffers stay under ``p.workspace_limit``; a budget below one output row of one channel's taps
(all taps in the forward pass) is refused by :func:`supports`.  1x1 kernels with stride 1 and no
padding need no column matrix: ``x[n, g]`` *is* ``col`` and the GEMM reads it in place.

GEMM.  Kernels call a Fortran ``?gemm`` through a function pointer passed as an argument -- the
OpenBLAS bundled with numpy when found, else scipy's ``cython_blas`` (see :class:`_Blas`) -- with
our own leading dimensions and ``beta``: the forward GEMM writes straight into a row block of
``y``, grad_weight accumulates into ``gw`` with ``beta = 1``, and grad_input reads ``gy`` in place.
numba types the pointer by its signature only, so ``cache=True`` stays valid across processes.

One thread pool.  numba's workers (``prange``) claim work items (tiles) one at a time, and BLAS runs
single-threaded inside each: :class:`_Blas` holds the library to one thread for the duration of a
call (save/set/restore through a threadpoolctl handle found once: ~2 us; entering
``threadpool_limits`` costs ~1.8 ms).  With both pools active, four 64x576x448 GEMMs in a
``prange`` took 112 ms instead of 1.2 ms here.

Race-freedom and determinism.  forward: each item writes its own block of ``y``.  grad_input: an
item owns whole input planes (image block, channel block) and scatters only into them.
grad_weight: an item owns a block of taps of one group (its columns of ``gw``) and reduces over its
share of the batch in a fixed order; when there are fewer channel blocks than workers the batch is
split too, into per-split partial sums added in split order after the parallel loop.  So results
depend on the thread count and the budget (through the tiling) only by rounding, and a given
configuration always gives the same bits.  One more thing moves the rounding, cause not found: calls
from the main Python thread and from another thread that has set its thread count differ at the
~1e-6 level (tests/test_threads.py compares worker-thread runs with each other for that reason).
"""
import ctypes
import dataclasses
import threading

import numba
import numpy as np
from numba import prange

from .._jit import BOUNDSCHECK, FASTMATH, kernel
from .common import SLACK, claim as _claim, copy_vector, transposed_weight

# ---------------------------------------------------------------------------------------- BLAS
# Kernels call a Fortran-interface ?gemm through a function pointer passed as an argument (numba
# types it by its signature only, so cached kernels stay valid in a new process).  Every argument is
# a pointer; the integers are written into a small per-worker array of the library's int width.
_GEMM_PROTO = ctypes.CFUNCTYPE(None, *([ctypes.c_void_p] * 13))
_N, _T = 0, 1  # indices into the per-worker ('N', 'T') character array

# Serial helpers, compiled into the calling parallel kernel (not cached on their own).
_micro = numba.njit(fastmath=FASTMATH, nogil=True, inline="always")


@_micro
def _gemm(fn, iv, tr, ta, tb, m, n, kk, alpha, a, lda, b, ldb, beta, c, ldc):
    # Row-major C (m x n, row pitch ldc) = alpha * op(A) . op(B) + beta * C, where a, b, c are 1-D
    # views starting at each matrix's first element.  A row-major matrix is the column-major
    # transpose, so this is the column-major C.T = op(B).T . op(A).T with the same trans flags.
    iv[0] = n
    iv[1] = m
    iv[2] = kk
    iv[3] = ldb
    iv[4] = lda
    iv[5] = ldc
    fn(tr[tb:].ctypes, tr[ta:].ctypes, iv[0:].ctypes, iv[1:].ctypes, iv[2:].ctypes, alpha.ctypes,
       b.ctypes, iv[3:].ctypes, a.ctypes, iv[4:].ctypes, beta.ctypes, c.ctypes, iv[5:].ctypes)


@_micro
def _chars():
    tr = np.empty(2, np.uint8)
    tr[0] = 78  # 'N'
    tr[1] = 84  # 'T'
    return tr


@_micro
def _cdiv(a, b):
    return -((-a) // b)


@_micro
def _valid_cols(ss, sw, pw, dw, w, ow):
    # output columns j whose input column j*sw - pw + ss*dw lies in [0, w)
    lo = max(0, _cdiv(pw - ss * dw, sw))
    hi = min(ow, _cdiv(w + pw - ss * dw, sw))
    return lo, max(lo, hi)


# Gather and scatter.  The column tile holds, for tap t and tile position u, col[t*ld + coff + u];
# one image's rows i0 .. i1-1 fill positions u = (i - i0)*ow + j.  Two source layouts:
# * planes (padded): the zero-padded, column-phase-split planes of common.pad_planes, where every
#   tap of every output row is one contiguous run of ow elements: no bounds, no strides;
# * raw (n, c, h*w) planes with bounds checks, used when a padded copy does not fit the budget.
# Copies are explicit loops over 1-D views: numba's slice assignment costs ~10x more on short rows.
@_micro
def _im2col_planes(xq, col, coff, ld, c0, nc, i0, i1, r, s, sh, sw, dh, dw, hp, wq, ow):
    # two copies of the loop nest on purpose: with the row-length test inside the tap loop instead,
    # resnet50-3x3-512's forward (7-element rows) ran 2-5% slower (interleaved A/B, 3 runs)
    if ow >= 32 // col.itemsize:  # rows of a vector or more: whole-vector copies (_copy_runs)
        for cc in range(nc):
            xp = xq[c0 + cc]
            for rr in range(r):
                for ss in range(s):
                    cs = ss * dw
                    base = (cs % sw) * hp * wq + rr * dh * wq + cs // sw
                    t0 = ((cc * r + rr) * s + ss) * ld + coff
                    _copy_runs(col, t0, xp, base + i0 * sh * wq, sh * wq, i1 - i0, ow)
        return
    for cc in range(nc):
        xp = xq[c0 + cc]
        for rr in range(r):
            for ss in range(s):
                cs = ss * dw
                base = (cs % sw) * hp * wq + rr * dh * wq + cs // sw
                t0 = ((cc * r + rr) * s + ss) * ld + coff
                for i in range(i0, i1):
                    d = col[t0 + (i - i0) * ow:t0 + (i - i0 + 1) * ow]
                    v = xp[base + i * sh * wq:base + i * sh * wq + ow]
                    for j in range(ow):
                        d[j] = v[j]


@_micro
def _copy_runs(d, doff, src, soff, pitch, nruns, run):
    # d[doff + i*run + l] = src[soff + i*pitch + l] for i < nruns, l < run, in whole vectors
    # (common.copy_vector): LLVM's copy loops take their vector path only for runs of 4 vectors
    # or more and copy shorter ones element by element.  Every run but the last is rounded up to
    # whole vectors when the excess fits in the next run (which then overwrites it) and in the
    # pitch (the reads end before the next source run does); the last run is copied exactly.
    # Interleaved A/B, forward, 2 threads: lenet5-c1 (28-element runs) -14 to -16%, lenet5-c3
    # (10) -10 to -21%, alexnet-c1, resnet50-3x3-s2 and -3x3-64 0 to -7%.  Rows shorter than a
    # vector keep the element loop (the caller's): resnet50-3x3-512's 7-element runs, one
    # overlapping vector each, were 4-8% slower this way.
    lanes = 32 // d.itemsize
    nv = (run + lanes - 1) // lanes
    if BOUNDSCHECK and nruns > 0:  # copy_vector is unchecked: the bounds-checked build checks the extent
        if doff < 0 or soff < 0 or doff + nruns * run > d.size or soff + (nruns - 1) * pitch + run > src.size:
            raise IndexError("_copy_runs: a run lies outside its array")
    if nv * lanes - run > min(run, pitch):
        for i in range(nruns):
            dd = d[doff + i * run:doff + (i + 1) * run]
            v = src[soff + i * pitch:soff + i * pitch + run]
            for j in range(run):
                dd[j] = v[j]
        return
    for i in range(nruns - 1):
        do = doff + i * run
        so = soff + i * pitch
        for v in range(nv):
            copy_vector(d, do + v * lanes, src, so + v * lanes)
    if nruns > 0:
        do = doff + (nruns - 1) * run
        so = soff + (nruns - 1) * pitch
        full = run // lanes
        for v in range(full):
            copy_vector(d, do + v * lanes, src, so + v * lanes)
        for j in range(full * lanes, run):
            d[do + j] = src[so + j]


@_micro
def _col2im_planes(col, gq, coff, ld, c0, nc, i0, i1, r, s, sh, sw, dh, dw, hp, wq, ow):
    for cc in range(nc):
        gp = gq[c0 + cc]
        for rr in range(r):
            for ss in range(s):
                cs = ss * dw
                base = (cs % sw) * hp * wq + rr * dh * wq + cs // sw
                t0 = ((cc * r + rr) * s + ss) * ld + coff
                for i in range(i0, i1):
                    v = col[t0 + (i - i0) * ow:t0 + (i - i0 + 1) * ow]
                    d = gp[base + i * sh * wq:base + i * sh * wq + ow]
                    for j in range(ow):
                        d[j] += v[j]


@_micro
def _im2col_raw(xn, col, coff, ld, c0, nc, i0, i1, r, s, sh, sw, ph, pw, dh, dw, h, w, ow):
    for cc in range(nc):
        xp = xn[c0 + cc]
        for rr in range(r):
            for ss in range(s):
                t0 = ((cc * r + rr) * s + ss) * ld + coff
                lo, hi = _valid_cols(ss, sw, pw, dw, w, ow)
                iw0 = lo * sw - pw + ss * dw
                for i in range(i0, i1):
                    d = col[t0 + (i - i0) * ow:t0 + (i - i0 + 1) * ow]
                    ih = i * sh - ph + rr * dh
                    if ih < 0 or ih >= h or hi == lo:
                        for j in range(ow):
                            d[j] = 0
                        continue
                    for j in range(lo):
                        d[j] = 0
                    for j in range(hi, ow):
                        d[j] = 0
                    v = xp[ih * w + iw0:]
                    for j in range(hi - lo):
                        d[lo + j] = v[j * sw]


@_micro
def _col2im_raw(col, gn, coff, ld, c0, nc, i0, i1, r, s, sh, sw, ph, pw, dh, dw, h, w, ow):
    for cc in range(nc):
        gp = gn[c0 + cc]
        for rr in range(r):
            for ss in range(s):
                t0 = ((cc * r + rr) * s + ss) * ld + coff
                lo, hi = _valid_cols(ss, sw, pw, dw, w, ow)
                iw0 = lo * sw - pw + ss * dw
                for i in range(i0, i1):
                    ih = i * sh - ph + rr * dh
                    if ih < 0 or ih >= h or hi == lo:
                        continue
                    v = col[t0 + (i - i0) * ow + lo:]
                    d = gp[ih * w + iw0:]
                    for j in range(hi - lo):
                        d[j * sw] += v[j]


@_micro
def _gather(src, col, coff, ld, n, c0, nc, i0, i1, padded, r, s, sh, sw, ph, pw, dh, dw, hp, wq, h, w, ow):
    if padded:
        _im2col_planes(src[n], col, coff, ld, c0, nc, i0, i1, r, s, sh, sw, dh, dw, hp, wq, ow)
    else:
        _im2col_raw(src[n], col, coff, ld, c0, nc, i0, i1, r, s, sh, sw, ph, pw, dh, dw, h, w, ow)


# ---------------------------------------------------------------------------------------- kernels
# In every kernel the nw = buf.shape[0] workers claim items one at a time (common.claim: a worker
# slowed by another busy thread on its core does fewer); worker wid uses only
# buf[wid].  A tile is nb whole images (rb == oh) or a block of rb rows of one image (nb == 1):
# m = images * rows * ow positions.  src is (n, c, L): padded planes, or raw planes (n, c, h*w).
@kernel
def _forward(src, wt, b, y, buf, fn, ints, ctr, has_bias, padded, direct, g, r, s, sh, sw, ph, pw, dh, dw,
             hp, wq, h, w, oh, ow, nb, rb, mmax):
    # wt (k*tn,); y (n*k*oh*ow,); buf (nw, tn*mmax [+ kg*mmax staging when nb > 1]).
    # Item = (image block, group, row block).  One image: the GEMM writes its rows of y in place
    # (row pitch oh*ow, bias pre-filled and beta = 1).  Several: into staging, then copied out.
    # direct (1x1, stride 1, no padding): src[n, group] is the column matrix; no gather.
    nn, c = src.shape[0], src.shape[1]
    k = b.shape[0]
    kg, cg = k // g, c // g
    tn = cg * r * s
    nw = buf.shape[0]
    nnb = (nn + nb - 1) // nb
    nrb = (oh + rb - 1) // rb
    items = nnb * g * nrb
    plane = oh * ow
    for wid in prange(nw):
        col = buf[wid]
        iv = ints[wid]
        tr = _chars()
        stage = col[tn * mmax:]
        one = np.ones(1, dtype=y.dtype)
        zero = np.zeros(1, dtype=y.dtype)
        beta = one if has_bias else zero
        for _ in range(items):
            it = _claim(ctr)
            if it >= items:
                break
            ib = it % nrb
            gi = (it // nrb) % g
            n0 = (it // (nrb * g)) * nb
            n1 = min(nn, n0 + nb)
            i0 = ib * rb
            i1 = min(oh, i0 + rb)
            mi = (i1 - i0) * ow
            m = (n1 - n0) * mi
            a = wt[gi * kg * tn:]
            if n1 - n0 == 1:
                y0 = (n0 * k + gi * kg) * plane + i0 * ow
                if has_bias:
                    for q in range(kg):
                        yq = y[y0 + q * plane:y0 + q * plane + m]
                        bq = b[gi * kg + q]
                        for j in range(m):
                            yq[j] = bq
                if direct:
                    bsrc = src[n0, gi * cg]
                    _gemm(fn, iv, tr, _N, _N, kg, m, tn, one, a, tn, bsrc[i0 * ow:], h * w, beta, y[y0:], plane)
                else:
                    _gather(src, col, 0, m, n0, gi * cg, cg, i0, i1, padded, r, s, sh, sw, ph, pw, dh, dw,
                            hp, wq, h, w, ow)
                    _gemm(fn, iv, tr, _N, _N, kg, m, tn, one, a, tn, col, m, beta, y[y0:], plane)
            else:
                for n in range(n0, n1):
                    _gather(src, col, (n - n0) * mi, m, n, gi * cg, cg, i0, i1, padded, r, s, sh, sw,
                            ph, pw, dh, dw, hp, wq, h, w, ow)
                _gemm(fn, iv, tr, _N, _N, kg, m, tn, one, a, tn, col, m, zero, stage, m)
                for n in range(n0, n1):
                    for q in range(kg):
                        bq = b[gi * kg + q]  # zeros without a bias
                        yq = y[(n * k + gi * kg + q) * plane + i0 * ow:]
                        sq = stage[q * m + (n - n0) * mi:]
                        for j in range(mi):
                            yq[j] = sq[j] + bq


@_micro
def _stage(gy, stage, n0, n1, k, k0, kg, plane, off, mi, m):
    # stage[q*m + (n - n0)*mi + u] = gy[n*k*plane + (k0 + q)*plane + off + u]: several images'
    # gradient rows as one (kg x m) matrix
    for n in range(n0, n1):
        for q in range(kg):
            d = stage[q * m + (n - n0) * mi:q * m + (n - n0 + 1) * mi]
            v = gy[(n * k + k0 + q) * plane + off:]
            for j in range(mi):
                d[j] = v[j]


@kernel
def _grad_input(gy, wt, gq, buf, fn, ints, ctr, padded, direct, g, k, r, s, sh, sw, ph, pw, dh, dw, hp, wq,
                h, w, oh, ow, nb, rb, cb, mmax):
    # gy (n*k*oh*ow,); wt (k*tn,); gq (n, c, L) zeroed: padded planes or raw (n, c, h*w) planes;
    # buf (nw, cb*r*s*mmax [+ kg*mmax staging when nb > 1]).  Item = (image block, group, block of
    # cb input channels): it owns those planes of gq, so the col2im scatter never races.
    # direct (1x1, stride 1, no padding): the GEMM writes gq[n, channels] in place.
    nn, c = gq.shape[0], gq.shape[1]
    kg, cg = k // g, c // g
    tn = cg * r * s
    nw = buf.shape[0]
    ncb = (cg + cb - 1) // cb
    nnb = (nn + nb - 1) // nb
    nrb = (oh + rb - 1) // rb
    items = nnb * g * ncb
    plane = oh * ow
    for wid in prange(nw):
        col = buf[wid]
        iv = ints[wid]
        tr = _chars()
        stage = col[cb * r * s * mmax:]
        one = np.ones(1, dtype=gq.dtype)
        zero = np.zeros(1, dtype=gq.dtype)
        for _ in range(items):
            it = _claim(ctr)
            if it >= items:
                break
            ci = it % ncb
            gi = (it // ncb) % g
            n0 = (it // (ncb * g)) * nb
            n1 = min(nn, n0 + nb)
            c0 = ci * cb
            nc = min(cb, cg - c0)
            a = wt[gi * kg * tn + c0 * r * s:]
            tb = nc * r * s
            for ib in range(nrb):
                i0 = ib * rb
                i1 = min(oh, i0 + rb)
                mi = (i1 - i0) * ow
                m = (n1 - n0) * mi
                if n1 - n0 == 1:
                    gsrc = gy[(n0 * k + gi * kg) * plane + i0 * ow:]
                    ldg = plane
                else:
                    _stage(gy, stage, n0, n1, k, gi * kg, kg, plane, i0 * ow, mi, m)
                    gsrc = stage
                    ldg = m
                if direct:
                    dst = gq[n0, gi * cg + c0]
                    _gemm(fn, iv, tr, _T, _N, tb, m, kg, one, a, tn, gsrc, ldg, zero, dst[i0 * ow:], h * w)
                    continue
                _gemm(fn, iv, tr, _T, _N, tb, m, kg, one, a, tn, gsrc, ldg, zero, col, m)
                for n in range(n0, n1):
                    if padded:
                        _col2im_planes(col, gq[n], (n - n0) * mi, m, gi * cg + c0, nc, i0, i1, r, s,
                                       sh, sw, dh, dw, hp, wq, ow)
                    else:
                        _col2im_raw(col, gq[n], (n - n0) * mi, m, gi * cg + c0, nc, i0, i1, r, s,
                                    sh, sw, ph, pw, dh, dw, h, w, ow)


@kernel
def _grad_weight(gy, src, gwp, buf, fn, ints, ctr, padded, direct, g, k, r, s, sh, sw, ph, pw, dh, dw, hp, wq,
                 h, w, oh, ow, nb, rb, cb, mmax):
    # gy (n*k*oh*ow,); src as in _forward; gwp (nsplit, k*tn) zeroed; buf as in _grad_input.
    # Item = (batch split, group, block of cb channels): it owns columns t0 .. t0+tb-1 of the
    # group's rows of gwp[split] and accumulates into them with beta = 1, images and rows in order.
    nn, c = src.shape[0], src.shape[1]
    nsplit = gwp.shape[0]
    kg, cg = k // g, c // g
    tn = cg * r * s
    nw = buf.shape[0]
    ncb = (cg + cb - 1) // cb
    nrb = (oh + rb - 1) // rb
    items = nsplit * g * ncb
    plane = oh * ow
    per = (nn + nsplit - 1) // nsplit
    for wid in prange(nw):
        col = buf[wid]
        iv = ints[wid]
        tr = _chars()
        stage = col[cb * r * s * mmax:]
        one = np.ones(1, dtype=gwp.dtype)
        for _ in range(items):
            it = _claim(ctr)
            if it >= items:
                break
            ci = it % ncb
            gi = (it // ncb) % g
            sp = it // (ncb * g)
            c0 = ci * cb
            nc = min(cb, cg - c0)
            tb = nc * r * s
            out = gwp[sp, gi * kg * tn + c0 * r * s:]
            for n0 in range(sp * per, min(nn, (sp + 1) * per), nb):
                n1 = min(nn, (sp + 1) * per, n0 + nb)
                for ib in range(nrb):
                    i0 = ib * rb
                    i1 = min(oh, i0 + rb)
                    mi = (i1 - i0) * ow
                    m = (n1 - n0) * mi
                    if n1 - n0 == 1:
                        gsrc = gy[(n0 * k + gi * kg) * plane + i0 * ow:]
                        ldg = plane
                    else:
                        _stage(gy, stage, n0, n1, k, gi * kg, kg, plane, i0 * ow, mi, m)
                        gsrc = stage
                        ldg = m
                    if direct:
                        xs = src[n0, gi * cg + c0]
                        _gemm(fn, iv, tr, _N, _T, kg, tb, m, one, gsrc, ldg, xs[i0 * ow:], h * w, one, out, tn)
                        continue
                    for n in range(n0, n1):
                        _gather(src, col, (n - n0) * mi, m, n, gi * cg + c0, nc, i0, i1, padded, r, s,
                                sh, sw, ph, pw, dh, dw, hp, wq, h, w, ow)
                    _gemm(fn, iv, tr, _N, _T, kg, tb, m, one, gsrc, ldg, col, m, one, out, tn)


@kernel
def _unsplit(gq, gx, sw, hp, wq, top, left):
    # gx[p, ih, iw] = the padded, phase-split plane element of (ih + top, iw + left)
    pp, h, w = gx.shape
    for p in prange(pp):
        src = gq[p]
        for ih in range(h):
            d = gx[p, ih]
            for iw in range(w):
                cc = iw + left
                d[iw] = src[(cc % sw) * hp * wq + (ih + top) * wq + cc // sw]


@kernel
def _split_planes(x, out, sw, hp, wq, top, left):
    # common.pad_planes' layout (zero padding, columns split by phase iw % sw, SLACK zeros), with
    # explicit loops over 1-D views: 2-3x faster than pad_planes on strided layers here
    pp, h, w = x.shape
    for p in prange(pp):
        o = out[p]
        for f in range(sw):
            q_lo = max(0, (left - f + sw - 1) // sw)
            q_hi = max(q_lo, min(wq, (w + left - f + sw - 1) // sw))
            c0 = q_lo * sw + f - left
            for i in range(hp):
                d = o[f * hp * wq + i * wq:f * hp * wq + (i + 1) * wq]
                xi = i - top
                if xi < 0 or xi >= h:
                    for q in range(wq):
                        d[q] = 0
                    continue
                for q in range(q_lo):
                    d[q] = 0
                v = x[p, xi, c0:]
                if sw == 1:
                    for q in range(q_hi - q_lo):
                        d[q_lo + q] = v[q]
                else:
                    for q in range(q_hi - q_lo):
                        d[q_lo + q] = v[q * sw]
                for q in range(q_hi, wq):
                    d[q] = 0
        for j in range(sw * hp * wq, o.shape[0]):
            o[j] = 0


# ---------------------------------------------------------------------------------------- one pool
class _Blas:
    """The ?gemm kernels call, and its thread pool held to one thread while they run.

    Preferred: the OpenBLAS bundled with numpy (the library of the same-run sgemm baseline; its
    sgemm was 3-40% faster here than the OpenBLAS bundled with scipy on the tile shapes, e.g. 78 vs
    56 GFLOP/s for 64x256x3136).  Fallback: scipy's ``cython_blas`` (numba's ``np.dot`` BLAS).
    Found once, with threadpoolctl; as a context manager (re-entrant, thread-safe) the first
    entrant saves the library's thread count and sets 1, the last one out restores it, through
    OpenBLAS's own ``openblas_get/set_num_threads`` (found once: ~1 us for both, against ~15 us
    through threadpoolctl's handle, which looks the symbols up on every call, and ~1.8 ms to enter
    ``threadpool_limits``); threadpoolctl's handle where those are missing or OpenBLAS runs on
    OpenMP.  A numpy BLAS call made by another Python thread while a convolution runs therefore
    runs single-threaded.
    """

    # (symbol of sgemm, of dgemm, integer type): numpy wheels' scipy-openblas is ILP64
    _NUMPY_SYMBOLS = (("scipy_sgemm_64_", "scipy_dgemm_64_", np.int64),
                      ("sgemm_64_", "dgemm_64_", np.int64),
                      ("sgemm64_", "dgemm64_", np.int64))

    def __init__(self):
        self._lock = threading.Lock()
        self._depth = 0
        self._found = None
        self._calls = []
        self._saved = ()

    @staticmethod
    def _thread_calls(lib):
        """(get, set) of a threadpoolctl BLAS controller's thread count: OpenBLAS's own functions
        through a ctypes handle of our own, else the controller's methods."""
        if getattr(lib, "internal_api", "") == "openblas" and getattr(lib, "threading_layer", "") != "openmp":
            try:
                dll = ctypes.CDLL(lib.filepath)
            except OSError:  # pragma: no cover
                dll = None
            for pre in ("", "scipy_"):
                for suf in ("", "64_", "_64"):
                    get = getattr(dll, f"{pre}openblas_get_num_threads{suf}", None)
                    put = getattr(dll, f"{pre}openblas_set_num_threads{suf}", None)
                    if get is not None and put is not None:
                        get.restype, get.argtypes = ctypes.c_int, []
                        put.restype, put.argtypes = None, [ctypes.c_int]
                        return get, put
        return lib.get_num_threads, lib.set_num_threads

    def _find(self):
        from threadpoolctl import ThreadpoolController
        import scipy.linalg.cython_blas  # noqa: F401  (load it so threadpoolctl sees its library)
        blas = [lib for lib in ThreadpoolController().lib_controllers if lib.user_api == "blas"]
        for lib in blas:
            if "numpy" not in lib.filepath:
                continue
            try:
                cdll = ctypes.CDLL(lib.filepath)
            except OSError:  # pragma: no cover
                continue
            for sname, dname, itype in self._NUMPY_SYMBOLS:
                if hasattr(cdll, sname) and hasattr(cdll, dname):
                    fns = {np.dtype(np.float32): _GEMM_PROTO((sname, cdll)),
                           np.dtype(np.float64): _GEMM_PROTO((dname, cdll))}
                    return fns, itype, [lib]
        from numba.extending import get_cython_function_address
        fns = {np.dtype(dt): _GEMM_PROTO(get_cython_function_address("scipy.linalg.cython_blas", name))
               for dt, name in ((np.float32, "sgemm"), (np.float64, "dgemm"))}
        return fns, np.int32, [lib for lib in blas if "numpy" not in lib.filepath]

    def found(self):
        """(?gemm by dtype, BLAS integer type, threadpoolctl controllers of its thread pool)."""
        if self._found is None:
            with self._lock:
                if self._found is None:
                    found = self._find()
                    self._calls = [self._thread_calls(lib) for lib in found[2]]
                    self._found = found
        return self._found

    def args(self, dtype, nw):
        """Kernel arguments: the ?gemm for ``dtype`` and one integer scratch row per worker."""
        fns, itype, _ = self.found()
        return fns[np.dtype(dtype)], np.zeros((nw, 8), dtype=itype)

    def __enter__(self):
        self.found()
        calls = self._calls
        with self._lock:
            if self._depth == 0:
                self._saved = [(put, get()) for get, put in calls]
                for put, nt in self._saved:
                    if nt != 1:
                        put(1)
            self._depth += 1
        return self

    def __exit__(self, *exc):
        with self._lock:
            self._depth -= 1
            if self._depth == 0:
                for put, nt in self._saved:
                    if nt != 1:
                        put(nt)
        return False


_BLAS = _Blas()
serial_blas = _BLAS


# ---------------------------------------------------------------------------------------- planning
_TILE_BYTES = 1 << 20   # column tile per worker to aim for: fits in L2 next to the GEMM's packing
_M_MIN = 256            # fewest output positions per GEMM worth a BLAS call; smaller planes batch images


def _direct(p):
    """1x1, stride 1, no padding: the input planes are the column matrix."""
    return p.r == 1 and p.s == 1 and p.sh == 1 and p.sw == 1 and not p.padded


def _min_workspace(p, pass_):
    """Bytes of the smallest tile: one output row of all taps (forward) or of one channel's taps."""
    if _direct(p):
        return 0
    taps = p.cg * p.r * p.s if pass_ == "forward" else p.r * p.s
    return taps * p.ow * p.itemsize


def _planes_bytes(p, n, c):
    """Bytes of the padded, phase-split copy (common.pad_planes' layout) of an (n, c, h, w) array."""
    wq = -(-p.wp // p.sw)
    return n * c * (p.sw * p.hp * wq + SLACK) * p.itemsize


_PLANS = {}  # (the _Plan arguments, thread count) -> _Plan: planning costs ~10 us of Python a call


def _plan(p, col_rows, stage_rows, par, nimg, copy_bytes, direct):
    """The (cached) tiling of one pass for the calling thread's numba thread count."""
    key = (p, col_rows, stage_rows, par, nimg, copy_bytes, direct, numba.get_num_threads())
    plan = _PLANS.get(key)
    if plan is None:
        if len(_PLANS) > 1024:
            _PLANS.clear()
        plan = _PLANS[key] = _Plan(p, col_rows, stage_rows, par, nimg, copy_bytes, direct, key[-1])
    return plan


class _Plan:
    """Tiling of one pass: ``padded`` (gather from a padded copy), nw workers, nb images or rb rows
    per tile, mmax positions per tile, ``words`` buffer elements per worker."""

    def __init__(self, p, col_rows, stage_rows, par, nimg, copy_bytes, direct, nthreads=None):
        isz, oh, ow = p.itemsize, p.oh, p.ow
        limit = p.workspace_limit
        if nthreads is None:
            nthreads = numba.get_num_threads()
        row = 0 if direct else col_rows * ow * isz
        # gather from a padded, phase-split copy when it leaves room for a row per worker: it turns
        # every tap row into one contiguous run (5-15x faster gathers than bounds-checked strides)
        self.padded = not direct and copy_bytes + nthreads * row <= limit
        avail = limit - (copy_bytes if self.padded else 0)
        nw = nthreads if not row else max(1, min(nthreads, avail // row))
        per_worker = avail // nw
        plane = oh * ow
        nb, rb = 1, oh
        if plane < _M_MIN and nimg > 1 and not direct:
            # small planes: several whole images per GEMM, but leave an item for every worker
            nb = min(nimg, -(-_M_MIN // plane), max(1, nimg * par // nthreads))
            nb = max(1, min(nb, per_worker // (plane * (col_rows + stage_rows) * isz)))
        if nb == 1:
            rb = max(-(-_M_MIN // ow), _TILE_BYTES // row if row else oh)
            if nimg * par < nthreads:  # split rows so that every worker gets one
                rb = min(rb, -(-oh // -(-nthreads // (nimg * par))))
            if row:
                rb = min(rb, per_worker // row)
            rb = max(1, min(rb, oh))
        items = -(-nimg // nb) * par * (-(-oh // rb) if nb == 1 else 1)
        self.nw = max(1, min(nw, items))
        self.nb, self.rb = nb, rb
        self.mmax = nb * rb * ow
        self.words = 0 if direct else col_rows * self.mmax + (stage_rows * self.mmax if nb > 1 else 0)

    def buffer(self, dtype):
        return np.empty((self.nw, max(1, self.words)), dtype=dtype)


def _in_place(x, p):
    """No padding and column stride 1: the raw planes already are the padded, phase-split layout
    (hp = h, wq = w) and every tap run lies inside its plane, so the gather reads ``x`` itself.
    Read-only inputs are copied instead: numba would compile another specialisation for them."""
    return not p.padded and p.sw == 1 and x.flags.c_contiguous and x.flags.writeable


def _copy_bytes(x, p):
    """Bytes of the padded copy a gather from ``x`` needs (0 when it reads ``x`` in place)."""
    return 0 if _in_place(x, p) else _planes_bytes(p, p.n, p.c)


def _source(x, p, padded):
    """(n, c, L) planes the gather reads: padded and phase-split, or the raw planes."""
    if padded and _in_place(x, p):
        return x.reshape(p.n, p.c, p.h * p.w)
    x = np.ascontiguousarray(x)
    if not padded:
        return x.reshape(p.n, p.c, p.h * p.w)
    wq = -(-p.wp // p.sw)
    out = np.empty((p.n, p.c, p.sw * p.hp * wq + SLACK), dtype=x.dtype)
    _split_planes(x.reshape(p.n * p.c, p.h, p.w), out.reshape(p.n * p.c, -1), p.sw, p.hp, wq, p.ph0, p.pw0)
    return out


# ---------------------------------------------------------------------------------------- passes
def forward(x, w, b, p):
    tn = p.cg * p.r * p.s
    direct = _direct(p)
    plan = _plan(p, tn, p.kg, p.g, p.n, _copy_bytes(x, p), direct)
    src = _source(x, p, plan.padded)
    wq = -(-p.wp // p.sw)
    y = np.empty(p.y_shape, dtype=p.dtype)
    has_bias = b is not None
    bb = np.ascontiguousarray(b) if has_bias else np.zeros(p.k, p.dtype)
    with serial_blas:
        _forward(src, np.ascontiguousarray(w).reshape(-1), bb, y.reshape(-1), plan.buffer(p.dtype),
                 *_BLAS.args(p.dtype, plan.nw), np.zeros(1, np.int64), has_bias, plan.padded, direct, p.g, p.r, p.s, p.sh,
                 p.sw, p.ph0, p.pw0, p.dh, p.dw, p.hp, wq, p.h, p.w, p.oh, p.ow, plan.nb, plan.rb,
                 plan.mmax)
    return y


def _channel_block(p, par, nthreads):
    """Channels per block in the backward passes: split a group's channels only as far as needed
    to give every worker an item, and as the budget requires (one row of the block's taps)."""
    cb = p.cg
    if par < nthreads:
        cb = -(-p.cg // min(p.cg, -(-nthreads // par)))
    if not _direct(p):
        cb = max(1, min(cb, p.workspace_limit // (p.r * p.s * p.ow * p.itemsize)))
    return cb


def _transposed(p):
    """Parameters of grad_input as a forward convolution, or None where col2im is the better way
    (the caller also keeps col2im for non-finite weights).

    With stride 1, grad_input is the correlation of ``gy``, padded by the kernel extent less the
    forward padding, with the flipped kernel whose channels are swapped within each group.  Its
    GEMM has cg output rows, so it pays only for wide groups; it then gathers instead of
    scattering (single thread: resnet50-3x3-64 22.7 vs 25.8 ms, dilated-3x3-d2 29.9 vs 33.7 ms,
    but lenet5-c3 2.9 vs 0.9 ms and resnet50-3x3-512's 7x7 planes 25.4 vs 23.6 ms).
    """
    eh, ew = p.dh * (p.r - 1), p.dw * (p.s - 1)
    if (p.sh != 1 or p.sw != 1 or p.cg < 32 or p.h * p.w < 1024
            or max(p.ph0, p.ph1) > eh or max(p.pw0, p.pw1) > ew):
        return None
    q = dataclasses.replace(p, c=p.k, h=p.oh, w=p.ow, k=p.c, ph0=eh - p.ph0, ph1=eh - p.ph1,
                            pw0=ew - p.pw0, pw1=ew - p.pw1, oh=p.h, ow=p.w)
    return q if _min_workspace(q, "forward") <= q.workspace_limit else None


def grad_input(gy, w, p):
    q = _transposed(p)
    # the correlation multiplies every weight by the zero padding of gy: a non-finite weight would
    # make NaNs at border positions that the scatter (and PyTorch) never reach
    if q is not None and np.isfinite(w).all():
        return forward(gy, transposed_weight(w, p.g), None, q)
    direct = _direct(p)
    nthreads = numba.get_num_threads()
    cb = _channel_block(p, p.n * p.g, nthreads)
    ncb = -(-p.cg // cb)
    wq = -(-p.wp // p.sw)
    plan = _plan(p, cb * p.r * p.s, p.kg, p.g * ncb, p.n, _planes_bytes(p, p.n, p.c), direct)
    if plan.padded:
        gq = np.zeros((p.n, p.c, p.sw * p.hp * wq + SLACK), dtype=p.dtype)
    else:
        gq = (np.empty if direct else np.zeros)((p.n, p.c, p.h * p.w), dtype=p.dtype)
    with serial_blas:
        _grad_input(np.ascontiguousarray(gy).reshape(-1), np.ascontiguousarray(w).reshape(-1), gq,
                    plan.buffer(p.dtype), *_BLAS.args(p.dtype, plan.nw), np.zeros(1, np.int64), plan.padded,
                    direct, p.g, p.k, p.r, p.s,
                    p.sh, p.sw, p.ph0, p.pw0, p.dh, p.dw, p.hp, wq, p.h, p.w, p.oh, p.ow,
                    plan.nb, plan.rb, cb, plan.mmax)
    if not plan.padded:
        return gq.reshape(p.x_shape)
    gx = np.empty(p.x_shape, dtype=p.dtype)
    _unsplit(gq.reshape(p.n * p.c, -1), gx.reshape(p.n * p.c, p.h, p.w), p.sw, p.hp, wq, p.ph0, p.pw0)
    return gx


def _batch_splits(p, cb, nthreads):
    """Batch splits for grad_weight with channel blocks of cb: when there are fewer (group, channel
    block) items than workers, as many as give every worker one, as far as the extra partial sums
    of gw leave room in the budget for a row per worker."""
    blocks = p.g * -(-p.cg // cb)
    row = 0 if _direct(p) else cb * p.r * p.s * p.ow * p.itemsize
    nsplit = 1
    if blocks < nthreads and p.n > 1:
        nsplit = min(p.n, -(-nthreads // blocks))
        while nsplit > 1 and (nsplit - 1) * p.k * p.cg * p.r * p.s * p.itemsize + nthreads * row > p.workspace_limit:
            nsplit -= 1
    return nsplit


def _weight_tiling(p, nthreads):
    """(channels per block, batch splits) of grad_weight: split a group's channels for the workers
    or split the batch, whichever leaves the busiest worker the least work (channels x images per
    item, items dealt round-robin); a tie keeps the channel split (no partial sums to add).  Three
    channels on two workers split 2 + 1 and left one worker idle a third of the time: the batch
    split took alexnet-c1 12.6 -> 10.0 ms and resnet50-stem 23.7 -> 18.2 ms here."""
    best = None
    for cb in (_channel_block(p, p.g, nthreads), _channel_block(p, nthreads, nthreads)):
        nsplit = _batch_splits(p, cb, nthreads)
        items = nsplit * p.g * -(-p.cg // cb)
        busiest = -(-items // nthreads) * cb * -(-p.n // nsplit)
        if best is None or busiest < best[0]:
            best = (busiest, cb, nsplit)
    return best[1], best[2]


def grad_weight(gy, x, p):
    direct = _direct(p)
    nthreads = numba.get_num_threads()
    tn = p.cg * p.r * p.s
    cb, nsplit = _weight_tiling(p, nthreads)
    blocks = p.g * -(-p.cg // cb)
    extra = (nsplit - 1) * p.k * tn * p.itemsize
    sub = _Params(p, p.workspace_limit - extra)
    plan = _plan(sub, cb * p.r * p.s, p.kg, nsplit * blocks, -(-p.n // nsplit),
                 _copy_bytes(x, p), direct)
    src = _source(x, p, plan.padded)
    wq = -(-p.wp // p.sw)
    gwp = np.zeros((nsplit, p.k * tn), dtype=p.dtype)
    with serial_blas:
        _grad_weight(np.ascontiguousarray(gy).reshape(-1), src, gwp, plan.buffer(p.dtype),
                     *_BLAS.args(p.dtype, plan.nw), np.zeros(1, np.int64), plan.padded, direct, p.g, p.k,
                     p.r, p.s, p.sh,
                     p.sw, p.ph0, p.pw0,
                     p.dh, p.dw, p.hp, wq, p.h, p.w, p.oh, p.ow, plan.nb, plan.rb, cb, plan.mmax)
    gw = gwp[0]
    for i in range(1, nsplit):  # fixed order: the same bits for the same thread count and budget
        gw += gwp[i]
    return gw.reshape(p.w_shape)


def _Params(p, limit):
    """``p`` with another workspace limit."""
    return dataclasses.replace(p, workspace_limit=max(1, limit))


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


def cost(p, pass_, threads):
    """Seconds: a per-call floor plus GEMM flops at a rate that falls with the GEMM's thinnest side.

    Fitted to single-thread CPU times on the 2-core EPYC (AVX2) build machine (shared, so +-20%): float32
    GEMM-bound shapes run at ~80 GFLOP/s per thread times ``kg / (kg + 12)`` (kg = output channels
    per group: 72 GFLOP/s on resnet50-3x3-64, 40 on lenet5-c3 with kg = 16, 8 on a depthwise layer
    with kg = 1); float64 at half that; the col2im scatter of grad_input adds ~10%; gathers are
    included in the fit.  Workers scale it by the thread count at ~90% efficiency.
    """
    rate = (80e9 if p.itemsize == 4 else 40e9) * p.kg / (p.kg + 12.0)
    rate *= 1.0 + 0.9 * (threads - 1)
    t = 2.0 * p.macs / rate
    if pass_ == "grad_input":
        t *= 1.1
    return 2e-5 + t
