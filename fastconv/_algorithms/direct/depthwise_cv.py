"""Channel-vectorised depthwise kernels of the direct algorithm, used for strided layers.

The plane-wise depthwise kernels (:mod:`.depthwise`) run along output rows, so their vector loops
are ``ow`` lanes long: on MobileNet's 12x12 .. 3x3 planes, and at stride 2 where they read one
phase of a row, a plane cost 1-2 us whatever its size (16x64x24x24 3x3/s2 forward 1.79 ms against
PyTorch's 0.20 channels_last, AVX2 EPYC, 2 threads).  Here a work item is one image and a block of
``cb`` channels (two vectors of the dtype): its planes are copied into a zero-padded buffer with
the channels innermost and the columns split by their phase ``col % sw``
(``buf[((col % sw)*hp + row)*wq + col // sw)*cb + cc]``), so that for one tap and one output row
the ``ow`` outputs' ``cb`` channels read one contiguous run of ``ow*cb`` elements: each tap is a
vector loop that long against a row of the tap's weights repeated ``ow`` times, whatever the
stride, dilation or plane size; the result goes back to NCHW planes.  (One ``cb``-lane loop per
output and tap instead ran 10x slower than the plane-wise kernels: LLVM re-checked aliasing for
every 16-lane loop.)  Still 4-6x slower than PyTorch's channels_last depthwise on MobileNet's
stride-2 layers (16x64x24x24: 1.3 ms against 0.2).  The NCHW <-> channels-innermost copies were
a third of a 16x256x6x6 forward when they stored one element per cache line (plane by plane):
they now go position by position, the block's channels together (forward 0.50 -> 0.38 ms,
backward 0.85 -> 0.69; 16x64x48x48 stride 2: 2.4 / 4.5 -> 2.1 / 3.8), and items run channel
block by channel block so that a worker rebuilds its weight rows only when the block changes.

* forward: ``y[n, c, i, j] = b[c] + sum_t w[c, t] * x_pad[n, c, i*sh + r*dh, j*sw + s*dw]``;
* grad_input: the scatter of ``w[c, t] * gy[n, c, i, j]`` onto the padded positions the forward
  read (only real terms are summed, as PyTorch's: a NaN weight meets no zero of gy's padding),
  then the unpadded part;
* grad_weight: items are channel blocks that go through the batch in order (the same bits for
  any thread count), ``gw[c, t] = sum_{n,i,j} gy[n, c, i, j] * x_pad[...]``.

Weights and bias come in as ``(taps, cpad)`` / ``(cpad,)`` arrays, zero past ``c`` (cpad a multiple of
``cb``), so a last partial block computes harmless zeros in its spare lanes.
"""
import numpy as np
from numba import prange

from ..._jit import kernel, micro
from ..common import claim

_u = np.uint64


@micro
def _load_block(src, nn, c0, nc, cb, buf, top, left, hp, wq, sw):
    # buf[((col % sw)*hp + row)*wq + col // sw)*cb + cc] = src[nn, c0 + cc, row - top, col - left]
    # (phase by phase: a division per element cost more than the convolution; offsets, not views:
    # a view in a prange body is an atomic reference count update that the workers fight over)
    # the channels innermost here too: each position's cb lanes are stored together, one line,
    # while the nc planes are read in step (the other order stored one element per line)
    h, w = src.shape[2], src.shape[3]
    sf = src.reshape(src.size)
    hw = h * w
    for ph in range(sw):
        j0 = (ph - left) % sw
        q0 = (j0 + left) // sw
        for i in range(h):
            so = ((nn * src.shape[1] + c0) * h + i) * w
            d = ((ph * hp + i + top) * wq + q0) * cb
            for j in range(j0, w, sw):
                for cc in range(nc):
                    buf[d + cc] = sf[so + cc * hw + j]
                d += cb


@micro
def _store_block(out, cb, dst, nn, c0, nc, top, left, hp, wq, sw):
    # dst[nn, c0 + cc, i, j] = out at padded position (i + top, j + left) in _load_block's layout
    h, w = dst.shape[2], dst.shape[3]
    df = dst.reshape(dst.size)
    hw = h * w
    for ph in range(sw):
        j0 = (ph - left) % sw
        q0 = (j0 + left) // sw
        for i in range(h):
            do = ((nn * dst.shape[1] + c0) * h + i) * w
            o = ((ph * hp + i + top) * wq + q0) * cb
            for j in range(j0, w, sw):
                for cc in range(nc):
                    df[do + cc * hw + j] = out[o + cc]
                o += cb


@micro
def _tap_rows(wt, c0, cb, ow, wrow):
    # wrow[t*ow*cb + j*cb + cc] = wt[t, c0 + cc]: each tap's weights for the block, once per output column
    for t in range(wt.shape[0]):
        for j in range(ow):
            for cc in range(cb):
                wrow[(t * ow + j) * cb + cc] = wt[t, c0 + cc]


@micro
def _tap_offset(t, s, i, sh, sw, dh, dw, hp, wq, cb):
    # start of tap t's run for output row i in _load_block's layout
    rr = t // s
    col = (t - rr * s) * dw
    q = col // sw
    return (((col - q * sw) * hp + i * sh + rr * dh) * wq + q) * cb


