"""Per-image kernels of the direct algorithm: each work item pads one image's planes itself (no
padded copy of the tensor), for many small images such as LeNet's."""
import numpy as np
from numba import prange

from ..._jit import kernel
from ..common import SLACK, claim, stack_rows
from .blocks import _FWD_KB, _copy, _dot1, _dot4x4, _fill_plane, _fill_shifted, _fwd_block, _fwd_geometry, _mac1x1, _mac1x4, _mac2x4, _mac4x4, _tap_offsets

_STACK_COLS = 520  # per-image forward: accumulator rows this long live on the worker's stack


@kernel
def _forward_img(x, wt, tc, tb, b, y, sw, hp, wq, top, left, sh, g, kb, rb, nw, ctr, ns, dw):
    """Forward for many small images: each of ``nw`` workers claims (image, group) items one at
    a time (``claim``), pads their planes into its private buffer and computes them like
    ``_forward``, all output channels and rows, through an accumulator on its stack (``kb`` <=
    _FWD_KB rows of at most _STACK_COLS: LLVM then needs no overlap checks before each
    micro-kernel pass).  Same arithmetic in the same order as ``_forward``: the same bits.  Buffer
    layouts: pad_planes' (``ns == 0``), or -- stride 1 only -- ``ns`` column-shifted copies of each
    padded plane, ``ow`` wide (``_fill_shifted``), where a block of output rows is a run of exactly
    rows * ow positions (``wq`` is then ``ow``)."""
    nn, oh = y.shape[0], y.shape[2]
    cg, kg, nkb, nrb, _ = _fwd_geometry(y, x.shape[1], g, kb, rb, wq)
    items = nn * g
    offs = _tap_offsets(tc, tb, sw * hp * wq + SLACK)
    for wid in prange(nw):
        buf = np.zeros((cg * max(ns, 1), sw * hp * wq + SLACK), dtype=y.dtype)
        acc = stack_rows(_FWD_KB, _STACK_COLS, y.dtype)
        for _ in range(items):
            it = claim(ctr)
            if it >= items:
                break
            n, gi = it // g, it % g
            for c in range(cg):
                if ns:
                    _fill_shifted(x[n, gi * cg + c], buf[c * ns:(c + 1) * ns], hp, wq, top, left, dw)
                else:
                    _fill_plane(x[n, gi * cg + c], buf[c], sw, hp, wq, top, left, 0, hp)
            for kbi in range(nkb):
                k0 = gi * kg + kbi * kb
                for ib in range(nrb):
                    i0 = ib * rb
                    _fwd_block(buf, 0, wt, offs, b, y, n, k0, min(kb, (gi + 1) * kg - k0), i0,
                               min(i0 + rb, oh), wq, sh, acc)


