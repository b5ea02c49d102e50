"""The Winograd algorithm: both tile sizes against the float64 reference on every padding, group and
tile-edge geometry; the stated error bound and the error relative to im2col's on random, wide-range
and adversarial data; tilings forced by small budgets; refusals; the documented NaN spread."""
import dataclasses

import numpy as np
import pytest

import fastconv
import reference as ref
from fastconv._algorithms import winograd as W
from fastconv._validation import conv_params

# float32: the largest error of F(m x m, 3 x 3) may be this many times im2col's on the same inputs
# (measured: 1-4x for F(4x4) on random normal data, up to ~6x on wide-range data with the gather
# transforms, 12.1x on the asymmetric wide-range case with the packed forward's written-out ones;
# F(2x2) ~1-2x)
FACTOR = {4: 16.0, 2: 6.0}
EPS = {np.dtype(np.float32): float(np.finfo(np.float32).eps), np.dtype(np.float64): float(np.finfo(np.float64).eps)}

# (id, x shape, weight shape, groups, (top, bottom), (left, right) padding)
CASES = [
    ("pad1", (2, 3, 9, 7), (4, 3, 3, 3), 1, (1, 1), (1, 1)),
    ("valid-odd", (3, 2, 13, 10), (3, 2, 3, 3), 1, (0, 0), (0, 0)),
    ("asymmetric", (1, 4, 5, 6), (6, 2, 3, 3), 2, (0, 2), (1, 0)),
    ("pad-beyond-kernel", (2, 2, 4, 5), (3, 2, 3, 3), 1, (3, 3), (3, 4)),
    ("n1-c1-3x3", (1, 1, 3, 3), (1, 1, 3, 3), 1, (0, 0), (0, 0)),
    ("groups-tile-edges", (2, 6, 11, 14), (9, 2, 3, 3), 3, (1, 2), (2, 1)),
    ("wide-row", (1, 2, 6, 41), (5, 2, 3, 3), 1, (1, 1), (1, 1)),
    ("many-small-images", (7, 5, 4, 4), (4, 5, 3, 3), 1, (1, 1), (1, 1)),
]
IDS = [c[0] for c in CASES]


def _params(case, dtype, workspace_limit=None):
    _, xs, ws, g, (t, b), (l, r) = case
    p = conv_params("conv2d", xs, ws, dtype, 1, 0, 1, g, workspace_limit)
    return dataclasses.replace(p, ph0=t, ph1=b, pw0=l, pw1=r, oh=xs[2] + t + b - 2, ow=xs[3] + l + r - 2)


def _make(case, dtype, seed=0, scale=None):
    _, xs, ws, g, (t, b), (l, r) = case
    rng = np.random.default_rng(seed)
    x, w = rng.standard_normal(xs), rng.standard_normal(ws)
    if scale is not None:
        x, w = x * scale(rng, xs), w * scale(rng, ws)
    bias = rng.standard_normal(ws[0])
    gy = rng.standard_normal((xs[0], ws[0], xs[2] + t + b - 2, xs[3] + l + r - 2))
    return tuple(a.astype(dtype) for a in (x, w, bias, gy))


def _exact(case, x, w, bias, gy):
    """float64 reference results of forward, grad_input, grad_weight (explicitly padded input)."""
    _, xs, _, g, (t, b), (l, r) = case
    xp = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (t, b), (l, r)))
    return {"forward": ref.conv2d(xp, w, bias, groups=g),
            "grad_input": ref.conv2d_grad_input(gy, xp.shape, w, groups=g)[:, :, t:t + xs[2], l:l + xs[3]],
            "grad_weight": ref.conv2d_grad_weight(gy, xp, w.shape, groups=g)}


def _kind(batch):
    """(batch, fused, kpanel) arguments of a KERNELS value: False packed, True batch-wide, "fused",
    "kpanel"."""
    return (None, True, None) if batch == "fused" else (None, None, True) if batch == "kpanel" else (batch, None, None)


def _forward(x, w, bias, p, m, batch=None):
    b, f, k = _kind(batch)
    return W._run_forward(x, w, bias, p, m, b, fused=f, kpanel=k)


