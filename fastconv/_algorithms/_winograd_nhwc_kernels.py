"""The numba kernels of the batch-wide Winograd forward (see :mod:`fastconv._algorithms.winograd_nhwc`
for the method and the notation).

Every transform here is a linear map along one axis of a tile, applied to whole runs of channels at
once: ``dst[i] = sum_t cf[t] * src[off[t] + i]`` over the few nonzero coefficients of one row of
``B^T``, ``G`` or ``A^T`` (:func:`_comb`, at most 5 terms), so each loop is one store stream and at
most five load streams along contiguous channels, which LLVM vectorises (a loop over all a*a
elements of a tile at once would read 36 streams: more runtime alias checks than LLVM inserts, and
it stays scalar).  The rows of the transforms come as term tables ``(idx, cf, cnt)`` built once in
Python from the matrices: ``cnt[r]`` terms, the t-th of which reads element ``idx[r, t]`` of the 1-D
input with coefficient ``cf[r, t]``.  A term whose input lies in the padding is dropped (it is zero).
"""
import numpy as np
from numba import prange

from .._jit import kernel, micro, serial
from .common import claim
from .gemm import gemm_serial

_u = np.uint64


# called, not inlined: numba's inlining copied its five loops into every call site, and each kernel
# took 8 s to compile per dtype (3 s called; a call costs nothing next to a run over channels)
@serial
def _comb(dst, doff, src, ot, ct, nt, n):
    # dst[doff + i] = sum_{t < nt} ct[t] * src[ot[t] + i] for i < n (0 when nt == 0).  The offsets
    # and coefficients are read into scalars first, and indices are unsigned: numba wraps a negative
    # signed index around, a select per access that keeps LLVM from vectorising (see
    # _winograd_packed_kernels).  No int literal may meet a uint64 here (numba makes that float64).
    d = _u(doff)
    nn = _u(n)
    if nt == 0:
        for i in range(nn):
            dst[d + i] = 0
    elif nt == 1:
        o0, k0 = _u(ot[0]), ct[0]
        for i in range(nn):
            dst[d + i] = k0 * src[o0 + i]
    elif nt == 2:
        o0, k0, o1, k1 = _u(ot[0]), ct[0], _u(ot[1]), ct[1]
        for i in range(nn):
            dst[d + i] = k0 * src[o0 + i] + k1 * src[o1 + i]
    elif nt == 3:
        o0, k0, o1, k1, o2, k2 = _u(ot[0]), ct[0], _u(ot[1]), ct[1], _u(ot[2]), ct[2]
        for i in range(nn):
            dst[d + i] = k0 * src[o0 + i] + k1 * src[o1 + i] + k2 * src[o2 + i]
    elif nt == 4:
        o0, k0, o1, k1, o2, k2 = _u(ot[0]), ct[0], _u(ot[1]), ct[1], _u(ot[2]), ct[2]
        o3, k3 = _u(ot[3]), ct[3]
        for i in range(nn):
            dst[d + i] = k0 * src[o0 + i] + k1 * src[o1 + i] + k2 * src[o2 + i] + k3 * src[o3 + i]
    else:
        o0, k0, o1, k1, o2, k2 = _u(ot[0]), ct[0], _u(ot[1]), ct[1], _u(ot[2]), ct[2]
        o3, k3, o4, k4 = _u(ot[3]), ct[3], _u(ot[4]), ct[4]
        for i in range(nn):
            dst[d + i] = (k0 * src[o0 + i] + k1 * src[o1 + i] + k2 * src[o2 + i] + k3 * src[o3 + i]
                          + k4 * src[o4 + i])


