"""Implicit GEMM: convolution on fastconv's own packed GEMM, with no column matrix.

Notation: n c h w input; k r s weight (cg = c/g, kg = k/g per group g); oh ow output; sh sw stride;
ph pw padding; dh dw dilation; a tap t = (cc, rr, ss) of one group, tn = cg*r*s taps in the order
of ``w.reshape(k, tn)``; P = oh*ow output positions of one image.

Per image and group the convolution is im2col's products (``col[t, i*ow + j]`` the input under tap
t at output position (i, j)), but ``col`` is never written out:

* forward: ``y[n, g] (kg x P) = w[g] (kg x tn) . col (tn x P)`` on the GEMM of :mod:`.gemm`.  The
  weights are packed once per call (``pack_a_all``); each B panel (kc taps x NR positions) is
  gathered by the packing routine straight from the input planes -- one masked vector copy per tap
  and per output row the panel's positions cross -- and used by every MR-row panel of the weights
  while it sits in L1, writing y in place (row pitch P), bias pre-filled.
* grad_weight: ``gw[g] (kg x tn) += gy[n, g] (kg x P) . col.T``.  The products run over positions,
  along which both gy and the input's tap runs are contiguous, so this pass uses a dot-product tile
  instead of the outer-product micro-kernel (:func:`._implicit_kernels.dot_tile`: MT gy rows x NT
  taps of vector accumulators, masked at the end of each output row): neither operand is
  transposed or packed.
* grad_input: with stride 1 (and padding within the kernel's extent) the forward pass of this
  module on ``gy`` with the flipped, channel-swapped kernel (common.transposed_weight): a gather, no
  scatter.  Otherwise ``gcol = w[g].T . gy[n, g]`` into a small column tile per worker (our GEMM,
  transposed weights packed once) and a scatter-add col2im into zero-padded input planes.

Input planes: common.pad_planes' layout (zero padding, columns split by phase ``iw % sw``, as
im2col gathers from), in which every tap's output row is one contiguous run; without padding and
with column stride 1 the input's own planes have that layout and are read in place.  The padded
copy, the packed weights and the per-worker buffers count against ``workspace_limit``;
:func:`supports` refuses a budget that cannot hold them.

Threads: numba's one pool; workers claim items (common.claim) with disjoint outputs -- forward:
(image, group, block of positions); grad_weight: (group, block of taps), each summing over the
whole batch; grad_input: (image, group, block of channels), owning those input planes.  Every
output element is summed in an order that does not depend on the item cut, so all three passes give
the same bits for every thread count.
"""
from __future__ import annotations

import numba
import numpy as np

from .. import _cpu
from .._config import result, result_zeros
from . import _implicit_kernels as K
from . import gemm as G
from . import nhwc as H
from .common import SLACK, _split_planes, _threads, _transposed, _unsplit

# Positions summed per dot-product call in grad_weight: the lane reduction at the end of a call
# (~200 instructions for 24 sums) is then paid once per image of 56x56 (resnet50-3x3-64: 22.9 ms of
# CPU at 4096, 24.5 at 1024, 26.3 at 512).
_DOT_POSITIONS = 4096


def _l2():
    return _cpu.cache_sizes()["l2"]


# ---------------------------------------------------------------------------------------- sources
def _in_place(p):
    """No padding and column stride 1: the raw planes are the padded, phase-split layout."""
    return not p.padded and p.sw == 1


def _pointwise_in_place(p):
    """A 1x1 layer read in place with whole rows following each other: a B panel is gathered as
    one run per channel plane whatever the kc blocking (:func:`_forward_blk`)."""
    return _in_place(p) and p.r == 1 and p.s == 1 and p.sh == 1