def _winograd(p, x, w, bias, gy, m, batch=None):
    b, f, k = _kind(batch)
    return {"forward": W._run_forward(x, w, bias, p, m, b, fused=f, kpanel=k),
            "grad_input": W.grad_input(gy, w, p, m=m, batch=b, fused=f, kpanel=k),
            "grad_weight": W.grad_weight(gy, x, p, m=m, batch=b, fused=f, kpanel=k)}


def _is(pl, batch):
    return pl.fused if batch == "fused" else pl.kpanel if batch == "kpanel" else \
        (pl.batch is batch and not pl.fused and not pl.kpanel)


# the forward's packed kernel (tile rows of one group; grad_weight's two, chosen by cost), the
# batch-wide ones, the fused ones and the forward by output-channel panels
KERNELS = pytest.mark.parametrize("batch", [False, True, "fused", "kpanel"], ids=["packed", "batch", "fused", "kpanel"])


def _im2col(case, p, x, w, bias, gy):
    from fastconv._algorithms import im2col
    return {"forward": im2col.forward(x, w, bias, p), "grad_input": im2col.grad_input(gy, w, p),
            "grad_weight": im2col.grad_weight(gy, x, p)}


def _err(got, want):
    return float(np.abs(got.astype(np.float64) - want).max())


@KERNELS
@pytest.mark.parametrize("m", W.TILES)
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_float64_matches_reference(case, m, batch):
    x, w, bias, gy = _make(case, np.float64)
    p = _params(case, np.float64)
    b, f, k = _kind(batch)
    assert _is(W._cached_plan(p, "forward", m, batch=b, fused=f, kpanel=k), batch)
    want = _exact(case, x, w, bias, gy)
    got = _winograd(p, x, w, bias, gy, m, batch)
    for name in want:
        assert got[name].shape == want[name].shape and got[name].dtype == np.float64, name
        scale = max(1.0, float(np.abs(want[name]).max()))
        assert _err(got[name], want[name]) <= 1e-10 * scale, name


@KERNELS
@pytest.mark.parametrize("m", W.TILES)
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_float32_error_within_factor_of_im2col(case, m, batch):
    x, w, bias, gy = _make(case, np.float32, seed=1)
    p = _params(case, np.float32)
    want = _exact(case, x, w, bias, gy)
    got = _winograd(p, x, w, bias, gy, m, batch)
    base = _im2col(case, p, x, w, bias, gy)
    for name in want:
        assert got[name].dtype == np.float32, name
        floor = 4 * EPS[p.dtype] * max(1.0, float(np.abs(want[name]).max()))  # im2col can be exact
        assert _err(got[name], want[name]) <= FACTOR[m] * max(_err(base[name], want[name]), floor), name


@pytest.mark.parametrize("rowwise", [True, False], ids=["rows", "gather"])
@pytest.mark.parametrize("m", W.TILES)
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_both_grad_weight_kernels_match_the_reference(case, m, rowwise):
    """grad_weight on the row transforms and on the gathers, each forced: float64 to 1e-10, float32
    within the factor of im2col's error."""
    for dtype, seed in ((np.float64, 3), (np.float32, 4)):
        x, w, bias, gy = _make(case, dtype, seed=seed)
        p = _params(case, dtype)
        assert W._cached_plan(p, "grad_weight", m, rowwise).rowwise is rowwise
        want = _exact(case, x, w, bias, gy)["grad_weight"]
        got = W.grad_weight(gy, x, p, m=m, rowwise=rowwise)
        assert got.shape == want.shape and got.dtype == dtype
        scale = max(1.0, float(np.abs(want).max()))
        if dtype == np.float64:
            assert _err(got, want) <= 1e-10 * scale
        else:
            base = _im2col(case, p, x, w, bias, gy)["grad_weight"]
            assert _err(got, want) <= FACTOR[m] * max(_err(base, want), 4 * EPS[p.dtype] * scale)


