"""Direct loop-nest convolution: forward, grad_input and grad_weight.

Notation: n c h w input; k r s weight (cg = c/g, kg = k/g per group g); oh ow output; sh sw stride;
dh dw dilation; hp wp padded input; t a tap = (c, r, s) of one group, tn = cg*r*s taps.

Layout.  The padded input is split by column phase (``iw % sw``) and each plane flattened to 1-D:
element ``(ih, iw)`` sits at ``(iw % sw)*hp*wq + ih*wq + iw // sw`` with ``wq = ceil(wp / sw)``.
Then every tap of every output row reads a *contiguous* run, whatever the stride: tap t of output
row ``i`` starts at ``tb[t] + i*sh*wq``.  With ``sw == 1`` this is just the padded input.

* forward: one work item = (image, group, block of output channels, block of output rows).  The
  micro-kernel (``common.mac_taps``) keeps the sums of 4 output channels x 3 vectors of a row
  segment in registers over all taps and stores them once: per tap 12 FMAs and 8 loads (3 input
  vectors, 4 weight broadcasts, 1 offset), bound by the FMA units.  A pass that kept its sums in
  memory was bound by loads and stores (lenet5-c3's forward 0.61 -> 0.45 ms with the same bits,
  resnet50-3x3-64 21.8 -> 16.5 ms).  With ``sh == 1`` a block of rows is one contiguous run
  (the ``wq - ow`` columns between rows are computed and thrown away), so the inner loop is long
  even for small images.
* grad_input, stride 1: the forward kernel applied to the zero-padded output gradient with the
  flipped, channel-swapped kernel (the transpose of the convolution is a correlation with the
  flipped kernel).  Larger strides: the same per phase of the input position (``ih % sh``,
  ``iw % sw``), each phase a stride-1 correlation with the taps that land on it.  Depthwise strided
  layers, and weights holding NaN or Inf (whose products with the padding zeros PyTorch never
  forms): a scatter of ``w * g`` over each window, one work item per block of input planes so the
  ``+=`` never races.
* grad_weight: one work item per (4 output channels, 4 taps) block reduces over the batch and
  output positions in a fixed order, so results do not depend on the thread count.  Rows are merged
  into one run per image only when the input is finite (a garbage column times zero gradient is
  NaN when the input there is Inf).
* depthwise (one input and one output channel per group): forward, stride-1 grad_input (the same
  kernel on the gradient) and grad_weight have their own kernels.  Each work item pads one plane
  into a private buffer (no padded copy of the whole tensor: the pass is memory-bound) and sums all
  taps of a run in one pass; 3x3 with ``sw == dw == 1`` has unrolled micro-kernels.  Forward: one
  item per (image, channel) plane.  grad_weight: one item per channel, summing its images in order.
"""
import functools

import numpy as np
import numba
from numba import literally, prange

from .._jit import BOUNDSCHECK, FASTMATH, kernel
from .common import SLACK, claim, mac_taps, pad_input, pad_planes, stack_rows, transposed_weight

_FWD_TILE = 8192  # elements of the forward accumulator (channels x row-block run): stays in L1/L2
_FWD_KB = 8       # output channels per forward work item
_STACK_COLS = 520  # per-image forward: accumulator rows this long live on the worker's stack
_GI_CB = 8        # input channels per work item of the strided grad_input scatter
_DW_RB = 8        # output rows per depthwise forward block (stride 1): small, so row copies overlap
_IMG_MIN_ITEMS = 16          # per-image forward: at least this many (image, group) items ...
_IMG_MAX_BYTES = 256 * 1024  # ... whose padded planes take at most this much each
_IMG_PARTS = 32              # per-image grad_weight: batch chunks summed into separate parts
_IMG_MAX_PART = 4 << 20      # per-image grad_weight: bytes of the per-item partial sums

# Micro-kernels: serial, uncached, compiled into the calling parallel kernel.
_micro = numba.njit(fastmath=FASTMATH, nogil=True, inline="always")


