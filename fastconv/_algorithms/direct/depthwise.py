"""Depthwise kernels of the direct algorithm (one input and one output channel per group)."""
import numpy as np
from numba import prange

from ..._jit import RUN_PAIR, kernel, round_run
from ..common import SLACK, claim
from .blocks import _copy, _fill_plane, _mac1x1, _mac1x4, _micro

_DW_RB = 8        # output rows per depthwise forward block (stride 1): small, so row copies overlap


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
    lmax = round_run(lmax, RUN_PAIR)
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
                ln = round_run(ln, RUN_PAIR)
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


@kernel
def _dw_same3x3(x, wt, b, y, nw, ctr, zero):
    """Depthwise 3x3 forward, stride 1, dilation 1, padding 1 (the output is the input's size):
    one work item per plane.  Rows 1..h-2 are one flat run straight from the input plane into the
    output plane (tap (r, q) of flat output k reads flat input k + (r-1)*w + q-1): no padded copy
    and no copy out, which with rows of 56 took half of the padded kernel's time.  The run's
    outputs in columns 0 and w-1 read wrapped neighbours; they, and rows 0 and h-1, are then
    written from zero-padded taps (the two rows through a 3-row padded scratch, vectorised)."""
    nn, cc, h, w = x.shape
    items = nn * cc
    wq = w + 2
    for wid in prange(nw):
        eb = np.zeros(3 * wq + SLACK, dtype=y.dtype)  # padding columns stay zero
        acc = np.empty(round_run(w, RUN_PAIR), dtype=y.dtype)
        for _ in range(items):
            it = claim(ctr)
            if it >= items:
                break
            n, c = it // cc, it % cc
            xs, ys = x[n, c], y[n, c]
            xf, yf = xs.reshape(h * w), ys.reshape(h * w)
            bias = b[c]
            ln = (h - 2) * w - 2  # outputs (1, 1) .. (h-2, w-2) and the wrapped edges between
            _dw3x3(yf[w + 1:w + 1 + ln], xf, 0, w, wt, c, bias, ln)
            # columns 0 and w-1 of rows 1..h-2: the taps past the edge read zeros (their products,
            # 0 * w, are NaN for an infinite weight, as in the padded kernels), in _dw3x3's order
            w0, w1, w2, w3, w4, w5 = wt[c, 0], wt[c, 1], wt[c, 2], wt[c, 3], wt[c, 4], wt[c, 5]
            w6, w7, w8 = wt[c, 6], wt[c, 7], wt[c, 8]
            for i in range(1, h - 1):
                a, m, d = xs[i - 1], xs[i], xs[i + 1]
                ys[i, 0] = (bias + w0 * zero + w1 * a[0] + w2 * a[1] + w3 * zero + w4 * m[0] + w5 * m[1]
                            + w6 * zero + w7 * d[0] + w8 * d[1])
                ys[i, w - 1] = (bias + w0 * a[w - 2] + w1 * a[w - 1] + w2 * zero + w3 * m[w - 2] + w4 * m[w - 1]
                                + w5 * zero + w6 * d[w - 2] + w7 * d[w - 1] + w8 * zero)
            for i in (0, h - 1):
                for r in range(3):  # padded rows i-1..i+1 into the scratch
                    ii = i + r - 1
                    row = eb[r * wq + 1:r * wq + 1 + w]
                    if 0 <= ii < h:
                        _copy(row, xs[ii], w)
                    else:
                        row[:] = zero
                _dw3x3(acc, eb, 0, wq, wt, c, bias, w)
                _copy(ys[i], acc, w)


@_micro
def _dots9(tot, g0, g1, g2, x, pitch, ln, zero):
    # tot[3r + q] += the dot of the gradient run g_q with the input run at r*pitch + q, 3x3 taps: a
    # pure reduction (no stores), so LLVM vectorises it without alias checks.  Nine slices, each
    # read at j: read as x[j], x[j + 1], x[j + 2] of three, LLVM built the shifted vectors by
    # shuffles with spills (a 56x56 plane: 1.9 us against 1.1 here)
    x0, x1, x2 = x[0:ln], x[1:1 + ln], x[2:2 + ln]
    x3, x4, x5 = x[pitch:pitch + ln], x[pitch + 1:pitch + 1 + ln], x[pitch + 2:pitch + 2 + ln]
    x6, x7, x8 = x[2 * pitch:2 * pitch + ln], x[2 * pitch + 1:2 * pitch + 1 + ln], x[2 * pitch + 2:2 * pitch + 2 + ln]
    s0 = s1 = s2 = s3 = s4 = s5 = s6 = s7 = s8 = zero
    for j in range(ln):
        a, b, d = g0[j], g1[j], g2[j]
        s0 += a * x0[j]
        s1 += b * x1[j]
        s2 += d * x2[j]
        s3 += a * x3[j]
        s4 += b * x4[j]
        s5 += d * x5[j]
        s6 += a * x6[j]
        s7 += b * x7[j]
        s8 += d * x8[j]
    tot[0] += s0
    tot[1] += s1
    tot[2] += s2
    tot[3] += s3
    tot[4] += s4
    tot[5] += s5
    tot[6] += s6
    tot[7] += s7
    tot[8] += s8