@micro
def _tile(t, th, tw, m, oh, ow):
    # tile t = (img*th + ti)*tw + tj: its image, the top-left output of its m x m block, and how many
    # of the block's rows and columns lie inside the oh x ow output
    tj = t % tw
    ti = (t // tw) % th
    oy0 = ti * m
    ox0 = tj * m
    return t // (tw * th), oy0, ox0, min(m, oh - oy0), min(m, ow - ox0)


@micro
def _terms(idx, cf, cnt, r, lo, hi, base, step, ot, ct):
    # the terms of row r whose input index lies in [lo, hi), at offsets base + index*step; their count
    nt = 0
    for t in range(cnt[r]):
        j = idx[r, t]
        if lo <= j < hi:
            ot[nt] = base + j * step
            ct[nt] = cf[r, t]
            nt += 1
    return nt


@serial
def _u_one(w, woff, wc, flip, cg, a, gi, gc, gn, u, uoff, ue, s64, ot, ct):
    # the a*a transformed taps of one output channel's cg x 3 x 3 weights (tap of channel c at
    # w[woff + c*wc + tap], or at tap 8 - tap with flip) in float64: U[e][c] at u[uoff + e*ue + c];
    # s64 holds (9 + 3a)*cg scratch
    for tap in range(9):
        src = woff + (8 - tap if flip else tap)
        for c in range(cg):
            s64[tap * cg + c] = w[src + c * wc]
    t2 = 9 * cg
    for r in range(3):  # along the kernel row: t2[r][j] = sum_s G[j, s] g[r][s]
        for j in range(a):
            nt = _terms(gi, gc, gn, j, 0, 3, r * 3 * cg, cg, ot, ct)
            _comb(s64, t2 + (r * a + j) * cg, s64, ot, ct, nt, cg)
    for i in range(a):  # down the kernel column: U[i][j] = sum_r G[i, r] t2[r][j]
        for j in range(a):
            nt = _terms(gi, gc, gn, i, 0, 3, t2 + j * cg, a * cg, ot, ct)
            _comb(u, uoff + (i * a + j) * ue, s64, ot, ct, nt, cg)


@kernel
def transform_u(w, flip, u, k, cg, kg, a, gi, gc, gn, s64, ot, ct):
    """``U[g][e][kk][c] = (G w[k, c] G^T)[e]`` for every output channel k = g*kg + kk, at
    ``u[((g*a*a + e)*kg + kk)*cg + c]``, computed in float64 and rounded once.  With ``flip`` the
    kernel is grad_input's, read from the layer's own weights (kg*g x cg x 3 x 3 with this call's kg
    and cg swapped) flipped and with the channels swapped within each group, so that it is never
    copied.  Workers take output channels; ``s64`` (workers x (9 + 3a)*cg) and ``ot``/``ct``
    (workers x 8) are their scratch."""
    nw = s64.shape[0]
    a2 = a * a
    for wid in prange(nw):
        for kk in range(wid, k, nw):
            g = kk // kg
            j = kk % kg
            uoff = (g * a2 * kg + j) * cg
            if flip:  # tap of (kk, c) = w[g*cg + c, j, 8 - tap]
                woff, wc = (g * cg * kg + j) * 9, kg * 9
            else:
                woff, wc = kk * cg * 9, 9
            _u_one(w, woff, wc, flip, cg, a, gi, gc, gn, u, uoff, kg * cg, s64[wid], ot[wid], ct[wid])


@kernel
def transform_in(x, v, h, w, c, t0, tn, th, tw, m, a, ph, pw, bi, bc, bn, tmp, ot, ct, ctr):
    """``V[e][t - t0][:] = (B^T d B)[e]`` for the tiles t0 <= t < t0 + tn (t = (img*th + ti)*tw + tj) of
    the NHWC input x (flat), at ``v[(e*tn + t - t0)*c + ch]``; a tile's patch starts at input row
    ti*m - ph, column tj*m - pw.  Workers claim tiles; ``tmp`` (workers x a*a*c) holds a tile's
    row-transformed patch."""
    nw = tmp.shape[0]
    for wid in prange(nw):
        tb = tmp[wid]
        ow_, cw = ot[wid], ct[wid]
        for _ in range(tn):
            q = claim(ctr)
            if q >= tn:
                break
            img, y0, x0, _, _ = _tile(t0 + q, th, tw, m, 0, 0)
            y0 -= ph
            x0 -= pw
            ilo = max(0, -y0)
            ihi = min(a, h - y0)
            jlo = max(0, -x0)
            jhi = min(a, w - x0)
            for i in range(ilo, ihi):  # along each patch row that lies inside the input
                base = ((img * h + y0 + i) * w + x0) * c
                for jj in range(a):
                    nt = _terms(bi, bc, bn, jj, jlo, jhi, base, c, ow_, cw)
                    _comb(tb, (i * a + jj) * c, x, ow_, cw, nt, c)
            for ii in range(a):  # down the columns
                for jj in range(a):
                    nt = _terms(bi, bc, bn, ii, ilo, ihi, jj * c, a * c, ow_, cw)
                    _comb(v, ((ii * a + jj) * tn + q) * c, tb, ow_, cw, nt, c)


@kernel
def products(v, u, mm, tn, c, k, cg, kg, g, a2, tb, ws, blk, ctr):
    """``M[e][t][g*kg + kk] = sum_c V[e][t][g*cg + c] U[g][e][kk][c]``: one GEMM per (group, element,
    block of tb tiles), on fastconv's packed GEMM; M at ``mm[(e*tn + t)*k + ch]``.  Items write
    disjoint blocks of M."""
    nw = ws.shape[0]
    nt = (tn + tb - 1) // tb
    items = g * a2 * nt
    for wid in prange(nw):
        for _ in range(items):
            it = claim(ctr)
            if it >= items:
                break
            gg = it // (a2 * nt)
            e = (it // nt) % a2
            r0 = (it % nt) * tb
            gemm_serial(min(tb, tn - r0), kg, cg, v, (e * tn + r0) * c + gg * cg, c, 1,
                        u, ((gg * a2 + e) * kg) * cg, 1, cg, 0, mm, (e * tn + r0) * k + gg * kg, k, ws[wid], blk)


@kernel
def transform_out(mm, y, b, hasb, oh, ow, k, t0, tn, th, tw, m, a, ai, ac, an, tmp, ot, ct, ctr):
    """``y[img, oy, ox, :] = (A^T M A)[oy - ti*m, ox - tj*m] (+ b)`` for the outputs of the tiles
    t0 <= t < t0 + tn inside the oh x ow output (NHWC, flat).  Workers claim tiles; ``tmp``
    (workers x m*a*k) holds a tile's column-transformed products."""
    nw = tmp.shape[0]
    for wid in prange(nw):
        tb = tmp[wid]
        ow_, cw = ot[wid], ct[wid]
        for _ in range(tn):
            q = claim(ctr)
            if q >= tn:
                break
            img, oy0, ox0, mi, mj = _tile(t0 + q, th, tw, m, oh, ow)
            for ii in range(mi):  # down the columns: tmp[ii][j] = sum_i A^T[ii, i] M[i][j]
                for j in range(a):
                    nt = _terms(ai, ac, an, ii, 0, a, (j * tn + q) * k, a * tn * k, ow_, cw)
                    _comb(tb, (ii * a + j) * k, mm, ow_, cw, nt, k)
            for ii in range(mi):  # along the rows, into the output
                for jj in range(mj):
                    nt = _terms(ai, ac, an, jj, 0, a, ii * a * k, k, ow_, cw)
                    d = ((img * oh + oy0 + ii) * ow + ox0 + jj) * k
                    _comb(y, d, tb, ow_, cw, nt, k)
                    if hasb:
                        du = _u(d)
                        for kk in range(_u(k)):
                            y[du + kk] += b[kk]


@kernel
def transform_gy(gy, wg, oh, ow, k, t0, tn, th, tw, m, a, gi_, gc, gn, tmp, ot, ct, ctr):
    """grad_weight's transform of the output gradient: ``Wg[e][t - t0][:] = (A gy_t A^T)[e]`` for the
    tiles t0 <= t < t0 + tn, gy_t the m x m block of the NHWC ``gy`` (flat) under tile t (zero beyond
    the output), at ``wg[(e*tn + t - t0)*k + ch]``; the rows of ``A`` (a x m) as the term table
    ``(gi_, gc, gn)``.  Workers claim tiles; ``tmp`` (workers x m*a*k) holds a tile's rows."""
    nw = tmp.shape[0]
    for wid in prange(nw):
        tb = tmp[wid]
        ow_, cw = ot[wid], ct[wid]
        for _ in range(tn):
            q = claim(ctr)
            if q >= tn:
                break
            img, oy0, ox0, mi, mj = _tile(t0 + q, th, tw, m, oh, ow)
            for ii in range(mi):  # along each gy row: tmp[ii][j] = sum_jj A[j, jj] gy[ii][jj]
                base = ((img * oh + oy0 + ii) * ow + ox0) * k
                for j in range(a):
                    nt = _terms(gi_, gc, gn, j, 0, mj, base, k, ow_, cw)
                    _comb(tb, (ii * a + j) * k, gy, ow_, cw, nt, k)
            for i in range(a):  # down the columns: Wg[i][j] = sum_ii A[i, ii] tmp[ii][j]
                for j in range(a):
                    nt = _terms(gi_, gc, gn, i, 0, mi, j * k, a * k, ow_, cw)
                    _comb(wg, ((i * a + j) * tn + q) * k, tb, ow_, cw, nt, k)


@kernel
def products_gw(wg, v, mw, tn, c, k, cg, kg, g, a2, beta, ws, blk, ctr):
    """``Mw[e][g*kg + kk][c] (+)= sum_t Wg[e][t][g*kg + kk] V[e][t][g*cg + c]`` (beta 0: =, 1: +=): one
    GEMM per (group, element) reducing over the chunk's tn tiles, on fastconv's packed GEMM; Mw at
    ``mw[(e*k + g*kg + kk)*cg + c]``.  Items write disjoint blocks of Mw; chunks add in order."""
    nw = ws.shape[0]
    items = g * a2
    for wid in prange(nw):
        for _ in range(items):
            it = claim(ctr)
            if it >= items:
                break
            gg = it // a2
            e = it % a2
            gemm_serial(kg, cg, tn, wg, e * tn * k + gg * kg, 1, k, v, e * tn * c + gg * cg, c, 1,
                        beta, mw, (e * k + gg * kg) * cg, cg, ws[wid], blk)


@kernel
def transform_taps(mw, gw, k, cg, a, gi, gc, gn, s64, ot, ct):
    """grad_weight's last step, ``gw[kk, c, r*3 + s] = (G^T Mw[:, kk, c] G)[r, s]`` for
    ``Mw[e][kk][c]`` at ``mw[(e*k + kk)*cg + c]``, in float64 along the channels; ``(gi, gc, gn)``
    the rows of ``G^T`` (3 x a).  Workers take output channels; ``s64`` (workers x (3a + 9)*cg)."""
    nw = s64.shape[0]
    t9 = 3 * a * cg
    for wid in prange(nw):
        sb = s64[wid]
        ow_, cw = ot[wid], ct[wid]
        for kk in range(wid, k, nw):
            for r in range(3):  # t[r][j] = sum_i G[i, r] Mw[i][j]
                for j in range(a):
                    nt = _terms(gi, gc, gn, r, 0, a, j * k * cg + kk * cg, a * k * cg, ow_, cw)
                    _comb(sb, (r * a + j) * cg, mw, ow_, cw, nt, cg)
            for r in range(3):  # tap (r, s) = sum_j t[r][j] G[j, s]
                for s in range(3):
                    nt = _terms(gi, gc, gn, s, 0, a, r * a * cg, cg, ow_, cw)
                    _comb(sb, t9 + (r * 3 + s) * cg, sb, ow_, cw, nt, cg)
            o = kk * cg * 9
            for c in range(cg):
                for tap in range(9):
                    gw[o + c * 9 + tap] = sb[t9 + tap * cg + c]
