"""Winograd convolution F(m x m, 3 x 3) for 3x3, stride-1, undilated layers: all three passes.

Notation: n c h w input; k 3 3 weight (cg = c/g, kg = k/g per group g); oh ow output; ph0 pw0
top/left padding; m the output tile (4 or 2), a = m + 2 the transformed tile, e < a*a one of its
elements; th = ceil(oh/m), tw = ceil(ow/m) tiles per column / row; T tiles of one work item.

Method (Lavin & Gray, 2015).  With the 1-D matrices ``B^T`` (a x a), ``G`` (a x 3) and ``A^T``
(m x a) of F(m, 3) (interpolation points 0, +-1, +-2 and infinity for m = 4; 0, +-1, infinity for
m = 2), output tile ``Y`` of output channel k is

    Y = A^T [ sum_c (G g_kc G^T) (.) (B^T d_c B) ] A

where ``d_c`` is the a x a input patch of channel c under the tile (zero outside the input) and
(.) the element-wise product.  The channel sum is, for each of the a*a elements e, a matrix
product ``M[e] (kg x T) = U[e] (kg x cg) . V[e] (cg x T)`` over the T tiles of a work item: 36
GEMMs (m = 4) instead of 144 multiplies per output tile and channel pair (2.25x fewer for m = 4,
m = 2: 16 for 36, 2.25x... no: 16 products for 4 outputs against 36, also 2.25x fewer multiplies).

* forward: ``U = G g G^T`` (recomputed every call, in float64 then rounded: weights change every
  training step, so nothing is cached), input transform ``V``, the GEMMs, output transform.
* grad_input: with stride 1 it is the forward correlation of ``gy``, padded by ``2 - ph`` (negative:
  cropped), with the flipped kernel whose channels are swapped within each group: the same code.
* grad_weight: the transpose of the bilinear algorithm.  ``gw_kc = G^T [ sum_{n,tiles} (A gy_k A^T)
  (.) (B^T d_c B) ] G``: the input transform as in the forward pass, the ``A . A^T`` transform of
  each m x m tile of ``gy`` (zero beyond the output), GEMMs ``Mw[e] (kg x cb) += W[e] (kg x T) .
  V[e]^T (T x cb)`` accumulated over all tiles, then ``G^T Mw G`` to the 3 x 3 taps.

Kernels.  One parallel kernel per pass: numba's workers claim work items (tile blocks of whole
images or of tile rows of one image, per group; for grad_weight, blocks of cb input channels of one
group with the whole batch) and do the transforms of their item into per-worker buffers, then the
GEMMs (single-threaded BLAS inside each worker, as im2col: see :func:`_gemm_block`, the one place
to swap in another GEMM), then the output transform into their own outputs.  Transforms run a row
of tiles at a time in two passes, the first along columns over contiguous input rows (vectorised),
the second along rows of the first's result.

Memory.  Per worker: ``a*a * (cg + kg) * T`` elements of transformed tiles plus a padded strip of
the input; plus ``U`` (``a*a * k * cg``, 4x the weight for m = 4) or grad_weight's accumulator of
the same size.  T is chosen so that all of it stays under ``p.workspace_limit``; below one tile row
per worker :func:`supports` refuses.

Races and determinism.  Forward items write disjoint output tiles; grad_weight items own disjoint
channel blocks of ``Mw`` and reduce over the batch and tiles in a fixed order.  The tiling depends
on the thread count only through the split into items (T), so results are bitwise reproducible for
a given thread count and budget, and equal within rounding across thread counts.

Accuracy.  The transforms are exact in exact arithmetic; in floating point each output picks up
rounding from the weight transform (entries 1/4, 1/6, 1/12, 1/24: computed in float64, rounded
once), from the input and output transforms and from the GEMM sums.  A component-wise bound for one
output element y of channel k is

    |y - y_exact| <= eps * (beta_m + cg) * sum_c max|d_c| * max|g_kc|   (+ eps*|b_k| for the bias)

with ``max|d_c|`` over the tile's a x a input patch, ``max|g_kc|`` over the 9 taps, eps the dtype's
machine epsilon, and ``beta_m = 9 * kappa_m**2`` where ``kappa_m`` is the largest 1-D sum
``sum_e |A^T[i, e]| |G[e, r]| |B^T[e, j]|`` (the amplification of the three transforms):
kappa_4 = 10.3 (beta_4 = 955), kappa_2 = 2.0 (beta_2 = 36).  Against the direct sum's
``eps * 9*cg * sum |d||g|`` this is ~100x larger for m = 4 in the worst case, and the bound is
relative to the largest input of the tile, not to each product: a small output next to large
inputs loses digits (with inputs spread over 1e-4..1e4, float32 F(4x4) errors are still below
~1e-6 of the largest |x|*|w| sum, measured in tests/test_winograd.py).  Measured on random normal
data, float32, F(4x4, 3x3): max error 1.5-4x im2col's (tests assert within 8x); float64 to 1e-12
relative.  F(2x2, 3x3) is used where its cost is lower (small planes) and is about as accurate as
im2col.

NaN and Inf: a non-finite input value spreads over the output tiles whose input patch holds it (a
square of up to 2 x 2 tiles, i.e. up to 8 x 8 outputs, for every output channel of that image), a
non-finite weight over every output of its output channel.  PyTorch (and the direct algorithm)
only poison the 3 x 3 windows that touch the value.
"""
from __future__ import annotations

