"""FFT convolution: forward, grad_input and grad_weight through spectra, for large kernels.

Notation: n c h w input; k r s weight (cg = c/g, kg = k/g per group g); oh ow output; sh sw stride;
dh dw dilation; eh = dh*(r-1), ew = dw*(s-1) the dilated kernel's extent minus one; nh nw the FFT
size of one tile, wf = nw//2 + 1 its half-spectrum width; u, v frequency row and column.

Method (all three passes are circular correlations/convolutions at a size with no wrap-around on
the outputs that are kept):

* forward: ``Y = X * conj(W)`` per frequency, summed over the group's input channels, where ``X``
  is the real 2-D FFT of a (tile of the) zero-padded input and ``W`` the kernel's DFT with the
  dilation folded into the twiddles; inverse FFT, then every ``sh``-th row / ``sw``-th column of
  the tile is kept.  Stride is *compute then subsample*: the work is that of stride 1, so a stride
  of 2 wastes ~3/4 of it (``cost`` charges it, and ``'auto'`` then prefers another algorithm).
* grad_input: ``GX = GYup * W`` (GYup: spectrum of grad_output spread out by the stride), summed
  over the group's output channels: the transpose of the forward correlation, not a fallback.
* grad_weight: ``Z = X * conj(GYup)`` summed over the batch, then the inverse transform evaluated
  only at the ``r x s`` dilated tap positions.

Kernel spectra are never materialised for the whole frequency plane: the DFT along ``s`` (a few
``wf x s`` products per kernel, :func:`_kernel_rows`) is done first, and the DFT along ``r`` is
evaluated per frequency inside the contraction kernel, right before the channel sum uses it
(r/4 complex multiply-adds per (c, k) and frequency after one radix-4 step over the rows u,
u + nh/4, u + nh/2, u + 3nh/4 -- cheaper than an FFT of a mostly-zero plane, and it keeps the
spectra in cache).  grad_weight does the same in reverse (:func:`_spectral_wgrad`,
:func:`_wgrad_rows`).  Nothing is cached between calls: weights change every training step.

FFT library: scipy's pocketfft called from Python with numba's thread count as workers, on
channels-last buffers ``(nh, nw, batch, channels)`` so the 2-D transforms over axes (0, 1) come out
frequency-major, as the contraction reads them.  Measured against rocket-fft 0.4.1 (FFTs inside
``@njit(parallel=True)``, one plane per prange iteration), single-thread CPU time on the 2-core
EPYC (AVX2) box (load-independent), forward / inverse real 2-D transforms:

    512 planes 64x64  float32: rocket-fft 5.4 / 6.0 ms, scipy 6.1 / 5.6 ms
    64 planes 80x80   float32: rocket-fft 0.8 / 0.8 ms, scipy 1.0 / 1.0 ms
    512 planes 64x64  float64: rocket-fft 7.8 / 8.2 ms, scipy 12.1 / 16.0 ms

Transforms were ~15-20% of a float32 pass when that was decided, so rocket-fft would have saved
~2-3% in float32 and ~10% in float64.  Since the contraction loops got faster (float32 arithmetic,
wider register blocking) they are more: convnet-L2-9x9 forward at 2 threads spent ~44 ms in the
contraction and ~35 ms in irfft2 of ~112 ms.  Re-measured (2026-11-26): most of that "irfft2" was
page faults -- every call's fresh 17 MB outputs and scipy's internal temporary were faulted in at
~2.6 us per 4 KiB page on the development VM (5,400 faults per forward).  The transforms now run
through pocketfft's own binding (``scipy.fft._pocketfft.pypocketfft``: ``r2c``/``c2c``/``c2r`` with
``out=``; the public functions when it is missing) into per-thread buffers kept between calls
(:func:`fastconv._config.scratch`): convnet-L2's forward went from ~105 to ~57 ms.  Every parallel
kernel holding a rocket-fft call costs 3-6 s of cold compilation per dtype (measured: 5.6 s for an
rfft2 kernel, 2.8 s for irfft2; an earlier rocket-fft version of this module took ~150 s cold).  With scipy the
numba kernels here hold no FFT: cold compilation of all passes is ~16-18 s per dtype (34 s for
both, measured with an empty NUMBA_CACHE_DIR, bias gradient included; 0.4 s from a warm cache).

Memory: the work is cut into spatial tiles (overlap-save: each output tile reads its input tile
plus the kernel's halo), batch chunks and output-channel chunks so that the buffers and spectra of
one step stay under ``p.workspace_limit`` bytes (:func:`_plan`); when even the smallest tiling
cannot fit, :func:`supports` says so.

Accuracy: the error of a transform-based convolution is relative to the *norms* of the planes,
not to each output.  Stated and tested (tests/test_fft.py, float32 and float64, inputs with
magnitudes spread over 1e-4..1e4 included), for every output element of image n / channel k:

    |y - y_exact| <= eps * log2(nh*nw) * sum_c ||x[n, c]||_2 * ||w[k, c]||_2  (+ eps*|y| for the bias)

with ``eps`` the dtype's machine epsilon and the sum over the group's input channels; likewise
grad_input with ``||gy[n, k]|| * ||w[k, c]||`` summed over k, and grad_weight with
``||gy[n, k]|| * ||x[n, c]||`` summed over n.  Measured worst ratio to the bound: 0.25 on the small
test cases, 0.002-0.013 on 64x64 planes (bigkernel-15x15, convnet-L2-9x9 shapes), where the
largest error is ~3e-7 of the largest output in float32 and ~1e-15 in float64.  A small output
next to large ones is therefore *not* accurate to its own relative precision (unlike the direct
method): inputs with a wide dynamic range lose the small outputs' digits, in float32 all of them
when the plane's norm is 1e7 times the output.

NaN and Inf: a non-finite value anywhere in an input tile turns the whole corresponding output
tile NaN (for every output channel of that image; a non-finite weight makes every output of its
channel NaN), because every frequency mixes every position.  PyTorch (and the direct algorithm)
only poison the windows that touch the value.  With one tile per plane (the usual case) that is the
whole output plane.
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple, Optional

import numba
import numpy as np
import scipy.fft as sfft
from numba import prange

from .._config import scratch
from .._jit import FASTMATH, kernel

try:  # pocketfft's own binding (inside scipy) takes out=: transforms then write into reused buffers
    from scipy.fft._pocketfft import pypocketfft as _pocket
except ImportError:  # pragma: no cover - other scipy layouts: the public functions (fresh outputs)
    _pocket = None

# Serial, uncached helper linked into the calling parallel kernels (and stored in their cache
# entries): never a cached kernel calling another cached kernel (numba issue 8578,
# shared/NUMBA_NOTES.md).  Not inlined: inlining it into both kernels cost more compile time.
_inline = numba.njit(fastmath=FASTMATH, nogil=True)


# --------------------------------------------------------------------------- kernels
@kernel
def _pack(src, buf, n0, c0, off_h, up_h, lo_h, hi_h, off_w, up_w, lo_w, hi_w):
    # buf[bh, bw, n, c] = src[n0 + n, c0 + c, (off_h + bh) / up_h, (off_w + bw) / up_w] where the
    # division is exact and the row lies in [lo_h, hi_h) (column in [lo_w, hi_w)), else 0.
    # (Explicit loops, no slice assignments: each array expression in a prange body becomes a
    # nested parfor that costs compile time.)
    nh, nw, nb, cc = buf.shape
    for bh in prange(nh):
        t = off_h + bh
        row = t // up_h
        live = t % up_h == 0 and row >= lo_h and row < hi_h
        for bw in range(nw):
            tw = off_w + bw
            col = tw // up_w
            ok = live and tw % up_w == 0 and col >= lo_w and col < hi_w
            for n in range(nb):
                for c in range(cc):
                    buf[bh, bw, n, c] = src[n0 + n, c0 + c, row, col] if ok else 0


@kernel
def _unpack(buf, out, n0, c0, o0h, o1h, o0w, o1w, b0h, b0w, st_h, st_w, bias):
    # out[n0 + n, c0 + c, i, j] = buf[b0h + (i - o0h)*st_h, b0w + (j - o0w)*st_w, n, c] + bias[c0 + c]
    # (indices are taken modulo the buffer size: grad_input's whole-plane tiles read circularly)
    nh, nw, nb, cc = buf.shape
    for i in prange(o0h, o1h):
        bh = (b0h + (i - o0h) * st_h) % nh
        for j in range(o0w, o1w):
            bw = (b0w + (j - o0w) * st_w) % nw
            for n in range(nb):
                for c in range(cc):
                    out[n0 + n, c0 + c, i, j] = buf[bh, bw, n, c] + bias[c0 + c]


@kernel
def _kernel_rows(wt, ew, t):
    # t[v, r, 0/1, j] = sum_s wt[r, s, j] * (cos, sin)(2 pi v s dw / nw): the DFT along s of every
    # kernel row, j = c*kb + k; ew[v, s, 0/1] holds the twiddles
    wf, rr = t.shape[0], t.shape[1]
    ss, m = wt.shape[1], wt.shape[2]
    for v in prange(wf):
        for r in range(rr):
            tr = t[v, r, 0]
            ti = t[v, r, 1]
            for j in range(m):
                tr[j] = 0
                ti[j] = 0
            for s in range(ss):
                cr, ci = ew[v, s, 0], ew[v, s, 1]
                x = wt[r, s]
                for j in range(m):
                    tr[j] += cr * x[j]
                    ti[j] += ci * x[j]


@_inline
def _butterfly(ar, ai, nsub, ln):
    # In place on rows 0..nsub-1 of (ar, ai): row j <- sum_m i^(j*m) * row m, for nsub = 1, 2 or 4
    # (the last radix-2/radix-4 step of a DFT; see _spectral_conv).
    if nsub == 2:
        for j in range(ln):
            pr, pim, mr, mim = ar[0, j], ai[0, j], ar[1, j], ai[1, j]
            ar[0, j] = pr + mr
            ai[0, j] = pim + mim
            ar[1, j] = pr - mr
            ai[1, j] = pim - mim
    elif nsub == 4:
        for j in range(ln):
            ar_, ai_ = ar[0, j] + ar[2, j], ai[0, j] + ai[2, j]
            br, bi = ar[0, j] - ar[2, j], ai[0, j] - ai[2, j]
            cr, ci = ar[1, j] + ar[3, j], ai[1, j] + ai[3, j]
            dr, di = ar[1, j] - ar[3, j], ai[1, j] - ai[3, j]
            ar[0, j] = ar_ + cr
            ai[0, j] = ai_ + ci
            ar[2, j] = ar_ - cr
            ai[2, j] = ai_ - ci
            ar[1, j] = br - di
            ai[1, j] = bi + dr
            ar[3, j] = br + di
            ai[3, j] = bi - dr


@kernel
def _spectral_conv(a, t, eh, out, grad_input, k0, kg, cg, dh):
    # Per frequency (u, v): the kernel spectrum Wc[c, q] = sum_r e^{+i 2 pi u r dh/nh} t[v, r, c, q]
    # for the chunk's output channels k0 + q, then, within each group,
    #   forward:    out[u, v, n, q]  = sum_c a[u, v, n, c] * Wc[c, q]           (a = X,  out = Y chunk)
    #   grad_input: out[u, v, n, c] += sum_q a[u, v, n, k0 + q] * conj(Wc[c, q]) (a = GY, out = GX)
    # prange over v: every (u, v) of out belongs to one iteration.  The rows u0 + j*nh/nsub
    # (nsub = 4 when 4 divides nh, else 2 when nh is even, else 1) are done together: their
    # twiddles differ by i^(j*r*dh), so with S_m the sum over taps with r*dh = m (mod nsub), the
    # spectra are sum_m i^(j*m) S_m (one radix-4 step: a quarter of the DFT work).
    nh, wf, nb = a.shape[0], a.shape[1], a.shape[2]
    rr, m = t.shape[1], t.shape[3]
    kb = m // cg
    nsub = 4 if nh % 4 == 0 else (2 if nh % 2 == 0 else 1)
    step = nh // nsub
    for v in prange(wf):
        war = np.empty((nsub, m), dtype=t.dtype)
        wai = np.empty((nsub, m), dtype=t.dtype)
        accr = np.empty((nb + 1, kb), dtype=t.dtype)  # row nb: scratch partner of an odd last image
        acci = np.empty((nb + 1, kb), dtype=t.dtype)
        # forward: the group's input spectra, split re/im, zero-padded to a multiple of 4 channels
        # (and an even number of images) so the inner loop needs no tail case
        xr = np.zeros((nb + 1, cg + 3), dtype=t.dtype)
        xi = np.zeros((nb + 1, cg + 3), dtype=t.dtype)
        # a zero of the data's type: ``x * 0`` would be float64 for float32 x (numba types
        # float32 * int64 as float64), and the loops using it would run in double precision
        zz = np.zeros(1, dtype=t.dtype)
        for u0 in range(step):
            for sd in range(nsub):
                for j in range(m):
                    war[sd, j] = 0
                    wai[sd, j] = 0
            for r in range(rr):
                cr, ci = eh[u0, r, 0], eh[u0, r, 1]
                tr = t[v, r, 0]
                ti = t[v, r, 1]
                sd = (r * dh) % nsub
                w1r = war[sd]
                w1i = wai[sd]
                for j in range(m):
                    w1r[j] += cr * tr[j] - ci * ti[j]
                    w1i[j] += cr * ti[j] + ci * tr[j]
            _butterfly(war, wai, nsub, m)
            for side in range(nsub):
                u = u0 + side * step
                wr = war[side]
                wi = wai[side]
                if not grad_input:
                    for n in range(nb + 1):
                        for q in range(kb):
                            accr[n, q] = 0
                            acci[n, q] = 0
                q0 = 0
                while q0 < kb:
                    gi = (k0 + q0) // kg
                    q1 = min(kb, (gi + 1) * kg - k0)
                    ln = q1 - q0
                    if grad_input:
                        # dot products over q, 2 channels per pass, sums in registers.  (Vectors over
                        # c with transposed kernel spectra, as the forward loop, were 1.4x slower.)
                        for n in range(nb):
                            for q in range(q0, q1):
                                z = a[u, v, n, k0 + q]
                                accr[n, q] = z.real
                                acci[n, q] = z.imag
                        for cl in range(0, cg, 2):
                            c = gi * cg + cl
                            two = cl + 1 < cg
                            w0r = wr[cl * kb + q0:cl * kb + q1]
                            w0i = wi[cl * kb + q0:cl * kb + q1]
                            e = (cl + 1) * kb if two else cl * kb  # second channel (or the first again)
                            x1r = wr[e + q0:e + q1]
                            x1i = wi[e + q0:e + q1]
                            for n in range(nb):
                                gr = accr[n, q0:q1]
                                gim = acci[n, q0:q1]
                                sr0 = zz[0]
                                si0 = sr0
                                sr1 = sr0
                                si1 = sr0
                                for j in range(ln):
                                    sr0 += gr[j] * w0r[j] + gim[j] * w0i[j]
                                    si0 += gim[j] * w0r[j] - gr[j] * w0i[j]
                                    sr1 += gr[j] * x1r[j] + gim[j] * x1i[j]
                                    si1 += gim[j] * x1r[j] - gr[j] * x1i[j]
                                out[u, v, n, c] += complex(sr0, si0)
                                if two:
                                    out[u, v, n, c + 1] += complex(sr1, si1)
                    else:
                        for n in range(nb):
                            for cl in range(cg):
                                z = a[u, v, n, gi * cg + cl]
                                xr[n, cl] = z.real
                                xi[n, cl] = z.imag
                        # 2 images x 4 channels per pass: 32 multiply-adds per 12 loads and 4 stores,
                        # all in the data's precision (the old 2 x 2 loop, partly in float64 through
                        # ``z * 0``, took 62 ms of CPU on convnet-L2-9x9, this 34 ms; 4 x 4 no better)
                        for cl in range(0, cg, 4):
                            e0 = cl * kb  # a missing channel reads the first again (with x = 0)
                            e1 = (cl + 1) * kb if cl + 1 < cg else e0
                            e2 = (cl + 2) * kb if cl + 2 < cg else e0
                            e3 = (cl + 3) * kb if cl + 3 < cg else e0
                            p0r = wr[e0 + q0:e0 + q1]
                            p0i = wi[e0 + q0:e0 + q1]
                            p1r = wr[e1 + q0:e1 + q1]
                            p1i = wi[e1 + q0:e1 + q1]
                            p2r = wr[e2 + q0:e2 + q1]
                            p2i = wi[e2 + q0:e2 + q1]
                            p3r = wr[e3 + q0:e3 + q1]
                            p3i = wi[e3 + q0:e3 + q1]
                            for n in range(0, nb, 2):  # row nb of xr/xi is 0, of accr/acci scratch
                                x0r, x0i, x1r_, x1i_ = xr[n, cl], xi[n, cl], xr[n, cl + 1], xi[n, cl + 1]
                                x2r, x2i, x3r, x3i = xr[n, cl + 2], xi[n, cl + 2], xr[n, cl + 3], xi[n, cl + 3]
                                y0r, y0i, y1r, y1i = xr[n + 1, cl], xi[n + 1, cl], xr[n + 1, cl + 1], xi[n + 1, cl + 1]
                                y2r, y2i, y3r, y3i = xr[n + 1, cl + 2], xi[n + 1, cl + 2], xr[n + 1, cl + 3], xi[n + 1, cl + 3]
                                gr = accr[n, q0:q1]
                                gim = acci[n, q0:q1]
                                hr = accr[n + 1, q0:q1]
                                him = acci[n + 1, q0:q1]
                                for j in range(ln):
                                    ar, ai, br, bi = p0r[j], p0i[j], p1r[j], p1i[j]
                                    cr_, ci_, dr, di = p2r[j], p2i[j], p3r[j], p3i[j]
                                    gr[j] += ((x0r * ar - x0i * ai + x1r_ * br - x1i_ * bi)
                                              + (x2r * cr_ - x2i * ci_ + x3r * dr - x3i * di))
                                    gim[j] += ((x0r * ai + x0i * ar + x1r_ * bi + x1i_ * br)
                                               + (x2r * ci_ + x2i * cr_ + x3r * di + x3i * dr))
                                    hr[j] += ((y0r * ar - y0i * ai + y1r * br - y1i * bi)
                                              + (y2r * cr_ - y2i * ci_ + y3r * dr - y3i * di))
                                    him[j] += ((y0r * ai + y0i * ar + y1r * bi + y1i * br)
                                               + (y2r * ci_ + y2i * cr_ + y3r * di + y3i * dr))
                    q0 = q1
                if not grad_input:
                    for n in range(nb):
                        for q in range(kb):
                            out[u, v, n, q] = complex(accr[n, q], acci[n, q])


@kernel
def _spectral_wgrad(x, gy, eh, qs, k0, kg, cg, dh, cb):
    # Per frequency (u, v): Z[c, q] = sum_n x[u, v, n, c] * conj(gy[u, v, n, k0 + q]) within each
    # group, then qs[v, r, c, q] += e^{+i 2 pi u r dh/nh} * Z[c, q] (the inverse DFT along rows,
    # evaluated only at the r tap rows).  prange over v: qs[v] belongs to one iteration, and the
    # sum over u runs in a fixed order.  Input channels go in blocks of cb so the block of qs[v]
    # being updated stays in cache; rows u0 + j*nh/nsub are combined as in _spectral_conv: tap
    # row r gets e^{..u0..} * sum_j i^(j*m) Z[u0 + j*nh/nsub] with m = r*dh mod nsub.
    nh, wf, nb = x.shape[0], x.shape[1], x.shape[2]
    rr, m = qs.shape[1], qs.shape[3]
    kb = m // cg
    nsub = 4 if nh % 4 == 0 else (2 if nh % 2 == 0 else 1)
    step = nh // nsub
    for v in prange(wf):
        zr = np.empty((nsub, cb * kb), dtype=qs.dtype)
        zi = np.empty((nsub, cb * kb), dtype=qs.dtype)
        gr = np.empty((nb, kb), dtype=qs.dtype)
        gim = np.empty((nb, kb), dtype=qs.dtype)
        zz = np.zeros(1, dtype=qs.dtype)  # typed zero, as in _spectral_conv
        for c0 in range(0, cg, cb):
            c1 = min(cg, c0 + cb)
            mb = (c1 - c0) * kb
            for u0 in range(step):
                for side in range(nsub):
                    u = u0 + side * step
                    for n in range(nb):
                        for q in range(kb):
                            z = gy[u, v, n, k0 + q]
                            gr[n, q] = z.real
                            gim[n, q] = z.imag
                    zsr = zr[side]
                    zsi = zi[side]
                    for j in range(mb):
                        zsr[j] = 0
                        zsi[j] = 0
                    q0 = 0
                    while q0 < kb:
                        gi = (k0 + q0) // kg
                        q1 = min(kb, (gi + 1) * kg - k0)
                        ln = q1 - q0
                        for cl in range(c0, c1):
                            c = gi * cg + cl
                            o = (cl - c0) * kb
                            z0r = zsr[o + q0:o + q1]
                            z0i = zsi[o + q0:o + q1]
                            for n in range(0, nb, 2):
                                n1 = n + 1 if n + 1 < nb else n
                                xz = x[u, v, n, c]
                                xr, xi = xz.real, xz.imag
                                if n1 != n:
                                    xz = x[u, v, n1, c]
                                    yr, yi = xz.real, xz.imag
                                else:
                                    yr, yi = zz[0], zz[0]
                                g0 = gr[n, q0:q1]
                                g1 = gim[n, q0:q1]
                                h0 = gr[n1, q0:q1]
                                h1 = gim[n1, q0:q1]
                                for j in range(ln):
                                    z0r[j] += xr * g0[j] + xi * g1[j] + yr * h0[j] + yi * h1[j]
                                    z0i[j] += xi * g0[j] - xr * g1[j] + yi * h0[j] - yr * h1[j]
                        q0 = q1
                _butterfly(zr, zi, nsub, mb)
                # the inverse DFT along u for the block: long vector loops
                for r in range(rr):
                    cr, ci = eh[u0, r, 0], eh[u0, r, 1]
                    sd = (r * dh) % nsub
                    zsr = zr[sd]
                    zsi = zi[sd]
                    pr = qs[v, r, 0, c0 * kb:c1 * kb]
                    pi = qs[v, r, 1, c0 * kb:c1 * kb]
                    for j in range(mb):
                        pr[j] += cr * zsr[j] - ci * zsi[j]
                        pi[j] += cr * zsi[j] + ci * zsr[j]


@kernel
def _wgrad_rows(qs, ew, gwt):
    # gwt[r, s, j] += sum_v Re(qs[v, r, j] * ew[v, s]): the inverse real DFT along columns at the s
    # tap columns; ew carries the Hermitian weights (1 or 2) and 1/(nh*nw).  Fixed order over v.
    wf, rr = qs.shape[0], qs.shape[1]
    ss, m = gwt.shape[1], gwt.shape[2]
    for it in prange(rr * ss):
        r = it // ss
        s = it % ss
        acc = gwt[r, s]
        for v in range(wf):
            cr, ci = ew[v, s, 0], ew[v, s, 1]
            pr = qs[v, r, 0]
            pi = qs[v, r, 1]
            for j in range(m):
                acc[j] += cr * pr[j] - ci * pi[j]


# --------------------------------------------------------------------------- planning
class Plan(NamedTuple):
    """How one pass is cut: FFT size (nh, nw), tile extent (th, tw) in the pass's output rows and
    columns, batch chunk nb and output-channel chunk kb; ws is the workspace in bytes."""

    nh: int
    nw: int
    th: int
    tw: int
    nb: int
    kb: int
    ws: int


def _span(pass_, t, st, e):
    """Rows of the FFT buffer that a tile of ``t`` rows of the pass's output needs."""
    return t + e if pass_ == "grad_input" else (t - 1) * st + e + 1


