"""The numba kernels of the FFT algorithm (see :mod:`fastconv._algorithms.fft` for the method, the
notation and the guarantees): packing into and out of channels-last tile buffers, the kernel row
DFTs, and the per-frequency contractions of the three passes.  No FFT runs in here (scipy's
pocketfft does the transforms, from Python).

They live apart from the planning and cost code because numba's on-disk cache is keyed on the
source file's time stamp: an edit to the Python layer would otherwise recompile them (~16-18 s per
dtype cold).
"""
import numpy as np
from numba import prange

from .._jit import kernel, serial

# Serial, uncached helper linked into the calling parallel kernels (and stored in their cache
# entries): never a cached kernel calling another cached kernel (numba issue 8578,
# shared/NUMBA_NOTES.md).  Not inlined: inlining it into both kernels cost more compile time.
_inline = serial


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