@_micro
def _mac4x4(a0, a1, a2, a3, x0, x1, x2, x3, wt, k, t, ln):
    w00, w01, w02, w03 = wt[k, t], wt[k, t + 1], wt[k, t + 2], wt[k, t + 3]
    w10, w11, w12, w13 = wt[k + 1, t], wt[k + 1, t + 1], wt[k + 1, t + 2], wt[k + 1, t + 3]
    w20, w21, w22, w23 = wt[k + 2, t], wt[k + 2, t + 1], wt[k + 2, t + 2], wt[k + 2, t + 3]
    w30, w31, w32, w33 = wt[k + 3, t], wt[k + 3, t + 1], wt[k + 3, t + 2], wt[k + 3, t + 3]
    for j in range(ln):
        v0, v1, v2, v3 = x0[j], x1[j], x2[j], x3[j]
        a0[j] += w00 * v0 + w01 * v1 + w02 * v2 + w03 * v3
        a1[j] += w10 * v0 + w11 * v1 + w12 * v2 + w13 * v3
        a2[j] += w20 * v0 + w21 * v1 + w22 * v2 + w23 * v3
        a3[j] += w30 * v0 + w31 * v1 + w32 * v2 + w33 * v3


@_micro
def _mac2x4(a0, a1, x0, x1, x2, x3, wt, k, t, ln):
    w00, w01, w02, w03 = wt[k, t], wt[k, t + 1], wt[k, t + 2], wt[k, t + 3]
    w10, w11, w12, w13 = wt[k + 1, t], wt[k + 1, t + 1], wt[k + 1, t + 2], wt[k + 1, t + 3]
    for j in range(ln):
        v0, v1, v2, v3 = x0[j], x1[j], x2[j], x3[j]
        a0[j] += w00 * v0 + w01 * v1 + w02 * v2 + w03 * v3
        a1[j] += w10 * v0 + w11 * v1 + w12 * v2 + w13 * v3


@_micro
def _mac1x4(a0, x0, x1, x2, x3, wt, k, t, ln):
    w0, w1, w2, w3 = wt[k, t], wt[k, t + 1], wt[k, t + 2], wt[k, t + 3]
    for j in range(ln):
        a0[j] += w0 * x0[j] + w1 * x1[j] + w2 * x2[j] + w3 * x3[j]


@_micro
def _mac1x1(a0, x0, w0, ln):
    for j in range(ln):
        a0[j] += w0 * x0[j]


@_micro
def _dot4x2(acc, q, t, g0, g1, g2, g3, x0, x1, zero):
    # 8 sums in registers and 6 loads per step: no spills (4x4's 16 sums plus 8 loads overflow the
    # 16 vector registers of AVX2 -- measured alone, 4x4 ran at 34-44 GFLOP/s, this at 56-61)
    s00 = s01 = s10 = s11 = s20 = s21 = s30 = s31 = zero
    for j in range(g0.shape[0]):
        u0, u1, u2, u3 = g0[j], g1[j], g2[j], g3[j]
        v0, v1 = x0[j], x1[j]
        s00 += u0 * v0
        s01 += u0 * v1
        s10 += u1 * v0
        s11 += u1 * v1
        s20 += u2 * v0
        s21 += u2 * v1
        s30 += u3 * v0
        s31 += u3 * v1
    acc[q, t] += s00
    acc[q, t + 1] += s01
    acc[q + 1, t] += s10
    acc[q + 1, t + 1] += s11
    acc[q + 2, t] += s20
    acc[q + 2, t + 1] += s21
    acc[q + 3, t] += s30
    acc[q + 3, t + 1] += s31


@_micro
def _dot4x4(acc, q, t, g0, g1, g2, g3, x0, x1, x2, x3, zero):
    _dot4x2(acc, q, t, g0, g1, g2, g3, x0, x1, zero)
    _dot4x2(acc, q, t + 2, g0, g1, g2, g3, x2, x3, zero)


@_micro
def _dot1(g0, x0, zero):
    s = zero
    for j in range(g0.shape[0]):
        s += g0[j] * x0[j]
    return s


@_micro
def _tap_offsets(tc, tb, pitch):
    """Flat offset of every tap's run in planes ``pitch`` elements apart (``mac_taps``' table)."""
    offs = np.empty(tc.shape[0], dtype=np.int64)
    for t in range(tc.shape[0]):
        offs[t] = tc[t] * pitch + tb[t]
    return offs


@numba.njit(fastmath=FASTMATH, nogil=True)  # not inlined: literally() needs its own typing
def _mac_run(acc, q, xv, base, offs, wt, k0, b, ln, lanes, nq):
    """Rows q .. q+nq-1 of ``acc`` over a run of ln positions (a multiple of lanes): mac_taps
    blocks of 3 vectors, then single vectors; ``nq`` a literal (one compiled copy per value)."""
    nql = literally(nq)
    j = 0
    while j + 3 * lanes <= ln:
        mac_taps(acc, q, j, xv, base + j, offs, wt, k0 + q, b, offs.shape[0], nql, 3)
        j += 3 * lanes
    while j < ln:
        mac_taps(acc, q, j, xv, base + j, offs, wt, k0 + q, b, offs.shape[0], nql, 1)
        j += lanes


