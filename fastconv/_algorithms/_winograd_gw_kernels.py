"""The numba kernel of the Winograd algorithm's grad_weight on row transforms (:func:`grad_weight_rows`;
see :mod:`fastconv._algorithms.winograd` for the method and the guarantees).

It uses the packed forward's layout and row transforms (:mod:`._winograd_packed_kernels`): a work
item is R consecutive tile rows of one group, its tiles in slots with one spare per tile row; each
input channel is transformed by the forward's code into ``v[e]`` (cg x slots), each grad_output
channel by the transpose of the output transform (``A gy A^T``: its m x m tiles do not overlap,
so its rows are copied and split into m column phases) into ``w[e]`` (kg x slots), and the a*a
products ``Mw[e] (kg x cg) += w[e] . v[e]^T`` are single-threaded BLAS calls (im2col's ?gemm pointer)
reducing over the slots.  The gathers of the older kernel (:func:`._winograd_kernels.grad_weight_tiles`,
element by element, ~2 ns per transformed element) took ~80% of its time.

Kept apart from ``_winograd_packed_kernels.py`` so that each file stays one pass's kernels (numba's
cache is per source file: after editing a row transform there, delete this file's cache too).
"""
import numpy as np
from numba import prange

from .._jit import micro, kernel, serial
from ._blas import _N, _T, _chars, _gemm
from ._winograd_packed_kernels import _bt_cols, _bt_row, _copy_rows, _split_phases

_u = np.uint64


@micro
def _a_t(src, so, lds, dst, do, ldd, n, m, kc):
    # dst[do + r*ldd + q] = sum_i A[r, i] src[so + i*lds + q], r < m + 2, q < n: A = (A^T)^T of F(m, 3),
    # the a x m matrix that takes an m x m grad_output tile to the transformed domain
    s0 = _u(so)
    ls = _u(lds)
    s1 = s0 + ls
    d = _u(do)
    ld = _u(ldd)
    nn = _u(n)
    if m == 4:
        k2, k4, k8 = kc[1], kc[2], kc[4]
        s2 = s1 + ls
        s3 = s2 + ls
        for q in range(nn):
            dst[d + q] = src[s0 + q]
        d += ld
        for q in range(nn):
            dst[d + q] = src[s0 + q] + src[s1 + q] + src[s2 + q] + src[s3 + q]
        d += ld
        for q in range(nn):
            dst[d + q] = src[s0 + q] - src[s1 + q] + src[s2 + q] - src[s3 + q]
        d += ld
        for q in range(nn):
            dst[d + q] = src[s0 + q] + k2 * src[s1 + q] + k4 * src[s2 + q] + k8 * src[s3 + q]
        d += ld
        for q in range(nn):
            dst[d + q] = src[s0 + q] - k2 * src[s1 + q] + k4 * src[s2 + q] - k8 * src[s3 + q]
        d += ld
        for q in range(nn):
            dst[d + q] = src[s3 + q]
    else:  # A^T = [[1, 1, 1, 0], [0, 1, -1, -1]]
        for q in range(nn):
            dst[d + q] = src[s0 + q]
        d += ld
        for q in range(nn):
            dst[d + q] = src[s0 + q] + src[s1 + q]
        d += ld
        for q in range(nn):
            dst[d + q] = src[s0 + q] - src[s1 + q]
        d += ld
        for q in range(nn):
            dst[d + q] = -src[s1 + q]


@serial
def _a_cols(rb, tb, w, n, m, kc):
    # tb[r*w + c] = sum_i A[r, i] rb[i*w + c], c < n: down the columns of the copied gy rows
    _a_t(rb, 0, w, tb, 0, w, n, m, kc)


@serial
def _a_row(ph, lp, dst, doff, ldd, n, m, kc):
    # dst[doff + s*ldd + q] = sum_j A[s, j] ph[j*lp + q]: along the rows, from the m column phases
    _a_t(ph, 0, lp, dst, doff, ldd, n, m, kc)


