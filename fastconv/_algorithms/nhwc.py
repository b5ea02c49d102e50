"""Convolution on channels_last (NHWC) arrays, natively: the own GEMM reading tap rows in place, and
depthwise loops along the channels.

A PyTorch user's channels_last tensor arrives as an array of shape (N, C, H, W) whose memory is
(N, H, W, C): ``x.transpose(0, 2, 3, 1)`` is then a C-contiguous view, no copy.  In that layout one
output position's taps are runs of ``cg`` contiguous channels, and the convolution of a group is

* forward: ``y (P x kg) = A (P x tn) . wt (tn x kg)`` with ``A[pos, t]`` = tap ``t = (rr*s + ss)*cg + cc``
  of output position ``pos`` (P = n*oh*ow positions of the whole batch) -- written straight into the
  NHWC output.  No column matrix and no packing of A: the micro-kernel (``gemm.ukernel_rowptr``)
  reads each tile row's channel run in place, tap by tap, a tap in the padding from a zero row
  (:func:`._nhwc_kernels.forward_rows`); groups narrower than ROWS_MIN_CHANNELS first copy their
  positions' taps into a per-worker im2row block and read the rows there
  (:func:`._nhwc_kernels.forward_im2row`).  The weights are packed once per call;
* grad_weight: ``gw (kg x tn) = gy.T (kg x P) . A (P x tn)``: A's rows gathered into packed B
  panels, the sum over positions split in a count of parts fixed by P (added in order);
* grad_input: with stride 1 (padding within the kernel's extent, finite weights) the forward pass
  on ``gy`` with the flipped, channel-swapped kernel; otherwise per (image, group) ``col = gy . w``
  in tiles and a scatter-add (col2im) into the image's NHWC gradient;
* depthwise (groups == channels): loops along the channels (:func:`dw_forward` and friends).

The public ops (``functional``) choose these for channels_last inputs (see :func:`preferred` and
``functional._native``) and hand back the result in the input's layout (an (N, K, OH, OW) array
with NHWC memory, as PyTorch's channels_last outputs).  Other algorithms compute in NCHW:
:func:`to_nchw` / :func:`to_nhwc` convert both ways with a tiled parallel transpose.

Threads: numba's one pool, workers claim items with disjoint outputs (forward: a block of
positions x a group; grad_weight: a part of the positions x a group x blocks of output channels
and taps; grad_input: an image x a group; depthwise: rows).  Results do not depend on the thread
count.
"""
from __future__ import annotations

import functools

import numba
import numpy as np

from .._config import empty_aligned, result, result_zeros, scratch
from .. import _cpu
from . import _nhwc_kernels as K
from . import _nhwc_small_kernels as KS
from . import gemm as G
from ._blas import _BLAS, serial_blas
from .common import _threads, _transposed
from .common import _workers as _nw


# ---------------------------------------------------------------------------------------- layouts
def is_channels_last(a):
    """True for a 4-D array whose memory is (N, H, W, C) but not also (N, C, H, W) (PyTorch's
    ``channels_last`` memory format seen through ``tensor.numpy()``)."""
    return a.ndim == 4 and not a.flags.c_contiguous and a.transpose(0, 2, 3, 1).flags.c_contiguous


def to_nhwc(a, out=None):
    """A C-contiguous (N, H, W, C) array of the (N, C, H, W) array ``a`` (a view when ``a`` is
    channels_last already; else written into ``out`` when given)."""
    if is_channels_last(a) or (a.shape[1] == 1 and a.flags.c_contiguous):
        return a.transpose(0, 2, 3, 1)
    n, c, h, w = a.shape
    if a.dtype.itemsize not in (4, 8):  # the kernel's register transpose moves 4- and 8-byte lanes
        return np.ascontiguousarray(a.transpose(0, 2, 3, 1))
    out = result((n, h, w, c), a.dtype) if out is None else out
    if a.size:
        K.transpose_planes(np.ascontiguousarray(a).reshape(n, c, h * w), out.reshape(n, h * w, c))
    return out


def to_nchw(a):
    """A C-contiguous (N, C, H, W) array of the (N, C, H, W)-shaped array ``a`` (``a`` itself when it
    is C-contiguous)."""
    if a.flags.c_contiguous:
        return a
    if not is_channels_last(a):
        return np.ascontiguousarray(a)
    n, c, h, w = a.shape
    if a.dtype.itemsize not in (4, 8):
        return np.ascontiguousarray(a)
    out = result((n, c, h, w), a.dtype)
    if a.size:
        K.transpose_planes(a.transpose(0, 2, 3, 1).reshape(n, h * w, c), out.reshape(n, c, h * w))
    return out


def channels_last_view(a_nhwc):
    """The (N, C, H, W)-shaped view of a C-contiguous (N, H, W, C) array."""
    return a_nhwc.transpose(0, 3, 1, 2)


