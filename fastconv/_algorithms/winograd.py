"""Winograd convolution F(m x m, 3 x 3) for 3x3, stride-1 layers: all three passes.

A dilated layer runs as the undilated one on its phase sub-images stacked into the batch
(:mod:`._dilation_phases`); everything below is about the undilated problem, and with dilation
(dh, dw) a tile of a sub-image covers outputs dh (dw) apart, which is also how far a NaN spreads.

Notation: n c h w input; k 3 3 weight (cg = c/g, kg = k/g per group g); oh ow output; ph0 pw0
top/left padding; m the output tile (4 or 2), a = m + 2 the transformed tile, e = i*a + j one of
its a*a elements; th = ceil(oh/m), tw = ceil(ow/m) tiles per column / row; T tiles of one work item.

Method (Lavin & Gray, 2015).  With the 1-D matrices ``B^T`` (a x a), ``G`` (a x 3) and ``A^T``
(m x a) of F(m, 3) (interpolation points 0, +-1, +-2 and infinity for m = 4; 0, +-1 and infinity
for m = 2), the output tile ``Y`` of output channel k is

    Y = A^T [ sum_c (G g_kc G^T) (.) (B^T d_c B) ] A

where ``d_c`` is the a x a input patch of channel c under the tile (zero outside the input) and
(.) the element-wise product.  The channel sum is, for each element e, a matrix product
``M[e] (kg x T) = U[e] (kg x cg) . V[e] (cg x T)`` over the T tiles of a work item: a*a products
per m x m output tile and channel pair instead of 9*m*m (36 instead of 144 for m = 4, 16 instead
of 36 for m = 2).

* forward: ``U = G g G^T`` (recomputed every call, in float64 then rounded once: weights change
  every training step, so nothing is cached), input transform ``V``, the GEMMs, output transform.
* grad_input: with stride 1 it is the forward correlation of ``gy``, padded by ``2 - ph`` (negative:
  cropped), with the flipped kernel whose channels are swapped within each group: the same code.
* grad_weight: the transpose of the bilinear algorithm.  ``gw_kc = G^T [ sum_{n,tiles} (A gy_k A^T)
  (.) (B^T d_c B) ] G``: the input transform as in the forward pass, the ``A . A^T`` transform of
  each m x m tile of ``gy`` (zero beyond the output), GEMMs ``Mw[e] (kg x cb) += W[e] (kg x T) .
  V[e]^T (T x cb)`` accumulated over all tiles, then ``G^T Mw G`` to the 3 x 3 taps (float64).

Kernels (:mod:`._winograd_kernels`).  One parallel kernel per pass; numba's workers claim work
items.  Forward (and grad_input): an item is R consecutive tile rows of one group (across images),
its tiles in slots with one spare per tile row so that each transform is a few long vector loops
over contiguous rows (input rows copied zero-padded side by side, column transform, split into the m
column phases, row transform; the output transform backwards, interleaving the phases into the
output rows with vector shuffles); ``U`` is transformed once per call straight into the MR-row
panels of fastconv's GEMM micro-kernel and the a*a products run on that micro-kernel reading the
transformed rows in place (:func:`.gemm.ukernel_ldb`).  R is the row count, within ~1.5 MiB of
transformed tiles per item (L2) and at least 4 items per worker, that wastes the fewest columns of
the micro-kernel's NR-wide panels.  On small planes (1-4 tiles per row) those items waste most
columns and each streams all of U; there every pass may run batch-wide instead, in NHWC, each step
over all tiles of the batch at once (:mod:`.winograd_nhwc`; grad_weight's GEMMs reduce over the
tiles), chosen by cost per call (:data:`_BATCH_MARGIN`).  Besides it grad_weight has two kernels of
its own, chosen by cost.  On the row transforms (:mod:`._winograd_gw_kernels`): each worker takes a
fixed share of the tile rows of every group, transforms the input with the forward's code and gy
with the output transform's transpose into the same slot layout, and adds the a*a products
``w[e] . v[e]^T`` (single-threaded BLAS, im2col's ?gemm pointer) into sums of its own, added in
worker order at the end (memory (workers + 1) * a*a*k*cg; wins on wide planes: resnet50-3x3-64 21-28 ms against
the gathers' 30-44 and im2col's 39-44, 1 thread, AVX2 EPYC).  On the gathers: items are blocks of cb
input channels of one group with the whole batch; tiles are gathered, transformed by rows of 1-D
multiply-adds, and multiplied by BLAS the same way; it keeps one shared accumulator, so it is what
fits when the workers' sums do not, and it is cheaper where kg*cg is large and planes small
(resnet50-3x3-512: its short reductions re-add 16 MB of sums).  m is chosen per call by :func:`cost`
(F(2x2) wins on small planes, where F(4x4) wastes a partial tile), except that float32 grad_weight
uses F(2x2) on the packed, row and batch-wide kernels: with F(4x4) their sums over the batch and
every tile missed the element-wise tolerance of tests/test_conv.py (1e-4) on a 1x2x40x37 case
(error 2.9e-4 on an element of 1.92, 3.5e-6 of the largest), before the tests' tolerances took
the registry's float32_error factor.  The fused grad_weight chooses between F(2x2) and F(4x4) by
cost: F(4x4) took 2.9 ms where F(2x2) took 3.7 on resnet50-3x3-64 (vgg16-3x3-128 5.7 / 6.7; the
32-channel 128x128 U-Net layer 2.5 / 3.3), its error 3.4-3.7e-6 of the largest gradient against
im2col's 4.6e-7 (8x, within the factor 16 the forward has; tested like it).

By output-channel panels (:mod:`.winograd_kpanel`): forward (and grad_input) and grad_weight
with the batch's tiles as the micro-kernel's NR columns and MR output channels as its rows; each
item transforms U for its own rows block by block in L2 (the forward) or turns its Mw block back
into taps there (grad_weight), so neither U nor Mw (37.7 MB each for resnet50-3x3-512 at F(4x4))
travels through memory, and both read NCHW or channels_last arrays in place.  It is what small
planes with many channels take (resnet50-3x3-512 on Zen 4: forward 10 -> 5.5 ms, grad_weight
9.2 -> 6.2); where it fits, the batch-wide plan is no longer considered (it lost every timed
layer to it; see :func:`_cached_plan`).

Memory.  Per worker: ``a*a * (cg + kg) * T`` elements of transformed tiles (T the slots of an item,
rounded up to whole panels) plus rows of scratch; shared: ``U`` packed (``a*a * k * cg`` rounded up
to MR rows per group, 4x the weight for m = 4) or grad_weight's accumulator.  T is chosen so that
all of it stays under ``p.workspace_limit``; below one tile row on one worker :func:`supports`
refuses.

Races and determinism.  Forward items write disjoint output tiles; the gathering grad_weight's
items own disjoint channel blocks of ``Mw`` and reduce over the batch and tiles in a fixed order;
the row-transform grad_weight's workers own their sums and fixed shares of the tiles.  The tiling follows
the thread count (T, channel blocks), so results are bitwise reproducible for a given thread count
and budget, and equal within rounding across thread counts.

Accuracy.  Exact in exact arithmetic.  In floating point, a first-order bound on one output y of
channel k (forward, and grad_input as a forward pass) is

    |y - y_exact| <= eps * (15 + cg) * S_m**2 * sum_c max|d_c| * max|g_kc|   (+ eps*|b_k|)

with ``max|d_c|`` over the tile's a x a input patch, ``max|g_kc|`` over the 9 taps, eps the dtype's
machine epsilon and ``S_m = max_i sum_{r,j} |A^T[i,e]| |G[e,r]| |B^T[e,j]|`` summed over e too
(:func:`transform_sum`: S_4 = 48, S_2 = 8): the weight transform rounds once (eps/2; a few eps
where :mod:`.winograd_kpanel` computes it in float32, and likewise its grad_weight's taps), the input
transform's two passes add up to ~6 eps, the GEMM's channel sum cg eps, the output transform's two
passes ~8 eps, each relative to the absolute-value transforms that S_m bounds.  The direct sum's
bound is ``eps * 9*cg * sum |d||g|``: F(4x4)'s worst case is ~28x larger (2304/81), F(2x2)'s
about the same.  The bound is relative to the largest input of the tile, not to each product: a
small output next to large inputs loses digits.  Measured, float32, largest error relative to the
largest output (benchmarks/winograd_report.py, random normal data): F(4x4) 6.9e-6, 9.7e-6 and
4.8e-6 on resnet50-3x3-64, vgg16-3x3-128 and the 32-channel U-Net layer, against im2col's 5.6e-7,
4.7e-7 and 8.0e-7 (12-21x: the ratio grows with the channel count); F(2x2) on resnet50-3x3-512
4.4e-7 against 3.1e-7.  tests/test_winograd.py asserts the bound and, on its small cases (random,
1e-4..1e4 and adversarial data), at most 16x im2col's error for F(4x4) and 6x for F(2x2); float64
to 1e-10 relative (measured ~1e-14).

NaN and Inf: a non-finite input value spreads over the output tiles whose input patch holds it (up
to 2 x 2 tiles, i.e. up to 2m x 2m outputs, in every output channel of its group and image); a
non-finite weight over every output of its output channel.  PyTorch (and the direct algorithm)
only poison the 3 x 3 windows that touch the value.
"""
from __future__ import annotations