@kernel
def grad_weight_rows(xf, gyf, acc, buf, kc, fn, ints, nn, c, xh, xw, k, oh, ow, m, g, ph0, pw0, hv, wv, th, tw,
                     rows, ldt):
    # xf (n, c, h, w) and gyf (n, k, oh, ow) flat; acc (nw, a*a*k*cg) zeroed: worker wid's sums
    # acc[wid, (e*k + kk)*cg + cc]; buf (nw, words) as forward_packed's: v (a*a*ev) | wg (a*a*ew) |
    # rb, tb (a*rows*wrow each) | ph (a*lp) | ...  Worker wid takes the tile rows
    # [wid*trows/nw, (wid+1)*trows/nw) of every group, `rows` at a time: a fixed share and order,
    # so that the per-worker sums (added in worker order by the caller) are the same bits on every
    # call with the same thread count.
    a = m + 2
    ee = a * a
    kg, cg = k // g, c // g
    sl = tw + 1
    wrow = m * sl
    lw = rows * wrow
    lp = rows * sl + 17
    trows = nn * th
    nw = buf.shape[0]
    for wid in prange(nw):
        wk = buf[wid]
        aw = acc[wid]
        ev = cg * ldt + 16
        ew = kg * ldt + 16
        o1 = ee * ev
        o2 = o1 + ee * ew
        o3 = o2 + a * lw
        o4 = o3 + a * lw
        o5 = o4 + a * lp
        v = wk[:o1]
        wg = wk[o1:o2]
        rb = wk[o2:o3]
        tb = wk[o3:o4]
        ph = wk[o4:o5]
        iv = ints[wid]
        tr = _chars()
        one = np.ones(1, dtype=wk.dtype)
        lo = wid * trows // nw
        hi = (wid + 1) * trows // nw
        for gi in range(g):
            for r0 in range(lo, hi, rows):
                nr_ = min(rows, hi - r0)
                ns = nr_ * sl
                for cc in range(cg):
                    for ri in range(nr_):
                        n = (r0 + ri) // th
                        ti = r0 + ri - n * th
                        _copy_rows(xf, (n * c + gi * cg + cc) * xh * xw, xw, rb, ri * wrow, m * ti - ph0, -pw0, a,
                                   lw, wrow, hv, wv)
                    _bt_cols(rb, tb, lw, nr_ * wrow, m, kc)
                    for r in range(a):
                        _split_phases(tb, r * lw, ph, lp, ns, m)
                        _bt_row(ph, lp, v, r * a * ev + cc * ldt, ev, ns, m, kc)
                    # the spare slot of each tile row holds what spilled past the row: zero it, so
                    # that a non-finite value there meets no zero of gy's spare slot (0 * inf)
                    for e in range(ee):
                        for ri in range(nr_):
                            v[e * ev + cc * ldt + ri * sl + tw] = 0
                for q in range(kg):
                    for ri in range(nr_):
                        n = (r0 + ri) // th
                        ti = r0 + ri - n * th
                        # m rows of gy under the tile row, zero past the output (and in the spare slot)
                        _copy_rows(gyf, (n * k + gi * kg + q) * oh * ow, ow, rb, ri * wrow, m * ti, 0, m, lw, wrow,
                                   oh, ow)
                    _a_cols(rb, tb, lw, nr_ * wrow, m, kc)
                    for r in range(a):
                        _split_phases(tb, r * lw, ph, lp, ns, m)
                        _a_row(ph, lp, wg, r * a * ew + q * ldt, ew, ns, m, kc)
                for e in range(ee):
                    _gemm(fn, iv, tr, _N, _T, kg, cg, ns, one, wg[e * ew:], ldt, v[e * ev:], ldt, one,
                          aw[(e * k + gi * kg) * cg:], cg)


@kernel
def sum_workers(acc, out):
    # out[i] = acc[0, i] + acc[1, i] + ... in worker order (the same bits for a given thread count)
    nw, size = acc.shape
    for i in prange(size):
        s = acc[0, i]
        for wid in range(1, nw):
            s += acc[wid, i]
        out[i] = s