@_micro
def _dw_same_dots(tot, xs, gs, gl, gr, zero):
    # tot[3r + q] += sum over the plane of g(i, j) * x(i + r - 1, j + q - 1), 3x3 'same', finite
    # planes: rows 1..h-2 as one flat run of nine dots straight from the planes; the run's wrapped
    # taps (q = 0 at column 0, q = 2 at column w-1) meet zeros in gl / gr (copies of g with that
    # column zeroed), rows 0 and h-1 and the run's two end positions separately
    h, w = xs.shape
    xf, gf = xs.reshape(h * w), gs.reshape(h * w)
    _copy(gl, gf, h * w)
    _copy(gr, gf, h * w)
    for i in range(h):
        gl[i * w] = zero
        gr[i * w + w - 1] = zero
    base = w + 1
    ln = (h - 2) * w - 2
    _dots9(tot, gl[base:base + ln], gf[base:base + ln], gr[base:base + ln], xf, w, ln, zero)
    # the run's ends: (1, 0) without its q = 0 taps, (h-2, w-1) without its q = 2 taps
    k0, k1 = w, (h - 1) * w - 1
    for r in range(3):
        tot[3 * r + 1] += gf[k0] * xf[k0 + (r - 1) * w]
        tot[3 * r + 2] += gr[k0] * xf[k0 + (r - 1) * w + 1]
        tot[3 * r] += gl[k1] * xf[k1 + (r - 1) * w - 1]
        tot[3 * r + 1] += gf[k1] * xf[k1 + (r - 1) * w]
    # rows 0 and h-1, with the kernel rows that stay inside the plane
    for gi in (0, h - 1):
        g = gs[gi]
        for r in range(3):
            xi = gi + r - 1
            if xi < 0 or xi >= h:
                continue
            xr = xs[xi]
            t0 = t1 = t2 = zero
            for j in range(1, w):
                t0 += g[j] * xr[j - 1]
            for j in range(w):
                t1 += g[j] * xr[j]
            for j in range(w - 1):
                t2 += g[j] * xr[j + 1]
            tot[3 * r] += t0
            tot[3 * r + 1] += t1
            tot[3 * r + 2] += t2


@kernel
def _dw_grad_weight(gy, x, tb, gw, sw, hp, wq, top, left, sh, dh, fast, same, zero):
    """Depthwise grad_weight: one work item per channel; each of its planes is padded into a
    private buffer.  ``fast`` (3x3, stride 1, dw == 1) and a finite plane: the gradient plane is
    copied with the input's row pitch (zeros between rows) and each tap is one dot over the whole
    plane.  Otherwise (a garbage column times a zero gradient is NaN where the input holds Inf)
    every output row adds ``g * input`` of all taps into per-column partial sums.  ``same`` (3x3
    'same', stride 1, planes of 3 rows and columns or more), finite input and gradient planes:
    nine dots straight from the two planes (:func:`_dw_same_dots`), no padded copy.  Sums run over
    the batch in a fixed order into float64: independent of the thread count."""
    nn, kk_, oh, ow = gy.shape
    tn = tb.shape[0]
    ln = (oh - 1) * wq + ow
    ln = round_run(ln, RUN_PAIR)
    for c in prange(kk_):
        buf = np.zeros(sw * hp * wq + SLACK, dtype=gy.dtype)
        gb = np.zeros(ln, dtype=gy.dtype) if fast else np.zeros(0, dtype=gy.dtype)
        pa = np.empty((tn, ow), dtype=gy.dtype)
        tot = np.zeros(tn, dtype=np.float64)
        hw = x.shape[2] * x.shape[3] if same else 0
        gl, gr = np.empty(hw, dtype=gy.dtype), np.empty(hw, dtype=gy.dtype)
        for n in range(nn):
            if same:
                xf, gf = x[n, c].reshape(hw), gy[n, c].reshape(hw)
                nf = zero
                for j in range(hw):
                    nf += xf[j] * 0 + gf[j] * 0
                if nf == 0:
                    _dw_same_dots(tot, x[n, c], gy[n, c], gl, gr, zero)
                    continue
            _fill_plane(x[n, c], buf, sw, hp, wq, top, left, 0, hp)
            if fast:
                nf = zero
                for j in range(buf.shape[0]):
                    nf += buf[j] * 0
                if nf == 0:
                    for i in range(oh):
                        _copy(gb[i * wq:i * wq + ow], gy[n, c, i], ow)
                    _dots9(tot, gb, gb, gb, buf, dh * wq, ln, zero)
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