import dataclasses

import numba
import numpy as np

from .. import _cpu
from .._config import result, scratch
from . import _dilation_phases as phases
from . import _winograd_gw_kernels as KG
from . import _winograd_kernels as K
from . import gemm as _gemm
from . import nhwc as _nhwc
from . import winograd_fused as WF
from . import winograd_kpanel as WK
from . import winograd_nhwc as WN
from ._blas import _BLAS, serial_blas

# --------------------------------------------------------------------------- transform matrices
# float64 copies for the Python-side weight transforms (kernels hard-code the same numbers).
_BT = {
    4: np.array([[4, 0, -5, 0, 1, 0],
                 [0, -4, -4, 1, 1, 0],
                 [0, 4, -4, -1, 1, 0],
                 [0, -2, -1, 2, 1, 0],
                 [0, 2, -1, -2, 1, 0],
                 [0, 4, 0, -5, 0, 1]], dtype=np.float64),
    2: np.array([[1, 0, -1, 0],
                 [0, 1, 1, 0],
                 [0, -1, 1, 0],
                 [0, 1, 0, -1]], dtype=np.float64),
}
_G = {
    4: np.array([[1 / 4, 0, 0],
                 [-1 / 6, -1 / 6, -1 / 6],
                 [-1 / 6, 1 / 6, -1 / 6],
                 [1 / 24, 1 / 12, 1 / 6],
                 [1 / 24, -1 / 12, 1 / 6],
                 [0, 0, 1]], dtype=np.float64),
    2: np.array([[1, 0, 0],
                 [0.5, 0.5, 0.5],
                 [0.5, -0.5, 0.5],
                 [0, 0, 1]], dtype=np.float64),
}
_AT = {
    4: np.array([[1, 1, 1, 1, 1, 0],
                 [0, 1, -1, 2, -2, 0],
                 [0, 1, 1, 4, 4, 0],
                 [0, 1, -1, 8, -8, 1]], dtype=np.float64),
    2: np.array([[1, 1, 1, 0],
                 [0, 1, -1, -1]], dtype=np.float64),
}
TILES = (4, 2)


