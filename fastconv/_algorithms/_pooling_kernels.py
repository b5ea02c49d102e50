"""The numba kernels of :mod:`fastconv._algorithms.pooling`: max- and average-pooling, forward and backward.

Notation: planes ``p`` = n*c (each ``(h, w)``), window kh kw, stride sh sw, padding ph pw, dilation
dh dw, output oh ow.  Every kernel runs ``prange`` over planes (max forward: over chunks of whole
planes that share scratch buffers): a plane's outputs, and for the backward passes its input
gradient, belong to one work item, so scatters never race.

Max-pool follows PyTorch's CPU kernel exactly: the window is clipped to the input, the running
maximum starts at -inf with the index of the first in-bounds element, and an element replaces it
when it is greater or NaN (so NaN propagates and ties keep the first position).  Indices are flat
positions ``ih*w + iw`` in each plane.

2x2 windows with stride 2 and no padding (LeNet's, VGG's pools) have their own forward kernel,
``_max_forward_2x2``: 3.5-5x faster than the general one there, with the same results.  So do
3x3 windows (ResNet's 3x3/s2, 3x3/s1), ``_max_forward_3x3_rows`` (``_max_forward_3x3`` at wider
column strides), the nine taps unrolled per output column; and the other windows at column
stride 1 (YOLO's 5x5/s1) or 3 wide at column stride 2, ``_max_forward_sep``, separable: 2-3x.
Average pooling at column stride 1 or 2 is separable too (``_avg_forward_sep``,
``_avg_backward_sep``: row sums, then sums of rows; 3-8x).

Adaptive average pooling and the channels_last (NHWC) kernels are here too; ``pooling.py`` holds
the Python drivers that allocate and call them.
"""
import numpy as np
from numba import prange

from .._jit import kernel, micro, round_run, RUN_PAIR
from .common import _zero

_micro = micro  # compiled into the caller
_u = np.uint64

# Interior output rows run one window tap at a time over a whole row of outputs, so the selects
# are vector blends.  Scalar selects inside loops with run-time bounds are turned into branches
# by LLVM, which random data mispredicts: the per-output scan took 28 ns per output on vgg16-pool
# (1 thread), this 5 ns.  Columns are first split by phase ``iw % sw`` so that every tap reads a
# unit-stride run, and runs are rounded up to whole vectors (a scalar remainder would branch again).
# Indices are int32 there (twice the vector width of int64): planes of 2**31 elements or more take
# the per-window path.  Loops only (no slices assigned, no array expressions): each of those added
# seconds of compile time; the one helper, ``_max_run``, is there to keep its stores unconditional.
_RUN = 16


@_micro
def _max_run(src, base, jw, first, av, ai, bv, bi, n):
    # (bv, bi) = the running maxima (av, ai) updated by one tap's run (src, positions base + jw);
    # ``first`` takes the tap whatever the old values.  Into other arrays: written back in place,
    # LLVM made the stores conditional (masked: microcode on Zen 3; 3x3/s1 on 8x64x56x56 13.9 ms)
    for j in range(n):
        v = src[j]
        b = av[j]
        u = (v > b) | (v != v) | first
        bv[j] = v if u else b
        bi[j] = base + jw[j] if u else ai[j]