@kernel
def dwc_forward(x, wt, bb, y, ph0, pw0, hp, wq, sh, sw, dh, dw, s, cb, nw, ctr):
    n, c = x.shape[0], x.shape[1]
    oh, ow = y.shape[2], y.shape[3]
    taps = wt.shape[0]
    ncb = (c + cb - 1) // cb
    items = n * ncb
    ln = ow * cb
    for wid in prange(nw):
        buf = np.zeros(sw * hp * wq * cb, dtype=y.dtype)  # the padding stays zero: items write the interior
        out = np.empty(oh * ln, dtype=y.dtype)
        wrow = np.empty(taps * ln, dtype=y.dtype)
        last = -1
        for _ in range(items):
            it = claim(ctr)
            if it >= items:
                break
            cbi = it // n  # channel blocks outer: a worker's next item mostly has the same weights
            c0, nn = cbi * cb, it - cbi * n
            nc = min(cb, c - c0)
            _load_block(x, nn, c0, nc, cb, buf, ph0, pw0, hp, wq, sw)
            if c0 != last:
                _tap_rows(wt, c0, cb, ow, wrow)
                last = c0
            for i in range(oh):
                o = _u(i * ln)
                for j in range(ow):
                    for cc in range(cb):
                        out[o + j * cb + cc] = bb[c0 + cc]
                for t in range(taps):
                    so = _u(_tap_offset(t, s, i, sh, sw, dh, dw, hp, wq, cb))
                    wo = _u(t * ln)
                    for q in range(_u(ln)):
                        out[o + q] += wrow[wo + q] * buf[so + q]
            _store_block(out, cb, y, nn, c0, nc, 0, 0, oh, ow, 1)


@kernel
def dwc_grad_input(gy, wt, gx, ph0, pw0, hp, wq, sh, sw, dh, dw, s, cb, nw, ctr):
    n, c = gx.shape[0], gx.shape[1]
    oh, ow = gy.shape[2], gy.shape[3]
    taps = wt.shape[0]
    ncb = (c + cb - 1) // cb
    items = n * ncb
    ln = ow * cb
    for wid in prange(nw):
        acc = np.empty(sw * hp * wq * cb, dtype=gx.dtype)
        g = np.zeros(oh * ln, dtype=gx.dtype)
        wrow = np.empty(taps * ln, dtype=gx.dtype)
        last = -1
        for _ in range(items):
            it = claim(ctr)
            if it >= items:
                break
            cbi = it // n  # channel blocks outer, as in dwc_forward
            c0, nn = cbi * cb, it - cbi * n
            nc = min(cb, c - c0)
            acc[:] = 0
            _load_block(gy, nn, c0, nc, cb, g, 0, 0, oh, ow, 1)
            if c0 != last:
                _tap_rows(wt, c0, cb, ow, wrow)
                last = c0
            for i in range(oh):
                go = _u(i * ln)
                for t in range(taps):
                    do = _u(_tap_offset(t, s, i, sh, sw, dh, dw, hp, wq, cb))
                    wo = _u(t * ln)
                    for q in range(_u(ln)):
                        acc[do + q] += wrow[wo + q] * g[go + q]
            _store_block(acc, cb, gx, nn, c0, nc, ph0, pw0, hp, wq, sw)


@kernel
def dwc_grad_weight(gy, x, gwt, ph0, pw0, hp, wq, sh, sw, dh, dw, s, cb, nw, ctr):
    # gwt (taps, cpad): written here, channel block by channel block
    n, c = x.shape[0], x.shape[1]
    oh, ow = gy.shape[2], gy.shape[3]
    taps = gwt.shape[0]
    ncb = (c + cb - 1) // cb
    ln = ow * cb
    for wid in prange(nw):
        buf = np.zeros(sw * hp * wq * cb, dtype=x.dtype)
        g = np.zeros(oh * ln, dtype=x.dtype)
        acc = np.empty(taps * ln, dtype=x.dtype)  # per tap, per output column: summed at the end
        for _ in range(ncb):
            it = claim(ctr)
            if it >= ncb:
                break
            c0 = it * cb
            nc = min(cb, c - c0)
            acc[:] = 0
            for nn in range(n):
                _load_block(x, nn, c0, nc, cb, buf, ph0, pw0, hp, wq, sw)
                _load_block(gy, nn, c0, nc, cb, g, 0, 0, oh, ow, 1)
                for t in range(taps):
                    ao = _u(t * ln)
                    for i in range(oh):
                        so = _u(_tap_offset(t, s, i, sh, sw, dh, dw, hp, wq, cb))
                        go = _u(i * ln)
                        for q in range(_u(ln)):
                            acc[ao + q] += g[go + q] * buf[so + q]
            for t in range(taps):
                for cc in range(cb):
                    v = acc[t * ln + cc]
                    for j in range(1, ow):
                        v += acc[t * ln + j * cb + cc]
                    gwt[t, c0 + cc] = v