def _layout(p):
    """(hp, wq, L): rows, phase-row length and length of one source plane."""
    if _in_place(p):
        return p.h, p.w, p.h * p.w
    wq = -(-p.wp // p.sw)
    return p.hp, wq, p.sw * p.hp * wq + SLACK


def _copy_bytes(p):
    """Bytes of the padded copy of the input (0 when read in place)."""
    return 0 if _in_place(p) else p.n * p.c * _layout(p)[2] * p.itemsize


def _source(x, p):
    """(n, c, L) planes the kernels read."""
    x = np.ascontiguousarray(x)
    if _in_place(p):
        return x.reshape(p.n, p.c, p.h * p.w)
    hp, wq, ll = _layout(p)
    out = result((p.n, p.c, ll), x.dtype)
    _split_planes(x.reshape(p.n * p.c, p.h, p.w), out.reshape(p.n * p.c, -1), p.sw, hp, wq, p.ph0, p.pw0)
    return out


_TOFF = {}


def _tap_offsets(p):
    """int64[tn]: where each tap of a group starts in the group's source planes (module docstring
    of :mod:`._implicit_kernels`)."""
    key = (p.cg, p.r, p.s, p.sw, p.dh, p.dw, _layout(p))
    t = _TOFF.get(key)
    if t is None:
        hp, wq, ll = _layout(p)
        cc, rr, ss = np.meshgrid(np.arange(p.cg), np.arange(p.r), np.arange(p.s), indexing="ij")
        cs = ss * p.dw
        t = (cc * ll + (cs % p.sw) * hp * wq + rr * p.dh * wq + cs // p.sw).reshape(-1).astype(np.int64)
        if len(_TOFF) > 256:
            _TOFF.clear()
        _TOFF[key] = t
    return t


# ---------------------------------------------------------------------------------------- forward
def _forward_blk(p):
    """The GEMM blocking of the forward: :func:`.gemm.blocking`, except that a layer with at most
    a quarter more taps than kc takes them all in one block (a second block of a few taps reloads
    and stores every C tile for little work: resnet50-stem's 147 taps on Zen 4's kc of 128,
    10.8 -> 10.3 ms), and a 1x1 layer read in place up to 512 channels."""
    blk = G.blocking(p.dtype)
    tn = p.cg * p.r * p.s
    # a 1x1 layer read in place (_pointwise_in_place) gathers its B panels as one run per channel
    # plane whatever kc is: one block of up to 512 channels saves reloading and storing its C tiles
    # once per block (resnet50-1x1-256, Zen 4, kc 128: 4.9-5.1 -> 4.65-4.7 ms).  Reading the panels
    # in place instead of gathering them was tried and measured no faster (4.8-4.9 with prefetch,
    # 6.5 without: the hardware prefetcher does not follow 256 planes)
    most = 512 if _pointwise_in_place(p) else blk[0] * 5 // 4
    if blk[0] < tn <= most:
        blk = blk.copy()
        blk[0] = tn
    return blk


def _forward_plan(p, nthreads):
    """(positions per item, rows per item, staged, packed-weight elements per group, workspace
    elements per worker, workers, bytes needed)."""
    mr, nr = G.tile(p.itemsize)
    kc = int(_forward_blk(p)[0])
    plane = p.oh * p.ow
    tn = p.cg * p.r * p.s
    staged = plane < _STAGE_BELOW
    # the item's block of y (kg x npos) stays in L2 across the kc blocks: half of L2
    npos = max(nr, (_l2() // 2) // (p.kg * p.itemsize) // nr * nr)
    span = p.n * plane if staged else plane
    npos = max(nr, min(npos, -(-span // nr) * nr))  # an empty batch still has a block size
    pblocks = max(1, -(-span // npos) * (1 if staged else p.n))
    want = _ITEMS_PER_WORKER * nthreads
    mblk = p.kg
    pasz = G.packed_a_size(p.dtype, p.kg, tn)
    if p.g * pblocks < want and pasz * p.itemsize > _l2() // 2:
        # few positions: split the weights' rows (each item then streams only its rows of the
        # weights, which for resnet50-3x3-512 are 9.4 MB) before splitting positions further
        # blocks of at least _MIN_ROWS rows: the B panels are gathered once per row block
        nrb = min(-(-p.kg // _MIN_ROWS), -(-want // (p.g * pblocks)))
        mblk = -(-(-(-p.kg // nrb)) // mr) * mr
    nrb = -(-p.kg // mblk)
    if p.g * pblocks * nrb < want:
        split = -(-want // (p.g * pblocks * nrb))
        npos = max(nr, -(-(-(-npos // split)) // nr) * nr)
    items = p.g * -(-p.kg // mblk) * (-(-span // npos) * (1 if staged else p.n))
    nw = max(1, min(nthreads, items))
    ws = kc * nr + mr * nr + (mblk * npos if staged else 0)
    need = _copy_bytes(p) + (p.g * pasz + nw * ws) * p.itemsize
    return npos, mblk, staged, pasz, ws, nw, need


# Items per worker the forward plan aims for: a worker slowed by another process then does fewer.
_ITEMS_PER_WORKER = 4

# Rows of the weights per item at the least when they are split: a B panel row gathered for 256
# rows feeds 2*18 vector FMAs per tap; for 70 rows (8 blocks of resnet50-3x3-512) its ~5 masked copies
# of 7-element runs cost more than the 10 FMAs they fed.
_MIN_ROWS = 256

# Planes below this many positions are batched: an item's positions run over several images,
# through a staging buffer (one 7x7 image is 49 positions: 2 panels of 32 would waste 23%).
_STAGE_BELOW = 256


#: Largest output plane (positions) on which the forward runs on the channels_last row kernels
#: (:func:`_via_rows`).
ROWS_MAX_PLANE = 100
#: ... for the forward of groups whose taps it sums at once (``nhwc.all_taps``): 14x14 planes.
ROWS_MAX_PLANE_THIN = 196


def _via_rows(p, pass_="forward"):
    """Whether the forward (or grad_weight) runs on the channels_last kernels with its operands
    converted: small planes of wide groups.  There the forward's GEMM per image has too few
    columns and the padding holds a large share of the taps, which ``nhwc.forward`` skips, in one
    GEMM over the whole batch's positions; grad_weight's dot tiles run 4 or 8 lanes wide.  Measured
    (2 threads, AVX2, ms here / on the NCHW kernels): 32x512x4x4 forward 17.6 / 23.7, grad_weight
    19.7 / 186.7; 32x256x8x8 forward 16.3 / 20.0, grad_weight 18.1 / 97.6; 8x512x7x7 forward
    16.9 / 20.6; at 14x14 even (16.3 / 16.2), at 16x16 behind (20.7 / 18.6).  Groups that the forward
    sums all taps of at once (``nhwc.all_taps``, 16-128 channels) gain up to ROWS_MAX_PLANE_THIN
    positions: 32x64x14x14 3x3 forward 4.8 / 7.4, 16x64x12x12 1.9 / 2.6, 32x32x14x14 1.6 / 2.4; at
    16x16 even (32x32x16x16 2.1 / 2.1)."""
    plane = ROWS_MAX_PLANE_THIN if pass_ == "forward" and H.all_taps(p) else ROWS_MAX_PLANE
    return (p.oh * p.ow <= plane and min(p.cg, p.kg) >= H.ROWS_MIN_CHANNELS
            and _rows_need(p, pass_) <= p.workspace_limit)


def via_channels_last(p, pass_):
    """Whether this pass runs on the channels_last kernels (NCHW operands converted): the forward
    and grad_weight where :func:`_via_rows`, grad_input where its transposed forward does.  A
    channels_last caller then runs the pass natively instead (``functional._native``)."""
    if pass_ == "grad_input":
        q = _use_transposed(p)
        return q is not None and _via_rows(q)
    return _via_rows(p, pass_)


def _rows_need(p, pass_):
    """Workspace of the channels_last route: the NHWC copies of the operands and what the pass
    allocates (``nhwc.need``)."""
    return H.need(p, pass_) + (p.n * p.c * p.h * p.w + p.n * p.k * p.oh * p.ow) * p.itemsize


def forward(x, w, b, p):
    if _via_rows(p):
        return H.to_nchw(H.channels_last_view(H.forward(H.to_nhwc(x), w, b, p)))
    return _forward(x, w, b, p)


def _forward(x, w, b, p, flipped=False):
    """The forward on the packed kernels; ``flipped``: ``w`` is the layer's weight and ``p`` its
    grad_input as a forward (:func:`_transposed`), whose kernel is packed from ``w`` flipped and
    channel-swapped -- None then when ``w`` holds an inf or NaN (see :func:`grad_input`)."""
    npos, mblk, staged, pasz, wsz, nw, _ = _forward_plan(p, numba.get_num_threads())
    blk = _forward_blk(p)
    tn = p.cg * p.r * p.s
    pa = result((p.g, pasz), p.dtype)  # kept memory: 9.4 MB of fresh pages for 512x512x3x3
    wf = np.ascontiguousarray(w).reshape(-1)
    if flipped:
        bad = np.zeros(p.g * -(-tn // int(blk[0])) * -(-p.kg // G.tile(p.itemsize)[0]), np.int64)
        K.pack_weights_flipped(wf, pa, p.cg, p.kg, p.r * p.s, blk, bad)
        if bad.any():
            return None
    else:
        K.pack_weights(wf, pa, np.arange(p.g, dtype=np.int64) * (p.kg * tn), np.full(p.g, p.kg, np.int64),
                       tn, tn, 1, blk)
    src = _source(x, p)
    y = result(p.y_shape, p.dtype)
    has_bias = b is not None
    bb = np.ascontiguousarray(b) if has_bias else np.zeros(p.k, p.dtype)
    _, wq, _ = _layout(p)
    rstep = p.sh * wq
    goh, gow = (1, p.oh * p.ow) if rstep == p.ow else (p.oh, p.ow)
    K.forward(src, _tap_offsets(p), pa, bb, y.reshape(-1), np.empty((nw, wsz), p.dtype), np.zeros(1, np.int64),
              has_bias, p.g, p.kg, p.oh, p.ow, goh, gow, rstep, npos, mblk, staged, blk)
    return y


# ---------------------------------------------------------------------------------------- grad_weight
def _weight_plan(p, nthreads):
    """(taps per item, output rows per dot-product call, workers)."""
    nt = K.DOT_TILES[G.ISA][1]
    tn = p.cg * p.r * p.s
    per_group = max(1, -(-2 * nthreads // p.g))  # two items per worker where the groups allow
    tblk = -(-(-(-tn // per_group)) // nt) * nt
    rows = max(1, min(p.oh, _DOT_POSITIONS // p.ow))
    items = p.g * -(-tn // tblk)
    return tblk, rows, max(1, min(nthreads, items))


def grad_weight(gy, x, p):
    if _via_rows(p, "grad_weight"):
        return H.grad_weight(H.to_nhwc(gy), H.to_nhwc(x), p)
    tblk, rows, nw = _weight_plan(p, numba.get_num_threads())
    src = _source(x, p)
    _, wq, _ = _layout(p)
    tn = p.cg * p.r * p.s
    gw = np.zeros(p.k * tn, dtype=p.dtype)
    with _threads(nw):
        K.grad_weight(np.ascontiguousarray(gy).reshape(-1), src, _tap_offsets(p), gw, nw, np.zeros(1, np.int64),
                      p.g, p.kg, p.oh, p.ow, p.sh * wq, rows, tblk)
    return gw.reshape(p.w_shape)


# ---------------------------------------------------------------------------------------- grad_input
def _col_plan(p, nthreads):
    """grad_input by col2im: (channels per block, output rows per tile, blk, GEMM workspace
    elements, column tile elements, packed rows per block, workers, bytes needed)."""
    mr, nr = G.tile(p.itemsize)
    isz = p.itemsize
    kc = int(G.blocking(p.dtype)[0])
    rs = p.r * p.s
    cb = p.cg
    if 0 < p.n * p.g < 2 * nthreads:  # split channels so that every worker gets items
        cb = -(-p.cg // min(p.cg, -(-2 * nthreads // (p.n * p.g))))
    half = _l2() // 2
    cb = max(1, min(cb, half // (rs * p.ow * isz)))  # a row of the block's taps in half of L2
    rb = max(1, min(p.oh, half // (cb * rs * p.ow * isz)))
    ncb = -(-p.cg // cb)
    tb = cb * rs
    mp = -(-tb // mr) * mr
    npos = -(-rb * p.ow // nr) * nr
    blk = np.array([kc, mp, npos], dtype=np.int64)
    wsz = mp * kc + kc * npos + mr * nr
    items = p.n * p.g * ncb
    nw = max(1, min(nthreads, items))
    planes = p.n * p.c * (p.sw * p.hp * (-(-p.wp // p.sw)) + SLACK)
    need = (planes + p.g * ncb * mp * p.kg + nw * (wsz + tb * rb * p.ow)) * isz
    return cb, rb, blk, wsz, tb * rb * p.ow, mp * p.kg, nw, need


def _grad_input_col2im(gy, w, p):
    cb, rb, blk, wsz, csz, pasz, nw, _ = _col_plan(p, numba.get_num_threads())
    rs = p.r * p.s
    tn = p.cg * rs
    ncb = -(-p.cg // cb)
    gi, ci = np.divmod(np.arange(p.g * ncb, dtype=np.int64), ncb)
    aoffs = gi * (p.kg * tn) + ci * cb * rs
    rows = np.minimum(cb, p.cg - ci * cb) * rs
    pa = result((p.g * ncb, pasz), p.dtype)
    K.pack_weights(np.ascontiguousarray(w).reshape(-1), pa, aoffs, rows, p.kg, 1, tn, blk)
    wq = -(-p.wp // p.sw)
    gq = result_zeros((p.n, p.c, p.sw * p.hp * wq + SLACK), p.dtype)
    K.col_tiles(np.ascontiguousarray(gy).reshape(-1), pa, gq, np.empty((nw, wsz), p.dtype), np.zeros(1, np.int64),
                p.g, p.k, p.r, p.s, p.sh, p.sw, p.dh, p.dw, p.hp, wq, p.oh, p.ow, cb, rb, blk,
                np.empty((nw, csz), p.dtype))
    gx = result(p.x_shape, p.dtype)
    _unsplit(gq.reshape(p.n * p.c, -1), gx.reshape(p.n * p.c, p.h, p.w), p.sw, p.hp, wq, p.ph0, p.pw0)
    return gx


def _use_transposed(p):
    q = _transposed(p)
    if q is None or _forward_plan(q, numba.get_num_threads())[-1] > q.workspace_limit:
        return None
    return q


def grad_input(gy, w, p):
    q = _use_transposed(p)
    if q is not None and _via_rows(q):
        gx = H.grad_input_transposed(H.to_nhwc(gy), w, p)
        return _grad_input_col2im(gy, w, p) if gx is None else H.to_nchw(H.channels_last_view(gx))
    # the correlation multiplies every weight by the zero padding of gy: a non-finite weight would
    # make NaNs at border positions that the scatter (and PyTorch) never reach, so the packing
    # checks and _forward gives up (None) on one
    gx = _forward(gy, w, None, q, flipped=True) if q is not None else None
    return _grad_input_col2im(gy, w, p) if gx is None else gx


# ---------------------------------------------------------------------------------------- registry
_INT_MAX = 2**31 - 1


def _need(p, pass_, nthreads):
    """Bytes of workspace the pass needs (padded copies, packed weights, per-worker buffers)."""
    if pass_ != "grad_input" and _via_rows(p, pass_):
        return _rows_need(p, pass_)
    if pass_ == "forward":
        return _forward_plan(p, nthreads)[-1]
    if pass_ == "grad_weight":
        return _copy_bytes(p)
    return _col_plan(p, nthreads)[-1]


def supports(p, pass_):
    """Every stride, padding, dilation and group count, float32 and float64, within the budget:
    the padded copy of the input (or of grad_output), the packed weights and the workers' buffers."""
    if max(p.n * p.c * _layout(p)[2], p.n * p.k * p.oh * p.ow, p.k * p.cg * p.r * p.s) > _INT_MAX:
        return "an array has more than 2**31 - 1 elements (32-bit masks and offsets)"
    need = _need(p, pass_, 1)
    if pass_ == "grad_input" and _use_transposed(p) is not None:
        need = 0
    if need > p.workspace_limit:
        return (f"needs {need} bytes of workspace (padded input copy, packed weights, one worker's "
                f"buffers), workspace_limit is {p.workspace_limit}")
    return None


# Cost model, fitted by hand to CPU times of each pass (summed over 2 workers, medians of 5
# interleaved runs) on the 2-core Xeon (Sapphire Rapids, AVX-512) while it was shared with 2-3 other
# busy processes (+-20%): per core, the forward GEMM ran at 98-167 GFLOP/s (resnet50-1x1-256 .. -3x3-64),
# grad_weight's dot tiles at 66-81 GFLOP/s on 28-56-wide rows and 23 on 7-wide ones (7 of 16 lanes),
# col2im's grad_input at 92.  Gathering a B panel row costs ~1.5 ns per run it copies.
_PEAK = {4: 190e9, 8: 95e9}     # forward GEMM rate per core before the fill factors
_DOT = {4: 100e9, 8: 50e9}      # grad_weight dot-tile rate per core at full lanes
_RUN_SECONDS = 1.5e-9
# 'auto' compares calibrated costs; until benchmarks/calibrate.py fits this algorithm, seconds are put
# on the scale of im2col's calibrated cost, which is 79 ms for resnet50-3x3-64's forward pass where
# im2col measures 8.3 ms here.
_TO_NOMINAL = 9.6


def _rows_seconds(p, pass_):
    """Modelled seconds of the channels_last route (:func:`_via_rows`): the forward's GEMM less the
    taps it skips, or grad_weight's (_ROWS_DOT times the rate of the dot tiles at full lanes), plus
    moving the operands through the layout conversions and packing the weights."""
    _, nr = G.tile(p.itemsize)
    tn = p.cg * p.r * p.s
    if pass_ == "forward":
        fill = p.kg / (-(-p.kg // nr) * nr) * tn / (tn + 64.0)
        share = H.padded_share(p) if H.skips(p) else 0.0
        gemm = 2.0 * p.macs * (1.0 - share) / (_PEAK[p.itemsize] * fill)
    else:
        gemm = 2.0 * p.macs / (_ROWS_DOT * _DOT[p.itemsize])
    moved = 2 * (p.n * p.c * p.h * p.w + p.n * p.k * p.oh * p.ow + p.k * tn) * p.itemsize
    # _PEAK is a 512-bit machine's: on narrower vectors the GEMM takes longer than modelled and the
    # copies do not, so in the model's seconds they weigh less
    return gemm + moved / _MOVE_RATE * G.VBYTES / 64


# Bytes per second a core reads plus writes in a layout conversion or the weight packing
# (32x512x4x4: 9.4 MB of weights packed in 2.7 ms on 2 cores, AVX2 EPYC).  The AVX-512 Xeon moves
# them twice as fast (7 GB/s a core over the route's forwards of 1x1 to 3x3 layers with 64-512
# channels on 2x2 to 7x7 planes; at 3.5 the route's model read 17-80% high).
_MOVE_RATE = 7e9 if G.ISA == "avx512" else 3.5e9
# The channels_last grad_weight's rate over the dot tiles' at full lanes (2 threads, AVX2: 140
# GFLOP/s on 32x512x4x4 against the dot tiles' 54 on resnet50-3x3-64's 56-wide rows).
_ROWS_DOT = 2.2


def _forward_cost(p, nthreads):
    """:func:`_forward_seconds`, or the channels_last route's where the forward takes it."""
    return _rows_seconds(p, "forward") if _via_rows(p) else _forward_seconds(p, nthreads)


def _forward_seconds(p, nthreads):
    mr, nr = G.tile(p.itemsize)
    npos, mblk, staged, *_ = _forward_plan(p, nthreads)
    tn = p.cg * p.r * p.s
    fill = p.kg / (-(-p.kg // mr) * mr) * tn / (tn + 64.0)
    gemm = 2.0 * p.macs / (_PEAK[p.itemsize] * fill)
    ow = p.oh * p.ow if p.sh * _layout(p)[1] == p.ow else p.ow
    runs = (nr / ow + 1.0) if ow < nr else 1.0 + nr / ow  # runs a panel row of NR positions crosses
    panels = p.n * p.g * -(-p.oh * p.ow // nr) * -(-p.kg // mblk)
    return gemm + panels * tn * runs * _RUN_SECONDS


def cost(p, pass_, threads):
    """Estimated seconds of one pass on ``threads`` threads, on the calibrated scale (see
    ``_TO_NOMINAL``); ``inf`` when unsupported."""
    if supports(p, pass_) is not None:
        return float("inf")
    lanes = G.VBYTES // p.itemsize
    if pass_ == "forward":
        t = _forward_cost(p, threads)
    elif _via_rows(p, pass_):
        t = _rows_seconds(p, pass_)
    elif pass_ == "grad_weight":
        mt = K.DOT_TILES[G.ISA][0]
        use = p.ow / (-(-p.ow // lanes) * lanes) * p.kg / (-(-p.kg // mt) * mt)
        t = 2.0 * p.macs / (_DOT[p.itemsize] * use)
    else:
        q = _use_transposed(p)
        if q is not None:
            t = _forward_cost(q, threads)
        else:
            t = 1.4 * _forward_seconds(p, threads)  # GEMM into the tile, then the scatter
    return _TO_NOMINAL * (3e-5 + t / (1.0 + 0.9 * (threads - 1)))
