"""im2col + GEMM convolution: forward and both gradients as BLAS matrix products, in bounded memory.

Notation: n c h w input; k r s weight (cg = c/g, kg = k/g per group g); oh ow output; sh sw stride;
ph pw top/left padding; dh dw dilation; a tap t = (c, r, s) of one group, tn = cg*r*s taps in the
order of ``w.reshape(k, tn)``; m output positions of one tile.

The column matrix of one image and group has one row per tap and one column per output position:
``col[t, i*ow + j] = x_pad[n, c, i*sh + r*dh, j*sw + s*dw]``.  Then, per image and group,

* forward:      ``y[n, g] (kg x oh*ow) = w[g] (kg x tn) . col (tn x oh*ow)``
* grad_weight:  ``gw[g] (kg x tn) += gy[n, g] (kg x oh*ow) . col.T``
* grad_input:   ``gcol = w[g].T . gy[n, g]`` scattered back (col2im) onto the input positions it
  was gathered from; with stride 1 and wide groups instead the forward correlation of the padded
  ``gy`` with the flipped, channel-swapped kernel (a gather, no scatter; see :func:`_transposed`).

Gather.  By default the input is first copied once into zero-padded planes whose columns are split
by phase ``iw % sw`` (common.pad_planes' layout): every tap of every output row is then one
contiguous run of ow elements, copied with no bounds checks or strides (5-15x faster than a
bounds-checked strided gather here).  Without padding and with column stride 1 the input's own
planes have that layout, and the gather reads them in place (no copy, one parallel region less:
lenet5-c1/-c3 forward and grad_weight -11 to -20%).  When the copy does not fit the budget, the
gather reads the raw planes with bounds checks instead.

Tiles.  ``col`` is never built whole: a tile is a block of output rows of one image, or several
whole images when planes are small (< 256 positions: one GEMM for several images, through a
staging buffer), of one group -- and in the backward passes, of a block of input channels (a
block of taps).  Each numba worker owns one tile buffer, and the padded copy plus all workers'
buffers stay under ``p.workspace_limit``; a budget below one output row of one channel's taps
(all taps in the forward pass) is refused by :func:`supports`.  1x1 kernels with stride 1 and no
padding need no column matrix: ``x[n, g]`` *is* ``col`` and the GEMM reads it in place.

GEMM.  Kernels call a Fortran ``?gemm`` through a function pointer passed as an argument -- the
OpenBLAS bundled with numpy when found, else scipy's ``cython_blas`` (see :mod:`._blas`) -- with our
own leading dimensions and ``beta``: the forward GEMM writes straight into a row block of ``y``,
grad_weight accumulates into ``gw`` with ``beta = 1``, and grad_input reads ``gy`` in place.
numba types the pointer by its signature only, so ``cache=True`` stays valid across processes.

One thread pool.  numba's workers (``prange``) claim work items (tiles) one at a time, and BLAS runs
single-threaded inside each: ``_blas.serial_blas`` holds the library to one thread for the duration
of a call (save/set/restore through a threadpoolctl handle found once: ~2 us; entering
``threadpool_limits`` costs ~1.8 ms).  With both pools active, four 64x576x448 GEMMs in a
``prange`` took 112 ms instead of 1.2 ms here.

Race-freedom and determinism.  forward: each item writes its own block of ``y``.  grad_input: an
item owns whole input planes (image block, channel block) and scatters only into them.
grad_weight: an item owns a block of taps of one group (its columns of ``gw``) and reduces over its
share of the batch in a fixed order; when there are fewer channel blocks than workers the batch is
split too, into per-split partial sums added in split order after the parallel loop.  So results
depend on the thread count and the budget (through the tiling) only by rounding, and a given
configuration always gives the same bits.  One more thing moves the rounding, cause not found: calls
from the main Python thread and from another thread that has set its thread count differ at the
~1e-6 level (tests/test_threads.py compares worker-thread runs with each other for that reason).
"""
import dataclasses

import numba
import numpy as np