def transform_sum(m):
    """S_m of the Accuracy section: ``max_i sum_{e,r,j} |A^T[i, e]| |G[e, r]| |B^T[e, j]|`` of F(m, 3).

    Examples
    --------
    >>> from fastconv._algorithms import winograd
    >>> round(winograd.transform_sum(4), 6), round(winograd.transform_sum(2), 6)
    (48.0, 8.0)
    """
    at, g, bt = np.abs(_AT[m]), np.abs(_G[m]), np.abs(_BT[m])
    return float(np.einsum("ie,er,ej->i", at, g, bt).max())


_MATS: dict = {}


def _matrices(m, dtype):
    """(B^T, A^T, A) of F(m, 3) as C-contiguous arrays of ``dtype`` (the kernels' transform tables)."""
    key = (m, np.dtype(dtype))
    if key not in _MATS:
        _MATS[key] = tuple(np.ascontiguousarray(t, dtype=dtype) for t in (_BT[m], _AT[m], _AT[m].T))
    return _MATS[key]


# --------------------------------------------------------------------------- planning
_TILE_BYTES = 1 << 20  # transformed tiles per worker to aim for (L2-sized next to the GEMM's packing)
_T_MIN = 64            # fewest tiles per GEMM worth aiming for: each reads a kg x cg block of U