@kernel
def _max_forward(x, y, idx, kh, kw, sh, sw, ph, pw, dh, dw, ninf):
    pp, h, w = x.shape
    oh, ow = y.shape[1], y.shape[2]
    jlo = min(ow, (pw + sw - 1) // sw)  # columns whose windows lie inside [0, w)
    jhi = max(jlo, min(ow, (w - 1 - (kw - 1) * dw + pw) // sw + 1))
    nj = jhi - jlo if h * w < 2**31 else 0
    nl = nj + (-nj) % _RUN
    wp = (w + sw - 1) // sw
    wl = wp + nl
    c0 = jlo * sw - pw  # first column of the first vector-run window
    # per-tap offsets into the phase-split plane and per-phase lengths, computed once (divisions by
    # the run-time stride per tap and row were ~10% of the time on 28x28 planes)
    toff = np.empty(kw, np.int64)
    for t in range(kw):
        toff[t] = ((c0 + t * dw) % sw) * h * wl + (c0 + t * dw) // sw
    cnt = np.empty(sw, np.int64)
    for q in range(sw):
        cnt[q] = (w - q + sw - 1) // sw
    nch = min(pp, 64)  # chunks of planes share their scratch buffers
    for ch in prange(nch):
        av = np.empty(nl, x.dtype)  # running maxima of an output row, read from one pair, written to the other
        ai = np.empty(nl, np.int32)
        bv = np.empty(nl, x.dtype)
        bi = np.empty(nl, np.int32)
        jw = np.empty(nl, np.int32)
        for j in range(nl):
            jw[j] = j * sw
        phs = np.empty(sw * h * wl, x.dtype)  # phs[q*h*wl + r*wl + m] = x[p, r, q + m*sw]
        for m in range(phs.size):
            phs[m] = 0  # the rows' tails are read by rounded-up runs and never kept
        for p in range(ch * pp // nch, (ch + 1) * pp // nch):
            xp, yp, ip = x[p], y[p], idx[p]
            if nj > 0 and sw == 2:
                # both phases in one loop: LLVM vectorises the stride-2 pair with shuffles
                for r in range(h):
                    src = xp[r]
                    d0 = phs[r * wl:(r + 1) * wl]
                    d1 = phs[(h + r) * wl:(h + r + 1) * wl]
                    for m in range(w // 2):
                        d0[m] = src[2 * m]
                        d1[m] = src[2 * m + 1]
                    if w % 2:
                        d0[w // 2] = src[w - 1]
            elif nj > 0:
                for r in range(h):
                    src = xp[r]
                    for q in range(sw):
                        dst = phs[(q * h + r) * wl:(q * h + r + 1) * wl]
                        for m in range(cnt[q]):
                            dst[m] = src[q + m * sw]
            for i in range(oh):
                h0 = i * sh - ph
                j0, j1 = ow, ow
                if nj > 0 and h0 >= 0 and h0 + (kh - 1) * dh < h:  # rows inside: vector runs
                    j0, j1 = jlo, jhi
                    for a in range(kh):
                        r = h0 + a * dh
                        for t in range(kw):
                            o = toff[t] + r * wl
                            src = phs[o:o + nl]
                            base = np.int32(r * w + c0 + t * dw)
                            _max_run(src, base, jw, a == 0 and t == 0, av, ai, bv, bi, nl)
                            av, bv = bv, av
                            ai, bi = bi, ai
                    for j in range(nj):
                        yp[i, jlo + j] = av[j]
                        ip[i, jlo + j] = ai[j]
                for jj in range(j0 + ow - j1):  # windows clipped by the border: one at a time
                    j = jj if jj < j0 else jj - j0 + j1
                    # PyTorch's scan: the first in-bounds row / column, then row-major; starting
                    # from the first element is the same as its (-inf, first index), and a window
                    # entirely in the padding gives (-inf, its first position) as PyTorch does
                    a0 = h0 + ((dh - 1 - h0) // dh) * dh if h0 < 0 else h0
                    a1 = min(h0 + (kh - 1) * dh + 1, h)
                    w0 = j * sw - pw
                    w1 = min(w0 + (kw - 1) * dw + 1, w)
                    if w0 < 0:
                        w0 += ((dw - 1 - w0) // dw) * dw
                    b = xp[a0, w0] if a0 < a1 and w0 < w1 else ninf
                    bj = a0 * w + w0
                    for ih in range(a0, a1, dh):
                        for iw in range(w0, w1, dw):
                            v = xp[ih, iw]
                            upd = (v > b) | (v != v)
                            b = v if upd else b
                            bj = ih * w + iw if upd else bj
                    yp[i, j] = b
                    ip[i, j] = bj


@kernel
def _max_forward_2x2(x, y, idx):
    """2x2 windows, stride 2, no padding or dilation, every window inside the plane (LeNet's and
    VGG's pooling).  One pass per output row reads both input rows at stride 2 (LLVM vectorises the
    pairs as interleaved loads and the selects as blends): flat arrays and unsigned offsets, the
    same scan order and comparisons as ``_max_forward``, so the same values and indices.  One
    process, 2 threads, against the former per-row views through scratch rows rounded up to whole
    vectors: 384x28x28 planes (lenet5-pool) 0.062 -> 0.044 ms, 512x56x56 0.258 -> 0.197,
    1024x112x112 even (2.5)."""
    pp, h, w = x.shape
    oh, ow = y.shape[1], y.shape[2]
    xf = x.reshape(-1)
    yf = y.reshape(-1)
    idf = idx.reshape(-1)
    wu = _u(w)
    for p in prange(pp):
        for i in range(oh):
            s = _u((p * h + 2 * i) * w)
            o = _u((p * oh + i) * ow)
            k0 = 2 * i * w
            for j in range(_u(ow)):
                q = s + _u(2) * j
                k = k0 + 2 * np.int64(j)
                m, t = xf[q], k
                m, t = _upd(xf[q + _u(1)], m, k + 1, t)
                m, t = _upd(xf[q + wu], m, k + w, t)
                m, t = _upd(xf[q + wu + _u(1)], m, k + w + 1, t)
                yf[o + j] = m
                idf[o + j] = t


@_micro
def _max3s2_row(e, o, hv, hi, n):
    # outputs 0..n-1 of one row's horizontal pass: windows (e[j], o[j], e[j+1]), the even and odd
    # columns of a row offset by pw, in PyTorch's scan order with its NaN rule; hi holds the
    # winner's column in the offset row.  Unit-stride loads: read at stride 2 from one row (s[2j],
    # s[2j+1], s[2j+2]), LLVM left this loop scalar and the kernel ran 1.7x slower than the general one.
    for j in range(n):
        a, b, c = e[j], o[j], e[j + 1]
        k = np.int32(2 * j)
        u = (b > a) | (b != b)
        m = b if u else a
        kk = k + np.int32(1) if u else k
        u = (c > m) | (c != c)
        hv[j] = c if u else m
        hi[j] = k + np.int32(2) if u else kk


@_micro
def _max_rows(sv, si, base, av, ai, bv, bi, n):
    # (bv, bi) = the running maximum (av, ai) updated by one more row's (sv, si + base).  Into
    # other arrays: written back in place (``av[j] = v if u else av[j]``), LLVM made the stores
    # conditional (masked, microcode on Zen 3) or left the loop scalar.
    for j in range(n):
        v = sv[j]
        b = av[j]
        u = (v > b) | (v != v)
        bv[j] = v if u else b
        bi[j] = si[j] + base if u else ai[j]


@kernel
def _max_forward_sep(x, y, idx, kh, kw, sh, sw, ph, pw):
    """Separable max-pool forward: column stride 1 with any window width (YOLO's 5x5/s1, 3x3/s1),
    or windows 3 wide at column stride 2 (ResNet's 3x3/s2); no dilation, any kh, sh, ph, every
    window holding an input element, planes under 2**31 elements.  A horizontal pass per input row
    (the maximum over each output column's kw columns), then a vertical pass per output row over its
    kh rows' results, each a unit-stride vector loop with no scalar remainder (rows rounded up to
    whole vectors): at stride 2 the row's even and odd columns (offset by pw) are split into two
    scratch rows, at stride 1 the row is copied behind pw zeros and each tap is one run.  The same
    values and indices as ``_max_forward``: row by row, each row's first maximum (or last NaN), then
    the rows in order with the same rule, is the row-major scan.  Output columns whose windows the
    border clips are redone one at a time.  2 threads, AVX2, against ``_max_forward``: resnet50-pool
    (8x64x112x112, 3x3/s2) 13.5 -> 4.6 ms; 8x64x56x56 3x3/s1 7.5 -> 5.5 ms, 5x5/s1 17.7 -> 7.7 ms."""
    pp, h, w = x.shape
    oh, ow = y.shape[1], y.shape[2]
    nl = max(round_run(ow, RUN_PAIR), (w + 1) // 2)
    jlo = (pw + sw - 1) // sw  # columns whose windows lie inside [0, w)
    jhi = max(jlo, min(ow, (w - kw + pw) // sw + 1))
    nch = min(pp, 64)
    for ch in prange(nch):
        e = np.zeros(nl + 1, x.dtype)  # stride 2: e[m], o[m] = column 2m - pw, 2m + 1 - pw of the row
        o = np.zeros(nl + 1, x.dtype)
        s = np.zeros(max(nl + kw, w + pw), x.dtype)  # stride 1: s[pw + c] = column c of the row
        jw = np.empty(nl, np.int32)
        for j in range(nl):
            jw[j] = j
        hv = np.empty(h * nl, x.dtype)  # the horizontal pass: maxima and their positions in e/o or s
        hi = np.empty(h * nl, np.int32)
        av = np.empty(nl, x.dtype)  # a running maximum, and the next one
        ai = np.empty(nl, np.int32)
        bv = np.empty(nl, x.dtype)
        bi = np.empty(nl, np.int32)
        for p in range(ch * pp // nch, (ch + 1) * pp // nch):
            xp = x[p]
            for r in range(h):
                src = xp[r]
                q = r * nl
                if sw == 1:
                    for c in range(w):
                        s[pw + c] = src[c]
                    for j in range(nl):
                        av[j] = s[j]
                        ai[j] = jw[j]
                    for t in range(1, kw):
                        _max_rows(s[t:t + nl], jw, np.int32(t), av, ai, bv, bi, nl)
                        av, bv = bv, av
                        ai, bi = bi, ai
                    for j in range(nl):
                        hv[q + j] = av[j]
                        hi[q + j] = ai[j]
                else:
                    if pw == 0:
                        for m in range(w // 2):
                            e[m] = src[2 * m]
                            o[m] = src[2 * m + 1]
                        if w % 2:
                            e[w // 2] = src[w - 1]
                    else:
                        for m in range(w // 2):
                            o[m] = src[2 * m]
                            e[m + 1] = src[2 * m + 1]
                        if w % 2:
                            o[w // 2] = src[w - 1]
                    _max3s2_row(e, o, hv[q:q + nl], hi[q:q + nl], nl)
                for jj in range(jlo + ow - jhi):  # clipped windows: scan their in-bounds columns
                    j = jj if jj < jlo else jj - jlo + jhi
                    c0 = max(0, sw * j - pw)
                    c1 = min(w, sw * j - pw + kw)
                    b = src[c0]
                    bj = c0
                    for c in range(c0 + 1, c1):
                        v = src[c]
                        u = (v > b) | (v != v)
                        b = v if u else b
                        bj = c if u else bj
                    hv[q + j] = b
                    hi[q + j] = np.int32(bj + pw)
            for i in range(oh):
                r0 = max(0, i * sh - ph)
                r1 = min(h, i * sh - ph + kh)
                base = np.int32(r0 * w - pw)
                for j in range(nl):
                    av[j] = hv[r0 * nl + j]
                    ai[j] = hi[r0 * nl + j] + base
                for r in range(r0 + 1, r1):
                    q = r * nl
                    _max_rows(hv[q:q + nl], hi[q:q + nl], np.int32(r * w - pw), av, ai, bv, bi, nl)
                    av, bv = bv, av
                    ai, bi = bi, ai
                yp, ip = y[p, i], idx[p, i]
                for j in range(ow):
                    yp[j] = av[j]
                    ip[j] = ai[j]


@_micro
def _max_window(xf, pb, h, w, r0, c0, kh, kw):
    # (maximum, flat position) of one window clipped to the plane at xf[pb:]: its in-bounds elements
    # in row-major order from the first one, PyTorch's rule (greater or NaN replaces)
    a0, a1 = max(r0, 0), min(r0 + kh, h)
    b0, b1 = max(c0, 0), min(c0 + kw, w)
    best = xf[pb + a0 * w + b0]
    bi = a0 * w + b0
    for r in range(a0, a1):
        for c in range(b0, b1):
            v = xf[pb + r * w + c]
            u = (v > best) | (v != v)
            best = v if u else best
            bi = r * w + c if u else bi
    return best, bi


@_micro
def _clipped_windows(xf, pb, h, w, r0, sw, pw, j0, j1, yf, idf, yo):
    # output columns j0 .. j1-1 of one output row (windows from row r0) one window at a time
    for j in range(j0, j1):
        v, t = _max_window(xf, pb, h, w, r0, sw * j - pw, 3, 3)
        yf[yo + j] = v
        idf[yo + j] = t


@_micro
def _max3_run(xf, rb, w, pw, t0, jlo, jhi, yf, idf, yo, sw):
    # outputs jlo .. jhi-1 of one interior output row: window rows from xf[rb] (w apart), column j's
    # window from column sw*j - pw (flat position t0 + sw*j of its first tap); nine taps in order.
    # Positions in int32 (twice the vector width of int64; planes are under 2**31 elements)
    wu = _u(w)
    su = _u(sw)
    w1 = np.int32(w)
    one = np.int32(1)
    two = np.int32(2)
    for j in range(_u(jlo), _u(jhi)):
        q = _u(rb) + su * j - _u(pw)
        tj = np.int32(t0) + np.int32(sw) * np.int32(j)
        m, t = xf[q], tj
        m, t = _upd(xf[q + _u(1)], m, tj + one, t)
        m, t = _upd(xf[q + _u(2)], m, tj + two, t)
        m, t = _upd(xf[q + wu], m, tj + w1, t)
        m, t = _upd(xf[q + wu + _u(1)], m, tj + w1 + one, t)
        m, t = _upd(xf[q + wu + _u(2)], m, tj + w1 + two, t)
        m, t = _upd(xf[q + _u(2) * wu], m, tj + two * w1, t)
        m, t = _upd(xf[q + _u(2) * wu + _u(1)], m, tj + two * w1 + one, t)
        m, t = _upd(xf[q + _u(2) * wu + _u(2)], m, tj + two * w1 + two, t)
        yf[_u(yo) + j] = m
        idf[_u(yo) + j] = t


@kernel
def _max_forward_3x3(x, y, idx, sh, sw, ph, pw):
    """3x3 windows at column strides from 3 on, padding under 3, no dilation, read in place (strides
    1 and 2, ResNet's 3x3/s2 pool and 3x3/s1, take :func:`_max_forward_3x3_rows`).  Each interior
    output row is one loop over its columns with the nine taps unrolled inside, in PyTorch's
    row-major scan order, the maximum and its position kept in registers; windows the border clips
    go one at a time (:func:`_clipped_windows`).  The same values and indices as ``_max_forward``.
    Tried: a one-compare path for rows without NaN (found by a pre-scan) -- no faster, the loop is
    bound by memory, not by its compares."""
    pp, h, w = x.shape
    oh, ow = y.shape[1], y.shape[2]
    xf = x.reshape(-1)
    yf = y.reshape(-1)
    idf = idx.reshape(-1)
    ilo = (ph + sh - 1) // sh  # output rows and columns whose windows lie inside the plane
    ihi = max(ilo, min(oh, (h - 3 + ph) // sh + 1))
    jlo = (pw + sw - 1) // sw
    jhi = max(jlo, min(ow, (w - 3 + pw) // sw + 1))
    for p in prange(pp):
        pb = p * h * w
        for i in range(oh):
            r0 = i * sh - ph
            yo = (p * oh + i) * ow
            inner = ilo <= i < ihi
            for j in range(ow):
                if inner and j == jlo:  # the interior run, below
                    break
                v, t = _max_window(xf, pb, h, w, r0, j * sw - pw, 3, 3)
                yf[yo + j] = v
                idf[yo + j] = t
            if not inner:
                continue
            _max3_run(xf, pb + r0 * w, w, pw, r0 * w - pw, jlo, jhi, yf, idf, yo, sw)
            _clipped_windows(xf, pb, h, w, r0, sw, pw, jhi, ow, yf, idf, yo)


@kernel
def _max_forward_3x3_rows(x, y, idx, sh, sw, ph, pw):
    """3x3 windows at column stride 1 or 2 (ResNet's 3x3/s2/p1 pool, 3x3/s1), any row stride,
    as ``_max_forward_3x3``'s cases, through rows copied to scratch (per chunk of planes): at
    stride 2 each input row split into its even and odd columns, at stride 1 copied as it is, so
    that every tap of an output row reads a unit-stride run with room for the run rounded up to
    whole vectors.  Each output row is one loop over its columns with the window's in-bounds rows'
    taps unrolled (three rows, or the two or one the padding leaves at the first and last output
    rows), the maximum and its position in registers, into scratch rows stored after
    (:func:`_max3_rows`); each input row is copied once, into one of three slots (three
    consecutive rows never share one).  Only the columns the padding clips go through
    :func:`_max_window`.  Read in place (``_max_forward_3x3``) the stride-2 taps were gathers,
    and LLVM (znver4) left both strides' loops scalar; a 7-column scalar remainder cost as much as
    the vector part of a 55-column row.  Zen 4, 2 threads, ms before -> after (the channels_last
    kernel): resnet50-pool (8x64x112x112, 3x3/s2/p1) 4.8 -> 1.9 (1.5), 32x64x32x32 3x3/s2/p1
    4.7 -> 1.3 (0.5), 8x64x56x56 3x3/s1/p1 3.4 -> 2.0 (1.3).  The same values and indices as
    ``_max_forward``."""
    pp, h, w = x.shape
    oh, ow = y.shape[1], y.shape[2]
    xf = x.reshape(-1)
    yf = y.reshape(-1)
    idf = idx.reshape(-1)
    jlo = (pw + sw - 1) // sw  # output columns whose windows lie inside the plane's columns
    jhi = max(jlo, min(ow, (w - 3 + pw) // sw + 1))
    nl = (jhi - jlo) + (-(jhi - jlo)) % _RUN  # the runs rounded up to whole vectors
    if sw == 2:
        half = max((w + 1) // 2 + 1, jlo + nl + 2)  # a split row's even (then odd) columns
    else:
        half = max(w + 1, jlo + nl + 3)  # a copied row (the odd half unused)
    nch = min(pp, 64)  # chunks of planes share their scratch
    for ch in prange(nch):
        eo = np.zeros(6 * half, x.dtype)  # slot q: eo[2q*half:] and eo[(2q+1)*half:] (see _copy_row)
        tag = np.empty(3, np.int64)  # the input row each slot holds
        sv = np.empty(half, x.dtype)  # an output row's maxima and positions before they are stored
        si = np.empty(half, np.int32)
        for p in range(ch * pp // nch, (ch + 1) * pp // nch):
            pb = p * h * w
            for q in range(3):
                tag[q] = -1
            for i in range(oh):
                r0 = i * sh - ph
                ra = max(r0, 0)
                nr = min(r0 + 3, h) - ra
                yo = (p * oh + i) * ow
                for r in range(ra, ra + nr):
                    if tag[r % 3] != r:
                        tag[r % 3] = r
                        _copy_row(xf, _u(pb + r * w), w, sw, eo, _u(2 * (r % 3) * half), _u(half))
                _clipped_windows(xf, pb, h, w, r0, sw, pw, 0, jlo, yf, idf, yo)
                if jhi > jlo:
                    _max3_rows(eo, half, ra, nr, pw, w, sw, jlo, nl, sv, si)
                    yu = _u(yo + jlo)
                    for jj in range(_u(jhi - jlo)):
                        yf[yu + jj] = sv[jj]
                        idf[yu + jj] = si[jj]
                _clipped_windows(xf, pb, h, w, r0, sw, pw, jhi, ow, yf, idf, yo)


@_micro
def _copy_row(xf, rb, w, sw, eo, e0, half):
    # the row at xf[rb:rb + w] into scratch: at stride 2 its even columns at eo[e0:] and odd ones at
    # eo[e0 + half:], at stride 1 all of it at eo[e0:]
    if sw == 2:
        o0 = e0 + half
        for m in range(_u(w // 2)):
            eo[e0 + m] = xf[rb + _u(2) * m]
            eo[o0 + m] = xf[rb + _u(2) * m + _u(1)]
        if w % 2:
            eo[e0 + _u(w // 2)] = xf[rb + _u(w - 1)]
    else:
        for m in range(_u(w)):
            eo[e0 + m] = xf[rb + m]


@_micro
def _tap_at(half, row, d, jlo, sw):
    # where column sw*j + d of input row ``row`` lies in the scratch rows (slot row % 3), for j =
    # jlo: at stride 2 even d among the even columns at j + d/2, odd d among the odd ones at
    # j + (d - 1)/2; at stride 1 at j + d
    q = row % 3
    if sw == 1:
        return _u(2 * q * half + jlo + d)
    if d % 2 == 0:
        return _u(2 * q * half + jlo + d // 2)
    return _u((2 * q + 1) * half + jlo + (d - 1) // 2)


@_micro
def _max3_rows(eo, half, ra, nr, pw, w, sw, jlo, n, sv, si):
    # n outputs from column jlo of one output row whose window's in-bounds rows are ra .. ra+nr-1
    # (nr of 1 to 3), from the scratch rows: column j's taps are columns sw*j - pw .. sw*j - pw + 2
    # of each, in PyTorch's row-major order; maxima into sv[0:n], flat positions into si[0:n].  One
    # straight loop per row count: pointing a clipped row's taps at a present row instead would
    # let a NaN there take a position outside the window
    w1 = np.int32(w)
    one = np.int32(1)
    two = np.int32(2)
    st = np.int32(sw)
    t0 = np.int32(ra * w - pw) + st * np.int32(jlo)
    b00 = _tap_at(half, ra, -pw, jlo, sw)
    b01 = _tap_at(half, ra, 1 - pw, jlo, sw)
    b02 = _tap_at(half, ra, 2 - pw, jlo, sw)
    if nr == 1:
        for jj in range(_u(n)):
            tj = t0 + st * np.int32(jj)
            m, t = eo[b00 + jj], tj
            m, t = _upd(eo[b01 + jj], m, tj + one, t)
            m, t = _upd(eo[b02 + jj], m, tj + two, t)
            sv[jj] = m
            si[jj] = t
        return
    r1 = ra + 1
    b10 = _tap_at(half, r1, -pw, jlo, sw)
    b11 = _tap_at(half, r1, 1 - pw, jlo, sw)
    b12 = _tap_at(half, r1, 2 - pw, jlo, sw)
    if nr == 2:
        for jj in range(_u(n)):
            tj = t0 + st * np.int32(jj)
            m, t = eo[b00 + jj], tj
            m, t = _upd(eo[b01 + jj], m, tj + one, t)
            m, t = _upd(eo[b02 + jj], m, tj + two, t)
            m, t = _upd(eo[b10 + jj], m, tj + w1, t)
            m, t = _upd(eo[b11 + jj], m, tj + w1 + one, t)
            m, t = _upd(eo[b12 + jj], m, tj + w1 + two, t)
            sv[jj] = m
            si[jj] = t
        return
    r2 = ra + 2
    b20 = _tap_at(half, r2, -pw, jlo, sw)
    b21 = _tap_at(half, r2, 1 - pw, jlo, sw)
    b22 = _tap_at(half, r2, 2 - pw, jlo, sw)
    for jj in range(_u(n)):
        tj = t0 + st * np.int32(jj)
        m, t = eo[b00 + jj], tj
        m, t = _upd(eo[b01 + jj], m, tj + one, t)
        m, t = _upd(eo[b02 + jj], m, tj + two, t)
        m, t = _upd(eo[b10 + jj], m, tj + w1, t)
        m, t = _upd(eo[b11 + jj], m, tj + w1 + one, t)
        m, t = _upd(eo[b12 + jj], m, tj + w1 + two, t)
        m, t = _upd(eo[b20 + jj], m, tj + two * w1, t)
        m, t = _upd(eo[b21 + jj], m, tj + two * w1 + one, t)
        m, t = _upd(eo[b22 + jj], m, tj + two * w1 + two, t)
        sv[jj] = m
        si[jj] = t


@kernel
def _max_backward(gy, idx, gx, bad):
    pp, hw = gx.shape
    m = gy.shape[1]
    for p in prange(pp):
        g = gx[p]
        g[:] = 0  # zeroed by the thread that scatters into it: parallel first touch
        for o in range(m):
            t = idx[p, o]
            if t < 0 or t >= hw:
                bad[p] = 1
            else:
                g[t] += gy[p, o]


@kernel
def _avg_forward(x, y, kh, kw, sh, sw, ph, pw, include_pad, override, zero):
    pp, h, w = x.shape
    oh, ow = y.shape[1], y.shape[2]
    for p in prange(pp):
        for i in range(oh):
            h0 = i * sh - ph
            h1 = min(h0 + kh, h + ph)
            for j in range(ow):
                w0 = j * sw - pw
                w1 = min(w0 + kw, w + pw)
                size = (h1 - h0) * (w1 - w0)
                a0, a1, b0, b1 = max(h0, 0), min(h1, h), max(w0, 0), min(w1, w)
                if a0 >= a1 or b0 >= b1:
                    y[p, i, j] = 0
                    continue
                div = override if override != 0 else size if include_pad else (a1 - a0) * (b1 - b0)
                acc = zero
                for ih in range(a0, a1):
                    for iw in range(b0, b1):
                        acc += x[p, ih, iw]
                y[p, i, j] = acc / div


@_micro
def _avg_row_sums(src, s, e, o, hs, w, kw, sw, pw, nl):
    # hs[j] = the sum of row ``src`` over output column j's window: the row is copied behind pw
    # zeros into s (its tail stays zero), so clipped windows add zeros; at stride 2 s is first split
    # into its even and odd columns, so every tap is a unit-stride run
    for c in range(w):
        s[pw + c] = src[c]
    for j in range(nl):
        hs[j] = 0
    if sw == 1:
        for t in range(kw):
            _add_run(hs, s[t:t + nl], nl)
    else:
        for m in range(nl + kw):
            e[m] = s[2 * m]
            o[m] = s[2 * m + 1]
        for t in range(kw):
            if t % 2:
                _add_run(hs, o[t // 2:t // 2 + nl], nl)
            else:
                _add_run(hs, e[t // 2:t // 2 + nl], nl)


@_micro
def _add_run(acc, src, n):
    for j in range(n):
        acc[j] += src[j]


@_micro
def _col_counts(nl, ow, w, kw, sw, pw, include_pad, dtype):
    # each output column's window width as the divisor counts it (with the padding, or in bounds);
    # 1 past ow and for windows with no input column
    wd = np.ones(nl, dtype)
    for j in range(ow):
        w0 = j * sw - pw
        w1 = min(w0 + kw, w + pw)
        cnt = (w1 - w0) if include_pad else (min(w1, w) - max(w0, 0))
        wd[j] = cnt if cnt > 0 else 1
    return wd


@kernel
def _avg_forward_sep(x, y, kh, kw, sh, sw, ph, pw, include_pad, override, zero):
    """Separable average-pool forward for column stride 1 or 2 (any window): the sums of each
    input row over every output column's window (``_avg_row_sums``), then per output row the sum of
    its rows' sums, divided by the window's count as ``_avg_forward`` does (``(h1-h0)*(w1-w0)``
    with the padding or the in-bounds count, or ``override``; 0 for a window with no input
    element).  Vector loops over a row of outputs, with no scalar remainder (rounded up to whole
    vectors).  The sums are associated by rows, not element by element: equal to ``_avg_forward``
    to rounding.  2 threads, AVX2, against ``_avg_forward``: 8x64x112x112 3x3/s2/p1 11.4 -> 3.4 ms,
    8x64x56x56 3x3/s1/p1 11.2 -> 1.3 ms; the backward 12.4 -> 3.5 and 10.1 -> 1.3 ms."""
    pp, h, w = x.shape
    oh, ow = y.shape[1], y.shape[2]
    nl = round_run(ow, RUN_PAIR)
    wd = _col_counts(nl, ow, w, kw, sw, pw, include_pad, x.dtype)
    nch = min(pp, 64)
    for ch in prange(nch):
        s = np.zeros(sw * (nl + kw) + 2 + w + pw, x.dtype)
        e = np.empty(nl + kw, x.dtype)
        o = np.empty(nl + kw, x.dtype)
        hs = np.empty(h * nl, x.dtype)
        acc = np.empty(nl, x.dtype)
        dv = np.empty(nl, x.dtype)
        for p in range(ch * pp // nch, (ch + 1) * pp // nch):
            xp = x[p]
            for r in range(h):
                _avg_row_sums(xp[r], s, e, o, hs[r * nl:(r + 1) * nl], w, kw, sw, pw, nl)
            for i in range(oh):
                h0 = i * sh - ph
                h1 = min(h0 + kh, h + ph)
                r0, r1 = max(h0, 0), min(h1, h)
                hd = (h1 - h0) if include_pad else (r1 - r0)
                for j in range(nl):
                    acc[j] = zero
                for r in range(r0, r1):
                    _add_run(acc, hs[r * nl:(r + 1) * nl], nl)
                if override != 0:
                    for j in range(nl):
                        dv[j] = override
                elif hd > 0:
                    for j in range(nl):
                        dv[j] = hd * wd[j]
                else:
                    for j in range(nl):
                        dv[j] = 1
                yp = y[p, i]
                for j in range(ow):
                    yp[j] = acc[j] / dv[j]


@kernel
def _avg_backward_sep(gy, gx, kh, kw, sh, sw, ph, pw, include_pad, override):
    """The transpose of ``_avg_forward_sep`` (column stride 1 or 2): each output row's gradient,
    divided by its windows' counts, is added to the row sums of its input rows; each input row's
    sums are then spread over their windows' columns (unit-stride runs into a zero-padded scratch
    row, at stride 2 through its even and odd columns) and the row's interior is written to ``gx``
    -- every element once, so ``gx`` need not be zeroed.  Equal to ``_avg_backward`` to rounding."""
    pp, h, w = gx.shape
    oh, ow = gy.shape[1], gy.shape[2]
    nl = round_run(ow, RUN_PAIR)
    wd = _col_counts(nl, ow, w, kw, sw, pw, include_pad, gy.dtype)
    nch = min(pp, 64)
    for ch in prange(nch):
        s = np.empty(sw * (nl + kw) + 2 + w + pw, gy.dtype)
        e = np.empty(nl + kw, gy.dtype)
        o = np.empty(nl + kw, gy.dtype)
        hg = np.empty(h * nl, gy.dtype)
        g = np.zeros(nl, gy.dtype)  # zero past ow, for good
        for p in range(ch * pp // nch, (ch + 1) * pp // nch):
            for m in range(h * nl):
                hg[m] = 0
            for i in range(oh):
                h0 = i * sh - ph
                h1 = min(h0 + kh, h + ph)
                r0, r1 = max(h0, 0), min(h1, h)
                hd = (h1 - h0) if include_pad else (r1 - r0)
                gr = gy[p, i]
                if override != 0:
                    for j in range(ow):
                        g[j] = gr[j] / override
                elif hd > 0:
                    for j in range(ow):
                        g[j] = gr[j] / (hd * wd[j])
                for r in range(r0, r1):
                    _add_run(hg[r * nl:(r + 1) * nl], g, nl)
            for r in range(h):
                hr = hg[r * nl:(r + 1) * nl]
                for m in range(s.size):
                    s[m] = 0
                if sw == 1:
                    for t in range(kw):
                        _add_run(s[t:t + nl], hr, nl)
                else:
                    for m in range(nl + kw):
                        e[m] = 0
                        o[m] = 0
                    for t in range(kw):
                        if t % 2:
                            _add_run(o[t // 2:t // 2 + nl], hr, nl)
                        else:
                            _add_run(e[t // 2:t // 2 + nl], hr, nl)
                    for m in range(nl + kw):
                        s[2 * m] = e[m]
                        s[2 * m + 1] = o[m]
                dst = gx[p, r]
                for c in range(w):
                    dst[c] = s[pw + c]


@kernel
def _avg_backward(gy, gx, kh, kw, sh, sw, ph, pw, include_pad, override):
    pp, h, w = gx.shape
    oh, ow = gy.shape[1], gy.shape[2]
    for p in prange(pp):
        for i in range(oh):
            h0 = i * sh - ph
            h1 = min(h0 + kh, h + ph)
            for j in range(ow):
                w0 = j * sw - pw
                w1 = min(w0 + kw, w + pw)
                size = (h1 - h0) * (w1 - w0)
                a0, a1, b0, b1 = max(h0, 0), min(h1, h), max(w0, 0), min(w1, w)
                if a0 >= a1 or b0 >= b1:
                    continue
                div = override if override != 0 else size if include_pad else (a1 - a0) * (b1 - b0)
                v = gy[p, i, j] / div
                for ih in range(a0, a1):
                    for iw in range(b0, b1):
                        gx[p, ih, iw] += v


# --------------------------------------------------------------------------- adaptive average pooling
# Output cell ``i`` of ``oh`` averages input rows ``[floor(i*h/oh), ceil((i+1)*h/oh))`` (PyTorch's
# windows: they may overlap when ``h`` is not a multiple of ``oh``), and likewise for columns.
@kernel
def _adaptive_avg_forward(x, y, zero):
    pp, h, w = x.shape
    oh, ow = y.shape[1], y.shape[2]
    for p in prange(pp):
        for i in range(oh):
            a0, a1 = (i * h) // oh, ((i + 1) * h + oh - 1) // oh
            for j in range(ow):
                b0, b1 = (j * w) // ow, ((j + 1) * w + ow - 1) // ow
                acc = zero
                for ih in range(a0, a1):
                    for iw in range(b0, b1):
                        acc += x[p, ih, iw]
                y[p, i, j] = acc / ((a1 - a0) * (b1 - b0))


@kernel
def _adaptive_avg_backward(gy, gx):
    pp, h, w = gx.shape
    oh, ow = gy.shape[1], gy.shape[2]
    # windows that tile the plane (h % oh == 0 and w % ow == 0: global pooling, ResNet's head) are
    # written once, without zeroing first and accumulating: one pass over the gradient, not two
    tiled = h % oh == 0 and w % ow == 0
    for p in prange(pp):
        g = gx[p]
        if not tiled:
            g[:] = 0  # zeroed by the thread that accumulates into it: parallel first touch
        for i in range(oh):
            a0, a1 = (i * h) // oh, ((i + 1) * h + oh - 1) // oh
            for j in range(ow):
                b0, b1 = (j * w) // ow, ((j + 1) * w + ow - 1) // ow
                v = gy[p, i, j] / ((a1 - a0) * (b1 - b0))
                for ih in range(a0, a1):
                    for iw in range(b0, b1):
                        if tiled:
                            g[ih, iw] = v
                        else:
                            g[ih, iw] += v


# --------------------------------------------------------------------------- channels_last (NHWC)
# An NCHW-shaped array whose strides are NHWC (``x.transpose(0, 2, 3, 1)`` contiguous) is pooled in
# that layout, without a transposing copy either way: each output position reads its window's taps
# as whole runs of ``c`` contiguous channels, so the inner loop is over channels (unit stride,
# vectorised) and the window bookkeeping is paid once per position rather than once per element.
# ``prange`` runs over (image, output row) for the forward passes -- disjoint outputs -- and over
# images for the backward passes, so an image's gradient belongs to one work item.  Indices are the
# same flat ``ih*w + iw`` plane positions as in NCHW (PyTorch's, in either layout).
#
# (is_channels_last and the layout views are in pooling.py.)

@_micro
def _max_tap(src, t, av, ai, bv, bi, n):
    # (bv, bi) = the running maximum (av, ai) updated by one more tap (src, position t)
    for k in range(n):
        v = src[k]
        b = av[k]
        u = (v > b) | (v != v)
        bv[k] = v if u else b
        bi[k] = t if u else ai[k]


@_micro
def _upd(v, m, tv, t):
    u = (v > m) | (v != v)
    return (v if u else m), (tv if u else t)


@_micro
def _max9(r0, r1, r2, w0, t0, w, yr, ir, n):
    # one 3x3 window inside the plane, its channels (n) in vectors: rows r0..r2 (w x c) from
    # column w0, flat position t0 of its first tap; the taps in PyTorch's row-major scan order
    for k in range(n):
        m, t = r0[w0, k], t0
        m, t = _upd(r0[w0 + 1, k], m, t0 + 1, t)
        m, t = _upd(r0[w0 + 2, k], m, t0 + 2, t)
        m, t = _upd(r1[w0, k], m, t0 + w, t)
        m, t = _upd(r1[w0 + 1, k], m, t0 + w + 1, t)
        m, t = _upd(r1[w0 + 2, k], m, t0 + w + 2, t)
        m, t = _upd(r2[w0, k], m, t0 + 2 * w, t)
        m, t = _upd(r2[w0 + 1, k], m, t0 + 2 * w + 1, t)
        m, t = _upd(r2[w0 + 2, k], m, t0 + 2 * w + 2, t)
        yr[k] = m
        ir[k] = t


@_micro
def _max4(xf, q0, w, c, t0, yf, idf, o, n):
    # one 2x2 window inside the plane: its channels (n) in vectors, tap (0, 0) at xf[q0] (rows w*c
    # apart), flat position t0 of its first tap; output at yf[o]; PyTorch's row-major scan order.
    # Flat and unsigned (a view per tap and the tap loop of the generic path cost 3x PyTorch's
    # time on 4x16x128x128)
    q = _u(q0)
    r = _u(w * c)
    cu = _u(c)
    ou = _u(o)
    for k in range(_u(n)):
        m, t = xf[q + k], t0
        m, t = _upd(xf[q + cu + k], m, t0 + 1, t)
        m, t = _upd(xf[q + r + k], m, t0 + w, t)
        m, t = _upd(xf[q + r + cu + k], m, t0 + w + 1, t)
        yf[ou + k] = m
        idf[ou + k] = t


@kernel
def _max_forward_nhwc(x, y, idx, kh, kw, sh, sw, ph, pw, dh, dw, ninf):
    n, h, w, c = x.shape
    oh, ow = y.shape[1], y.shape[2]
    k3 = (kh, kw, dh, dw) == (3, 3, 1, 1)
    k2 = (kh, kw, dh, dw) == (2, 2, 1, 1)
    xf = x.reshape(-1)
    yf = y.reshape(-1)
    idf = idx.reshape(-1)
    for q in prange(n * oh):
        b, i = q // oh, q % oh
        # the running maxima and their positions (int32: twice the vector width of int64; planes of
        # 2**31 elements or more are refused by the driver) stay in small buffers per row, read
        # from one pair and written to the other per tap (see _max_rows)
        av = np.empty(c, x.dtype)
        ai = np.empty(c, np.int32)
        bv = np.empty(c, x.dtype)
        bi = np.empty(c, np.int32)
        h0 = i * sh - ph
        a0 = h0 + ((dh - 1 - h0) // dh) * dh if h0 < 0 else h0  # first in-bounds row of the window
        a1 = min(h0 + (kh - 1) * dh + 1, h)
        for j in range(ow):
            w0 = j * sw - pw
            w1 = min(w0 + (kw - 1) * dw + 1, w)
            if w0 < 0:
                w0 += ((dw - 1 - w0) // dw) * dw
            first = a0 * w + w0
            if k2 and a1 - a0 == 2 and w1 - w0 == 2:  # 2x2 windows inside the plane: in registers
                _max4(xf, ((b * h + a0) * w + w0) * c, w, c, np.int32(first), yf, idf, ((b * oh + i) * ow + j) * c, c)
                continue
            yr, ir = y[b, i, j], idx[b, i, j]
            if a0 >= a1 or w0 >= w1:  # a window entirely in the padding, as PyTorch
                for k in range(c):
                    yr[k] = ninf
                    ir[k] = first
                continue
            if k3 and a1 - a0 == 3 and w1 - w0 == 3:  # 3x3 windows inside the plane: in registers
                _max9(x[b, a0], x[b, a0 + 1], x[b, a0 + 2], w0, np.int32(first), w, yr, ir, c)
                continue
            src = x[b, a0, w0]
            for k in range(c):
                av[k] = src[k]
                ai[k] = first
            for ih in range(a0, a1, dh):
                for iw in range(w0, w1, dw):
                    if ih > a0 or iw > w0:
                        _max_tap(x[b, ih, iw], np.int32(ih * w + iw), av, ai, bv, bi, c)
                        av, bv = bv, av
                        ai, bi = bi, ai
            for k in range(c):
                yr[k] = av[k]
                ir[k] = ai[k]


@kernel
def _max_backward_nhwc(gy, idx, gx, bad):
    # flat arrays, unsigned offsets: two views per output position cost more than its scatter
    n, hw, c = gx.shape
    m = gy.shape[1]
    gyf = gy.reshape(-1)
    idf = idx.reshape(-1)
    gxf = gx.reshape(-1)
    cu = _u(c)
    hu = _u(hw)
    for b in prange(n):
        gb = _u(b * hw * c)
        _zero(gxf, gb, hw * c)  # by the thread that scatters into it: parallel first touch
        for o in range(m):
            ob = _u((b * m + o) * c)
            for k in range(cu):
                t = _u(idf[ob + k])  # a negative index wraps past hw: refused with the others
                if t >= hu:
                    bad[b] = 1
                else:
                    gxf[gb + t * cu + k] += gyf[ob + k]


@kernel
def _avg_forward_nhwc(x, y, kh, kw, sh, sw, ph, pw, include_pad, override):
    n, h, w, c = x.shape
    oh, ow = y.shape[1], y.shape[2]
    for q in prange(n * oh):
        b, i = q // oh, q % oh
        buf = np.empty(c, x.dtype)  # sums in the input's dtype, taps in NCHW's order: the same bits
        h0 = i * sh - ph
        h1 = min(h0 + kh, h + ph)
        a0, a1 = max(h0, 0), min(h1, h)
        for j in range(ow):
            w0 = j * sw - pw
            w1 = min(w0 + kw, w + pw)
            b0, b1 = max(w0, 0), min(w1, w)
            yr = y[b, i, j]
            if a0 >= a1 or b0 >= b1:
                yr[:] = 0
                continue
            div = override if override != 0 else (h1 - h0) * (w1 - w0) if include_pad else (a1 - a0) * (b1 - b0)
            for k in range(c):
                buf[k] = 0
            for ih in range(a0, a1):
                for iw in range(b0, b1):
                    src = x[b, ih, iw]
                    for k in range(c):
                        buf[k] += src[k]
            for k in range(c):
                yr[k] = buf[k] / div


@kernel
def _avg_backward_nhwc(gy, gx, kh, kw, sh, sw, ph, pw, include_pad, override):
    n, h, w, c = gx.shape
    oh, ow = gy.shape[1], gy.shape[2]
    for b in prange(n):
        g = gx[b]
        g[:] = 0
        for i in range(oh):
            h0 = i * sh - ph
            h1 = min(h0 + kh, h + ph)
            a0, a1 = max(h0, 0), min(h1, h)
            for j in range(ow):
                w0 = j * sw - pw
                w1 = min(w0 + kw, w + pw)
                b0, b1 = max(w0, 0), min(w1, w)
                if a0 >= a1 or b0 >= b1:
                    continue
                div = override if override != 0 else (h1 - h0) * (w1 - w0) if include_pad else (a1 - a0) * (b1 - b0)
                gr = gy[b, i, j]
                for ih in range(a0, a1):
                    for iw in range(b0, b1):
                        dst = g[ih, iw]
                        for k in range(c):
                            dst[k] += gr[k] / div


@kernel
def _adaptive_avg_forward_nhwc(x, y, zero):
    n, h, w, c = x.shape
    oh, ow = y.shape[1], y.shape[2]
    for q in prange(n * oh):
        b, i = q // oh, q % oh
        buf = np.empty(c, x.dtype)
        a0, a1 = (i * h) // oh, ((i + 1) * h + oh - 1) // oh
        for j in range(ow):
            b0, b1 = (j * w) // ow, ((j + 1) * w + ow - 1) // ow
            for k in range(c):
                buf[k] = zero
            for ih in range(a0, a1):
                for iw in range(b0, b1):
                    src = x[b, ih, iw]
                    for k in range(c):
                        buf[k] += src[k]
            yr = y[b, i, j]
            div = (a1 - a0) * (b1 - b0)
            for k in range(c):
                yr[k] = buf[k] / div


@kernel
def _adaptive_avg_backward_nhwc(gy, gx):
    n, h, w, c = gx.shape
    oh, ow = gy.shape[1], gy.shape[2]
    tiled = h % oh == 0 and w % ow == 0  # as in the NCHW kernel: written once, no zeroing
    for q in prange(n * oh):  # output rows: with tiled windows their input rows are disjoint
        b, i = q // oh, q % oh
        if not tiled and i > 0:
            continue
        g = gx[b]
        if not tiled:
            g[:] = 0
        lo, hi = (i, i + 1) if tiled else (0, oh)
        for i2 in range(lo, hi):
            a0, a1 = (i2 * h) // oh, ((i2 + 1) * h + oh - 1) // oh
            for j in range(ow):
                b0, b1 = (j * w) // ow, ((j + 1) * w + ow - 1) // ow
                gr = gy[b, i2, j]
                div = (a1 - a0) * (b1 - b0)
                for ih in range(a0, a1):
                    for iw in range(b0, b1):
                        dst = g[ih, iw]
                        if tiled:
                            for k in range(c):
                                dst[k] = gr[k] / div
                        else:
                            for k in range(c):
                                dst[k] += gr[k] / div