@_micro
def _fwd_block(xv, c0, wt, offs, b, y, n, k0, nk, i0, i1, wq, sh, acc):
    """Output channels [k0, k0 + nk) and rows [i0, i1) of image n from its planes ``xv`` (pad_planes'
    layout, C-contiguous; the group's channels start at row c0; tap t at flat offset ``offs[t]``
    of the group's first plane), through the scratch ``acc`` (>= nk x run, C-contiguous)."""
    ow = y.shape[3]
    tn = wt.shape[1]
    # several rows only when sh == 1; rounded up to whole vectors (the planes' SLACK makes that
    # safe) because a scalar remainder loop would cost as much as the vector body on short runs
    ln = (i1 - i0 - 1) * wq + ow
    ln = min(ln + (-ln) % 8, ln + SLACK)
    lanes = 32 // y.itemsize  # ln is a multiple of 8, so of lanes
    base = c0 * xv.shape[1] + i0 * sh * wq
    if BOUNDSCHECK:  # mac_taps reads unchecked: the bounds-checked CI build checks its extent
        for t in range(tn):
            if base + offs[t] < 0 or base + offs[t] + ln > xv.size:
                raise IndexError("_fwd_block: a tap's run lies outside the input planes")
    # every sum runs over all taps in registers (mac_taps): 4 channels x 3 vectors at a time
    q = 0
    while q + 4 <= nk:
        _mac_run(acc, q, xv, base, offs, wt, k0, b, ln, lanes, 4)
        q += 4
    while q < nk:
        _mac_run(acc, q, xv, base, offs, wt, k0, b, ln, lanes, 1)
        q += 1
    for q in range(nk):
        for i in range(i0, i1):
            _copy(y[n, k0 + q, i], acc[q, (i - i0) * wq:(i - i0) * wq + ow], ow)


@_micro
def _fwd_geometry(y, c, g, kb, rb, wq):
    """Channels per group (in, out), channel and row blocks, and the accumulator width of a forward."""
    kk_, oh, ow = y.shape[1], y.shape[2], y.shape[3]
    kg = kk_ // g
    return c // g, kg, (kg + kb - 1) // kb, (oh + rb - 1) // rb, (min(rb, oh) - 1) * wq + ow + 16


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


# --------------------------------------------------------------------------- depthwise (cg == kg == 1)
@_micro
def _copy(d, s, m):
    # an explicit loop: numba's slice assignment checks for overlap and copies element-wise
    for j in range(m):
        d[j] = s[j]


