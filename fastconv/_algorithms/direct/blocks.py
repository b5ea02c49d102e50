"""Micro-kernels of the direct algorithm (register blocks, dot products, row copies), inlined
into its parallel kernels."""
import numpy as np
from numba import literally

from ..._jit import BOUNDSCHECK, micro, round_run, RUN_VECTOR, serial, VECTOR_BYTES
from ..common import SLACK, copy_vector, mac_taps

_FWD_TILE = 8192  # elements of the forward accumulator (channels x row-block run): stays in L1/L2
_FWD_KB = 8       # output channels per forward work item

# Micro-kernels: serial, uncached, compiled into the calling parallel kernel.
_micro = micro


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


@serial  # not inlined: literally() needs its own typing
def _mac_run(acc, q, xv, base, offs, wt, k0, b, ln, lanes, nq):
    """Rows q .. q+nq-1 of ``acc`` over a run of ln positions (a multiple of lanes): mac_taps
    blocks of 3 vectors, then single vectors; ``nq`` a literal (one compiled copy per value)."""
    nql = literally(nq)
    # blocks of 3 vectors, the last 4 or 2 as blocks of 2: a lone vector keeps only nq sums in
    # flight, half of what the two FMA units need over their 4-cycle latency (lenet5-c3's 13
    # vectors: 3+3+3+2+2 instead of 3+3+3+3+1, 26 instead of 28 cycles a tap)
    nvec = ln // lanes
    n3 = nvec // 3 if nvec % 3 != 1 or nvec < 4 else nvec // 3 - 1
    j = 0
    for _ in range(n3):
        mac_taps(acc, q, j, xv, base + j, offs, wt, k0 + q, b, offs.shape[0], nql, 3)
        j += 3 * lanes
    while j + 2 * lanes <= ln:
        mac_taps(acc, q, j, xv, base + j, offs, wt, k0 + q, b, offs.shape[0], nql, 2)
        j += 2 * lanes
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
    ln = min(round_run(ln, RUN_VECTOR), ln + SLACK)
    lanes = VECTOR_BYTES // y.itemsize  # ln is a multiple of RUN_VECTOR, so of lanes
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
    if wq == ow:  # rows back to back in acc as in y's plane: one copy per channel, not per row
        m = (i1 - i0) * ow
        for q in range(nk):
            _copy(y[n, k0 + q].reshape(-1)[i0 * ow:i0 * ow + m], acc[q, :m], m)
    else:
        for q in range(nk):
            for i in range(i0, i1):
                _copy(y[n, k0 + q, i], acc[q, (i - i0) * wq:(i - i0) * wq + ow], ow)


@_micro
def _fwd_geometry(y, c, g, kb, rb, wq):
    """Channels per group (in, out), channel and row blocks, and the accumulator width of a forward."""
    kk_, oh, ow = y.shape[1], y.shape[2], y.shape[3]
    kg = kk_ // g
    return c // g, kg, (kg + kb - 1) // kb, (oh + rb - 1) // rb, (min(rb, oh) - 1) * wq + ow + 16



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
    # A row with no zeros on either side is copied as whole vectors (copy_vector), the last one
    # running past the row into the next rows (copied after it) or the SLACK: lenet5-c3's 10-wide
    # rows went element by element, and the 30 shifted planes of an image then cost a third of
    # its arithmetic.  Never where the spill would reach a zero row or the read leave the plane.
    h, w = src.shape
    lanes = VECTOR_BYTES // bufs.itemsize
    for s in range(bufs.shape[0]):
        d = bufs[s]
        j0 = max(0, left - s * dw)
        j1 = min(ow, w + left - s * dw)
        if j1 <= j0:
            continue
        c0 = j0 + s * dw - left
        i_hi = min(hp, h + top)
        wide = j0 == 0 and j1 == ow
        nv = (ow + lanes - 1) // lanes
        for i in range(max(0, top), i_hi):
            so = (i - top) * w + c0
            end = i * ow + nv * lanes  # the copy's end: inside the rows copied after this one, or
            # past the plane's last row into the SLACK (never into zero rows of the bottom padding)
            if (wide and so + nv * lanes <= h * w
                    and (end <= i_hi * ow or (i_hi == hp and end <= d.shape[0]))):
                if BOUNDSCHECK:
                    _ = src.reshape(-1)[so + nv * lanes - 1] + d[i * ow + nv * lanes - 1]
                for v in range(nv):
                    copy_vector(d, i * ow + v * lanes, src, so + v * lanes)
            else:
                _copy(d[i * ow + j0:i * ow + j1], src[i - top, c0:c0 + j1 - j0], j1 - j0)