def _tile(pass_, nfft, st, e):
    """Most rows of the pass's output that one FFT of length ``nfft`` serves (< 1: none)."""
    return nfft - e if pass_ == "grad_input" else (nfft - e - 1) // st + 1


def _whole(pass_, total, n_out, st, e, p0):
    """grad_input only: the shortest FFT that serves a whole axis of ``total`` input rows in one
    tile (else 0).  The stride-spread gradient (``(n_out - 1)*st + 1`` rows) correlated with the
    kernel has ``(n_out - 1)*st + 1 + e`` rows of support, and the kept rows are ``[p0, p0 + total)``
    of it: one circular transform holding both without overlap needs only the longer of the two,
    less than the ``total + e`` an overlap-save tile needs when the padding is smaller than the
    kernel (``valid``: ``total`` instead of ``total + e``).  Outputs are read modulo the length."""
    if pass_ != "grad_input":
        return 0
    return max((n_out - 1) * st + 1 + e, p0 + total)


def _sizes(pass_, total, st, e, whole=0):
    """Candidate FFT lengths, largest (whole extent in one tile) first."""
    full = sfft.next_fast_len(_span(pass_, total, st, e), real=True)
    cand = {full}
    if 0 < whole < full:
        cand.add(sfft.next_fast_len(whole, real=True))
    for m in range(2, 17):
        cand.add(sfft.next_fast_len(_span(pass_, -(-total // m), st, e), real=True))
    t = 1
    while t < total:
        cand.add(sfft.next_fast_len(_span(pass_, t, st, e), real=True))
        t *= 2
    return sorted((c for c in cand if c <= full), reverse=True)


def _workspace(p, pass_, nh, nw, nb, kb):
    """Peak bytes of one step: the scratch buffers of a call (see :func:`scratch`) -- one real
    tile buffer shared by the input and output tiles, the input and output spectra, the kernel
    row DFTs -- all alive at once, since they are kept for the next call."""
    isz = p.itemsize
    pl, f, wf = nh * nw, nh * (nw // 2 + 1), nw // 2 + 1
    t = wf * p.r * 2 * p.cg * kb * isz  # kernel row DFTs (grad_weight: its row sums)
    c, k = p.c, p.k
    if pass_ == "forward":
        return t + pl * nb * max(c, kb) * isz + f * nb * (c + kb) * 2 * isz
    if pass_ == "grad_input":
        return t + pl * nb * max(k, c) * isz + f * nb * (k + c) * 2 * isz
    return t + p.r * p.s * p.cg * kb * isz + pl * nb * max(c, k) * isz + f * nb * (c + k) * 2 * isz


# Cost model: single-thread seconds fitted to thread_time() measurements on the 2-core EPYC (AVX2)
# development box (numba 0.68, scipy 1.17, float32; shared and loaded, so +-25%), then divided by
# the thread count at 60% efficiency.  Constants are rounded *up*, and a call has a fixed floor
# (about ten scipy/numba dispatches with their thread wake-ups and buffer allocations) so small
# layers never look cheap: the tiny cases measured 0.1 ms of CPU per pass on one thread.
_C_CALL = 2.5e-4      # per call
_C_STEP = 2.5e-4      # per (tile, batch chunk, channel chunk) step: 6-8 kernel / FFT launches
_C_FFT = 0.35e-9      # per plane element per log2(plane size), one transform
_C_MAC = 0.35e-9      # per complex multiply-add in the contraction kernels (grad_weight: x1.3)
_C_MEM = 2.5e-9       # per element packed into / unpacked from a channels-last buffer
_C_ROW = 0.2e-9       # per multiply-add of the kernel row DFTs (and grad_weight's column sums)
_C_LOOP = 5e-9        # per inner vector loop of the contraction kernels (start-up and remainder)


def _single_cost(p, pass_, pl):
    """Single-thread seconds of one pass under plan ``pl`` (without the per-call floor)."""
    nh, nw, th, tw, nb, kb = pl.nh, pl.nw, pl.th, pl.tw, pl.nb, pl.kb
    tot_h, tot_w = (p.h, p.w) if pass_ == "grad_input" else (p.oh, p.ow)
    tiles = -(-tot_h // th) * -(-tot_w // tw)
    nch, kch = -(-max(p.n, 1) // nb), -(-p.k // kb)
    wf = nw // 2 + 1
    planes = max(p.n, 1) * (p.c + p.k)
    fft = planes * nh * nw * math.log2(max(nh * nw, 2)) * _C_FFT
    rdft = p.r / (4 if nh % 4 == 0 else (2 if nh % 2 == 0 else 1))  # radix-4/2 step over rows
    macs = nh * wf * p.cg * p.k * (max(p.n, 1) + nch * rdft) * (1.3 if pass_ == "grad_weight" else 1.0)
    rows = nch * wf * p.r * p.s * p.cg * p.k * 2
    mem = planes * nh * nw * _C_MEM
    # every channel chunk streams the batch chunk's input (forward) / result (grad_input) spectra
    # again, and short inner loops (few channels per group) cost their overhead
    reread = (kch - 1) * nh * wf * max(p.n, 1) * p.c * 2 * _C_MEM if pass_ != "grad_weight" else 0.0
    loops = nh * wf * (max(p.n, 1) * max(1, p.cg // 2) * p.g + nch * p.r) * _C_LOOP
    return tiles * (fft + macs * _C_MAC + rows * _C_ROW + mem + reread + loops)


def _steps(p, pass_, pl):
    tot_h, tot_w = (p.h, p.w) if pass_ == "grad_input" else (p.oh, p.ow)
    tiles = -(-tot_h // pl.th) * -(-tot_w // pl.tw)
    return tiles * -(-max(p.n, 1) // pl.nb) * -(-p.k // pl.kb)


# Tilings are chosen for this thread count whatever the pool size, so that a call's result (its
# rounding) never depends on the thread count or on which thread count planned first.
_PLAN_THREADS = 2


def _cost_of(p, pass_, pl, threads):
    # the per-step launches do not get faster with more threads (each is a fork/join); the rest
    # scaled 1.3-1.9x from 1 to 2 threads on the (shared) development box: 60% efficiency assumed
    return (_C_CALL + _steps(p, pass_, pl) * _C_STEP
            + _single_cost(p, pass_, pl) / (1.0 + 0.6 * (threads - 1)))


@functools.lru_cache(maxsize=256)
def _plan(p, pass_):
    """The cheapest :class:`Plan` whose workspace fits ``p.workspace_limit``, or a reason string."""
    eh, ew = p.dh * (p.r - 1), p.dw * (p.s - 1)
    tot_h, tot_w = (p.h, p.w) if pass_ == "grad_input" else (p.oh, p.ow)
    best, best_cost, smallest = None, float("inf"), None
    whole_h = _whole(pass_, tot_h, p.oh, p.sh, eh, p.ph0)
    whole_w = _whole(pass_, tot_w, p.ow, p.sw, ew, p.pw0)
    for nh in _sizes(pass_, tot_h, p.sh, eh, whole_h):
        th = tot_h if 0 < whole_h <= nh else min(tot_h, _tile(pass_, nh, p.sh, eh))
        if th < 1:
            continue
        for nw in _sizes(pass_, tot_w, p.sw, ew, whole_w):
            tw = tot_w if 0 < whole_w <= nw else min(tot_w, _tile(pass_, nw, p.sw, ew))
            if tw < 1:
                continue
            nb = max(p.n, 1)  # n == 0 is answered before any pass runs
            while True:
                kb = p.k
                while kb > 1 and _workspace(p, pass_, nh, nw, nb, kb) > p.workspace_limit:
                    kb = -(-kb // 2)
                ws = _workspace(p, pass_, nh, nw, nb, kb)
                if ws <= p.workspace_limit or nb == 1:
                    break
                nb = -(-nb // 2)
            pl = Plan(nh, nw, th, tw, nb, kb, ws)
            if smallest is None or ws < smallest.ws:
                smallest = pl
            if ws > p.workspace_limit:
                continue
            c = _cost_of(p, pass_, pl, _PLAN_THREADS)
            if c < best_cost:
                best, best_cost = pl, c
    if best is None:
        need = smallest.ws if smallest else 0
        return (f"its smallest tiling needs {need} bytes of workspace, more than workspace_limit="
                f"{p.workspace_limit}")
    return best


def supports(p, pass_):
    """Every geometry, as long as one tiling fits the workspace limit (else the reason).

    Strides are served by computing the stride-1 result of each tile and subsampling it, which
    wastes ``1 - 1/(sh*sw)`` of the work; :func:`cost` charges that waste.
    """
    pl = _plan(p, pass_)
    return pl if isinstance(pl, str) else None


def cost(p, pass_, threads):
    """Estimated seconds of one pass (``inf`` when unsupported).

    Transforms cost ``~ planes * nh*nw*log2(nh*nw)``, the contraction ``~ nh*wf*cg*k*(n + r)``
    complex multiply-adds per tile, whatever the stride: stride ``sh x sw`` costs as much as the
    stride-1 convolution of the same padded input.  A fixed per-call floor keeps small layers with
    the direct method.
    """
    pl = _plan(p, pass_)
    if isinstance(pl, str):
        return float("inf")
    return _cost_of(p, pass_, pl, threads)


# --------------------------------------------------------------------------- twiddles
def _twiddles(nfft, count, step, length, dtype, sign=1.0, weights=None):
    """(length, count, 2) table of (cos, sin)(sign * 2 pi * i * j * step / nfft), i < length, j < count.

    Angles are reduced modulo ``nfft`` in integers first, so large products lose no accuracy.
    """
    i = np.arange(length, dtype=np.int64)[:, None]
    j = np.arange(count, dtype=np.int64)[None, :]
    ang = sign * 2.0 * np.pi * ((i * j * step) % nfft) / nfft
    tab = np.stack([np.cos(ang), np.sin(ang)], axis=-1)
    if weights is not None:
        tab *= weights[:, None, None]
    return np.ascontiguousarray(tab.astype(dtype))


def _kernel_row_dfts(w, k0, k1, nw, wf, dw, dtype):
    """``t`` (wf, r, 2, cg*kb) for output channels [k0, k1): DFT along s of every kernel row."""
    kb, cg, r, s = k1 - k0, w.shape[1], w.shape[2], w.shape[3]
    wt = np.ascontiguousarray(w[k0:k1].transpose(2, 3, 1, 0)).reshape(r, s, cg * kb)
    t = scratch("fft.tab", (wf, r, 2, cg * kb), dtype)
    _kernel_rows(wt, _twiddles(nw, s, dw, wf, dtype), t)
    return t


def _wgrad_block(p, kb):
    """Input channels per block of grad_weight's row sums: ~512 KiB of qs[v] (L2-sized).

    Each block re-stages the output-gradient spectra of every frequency, so small blocks cost:
    on convnet-L2-9x9 (kernel alone, interleaved, loaded box) a 64 KiB budget (7 channels) took
    1.13-1.20x the time of 512 KiB (56 channels) at 1 and 2 threads; 64 channels was no better.
    The block size does not change the result (every (c, k) sum runs in the same order).
    """
    return max(1, min(p.cg, (512 * 1024) // (p.r * 2 * kb * p.itemsize)))


def _workers():
    return numba.get_num_threads()


def _rfft2(a, role):
    """Real 2-D FFT over axes (0, 1) of ``a`` into the scratch buffer ``role``."""
    if _pocket is None:
        return sfft.rfft2(a, axes=(0, 1), workers=_workers())
    out = scratch(role, (a.shape[0], a.shape[1] // 2 + 1) + a.shape[2:], np.result_type(a.dtype, np.complex64))
    return _pocket.r2c(a, (0, 1), True, 0, out, _workers())


def _irfft2(a, nw, role):
    """Inverse of :func:`_rfft2` (``nw`` columns), normalised by ``1/(nh*nw)``; overwrites ``a``.

    Done as scipy's irfft2 does it -- complex FFT over axis 0, then complex-to-real over axis 1 --
    but in place and into a reused buffer (scipy's allocates a temporary the size of ``a``).
    """
    if _pocket is None:
        return sfft.irfft2(a, s=(a.shape[0], nw), axes=(0, 1), workers=_workers(), overwrite_x=True)
    out = scratch(role, (a.shape[0], nw) + a.shape[2:], a.real.dtype)
    _pocket.c2c(a, (0,), False, 2, a, _workers())
    return _pocket.c2r(a, (1,), nw, False, 2, out, _workers())


def _chunks(total, size):
    return [(a, min(a + size, total)) for a in range(0, total, size)]


# --------------------------------------------------------------------------- passes
def forward(x, w, b, p):
    pl = _plan(p, "forward")
    if isinstance(pl, str):  # select() refuses before this; kept for direct callers
        raise ValueError(f"conv2d: algorithm='fft' cannot compute the forward pass here: {pl}")
    dt = p.dtype
    nh, nw, wf = pl.nh, pl.nw, pl.nw // 2 + 1
    x = np.ascontiguousarray(x)
    w = np.ascontiguousarray(w)
    bias = np.zeros(p.k, dt) if b is None else np.ascontiguousarray(b)
    eh_tab = _twiddles(nh, p.r, p.dh, nh, dt)
    y = np.empty(p.y_shape, dt)
    kchunks = _chunks(p.k, pl.kb)
    tabs = [_kernel_row_dfts(w, k0, k1, nw, wf, p.dw, dt) for k0, k1 in kchunks] if len(kchunks) == 1 else None
    for i0, i1 in _chunks(p.oh, pl.th):
        for j0, j1 in _chunks(p.ow, pl.tw):
            for n0, n1 in _chunks(p.n, pl.nb):
                xb = scratch("fft.real", (nh, nw, n1 - n0, p.c), dt)
                _pack(x, xb, n0, 0, i0 * p.sh - p.ph0, 1, 0, p.h, j0 * p.sw - p.pw0, 1, 0, p.w)
                xs = _rfft2(xb, "fft.spec_in")
                for k0, k1 in kchunks:
                    t = tabs[0] if tabs is not None else _kernel_row_dfts(w, k0, k1, nw, wf, p.dw, dt)
                    ys = scratch("fft.spec_out", (nh, wf, n1 - n0, k1 - k0), xs.dtype)
                    _spectral_conv(xs, t, eh_tab, ys, False, k0, p.kg, p.cg, p.dh)
                    yb = _irfft2(ys, nw, "fft.real")  # xb is dead by now: same role
                    _unpack(yb, y, n0, k0, i0, i1, j0, j1, 0, 0, p.sh, p.sw, bias)
    return y


def backward(gy, x, w, p):
    """Both gradients in one call: grad_weight reuses the spectrum of the output gradient that
    grad_input computed when both passes transform the same buffer (whole planes, one batch chunk,
    the same FFT size): one packing and one transform of ``gy`` fewer."""
    gx, gs = _grad_input(gy, w, p, keep_spectrum=True)
    return gx, _grad_weight(gy, x, p, gs)


def grad_input(gy, w, p):
    return _grad_input(gy, w, p, keep_spectrum=False)[0]


def grad_weight(gy, x, p):
    return _grad_weight(gy, x, p, None)


def _grad_input(gy, w, p, keep_spectrum):
    """grad_input, and (with ``keep_spectrum``) ``(nh, nw, spectrum)`` of the whole packed ``gy``
    when one transform covered it, else None.  The spectrum lives in the ``fft.spec_in`` scratch
    buffer, which grad_weight leaves alone when it is handed one."""
    pl = _plan(p, "grad_input")
    if isinstance(pl, str):
        raise ValueError(f"conv2d_backward: algorithm='fft' cannot compute the grad_input pass here: {pl}")
    dt = p.dtype
    nh, nw, wf = pl.nh, pl.nw, pl.nw // 2 + 1
    eh, ew = p.dh * (p.r - 1), p.dw * (p.s - 1)
    gy = np.ascontiguousarray(gy)
    w = np.ascontiguousarray(w)
    eh_tab = _twiddles(nh, p.r, p.dh, nh, dt)
    gx = np.empty(p.x_shape, dt)
    kept = None
    zero_bias = np.zeros(p.c, dt)
    kchunks = _chunks(p.k, pl.kb)
    tabs = [_kernel_row_dfts(w, k0, k1, nw, wf, p.dw, dt) for k0, k1 in kchunks] if len(kchunks) == 1 else None
    # an axis served whole by one circular transform (see _whole) holds the spread gradient from
    # buffer row 0 and keeps rows ph0.. (read modulo nh); an overlap-save tile holds it from the
    # tile's padded row y0 + ph0 - eh and keeps rows eh..
    circ_h = pl.th == p.h and _whole("grad_input", p.h, p.oh, p.sh, eh, p.ph0) <= nh
    circ_w = pl.tw == p.w and _whole("grad_input", p.w, p.ow, p.sw, ew, p.pw0) <= nw
    for y0, y1 in _chunks(p.h, pl.th):
        for x0, x1 in _chunks(p.w, pl.tw):
            for n0, n1 in _chunks(p.n, pl.nb):
                gb = scratch("fft.real", (nh, nw, n1 - n0, p.k), dt)
                _pack(gy, gb, n0, 0, 0 if circ_h else y0 + p.ph0 - eh, p.sh, 0, p.oh,
                      0 if circ_w else x0 + p.pw0 - ew, p.sw, 0, p.ow)
                gs = _rfft2(gb, "fft.spec_in")
                if keep_spectrum and circ_h and circ_w and pl.nb == p.n:
                    kept = (nh, nw, gs)  # grad_weight's own packing of gy is the same
                gxs = scratch("fft.spec_out", (nh, wf, n1 - n0, p.c), gs.dtype)
                gxs.fill(0)
                for k0, k1 in kchunks:
                    t = tabs[0] if tabs is not None else _kernel_row_dfts(w, k0, k1, nw, wf, p.dw, dt)
                    _spectral_conv(gs, t, eh_tab, gxs, True, k0, p.kg, p.cg, p.dh)
                xb = _irfft2(gxs, nw, "fft.real")
                _unpack(xb, gx, n0, 0, y0, y1, x0, x1, p.ph0 if circ_h else eh, p.pw0 if circ_w else ew,
                        1, 1, zero_bias)
    return gx, kept


def _grad_weight(gy, x, p, kept):
    """grad_weight; ``kept`` is what :func:`_grad_input` kept of the same ``gy`` (or None)."""
    pl = _plan(p, "grad_weight")
    if isinstance(pl, str):
        raise ValueError(f"conv2d_backward: algorithm='fft' cannot compute the grad_weight pass here: {pl}")
    dt = p.dtype
    nh, nw, wf = pl.nh, pl.nw, pl.nw // 2 + 1
    x = np.ascontiguousarray(x)
    gy = np.ascontiguousarray(gy)
    eh_tab = _twiddles(nh, p.r, p.dh, nh, dt)
    # Hermitian half-spectrum: columns 0 and nw/2 (nw even) appear once in the full sum, the others twice
    cv = np.full(wf, 2.0)
    cv[0] = 1.0
    if nw % 2 == 0:
        cv[-1] = 1.0
    ew_tab = _twiddles(nw, p.s, p.dw, wf, dt, weights=cv / (nh * nw))
    gwt = np.zeros((p.r, p.s, p.cg, p.k), dt)  # (r, s, c, k): accumulated over tiles and chunks
    shared = None
    if kept is not None and kept[:2] == (nh, nw) and pl.th == p.oh and pl.tw == p.ow and pl.nb == p.n:
        shared = kept[2]
    kchunks = _chunks(p.k, pl.kb)
    for i0, i1 in _chunks(p.oh, pl.th):
        for j0, j1 in _chunks(p.ow, pl.tw):
            for n0, n1 in _chunks(p.n, pl.nb):
                xb = scratch("fft.real", (nh, nw, n1 - n0, p.c), dt)
                _pack(x, xb, n0, 0, i0 * p.sh - p.ph0, 1, 0, p.h, j0 * p.sw - p.pw0, 1, 0, p.w)
                xs = _rfft2(xb, "fft.spec_out")
                if shared is not None:
                    gs = shared  # grad_input's transform of the same packed gy, still in fft.spec_in
                else:
                    gb = scratch("fft.real", (nh, nw, n1 - n0, p.k), dt)  # xb is dead: same role
                    _pack(gy, gb, n0, 0, i0 * p.sh, p.sh, i0, i1, j0 * p.sw, p.sw, j0, j1)
                    gs = _rfft2(gb, "fft.spec_in")
                for k0, k1 in kchunks:
                    kb = k1 - k0
                    qs = np.zeros((wf, p.r, 2, p.cg * kb), dt)
                    _spectral_wgrad(xs, gs, eh_tab, qs, k0, p.kg, p.cg, p.dh, _wgrad_block(p, kb))
                    part = np.zeros((p.r, p.s, p.cg * kb), dt)
                    _wgrad_rows(qs, ew_tab, part)
                    gwt[:, :, :, k0:k1] += part.reshape(p.r, p.s, p.cg, kb)
    return np.ascontiguousarray(gwt.transpose(3, 2, 0, 1))