@_micro
def _fill_plane(src, buf, sw, hp, wq, top, left, lo, hi):
    # padded rows lo..hi-1 of one padded, phase-split plane (pad_planes' layout) from src (h, w);
    # buf's padding was zeroed once and is never written, so it stays zero across planes
    h, w = src.shape
    for f in range(sw):
        q_lo = max(0, (left - f + sw - 1) // sw)
        q_hi = min(wq, (w + left - f + sw - 1) // sw)
        if q_hi <= q_lo:
            continue
        c0 = q_lo * sw + f - left
        for i in range(max(lo, top), min(hi, hp, h + top)):
            r0 = f * hp * wq + i * wq
            if sw == 1:
                _copy(buf[r0 + q_lo:r0 + q_hi], src[i - top, c0:c0 + q_hi - q_lo], q_hi - q_lo)
            else:
                for j in range(q_hi - q_lo):
                    buf[r0 + q_lo + j] = src[i - top, c0 + j * sw]


@_micro
def _fill_shifted(src, bufs, hp, ow, top, left, dw):
    # bufs[s] holds, at row i (of hp) and column j (of ow), the padded plane's element
    # (i, j + s*dw), i.e. src[i - top, j + s*dw - left] or 0: tap (r, s) of output row i is then
    # bufs[s][(i + r*dh)*ow + j], and a block of rows one contiguous run.  The zeros were
    # written once (same geometry for every plane) and are never overwritten.
    h, w = src.shape
    for s in range(bufs.shape[0]):
        d = bufs[s]
        j0 = max(0, left - s * dw)
        j1 = min(ow, w + left - s * dw)
        if j1 <= j0:
            continue
        c0 = j0 + s * dw - left
        for i in range(max(0, top), min(hp, h + top)):
            _copy(d[i * ow + j0:i * ow + j1], src[i - top, c0:c0 + j1 - j0], j1 - j0)


@_micro
def _dw3x3(acc, buf, o, wq2, wt, c, bias, ln):
    # sw == dw == 1: the three taps of a kernel row read one slice at constant offsets, so LLVM
    # needs few alias checks and vectorises (nine slices defeat its runtime-check budget)
    w0, w1, w2, w3, w4, w5 = wt[c, 0], wt[c, 1], wt[c, 2], wt[c, 3], wt[c, 4], wt[c, 5]
    w6, w7, w8 = wt[c, 6], wt[c, 7], wt[c, 8]
    x0 = buf[o:o + ln + 2]
    x1 = buf[o + wq2:o + wq2 + ln + 2]
    x2 = buf[o + 2 * wq2:o + 2 * wq2 + ln + 2]
    for j in range(ln):
        acc[j] = (bias + w0 * x0[j] + w1 * x0[j + 1] + w2 * x0[j + 2] + w3 * x1[j] + w4 * x1[j + 1]
                  + w5 * x1[j + 2] + w6 * x2[j] + w7 * x2[j + 1] + w8 * x2[j + 2])


@kernel
def _dw_forward(x, wt, tb, b, y, sw, hp, wq, top, left, sh, dh, rr, rb, nw, ctr, fast):
    """Depthwise forward: one work item per (image, channel) plane, padded into a private buffer
    (no padded copy of the whole input), then blocks of ``rb`` output rows as one run over all
    taps (``fast``: the 3x3, sw == dw == 1 micro-kernel), copied into ``y``.  The input rows of
    the next block are copied in before a block is computed: their loads, independent of the
    arithmetic, then overlap it (measured 10-25% faster than filling the whole plane first)."""
    nn, cc = x.shape[0], x.shape[1]
    oh, ow = y.shape[2], y.shape[3]
    tn = wt.shape[1]
    t4 = tn - tn % 4
    items = nn * cc
    nrb = (oh + rb - 1) // rb
    lmax = (rb - 1) * wq + ow
    lmax += (-lmax) % 16
    for wid in prange(nw):
        buf = np.zeros(sw * hp * wq + SLACK, dtype=y.dtype)
        acc = np.empty(lmax, dtype=y.dtype)
        for _ in range(items):
            it = claim(ctr)
            if it >= items:
                break
            n, c = it // cc, it % cc
            xs = x[n, c]
            _fill_plane(xs, buf, sw, hp, wq, top, left, 0, (min(rb, oh) - 1) * sh + (rr - 1) * dh + 1)
            for ib in range(nrb):
                i0 = ib * rb
                i1 = min(i0 + rb, oh)
                # padded rows block ib + 1 reads beyond those of block ib
                _fill_plane(xs, buf, sw, hp, wq, top, left, (i1 - 1) * sh + (rr - 1) * dh + 1,
                            (min(i1 + rb, oh) - 1) * sh + (rr - 1) * dh + 1)
                # rounded up to whole vectors like _forward (SLACK)
                ln = (i1 - i0 - 1) * wq + ow
                ln += (-ln) % 16
                row0 = i0 * sh * wq
                if fast:
                    _dw3x3(acc, buf, row0, dh * wq, wt, c, b[c], ln)
                else:
                    acc[:ln] = b[c]
                    for t in range(0, t4, 4):
                        o0, o1, o2, o3 = row0 + tb[t], row0 + tb[t + 1], row0 + tb[t + 2], row0 + tb[t + 3]
                        _mac1x4(acc, buf[o0:o0 + ln], buf[o1:o1 + ln], buf[o2:o2 + ln], buf[o3:o3 + ln],
                                wt, c, t, ln)
                    for t in range(t4, tn):
                        o0 = row0 + tb[t]
                        _mac1x1(acc, buf[o0:o0 + ln], wt[c, t], ln)
                for i in range(i0, i1):
                    o = (i - i0) * wq
                    _copy(y[n, c, i], acc[o:o + ow], ow)


@_micro
def _dw3x3_dots(tot, gb, buf, wq2, ln, zero):
    # tot[t] += the dot of the gradient run gb with tap t's input run, 3x3 with sw == dw == 1: a
    # pure reduction (no stores), so LLVM vectorises it without alias checks
    x0 = buf[0:ln + 2]
    x1 = buf[wq2:wq2 + ln + 2]
    x2 = buf[2 * wq2:2 * wq2 + ln + 2]
    s0 = s1 = s2 = s3 = s4 = s5 = s6 = s7 = s8 = zero
    for j in range(ln):
        v = gb[j]
        s0 += v * x0[j]
        s1 += v * x0[j + 1]
        s2 += v * x0[j + 2]
        s3 += v * x1[j]
        s4 += v * x1[j + 1]
        s5 += v * x1[j + 2]
        s6 += v * x2[j]
        s7 += v * x2[j + 1]
        s8 += v * x2[j + 2]
    tot[0] += s0
    tot[1] += s1
    tot[2] += s2
    tot[3] += s3
    tot[4] += s4
    tot[5] += s5
    tot[6] += s6
    tot[7] += s7
    tot[8] += s8


@kernel
def _dw_grad_weight(gy, x, tb, gw, sw, hp, wq, top, left, sh, dh, fast, zero):
    """Depthwise grad_weight: one work item per channel; each of its planes is padded into a
    private buffer.  ``fast`` (3x3, stride 1, dw == 1) and a finite plane: the gradient plane is
    copied with the input's row pitch (zeros between rows) and each tap is one dot over the whole
    plane.  Otherwise (a garbage column times a zero gradient is NaN where the input holds Inf)
    every output row adds ``g * input`` of all taps into per-column partial sums.  Sums run over
    the batch in a fixed order into float64: independent of the thread count."""
    nn, kk_, oh, ow = gy.shape
    tn = tb.shape[0]
    ln = (oh - 1) * wq + ow
    ln += (-ln) % 16
    for c in prange(kk_):
        buf = np.zeros(sw * hp * wq + SLACK, dtype=gy.dtype)
        gb = np.zeros(ln, dtype=gy.dtype) if fast else np.zeros(0, dtype=gy.dtype)
        pa = np.empty((tn, ow), dtype=gy.dtype)
        tot = np.zeros(tn, dtype=np.float64)
        for n in range(nn):
            _fill_plane(x[n, c], buf, sw, hp, wq, top, left, 0, hp)
            if fast:
                nf = zero
                for j in range(buf.shape[0]):
                    nf += buf[j] * 0
                if nf == 0:
                    for i in range(oh):
                        _copy(gb[i * wq:i * wq + ow], gy[n, c, i], ow)
                    _dw3x3_dots(tot, gb, buf, dh * wq, ln, zero)
                    continue
            pa[:] = 0
            for i in range(oh):
                g = gy[n, c, i]
                row0 = i * sh * wq
                for t in range(tn):
                    o = row0 + tb[t]
                    xs = buf[o:o + ow]
                    pt = pa[t]
                    for j in range(ow):
                        pt[j] += g[j] * xs[j]
            for t in range(tn):
                s = zero
                for j in range(ow):
                    s += pa[t, j]
                tot[t] += s
        for t in range(tn):
            gw[c, t] = tot[t]


def _depthwise(p):
    return p.cg == 1 and p.kg == 1


def _dw_conv(x, w, b, top, left, hp, wp, sh, sw, dh, dw, oh, ow):
    """Depthwise forward of unpadded ``x`` (n, c, h, w) by (c, 1, r, s) weights; ``top``/``left``
    pad (negative: crop) and ``hp``/``wp`` is the padded extent."""
    n, c = x.shape[0], x.shape[1]
    r, s = w.shape[2], w.shape[3]
    wq = -(-wp // sw)
    _, tb = _taps(1, r, s, dh, dw, sw, hp, wq)
    y = np.empty((n, c, oh, ow), dtype=x.dtype)
    rb = 1 if sh != 1 else _DW_RB
    if b is None:
        b = np.zeros(c, dtype=x.dtype)
    if y.size:
        _dw_forward(np.ascontiguousarray(x), np.ascontiguousarray(w).reshape(c, r * s), tb,
                    np.ascontiguousarray(b), y, sw, hp, wq, top, left, sh, dh, r, rb, *_workers(n * c),
                    r == 3 and s == 3 and sw == 1 and dw == 1)
    return y


# --------------------------------------------------------------------------- Python drivers
def _workers(items):
    """Worker count and a zeroed item counter for a kernel whose workers ``claim`` items."""
    return min(max(items, 1), numba.get_num_threads()), np.zeros(1, np.int64)


@functools.lru_cache(maxsize=256)
def _taps(cg, r, s, dh, dw, sw, hp, wq):
    """Channel and start offset of every tap (c, r, s) in the phase-split plane layout (cached,
    read-only: building them cost ~50-100 us, as much as a small layer's kernel)."""
    c_i, r_i, s_i = np.meshgrid(np.arange(cg), np.arange(r), np.arange(s), indexing="ij")
    col = s_i.ravel() * dw
    tb = (col % sw) * hp * wq + r_i.ravel() * dh * wq + col // sw
    tc, tb = c_i.ravel().astype(np.int64), tb.astype(np.int64)
    tc.flags.writeable = tb.flags.writeable = False
    return tc, tb


@functools.lru_cache(maxsize=256)
def _shifted_taps(cg, r, s, dh, ow):
    """Tap tables of ``_fill_shifted``'s layout: tap (c, r, s) reads copy ``c*s + s`` at ``r*dh*ow``."""
    c_i, r_i, s_i = np.meshgrid(np.arange(cg), np.arange(r), np.arange(s), indexing="ij")
    tc = (c_i * s + s_i).ravel().astype(np.int64)
    tb = (r_i * dh * ow).ravel().astype(np.int64)
    tc.flags.writeable = tb.flags.writeable = False
    return tc, tb


def _blocks(k, g, sh, ow, wq, oh):
    """Output channels and rows per forward block: the accumulator stays in L1/L2."""
    kb = min(_FWD_KB, k // g)
    rb = 1 if sh != 1 else max(1, min(oh, (_FWD_TILE // kb - ow) // wq + 1))
    return kb, rb


def _per_image(n, g, cg, plane, itemsize):
    """Pad each image's planes inside the kernel (``_forward_img``) instead of a padded copy of the
    whole tensor: when there are many (image, group) items and each one's planes fit in L2.  The
    choice depends on the shape only, and both paths give the same bits."""
    return n * g >= _IMG_MIN_ITEMS and cg * plane * itemsize <= _IMG_MAX_BYTES


def _conv(x, top, bottom, left, right, w, b, sh, sw, dh, dw, g, oh, ow):
    """Forward convolution of ``x`` (n, c, h, w) zero-padded by top/bottom/left/right (negative:
    cropped) by (k, c/g, r, s) weights."""
    n, c, h, wd = x.shape
    k, cg, r, s = w.shape
    hp, wq = h + top + bottom, -(-(wd + left + right) // sw)
    tc, tb = _taps(cg, r, s, dh, dw, sw, hp, wq)
    y = np.empty((n, k, oh, ow), dtype=x.dtype)
    kb, rb = _blocks(k, g, sh, ow, wq, oh)
    b = np.zeros(k, dtype=x.dtype) if b is None else np.ascontiguousarray(b)
    wt = np.ascontiguousarray(w).reshape(k, cg * r * s)
    if y.size == 0:
        return y
    if _per_image(n, g, cg, sw * hp * wq + SLACK, x.dtype.itemsize) and ow + 16 <= _STACK_COLS:
        ns = 0
        if sh == 1 and sw == 1 and s > 1 and wq > ow and _per_image(n, g, cg * s, hp * ow + SLACK, x.dtype.itemsize):
            # rows ow wide instead of wq: (oh-1)*wq + ow lanes computed per ow*oh outputs before
            # (lenet5-c3: 136 per 100), ~ow*oh after, for s copies of each plane
            ns, wq = s, ow
            tc, tb = _shifted_taps(cg, r, s, dh, ow)
        # row blocks short enough for the stack accumulator (_fwd_geometry's width)
        rb = max(1, min(rb, (_STACK_COLS - 16 - ow) // wq + 1))
        _forward_img(np.ascontiguousarray(x), wt, tc, tb, b, y, sw, hp, wq, top, left, sh, g, kb, rb,
                     *_workers(n * g), ns, dw)
    else:
        xq, _, _, _ = pad_planes(x, top, bottom, left, right, sw)
        _forward(xq, wt, tc, tb, b, y, wq, sh, g, kb, rb)
    return y


def forward(x, w, b, p):
    if _depthwise(p):
        return _dw_conv(x, w, b, p.ph0, p.pw0, p.hp, p.wp, p.sh, p.sw, p.dh, p.dw, p.oh, p.ow)
    return _conv(x, p.ph0, p.ph1, p.pw0, p.pw1, w, b, p.sh, p.sw, p.dh, p.dw, p.g, p.oh, p.ow)


def grad_input(gy, w, p):
    # the correlation multiplies every weight by the zeros around gy: a NaN or Inf weight would
    # make NaN where PyTorch, which sums only real terms, has a number; the scatter sums only those
    if p.sh == 1 and p.sw == 1 and np.isfinite(w).all():
        tn = p.cg * p.r * p.s
        ln = (p.oh - 1) * p.wp + p.ow + 8
        if (not _depthwise(p) and _per_image(p.n, p.g, p.cg, p.hp * p.wp + SLACK, p.itemsize)
                and (tn + p.kg) * ln * p.itemsize <= _IMG_MAX_BYTES):
            _, tb = _taps(p.cg, p.r, p.s, p.dh, p.dw, 1, p.hp, p.wp)
            wt = np.ascontiguousarray(np.asarray(w).reshape(p.g, p.kg, tn).transpose(0, 2, 1))
            gx = np.empty(p.x_shape, dtype=p.dtype)
            _grad_input_img(np.ascontiguousarray(gy), wt, tb, gx, p.hp, p.wp, p.ph0, p.pw0,
                            *_workers(p.n * p.g), p.dtype.type(0))
            return gx
        return _grad_input_by_correlation(gy, w, p)
    if not _depthwise(p) and np.isfinite(w).all():
        return _grad_input_by_phases(gy, w, p)
    gxp = np.zeros((p.n, p.c, p.hp * p.wp), dtype=p.dtype)
    _grad_input(np.ascontiguousarray(gy), np.ascontiguousarray(w), gxp,
                p.wp, p.sh, p.sw, p.dh, p.dw, p.g, min(_GI_CB, p.cg))
    gxp = gxp.reshape(p.n, p.c, p.hp, p.wp)
    if not p.padded:
        return gxp
    return np.ascontiguousarray(gxp[:, :, p.ph0:p.ph0 + p.h, p.pw0:p.pw0 + p.w])


def _grad_input_by_correlation(gy, w, p):
    """Stride 1: gx = correlation of gy, zero-padded by the kernel extent, with the flipped kernel
    whose in/out channels are swapped within each group."""
    # gx[ih] collects gy[ih + ph0 - r*dh]: gy row u goes to row u + eh - ph0 of a gradient padded
    # to h + eh rows (negative padding crops rows that only ever meet input padding).
    eh, ew = p.dh * (p.r - 1), p.dw * (p.s - 1)
    top, left = eh - p.ph0, ew - p.pw0
    if _depthwise(p):  # one channel per group: the swap is the identity
        return _dw_conv(gy, w[:, :, ::-1, ::-1], None, top, left, p.h + eh, p.w + ew, 1, 1, p.dh, p.dw,
                        p.h, p.w)
    wf = transposed_weight(w, p.g)
    return _conv(gy, top, p.h + eh - p.oh - top, left, p.w + ew - p.ow - left, wf, None, 1, 1, p.dh, p.dw,
                 p.g, p.h, p.w)


def _phase_taps(a, st, d, r, n_out, n_pad):
    """One axis of a strided grad_input phase: the kernel taps r0 < r1 < ... whose offset r*d
    falls on padded input positions a, a + st, a + 2*st, ... (``r*d % st == a``), and the forward
    correlation that gathers them: gx_pad[a + st*u] = sum_j gy[u - e_j] * w[r_j] with
    e_j = (r_j*d - a) // st, i.e. gy padded by ``before`` = e_last and ``after``, read with
    dilation de = e_(j+1) - e_j through the taps in reversed order, for u < ``count``."""
    taps = [t for t in range(r) if (t * d) % st == a]
    count = max(0, -(-(n_pad - a) // st))
    if not taps or not count:
        return taps, count, 0, 0, 1
    e = [(t * d - a) // st for t in taps]
    de = e[1] - e[0] if len(e) > 1 else 1
    before = e[-1]
    after = count + (len(taps) - 1) * de - n_out - before
    return taps, count, before, after, de


def _grad_input_by_phases(gy, w, p):
    """Stride > 1 (finite weights, not depthwise): the transposed convolution split by the phase of
    the input position (``ih % sh``, ``iw % sw``).  Each phase receives only the taps whose offset
    has that phase, and for those it is a stride-1 correlation of ``gy`` with the flipped,
    channel-swapped sub-kernel -- the forward kernel's work (register-blocked) instead of a strided
    scatter (resnet50-3x3-s2: 325 -> 37 ms).  Every input position gets each of its terms once."""
    gyc = np.ascontiguousarray(gy)
    gxp = np.zeros((p.n, p.c, p.hp, p.wp), dtype=p.dtype)
    wg = np.asarray(w).reshape(p.g, p.kg, p.cg, p.r, p.s).transpose(0, 2, 1, 3, 4)  # (g, cg, kg, r, s)
    # only phases that some tap falls on (at most r x s of the sh x sw; the others stay zero)
    for a in sorted({(t * p.dh) % p.sh for t in range(p.r)}):
        rows, nu, top, bottom, deh = _phase_taps(a, p.sh, p.dh, p.r, p.oh, p.hp)
        if not rows or not nu:
            continue
        for b in sorted({(t * p.dw) % p.sw for t in range(p.s)}):
            cols, nv, left, right, dew = _phase_taps(b, p.sw, p.dw, p.s, p.ow, p.wp)
            if not cols or not nv:
                continue
            sub = wg[:, :, :, rows[::-1], :][:, :, :, :, cols[::-1]]
            sub = np.ascontiguousarray(sub).reshape(p.c, p.kg, len(rows), len(cols))
            gxp[:, :, a::p.sh, b::p.sw] = _conv(gyc, top, bottom, left, right, sub, None, 1, 1, deh, dew,
                                                p.g, nu, nv)
    return np.ascontiguousarray(gxp[:, :, p.ph0:p.ph0 + p.h, p.pw0:p.pw0 + p.w])


def grad_weight(gy, x, p):
    if _depthwise(p):
        wq = -(-p.wp // p.sw)
        _, tb = _taps(1, p.r, p.s, p.dh, p.dw, p.sw, p.hp, wq)
        gw = np.empty((p.k, p.r * p.s), dtype=p.dtype)
        if p.k:
            _dw_grad_weight(np.ascontiguousarray(gy), np.ascontiguousarray(x), tb, gw, p.sw, p.hp, wq,
                            p.ph0, p.pw0, p.sh, p.dh, p.r == 3 and p.s == 3 and p.sh == 1 and p.sw == 1 and p.dw == 1,
                            p.dtype.type(0))
        return gw.reshape(p.w_shape)
    hp, wq = p.hp, -(-p.wp // p.sw)
    tc, tb = _taps(p.cg, p.r, p.s, p.dh, p.dw, p.sw, hp, wq)
    tn = p.cg * p.r * p.s
    nch = min(p.n, _IMG_PARTS)
    plane, gplane = p.sw * hp * wq + SLACK, p.oh * wq + SLACK
    # parallel over images only (groups are summed inside an item): needs many images, not items
    if (p.n >= _IMG_MIN_ITEMS and _per_image(p.n, p.g, p.cg, plane, p.itemsize)
            and p.kg * gplane * p.itemsize <= _IMG_MAX_BYTES and nch * p.k * tn * p.itemsize <= _IMG_MAX_PART):
        part = np.zeros((nch, p.k, tn), dtype=p.dtype)
        _grad_weight_img(np.ascontiguousarray(gy), np.ascontiguousarray(x), tc, tb, part, p.sw, hp, wq,
                         p.ph0, p.pw0, p.sh, p.g, p.dtype.type(0), *_workers(nch))
        gw = part[0]
        for i in range(1, nch):  # in order: the result depends on the shape only
            gw += part[i]
        return np.ascontiguousarray(gw).reshape(p.w_shape)
    xq, hp, wq, finite = pad_planes(x, p.ph0, p.ph1, p.pw0, p.pw1, p.sw, check_finite=p.sh == 1)
    if p.sh == 1 and finite:
        # one contiguous run per image: gy laid out with the plane's row pitch, zeros between rows
        g2, _, _, _ = pad_planes(gy, 0, 0, 0, wq - p.ow)
        seg_g = np.zeros(1, np.int64)
        seg_x = np.zeros(1, np.int64)
        ln = (p.oh - 1) * wq + p.ow
        seg_len = np.array([ln + (-ln) % 16], np.int64)  # zeros pad gy to whole vectors (SLACK)
    else:
        g2 = np.ascontiguousarray(gy).reshape(p.n, p.k, p.oh * p.ow)
        rows = np.arange(p.oh, dtype=np.int64)
        seg_g, seg_x = rows * p.ow, rows * p.sh * wq
        seg_len = np.full(p.oh, p.ow, np.int64)
    gw = np.empty((p.k, p.cg * p.r * p.s), dtype=p.dtype)
    _grad_weight(g2, xq, tc, tb, gw, seg_g, seg_x, seg_len, p.g, p.dtype.type(0))
    return gw.reshape(p.w_shape)


def supports(p, pass_):
    """The direct loop nest serves every geometry."""
    return None


def cost(p, pass_, threads):
    """Work model in nominal seconds: a per-call floor plus multiply-accumulates at 8 GMAC/s, slowed
    where the inner loop is short (rows under 64 lanes waste vector lanes) or the grad_input scatter
    is strided.  ``fastconv._select`` scales it to this machine (``_calibration.json``)."""
    inner = p.ow if (pass_ == "grad_input" and (p.sh != 1 or p.sw != 1)) else min(p.oh * p.wp, 512)
    eff = min(1.0, inner / 64.0) * (1.0 if p.sw == 1 or pass_ != "grad_input" else 0.3)
    return 2e-5 + p.macs / (8e9 * max(eff, 0.05))