import dataclasses

import numba
import numpy as np
from numba import prange

from .._jit import FASTMATH, kernel
from .common import claim as _claim
from .im2col import _BLAS, _N, _T, _chars, _gemm, serial_blas

_micro = numba.njit(fastmath=FASTMATH, nogil=True, inline="always")

# --------------------------------------------------------------------------- transform matrices
# float64 copies for the Python-side weight transforms (kernels hard-code the same numbers).
_BT = {
    4: np.array([[4, 0, -5, 0, 1, 0],
                 [0, -4, -4, 1, 1, 0],
                 [0, 4, -4, -1, 1, 0],
                 [0, -2, -1, 2, 1, 0],
                 [0, 2, -1, -2, 1, 0],
                 [0, 4, 0, -5, 0, 1]], dtype=np.float64),
    2: np.array([[1, 0, -1, 0],
                 [0, 1, 1, 0],
                 [0, -1, 1, 0],
                 [0, 1, 0, -1]], dtype=np.float64),
}
_G = {
    4: np.array([[1 / 4, 0, 0],
                 [-1 / 6, -1 / 6, -1 / 6],
                 [-1 / 6, 1 / 6, -1 / 6],
                 [1 / 24, 1 / 12, 1 / 6],
                 [1 / 24, -1 / 12, 1 / 6],
                 [0, 0, 1]], dtype=np.float64),
    2: np.array([[1, 0, 0],
                 [0.5, 0.5, 0.5],
                 [0.5, -0.5, 0.5],
                 [0, 0, 1]], dtype=np.float64),
}
_AT = {
    4: np.array([[1, 1, 1, 1, 1, 0],
                 [0, 1, -1, 2, -2, 0],
                 [0, 1, 1, 4, 4, 0],
                 [0, 1, -1, 8, -8, 1]], dtype=np.float64),
    2: np.array([[1, 1, 1, 0],
                 [0, 1, -1, -1]], dtype=np.float64),
}
TILES = (4, 2)


def amplification(m):
    """kappa_m: the largest ``sum_e |A^T[i, e]| |G[e, r]| |B^T[e, j]|`` of F(m, 3) (see Accuracy)."""
    at, g, bt = np.abs(_AT[m]), np.abs(_G[m]), np.abs(_BT[m])
    return float(np.einsum("ie,er,ej->irj", at, g, bt).max())


# --------------------------------------------------------------------------- 1-D transforms
# Each works on values a stride apart (a column of a strip, or a row of the first pass's result).
@_micro
def _bt6(d0, d1, d2, d3, d4, d5):
    return (4 * d0 - 5 * d2 + d4,
            -4 * (d1 + d2) + d3 + d4,
            4 * (d1 - d2) - d3 + d4,
            2 * (d3 - d1) - d2 + d4,
            2 * (d1 - d3) - d2 + d4,
            4 * d1 - 5 * d3 + d5)


@_micro
def _bt4(d0, d1, d2, d3):
    return d0 - d2, d1 + d2, d2 - d1, d1 - d3


@_micro
def _at6(m0, m1, m2, m3, m4, m5):
    p12, q12, p34, q34 = m1 + m2, m1 - m2, m3 + m4, m3 - m4
    return m0 + p12 + p34, q12 + 2 * q34, p12 + 4 * p34, q12 + 8 * q34 + m5