def bias_grad(gyh):
    """``grad_bias`` from an NHWC output gradient (n, oh, ow, k): the sum over all but the last axis,
    accumulated in float64 (as :func:`.common.bias_grad` for NCHW) in DW_BLOCKS fixed row blocks
    (numpy's column sum took 1.6 ms for 8x56x56x128)."""
    k = gyh.shape[-1]
    g = np.ascontiguousarray(gyh).reshape(-1, k)
    if g.shape[0] == 0 or k == 0:
        return np.zeros(k, dtype=gyh.dtype)
    per = -(-g.shape[0] // min(g.shape[0], DW_BLOCKS))
    part = np.empty((-(-g.shape[0] // per), k), dtype=np.float64)
    K.sum_rows(g, part, per)
    return part.sum(axis=0).astype(gyh.dtype)


# ---------------------------------------------------------------------------------------- planning
def _blk(p):
    return G.blocking(p.dtype)


def _col_rows(p):
    """Positions per col2im tile: a tile of bm x tn elements in half of L2."""
    mr, _ = G.tile(p.itemsize)
    tn = p.r * p.s * p.cg
    rows = (_cpu.cache_sizes()["l2"] // 2) // max(1, tn * p.itemsize)
    return max(mr, min(p.oh * p.ow, rows) // mr * mr)


def need(p, pass_):
    """Bytes of scratch a pass takes: the forward's packed weights (and im2row blocks); col2im's
    tiles, row offsets and packed weights; grad_weight's GEMM buffers and partial sums; for a
    :func:`few_channels` layer the padded input copy, the weights' rows and the workers' rows or
    the parts' sums."""
    nt = numba.get_num_threads()
    ws = G.workspace_size(p.dtype) * p.itemsize * nt
    weights = p.k * p.cg * p.r * p.s * p.itemsize
    if (few_channels(p) and pass_ == "forward") or (pass_ == "grad_weight" and few_grad_weight(p)):
        kp, hp, wp, toff = _few_layout(p)
        rows = nt if pass_ == "forward" else min(max(1, p.n * p.oh), GW_SPLITS)
        sums = toff.size * kp * (1 if pass_ == "forward" else rows)
        return (p.n * hp * wp * p.c + sums + rows * p.ow * kp) * p.itemsize
    if pass_ == "forward":
        return _rows_bytes(p)
    if pass_ == "grad_input":
        q = _transposed(p)
        if q is not None:
            return _rows_bytes(q)
        tn = p.r * p.s * p.cg
        panels = -(-tn // G.tile(p.itemsize)[1]) * G.tile(p.itemsize)[1]
        return nt * _col_rows(p) * (panels * p.itemsize + 8) + p.k * panels * p.itemsize
    return ws + _gw_splits(p) * weights


def supports(p, pass_):
    """Every stride, padding, dilation and group count of at least 8 channels per group in and out
    (narrower groups, depthwise above all, would run the GEMM on partial vectors), in budget."""
    if p.g > 1 and min(p.cg, p.kg) < 8:
        return (f"groups of {p.cg} input and {p.kg} output channels: the channels_last GEMM needs at "
                f"least 8 per group")
    b = need(p, pass_)
    if b > p.workspace_limit:
        return f"needs {b} bytes of workspace (packing buffers), workspace_limit is {p.workspace_limit}"
    return None


def _rows_plan(p, m, in_place=True):
    """(positions per item, workers, NR-column panels per item) of :func:`_forward_rows`: the
    item's C block (bm x kg) -- and without ``in_place`` its im2row block (bm x tn) -- in half of
    L2, at least three items per worker where the batch allows.

    Every item streams the packed weights of its panels once.  Where they outgrow twice the L2
    (in place only) the items split the output channels instead of the positions: positions in blocks as
    large as half of L2 holds (their C block, and the rows of one channel block), the panels
    shared out for two items per worker (resnet50-3x3-512, 9.4 MB of weights for 8x7x7 positions:
    6.8 ms with six blocks of 70 positions, each streaming all of them, 5.8 with four items of all
    392 positions and 128 output channels); so do they where the positions give the workers fewer
    than two items each."""
    mr, nr = G.tile(p.itemsize)
    half = _cpu.cache_sizes()["l2"] // 2
    nthreads = numba.get_num_threads()
    npan = -(-p.kg // nr)
    tn = p.r * p.s * p.cg
    row = p.kg + (0 if in_place else tn)
    bm = max(mr, min(int(_blk(p)[1]), half // (row * p.itemsize)) // mr * mr)
    want = 3 * nthreads
    per = -(-m // max(1, -(-want // p.g)))
    bm = min(bm, max(4 * mr, -(-per // mr) * mr))
    few = -(-m // bm) * p.g < 2 * nthreads  # (16x512x3x3 1x1: three blocks of 56 positions for two workers)
    if in_place and npan > 1 and (few or p.g * npan * nr * tn * p.itemsize > 4 * half):
        pb = max(1, npan // max(1, -(-2 * nthreads // p.g)))
        rows = half // (max(pb * nr, min(tn, int(_blk(p)[0]))) * p.itemsize)
        bm = max(mr, min(-(-m // mr) * mr, rows // mr * mr))
        return bm, _nw(-(-m // bm) * p.g * -(-npan // pb)), pb
    return bm, _nw(-(-m // bm) * p.g), npan


def _rows_bytes(p):
    """Scratch of :func:`_forward_rows`: the packed weights (and the workers' im2row blocks or C
    blocks)."""
    _, nr = G.tile(p.itemsize)
    weights = p.g * -(-p.kg // nr) * nr * p.r * p.s * p.cg
    rows = 0
    if p.cg < ROWS_MIN_CHANNELS:  # the workers' im2row blocks: at most half of L2 (or MR rows) each
        per_worker = max(_cpu.cache_sizes()["l2"] // 2 // p.itemsize, G.tile(p.itemsize)[0] * p.r * p.s * p.cg)
        rows = numba.get_num_threads() * per_worker
    elif skips(p):  # forward_rows' C blocks when it skips padding taps
        bm, nw, _ = _rows_plan(p, p.n * p.oh * p.ow)
        rows = nw * bm * p.kg
    return (weights + rows) * p.itemsize


def _forward_rows(xh, w, b, p, flipped=False):
    """The forward on the row-pointer micro-kernel: tiles' rows read in place from the input
    (>= ROWS_MIN_CHANNELS channels per group) or from the item's im2row block.  With ``flipped``,
    ``p`` is a transposed geometry (``_transposed``) whose kernel is packed from the forward
    weights ``w``; then None where a weight is not finite (the caller scatters instead)."""
    mr, nr = G.tile(p.itemsize)
    m = p.n * p.oh * p.ow
    tn = p.r * p.s * p.cg
    npan = -(-p.kg // nr)
    # kept per thread (a fresh 9.4 MB for 512x512x3x3 weights was faulted in on every call: its
    # packing took 1.35 ms, 0.57 on kept memory)
    pbw = scratch("nhwc.packed_weights", p.g * npan * tn * nr, p.dtype)
    bad = np.empty(p.g * npan, np.uint8)
    if pbw.size < PACK_SERIAL_ELEMENTS:
        K.pack_weights_serial(np.ascontiguousarray(w).reshape(-1), p.g, p.kg, p.cg, p.r, p.s, pbw, nr, bad, flipped)
    else:
        K.pack_weights(np.ascontiguousarray(w).reshape(-1), p.g, p.kg, p.cg, p.r, p.s, pbw, nr, bad, flipped)
    if flipped and bad.any():
        return None
    y = result((p.n, p.oh, p.ow, p.k), p.dtype)
    in_place = p.cg >= ROWS_MIN_CHANNELS
    skip = skips(p) and not bad.any()
    bm, nw, pb = _rows_plan(p, m, in_place)
    blk = _blk(p)
    bias = np.zeros(1, p.dtype) if b is None else np.ascontiguousarray(b)
    alltaps = all_taps(p)
    noffs = (4 + p.r * p.s) * bm + p.r * p.s if alltaps else (10 if skip else 4) * bm  # see forward_rows
    args = (np.ascontiguousarray(xh).reshape(-1), p.h, p.w, p.c, p.oh, p.ow, p.sh, p.sw, p.ph0, p.pw0, p.dh,
            p.dw, p.r, p.s, p.g, p.cg, p.kg, pbw, bias, b is not None, y.reshape(-1), m,
            np.empty((nw, mr * nr), p.dtype), np.empty((nw, noffs), np.int64))
    with _threads(nw):
        if in_place:
            keys = _window_keys(p) if skip else np.zeros(1, np.int64)
            order = np.argsort(np.tile(keys, p.n), kind="stable") if skip else keys
            K.forward_rows(*args, skip, alltaps, order, keys, np.empty((nw, bm * p.kg if skip else 1), p.dtype),
                           np.zeros(int(blk[0]), p.dtype), blk, bm, pb, np.zeros(1, np.int64))
        else:
            K.forward_im2row(*args, np.empty((nw, bm * tn), p.dtype), blk, bm, np.zeros(1, np.int64))
    return y


#: Packed weights (elements) below which :func:`_forward_rows` packs them on the calling thread
#: (``pack_weights_serial``): there a parallel region costs more than the copy (packed elements, us
#: serial / parallel on two threads: 32x16x3x3 4608, 2.0 / 3.4; 64x32x3x3 18432, 6.7 / 6.0;
#: 128x64x3x3 73728, 25.7 / 16.1)
PACK_SERIAL_ELEMENTS = 1 << 14


def _inside(o, n, lo, st, d, k):
    """(o, k) booleans along one axis: tap t of output o lands inside [0, n) (o*st - lo + t*d)."""
    i = np.arange(o)[:, None] * st - lo + np.arange(k)[None, :] * d
    return (i >= 0) & (i < n)


def _window_keys(p):
    """Per output position of a plane, its window's in-bounds taps [rlo, rhi) x [slo, shi) as one
    key ((rlo*(r+1) + rhi)*(s+1) + slo)*(s+1) + shi (``forward_rows`` with ``skip``)."""
    def ranges(inside, k):
        some = inside.any(axis=1)
        return np.where(some, inside.argmax(axis=1), k), np.where(some, k - inside[:, ::-1].argmax(axis=1), 0)
    rlo, rhi = ranges(_inside(p.oh, p.h, p.ph0, p.sh, p.dh, p.r), p.r)
    slo, shi = ranges(_inside(p.ow, p.w, p.pw0, p.sw, p.dw, p.s), p.s)
    row = rlo * (p.r + 1) + rhi
    col = slo * (p.s + 1) + shi
    return (row[:, None] * (p.s + 1) * (p.s + 1) + col[None, :]).reshape(-1).astype(np.int64)


@functools.lru_cache(maxsize=256)
def padded_share(p):
    """The share of (output position, tap) pairs whose tap lies in the padding: per axis, the taps
    of each output row (column) outside the input, over all of them (the two axes multiply).
    Cached per geometry: the workspace check, the cost model and the pass each ask."""
    def share(o, k, *axis):
        return np.count_nonzero(_inside(o, *axis, k)) / max(1, o * k)
    return 1.0 - (share(p.oh, p.r, p.h, p.ph0, p.sh, p.dh) * share(p.ow, p.s, p.w, p.pw0, p.sw, p.dw))


def skips(p):
    """Whether the forward skips the taps in the padding (``forward_rows`` with ``skip``; finite weights
    too): wide groups, a share of at least SKIP_MIN_SHARE and enough work to pay for sorting the
    positions (SKIP_MIN_MACS)."""
    return (p.cg >= ROWS_MIN_CHANNELS and not all_taps(p) and p.macs >= SKIP_MIN_MACS
            and padded_share(p) >= SKIP_MIN_SHARE)


def all_taps(p):
    """Whether the forward sums every tap of a tile in one micro-kernel call (``forward_rows`` with
    ``alltaps``, ``gemm.ukernel_taps``) rather than one call per tap: groups of ROWS_MIN_CHANNELS ..
    ALL_TAPS_MAX_CHANNELS channels, whose per-tap calls reload and store the C tile every cg steps.
    It does not skip padding taps (their zeros cost less than sorting the positions)."""
    return ROWS_MIN_CHANNELS <= p.cg <= min(ALL_TAPS_MAX_CHANNELS, int(_blk(p)[0])) and p.r * p.s > 1


#: Most channels per group for :func:`all_taps`.  AVX2 EPYC, 3x3 to as many channels, ms all taps /
#: per tap (skipping padding taps where :func:`skips`), 1 thread: 32x32x14x14 1.8 / 2.9, 32x64x7x7
#: 1.6 / 2.3, 4x16x128x128 7.0 / 10.3; 2 threads: 32x64x32x32 16.0 / 21.3, 32x128x16x16 14.8 / 16.5,
#: 32x128x8x8 3.8 / 4.1, 32x192x8x8 7.9 / 8.0, 32x256x8x8 17.4 / 16.1 (the B panels of all taps
#: then stream from L2 while the per-tap calls keep theirs in L1).
ALL_TAPS_MAX_CHANNELS = 128


#: Fewest multiply-adds from which the forward skips padding taps: below, sorting the positions
#: costs more than it saves (4x24x5x5 -> 40: 0.18 ms skipping, 0.10 not).
SKIP_MIN_MACS = 1 << 24

#: Share of position-taps in the padding from which the forward skips them (:func:`padded_share`,
#: ``forward_rows`` with ``skip``).  2 threads, AVX2, ms skipping / not: 32x512x4x4 (31%) 13.5 / 17.0,
#: 32x256x8x8 (16%) 12.5 / 14.4, 8x512x7x7 (18%) 12.0 / 13.0; below 5% the sort and the copy-out
#: would cost about what they save.
SKIP_MIN_SHARE = 0.05


#: Channels per group from which the forward pass reads tiles' rows in place (runs of at least two
#: float32 vectors per tap); narrower groups (the stem's 3 channels) copy them into im2row blocks.
ROWS_MIN_CHANNELS = 16


def preferred(p, pass_):
    """Whether 'auto' runs this pass natively rather than on NCHW copies, where its NCHW choice is
    the GEMM family (or any, for 1x1 layers: their NHWC form is a plain GEMM).  Measured (2 threads,
    AVX2, ms native / converted): forward wins or ties wherever the groups are wide --
    resnet50-1x1-256 5.5 / 11.9, resnet50-3x3-s2 12.3 / 15.6, resnet50-3x3-512 11.8 / 12.3,
    16x16x48x48 1x1 to 32 0.55 / 1.32 ('auto' picks direct there); with 3 input channels it loses
    (alexnet-c1 11.7 / 9.9).  grad_input wins with enough positions (resnet50-1x1-256 5.3 / 17.9,
    16x256x6x6 1x1 0.67 / 0.81) and loses with few (resnet50-3x3-512, 392 positions, 15.5 / 13.1;
    16x512x3x3 1x1 1.35 / 1.10).  grad_weight wins for 1x1 and strided layers (resnet50-1x1-256
    8.0 / 12.8, 16x512x3x3 0.60 / 1.03, resnet50-3x3-s2 13.3 / 16.4) and not for stride-1 3x3 ones
    (resnet50-3x3-64 14.3 / 11.4 -- converted Winograd -- vgg16-3x3-128 24.5 / 25.5)."""
    if min(p.cg, p.kg) < ROWS_MIN_CHANNELS:
        return False
    if pass_ == "grad_weight":
        return p.r * p.s == 1 or p.sh * p.sw > 1
    if pass_ == "grad_input":
        return p.n * p.h * p.w >= NATIVE_MIN_POSITIONS
    return True


#: Fewest input positions (batch x plane) on which 'auto' runs grad_input natively (:func:`preferred`).
NATIVE_MIN_POSITIONS = 512


def native_beats_converting(p, pass_, isa=None, nchw=False):
    """Whether 'auto' runs this pass of a channels_last call natively whatever it chose for NCHW
    (Winograd or im2col on converted copies): ungrouped layers of 32-128 channels on AVX-512, whose
    16-lane vectors the in-place rows and grad_weight's 4x6 dot tiles fill.  Measured on the 2-core
    Xeon (2 threads, float32, steady state; ms native / 'auto's converted pick): forward and
    grad_input of 32-64 channels up to MIXED_MAX_MACS -- 32x32x28x28 1.9 / 3.5 and 2.0 / 3.6,
    32x64x14x14 2.4 / 3.5 and 2.3 / 3.3, 4x64x32x32 1.1 / 1.7 and 1.2 / 1.6, 4x32x64x64 1.4 / 1.8
    and 1.3 / 1.6 (above it Winograd catches up: 32x64x32x32 7.5 / 7.4, 8x64x56x56 6.3 / 5.2);
    grad_weight of 32-128 input channels up to GW_MAX_MACS -- 32x64x32x32 9.1 / 13.3,
    32x128x16x16 8.3 / 10.1, 8x64x56x56 7.4 / 9.1, 4x128x16x16 1.4 / 1.9 (16 channels: 4x16x128x128
    6.4 / 3.4; 256 and 512: 8.2 / 7.8, 10.1 / 7.7; vgg16-3x3-128 13.4 / 12.9); dilated layers,
    which Winograd runs as phases, every pass (dilated-3x3-d2 7.3 / 9.5, 8.9 / 17.0, 7.1 / 7.6).
    On AVX2 (8 lanes, 2x5 dot tiles) the converted Winograd won these (resnet50-3x3-64 grad_weight
    14.3 native / 11.4): there :func:`preferred` alone decides.

    With ``nchw`` (an NCHW call, which would convert to NHWC and back to run natively): small planes
    only (NCHW_MAX_PLANE) and no 1x1 layers; ms NHWC / 'auto' in NCHW, forward, grad_weight,
    backward: 32x32x28x28 2.3 / 3.2, 3.1 / 4.7, 5.3 / 7.8; 32x64x14x14 2.0 / 2.8, 2.3 / 3.5,
    4.2 / 6.3; 4x64x32x32 1.6 / 1.6, 1.9 / 2.5, 3.3 / 4.1; dilated-3x3-d2 grad_weight 10.4 / 14.4
    (its forward 9.0 / 7.8: not taken); stride 2, 32x32x14x14 -> 64: 0.56 / 0.77, 0.68 / 0.81,
    1.43 / 1.75; 4x32x64x64 forward 2.1 / 1.7 and 8x64x56x56 6.7 / 4.4 lose."""
    isa = _cpu.isa() if isa is None else isa
    if not nchw and pass_ != "grad_input" and few_channels(p):
        # a first layer's forward and grad_weight on the few-channel kernels, against converting
        # to NCHW (2 threads, Zen 4, ms few-channel / converted, forward and grad_weight):
        # 16x3x96x96 -> 16 s2 0.37 / 0.73 and 0.34 / 0.76; 32x3x32x32 -> 64 0.69 / 1.64 and
        # 0.76 / 0.75; 4x3x128x128 -> 16 0.41 / 0.60 and 0.45 / 1.48; resnet50-stem (8x3x224x224
        # -> 64, 7x7 s2) 9.9 / 14.0 and 9.9 / 10.1 (PyTorch channels_last 0.24, 0.61, 0.33, 9.3
        # forward; 0.21, 0.61, 0.33, 11.2 grad_weight)
        return True
    if not nchw and native_beats_converting(p, pass_, isa, nchw=True):
        # what pays off with both conversions does without them (a channels_last 32x16x28x28 -> 32
        # stride-2 forward took 0.85 ms converted to NCHW's direct, 0.36 natively)
        return True
    # 16 channels on one side are enough for a channels_last gradient pass with 32 or more inputs
    # (4x32x128x128 -> 16: grad_input 3.0 / 3.5, grad_weight 4.3 / 5.6) and for every pass of an
    # NCHW strided layer with 32 or more outputs (32x16x28x28 -> 32 at stride 2: forward
    # 0.48 / 0.79, grad_weight 0.58 / 0.90 since the col2im and gather fixes; the stride-1 layers
    # of 16 channels lose: 32x16x28x28 -> 16 grad_weight 3.1 / 1.5)
    cl_grad = pass_ != "forward" and not nchw and p.cg >= 32
    nchw_strided = nchw and (p.sh > 1 or p.sw > 1) and p.kg >= 32
    narrow = 16 if cl_grad or nchw_strided else 32
    widest = NCHW_STRIDED_MAX_CHANNELS if nchw_strided and pass_ != "grad_weight" else 128
    if isa != "avx512" or p.itemsize != 4 or p.g != 1 or min(p.cg, p.kg) < narrow or max(p.cg, p.kg) > widest:
        return False  # (float64 not measured)
    if nchw and (p.r * p.s == 1 or p.oh * p.ow > NCHW_MAX_PLANE and p.dh == p.dw == 1):
        return False
    if p.dh > 1 or p.dw > 1:
        return pass_ == "grad_weight" or not nchw
    if pass_ == "grad_weight":
        return p.macs <= GW_MAX_MACS
    if nchw_strided:
        # every strided NCHW forward / grad_input up to NCHW_STRIDED_MAX_CHANNELS since the col2im
        # product reads gy in place: ms 'auto' in NCHW / converted, 8x128x56x56 -> 128 forward
        # 9.7 / 8.4, grad_input 12.3 / 10.1; 32x128x14x14 -> 128 2.2 / 2.0, 5.1 / 2.8;
        # 16x128x28x28 -> 256 8.0 / 7.6, 11.7 / 9.8; 8x64x56x56 -> 128 5.3 / 4.6, 6.0 / 6.0
        return True
    if (p.sh > 1 or p.sw > 1) and not nchw:  # strided channels_last layers: preferred() decides
        return False
    return max(p.cg, p.kg) <= 64 and p.macs <= MIXED_MAX_MACS


#: Most channels (in or out) of an NCHW strided layer whose forward and grad_input
#: :func:`native_beats_converting` converts (16x256x14x14 -> 256 grad_input 8.0 / 5.8 ms; its
#: grad_weight keeps the 128 of the others: 8x256x28x28 -> 256 8.3 / 9.7)
NCHW_STRIDED_MAX_CHANNELS = 256

#: Multiply-adds up to which :func:`native_beats_converting` takes a stride-1 forward / grad_input
#: (32x32x28x28 3x3: 2.3e8, 32x64x32x32: 1.2e9).
MIXED_MAX_MACS = 4 * 10**8
#: ... and a grad_weight (32x128x16x16 3x3: 1.2e9, vgg16-3x3-128: 1.85e9).
GW_MAX_MACS = 15 * 10**8
#: Largest output plane (oh * ow) on which an NCHW call converts to run natively (32x32).
NCHW_MAX_PLANE = 1024


# ---------------------------------------------------------------------------------------- passes
def forward(xh, w, b, p):
    """``y`` (n, oh, ow, k) C-contiguous from the NHWC input ``xh`` (n, h, w, c) (module docstring)."""
    if p.n * p.oh * p.ow == 0:
        return result((p.n, p.oh, p.ow, p.k), p.dtype)
    if pointwise(p) and not own_product(p, "forward"):
        return _pointwise_rows(xh, w, b, p, p.k, p.c, True)
    if few_channels(p):
        return _few_forward(xh, w, b, p)
    return _forward_rows(xh, w, b, p)


# ---------------------------------------------------------------------------------------- few channels
#: Most input channels (one group) of a layer that :func:`few_channels` serves: a first layer's
#: RGB or grey images (taps of 3 channels are too short for the rows kernels' channel runs)
FEW_CHANNELS = 4


def few_channels(p):
    """Whether the forward and grad_weight run on the few-channel kernels
    (:mod:`._nhwc_small_kernels`: output channels as the vector lanes, one input element per tap
    and position, read from a zero-padded copy): one group of at most FEW_CHANNELS input channels
    and at most ``MAX_VECTORS`` vectors of output channels (128 float32 on AVX-512)."""
    return p.g == 1 and p.c <= FEW_CHANNELS and _few_lanes_fit(p)


def _few_lanes_fit(p):
    # the emitted loops keep at most MAX_VECTORS vectors of output channels
    return p.k <= KS.MAX_VECTORS * (G.VBYTES // p.itemsize)


#: Shortest output rows of a :func:`few_grad_weight` layer: the kernel loops over a row's positions
#: per tap block, and 7-position rows lost (ms few-channel / GEMM panels below)
FEW_GW_MIN_COLS = 16


def few_grad_weight(p):
    """Whether grad_weight runs on the few-channel kernel (:func:`_few_grad_weight`): a
    :func:`few_channels` layer, or one group of any input channels whose output channels are not a
    whole number of the GEMM's NR-column panels (neither the tap-by-tap kernel nor the panels then
    fill their tiles), not a 1x1 product, rows of at least FEW_GW_MIN_COLS positions.  Measured
    (Zen 4, 2 threads, float32, ms few-channel / panels): 3x3 stride 1 32x16x28x28 -> 16 0.70 /
    1.84, 4x16x128x128 -> 16 1.94 / 4.80, 16x16x48x48 -> 16 1.16 / 2.67, 32x8x28x28 -> 16 0.48 /
    1.41, 16x24x24x24 -> 48 1.00 / 1.53; lost: 32x16x7x7 -> 16 0.16 / 0.14, 32x16x14x14 -> 16 s2
    0.17 / 0.15, 1x1 16x16x48x48 -> 24 0.30 / 0.16; with whole panels (k = 32, 64) mixed, 0.74-1.26x."""
    if few_channels(p):
        return True
    return (p.g == 1 and not pointwise(p) and p.k % G.tile(p.itemsize)[1] != 0 and p.ow >= FEW_GW_MIN_COLS
            and _few_lanes_fit(p))


@functools.lru_cache(maxsize=256)
def _few_layout(p):
    """(kp, hp, wp, toff): output channels rounded up to whole vectors, the zero-padded input's
    rows and columns (what the windows reach), and each tap's offset in it from its position's
    first element (read-only; kept per geometry: ``need`` asks for it on every call too)."""
    lanes = G.VBYTES // p.itemsize
    hp = (p.oh - 1) * p.sh + (p.r - 1) * p.dh + 1
    wp = (p.ow - 1) * p.sw + (p.s - 1) * p.dw + 1
    rr, ss, cc = np.meshgrid(np.arange(p.r), np.arange(p.s), np.arange(p.c), indexing="ij")
    toff = ((rr * p.dh * wp + ss * p.dw) * p.c + cc).reshape(-1).astype(np.int64)
    toff.flags.writeable = False
    return -(-p.k // lanes) * lanes, hp, wp, toff


def _few_padded(xh, p, hp, wp):
    """The NHWC input in a zero-padded (n, hp, wp, c) copy, flat (kept scratch memory)."""
    xp = scratch("nhwc.few_padded", (p.n * hp * wp * p.c,), p.dtype)
    with _threads(_nw(p.n * hp)):
        KS.pad_input(np.ascontiguousarray(xh).reshape(-1), p.n, p.h, p.w, p.c, p.ph0, p.pw0, xp, hp, wp)
    return xp


def _few_forward(xh, w, b, p):
    """:func:`forward` of a :func:`few_channels` layer."""
    kp, hp, wp, toff = _few_layout(p)
    wt = empty_aligned((p.r * p.s * p.c, kp), p.dtype)  # whole vectors on cache lines
    wt[:, p.k:] = 0
    wt[:, :p.k] = np.asarray(w).transpose(2, 3, 1, 0).reshape(-1, p.k)  # taps (rr, ss, cc), then k
    xp = _few_padded(xh, p, hp, wp)
    y = result((p.n, p.oh, p.ow, p.k), p.dtype)
    bias = np.zeros(p.k, p.dtype) if b is None else np.ascontiguousarray(b, dtype=p.dtype)
    nw = _nw(p.n * p.oh)
    with _threads(nw):
        KS.forward(xp, hp, wp, p.c, p.oh, p.ow, p.sh, p.sw, toff, wt.reshape(-1), kp, bias,
                   b is not None, y.reshape(-1), p.n, p.k, empty_aligned((nw, p.ow * kp), p.dtype))
    return y


def _few_grad_weight(gyh, xh, p):
    """:func:`grad_weight` of a :func:`few_channels` layer: GW_SPLITS parts of the output rows (a
    count from the problem alone), their sums added in order."""
    kp, hp, wp, toff = _few_layout(p)
    xp = _few_padded(xh, p, hp, wp)
    rows = p.n * p.oh
    per = -(-rows // max(1, min(rows, GW_SPLITS)))
    parts = empty_aligned((-(-rows // per), p.r * p.s * p.c, kp), p.dtype)
    with _threads(_nw(parts.shape[0])):
        KS.grad_weight(np.ascontiguousarray(gyh).reshape(-1), xp, hp, wp, p.c, p.oh, p.ow, p.sh, p.sw,
                       toff, p.n, p.k, kp, per, parts, empty_aligned((parts.shape[0], p.ow * kp), p.dtype))
    total = _summed(parts)[:, :p.k].reshape(p.r, p.s, p.c, p.k)
    return np.ascontiguousarray(total.transpose(3, 2, 0, 1))


# ---------------------------------------------------------------------------------------- 1x1 layers
#: Blocks of the 1x1 layers' products (:func:`pointwise`): rows of at least POINTWISE_ROWS positions,
#: at most POINTWISE_BLOCKS of them; where that leaves fewer than POINTWISE_ITEMS blocks the columns
#: are cut too, into at most that many blocks of at least 64 (a block packs its columns of the
#: weights: 16x512x3x3 -> 512 took 0.78 ms in 64-row blocks, 0.49 in 256 and numpy's sgemm 0.28).
POINTWISE_ROWS = 256
POINTWISE_BLOCKS = 64
POINTWISE_ITEMS = 8


def pointwise(p):
    """Whether the layer is one matrix product over the batch's positions in NHWC (1x1 kernel,
    stride 1, no padding, one group), which its passes run as on the BLAS ?gemm (one thread per
    worker, blocks of rows and columns; :func:`._nhwc_kernels.pointwise_rows`).  Measured (2 threads,
    AVX-512 Xeon, channels_last calls, ms forward / backward, before on the GEMM kernels' route):
    16x512x3x3 -> 512 0.36 / 0.78 (0.39 / 1.20), 16x16x48x48 -> 32 0.38 / 0.75 (0.41 / 2.32),
    4x32x128x128 -> 16 0.56 / 1.05 (1.30 / 2.20); PyTorch's channels_last 0.34 / 0.80, 0.18 / 0.54,
    0.37 / 0.73.  numpy's own 2-thread sgemm of the same products is as fast or a little faster."""
    return p.r == 1 and p.s == 1 and p.sh == 1 and p.sw == 1 and not p.padded and p.g == 1


def own_product(p, pass_, isa=None):
    """Whether a :func:`pointwise` layer's forward / grad_input runs on the in-place rows kernel
    (:func:`_forward_rows`, own micro-kernel) rather than the BLAS blocks: from c*k of
    OWN_PRODUCT_FORWARD / OWN_PRODUCT_GRAD_INPUT on, and a forward of whole NR-column panels of
    output channels whatever its size.  2 threads, AVX-512 Xeon, float32, ms BLAS blocks / own,
    forward: 32x64x7x7 -> 128 0.18 / 0.14, 32x128x7x7 -> 128 0.30 / 0.21, 8x256x56x56 -> 64 3.9 /
    3.2, 32x512x7x7 -> 512 3.5 / 3.0; small ones since the rows kernel's offsets vectorise
    (interleaved, PyTorch's channels_last in brackets): 32x32x14x14 -> 64 0.29 / 0.24 (0.17),
    32x16x28x28 -> 32 0.35 / 0.29 (0.19), 16x16x48x48 -> 32 0.44 / 0.37 (0.26), 16x64x12x12 -> 32
    0.13 / 0.12 (0.09); 16 output channels, half a panel, stay (4x32x128x128 -> 16 0.72 / 1.23);
    grad_input from ~8192 (32x128x7x7 -> 128 0.28 / 0.21, 32x64x14x14 -> 32 0.11 / 0.17); neither on
    fewer than OWN_PRODUCT_MIN_POSITIONS positions."""
    if (_cpu.isa() if isa is None else isa) != "avx512":
        return False  # measured on AVX-512 only
    if p.n * p.h * p.w < OWN_PRODUCT_MIN_POSITIONS:
        return False
    if pass_ == "forward":
        return p.c * p.k >= OWN_PRODUCT_FORWARD or p.k % G.tile(p.itemsize)[1] == 0
    return p.c * p.k >= OWN_PRODUCT_GRAD_INPUT


#: Smallest c*k of a 1x1 layer whose forward / grad_input :func:`own_product` runs on the own kernel
OWN_PRODUCT_FORWARD = 4096
OWN_PRODUCT_GRAD_INPUT = 8192
#: ... and fewest positions (batch x plane): below, the BLAS blocks win both passes (Zen 4, 2
#: threads, ms BLAS / own, forward and grad_input: 16x512x3x3 -> 512 0.58 / 0.74, 0.54 / 0.62;
#: 16x256x4x4 -> 256 0.24 / 0.35, 0.22 / 0.33; 32x512x4x4 -> 512 1.9 / 2.2, 1.8 / 2.1; from 2304
#: positions the own kernel: 16x128x12x12 -> 128 0.48 / 0.40)
OWN_PRODUCT_MIN_POSITIONS = 1024


def _blocks(m, width):
    """(rows, columns) of a block of an (m x width) product: from the problem alone, not the
    threads (OpenBLAS's results for a row change with the rows it is computed with)."""
    rows = max(POINTWISE_ROWS, -(-m // POINTWISE_BLOCKS))
    nrb = -(-m // rows)
    ncb = max(1, min(-(-POINTWISE_ITEMS // nrb), width // 64))
    cols = -(-(-(-width // ncb)) // 16) * 16
    return rows, cols


def _pointwise_rows(ah, w, b, p, width, kk, transw):
    """forward (``transw``: y = xh . w.T + b, width k) or grad_input (gx = gyh . w, width c) of a
    :func:`pointwise` layer: ``ah`` the NHWC operand of ``kk`` channels."""
    m = p.n * p.h * p.w
    out = result((p.n, p.h, p.w, width), p.dtype)
    rows, cols = _blocks(m, width)
    nw = _nw(-(-m // rows) * -(-width // cols))
    has_bias = b is not None
    bias = np.ascontiguousarray(b, dtype=p.dtype) if has_bias else np.zeros(1, p.dtype)
    with serial_blas, _threads(nw):
        K.pointwise_rows(np.ascontiguousarray(ah).reshape(-1), kk, np.ascontiguousarray(w).reshape(-1), transw,
                         bias, has_bias, out.reshape(-1), width, m, kk, rows, cols, *_BLAS.args(p.dtype, nw),
                         np.zeros(1, np.int64))
    return out


def _pointwise_gw(gyh, xh, p):
    """grad_weight (k, c, 1, 1) of a :func:`pointwise` layer: parts of the positions as
    :func:`_gw_splits` cuts them, each part's product by blocks of columns, the parts added in order."""
    m = p.n * p.h * p.w
    ns, per = _parts(p, m)
    cols = max(64, -(-p.c // 4))  # up to 4 blocks of columns: work for every worker of a single part
    part = np.empty((ns, p.k * p.c), dtype=p.dtype)
    nw = _nw(ns * -(-p.c // cols))
    with serial_blas, _threads(nw):
        K.pointwise_gw(np.ascontiguousarray(gyh).reshape(-1), np.ascontiguousarray(xh).reshape(-1), part, p.k, p.c,
                       m, per, cols, *_BLAS.args(p.dtype, nw), np.zeros(1, np.int64))
    return _summed(part).reshape(p.k, p.c, 1, 1)


def grad_input_transposed(gyh, w, p):
    """grad_input (n, h, w, c) as the forward on the flipped, channel-swapped kernel where that is
    one (stride 1, padding within the kernel's extent), else None; None too where a weight is not
    finite: the correlation multiplies every weight by gy's zero padding and would put NaNs where
    the scatter (and PyTorch) puts none."""
    q = _transposed(p)
    if q is None or p.n * p.h * p.w == 0:
        return None
    return _forward_rows(gyh, w, None, q, flipped=True)


def grad_input(gyh, w, p):
    """``gx`` (n, h, w, c) C-contiguous from the NHWC output gradient ``gyh`` (n, oh, ow, k)."""
    if pointwise(p) and p.n * p.h * p.w and not own_product(p, "grad_input"):
        return _pointwise_rows(gyh, w, None, p, p.c, p.k, False)
    gx = grad_input_transposed(gyh, w, p)
    if gx is not None:
        return gx
    gx = result((p.n, p.h, p.w, p.c), p.dtype)
    mr, nr = G.tile(p.itemsize)
    tn = p.r * p.s * p.cg
    npan = -(-tn // nr)
    # the weights as B (kg x tn, taps t = (rr*s + ss)*cg + cc) per group, in NR-column panels
    wg = np.zeros((p.g, p.kg, npan * nr), dtype=p.dtype)
    wg[:, :, :tn] = w.reshape(p.g, p.kg, p.cg, p.r, p.s).transpose(0, 1, 3, 4, 2).reshape(p.g, p.kg, tn)
    pbw = np.ascontiguousarray(wg.reshape(p.g, p.kg, npan, nr).transpose(0, 2, 1, 3)).reshape(-1)
    bm = _col_rows(p)
    nw = _nw(p.n * p.g)
    with _threads(nw):
        K.grad_input_col2im(np.ascontiguousarray(gyh).reshape(-1), pbw, p.h, p.w, p.c, p.oh, p.ow, p.sh, p.sw,
                            p.ph0, p.pw0, p.dh, p.dw, p.r, p.s, p.g, p.cg, p.kg, p.n, gx.reshape(-1),
                            np.empty((nw, bm), np.int64), np.empty((nw, bm * npan * nr), dtype=p.dtype),
                            np.zeros(max(1, p.kg), p.dtype), bm, npan * nr, np.zeros(1, np.int64))
    return gx


#: Positions per split of grad_weight's reduction (:func:`._nhwc_kernels.grad_weight`), at most
#: GW_SPLITS splits: a count from the problem alone, so the bits do not depend on the threads.
GW_SPLIT_POSITIONS = 512
GW_SPLITS = 16


def _gw_splits(p):
    """Parts of grad_weight's sum over positions: one per GW_SPLIT_POSITIONS, at most GW_SPLITS and
    at most what half of the workspace budget holds of partial weight gradients (never fewer than
    one) -- from the problem alone, not the threads."""
    m = p.n * p.oh * p.ow
    one = max(1, p.k * p.r * p.s * p.cg * p.itemsize)
    return max(1, min(GW_SPLITS, m // GW_SPLIT_POSITIONS, p.workspace_limit // 2 // one))


def _parts(p, m):
    """(parts, positions per part) of grad_weight's sum over ``m`` positions (:func:`_gw_splits`,
    no empty part)."""
    per = -(-m // _gw_splits(p))
    return -(-m // per), per


def _summed(part):
    """The parts' partial weight gradients added in order (the bits depend on the shape only)."""
    total = part[0]
    for q in range(1, part.shape[0]):
        total += part[q]
    return total


def grad_weight(gyh, xh, p):
    """``gw`` (k, cg, r, s) C-contiguous from NHWC ``gyh`` (n, oh, ow, k) and ``xh`` (n, h, w, c)."""
    mr, nr = G.tile(p.itemsize)
    tn = p.r * p.s * p.cg
    m = p.n * p.oh * p.ow
    if not (m and tn):
        return np.zeros((p.k, p.cg, p.r, p.s), dtype=p.dtype)
    if pointwise(p) and not gw_taps(p):
        return _pointwise_gw(gyh, xh, p)
    if few_grad_weight(p):
        return _few_grad_weight(gyh, xh, p)
    ns, per = _parts(p, m)
    if gw_taps(p):
        return _grad_weight_taps(gyh, xh, p, ns, per)
    part = np.empty((ns, p.g, p.kg, tn), dtype=p.dtype)
    blk = _blk(p)
    mc = int(blk[1])
    bm = min(mc, -(-p.kg // mr) * mr)
    ni = -(-p.kg // bm)
    # split the taps only where splits and groups leave workers idle
    nj = max(1, min(-(-tn // nr), -(-2 * numba.get_num_threads() // (ns * p.g * ni))))
    bn = -(-tn // nj)
    bn = -(-bn // nr) * nr  # whole panels
    items = ns * p.g * ni * -(-tn // bn)
    nw = _nw(items)
    wbuf = G._workspace(p.dtype, nw, G.workspace_size(p.dtype, blk))
    with _threads(nw):
        K.grad_weight(np.ascontiguousarray(gyh).reshape(-1), np.ascontiguousarray(xh).reshape(-1), p.h, p.w,
                      p.c, p.oh, p.ow, p.sh, p.sw, p.ph0, p.pw0, p.dh, p.dw, p.s, p.g, p.cg, p.kg, m, part, per,
                      wbuf, blk, bm, bn, np.zeros(1, np.int64))
    gw = _summed(part).reshape(p.g, p.kg, p.r, p.s, p.cg).transpose(0, 1, 4, 2, 3)
    return np.ascontiguousarray(gw).reshape(p.k, p.cg, p.r, p.s)


#: grad_weight by taps, both operands in place (:func:`gw_taps`): None where it was measured (AVX-512),
#: True on any ISA (tests), False never
GW_TAPS = None


def gw_taps(p):
    """Whether grad_weight runs tap by tap with both operands read in place
    (:func:`._nhwc_kernels.grad_weight_taps`): output channels per group a multiple of NR (the
    gradient's rows are B's panels as they lie) and few channels -- cg*kg up to GW_TAPS_MAX (3x3)
    or GW_TAPS_MAX_1X1 (1x1).  Each tile streams its split's positions from L2 with no
    reuse in L1, so wide layers lose to the gathered panels.  Measured on the 2-core AVX-512 Xeon,
    2 threads, float32, ms panels / taps: 3x3 stride 1, 32x16x28x28 -> 32 1.16 / 0.57,
    32x32x14x14 -> 32 0.66 / 0.59, 4x64x56x56 -> 32 2.36 / 1.77, 32x32x7x7 -> 64 0.34 / 0.36,
    32x64x14x14 -> 64 2.04 / 2.25, 32x128x14x14 -> 128 7.1 / 8.6; stride 2, 32x16x28x28 -> 32
    0.51 / 0.35, 32x32x28x28 -> 64 0.66 / 0.72; 1x1 stride 2, 32x16x28x28 -> 32 0.23 / 0.06,
    32x128x14x14 -> 64 0.25 / 0.20, 16x128x28x28 -> 128 0.64 / 0.79.  1x1 stride 1 too, where the
    positions of a split are one segment (ms one product :func:`_pointwise_gw` / taps; PyTorch's
    channels_last): 32x32x14x14 -> 64 0.22 / 0.16 (0.21), 8x32x56x56 -> 64 0.85 / 0.58 (0.70),
    4x32x128x128 -> 32 1.28 / 0.72 (0.83), 16x64x24x24 -> 128 0.91 / 0.80 (0.80); wider ones keep
    the product (32x128x7x7 -> 128 0.34 / 0.31, 8x256x56x56 -> 64 5.8 / 6.3)."""
    if GW_TAPS is False or (GW_TAPS is None and _cpu.isa() != "avx512") or p.kg % G.tile(p.itemsize)[1]:
        return False  # (not measured on AVX2, whose 6 x 16 tile the panels may still beat)
    return p.cg * p.kg <= (GW_TAPS_MAX_1X1 if p.r * p.s == 1 else GW_TAPS_MAX)


def taps_beat_winograd(p):
    """Whether a channels_last grad_weight that 'auto' gave to Winograd runs natively by taps
    instead (:func:`gw_taps`, on planes of at most TAPS_OVER_WINOGRAD_PLANE outputs or 16 input
    channels).  2 threads, AVX-512 Xeon, ms Winograd / taps: 32x32x14x14 -> 32 0.74 / 0.64,
    32x64x7x7 -> 32 0.49 / 0.33, 32x16x28x28 -> 32 1.30 / 1.14, 4x16x128x128 -> 32 3.26 / 2.58;
    larger planes of 32 channels lose (32x32x28x28 -> 32 1.63 / 1.99, 8x32x56x56 -> 32 1.67 / 1.88)."""
    return gw_taps(p) and (p.oh * p.ow <= TAPS_OVER_WINOGRAD_PLANE or p.cg <= 16)


#: Largest output plane on which :func:`taps_beat_winograd` (14x14)
TAPS_OVER_WINOGRAD_PLANE = 196

#: Largest cg*kg of a 3x3 (any kernel but 1x1) layer whose grad_weight :func:`gw_taps` runs by taps
GW_TAPS_MAX = 2048
#: ... and of a 1x1 layer
GW_TAPS_MAX_1X1 = 8192
#: Items per worker that :func:`_grad_weight_taps` aims for (claimed one at a time: a worker that
#: the machine slows takes fewer)
GW_TAPS_ITEMS = 4


def _grad_weight_taps(gyh, xh, p, ns, per):
    mr, nr = G.tile(p.itemsize)
    part = np.empty((ns, p.g, p.r * p.s, p.cg, p.kg), dtype=p.dtype)
    pairs = -(-p.cg // mr) * (p.kg // nr)  # (channel tile, panel) pairs of a tap
    base = ns * p.g * p.r * p.s
    # items of whole taps where they give every worker GW_TAPS_ITEMS; else runs of the pairs
    nsub = max(1, min(pairs, -(-GW_TAPS_ITEMS * numba.get_num_threads() // base)))
    nw = _nw(base * nsub)
    rows = -(-per // max(1, p.ow)) + 1  # output rows a split touches: one segment each at most
    with _threads(nw):
        K.grad_weight_taps(np.ascontiguousarray(gyh).reshape(-1), np.ascontiguousarray(xh).reshape(-1), p.h, p.w,
                           p.c, p.oh, p.ow, p.sh, p.sw, p.ph0, p.pw0, p.dh, p.dw, p.r, p.s, p.g, p.cg, p.kg,
                           p.n * p.oh * p.ow, part, per, nsub, np.empty((nw, 3 * rows), np.int64),
                           np.zeros(1, np.int64))
    gw = _summed(part).reshape(p.g, p.r * p.s, p.cg, p.kg).transpose(0, 3, 2, 1)
    return np.ascontiguousarray(gw).reshape(p.k, p.cg, p.r, p.s)


# ---------------------------------------------------------------------------------------- depthwise
#: Channels from which a channels_last depthwise layer runs on the NHWC loops (one vector of float32
#: channels per position); fewer convert to NCHW.
DW_MIN_CHANNELS = 8
#: Row blocks of the depthwise grad_weight: partial sums per block, added in block order (a fixed
#: count, so the bits do not depend on the thread count).
DW_BLOCKS = 32


def depthwise_serves(p, w):
    """Whether the NHWC depthwise loops compute this case: one filter per channel
    (groups == in == out channels, at least DW_MIN_CHANNELS) and finite weights (the loops skip the
    padding's taps, which a non-finite weight would turn into NaN in the NCHW kernels and PyTorch's
    padded ones)."""
    return p.g == p.c == p.k and p.c >= DW_MIN_CHANNELS and bool(np.isfinite(w).all())


def dw_beats_nchw(p, isa=None):
    """Whether 'auto' runs an NCHW depthwise layer's passes on these loops, converting to NHWC and
    back: small planes, where the NCHW kernels' rows are a few vector lanes long, and strided ones.
    Measured on the 2-core Xeon (AVX-512, 2 threads, float32), ms via NHWC / NCHW, forward and
    forward + backward: 32x128x7x7 0.12 / 0.66, 0.38 / 1.70; 16x256x6x6 0.09 / 0.23; 32x128x14x14
    0.50 / 0.87, 1.65 / 2.36; stride 2: 32x64x14x14 0.12 / 0.31, 32x32x28x28 0.28 / 0.55,
    16x32x48x48 0.41 / 0.80, 1.6 / 2.8.  Stride 1 on larger planes loses (32x64x28x28 1.04 / 0.77,
    8x128x56x56 2.77 / 0.83).  Not measured on AVX2 yet: there the NCHW kernels keep every layer."""
    isa = _cpu.isa() if isa is None else isa
    if isa != "avx512" or p.itemsize != 4:
        return False
    plane = p.h * p.w
    return plane <= (DW_NCHW_MAX_PLANE_STRIDED if p.sh > 1 or p.sw > 1 else DW_NCHW_MAX_PLANE)


#: Largest input plane of a stride-1 NCHW depthwise layer that :func:`dw_beats_nchw` converts (14x14)
DW_NCHW_MAX_PLANE = 196
#: ... and of a strided one (48x48)
DW_NCHW_MAX_PLANE_STRIDED = 2304


def _dw_taps(w, p):
    """The weights (c, 1, r, s) as (r*s, c): taps outer, channels inner."""
    return np.ascontiguousarray(w.reshape(p.c, p.r * p.s).T)


def _rows(a, c):
    """A C-contiguous NHWC array as (positions, channels)."""
    return np.ascontiguousarray(a).reshape(-1, c)


def dw_forward(xh, w, b, p):
    """Depthwise ``y`` (n, oh, ow, c) from NHWC ``xh``: per output row, tap by tap, along channels."""
    y = result((p.n, p.oh, p.ow, p.c), p.dtype)
    if y.size:
        bias = np.zeros(p.c, p.dtype) if b is None else np.ascontiguousarray(b)  # read in vectors
        K.dw_forward(_rows(xh, p.c), p.n, p.h, p.w, p.oh, p.ow, p.sh, p.sw, p.ph0, p.pw0, p.dh, p.dw, p.r, p.s,
                     _dw_taps(w, p), bias, b is not None, y.reshape(-1, p.c), np.zeros(p.c, p.dtype))
    return y


def dw_grad_input(gyh, w, p):
    """Depthwise ``gx`` (n, h, w, c) from NHWC ``gyh``: with stride 1 the forward loops on the
    flipped kernel (the transposed geometry), otherwise gathered per input row."""
    q = _transposed(p)
    if q is not None:
        return dw_forward(gyh, np.ascontiguousarray(w[:, :, ::-1, ::-1]), None, q)
    # zeroed row by row in the kernel (a fill here first cost as much again: 32x32x28x28 0.2 ms)
    gx = (result if gyh.size else result_zeros)((p.n, p.h, p.w, p.c), p.dtype)
    if gx.size and gyh.size:
        K.dw_grad_input(_rows(gyh, p.c), p.n, p.h, p.w, p.oh, p.ow, p.sh, p.sw, p.ph0, p.pw0, p.dh, p.dw, p.r,
                        p.s, _dw_taps(w, p), gx.reshape(-1, p.c), np.zeros(p.c, p.dtype))
    return gx


def dw_grad_weight(gyh, xh, p):
    """Depthwise ``gw`` (c, 1, r, s) from NHWC ``gyh`` and ``xh``: DW_BLOCKS row blocks' partial sums."""
    rows = p.n * p.oh
    nb = max(1, min(rows, DW_BLOCKS))
    per = -(-rows // nb)
    nb = -(-rows // per)
    part = np.empty((nb, p.r * p.s, p.c), dtype=p.dtype)
    if rows and part.size:
        K.dw_grad_weight(_rows(gyh, p.c), _rows(xh, p.c), p.n, p.h, p.w, p.oh, p.ow, p.sh, p.sw, p.ph0, p.pw0,
                         p.dh, p.dw, p.r, p.s, part, per, np.zeros(p.c, p.dtype))
        total = part.sum(axis=0)  # block after block, in order (a reduction over the outer axis)
    else:
        total = np.zeros((p.r * p.s, p.c), dtype=p.dtype)
    return np.ascontiguousarray(total.T).reshape(p.c, 1, p.r, p.s)