def test_row_transform_grad_weight_is_reproducible_and_chosen_for_wide_planes():
    """Fixed shares per worker: the same bits on every call, for the row transforms and the fused
    kernel; between the two NCHW kernels the cost model takes the row transforms for a 32-channel
    layer on 40x40 planes (the gathers cost ~2x there), and over all it takes the fused one."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((3, 32, 40, 40)).astype(np.float32)
    p = conv_params("conv2d", x.shape, (32, 32, 3, 3), np.float32, 1, 1, 1, 1)
    gy = rng.standard_normal(p.y_shape).astype(np.float32)
    assert W._cached_plan(p, "grad_weight", fused=False).rowwise
    assert W._cached_plan(p, "grad_weight").fused
    for kw in ({"rowwise": True}, {}):
        first = W.grad_weight(gy, x, p, **kw)
        for _ in range(3):
            assert np.array_equal(W.grad_weight(gy, x, p, **kw), first)
        bad = gy.copy()
        bad[:, :, -1, :] = np.nan  # the last output row: only its own taps' sums, as in a direct sum
        assert np.isnan(W.grad_weight(bad, x, p, **kw)).all()  # every (k, c) pair meets it through some tap


def _tile_bound(p, x, w, bias, m):
    """The docstring's bound on |y - y_exact| per output: eps * (15 + cg) * S_m**2 * sum_c
    max|d_c| * max|w_kc| (+ eps*|b|), max|d_c| over the a x a input patch of the output's tile."""
    th, tw = -(-p.oh // m), -(-p.ow // m)
    a = m + 2
    xp = np.zeros((p.n, p.c, th * m + 2, tw * m + 2))
    hh, ww = min(p.h, xp.shape[2] - p.ph0), min(p.w, xp.shape[3] - p.pw0)
    xp[:, :, p.ph0:p.ph0 + hh, p.pw0:p.pw0 + ww] = np.abs(x[:, :, :hh, :ww])
    dmax = np.zeros((p.n, p.c, th, tw))
    for i in range(th):
        for j in range(tw):
            dmax[:, :, i, j] = xp[:, :, i * m:i * m + a, j * m:j * m + a].max(axis=(2, 3))
    wmax = np.abs(w.astype(np.float64)).max(axis=(2, 3))  # (k, cg)
    tile = np.zeros((p.n, p.k, th, tw))
    for gi in range(p.g):
        ks, cs = slice(gi * p.kg, (gi + 1) * p.kg), slice(gi * p.cg, (gi + 1) * p.cg)
        tile[:, ks] = np.einsum("ncij,kc->nkij", dmax[:, cs], wmax[ks])
    full = np.repeat(np.repeat(tile, m, axis=2), m, axis=3)[:, :, :p.oh, :p.ow]
    s2 = W.transform_sum(m) ** 2
    return EPS[p.dtype] * ((15 + p.cg) * s2 * full + np.abs(bias)[None, :, None, None])


def _wide(rng, shape):
    return 10.0 ** rng.uniform(-4, 4, shape)


@pytest.mark.parametrize("m", W.TILES)
@pytest.mark.parametrize("scale", [None, _wide], ids=["normal", "wide-1e-4..1e4"])
@pytest.mark.parametrize("case", [CASES[0], CASES[2], CASES[5]], ids=[IDS[0], IDS[2], IDS[5]])
def test_float32_forward_within_stated_bound(case, scale, m):
    x, w, bias, gy = _make(case, np.float32, seed=2, scale=scale)
    p = _params(case, np.float32)
    want = _exact(case, x, w, bias, gy)["forward"]
    got = W._run_forward(x, w, bias, p, m).astype(np.float64)
    assert (np.abs(got - want) <= _tile_bound(p, x, w, bias, m)).all()
    if scale is not None:  # the wide range also against im2col's error
        base = _im2col(case, p, x, w, bias, gy)["forward"]
        assert _err(got, want) <= FACTOR[m] * _err(base, want)


def _adversarial(kind, rng, xs, ws):
    """Inputs built to hurt transform-based convolution."""
    x = rng.standard_normal(xs)
    w = rng.standard_normal(ws)
    if kind == "cancel":  # huge inputs, zero-sum kernels: outputs ~1e4 times smaller than the terms
        x = 1e4 + rng.standard_normal(xs)
        w -= w.mean(axis=(2, 3), keepdims=True)
    elif kind == "spikes":  # one 1e4 value per tile next to 1e-4 values
        x = 1e-4 * x
        x[:, :, ::4, ::4] = 1e4
    elif kind == "alternating":  # +-1 checkerboards excite the largest transform coefficients
        ii, jj = np.indices(xs[2:])
        x = np.broadcast_to(np.where((ii + jj) % 2, 1.0, -1.0) * 2.0 ** (ii % 3), xs).copy()
        w = np.broadcast_to(np.array([[1.0, -1, 1], [-1, 1, -1], [1, -1, 1]]), ws).copy()
    return x, w


@pytest.mark.parametrize("m", W.TILES)
@pytest.mark.parametrize("kind", ["cancel", "spikes", "alternating"])
def test_float32_adversarial_values(kind, m):
    case = CASES[5]
    _, xs, ws, *_ = case
    x, w = (a.astype(np.float32) for a in _adversarial(kind, np.random.default_rng(3), xs, ws))
    bias = np.zeros(ws[0], np.float32)
    gy = np.ones((xs[0], ws[0], xs[2] + 1, xs[3] + 1), np.float32)
    p = _params(case, np.float32)
    want = _exact(case, x, w, bias, gy)
    got = _winograd(p, x, w, bias, gy, m)
    base = _im2col(case, p, x, w, bias, gy)
    assert (np.abs(got["forward"] - want["forward"]) <= _tile_bound(p, x, w, bias, m)).all()
    for name in want:
        floor = 4 * EPS[p.dtype] * max(1.0, float(np.abs(want[name]).max()))
        assert _err(got[name], want[name]) <= FACTOR[m] * max(_err(base[name], want[name]), floor), name


@pytest.mark.parametrize("limit", [1 << 17, 1 << 18])
def test_small_budgets_force_small_tiles_and_the_same_result(limit):
    case = ("budget", (3, 4, 23, 22), (5, 4, 3, 3), 1, (1, 1), (1, 1))
    x, w, bias, gy = _make(case, np.float64, seed=4)
    want = _exact(case, x, w, bias, gy)
    p = _params(case, np.float64, workspace_limit=limit)
    for m in W.TILES:
        pl = W._cached_plan(p, "forward", m)
        assert not isinstance(pl, str) and pl.tmax < p.n * -(-p.oh // m) * -(-p.ow // m)
        got = _winograd(p, x, w, bias, gy, m)
        for name in want:
            assert _err(got[name], want[name]) <= 1e-10 * max(1.0, float(np.abs(want[name]).max())), (m, name)


def test_a_budget_below_one_panel_of_tiles_is_refused_with_the_need():
    # (the smallest plan, fused F(2x2) on one thread, needs 31200 bytes here)
    case = ("budget", (3, 4, 23, 22), (5, 4, 3, 3), 1, (1, 1), (1, 1))
    p = _params(case, np.float64, workspace_limit=1 << 14)
    reason = W.supports(p, "forward")
    assert isinstance(reason, str) and "bytes of workspace" in reason and "workspace_limit is 16384" in reason
    assert W.cost(p, "forward", 2) == float("inf")


@pytest.mark.parametrize("kw, reason", [
    ({"stride": 2}, "needs stride 1"),
    ({"stride": 2, "dilation": 2}, "needs stride 1"),
])
def test_refuses_what_it_cannot_serve(kw, reason):
    x, w = np.ones((1, 2, 9, 9)), np.ones((2, 2, 3, 3))
    with pytest.raises(ValueError, match=f"algorithm='winograd' cannot compute the forward pass here: {reason}"):
        fastconv.conv2d(x, w, **kw, algorithm="winograd")
    p = conv_params("conv2d", x.shape, w.shape, x.dtype, kw.get("stride", 1), 0, kw.get("dilation", 1), 1)
    assert W.cost(p, "forward", 2) == float("inf")
    for shape in [(2, 2, 5, 5), (2, 2, 3, 1), (2, 2, 1, 3)]:
        q = conv_params("conv2d", x.shape, shape, x.dtype, 1, 0, 1, 1)
        assert W.supports(q, "grad_weight") == f"needs a 3x3 kernel, got {shape[2]}x{shape[3]}"
    q = conv_params("conv2d", x.shape, w.shape, x.dtype, 1, 1, 1, 1, workspace_limit=64)
    assert "bytes of workspace" in W.supports(q, "forward")
    ok = conv_params("conv2d", x.shape, w.shape, x.dtype, 1, 1, 1, 1)
    assert all(W.supports(ok, pass_) is None and 0 < W.cost(ok, pass_, 2) < 1 for pass_ in
               ("forward", "grad_input", "grad_weight"))


def test_public_api_matches_torch(torch):
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 4, 10, 9))
    w = rng.standard_normal((6, 2, 3, 3))
    b = rng.standard_normal(6)
    kw = {"padding": "same", "groups": 2}
    y = fastconv.conv2d(x, w, b, **kw, algorithm="winograd")
    gy = rng.standard_normal(y.shape)
    g = fastconv.conv2d_backward(gy, x, w, **kw, algorithm="winograd")
    tx, tw, tb = (torch.tensor(a, requires_grad=True) for a in (x, w, b))
    ty = torch.nn.functional.conv2d(tx, tw, tb, **kw)
    ty.backward(torch.tensor(gy))
    for got, want in [(y, ty.detach()), (g.grad_input, tx.grad), (g.grad_weight, tw.grad), (g.grad_bias, tb.grad)]:
        np.testing.assert_allclose(got, want.numpy(), rtol=1e-10, atol=1e-10)


