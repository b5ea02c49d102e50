"""The numba kernels of the Winograd algorithm (see :mod:`fastconv._algorithms.winograd` for the
method, the notation and the guarantees).

They live apart from the planning and cost code because numba's on-disk cache is keyed on the
source file's time stamp: an edit to the Python layer would otherwise recompile them (~6 minutes
per dtype on the loaded 2-core build machine).

Layout of one work item's buffers, each row T (the item's tile count) long and contiguous over the
item's tiles: ``xs[(r*a + s)]`` the input value at row r, column s of every tile's a x a patch
(gathered from a zero-padded strip of the input); transforms along patch rows and then along patch
columns are then loops of ``dst_row += c * src_row`` over whole rows (:func:`_left`,
:func:`_right`), which LLVM vectorises, with the transform matrices passed in as small arrays
(zero coefficients skipped).  The same two helpers do the output transform and grad_weight's
transform of grad_output tiles.
"""
import numpy as np
from numba import prange

from .._jit import kernel, micro
from .common import claim as _claim
from ._blas import _N, _T, _chars, _gemm
# the packed forward and its helpers (re-exported for winograd.py's K.pack_u, K.forward_packed)
from ._winograd_packed_kernels import forward_packed, pack_u  # noqa: F401

_micro = micro


@_micro
def _left(dst, doff, ldd, src, soff, lds, mat, ns, nt):
    # dst[(u*ns + s)*ldd + doff + j] = sum_r mat[u, r] * src[(r*ns + s)*lds + soff + j], j < nt
    nout, nin = mat.shape
    for u in range(nout):
        for s in range(ns):
            d = dst[(u * ns + s) * ldd + doff:(u * ns + s) * ldd + doff + nt]
            first = True
            for r in range(nin):
                c = mat[u, r]
                if c == 0:
                    continue
                x = src[(r * ns + s) * lds + soff:(r * ns + s) * lds + soff + nt]
                if first:
                    for j in range(nt):
                        d[j] = c * x[j]
                    first = False
                else:
                    for j in range(nt):
                        d[j] += c * x[j]
            if first:
                for j in range(nt):
                    d[j] = 0


@_micro
def _right(dst, doff, ldd, src, soff, lds, mat, nu, nt):
    # dst[(u*nout + v)*ldd + doff + j] = sum_s mat[v, s] * src[(u*nin + s)*lds + soff + j], j < nt
    nout, nin = mat.shape
    for u in range(nu):
        for v in range(nout):
            d = dst[(u * nout + v) * ldd + doff:(u * nout + v) * ldd + doff + nt]
            first = True
            for s in range(nin):
                c = mat[v, s]
                if c == 0:
                    continue
                x = src[(u * nin + s) * lds + soff:(u * nin + s) * lds + soff + nt]
                if first:
                    for j in range(nt):
                        d[j] = c * x[j]
                    first = False
                else:
                    for j in range(nt):
                        d[j] += c * x[j]
            if first:
                for j in range(nt):
                    d[j] = 0


@_micro
def _strip(xc, sb, wpad, row0, nrows, ph0, pw0, hv, wv):
    # sb[rr*wpad + col] = x[row0 + rr - ph0, col - pw0] inside [0, hv) x [0, wv), else 0
    lo = min(wpad, max(0, pw0))
    hi = max(lo, min(wpad, wv + pw0))
    for rr in range(nrows):
        d = sb[rr * wpad:(rr + 1) * wpad]
        xr = row0 + rr - ph0
        if xr < 0 or xr >= hv or hi == lo:
            for j in range(wpad):
                d[j] = 0
            continue
        for j in range(lo):
            d[j] = 0
        v = xc[xr, lo - pw0:]
        for j in range(hi - lo):
            d[lo + j] = v[j]
        for j in range(hi, wpad):
            d[j] = 0


@_micro
def _gather_in(sb, wpad, xs, ld, t0, nrows, tw, m, a):
    # xs[(r*a + s)*ld + t0 + i*tw + j] = strip element (m*i + r, m*j + s): patch rows of each tile
    for i in range(nrows):
        for r in range(a):
            row = sb[(m * i + r) * wpad:]
            for s in range(a):
                d = xs[(r * a + s) * ld + t0 + i * tw:(r * a + s) * ld + t0 + (i + 1) * tw]
                for j in range(tw):
                    d[j] = row[m * j + s]


