"""The direct algorithm's kernels over a padded copy of the whole tensor: forward, the strided
grad_input scatter and grad_weight (layouts in the package docstring)."""
import numpy as np
from numba import prange

from ..._jit import kernel
from .blocks import _dot1, _dot4x4, _fwd_block, _fwd_geometry, _tap_offsets


@kernel
def _forward(xq, wt, tc, tb, b, y, wq, sh, g, kb, rb):
    nn, oh = y.shape[0], y.shape[2]
    cg, kg, nkb, nrb, lmax = _fwd_geometry(y, xq.shape[1], g, kb, rb, wq)
    offs = _tap_offsets(tc, tb, xq.shape[2])
    for it in prange(nn * g * nkb * nrb):
        ib = it % nrb
        kbi = (it // nrb) % nkb
        gi = (it // (nrb * nkb)) % g
        n = it // (nrb * nkb * g)
        k0 = gi * kg + kbi * kb
        i0 = ib * rb
        acc = np.empty((kb, lmax), dtype=y.dtype)
        _fwd_block(xq[n], gi * cg, wt, offs, b, y, n, k0, min(kb, (gi + 1) * kg - k0), i0,
                   min(i0 + rb, oh), wq, sh, acc)


@kernel
def _grad_input(gy, w, gxp, wp, sh, sw, dh, dw, g, cb):
    nn, kk_, oh, ow = gy.shape
    cg, rr, ss = w.shape[1], w.shape[2], w.shape[3]
    kg = kk_ // g
    ncb = (cg + cb - 1) // cb
    for t in prange(nn * g * ncb):
        cbi = t % ncb
        gi = (t // ncb) % g
        n = t // (ncb * g)
        c0 = cbi * cb
        nc = min(cb, cg - c0)
        for i in range(oh):
            for q in range(kg):
                k = gi * kg + q
                grow = gy[n, k, i]
                for r in range(rr):
                    for s in range(ss):
                        base = (i * sh + r * dh) * wp + s * dw
                        for cc in range(nc):
                            wv = w[k, c0 + cc, r, s]
                            if sw == 1:
                                gc = gxp[n, gi * cg + c0 + cc, base:base + ow]
                                for j in range(ow):
                                    gc[j] += wv * grow[j]
                            else:
                                gs = gxp[n, gi * cg + c0 + cc, base:base + (ow - 1) * sw + 1:sw]
                                for j in range(ow):
                                    gs[j] += wv * grow[j]


@kernel
def _grad_weight(gy, xq, tc, tb, gw, seg_g, seg_x, seg_len, g, zero):
    nn, kk_ = gy.shape[0], gy.shape[1]
    tn = gw.shape[1]
    cg = xq.shape[1] // g
    kg = kk_ // g
    nqb = (kg + 3) // 4
    ntb = (tn + 3) // 4
    nseg = seg_g.shape[0]
    for it in prange(g * nqb * ntb):
        tbi = it % ntb
        qbi = (it // ntb) % nqb
        gi = it // (ntb * nqb)
        k0 = gi * kg + qbi * 4
        nk = min(4, (gi + 1) * kg - k0)
        t0 = tbi * 4
        nt = min(4, tn - t0)
        c0 = gi * cg
        acc = np.zeros((4, 4), dtype=gw.dtype)
        for n in range(nn):
            gv = gy[n]
            xv = xq[n]
            for sg in range(nseg):
                a, b, ln = seg_g[sg], seg_x[sg], seg_len[sg]
                if nk == 4 and nt == 4:
                    o0, o1, o2, o3 = b + tb[t0], b + tb[t0 + 1], b + tb[t0 + 2], b + tb[t0 + 3]
                    _dot4x4(acc, 0, 0, gv[k0, a:a + ln], gv[k0 + 1, a:a + ln], gv[k0 + 2, a:a + ln],
                            gv[k0 + 3, a:a + ln], xv[c0 + tc[t0], o0:o0 + ln], xv[c0 + tc[t0 + 1], o1:o1 + ln],
                            xv[c0 + tc[t0 + 2], o2:o2 + ln], xv[c0 + tc[t0 + 3], o3:o3 + ln], zero)
                else:
                    for q in range(nk):
                        for u in range(nt):
                            o = b + tb[t0 + u]
                            acc[q, u] += _dot1(gv[k0 + q, a:a + ln], xv[c0 + tc[t0 + u], o:o + ln], zero)
        for q in range(nk):
            for u in range(nt):
                gw[k0 + q, t0 + u] = acc[q, u]