def _tiles(p, m):
    return -(-p.oh // m), -(-p.ow // m)


def _extra_words(m, tw, rb, t):
    """Per-worker buffer elements besides the transformed tiles: two a*a x T scratch rows and the
    padded input strip of rb tile rows."""
    return 2 * (m + 2) ** 2 * t + (m * rb + 2) * (m * tw + 2)


@dataclasses.dataclass(frozen=True)
class _Plan:
    m: int
    nb: int      # images per item
    rb: int      # tile rows per item
    cb: int      # input channels per item (grad_weight)
    nw: int      # workers
    tmax: int    # most tiles in an item
    words: int   # buffer elements per worker
    fixed: int   # bytes shared by all workers (U, or grad_weight's accumulators)
    rowwise: bool = False  # grad_weight on the packed forward's row transforms (else the gathers)
    batch: bool = False    # over the whole batch's tiles (winograd_nhwc; rb: tiles per chunk)
    fused: bool = False    # fused per block of tiles in NHWC (winograd_fused; rb: tiles per block)
    kpanel: bool = False   # by panels of output channels (winograd_kpanel; rb: tile panels per item)


def _plan(p, m, nthreads):
    """The tiling of grad_weight with F(m x m, 3 x 3), or the reason it cannot fit the budget."""
    if p.n == 0:  # an empty batch computes nothing; plan as for one image (supports() still answers)
        p = dataclasses.replace(p, n=1)
    isz = p.itemsize
    th, tw = _tiles(p, m)
    a2 = (m + 2) ** 2
    fixed = a2 * p.k * p.cg * isz  # grad_weight's accumulator
    cb = -(-p.cg // min(p.cg, max(1, -(-nthreads // p.g))))  # every worker gets a channel block
    per_tile = a2 * (cb + p.kg) * isz
    items = p.g * -(-p.cg // cb)
    # tiles per step: ~_TILE_BYTES of transformed tiles, whole images when planes are small
    want = max(tw, _T_MIN, _TILE_BYTES // per_tile)
    plane = th * tw
    if plane <= want:
        nb, rb = max(1, min(p.n, want // plane)), th
    else:
        nb, rb = 1, max(1, min(th, want // tw))

    def words(nb_, rb_):
        t = nb_ * rb_ * tw
        return t, per_tile // isz * t + _extra_words(m, tw, rb_, t)

    nw = max(1, min(nthreads, items))
    while True:
        tmax, wds = words(nb, rb)
        if fixed + nw * wds * isz <= p.workspace_limit:
            break
        if nb > 1:
            nb = max(1, nb // 2)
        elif rb > 1:
            rb = max(1, rb // 2)
        elif nw > 1:
            nw -= 1
        else:
            need = fixed + wds * isz
            return (f"needs at least {need} bytes of workspace (transformed weights and one row of "
                    f"tiles), workspace_limit is {p.workspace_limit}")
    return _Plan(m, nb, rb, cb, nw, tmax, wds, fixed)


_PLANS: dict = {}


def _cached_plan(p, pass_, m=None, rowwise=None, batch=None, fused=None, kpanel=None):
    """The cheaper fitting plan of ``pass_`` (``m`` forces a tile size; ``rowwise`` True/False forces
    grad_weight's kernel; ``batch`` True the forward's batch-wide kernel, False its packed one,
    ``fused`` True the fused one, ``kpanel`` True the one by output-channel panels: the tests reach
    each on small cases), or the first refusal."""
    nthreads = numba.get_num_threads()
    key = (p, pass_, m, rowwise, batch, fused, kpanel, nthreads)
    pl = _PLANS.get(key)
    if pl is None:
        tiles = (m,) if m else (2,) if pass_ == "grad_weight" and p.itemsize == 4 else TILES
        if pass_ == "grad_weight" and fused:
            plans = [_fused_gw_plan(p, mm, nthreads) for mm in ((m,) if m else TILES)]
        elif pass_ == "grad_weight" and kpanel:
            plans = [_kpanel_gw_plan(p, mm, nthreads) for mm in ((m,) if m else TILES)]
        elif pass_ == "grad_weight" and batch:
            plans = [_batch_plan(p, mm, nthreads) for mm in tiles]
        elif pass_ == "grad_weight":
            unforced = rowwise is None and batch is None and fused is None and kpanel is None
            plans = ([_rows_plan(p, mm, nthreads) for mm in tiles] if rowwise is not False else []) + \
                    ([_plan(p, mm, nthreads) for mm in tiles] if rowwise is not True else []) + \
                    ([_batch_plan(p, mm, nthreads) for mm in tiles] if unforced else []) + \
                    ([_fused_gw_plan(p, mm, nthreads) for mm in ((m,) if m else TILES)] if unforced else []) + \
                    ([_kpanel_gw_plan(p, mm, nthreads) for mm in ((m,) if m else TILES)] if unforced else [])
        elif fused:
            plans = [_fused_plan(p, mm, nthreads) for mm in tiles]
        elif kpanel:
            plans = [_kpanel_plan(p, mm, nthreads) for mm in tiles]
        else:
            unforced = batch is None and fused is None and kpanel is None
            plans = ([_packed_plan(p, mm, nthreads) for mm in tiles] if batch is not True else []) + \
                    ([_batch_plan(p, mm, nthreads) for mm in tiles] if batch is not False else []) + \
                    ([_fused_plan(p, mm, nthreads) for mm in tiles] if unforced else []) + \
                    ([_kpanel_plan(p, mm, nthreads) for mm in tiles] if unforced else [])
        fit = [c for c in plans if not isinstance(c, str)]
        if batch is None and any(c.kpanel for c in fit):
            # the batch-wide passes ran slower than the ones by output-channel panels on every layer
            # both serve that was timed (Zen 4, 2 threads; forward 1.2-2.1x: 8x512x7x7 13.0 / 6.3 ms,
            # 16x256x6x6 3.8 / 3.1, 8x64x56x56 13.6 / 9.9, 32x64x8x8 1.19 / 0.85; float32
            # grad_weight, F(2x2) batch-wide, 1.05-1.7x: 8x512x7x7 9.2 / 6.2, 32x256x8x8 8.8 / 5.7,
            # 16x256x6x6 2.8 / 2.7, 8x64x56x56 19.5 / 11.1), while its model, fitted on the Xeon,
            # read up to 2.6x low there and took it
            fit = [c for c in fit if not c.batch]
        pl = min(fit, key=lambda c: _cost_of(p, pass_, c, nthreads) * (_BATCH_MARGIN if c.batch else 1.0)) \
            if fit else plans[0]
        if len(_PLANS) > 1024:
            _PLANS.clear()
        _PLANS[key] = pl
    return pl


def _contiguous(a):
    """A C-contiguous, writeable array (numba compiles another specialisation for read-only ones)."""
    a = np.ascontiguousarray(a)
    return a if a.flags.writeable else a.copy()


# --------------------------------------------------------------------------- passes
_PACKED_TILE_BYTES = 1536 << 10  # v and M of one work item: within the 2 MiB L2 of an AVX-512 core


def _ldt(slots, nr):
    """Row length of the transformed tiles: whole micro-kernel panels plus 16 elements, so that the
    a*a*cg rows a transform writes are not 4 KiB apart (multiples of 4 KiB share L1 sets: with
    ldt = 96, resnet50-3x3-64's 36 rows 24 KiB apart made both transforms 2-3x slower)."""
    return -(-slots // nr) * nr + 16


def _packed_words(p, m, rows, nr):
    """Buffer elements per worker of the packed forward (and of grad_weight's row transforms):
    v and M (or w) of ``rows`` tile rows, the copied rows, their phases and the output transform's rows."""
    a2 = (m + 2) ** 2
    sl = _tiles(p, m)[1] + 1
    ldt = _ldt(rows * sl, nr)
    return (a2 * ((p.cg + p.kg) * ldt + 32) + 2 * (m + 2) * rows * m * sl + (m + 2) * (rows * sl + 17)
            + m * (m + 2) * ldt + m * m * ldt + 64)


def _packed_plan(p, m, nthreads):
    """The tiling of the packed forward pass with F(m x m, 3 x 3), or the reason it cannot fit."""
    isz = p.itemsize
    mr, nr = _gemm.tile(isz)
    a2 = (m + 2) ** 2
    th, tw = _tiles(p, m)
    sl = tw + 1
    trows = max(1, p.n) * th
    kgp = -(-p.kg // mr) * mr
    fixed = a2 * p.g * kgp * p.cg * isz  # packed U
    per_slot = a2 * (p.cg + p.kg) * isz
    # at least 4 items per worker (claimed dynamically: a worker sharing its core with another busy
    # thread does fewer), and as many tile rows per item as that and the L2 budget allow
    # (one item per worker when U outgrows the caches: every item streams all of it)
    want = -(-(4 if fixed <= _U_CACHED else 1) * nthreads // p.g)
    top = max(1, min(_PACKED_TILE_BYTES // (sl * per_slot), -(-trows // want)))
    # the products run over whole NR-column panels: of the row counts up to top, the one that
    # computes the fewest wasted columns per real tile (a tie goes to more rows)
    rows = min(range(1, top + 1), key=lambda r: (-(-r * sl // nr) * nr / (r * tw), -r))

    def words(rows_):
        return _packed_words(p, m, rows_, nr)

    nw = max(1, min(nthreads, p.g * -(-trows // rows)))
    while fixed + nw * words(rows) * isz > p.workspace_limit:
        if rows > 1:
            rows = max(1, rows // 2)
        elif nw > 1:
            nw -= 1
        else:
            need = fixed + words(rows) * isz
            return (f"needs at least {need} bytes of workspace (transformed weights and one row of "
                    f"tiles), workspace_limit is {p.workspace_limit}")
    return _Plan(m, 1, rows, p.cg, nw, _ldt(rows * sl, nr), words(rows), fixed)


# The batch-wide forward must be modelled this much cheaper than the packed one to be chosen: the
# packed model reads 10-50% low on wide planes (8x64x56x56 F(4x4): 5.7 ms modelled, 7.2-11.1
# measured), where vgg16-3x3-128 measured 14.8 ms packed, 16.6 batch-wide, 17.0 / 16.2 modelled.
_BATCH_MARGIN = 1.15


def _nhwc_plan(got, p, m, nthreads, **kind):
    """A ``_Plan`` of an NHWC kernel from its module's ``(tiles per step, words, fixed)``, or the
    module's refusal."""
    if isinstance(got, str):
        return got
    tiles, words, fixed = got
    return _Plan(m, 1, tiles, p.cg, nthreads, tiles, words, fixed, **kind)


def _batch_plan(p, m, nthreads):
    """A pass over the whole batch's tiles (:mod:`.winograd_nhwc`), or why it cannot fit."""
    return _nhwc_plan(WN.plan(p, m, nthreads), p, m, nthreads, batch=True)


def _fused_plan(p, m, nthreads):
    """The forward fused per block of tiles (:mod:`.winograd_fused`), or why it cannot fit."""
    return _nhwc_plan(WF.plan(p, m, nthreads), p, m, nthreads, fused=True)


def _kpanel_plan(p, m, nthreads):
    """The forward by panels of output channels (:mod:`.winograd_kpanel`), or why it cannot fit."""
    return _nhwc_plan(WK.plan(p, m, nthreads), p, m, nthreads, kpanel=True)


def _kpanel_gw_plan(p, m, nthreads):
    """grad_weight by panels of output channels (:mod:`.winograd_kpanel`), or why it cannot fit."""
    return _nhwc_plan(WK.gw_plan(p, m, nthreads), p, m, nthreads, kpanel=True)


def _fused_gw_plan(p, m, nthreads):
    """grad_weight fused per block of tiles (:mod:`.winograd_fused`), or why it cannot fit."""
    return _nhwc_plan(WF.gw_plan(p, m, nthreads), p, m, nthreads, fused=True)


# Transformed tiles per grad_weight step: the products reduce over the step's slots, and each adds
# into the a*a x kg x cg sums; measured (AVX2 EPYC, 1 thread, float32) 0.5 / 1.5 / 4 / 16 MiB:
# resnet50-3x3-64 26 / 21 / 23 / 34 ms, vgg16-3x3-128 45 / 40 / 36 / 51, resnet50-3x3-512
# 186 / 106 / 85 / 89 (short reductions re-add the large sums too often, long ones leave the caches).
_GW_TILE_BYTES = 3 << 20


def _rows_plan(p, m, nthreads):
    """The tiling of grad_weight on the row transforms: each worker a fixed share of the tile rows,
    ``rows`` at a time (~_GW_TILE_BYTES of transformed tiles), its own a*a x k x cg sums; or the
    reason it cannot fit (then the gathering kernel, with one shared accumulator, may)."""
    if p.n == 0:
        p = dataclasses.replace(p, n=1)
    isz = p.itemsize
    _, nr = _gemm.tile(isz)
    a2 = (m + 2) ** 2
    th, tw = _tiles(p, m)
    sl = tw + 1
    trows = p.n * th
    sums = a2 * p.k * p.cg * isz
    nw = max(1, min(nthreads, trows))
    rows = max(1, min(-(-trows // nw), _GW_TILE_BYTES // (sl * a2 * (p.cg + p.kg) * isz)))
    # the sums of every worker plus the result they are added into
    while (nw + 1) * sums + nw * _packed_words(p, m, rows, nr) * isz > p.workspace_limit:
        if rows > 1:
            rows = max(1, rows // 2)
        elif nw > 1:
            nw -= 1
        else:
            need = 2 * sums + _packed_words(p, m, rows, nr) * isz
            return (f"needs at least {need} bytes of workspace (two a*a x k x c/groups sums and one row of "
                    f"tiles), workspace_limit is {p.workspace_limit}")
    return _Plan(m, 1, rows, p.cg, nw, _ldt(rows * sl, nr), _packed_words(p, m, rows, nr), (nw + 1) * sums, True)


def _run_forward(x, w, b, p, m=None, batch=None, flip=False, fused=None, kpanel=None):
    """The forward pass; ``m`` forces a tile size and ``batch`` / ``fused`` / ``kpanel`` the kernel
    (tests), else the cheaper.  With ``flip`` the pass is grad_input's (``p`` its transposed problem)
    and ``w`` the layer's weight."""
    pl = _cached_plan(p, "forward", m, batch=batch, fused=fused, kpanel=kpanel)
    if isinstance(pl, str):  # pragma: no cover - supports() refused it before
        raise ValueError(pl)
    if pl.kpanel:  # reads NCHW and channels_last inputs in place
        return WK.forward(x, w, b, p, pl.m, pl.rb, flip)
    if pl.fused and not _nhwc.is_channels_last(x):  # NCHW in and out, rows staged per worker
        return WF.forward(_contiguous(x), w, b, p, pl.m, pl.rb, flip, nchw=True)
    if pl.batch or pl.fused:  # the NHWC copies in and out are scratch too: only the NCHW result is fresh
        xh = _nhwc.to_nhwc(x, scratch("winograd.x", (p.n, p.h, p.w, p.c), p.dtype))
        # (one output channel: NHWC is NCHW, and the result is that array itself)
        yh = (WF if pl.fused else WN).forward(xh, w, b, p, pl.m, pl.rb, flip,
                                              scratch("winograd.y", (p.n, p.oh, p.ow, p.k), p.dtype)
                                              if p.k > 1 else None)
        return _nhwc.to_nchw(_nhwc.channels_last_view(yh))
    if flip:
        w = _flipped(w, p)
    m = pl.m
    th, tw = _tiles(p, m)
    mr, _ = _gemm.tile(p.itemsize)
    pu = scratch("winograd.pu", (pl.fixed // p.itemsize,), p.dtype)
    K.pack_u(_contiguous(w).reshape(p.k, p.cg, 9), _G[m], pu, p.g, mr)
    y = result(p.y_shape, p.dtype)
    bb = _contiguous(b) if b is not None else np.zeros(p.k, p.dtype)
    hv = min(p.h, p.oh + 2 - p.ph0)
    wv = min(p.w, p.ow + 2 - p.pw0)
    kc = np.array([1, 2, 4, 5, 8], dtype=p.dtype)
    buf = _zeroed("winograd.words", (pl.nw, pl.words), p)
    K.forward_packed(_contiguous(x).reshape(-1), pu, bb, y.reshape(-1), buf, kc, np.zeros(1, np.int64), p.n, p.c,
                     p.h, p.w, p.k, p.oh, p.ow, m, p.g, p.ph0, p.pw0, hv, wv, th, tw, pl.rb, pl.tmax)
    return y


def _zeroed(role, shape, p):
    """A zeroed scratch buffer (:func:`fastconv._config.scratch`), kept between calls: clearing kept
    pages took 0.05 ms per MB, faulting fresh zero pages in 0.15 ms per MB at best (AVX2 EPYC), and
    the packed passes' worker buffers are 2-7 MB per call."""
    buf = scratch(role, shape, p.dtype)
    buf.fill(0)
    return buf


def _dilated(p):
    return (p.dh, p.dw) != (1, 1)


def forward(x, w, b, p, m=None, batch=None, fused=None, kpanel=None):
    if _dilated(p):  # the phase sub-images stacked into the batch, undilated (see _dilation_phases)
        q = phases.stacked(p)
        return phases.merge_output(_run_forward(phases.split_input(x, p, q), w, b, q, m, batch, fused=fused,
                                                kpanel=kpanel), p, q)
    return _run_forward(x, w, b, p, m, batch, fused=fused, kpanel=kpanel)


def _flipped(w, q):
    """grad_input's kernel (q.k, q.cg, 3, 3) for its transposed problem ``q``: the layer's weight
    flipped, its channels swapped within each group."""
    wf = np.asarray(w)[:, :, ::-1, ::-1].reshape(q.g, q.cg, q.kg, 3, 3).transpose(0, 2, 1, 3, 4)
    return wf.reshape(q.k, q.cg, 3, 3)


def _transposed(p):
    """grad_input's parameters as a forward convolution: gy padded by 2 - ph (cropped when negative)."""
    return dataclasses.replace(p, c=p.k, h=p.oh, w=p.ow, k=p.c, ph0=2 - p.ph0, ph1=2 - p.ph1,
                               pw0=2 - p.pw0, pw1=2 - p.pw1, oh=p.h, ow=p.w)


def grad_input(gy, w, p, m=None, batch=None, fused=None, kpanel=None):
    if _dilated(p):
        q = phases.stacked(p)
        return phases.merge_input(grad_input(phases.split_output(gy, p, q), w, q, m, batch, fused, kpanel), p, q)
    return _run_forward(gy, w, None, _transposed(p), m, batch, flip=True, fused=fused, kpanel=kpanel)


def grad_weight(gy, x, p, m=None, rowwise=None, batch=None, fused=None, kpanel=None):
    if _dilated(p):  # the sum over the stacked batch is the sum over images and phases
        q = phases.stacked(p)
        return grad_weight(phases.split_output(gy, p, q), phases.split_input(x, p, q), q, m, rowwise, batch, fused,
                           kpanel)
    pl = _cached_plan(p, "grad_weight", m, rowwise, batch, fused, kpanel)
    if isinstance(pl, str):  # pragma: no cover - supports() refused it before
        raise ValueError(pl)
    if pl.kpanel:  # reads NCHW and channels_last arrays in place
        return WK.grad_weight(gy, x, p, pl.m, pl.rb)
    if pl.fused and not (_nhwc.is_channels_last(gy) and _nhwc.is_channels_last(x)):
        return WF.grad_weight(_contiguous(gy), _contiguous(x), p, pl.m, pl.rb, nchw=True)
    if pl.fused or pl.batch:
        return (WF if pl.fused else WN).grad_weight(_nhwc.to_nhwc(gy, scratch("winograd.y", (p.n, p.oh, p.ow, p.k), p.dtype)),
                              _nhwc.to_nhwc(x, scratch("winograd.x", (p.n, p.h, p.w, p.c), p.dtype)), p, pl.m, pl.rb)
    m = pl.m
    th, tw = _tiles(p, m)
    a = m + 2
    hv = min(p.h, p.oh + 2 - p.ph0)
    wv = min(p.w, p.ow + 2 - p.pw0)
    gw = np.empty(p.w_shape, dtype=p.dtype)
    if pl.rowwise:
        acc = _zeroed("winograd.acc", (pl.nw, a * a * p.k * p.cg), p)
        mw = np.empty(a * a * p.k * p.cg, dtype=p.dtype)
        kc = np.array([1, 2, 4, 5, 8], dtype=p.dtype)
        with serial_blas:
            buf = _zeroed("winograd.words", (pl.nw, pl.words), p)
            KG.grad_weight_rows(_contiguous(x).reshape(-1), _contiguous(gy).reshape(-1), acc, buf, kc,
                                *_BLAS.args(p.dtype, pl.nw), p.n, p.c, p.h, p.w, p.k, p.oh, p.ow, m, p.g, p.ph0, p.pw0,
                                hv, wv, th, tw, pl.rb, pl.tmax)
        KG.sum_workers(acc, mw)
        WN.taps(mw, p, m, gw)
        return gw
    bt, _, am = _matrices(m, p.dtype)
    mw = np.zeros(a * a * p.k * p.cg, dtype=p.dtype)
    with serial_blas:
        buf = scratch("winograd.words", (pl.nw, pl.words), p.dtype)
        K.grad_weight_tiles(_contiguous(x), _contiguous(gy), mw, buf, bt, am, *_BLAS.args(p.dtype, pl.nw),
                            np.zeros(1, np.int64), m, p.g, p.ph0, p.pw0, hv, wv, th, tw, pl.nb, pl.rb, pl.cb, pl.tmax)
    WN.taps(mw, p, m, gw)
    return gw


# --------------------------------------------------------------------------- registry
_INT_MAX = 2**31 - 1


def supports(p, pass_):
    """3x3 kernels with stride 1, any padding, dilation (through the phase sub-images) and groups,
    within the budget."""
    if (p.r, p.s) != (3, 3):
        return f"needs a 3x3 kernel, got {p.r}x{p.s}"
    if (p.sh, p.sw) != (1, 1):
        return f"needs stride 1, got ({p.sh}, {p.sw})"
    if _dilated(p):
        return supports(phases.stacked(p), pass_)
    if pass_ == "grad_input":
        p = _transposed(p)
    if p.n * (p.oh // 2 + 1) * (p.ow // 2 + 1) * 36 * max(p.c, p.k) > _INT_MAX:
        return "a GEMM operand has more than 2**31 - 1 elements (BLAS int sizes)"
    pl = _cached_plan(p, pass_ if pass_ != "grad_input" else "forward")
    return pl if isinstance(pl, str) else None


# Cost model, in seconds on one thread of the machine it was measured on (2-core Xeon, AVX-512,
# 2026-12-02; resnet50-3x3-64 and resnet50-3x3-512, one thread, thread CPU time): the forward (and
# grad_input) products run at ~170 GFLOP/s per thread in float32 over the columns they compute
# (whole NR panels of slots, MR-row panels of channels), scaled by the vector width on other CPUs;
# each work item streams all of packed U, from memory (~10 GB/s) once U outgrows the caches; seconds per
# transformed element of the input and output transforms, plus a fixed cost per item and channel
# (short tile rows: 7x7 planes ran at 1.2 ns per element, 56x56 ones at 0.4); U's transform
# (2.8 ns per element for 512 x 512 channels: its panel writes are scattered); and the old gather
# transforms and BLAS rate that grad_weight still uses.
_PACKED_RATE = 170e9 * _gemm.VBYTES / 64
_PACKED_IN, _PACKED_OUT = 0.38e-9, 0.16e-9
_ITEM_IN, _ITEM_OUT = 0.2e-6, 0.36e-6
_U_SECONDS = 2.8e-9
_MEMORY_RATE = 10e9
# ... and a cost per call of the per-channel transform helpers (an item makes cg * (rows + 1 + 2a)
# input-side and kg * (a + m + rows*m) output-side calls), not amortised on rows under 32 outputs
# (weighted 1 - ow/32): fitted on the EPYC's 16 packed forward / grad_input cases (2026-12-03,
# 2 threads), it took the model's rms error from 30% to 23%; without it thin small-plane layers
# read 2.6-3.3x low (32x32x14x14 at batch 32: 2.04 ms measured, 0.78 modelled) and auto chose
# Winograd where direct took 1.22 ms
_CALL_SECONDS = 65e-9
_U_CACHED = 8 << 20  # U up to this size streams from cache (vgg16-3x3-128's 2.6 MB did)


def _u_streams():
    """Packed U larger than this is streamed at memory speed by every item: twice the L2 (the
    Xeon's 2 MiB L2 held vgg16-3x3-128's 2.6 MB U well enough; the EPYC's 512 KiB did not hold 4.2 MB)."""
    return min(_U_CACHED, 2 * _cpu.cache_sizes()["l2"])
_IN_SECONDS = {4: 15.5e-9 / 5.47, 2: 10.8e-9 / 5.47}
_GY_IN = 0.3e-9       # grad_weight's row transform of gy, per transformed element
_SUM_SECONDS = 0.5e-9  # adding the workers' sums, per element
_SUMS_L2, _SUMS_MEM = 0.3e-9, 3e-9  # a product's read-modify-write of its sums, per element
_COPY_SECONDS = 0.35e-9  # a dilated layer's phase split or merge, per element (zeroing included):
# 8x64x64x64 dilation 2, 2 threads, split + merge of 4.46M elements 1.37 ms (0.31 ns; 1 ns when
# the copies were scalar, which made 'auto' keep the implicit GEMM's grad_input: 9.75 ms against
# Winograd's 7.79 there, 8.85 / 7.39 on 8x128x32x32)
_GEMM_RATE = {4: 80e9, 8: 40e9}


def _cost_of(p, pass_, pl, nthreads):
    if pl.kpanel:
        return (WK.gw_cost if pass_ == "grad_weight" else WK.cost)(p, pl.m, pl.rb, nthreads)
    if pl.batch:
        return WN.cost(p, pl.m, pl.rb, nthreads, pass_=pass_)
    if pl.fused:
        return (WF.gw_cost if pass_ == "grad_weight" else WF.cost)(p, pl.m, pl.rb, nthreads)
    th, tw = _tiles(p, pl.m)
    a2 = (pl.m + 2) ** 2
    tiles = max(1, p.n) * th * tw
    workers = 1.0 + 0.9 * (min(nthreads, pl.nw) - 1)
    if pass_ == "grad_weight" and pl.rowwise:
        trows = max(1, p.n) * th
        slots = trows * (tw + 1)
        items = -(-trows // pl.rb) * p.g
        ns = pl.rb * (tw + 1)
        thin = min(p.kg, p.cg)
        eff = thin / (thin + 12.0) * ns / (ns + 48.0)
        gemm = 2.0 * a2 * p.k * p.cg * slots / (_GEMM_RATE[p.itemsize] * eff)
        # every product reads and writes its kg x cg block of the sums: from L2 while they fit
        sums = a2 * p.kg * p.cg * p.itemsize
        gemm += items * a2 * p.kg * p.cg * (_SUMS_L2 if sums <= _cpu.cache_sizes()["l2"] else _SUMS_MEM)
        trans = p.itemsize / 4 * (a2 * slots * (p.c * _PACKED_IN + p.k * _GY_IN)
                                  + items * (p.c + p.k) * _ITEM_IN)
        return 3e-5 + (gemm + trans) / workers + (pl.nw + 1) * a2 * p.k * p.cg * _SUM_SECONDS
    if pass_ == "grad_weight":
        thin = min(p.kg, p.cg)
        eff = thin / (thin + 12.0) * pl.tmax / (pl.tmax + 48.0)
        gemm = 2.0 * a2 * p.k * p.cg * tiles / (_GEMM_RATE[p.itemsize] * eff)
        # input and gy tiles are both gathered and transformed; each channel block transforms gy again
        trans = a2 * tiles * (p.c + p.k * -(-p.cg // pl.cb)) * _IN_SECONDS[pl.m]
        if p.itemsize == 8:
            trans *= 1.5
        return 3e-5 + (gemm + trans) / workers
    mr, nr = _gemm.tile(p.itemsize)
    sl = tw + 1
    trows = max(1, p.n) * th
    items = -(-trows // pl.rb)  # per group
    cols = items * -(-pl.rb * sl // nr) * nr
    kgp = -(-p.kg // mr) * mr
    rate = _PACKED_RATE * 4 / p.itemsize * p.cg / (p.cg + 8.0)  # the micro-kernel's k loop is cg long
    gemm = 2.0 * a2 * p.g * kgp * p.cg * cols / rate
    # every item streams all of packed U: from memory once U outgrows the caches, a bandwidth the
    # workers share (resnet18's 512 x 512 layer on 4x4 planes at batch 32: 13 items x 16.9 MB,
    # 44.6 ms measured where the per-worker term said 31)
    # (so did the 4.2 MB of a 256-channel U on the EPYC's 512 KiB L2: 16x256x6x6 11.1 ms, 5.3 modelled)
    stream = p.g * items * pl.fixed / _MEMORY_RATE if pl.fixed > _u_streams() else 0.0
    scale = p.itemsize / 4
    a = pl.m + 2
    trans = scale * (a2 * trows * sl * (p.c * _PACKED_IN + p.k * _PACKED_OUT)
                     + items * (p.c * _ITEM_IN + p.k * _ITEM_OUT))
    calls = (p.g * items * (p.cg * (pl.rb + 1 + 2 * a) + p.kg * (a + pl.m + pl.rb * pl.m))
             * _CALL_SECONDS * max(0.0, 1.0 - p.ow / 32.0))
    return 3e-5 + (_U_SECONDS * a2 * p.k * p.cg + gemm + trans + calls) / workers + stream


def cost(p, pass_, threads):
    """Estimated seconds of one pass on ``threads`` threads with the cheaper of F(4x4) and F(2x2)
    (``inf`` when unsupported)."""
    if supports(p, pass_) is not None:
        return float("inf")
    if _dilated(p):  # plus the copies into and out of the phase sub-images
        q = phases.stacked(p)
        copied = q.n * (q.c * q.h * q.w + q.k * q.oh * q.ow)
        return cost(q, pass_, threads) + copied * _COPY_SECONDS * p.itemsize / 4
    q = _transposed(p) if pass_ == "grad_input" else p
    pl = _cached_plan(q, "forward" if pass_ == "grad_input" else pass_)
    return _cost_of(q, pass_, pl, threads)
