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
``wf x s`` products per kernel, :func:`._fft_kernels._kernel_rows`) is done first, and the DFT
along ``r`` is evaluated per frequency inside the contraction kernel, right before the channel sum
uses it (r/4 complex multiply-adds per (c, k) and frequency after one radix-4 step over the rows
u, u + nh/4, u + nh/2, u + 3nh/4 -- cheaper than an FFT of a mostly-zero plane, and it keeps the
spectra in cache).  grad_weight does the same in reverse (``_fft_kernels._spectral_wgrad``,
``_wgrad_rows``).  Nothing is cached between calls: weights change every training step.

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
one step stay under ``p.workspace_limit`` bytes (:func:`._fft_plan._plan`); when even the
smallest tiling cannot fit, :func:`supports` says so.

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

import numba
import numpy as np
import scipy.fft as sfft

from .._config import result, scratch
from ._fft_kernels import _kernel_rows, _pack, _spectral_conv, _spectral_wgrad, _unpack, _wgrad_rows
from ._fft_plan import _cost_of, _plan, _whole

try:  # pocketfft's own binding (inside scipy) takes out=: transforms then write into reused buffers
    from scipy.fft._pocketfft import pypocketfft as _pocket
except ImportError:  # pragma: no cover - other scipy layouts: the public functions (fresh outputs)
    _pocket = None


# --------------------------------------------------------------------------- registry
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
    y = result(p.y_shape, dt)
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
    gx = result(p.x_shape, dt)
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