from .._config import result, result_zeros
from ._blas import _BLAS, serial_blas
from ._im2col_kernels import _forward, _grad_input, _grad_weight
from .common import SLACK, _split_planes, _unsplit, transposed_weight

# ---------------------------------------------------------------------------------------- planning
_TILE_BYTES = 1 << 20   # column tile per worker to aim for: fits in L2 next to the GEMM's packing
_M_MIN = 256            # fewest output positions per GEMM worth a BLAS call; smaller planes batch images
_IN_PLACE_MIN = 32      # 1x1 planes this small are gathered and batched too (_forward_in_place)


def _direct(p):
    """1x1, stride 1, no padding: the input planes are the column matrix."""
    return p.r == 1 and p.s == 1 and p.sh == 1 and p.sw == 1 and not p.padded


def _forward_in_place(p):
    """The forward GEMM reads 1x1 layers' planes in place (:func:`_direct`) unless they are tiny:
    planes under ``_IN_PLACE_MIN`` positions are gathered instead, so that one GEMM covers several
    images (2 threads, AVX2, K = C: 16x512x3x3 1.47 -> 0.94 ms, 32x512x4x4 3.30 -> 2.67; at 6x6
    gathering lost, 0.66 -> 0.83, and at 8x8 and 12x12 it was even).  The backward passes keep
    reading in place: batched there, they measured slower."""
    return _direct(p) and (p.oh * p.ow >= _IN_PLACE_MIN or p.n == 1
                           or p.cg * p.ow * p.itemsize > p.workspace_limit)


def _min_workspace(p, pass_):
    """Bytes of the smallest tile: one output row of all taps (forward) or of one channel's taps."""
    if _direct(p):
        return 0
    taps = p.cg * p.r * p.s if pass_ == "forward" else p.r * p.s
    return taps * p.ow * p.itemsize