@_micro
def _at4(m0, m1, m2, m3):
    return m0 + m1 + m2, m1 - m2 - m3


@_micro
def _a6(g0, g1, g2, g3):
    # A (6 x 4) times a 4-vector: grad_weight's transform of a tile of gy
    p02, p13 = g0 + g2, g1 + g3
    q02, q13 = g0 + 4 * g2, 2 * g1 + 8 * g3
    return g0, p02 + p13, p02 - p13, q02 + q13, q02 - q13, g3


@_micro
def _a4(g0, g1):
    return g0, g0 + g1, g0 - g1, -g1


# --------------------------------------------------------------------------- kernel pieces
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
def _input_row(sb, r0, wpad, ta, v, voff, ldc, tw, m):
    # Transformed tiles of one tile row: v[e*ldc + voff + j] = (B^T d_j B)[e] for tiles j < tw,
    # d_j the a x a patch at strip rows r0.., columns m*j..  First pass down columns (contiguous,
    # vectorised over the row), into ta (a rows of wpad); second along each row of ta.
    if m == 4:
        s0 = sb[r0 * wpad:]
        s1 = sb[(r0 + 1) * wpad:]
        s2 = sb[(r0 + 2) * wpad:]
        s3 = sb[(r0 + 3) * wpad:]
        s4 = sb[(r0 + 4) * wpad:]
        s5 = sb[(r0 + 5) * wpad:]
        t0, t1, t2 = ta[0:wpad], ta[wpad:2 * wpad], ta[2 * wpad:3 * wpad]
        t3, t4, t5 = ta[3 * wpad:4 * wpad], ta[4 * wpad:5 * wpad], ta[5 * wpad:6 * wpad]
        for j in range(wpad):
            t0[j], t1[j], t2[j], t3[j], t4[j], t5[j] = _bt6(s0[j], s1[j], s2[j], s3[j], s4[j], s5[j])
        for i in range(6):
            t = ta[i * wpad:(i + 1) * wpad]
            o0 = v[(6 * i) * ldc + voff:]
            o1 = v[(6 * i + 1) * ldc + voff:]
            o2 = v[(6 * i + 2) * ldc + voff:]
            o3 = v[(6 * i + 3) * ldc + voff:]
            o4 = v[(6 * i + 4) * ldc + voff:]
            o5 = v[(6 * i + 5) * ldc + voff:]
            for j in range(tw):
                q = 4 * j
                o0[j], o1[j], o2[j], o3[j], o4[j], o5[j] = _bt6(t[q], t[q + 1], t[q + 2], t[q + 3],
                                                                t[q + 4], t[q + 5])
    else:
        s0 = sb[r0 * wpad:]
        s1 = sb[(r0 + 1) * wpad:]
        s2 = sb[(r0 + 2) * wpad:]
        s3 = sb[(r0 + 3) * wpad:]
        t0, t1 = ta[0:wpad], ta[wpad:2 * wpad]
        t2, t3 = ta[2 * wpad:3 * wpad], ta[3 * wpad:4 * wpad]
        for j in range(wpad):
            t0[j], t1[j], t2[j], t3[j] = _bt4(s0[j], s1[j], s2[j], s3[j])
        for i in range(4):
            t = ta[i * wpad:(i + 1) * wpad]
            o0 = v[(4 * i) * ldc + voff:]
            o1 = v[(4 * i + 1) * ldc + voff:]
            o2 = v[(4 * i + 2) * ldc + voff:]
            o3 = v[(4 * i + 3) * ldc + voff:]
            for j in range(tw):
                q = 2 * j
                o0[j], o1[j], o2[j], o3[j] = _bt4(t[q], t[q + 1], t[q + 2], t[q + 3])


