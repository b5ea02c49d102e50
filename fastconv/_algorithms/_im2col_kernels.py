"""The numba kernels of the im2col + GEMM algorithm (see :mod:`fastconv._algorithms.im2col` for the
method, the notation, the tiling and the guarantees).

They live apart from the planning and cost code because numba's on-disk cache is keyed on the
source file's time stamp: an edit to the Python layer would otherwise recompile them.  The GEMM
they call is :func:`._blas._gemm` (inlined: after an edit to it, or to the helpers taken from
common.py, delete this file's cache entries, ``__pycache__/_im2col_kernels*.nbi``).
"""
import numpy as np
from numba import prange

from .._jit import BOUNDSCHECK, kernel, micro as _micro
from ._blas import _N, _T, _chars, _gemm
from .common import _gather as _copy_strided, claim as _claim, copy_vector

_u = np.uint64


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
    ll = xq.shape[1]
    xf = xq.reshape(xq.size)
    for cc in range(nc):
        xb = (c0 + cc) * ll
        for rr in range(r):
            for ss in range(s):
                cs = ss * dw
                base = xb + (cs % sw) * hp * wq + rr * dh * wq + cs // sw
                t0 = ((cc * r + rr) * s + ss) * ld + coff
                for i in range(i0, i1):
                    _copy_strided(xf, base + i * sh * wq, 1, col, t0 + (i - i0) * ow, ow)


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
    # flat, unsigned offsets and no views per row: signed offsets kept the adds scalar
    # (resnet50-3x3-s2 grad_input: see im2col.grad_input)
    ll = gq.shape[1]
    gf = gq.reshape(gq.size)
    ou = _u(ow)
    for cc in range(nc):
        gb = (c0 + cc) * ll
        for rr in range(r):
            for ss in range(s):
                cs = ss * dw
                base = gb + (cs % sw) * hp * wq + rr * dh * wq + cs // sw
                t0 = ((cc * r + rr) * s + ss) * ld + coff
                for i in range(i0, i1):
                    so = _u(t0 + (i - i0) * ow)
                    do = _u(base + i * sh * wq)
                    for j in range(ou):
                        gf[do + j] += col[so + j]


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
def _gy_rows(gy, stage, n0, n1, k, k0, kg, plane, off, mi, m):
    # (matrix, row pitch) of the (kg x m) output-gradient rows of images n0 .. n1-1 that the
    # backward GEMMs read: gy in place for one image, else the images' rows copied into stage,
    # stage[q*m + (n - n0)*mi + u] = gy[n*k*plane + (k0 + q)*plane + off + u]
    if n1 - n0 == 1:
        return gy[(n0 * k + k0) * plane + off:], plane
    for n in range(n0, n1):
        for q in range(kg):
            d = stage[q * m + (n - n0) * mi:q * m + (n - n0 + 1) * mi]
            v = gy[(n * k + k0 + q) * plane + off:]
            for j in range(mi):
                d[j] = v[j]
    return stage, m


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
                gsrc, ldg = _gy_rows(gy, stage, n0, n1, k, gi * kg, kg, plane, i0 * ow, mi, m)
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
                    gsrc, ldg = _gy_rows(gy, stage, n0, n1, k, gi * kg, kg, plane, i0 * ow, mi, m)
                    if direct:
                        xs = src[n0, gi * cg + c0]
                        _gemm(fn, iv, tr, _N, _T, kg, tb, m, one, gsrc, ldg, xs[i0 * ow:], h * w, one, out, tn)
                        continue
                    for n in range(n0, n1):
                        _gather(src, col, (n - n0) * mi, m, n, gi * cg + c0, nc, i0, i1, padded, r, s,
                                sh, sw, ph, pw, dh, dw, hp, wq, h, w, ow)
                    _gemm(fn, iv, tr, _N, _T, kg, tb, m, one, gsrc, ldg, col, m, one, out, tn)