def _planes_bytes(p, n, c):
    """Bytes of the padded, phase-split copy (common.pad_planes' layout) of an (n, c, h, w) array."""
    wq = -(-p.wp // p.sw)
    return n * c * (p.sw * p.hp * wq + SLACK) * p.itemsize


_PLANS = {}  # (the _Plan arguments, thread count) -> _Plan: planning costs ~10 us of Python a call


def _plan(p, col_rows, stage_rows, par, nimg, copy_bytes, direct):
    """The (cached) tiling of one pass for the calling thread's numba thread count."""
    key = (p, col_rows, stage_rows, par, nimg, copy_bytes, direct, numba.get_num_threads())
    plan = _PLANS.get(key)
    if plan is None:
        if len(_PLANS) > 1024:
            _PLANS.clear()
        plan = _PLANS[key] = _Plan(p, col_rows, stage_rows, par, nimg, copy_bytes, direct, key[-1])
    return plan


class _Plan:
    """Tiling of one pass: ``padded`` (gather from a padded copy), nw workers, nb images or rb rows
    per tile, mmax positions per tile, ``words`` buffer elements per worker."""

    def __init__(self, p, col_rows, stage_rows, par, nimg, copy_bytes, direct, nthreads=None):
        isz, oh, ow = p.itemsize, p.oh, p.ow
        limit = p.workspace_limit
        if nthreads is None:
            nthreads = numba.get_num_threads()
        row = 0 if direct else col_rows * ow * isz
        # gather from a padded, phase-split copy when it leaves room for a row per worker: it turns
        # every tap row into one contiguous run (5-15x faster gathers than bounds-checked strides)
        self.padded = not direct and copy_bytes + nthreads * row <= limit
        avail = limit - (copy_bytes if self.padded else 0)
        nw = nthreads if not row else max(1, min(nthreads, avail // row))
        per_worker = avail // nw
        plane = oh * ow
        nb, rb = 1, oh
        if plane < _M_MIN and nimg > 1 and not direct:
            # small planes: several whole images per GEMM, but leave an item for every worker
            nb = min(nimg, -(-_M_MIN // plane), max(1, nimg * par // nthreads))
            nb = max(1, min(nb, per_worker // (plane * (col_rows + stage_rows) * isz)))
        if nb == 1:
            rb = max(-(-_M_MIN // ow), _TILE_BYTES // row if row else oh)
            if nimg * par < nthreads:  # split rows so that every worker gets one
                rb = min(rb, -(-oh // -(-nthreads // (nimg * par))))
            if row:
                rb = min(rb, per_worker // row)
            rb = max(1, min(rb, oh))
        items = -(-nimg // nb) * par * (-(-oh // rb) if nb == 1 else 1)
        self.nw = max(1, min(nw, items))
        self.nb, self.rb = nb, rb
        self.mmax = nb * rb * ow
        self.words = 0 if direct else col_rows * self.mmax + (stage_rows * self.mmax if nb > 1 else 0)

    def buffer(self, dtype):
        return np.empty((self.nw, max(1, self.words)), dtype=dtype)


def _in_place(x, p):
    """No padding and column stride 1: the raw planes already are the padded, phase-split layout
    (hp = h, wq = w) and every tap run lies inside its plane, so the gather reads ``x`` itself.
    Read-only inputs are copied instead: numba would compile another specialisation for them."""
    return not p.padded and p.sw == 1 and x.flags.c_contiguous and x.flags.writeable


def _copy_bytes(x, p):
    """Bytes of the padded copy a gather from ``x`` needs (0 when it reads ``x`` in place)."""
    return 0 if _in_place(x, p) else _planes_bytes(p, p.n, p.c)


def _source(x, p, padded):
    """(n, c, L) planes the gather reads: padded and phase-split, or the raw planes."""
    if padded and _in_place(x, p):
        return x.reshape(p.n, p.c, p.h * p.w)
    x = np.ascontiguousarray(x)
    if not padded:
        return x.reshape(p.n, p.c, p.h * p.w)
    wq = -(-p.wp // p.sw)
    out = result((p.n, p.c, p.sw * p.hp * wq + SLACK), x.dtype)
    _split_planes(x.reshape(p.n * p.c, p.h, p.w), out.reshape(p.n * p.c, -1), p.sw, p.hp, wq, p.ph0, p.pw0)
    return out


# ---------------------------------------------------------------------------------------- passes
def forward(x, w, b, p):
    tn = p.cg * p.r * p.s
    direct = _forward_in_place(p)
    plan = _plan(p, tn, p.kg, p.g, p.n, _copy_bytes(x, p), direct)
    src = _source(x, p, plan.padded)
    wq = -(-p.wp // p.sw)
    y = result(p.y_shape, p.dtype)
    has_bias = b is not None
    bb = np.ascontiguousarray(b) if has_bias else np.zeros(p.k, p.dtype)
    with serial_blas:
        _forward(src, np.ascontiguousarray(w).reshape(-1), bb, y.reshape(-1), plan.buffer(p.dtype),
                 *_BLAS.args(p.dtype, plan.nw), np.zeros(1, np.int64), has_bias, plan.padded, direct, p.g, p.r, p.s, p.sh,
                 p.sw, p.ph0, p.pw0, p.dh, p.dw, p.hp, wq, p.h, p.w, p.oh, p.ow, plan.nb, plan.rb,
                 plan.mmax)
    return y


def _channel_block(p, par, nthreads):
    """Channels per block in the backward passes: split a group's channels only as far as needed
    to give every worker an item, and as the budget requires (one row of the block's taps)."""
    cb = p.cg
    if par < nthreads:
        cb = -(-p.cg // min(p.cg, -(-nthreads // par)))
    if not _direct(p):
        cb = max(1, min(cb, p.workspace_limit // (p.r * p.s * p.ow * p.itemsize)))
    return cb


def _transposed(p):
    """Parameters of grad_input as a forward convolution, or None where col2im is the better way
    (the caller also keeps col2im for non-finite weights).

    With stride 1, grad_input is the correlation of ``gy``, padded by the kernel extent less the
    forward padding, with the flipped kernel whose channels are swapped within each group.  Its
    GEMM has cg output rows, so it pays only for wide groups; it then gathers instead of
    scattering (single thread: resnet50-3x3-64 22.7 vs 25.8 ms, dilated-3x3-d2 29.9 vs 33.7 ms,
    but lenet5-c3 2.9 vs 0.9 ms and resnet50-3x3-512's 7x7 planes 25.4 vs 23.6 ms).
    """
    eh, ew = p.dh * (p.r - 1), p.dw * (p.s - 1)
    if (p.sh != 1 or p.sw != 1 or p.cg < 32 or p.h * p.w < 1024
            or max(p.ph0, p.ph1) > eh or max(p.pw0, p.pw1) > ew):
        return None
    q = dataclasses.replace(p, c=p.k, h=p.oh, w=p.ow, k=p.c, ph0=eh - p.ph0, ph1=eh - p.ph1,
                            pw0=ew - p.pw0, pw1=ew - p.pw1, oh=p.h, ow=p.w)
    return q if _min_workspace(q, "forward") <= q.workspace_limit else None


def grad_input(gy, w, p):
    q = _transposed(p)
    # the correlation multiplies every weight by the zero padding of gy: a non-finite weight would
    # make NaNs at border positions that the scatter (and PyTorch) never reach
    if q is not None and np.isfinite(w).all():
        return forward(gy, transposed_weight(w, p.g), None, q)
    direct = _direct(p)
    nthreads = numba.get_num_threads()
    cb = _channel_block(p, p.n * p.g, nthreads)
    ncb = -(-p.cg // cb)
    wq = -(-p.wp // p.sw)
    plan = _plan(p, cb * p.r * p.s, p.kg, p.g * ncb, p.n, _planes_bytes(p, p.n, p.c), direct)
    if plan.padded:
        gq = result_zeros((p.n, p.c, p.sw * p.hp * wq + SLACK), p.dtype)
    else:
        gq = (np.empty if direct else np.zeros)((p.n, p.c, p.h * p.w), dtype=p.dtype)
    with serial_blas:
        _grad_input(np.ascontiguousarray(gy).reshape(-1), np.ascontiguousarray(w).reshape(-1), gq,
                    plan.buffer(p.dtype), *_BLAS.args(p.dtype, plan.nw), np.zeros(1, np.int64), plan.padded,
                    direct, p.g, p.k, p.r, p.s,
                    p.sh, p.sw, p.ph0, p.pw0, p.dh, p.dw, p.hp, wq, p.h, p.w, p.oh, p.ow,
                    plan.nb, plan.rb, cb, plan.mmax)
    if not plan.padded:
        return gq.reshape(p.x_shape)
    gx = result(p.x_shape, p.dtype)
    _unsplit(gq.reshape(p.n * p.c, -1), gx.reshape(p.n * p.c, p.h, p.w), p.sw, p.hp, wq, p.ph0, p.pw0)
    return gx


def _batch_splits(p, cb, nthreads):
    """Batch splits for grad_weight with channel blocks of cb: when there are fewer (group, channel
    block) items than workers, as many as give every worker one, as far as the extra partial sums
    of gw leave room in the budget for a row per worker."""
    blocks = p.g * -(-p.cg // cb)
    row = 0 if _direct(p) else cb * p.r * p.s * p.ow * p.itemsize
    nsplit = 1
    if blocks < nthreads and p.n > 1:
        nsplit = min(p.n, -(-nthreads // blocks))
        while nsplit > 1 and (nsplit - 1) * p.k * p.cg * p.r * p.s * p.itemsize + nthreads * row > p.workspace_limit:
            nsplit -= 1
    return nsplit


def _weight_tiling(p, nthreads):
    """(channels per block, batch splits) of grad_weight: split a group's channels for the workers
    or split the batch, whichever leaves the busiest worker the least work (channels x images per
    item, items dealt round-robin); a tie keeps the channel split (no partial sums to add).  Three
    channels on two workers split 2 + 1 and left one worker idle a third of the time: the batch
    split took alexnet-c1 12.6 -> 10.0 ms and resnet50-stem 23.7 -> 18.2 ms here."""
    best = None
    for cb in (_channel_block(p, p.g, nthreads), _channel_block(p, nthreads, nthreads)):
        nsplit = _batch_splits(p, cb, nthreads)
        items = nsplit * p.g * -(-p.cg // cb)
        busiest = -(-items // nthreads) * cb * -(-p.n // nsplit)
        if best is None or busiest < best[0]:
            best = (busiest, cb, nsplit)
    return best[1], best[2]


def grad_weight(gy, x, p):
    direct = _direct(p)
    nthreads = numba.get_num_threads()
    tn = p.cg * p.r * p.s
    cb, nsplit = _weight_tiling(p, nthreads)
    blocks = p.g * -(-p.cg // cb)
    extra = (nsplit - 1) * p.k * tn * p.itemsize
    sub = _Params(p, p.workspace_limit - extra)
    plan = _plan(sub, cb * p.r * p.s, p.kg, nsplit * blocks, -(-p.n // nsplit),
                 _copy_bytes(x, p), direct)
    src = _source(x, p, plan.padded)
    wq = -(-p.wp // p.sw)
    gwp = np.zeros((nsplit, p.k * tn), dtype=p.dtype)
    with serial_blas:
        _grad_weight(np.ascontiguousarray(gy).reshape(-1), src, gwp, plan.buffer(p.dtype),
                     *_BLAS.args(p.dtype, plan.nw), np.zeros(1, np.int64), plan.padded, direct, p.g, p.k,
                     p.r, p.s, p.sh,
                     p.sw, p.ph0, p.pw0,
                     p.dh, p.dw, p.hp, wq, p.h, p.w, p.oh, p.ow, plan.nb, plan.rb, cb, plan.mmax)
    gw = gwp[0]
    for i in range(1, nsplit):  # fixed order: the same bits for the same thread count and budget
        gw += gwp[i]
    return gw.reshape(p.w_shape)


def _Params(p, limit):
    """``p`` with another workspace limit."""
    return dataclasses.replace(p, workspace_limit=max(1, limit))


# ---------------------------------------------------------------------------------------- registry
_INT_MAX = 2**31 - 1  # BLAS sizes and leading dimensions are 32-bit ints


def supports(p, pass_):
    """Every stride, padding, dilation and group count; refuses a budget below one output row."""
    if max(p.h * p.w, p.oh * p.ow, p.k * p.cg * p.r * p.s) > _INT_MAX:
        return "a plane or the weight matrix has more than 2**31 - 1 elements (BLAS int sizes)"
    need = _min_workspace(p, pass_)
    if need > p.workspace_limit:
        return (f"needs at least {need} bytes of workspace for one output row, "
                f"workspace_limit is {p.workspace_limit}")
    return None


def cost(p, pass_, threads):
    """Seconds: a per-call floor plus GEMM flops at a rate that falls with the GEMM's thinnest side.

    Fitted to single-thread CPU times on the 2-core EPYC (AVX2) build machine (shared, so +-20%): float32
    GEMM-bound shapes run at ~80 GFLOP/s per thread times ``kg / (kg + 12)`` (kg = output channels
    per group: 72 GFLOP/s on resnet50-3x3-64, 40 on lenet5-c3 with kg = 16, 8 on a depthwise layer
    with kg = 1); float64 at half that; the col2im scatter of grad_input adds ~10%; gathers are
    included in the fit.  Workers scale it by the thread count at ~90% efficiency.
    """
    scale = 1.0 + 0.9 * (threads - 1)
    rate = (80e9 if p.itemsize == 4 else 40e9) * p.kg / (p.kg + 12.0) * scale
    t = 2.0 * p.macs / rate
    if pass_ == "grad_input":
        t *= 1.1
    # one BLAS call, gather (and scatter) per image and group: depthwise layers are thousands of
    # tiny products (16x128x12x12 stride-2 grad_input: 2048 of them, 0.85 ms where the flops say 0.11)
    return 2e-5 + t + _PER_PRODUCT * p.n * p.g / scale


# Seconds per (image, group) product on one worker beyond its flops (AVX-512 Xeon, 2 threads:
# 0.3-0.7 us over the depthwise layers of benchmarks/torch_train_step.py's MobileNet).
_PER_PRODUCT = 0.5e-6