@_micro
def _gather_gy(gp, gs, ld, t0, i0, nrows, tw, m, oh, ow):
    # gs[(ri*m + ci)*ld + t0 + (i - i0)*tw + j] = gy[m*i + ri, m*j + ci], zero beyond the output
    for i in range(i0, i0 + nrows):
        for ri in range(m):
            row = m * i + ri
            for ci in range(m):
                d = gs[(ri * m + ci) * ld + t0 + (i - i0) * tw:(ri * m + ci) * ld + t0 + (i - i0 + 1) * tw]
                jmax = 0 if row >= oh else min(tw, (ow - ci + m - 1) // m)
                if jmax > 0:
                    v = gp[row]
                    for j in range(jmax):
                        d[j] = v[m * j + ci]
                for j in range(jmax, tw):
                    d[j] = 0


@_micro
def _gemm_block(fn, iv, tr, tb, mrows, ncols, inner, one, beta, a, lda, b, ldb, c, ldc):
    # c (mrows x ncols) = a (mrows x inner) . op(b) + beta * c, row-major with leading dimensions;
    # op(b) is b (inner x ncols), or with tb == _T the transpose of b (ncols x inner).  The one GEMM
    # call of the algorithm: single-threaded BLAS (im2col's ?gemm pointer) until a packed GEMM of
    # our own replaces it.
    _gemm(fn, iv, tr, _N, tb, mrows, ncols, inner, one, a, lda, b, ldb, beta, c, ldc)


@kernel
def grad_weight_tiles(x, gy, mw, buf, bt, am, fn, ints, ctr, m, g, ph0, pw0, hv, wv, th, tw, nb, rb, cb, tmax):
    # x (n, c, h, w); gy (n, k, oh, ow); mw (a*a*k*cg,) zeroed: mw[(e*k + kk)*cg + cc];
    # bt (a, a); am (a, m) = A, the transpose of A^T;
    # buf (nw, words): v (a*a*cb*tmax) | wg (a*a*kg*tmax) | xs, ts (a*a*tmax each) | strip.
    # Item = (group, block of cb channels): it owns those columns of mw and goes through the batch
    # and the tile rows in a fixed order.
    nn, c = x.shape[0], x.shape[1]
    k, oh, ow = gy.shape[1], gy.shape[2], gy.shape[3]
    a = m + 2
    ee = a * a
    kg, cg = k // g, c // g
    wpad = m * tw + 2
    nw = buf.shape[0]
    ncb = (cg + cb - 1) // cb
    items = g * ncb
    for wid in prange(nw):
        wk = buf[wid]
        o1 = ee * cb * tmax
        o2 = o1 + ee * kg * tmax
        o3 = o2 + ee * tmax
        o4 = o3 + ee * tmax
        v = wk[:o1]
        wg = wk[o1:o2]
        xs = wk[o2:o3]
        ts = wk[o3:o4]
        sb = wk[o4:]
        iv = ints[wid]
        tr = _chars()
        one = np.ones(1, dtype=gy.dtype)
        for _ in range(items):
            it = _claim(ctr)
            if it >= items:
                break
            ci = it % ncb
            gi = it // ncb
            c0 = ci * cb
            nc = min(cb, cg - c0)
            for n0 in range(0, nn, nb):
                n1 = min(nn, n0 + nb)
                for i0 in range(0, th, rb):
                    i1 = min(th, i0 + rb)
                    nr = i1 - i0
                    nt = (n1 - n0) * nr * tw
                    for cc in range(nc):
                        for n in range(n0, n1):
                            _strip(x[n, gi * cg + c0 + cc], sb, wpad, m * i0, m * nr + 2, ph0, pw0, hv, wv)
                            _gather_in(sb, wpad, xs, nt, (n - n0) * nr * tw, nr, tw, m, a)
                        _left(ts, 0, nt, xs, 0, nt, bt, a, nt)
                        _right(v, cc * nt, nc * nt, ts, 0, nt, bt, a, nt)
                    for q in range(kg):
                        for n in range(n0, n1):
                            _gather_gy(gy[n, gi * kg + q], xs, nt, (n - n0) * nr * tw, i0, nr, tw, m, oh, ow)
                        _left(ts, 0, nt, xs, 0, nt, am, m, nt)
                        _right(wg, q * nt, kg * nt, ts, 0, nt, am, a, nt)
                    for e in range(ee):
                        _gemm_block(fn, iv, tr, _T, kg, nc, nt, one, one, wg[e * kg * nt:], nt,
                                    v[e * nc * nt:], nt, mw[(e * k + gi * kg) * cg + c0:], cg)
