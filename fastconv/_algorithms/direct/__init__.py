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
  Strided depthwise layers run on the channel-vectorised kernels of ``depthwise_cv`` instead (an
  item is one image and two vectors of channels, copied channels-innermost; 1.3-2x the plane-wise
  kernels on MobileNet's stride-2 layers, slower at stride 1).
"""
import functools

import numpy as np
import numba

from ... import _cpu
from ..._config import result
from ..._jit import RUN_PAIR
from ..common import SLACK, pad_planes, transposed_weight
from .blocks import _FWD_KB, _FWD_TILE
from .depthwise import _DW_RB, _dw_forward, _dw_grad_weight, _dw_same3x3
from .depthwise_cv import dwc_forward, dwc_grad_input, dwc_grad_weight
from .general import _forward, _grad_input, _grad_weight
from .per_image import _STACK_COLS, _forward_img, _grad_input_img, _grad_weight_img
from .tap_rows import GW_PARTS, grad_weight_rows, padded_channels, taps_per_pass, usable as _rows_usable
from .._gemm_kernels import VBYTES

_GI_CB = 8        # input channels per work item of the strided grad_input scatter
_IMG_MIN_ITEMS = 16          # per-image forward: at least this many (image, group) items ...
_IMG_MAX_BYTES = 256 * 1024  # ... whose padded planes take at most this much each
_IMG_PARTS = 32              # per-image grad_weight: batch chunks summed into separate parts
_IMG_MAX_PART = 4 << 20      # per-image grad_weight: bytes of the per-item partial sums
_ROWS_MAX_BYTES = 1 << 20    # tap_rows grad_weight: an image's gradient rows per part (within L2)


def _depthwise(p):
    return p.cg == 1 and p.kg == 1


# Channel-vectorised depthwise kernels (depthwise_cv) for strided layers: measured against the
# plane-wise kernels (AVX2 EPYC, 2 threads, float32, 3x3, forward / forward + backward ms) on
# MobileNet's stride-2 layers 16x64x24x24 1.75 / 5.3 -> 1.30 / 3.8, 16x128x12x12 1.40 / 4.2 ->
# 0.87 / 2.6, 16x256x6x6 1.33 / 3.9 -> 0.68 / 2.0; at stride 1 they lost (16x64x24x24 0.73 ->
# 2.3 forward).  None lets _cv_depthwise decide (tests force True/False to reach both).
_CV = None
# ... except on tiny planes, where the plane-wise kernels' per-plane work dominates: 3x3 'same',
# forward / forward + backward ms, 2 threads: 16x256x3x3 0.84 / 1.22 -> 0.40 / 0.67, 4x4 0.44 /
# 0.70 -> 0.28 / 0.49, 6x6 0.51 / 0.85 -> 0.46 / 0.79; even at 7x7, 8x8 1.4x slower.  Only with
# channels to fill the vectors (16): a single-channel convolution (a depthwise one too) of small
# planes stays on the plane kernels, whose sums a chunked (Dask) run of its blocks repeats exactly
_CV_MAX_PLANE = 36
_CV_MIN_CHANNELS = 16


def _cv_depthwise(p):
    """Depthwise layers that run channels-innermost: the strided ones, and those of tiny planes."""
    if _CV is not None:
        return _CV and _depthwise(p)
    return _depthwise(p) and (p.sh != 1 or p.sw != 1 or (p.oh * p.ow <= _CV_MAX_PLANE and p.c >= _CV_MIN_CHANNELS))


def _cv_block(p):
    """Channels per work item (two vectors of the dtype) and the channel count padded to whole blocks."""
    cb = 2 * _cpu.vector_bytes() // p.itemsize
    return cb, -(-p.c // cb) * cb


def _cv_taps(w, p, cpad):
    """(taps, cpad) weights, zero past c: a tap's weights for a block of channels are one vector."""
    wt = np.zeros((p.r * p.s, cpad), dtype=p.dtype)
    wt[:, :p.c] = np.asarray(w).reshape(p.c, p.r * p.s).T
    return wt


def _cv_forward(x, w, b, p):
    cb, cpad = _cv_block(p)
    bb = np.zeros(cpad, dtype=p.dtype)
    if b is not None:
        bb[:p.c] = b
    y = result(p.y_shape, p.dtype)
    if y.size:
        dwc_forward(np.ascontiguousarray(x), _cv_taps(w, p, cpad), bb, y, p.ph0, p.pw0, p.hp, -(-p.wp // p.sw), p.sh, p.sw,
                    p.dh, p.dw, p.s, cb, *_workers(p.n * (cpad // cb)))
    return y


def _cv_grad_input(gy, w, p):
    cb, cpad = _cv_block(p)
    gx = result(p.x_shape, p.dtype)
    if gx.size:
        dwc_grad_input(np.ascontiguousarray(gy), _cv_taps(w, p, cpad), gx, p.ph0, p.pw0, p.hp, -(-p.wp // p.sw), p.sh, p.sw,
                       p.dh, p.dw, p.s, cb, *_workers(p.n * (cpad // cb)))
    return gx


def _cv_grad_weight(gy, x, p):
    cb, cpad = _cv_block(p)
    gwt = np.zeros((p.r * p.s, cpad), dtype=p.dtype)
    if p.c:
        dwc_grad_weight(np.ascontiguousarray(gy), np.ascontiguousarray(x), gwt, p.ph0, p.pw0, p.hp, -(-p.wp // p.sw), p.sh,
                        p.sw, p.dh, p.dw, p.s, cb, *_workers(cpad // cb))
    return np.ascontiguousarray(gwt[:, :p.c].T).reshape(p.w_shape)


def _dw_conv(x, w, b, top, left, hp, wp, sh, sw, dh, dw, oh, ow):
    """Depthwise forward of unpadded ``x`` (n, c, h, w) by (c, 1, r, s) weights; ``top``/``left``
    pad (negative: crop) and ``hp``/``wp`` is the padded extent."""
    n, c = x.shape[0], x.shape[1]
    r, s = w.shape[2], w.shape[3]
    wq = -(-wp // sw)
    _, tb = _taps(1, r, s, dh, dw, sw, hp, wq)
    y = result((n, c, oh, ow), x.dtype)
    rb = 1 if sh != 1 else _DW_RB
    if b is None:
        b = np.zeros(c, dtype=x.dtype)
    h, wd = x.shape[2], x.shape[3]
    if (r, s, sh, sw, dh, dw, top, left, oh, ow) == (3, 3, 1, 1, 1, 1, 1, 1, h, wd) and min(h, wd) >= 3 and y.size:
        # 3x3 'same' (MobileNet's stride-1 layers, and their input gradient): flat runs, no copies
        _dw_same3x3(np.ascontiguousarray(x), np.ascontiguousarray(w).reshape(c, 9), np.ascontiguousarray(b), y,
                    *_workers(n * c), x.dtype.type(0))
        return y
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


def _gi_per_image(p):
    """Whether a stride-1 grad_input (finite weights) runs as ``W.T @ g`` plus col2im per image
    (``_grad_input_img``) rather than the correlation (see :func:`_gi_img_pays`)."""
    tn = p.cg * p.r * p.s
    ln = (p.oh - 1) * p.wp + p.ow + 8
    return (not _depthwise(p) and _gi_img_pays(p, tn)
            and _per_image(p.n, p.g, p.cg, p.hp * p.wp + SLACK, p.itemsize)
            and (tn + p.kg) * ln * p.itemsize <= _IMG_MAX_BYTES)


def _gw_per_image(p):
    """Whether grad_weight runs per image (``_grad_weight_img``): parallel over images only (groups
    are summed inside an item), so it needs many images, not items, and each item's planes and
    partial sums within their budgets."""
    hp, wq = p.hp, -(-p.wp // p.sw)
    plane, gplane = p.sw * hp * wq + SLACK, p.oh * wq + SLACK
    nch = min(p.n, _IMG_PARTS)
    return (p.n >= _IMG_MIN_ITEMS and _per_image(p.n, p.g, p.cg, plane, p.itemsize)
            and p.kg * gplane * p.itemsize <= _IMG_MAX_BYTES
            and nch * p.k * p.cg * p.r * p.s * p.itemsize <= _IMG_MAX_PART)


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
    y = result((n, k, oh, ow), x.dtype)
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
    if _cv_depthwise(p):
        return _cv_forward(x, w, b, p)
    if _depthwise(p):
        return _dw_conv(x, w, b, p.ph0, p.pw0, p.hp, p.wp, p.sh, p.sw, p.dh, p.dw, p.oh, p.ow)
    return _conv(x, p.ph0, p.ph1, p.pw0, p.pw1, w, b, p.sh, p.sw, p.dh, p.dw, p.g, p.oh, p.ow)


def grad_input(gy, w, p):
    if _cv_depthwise(p):
        return _cv_grad_input(gy, w, p)
    # the correlation multiplies every weight by the zeros around gy: a NaN or Inf weight would
    # make NaN where PyTorch, which sums only real terms, has a number; the scatter sums only those
    if p.sh == 1 and p.sw == 1 and np.isfinite(w).all():
        tn = p.cg * p.r * p.s
        if _gi_per_image(p):
            _, tb = _taps(p.cg, p.r, p.s, p.dh, p.dw, 1, p.hp, p.wp)
            wt = np.ascontiguousarray(np.asarray(w).reshape(p.g, p.kg, tn).transpose(0, 2, 1))
            gx = result(p.x_shape, p.dtype)
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


# The per-image W.T @ g grad_input keeps tn columns in memory and reads and writes them for every
# 4 output channels: it pays only where it saves lanes over the correlation (padding that shrinks
# the output) and the columns are few.  2 threads, ms, per-image vs correlation: lenet5-c1 (25
# taps, 892 vs 1148 lanes) 0.48 vs 0.68, lenet5-c3 (150, 136 vs 248) 0.76 vs 0.95; but 32x32x9x9
# 3x3 valid (288 taps, 61 vs 97 lanes) 0.87 vs 0.61, 64x6x14x14 5x5 'same' (150 taps, equal lanes)
# 1.40 vs 1.23, 32x64x7x7 3x3 'same' (576 taps) 3.41 vs 1.68.
_GI_IMG_MAX_TAPS = 160
_GI_IMG_MAX_LANES = 0.85  # per-image lanes over the correlation's


def _gi_img_pays(p, tn):
    lanes = (p.oh - 1) * p.wp + p.ow
    corr = (p.h - 1) * (p.w + p.dw * (p.s - 1)) + p.w
    return tn <= _GI_IMG_MAX_TAPS and lanes <= _GI_IMG_MAX_LANES * corr


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


def _gw_by_rows(p):
    """Whether grad_weight runs by ``tap_rows``: one group whose output channels fit its registers
    and fill at least half a vector, and an image's gradient rows (``oh x wq x kp``) within
    _ROWS_MAX_BYTES per part."""
    if p.g != 1 or p.n == 0 or _depthwise(p) or not _rows_usable(p.k, p.itemsize):
        return False
    # at least half a vector of output channels: lenet5-c1's 6 of 16 lanes took 0.41 ms where the
    # per-image dot kernel takes 0.21
    return (2 * p.k >= VBYTES // p.itemsize
            and p.oh * p.wp * padded_channels(p.k, p.itemsize) * p.itemsize <= _ROWS_MAX_BYTES)


def _rows_eff(p):
    """Share of ``tap_rows``' lanes and loop steps that are real products: channels past k in the
    last vector, the columns between the rows of a merged run, a partial block of taps."""
    kp = padded_channels(p.k, p.itemsize)
    npos = taps_per_pass(kp, p.itemsize)
    tn = p.cg * p.r * p.s
    run = (p.oh - 1) * p.wp + p.ow if p.sh == 1 and p.sw == 1 else p.oh * p.ow
    return (p.k / kp) * (p.oh * p.ow / run) * (tn / (-(-tn // npos) * npos))


def _gw_rows(gy, x, p):
    """grad_weight by ``tap_rows`` (output channels as lanes): one group only."""
    xq, _, wq, finite = pad_planes(x, p.ph0, p.ph1, p.pw0, p.pw1, 1, check_finite=True)
    toff = _rows_taps(p.cg, p.r, p.s, p.dh, p.dw, wq, xq.shape[2])
    kp = padded_channels(p.k, p.itemsize)
    per = -(-p.n // min(p.n, GW_PARTS))
    npart = -(-p.n // per)
    tn = toff.size
    parts = np.empty((npart, tn * kp), dtype=p.dtype)
    grows = np.empty((npart, p.oh * wq * kp), dtype=p.dtype)
    merged = p.sh == 1 and p.sw == 1 and finite
    grad_weight_rows(xq, toff, np.ascontiguousarray(gy), p.oh, p.ow, wq, p.sh, p.sw, merged, kp, per, parts,
                     grows)
    tot = parts[0]
    for i in range(1, npart):  # in order: the result depends on the shape only
        tot += parts[i]
    return np.ascontiguousarray(tot.reshape(tn, kp)[:, :p.k].T).reshape(p.w_shape)


@functools.lru_cache(maxsize=256)
def _rows_taps(cg, r, s, dh, dw, wq, plane):
    """Offset of tap (c, r, s) in an image's padded planes (``tap_rows``' table; cached, read-only)."""
    c_i, r_i, s_i = np.meshgrid(np.arange(cg), np.arange(r), np.arange(s), indexing="ij")
    t = (c_i * plane + r_i * dh * wq + s_i * dw).ravel().astype(np.int64)
    t.flags.writeable = False
    return t


def grad_weight(gy, x, p):
    if _cv_depthwise(p):
        return _cv_grad_weight(gy, x, p)
    if _depthwise(p):
        wq = -(-p.wp // p.sw)
        _, tb = _taps(1, p.r, p.s, p.dh, p.dw, p.sw, p.hp, wq)
        gw = np.empty((p.k, p.r * p.s), dtype=p.dtype)
        if p.k:
            fast = p.r == 3 and p.s == 3 and p.sh == 1 and p.sw == 1 and p.dw == 1
            same = (fast and p.dh == 1 and (p.ph0, p.pw0, p.oh, p.ow) == (1, 1, p.h, p.w)
                    and min(p.h, p.w) >= 3)
            _dw_grad_weight(np.ascontiguousarray(gy), np.ascontiguousarray(x), tb, gw, p.sw, p.hp, wq,
                            p.ph0, p.pw0, p.sh, p.dh, fast, same, p.dtype.type(0))
        return gw.reshape(p.w_shape)
    if _gw_by_rows(p):
        return _gw_rows(gy, x, p)
    hp, wq = p.hp, -(-p.wp // p.sw)
    tc, tb = _taps(p.cg, p.r, p.s, p.dh, p.dw, p.sw, hp, wq)
    tn = p.cg * p.r * p.s
    nch = min(p.n, _IMG_PARTS)
    if _gw_per_image(p):
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
        seg_len = np.array([ln + (-ln) % RUN_PAIR], np.int64)  # zeros pad gy to whole vectors (SLACK)
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


def _filled(n, block):
    """Share of ``ceil(n / block)`` blocks of ``block`` that ``n`` fills."""
    return n / (-(-n // block) * block)


def cost(p, pass_, threads):
    """Work model in nominal seconds: a per-call floor plus multiply-accumulates at 8 GMAC/s per
    thread, slowed where the inner loop is short (rows under 64 lanes waste vector lanes) or the grad_input scatter
    is strided.  ``fastconv._select`` scales it to this machine (``_calibration.json``).

    A strided grad_input is a scatter only for depthwise layers (rows of ``ow`` lanes); otherwise it
    runs by phases (``_grad_input_by_phases``): stride-1 correlations over the output gradient's
    rows, as long as the forward's.  Modelling those as the scatter (0.3x efficiency on ``ow``-lane
    rows) priced resnet's 1x1 stride-2 shortcut (32x16x28x28, 1 thread) at 6.1 nominal ms for
    0.29 ms measured; now 0.42.  On the 78 suite cases of ``_calibration.json`` no choice changes; of
    the 42 ResNet/MobileNet layer x pass cases at batch 32, MobileNet's first depthwise grad_input
    goes from im2col (2.75 ms) to direct (1.52 ms), 1 thread."""
    strided = p.sh != 1 or p.sw != 1
    if pass_ == "grad_input" and strided and not _depthwise(p):
        inner = min(p.oh * (p.ow + p.s - 1), 512)
        eff = min(1.0, inner / 64.0)
    elif pass_ == "grad_input" and strided:
        # the depthwise scatter: rows of ow lanes, as fast per lane as the forward's (measured
        # 1.52 vs 1.28 ms on 32x32x28x28 3x3/s2, 1 thread), not the 0.3 of a strided read
        eff = min(1.0, p.ow / 64.0)
    else:
        eff = min(1.0, min(p.oh * p.wp, 512) / 64.0)
    if not _depthwise(p):
        # register blocks: the forward's sums are 4 output channels wide (stride-1 grad_input's
        # are 4 input channels), grad_weight's 4 output channels x 2 taps; a partial block wastes
        # its lanes (a U-Net's one-output 1x1 head: 0.30 ms forward where 4 outputs cost the same)
        if pass_ == "forward":
            eff *= _filled(p.kg, 4)
        elif pass_ == "grad_input" and not strided and not _gi_per_image(p):
            eff *= _filled(p.cg, 4)
        elif pass_ == "grad_weight" and _gw_by_rows(p):
            # tap_rows: no per-tap lane reductions; measured (Zen 4, 2 threads) 10.2 ms on
            # resnet50-3x3-64 where the dot kernels took 19.4, 0.30 on lenet5-c3 (0.52)
            eff = 1.8 * _rows_eff(p)
        elif pass_ == "grad_weight" and not _gw_per_image(p):  # the per-image kernel blocks otherwise
            eff *= _filled(p.kg, 4) * _filled(p.cg * p.r * p.s, 2)
    # workers share the work as the other algorithms' models assume (0.9 per added thread): without
    # it direct's cost stood still while theirs halved, so a table fitted at 2 threads over-picked
    # direct for calls that run on 1
    return 2e-5 + p.macs / (8e9 * max(eff, 0.05)) / (1.0 + 0.9 * (max(1, threads) - 1))