@KERNELS
@pytest.mark.parametrize("m", W.TILES)
def test_nan_spreads_over_tiles_only(m, batch):
    # the documented spread: the output tiles whose a x a input patch holds the NaN, every channel
    case = CASES[5]
    x, w, bias, gy = _make(case, np.float64, seed=6)
    x[1, 2, 5, 6] = np.nan
    p = _params(case, np.float64)
    y = _forward(x, w, bias, p, m, batch)
    torch_like = np.isnan(_exact(case, x, w, bias, gy)["forward"])
    nan = np.isnan(y)
    assert (nan >= torch_like).all() and not nan[0].any()
    i, j = 5 + p.ph0, 6 + p.pw0  # padded coordinates
    rows = {t for t in range(-(-p.oh // m)) if t * m <= i < t * m + m + 2}
    cols = {t for t in range(-(-p.ow // m)) if t * m <= j < t * m + m + 2}
    inside = np.zeros(y.shape[2:], bool)
    for t in rows:
        for u in cols:
            inside[t * m:t * m + m, u * m:u * m + m] = True
    assert not nan[1][:, ~inside].any()


@pytest.mark.parametrize("m", W.TILES)
@pytest.mark.parametrize("width", [29, 31, 32, 33, 57, 64, 70, 135])
def test_wide_rows_every_store_path(width, m):
    # The output rows are written in whole vectors that may run into the next row (spill), in
    # full and overlapping half vectors, and element by element for a partial last tile: widths
    # around the vector sizes and the row-count choices of the plan take every path.
    case = ("wide", (2, 3, 9, width), (5, 3, 3, 3), 1, (1, 1), (1, 1))
    for dtype in (np.float64, np.float32):
        x, w, bias, gy = _make(case, dtype, seed=5)
        p = _params(case, dtype)
        want = _exact(case, x, w, bias, gy)
        got = _winograd(p, x, w, bias, gy, m)
        if dtype == np.float64:
            for name in want:
                assert _err(got[name], want[name]) <= 1e-10 * max(1.0, float(np.abs(want[name]).max())), name
        else:
            assert (np.abs(got["forward"] - want["forward"]) <= _tile_bound(p, x, w, bias, m)).all()


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("shape, padding, dilation, groups", [
    ((2, 3, 9, 11, 4), 2, 2, 1),
    ((1, 4, 13, 10, 6), (1, 3), (2, 3), 2),
    ((2, 2, 7, 7, 3), 0, 3, 1),           # one output per phase row
    ((3, 2, 5, 6, 2), (4, 0), (3, 2), 1),  # padding wider than the input's phases
    ((2, 4, 20, 17, 4), "same", 2, 1),
    ((1, 1, 4, 4, 1), 3, 4, 1),           # phases that read nothing but padding
])
def test_dilated_layers_through_phase_sub_images(shape, padding, dilation, groups, dtype):
    """Dilation by the phase sub-images stacked into the batch: every pass equals the float64
    reference (1e-10) and, in float32, stays within F(4x4)'s factor of im2col's error."""
    n, c, h, w, k = shape
    rng = np.random.default_rng(6)
    x = rng.standard_normal((n, c, h, w)).astype(dtype)
    wt = rng.standard_normal((k, c // groups, 3, 3)).astype(dtype)
    b = rng.standard_normal(k).astype(dtype)
    kw = dict(padding=padding, dilation=dilation, groups=groups)
    y = fastconv.conv2d(x, wt, b, **kw, algorithm="winograd")
    gy = rng.standard_normal(y.shape).astype(dtype)
    got = fastconv.conv2d_backward(gy, x, wt, **kw, algorithm="winograd")
    x64, w64, b64, gy64 = (a.astype(np.float64) for a in (x, wt, b, gy))
    want_y = fastconv.conv2d(x64, w64, b64, **kw, algorithm="direct")
    want = fastconv.conv2d_backward(gy64, x64, w64, **kw, algorithm="direct")
    base_y = fastconv.conv2d(x, wt, b, **kw, algorithm="im2col")
    base = fastconv.conv2d_backward(gy, x, wt, **kw, algorithm="im2col")
    for g, wnt, bs in [(y, want_y, base_y), (got.grad_input, want.grad_input, base.grad_input),
                       (got.grad_weight, want.grad_weight, base.grad_weight)]:
        assert g.shape == wnt.shape and g.dtype == dtype
        scale = max(1.0, float(np.abs(wnt).max()))
        if dtype == np.float64:
            assert _err(g, wnt) <= 1e-10 * scale
        else:
            assert _err(g, wnt) <= FACTOR[4] * max(_err(bs, wnt), 4 * EPS[np.dtype(dtype)] * scale)


def test_dilated_cost_includes_the_phase_copies():
    p = conv_params("conv2d", (8, 64, 64, 64), (64, 64, 3, 3), np.float32, 1, 2, 2, 1)
    q = W.phases.stacked(p)
    assert (q.n, q.h, q.w, q.oh, q.ow, q.dh, q.ph0) == (32, 34, 34, 32, 32, 1, 0)
    assert W.supports(p, "forward") is None
    assert W.cost(p, "forward", 2) > W.cost(q, "forward", 2)


@pytest.mark.parametrize("rowwise", [True, False])
def test_packed_passes_ignore_what_their_kept_buffers_held(rowwise):
    # the packed passes keep U and their workers' buffers between calls (_config.scratch); NaN
    # left in those buffers must reach no result, and repeated calls give the same bits
    from fastconv._config import scratch
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 6, 13, 11)).astype(np.float32)
    w = rng.standard_normal((5, 6, 3, 3)).astype(np.float32)
    b = rng.standard_normal(5).astype(np.float32)
    p = conv_params("conv2d", x.shape, w.shape, x.dtype, 1, 1, 1, 1)
    gy = rng.standard_normal(p.y_shape).astype(np.float32)
    first = (W.forward(x, w, b, p, 4, False), W.grad_input(gy, w, p, 4, False),
             W.grad_weight(gy, x, p, 2, rowwise, False))
    for role in ("winograd.pu", "winograd.words", "winograd.acc"):
        held = scratch(role, (1 << 21,), np.float32)
        held.fill(np.nan)
    again = (W.forward(x, w, b, p, 4, False), W.grad_input(gy, w, p, 4, False),
             W.grad_weight(gy, x, p, 2, rowwise, False))
    for a, c in zip(first, again):
        np.testing.assert_array_equal(a, c)
    np.testing.assert_allclose(first[0], ref.conv2d(x, w, b, padding=1), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(first[2], ref.conv2d_grad_weight(gy, x, w.shape, padding=1), rtol=1e-4, atol=1e-4)
    fastconv.free_workspace()