@_micro
def _output_row(mm, moff, ldk, ob, yb, tw, m, bias):
    # yb[ri*(m*tw) + m*j + ci] = bias + (A^T M_j A)[ri, ci] for tiles j < tw of one tile row, M_j
    # element e at mm[e*ldk + moff + j].  First pass over the a rows of each column e % a
    # (contiguous in j), into ob (m*a rows of tw); second along the rows.
    lw = m * tw
    if m == 4:
        for b in range(6):
            i0 = mm[b * ldk + moff:]
            i1 = mm[(6 + b) * ldk + moff:]
            i2 = mm[(12 + b) * ldk + moff:]
            i3 = mm[(18 + b) * ldk + moff:]
            i4 = mm[(24 + b) * ldk + moff:]
            i5 = mm[(30 + b) * ldk + moff:]
            u0 = ob[b * tw:]
            u1 = ob[(6 + b) * tw:]
            u2 = ob[(12 + b) * tw:]
            u3 = ob[(18 + b) * tw:]
            for j in range(tw):
                u0[j], u1[j], u2[j], u3[j] = _at6(i0[j], i1[j], i2[j], i3[j], i4[j], i5[j])
        for ri in range(4):
            u0 = ob[(6 * ri) * tw:]
            u1 = ob[(6 * ri + 1) * tw:]
            u2 = ob[(6 * ri + 2) * tw:]
            u3 = ob[(6 * ri + 3) * tw:]
            u4 = ob[(6 * ri + 4) * tw:]
            u5 = ob[(6 * ri + 5) * tw:]
            d = yb[ri * lw:(ri + 1) * lw]
            for j in range(tw):
                z0, z1, z2, z3 = _at6(u0[j], u1[j], u2[j], u3[j], u4[j], u5[j])
                d[4 * j] = z0 + bias
                d[4 * j + 1] = z1 + bias
                d[4 * j + 2] = z2 + bias
                d[4 * j + 3] = z3 + bias
    else:
        for b in range(4):
            i0 = mm[b * ldk + moff:]
            i1 = mm[(4 + b) * ldk + moff:]
            i2 = mm[(8 + b) * ldk + moff:]
            i3 = mm[(12 + b) * ldk + moff:]
            u0 = ob[b * tw:]
            u1 = ob[(4 + b) * tw:]
            for j in range(tw):
                u0[j], u1[j] = _at4(i0[j], i1[j], i2[j], i3[j])
        for ri in range(2):
            u0 = ob[(4 * ri) * tw:]
            u1 = ob[(4 * ri + 1) * tw:]
            u2 = ob[(4 * ri + 2) * tw:]
            u3 = ob[(4 * ri + 3) * tw:]
            d = yb[ri * lw:(ri + 1) * lw]
            for j in range(tw):
                z0, z1 = _at4(u0[j], u1[j], u2[j], u3[j])
                d[2 * j] = z0 + bias
                d[2 * j + 1] = z1 + bias


@_micro
def _gy_row(gb, wpad, ta, v, voff, ldc, tw, m):
    # grad_weight's transform of one tile row of gy: v[e*ldc + voff + j] = (A G_j A^T)[e], G_j the
    # m x m tile j of the strip gb (m rows of wpad >= m*tw, zero beyond the output).
    if m == 4:
        s0, s1, s2, s3 = gb[0:], gb[wpad:], gb[2 * wpad:], gb[3 * wpad:]
        t0, t1, t2 = ta[0:wpad], ta[wpad:2 * wpad], ta[2 * wpad:3 * wpad]
        t3, t4, t5 = ta[3 * wpad:4 * wpad], ta[4 * wpad:5 * wpad], ta[5 * wpad:6 * wpad]
        for j in range(4 * tw):
            t0[j], t1[j], t2[j], t3[j], t4[j], t5[j] = _a6(s0[j], s1[j], s2[j], s3[j])
        for i in range(6):
            t = ta[i * wpad:(i + 1) * wpad]
            o0 = v[(6 * i) * ldc + voff:]
            o1 = v[(6 * i + 1) * ldc + voff:]
            o2 = v[(6 * i + 2) * ldc + voff:]
            o3 = v[(6 * i + 3) * ldc + voff:]
            o4 = v[(6 * i + 4) * ldc + voff:]
            o5 = v[(6 * i + 5) * ldc + voff:]
            for j in range(tw):
                q = 4 * j
                o0[j], o1[j], o2[j], o3[j], o4[j], o5[j] = _a6(t[q], t[q + 1], t[q + 2], t[q + 3])
    else:
        s0, s1 = gb[0:], gb[wpad:]
        t0, t1 = ta[0:wpad], ta[wpad:2 * wpad]
        t2, t3 = ta[2 * wpad:3 * wpad], ta[3 * wpad:4 * wpad]
        for j in range(2 * tw):
            t0[j], t1[j], t2[j], t3[j] = _a4(s0[j], s1[j])
        for i in range(4):
            t = ta[i * wpad:(i + 1) * wpad]
            o0 = v[(4 * i) * ldc + voff:]
            o1 = v[(4 * i + 1) * ldc + voff:]
            o2 = v[(4 * i + 2) * ldc + voff:]
            o3 = v[(4 * i + 3) * ldc + voff:]
            for j in range(tw):
                q = 2 * j
                o0[j], o1[j], o2[j], o3[j] = _a4(t[q], t[q + 1])