@kernel
def _grad_weight_img(gy, x, tc, tb, part, sw, hp, wq, top, left, sh, g, zero, nw, ctr):
    """grad_weight for many small images: work item ``ch`` sums its share of the batch (in order)
    into ``part[ch]``; the caller adds the parts in order, so the result depends on the shape only.
    Each image's planes are padded into private buffers (no padded copies of x and gy), the
    gradient with the input's row pitch and zeros between rows, so with ``sh == 1`` and a finite
    input plane every tap is one dot over the whole plane (a garbage column times a zero gradient
    is NaN where the input holds Inf: then one dot per output row)."""
    nn, kk_, oh, ow = gy.shape
    cg = x.shape[1] // g
    kg = kk_ // g
    tn = part.shape[2]
    nch = part.shape[0]
    lnm = (oh - 1) * wq + ow
    lnm += (-lnm) % 8
    for wid in prange(nw):
        xb = np.zeros((cg, sw * hp * wq + SLACK), dtype=x.dtype)
        gb = np.zeros((kg, oh * wq + SLACK), dtype=x.dtype)
        for _ in range(nch):
            ch = claim(ctr)
            if ch >= nch:
                break
            acc = part[ch]
            for n in range(ch * nn // nch, (ch + 1) * nn // nch):
                for gi in range(g):
                    c0, k0 = gi * cg, gi * kg
                    for c in range(cg):
                        _fill_plane(x[n, c0 + c], xb[c], sw, hp, wq, top, left, 0, hp)
                    for q in range(kg):
                        for i in range(oh):
                            _copy(gb[q, i * wq:i * wq + ow], gy[n, k0 + q, i], ow)
                    merged = sh == 1
                    if merged:
                        nf = zero
                        for c in range(cg):
                            for j in range(xb.shape[1]):
                                nf += xb[c, j] * zero
                        merged = nf == 0
                    nseg = 1 if merged else oh
                    for sg in range(nseg):
                        if merged:
                            a, bx, ln = 0, 0, lnm
                        else:
                            a, bx, ln = sg * wq, sg * sh * wq, ow
                        for q0 in range(0, kg, 4):
                            nk = min(4, kg - q0)
                            for t0 in range(0, tn, 4):
                                nt = min(4, tn - t0)
                                if nk == 4 and nt == 4:
                                    o0, o1, o2, o3 = bx + tb[t0], bx + tb[t0 + 1], bx + tb[t0 + 2], bx + tb[t0 + 3]
                                    _dot4x4(acc, k0 + q0, t0, gb[q0, a:a + ln], gb[q0 + 1, a:a + ln],
                                            gb[q0 + 2, a:a + ln], gb[q0 + 3, a:a + ln],
                                            xb[tc[t0], o0:o0 + ln], xb[tc[t0 + 1], o1:o1 + ln],
                                            xb[tc[t0 + 2], o2:o2 + ln], xb[tc[t0 + 3], o3:o3 + ln], zero)
                                else:
                                    for q in range(nk):
                                        for u in range(nt):
                                            o = bx + tb[t0 + u]
                                            acc[k0 + q0 + q, t0 + u] += _dot1(gb[q0 + q, a:a + ln],
                                                                              xb[tc[t0 + u], o:o + ln], zero)


@kernel
def _grad_input_img(gy, wt, tb, gx, hp, wp, top, left, nw, ctr, zero):
    """Stride-1 grad_input for many small images as ``W.T @ g`` and col2im, per (image, group)
    item: the gradient is laid out with the padded input's row pitch ``wp`` (zeros between rows),
    ``cols[t] = sum_k w[k, t] * g[k]`` runs over those rows with the forward's micro-kernels, and
    each tap's run is added at its offset into a padded input-gradient plane, then cropped.  The
    columns between rows are exact zeros (finite weights only: the caller checks), so they add
    nothing.  Half the multiply-adds of the correlation on small planes (lenet5-c3: 0.33M instead
    of 0.6M per image), which multiplies the kernel by the zero border of the gradient."""
    nn, kk_, oh, ow = gy.shape
    g, tn, kg = wt.shape
    cg = gx.shape[1] // g
    h, w = gx.shape[2], gx.shape[3]
    rs = tn // cg
    ln = (oh - 1) * wp + ow
    ln += (-ln) % 8
    k4 = kg - kg % 4
    items = nn * g
    for wid in prange(nw):
        gyw = np.zeros((kg, ln), dtype=gy.dtype)
        cols = np.empty((tn, ln), dtype=gy.dtype)
        gxp = np.empty((cg, hp * wp + SLACK), dtype=gy.dtype)
        for _ in range(items):
            it = claim(ctr)
            if it >= items:
                break
            n, gi = it // g, it % g
            wg = wt[gi]
            for q in range(kg):
                for i in range(oh):
                    _copy(gyw[q, i * wp:i * wp + ow], gy[n, gi * kg + q, i], ow)
            for t in range(tn):
                ct = cols[t]
                for j in range(ln):
                    ct[j] = zero
            for k in range(0, k4, 4):
                x0, x1, x2, x3 = gyw[k], gyw[k + 1], gyw[k + 2], gyw[k + 3]
                t = 0
                while t + 4 <= tn:
                    _mac4x4(cols[t], cols[t + 1], cols[t + 2], cols[t + 3], x0, x1, x2, x3, wg, t, k, ln)
                    t += 4
                if t + 2 <= tn:
                    _mac2x4(cols[t], cols[t + 1], x0, x1, x2, x3, wg, t, k, ln)
                    t += 2
                while t < tn:
                    _mac1x4(cols[t], x0, x1, x2, x3, wg, t, k, ln)
                    t += 1
            for k in range(k4, kg):
                for t in range(tn):
                    _mac1x1(cols[t], gyw[k], wg[t, k], ln)
            for c in range(cg):
                gc = gxp[c]
                for j in range(gc.shape[0]):
                    gc[j] = zero
            for t in range(tn):
                dst = gxp[t // rs, tb[t]:tb[t] + ln]
                src = cols[t]
                for j in range(ln):
                    dst[j] += src[j]
            for c in range(cg):
                for i in range(h):
                    o = (i + top) * wp + left
                    _copy(gx[n, gi * cg + c, i], gxp[c, o:o + w], w)


