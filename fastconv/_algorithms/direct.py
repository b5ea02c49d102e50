"""Direct loop-nest convolution: forward, grad_input and grad_weight.

Notation: n c h w input; k r s weight (cg = c/g, kg = k/g per group g); oh ow output; sh sw stride;
dh dw dilation; hp wp padded input.  Kernels see padded planes flattened to 1-D (``xp[n, c, hp*wp]``),
so a tap ``(r, s)`` of output row ``i`` starts at ``(i*sh + r*dh)*wp + s*dw``.

* forward: one work item = (image, group, block of ``kb`` output channels, block of ``rb`` output
  rows).  Each input row segment is loaded once and used for all ``kb`` channels.  With stride 1 a
  block of rows is one contiguous run of the flattened plane (the ``wp - ow`` columns between rows
  are computed and thrown away), so the inner loop is long and contiguous even for small images.
* grad_input: the transpose -- every output gradient scatters ``w * g`` back over its window.  One
  work item owns whole input planes (image, group, block of input channels), so the ``+=`` never
  races.  Rows are never merged here, so padding columns never mix garbage into a sum.
* grad_weight: one work item per ``(k, c)`` pair reduces over the batch and output rows, in a fixed
  order, so results do not depend on the thread count.
"""
import numpy as np
from numba import prange

from .._jit import kernel
from .common import pad_input

# Elements of the forward accumulator tile (kb * row-block length): sized to stay in L1/L2.
_FWD_TILE = 4096
_FWD_KB = 8
_GI_CB = 8


@kernel
def _forward(xp, w, b, y, wp, sh, sw, dh, dw, g, kb, rb):
    nn, kk_, oh, ow = y.shape
    cg, rr, ss = w.shape[1], w.shape[2], w.shape[3]
    kg = kk_ // g
    nkb = (kg + kb - 1) // kb
    nrb = (oh + rb - 1) // rb
    for t in prange(nn * g * nkb * nrb):
        ib = t % nrb
        kbi = (t // nrb) % nkb
        gi = (t // (nrb * nkb)) % g
        n = t // (nrb * nkb * g)
        k0 = gi * kg + kbi * kb
        nk = min(kb, (gi + 1) * kg - k0)
        i0 = ib * rb
        i1 = min(i0 + rb, oh)
        ln = (i1 - i0 - 1) * wp + ow  # rows are merged only when sh == sw == 1 (rb > 1)
        acc = np.empty((nk, ln), dtype=y.dtype)
        for q in range(nk):
            acc[q, :] = b[k0 + q]
        for c in range(cg):
            xv = xp[n, gi * cg + c]
            for r in range(rr):
                for s in range(ss):
                    base = (i0 * sh + r * dh) * wp + s * dw
                    # a slice view, not base + j indexing: numba's negative-index wraparound
                    # on base + j blocks LLVM's vectoriser
                    if sw == 1:  # contiguous slice: its own type, so LLVM emits unit-stride vectors
                        xc = xv[base:base + ln]
                        for q in range(nk):
                            wv = w[k0 + q, c, r, s]
                            a = acc[q]
                            for j in range(ln):
                                a[j] += wv * xc[j]
                    else:
                        xs = xv[base:base + (ln - 1) * sw + 1:sw]
                        for q in range(nk):
                            wv = w[k0 + q, c, r, s]
                            a = acc[q]
                            for j in range(ln):
                                a[j] += wv * xs[j]
        for q in range(nk):
            for i in range(i0, i1):
                o = (i - i0) * wp
                y[n, k0 + q, i, :] = acc[q, o:o + ow]


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
def _grad_weight(gy, xp, gw, wp, sh, sw, dh, dw, g, zero):
    nn, kk_, oh, ow = gy.shape
    cg, rr, ss = gw.shape[1], gw.shape[2], gw.shape[3]
    kg = kk_ // g
    for t in prange(kk_ * cg):
        k = t // cg
        c = t % cg
        ci = (k // kg) * cg + c
        acc = np.zeros((rr, ss), dtype=gw.dtype)
        for n in range(nn):
            xv = xp[n, ci]
            for i in range(oh):
                grow = gy[n, k, i]
                for r in range(rr):
                    for s in range(ss):
                        base = (i * sh + r * dh) * wp + s * dw
                        d = zero
                        if sw == 1:
                            xc = xv[base:base + ow]
                            for j in range(ow):
                                d += grow[j] * xc[j]
                        else:
                            xs = xv[base:base + (ow - 1) * sw + 1:sw]
                            for j in range(ow):
                                d += grow[j] * xs[j]
                        acc[r, s] += d
        gw[k, c] = acc


# --------------------------------------------------------------------------- Python drivers
def _row_block(p):
    if p.sh != 1 or p.sw != 1:
        return 1
    kb = min(_FWD_KB, p.kg)
    return max(1, min(p.oh, (_FWD_TILE // kb - p.ow) // p.wp + 1))


def forward(x, w, b, p):
    xp = pad_input(x, p).reshape(p.n, p.c, p.hp * p.wp)
    y = np.empty(p.y_shape, dtype=p.dtype)
    if b is None:
        b = np.zeros(p.k, dtype=p.dtype)
    _forward(xp, np.ascontiguousarray(w), np.ascontiguousarray(b), y,
             p.wp, p.sh, p.sw, p.dh, p.dw, p.g, min(_FWD_KB, p.kg), _row_block(p))
    return y


def grad_input(gy, w, p):
    gxp = np.zeros((p.n, p.c, p.hp * p.wp), dtype=p.dtype)
    _grad_input(np.ascontiguousarray(gy), np.ascontiguousarray(w), gxp,
                p.wp, p.sh, p.sw, p.dh, p.dw, p.g, min(_GI_CB, p.cg))
    gxp = gxp.reshape(p.n, p.c, p.hp, p.wp)
    if not p.padded:
        return gxp
    return np.ascontiguousarray(gxp[:, :, p.ph0:p.ph0 + p.h, p.pw0:p.pw0 + p.w])


def grad_weight(gy, x, p):
    xp = pad_input(x, p).reshape(p.n, p.c, p.hp * p.wp)
    gw = np.empty(p.w_shape, dtype=p.dtype)
    _grad_weight(np.ascontiguousarray(gy), xp, gw, p.wp, p.sh, p.sw, p.dh, p.dw, p.g, p.dtype.type(0))
    return gw


def supports(p, pass_):
    """The direct loop nest serves every geometry."""
    return None


# Cost model (seconds): a per-call floor plus multiply-accumulates at a rate that falls for short
# inner loops (rows shorter than a vector register waste lanes).  Refined by issue 5's calibration.
def cost(p, pass_):
    inner = p.ow if (pass_ != "forward" or p.sh != 1 or p.sw != 1) else min(p.oh * p.wp, 512)
    eff = min(1.0, inner / 64.0) * (1.0 if p.sw == 1 else 0.3)
    return 2e-5 + p.macs / (4e9 * max(eff, 0.05))