@_micro
def _gemm_block(fn, iv, tr, tb, mrows, ncols, inner, one, beta, a, lda, b, ldb, c, ldc):
    """``c (mrows x ncols) = a (mrows x inner) . op(b) + beta * c``, row-major with leading dimensions;
    op(b) is b (inner x ncols) or, with ``tb == _T``, the transpose of b (ncols x inner).  The one
    GEMM call of this module: single-threaded BLAS (im2col's ?gemm pointer) until a packed GEMM of
    our own replaces it."""
    _gemm(fn, iv, tr, _N, tb, mrows, ncols, inner, one, a, lda, b, ldb, beta, c, ldc)


# --------------------------------------------------------------------------- kernels
# Items: (image block of nb images, group, block of rb tile rows); with nb > 1 every item holds
# whole images (rb == th).  Tile t of an item: ((n - n0)*(i1 - i0) + (i - i0))*tw + j.
@kernel
def _forward(x, u, b, y, buf, fn, ints, ctr, has_bias, m, g, ph0, pw0, hv, wv, th, tw, nb, rb, tmax):
    # x (n, c, h, w); u (a*a*k*cg,): u[(e*k + kk)*cg + cc]; y (n, k, oh, ow);
    # buf (nw, words): v (a*a*cg*tmax) | mm (a*a*kg*tmax) | strip (rows*wpad) | ta (a*wpad) | ob | yb
    nn, c = x.shape[0], x.shape[1]
    k, oh, ow = y.shape[1], y.shape[2], y.shape[3]
    a = m + 2
    ee = a * a
    kg, cg = k // g, c // g
    wpad = m * tw + 2
    srows = m * rb + 2
    nw = buf.shape[0]
    nnb = (nn + nb - 1) // nb
    nrb = (th + rb - 1) // rb
    items = nnb * g * nrb
    for wid in prange(nw):
        wk = buf[wid]
        v = wk[:ee * cg * tmax]
        mm = wk[ee * cg * tmax:ee * (cg + kg) * tmax]
        rest = wk[ee * (cg + kg) * tmax:]
        sb = rest[:srows * wpad]
        ta = rest[srows * wpad:(srows + a) * wpad]
        ob = rest[(srows + a) * wpad:(srows + a) * wpad + m * a * tw]
        yb = rest[(srows + a) * wpad + m * a * tw:]
        iv = ints[wid]
        tr = _chars()
        one = np.ones(1, dtype=y.dtype)
        zero = np.zeros(1, dtype=y.dtype)
        for _ in range(items):
            it = _claim(ctr)
            if it >= items:
                break
            ib = it % nrb
            gi = (it // nrb) % g
            n0 = (it // (nrb * g)) * nb
            n1 = min(nn, n0 + nb)
            i0 = ib * rb
            i1 = min(th, i0 + rb)
            nt = (n1 - n0) * (i1 - i0) * tw
            for n in range(n0, n1):
                for cc in range(cg):
                    _strip(x[n, gi * cg + cc], sb, wpad, m * i0, m * (i1 - i0) + 2, ph0, pw0, hv, wv)
                    for i in range(i0, i1):
                        t0 = ((n - n0) * (i1 - i0) + (i - i0)) * tw
                        _input_row(sb, m * (i - i0), wpad, ta, v, cc * nt + t0, cg * nt, tw, m)
            for e in range(ee):
                _gemm_block(fn, iv, tr, _N, kg, nt, cg, one, zero, u[(e * k + gi * kg) * cg:], cg,
                            v[e * cg * nt:], nt, mm[e * kg * nt:], nt)
            for n in range(n0, n1):
                for q in range(kg):
                    kk = gi * kg + q
                    bias = b[kk]  # zeros without a bias
                    yp = y[n, kk]
                    for i in range(i0, i1):
                        t0 = ((n - n0) * (i1 - i0) + (i - i0)) * tw
                        _output_row(mm, q * nt + t0, kg * nt, ob, yb, tw, m, bias)
                        for ri in range(min(m, oh - m * i)):
                            d = yp[m * i + ri]
                            s = yb[ri * m * tw:]
                            for j in range(ow):
                                d[j] = s[j]


@kernel
def _grad_weight(x, gy, mw, buf, fn, ints, ctr, m, g, ph0, pw0, hv, wv, th, tw, nb, rb, cb, tmax):
    # x (n, c, h, w); gy (n, k, oh, ow); mw (a*a*k*cg,) zeroed: mw[(e*k + kk)*cg + cc];
    # buf (nw, words): v (a*a*cb*tmax) | wg (a*a*kg*tmax) | strip | ta | gy strip (m*wpad).
    # Item = (group, block of cb channels): it owns those columns of mw and goes through the batch
    # and the tile rows in order.
    nn, c = x.shape[0], x.shape[1]
    k, oh, ow = gy.shape[1], gy.shape[2], gy.shape[3]
    a = m + 2
    ee = a * a
    kg, cg = k // g, c // g
    wpad = m * tw + 2
    srows = m * rb + 2
    nw = buf.shape[0]
    ncb = (cg + cb - 1) // cb
    items = g * ncb
    for wid in prange(nw):
        wk = buf[wid]
        v = wk[:ee * cb * tmax]
        wg = wk[ee * cb * tmax:ee * (cb + kg) * tmax]
        rest = wk[ee * (cb + kg) * tmax:]
        sb = rest[:srows * wpad]
        ta = rest[srows * wpad:(srows + a) * wpad]
        gb = rest[(srows + a) * wpad:(srows + a + m) * wpad]
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
                    nt = (n1 - n0) * (i1 - i0) * tw
                    for n in range(n0, n1):
                        for cc in range(nc):
                            _strip(x[n, gi * cg + c0 + cc], sb, wpad, m * i0, m * (i1 - i0) + 2, ph0, pw0,
                                   hv, wv)
                            for i in range(i0, i1):
                                t0 = ((n - n0) * (i1 - i0) + (i - i0)) * tw
                                _input_row(sb, m * (i - i0), wpad, ta, v, cc * nt + t0, nc * nt, tw, m)
                        for q in range(kg):
                            gp = gy[n, gi * kg + q]
                            for i in range(i0, i1):
                                _strip(gp, gb, wpad, m * i, m, 0, 0, oh, ow)
                                t0 = ((n - n0) * (i1 - i0) + (i - i0)) * tw
                                _gy_row(gb, wpad, ta, wg, q * nt + t0, kg * nt, tw, m)
                    for e in range(ee):
                        _gemm_block(fn, iv, tr, _T, kg, nc, nt, one, one, wg[e * kg * nt:], nt,
                                    v[e * nc * nt:], nt, mw[(e * k + gi * kg) * cg + c0:], cg)


# --------------------------------------------------------------------------- planning
_TILE_BYTES = 1 << 20  # transformed tiles per worker to aim for (L2-sized next to the GEMM's packing)


def _tiles(p, m):
    return -(-p.oh // m), -(-p.ow // m)


def _extra_words(m, tw, rb, pass_):
    """Per-worker buffer elements besides the transformed tiles (strips and row scratch)."""
    a, wpad = m + 2, m * tw + 2
    if pass_ == "grad_weight":
        return (m * rb + 2 + a + m) * wpad
    return (m * rb + 2 + a) * wpad + m * a * tw + m * m * tw


@dataclasses.dataclass(frozen=True)
class _Plan:
    m: int
    nb: int      # images per item
    rb: int      # tile rows per item
    cb: int      # input channels per item (grad_weight)
    nw: int      # workers
    tmax: int    # most tiles in an item
    words: int   # buffer elements per worker
    fixed: int   # bytes shared by all workers (U, or grad_weight's accumulator)


def _plan(p, pass_, m, nthreads):
    """The tiling of one pass with F(m x m, 3 x 3), or the reason it cannot fit the budget."""
    isz = p.itemsize
    th, tw = _tiles(p, m)
    a2 = (m + 2) ** 2
    fixed = a2 * p.k * p.cg * isz  # U, or grad_weight's accumulator
    if pass_ == "grad_weight":
        cb = -(-p.cg // min(p.cg, max(1, -(-nthreads // p.g))))  # every worker gets a channel block
        per_tile = a2 * (cb + p.kg) * isz
        par = p.g * -(-p.cg // cb)
    else:
        cb = p.cg
        per_tile = a2 * (p.cg + p.kg) * isz
        par = p.g
    # tiles per item: ~_TILE_BYTES of transformed tiles, whole images when planes are small; for
    # the forward pass, at least one item per worker
    want = max(tw, _TILE_BYTES // per_tile)
    plane = th * tw
    if plane <= want:
        nb, rb = max(1, min(p.n, want // plane)), th
    else:
        nb, rb = 1, max(1, min(th, want // tw))
    if pass_ != "grad_weight":
        while nb > 1 and -(-p.n // nb) * par < nthreads:
            nb = -(-nb // 2)
        if nb == 1 and p.n * par * -(-th // rb) < nthreads:
            rb = max(1, -(-th // -(-nthreads // (p.n * par))))

    def words(nb_, rb_):
        t = nb_ * rb_ * tw
        return t, per_tile // isz * t + _extra_words(m, tw, rb_, pass_)

    if pass_ == "grad_weight":
        items = par
    else:
        items = -(-p.n // nb) * par * -(-th // rb)
    nw = max(1, min(nthreads, items))
    while True:
        tmax, wds = words(nb, rb)
        if fixed + nw * wds * isz <= p.workspace_limit:
            break
        if nb > 1:
            nb = max(1, nb // 2)
        elif rb > 1:
            rb = max(1, rb // 2)
        elif nw > 1:
            nw -= 1
        else:
            need = fixed + wds * isz
            return (f"needs at least {need} bytes of workspace (transformed weights and one row of "
                    f"tiles), workspace_limit is {p.workspace_limit}")
    return _Plan(m, nb, rb, cb, nw, tmax, wds, fixed)


_PLANS: dict = {}


def _cached_plan(p, pass_, m=None):
    nthreads = numba.get_num_threads()
    key = (p, pass_, m, nthreads)
    pl = _PLANS.get(key)
    if pl is None:
        plans = [_plan(p, pass_, mm, nthreads) for mm in ((m,) if m else TILES)]
        fit = [c for c in plans if not isinstance(c, str)]
        pl = min(fit, key=lambda c: _cost_of(p, pass_, c, nthreads)) if fit else plans[0]
        if len(_PLANS) > 1024:
            _PLANS.clear()
        _PLANS[key] = pl
    return pl


def _contiguous(a):
    """A C-contiguous, writeable array (numba compiles another specialisation for read-only ones)."""
    a = np.ascontiguousarray(a)
    return a if a.flags.writeable else a.copy()


# --------------------------------------------------------------------------- passes
def _weight_transform(w, p, m):
    """U (a*a, k, cg) = G w G^T per tap pair, in float64, rounded once to the dtype."""
    g = _G[m]
    u = np.einsum("ar,kcrs,bs->abkc", g, np.asarray(w, np.float64), g, optimize=True)
    return np.ascontiguousarray(u.reshape(-1), dtype=p.dtype)


def _run_forward(x, w, b, p, m=None):
    """The forward pass; ``m`` forces a tile size (tests), else the cheaper one."""
    pl = _cached_plan(p, "forward", m)
    if isinstance(pl, str):  # pragma: no cover - supports() refused it before
        raise ValueError(pl)
    th, tw = _tiles(p, pl.m)
    y = np.empty(p.y_shape, dtype=p.dtype)
    has_bias = b is not None
    bb = _contiguous(b) if has_bias else np.zeros(p.k, p.dtype)
    hv = min(p.h, p.oh + 2 - p.ph0)  # rows a valid output reads (less than h when cropping)
    wv = min(p.w, p.ow + 2 - p.pw0)
    with serial_blas:
        _forward(_contiguous(x), _weight_transform(w, p, pl.m), bb, y, np.empty((pl.nw, pl.words), p.dtype),
                 *_BLAS.args(p.dtype, pl.nw), np.zeros(1, np.int64), has_bias, pl.m, p.g, p.ph0, p.pw0,
                 hv, wv, th, tw, pl.nb, pl.rb, pl.tmax)
    return y


def forward(x, w, b, p):
    return _run_forward(x, w, b, p)


def _transposed(p):
    """grad_input's parameters as a forward convolution: gy padded by 2 - ph (cropped when negative)."""
    return dataclasses.replace(p, c=p.k, h=p.oh, w=p.ow, k=p.c, ph0=2 - p.ph0, ph1=2 - p.ph1,
                               pw0=2 - p.pw0, pw1=2 - p.pw1, oh=p.h, ow=p.w)


def grad_input(gy, w, p):
    q = _transposed(p)
    wf = np.asarray(w)[:, :, ::-1, ::-1].reshape(p.g, p.kg, p.cg, 3, 3).transpose(0, 2, 1, 3, 4)
    return _run_forward(gy, wf.reshape(p.c, p.kg, 3, 3), None, q)


def grad_weight(gy, x, p, m=None):
    pl = _cached_plan(p, "grad_weight", m)
    if isinstance(pl, str):  # pragma: no cover - supports() refused it before
        raise ValueError(pl)
    m = pl.m
    th, tw = _tiles(p, m)
    a = m + 2
    mw = np.zeros(a * a * p.k * p.cg, dtype=p.dtype)
    hv = min(p.h, p.oh + 2 - p.ph0)
    wv = min(p.w, p.ow + 2 - p.pw0)
    with serial_blas:
        _grad_weight(_contiguous(x), _contiguous(gy), mw, np.empty((pl.nw, pl.words), p.dtype),
                     *_BLAS.args(p.dtype, pl.nw), np.zeros(1, np.int64), m, p.g, p.ph0, p.pw0, hv, wv,
                     th, tw, pl.nb, pl.rb, pl.cb, pl.tmax)
    g = _G[m]
    gw = np.einsum("ar,abkc,bs->kcrs", g, mw.reshape(a, a, p.k, p.cg).astype(np.float64), g, optimize=True)
    return np.ascontiguousarray(gw, dtype=p.dtype)


# --------------------------------------------------------------------------- registry
_INT_MAX = 2**31 - 1


def supports(p, pass_):
    """3x3 kernels with stride 1 and dilation 1, any padding and groups, within the budget."""
    if (p.r, p.s) != (3, 3):
        return f"needs a 3x3 kernel, got {p.r}x{p.s}"
    if (p.sh, p.sw) != (1, 1):
        return f"needs stride 1, got ({p.sh}, {p.sw})"
    if (p.dh, p.dw) != (1, 1):
        return f"needs dilation 1, got ({p.dh}, {p.dw})"
    if pass_ == "grad_input":
        p = _transposed(p)
    if p.n * (p.oh // 2 + 1) * (p.ow // 2 + 1) * 36 * max(p.c, p.k) > _INT_MAX:
        return "a GEMM operand has more than 2**31 - 1 elements (BLAS int sizes)"
    pl = _cached_plan(p, pass_ if pass_ != "grad_input" else "forward")
    return pl if isinstance(pl, str) else None


# Cost model constants, fitted to single-call medians on the 2-core EPYC (Zen 3, AVX2) build machine,
# shared with other jobs (+-20%): GEMM rate per thread at a GEMM's thinnest side (as im2col's), and
# transforms per transformed element (input, gy) or output element.
_GEMM_RATE = {4: 40e9, 8: 20e9}
_TRANSFORM_RATE = 1.0e9


def _cost_of(p, pass_, pl, nthreads):
    th, tw = _tiles(p, pl.m)
    a2 = (pl.m + 2) ** 2
    tiles = p.n * th * tw
    thin = min(p.kg, p.cg, pl.tmax)
    rate = _GEMM_RATE[p.itemsize] * thin / (thin + 16.0) * (1.0 + 0.9 * (min(nthreads, pl.nw) - 1))
    gemm = 2.0 * a2 * p.k * p.cg * tiles / rate
    if pass_ == "grad_weight":  # each channel block transforms all of gy again
        elems = a2 * tiles * (p.c + p.k * -(-p.cg // pl.cb))
    else:
        elems = a2 * tiles * (p.c + p.k)
    trans = elems / (_TRANSFORM_RATE * (1.0 + 0.9 * (min(nthreads, pl.nw) - 1)))
    return 3e-5 + gemm + trans


def cost(p, pass_):
    """Estimated seconds of one pass with the cheaper of F(4x4) and F(2x2) (``inf`` when unsupported)."""
    if supports(p, pass_) is not None:
        return float("inf")
    q = _transposed(p) if pass_ == "grad_input" else p
    pl = _cached_plan(q, "forward" if pass_ == "grad_input" else pass_)
    return _cost_of(q, pass_, pl, numba.get_num_threads())
