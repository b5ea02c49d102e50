"""channels_last (NHWC) convolution: the layout helpers, the native GEMM passes of
fastconv._algorithms.nhwc (in-place rows, gathered panels, transposed and col2im grad_input) against
the reference, and the public ops' handling of channels_last arrays (result in the input's layout,
native or converted, inputs untouched), float32 and float64."""
import numba
import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

import fastconv
import reference as ref
from conftest import DTYPES, assert_results, random_array
from fastconv._algorithms import gemm as G
from fastconv._algorithms import implicit, nhwc
from fastconv._validation import conv_params

MR, NR = G.tile(4)
ROWS = nhwc.ROWS_MIN_CHANNELS

# (id, x shape, weight shape, keyword arguments)
CASES = [
    # >= ROWS channels: tiles read the input's rows in place (padded copy, partial tiles, k % NR)
    ("rows-3x3-pad", (2, ROWS, 9, 11), (NR + 5, ROWS, 3, 3), {"padding": 1}),
    ("rows-1x1", (3, 2 * ROWS, 5, 7), (2 * NR, 2 * ROWS, 1, 1), {}),
    ("rows-stride2-dilated", (2, ROWS + 3, 13, 12), (7, ROWS + 3, 3, 2),
     {"stride": 2, "padding": (2, 1), "dilation": (2, 1)}),
    ("rows-groups", (2, 2 * ROWS, 8, 9), (2 * (NR + 3), ROWS, 3, 3), {"groups": 2, "padding": "same"}),
    ("rows-wide-channels", (1, 300, 4, 5), (MR + 1, 300, 3, 3), {"padding": 1}),  # channels > kc blocks
    # fewer channels: the gather into packed panels
    ("gather-odd", (2, 3, 11, 13), (5, 3, 5, 4), {"stride": (2, 1), "padding": (2, 1)}),
    ("gather-groups-8", (2, 16, 7, 7), (16, 8, 3, 3), {"groups": 2, "padding": 1, "stride": 2}),
    ("gather-same-even", (1, 5, 6, 7), (3, 5, 2, 4), {"padding": "same", "dilation": 2}),
    ("kernel-eq-input", (2, 4, 4, 5), (3, 4, 4, 5), {}),
    ("stride-gt-kernel", (2, 6, 9, 8), (4, 6, 2, 2), {"stride": 3}),
]
IDS = [c[0] for c in CASES]


def _make(case, dtype, seed=0):
    _, xs, ws, kw = case
    rng = np.random.default_rng(seed)
    x, w, b = random_array(rng, xs, dtype), random_array(rng, ws, dtype), random_array(rng, ws[0], dtype)
    gy = random_array(rng, ref.conv2d(np.zeros(xs), np.zeros(ws), **kw).shape, dtype)
    return x, w, b, gy, kw


def _params(x, w, kw):
    return conv_params("conv2d", x.shape, w.shape, x.dtype, kw.get("stride", 1), kw.get("padding", 0),
                       kw.get("dilation", 1), kw.get("groups", 1))


def _cl(a):
    """``a`` (N, C, H, W) as a channels_last array: same shape, NHWC memory."""
    return np.ascontiguousarray(a.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)


def _nhwc_memory(a):
    return a.transpose(0, 2, 3, 1).flags.c_contiguous


def _reference(x, w, b, gy, kw):
    x64, w64, gy64 = (a.astype(np.float64) for a in (x, w, gy))
    return {"forward": ref.conv2d(x64, w64, b.astype(np.float64), **kw),
            "grad_input": ref.conv2d_grad_input(gy64, x.shape, w64, **kw),
            "grad_weight": ref.conv2d_grad_weight(gy64, x64, w.shape, **kw)}


# --------------------------------------------------------------------------------------- layouts
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (1, 33, 6, 11), (3, 70, 1, 40), (2, 1, 4, 4), (2, 40, 9, 70),
                                   (1, 8, 8, 8), (3, 130, 7, 9)])
def test_layout_round_trip(shape, dtype):
    a = random_array(np.random.default_rng(1), shape, dtype)
    h = nhwc.to_nhwc(a)
    assert h.flags.c_contiguous and h.shape == (shape[0], shape[2], shape[3], shape[1])
    np.testing.assert_array_equal(h, a.transpose(0, 2, 3, 1))
    cl = nhwc.channels_last_view(h)
    assert cl.shape == a.shape and np.shares_memory(cl, h)
    np.testing.assert_array_equal(cl, a)
    back = nhwc.to_nchw(cl)
    assert back.flags.c_contiguous
    np.testing.assert_array_equal(back, a)
    assert nhwc.to_nchw(a) is a  # already NCHW: no copy


@pytest.mark.parametrize("dtype", [np.int64, np.int32, np.bool_, np.float16])
def test_layout_round_trip_other_dtypes(dtype):
    # pooling's indices (int64) take the register transpose bit for bit; other widths numpy's copy
    a = (np.random.default_rng(4).standard_normal((2, 19, 9, 13)) * 1000).astype(dtype)
    h = nhwc.to_nhwc(a)
    np.testing.assert_array_equal(h, a.transpose(0, 2, 3, 1))
    np.testing.assert_array_equal(nhwc.to_nchw(nhwc.channels_last_view(h)), a)


def test_layout_round_trip_keeps_nan_payloads():
    a = np.random.default_rng(5).standard_normal((1, 16, 8, 8)).astype(np.float32)
    a.view(np.uint32)[0, 3, 2, 5] = 0x7FC00123  # a NaN with a payload
    h = nhwc.to_nhwc(a)
    np.testing.assert_array_equal(h.view(np.uint32), a.transpose(0, 2, 3, 1).view(np.uint32))


def test_is_channels_last():
    a = np.zeros((2, 3, 4, 5), np.float32)
    assert not nhwc.is_channels_last(a)
    assert nhwc.is_channels_last(_cl(a))
    assert not nhwc.is_channels_last(a[:, :, ::2])  # strided, neither layout
    assert not nhwc.is_channels_last(np.zeros((2, 1, 4, 5)))  # both layouts at once: NCHW wins
    assert not nhwc.is_channels_last(np.zeros((3, 4, 5)))


# --------------------------------------------------------------------------------------- the passes
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_passes_against_reference(case, dtype):
    _assert_passes_match_reference(case, dtype, lambda p: nhwc.supports(p, "forward") is None)


def _assert_passes_match_reference(case, dtype, check):
    """The three NHWC passes of ``case`` against the float64 reference; ``check(p)`` must hold."""
    x, w, b, gy, kw = _make(case, dtype)
    p = _params(x, w, kw)
    assert check(p)
    xh, gyh = nhwc.to_nhwc(x), nhwc.to_nhwc(gy)
    got = {"forward": nhwc.forward(xh, w, b, p).transpose(0, 3, 1, 2),
           "grad_input": nhwc.grad_input(gyh, w, p).transpose(0, 3, 1, 2),
           "grad_weight": nhwc.grad_weight(gyh, xh, p)}
    assert_results(got, _reference(x, w, b, gy, kw), dtype, scale=4.0)


def test_grad_input_paths_agree():
    # stride 1 runs the transposed forward; a non-finite weight forces the col2im scatter
    x, w, b, gy, kw = _make(("gi", (2, ROWS, 7, 6), (5, ROWS, 3, 3), {"padding": 1}), np.float64)
    p = _params(x, w, kw)
    assert nhwc._transposed(p) is not None
    gyh = nhwc.to_nhwc(gy)
    w2 = w.copy()
    w2[1, 2, 0, 1] = np.inf
    got = nhwc.grad_input(gyh, w2, p).transpose(0, 3, 1, 2)
    want = ref.conv2d_grad_input(gy, x.shape, w2, padding=1)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    fin = np.isfinite(want)
    np.testing.assert_allclose(got[fin], want[fin], rtol=1e-12, atol=1e-12)


def test_depthwise_refused_with_reason():
    p = conv_params("conv2d", (2, 32, 8, 8), (32, 1, 3, 3), np.float32, 1, 1, 1, 32)
    reason = nhwc.supports(p, "forward")
    assert reason is not None and "per group" in reason


@pytest.mark.parametrize("pass_", ["forward", "grad_input", "grad_weight"])
def test_workspace_limit_refused(pass_):
    p = conv_params("conv2d", (2, 32, 8, 8), (32, 32, 3, 3), np.float32, 1, 1, 1, 1, workspace_limit=1024)
    reason = nhwc.supports(p, pass_)
    assert reason is not None and "workspace_limit is 1024" in reason


def test_grad_weight_splits_fit_the_budget():
    # the partial sums of the split reduction count against workspace_limit (and never depend on
    # the threads): they may take half of it, so a budget of four partials' bytes allows two
    xs, ws = (8, 64, 32, 32), (64, 64, 3, 3)
    one = 64 * 64 * 9 * 4
    big = conv_params("conv2d", xs, ws, np.float32, 1, 1, 1, 1)
    small = conv_params("conv2d", xs, ws, np.float32, 1, 1, 1, 1, workspace_limit=4 * one)
    assert nhwc._gw_splits(big) == nhwc.GW_SPLITS
    assert nhwc._gw_splits(small) == 2
    x, w, b, gy, kw = _make(("split", xs, ws, {"padding": 1}), np.float32)
    got = nhwc.grad_weight(nhwc.to_nhwc(gy), nhwc.to_nhwc(x), small)
    want = ref.conv2d_grad_weight(gy.astype(np.float64), x.astype(np.float64), w.shape, padding=1)
    assert_results({"grad_weight": got}, {"grad_weight": want}, np.float32, scale=8.0)


def _assert_same_bits_for_thread_counts(case, dtype=np.float32):
    x, w, b, gy, kw = _make(case, dtype)
    p = _params(x, w, kw)
    xh, gyh = nhwc.to_nhwc(x), nhwc.to_nhwc(gy)
    prev = numba.get_num_threads()
    out = []
    try:
        for n in (1, min(2, numba.config.NUMBA_NUM_THREADS)):
            numba.set_num_threads(n)
            out.append((nhwc.forward(xh, w, b, p), nhwc.grad_input(gyh, w, p), nhwc.grad_weight(gyh, xh, p)))
    finally:
        numba.set_num_threads(prev)
    for one, two in zip(*out):
        np.testing.assert_array_equal(one, two)


def test_thread_counts_give_the_same_bits():
    _assert_same_bits_for_thread_counts(("t", (3, ROWS, 9, 10), (NR + 3, ROWS, 3, 3),
                                         {"padding": 1, "stride": (1, 2)}))


# --------------------------------------------------------------------------------------- padding taps
SKIP_CASES = [c for c in CASES if c[2][1] >= ROWS and c[3].get("padding")] + [
    ("window-all-padding", (2, ROWS, 3, 4), (NR + 1, ROWS, 3, 3), {"padding": (4, 3)}),  # bias-only outputs
    ("small-planes", (5, ROWS + 8, 4, 4), (2 * NR, ROWS + 8, 3, 3), {"padding": 1}),
]


def _brute_keys(p):
    keys = []
    for oy in range(p.oh):
        for ox in range(p.ow):
            rows = [rr for rr in range(p.r) if 0 <= oy * p.sh - p.ph0 + rr * p.dh < p.h]
            cols = [ss for ss in range(p.s) if 0 <= ox * p.sw - p.pw0 + ss * p.dw < p.w]
            keys.append((rows, cols))
    return keys


@pytest.mark.parametrize("case", SKIP_CASES, ids=[c[0] for c in SKIP_CASES])
def test_window_keys_and_padded_share(case):
    x, w, b, gy, kw = _make(case, np.float32)
    p = _params(x, w, kw)
    brute = _brute_keys(p)
    inside = sum(len(rows) * len(cols) for rows, cols in brute)
    assert nhwc.padded_share(p) == pytest.approx(1 - inside / (p.oh * p.ow * p.r * p.s))
    for key, (rows, cols) in zip(nhwc._window_keys(p), brute):
        shi, key = key % (p.s + 1), key // (p.s + 1)
        slo, key = key % (p.s + 1), key // (p.s + 1)
        rhi, rlo = key % (p.r + 1), key // (p.r + 1)
        assert list(range(rlo, rhi)) == (rows if cols else list(range(rlo, rhi)))
        assert (rlo < rhi and slo < shi) == bool(rows and cols)
        if rows and cols:
            assert (list(range(rlo, rhi)), list(range(slo, shi))) == (rows, cols)


@pytest.mark.parametrize("skip", [False, True])
@pytest.mark.parametrize("case", [
    ("deep", (3, 40, 5, 6), (70, 40, 3, 3), {"padding": 1}),               # panels of 32 + a partial one
    ("groups", (2, 24, 6, 5), (72, 12, 3, 3), {"padding": 1, "groups": 2}),  # 36 per group
    ("bias-1x1", (2, 32, 7, 7), (96, 32, 1, 1), {}),
], ids=lambda c: c[0] if isinstance(c, tuple) else None)
def test_items_splitting_the_output_channels_change_no_bits(case, skip, monkeypatch):
    # large weights: items take blocks of output-channel panels of all the positions (one pass over
    # the weights) instead of blocks of positions; forward and grad_input the same bits as the
    # positions-only split, and the reference
    x, w, b, gy, kw = _make(case, np.float32)
    p = _params(x, w, kw)
    xh, gyh = nhwc.to_nhwc(x), nhwc.to_nhwc(gy)
    if skip:
        monkeypatch.setattr(nhwc, "SKIP_MIN_MACS", 0)
        monkeypatch.setattr(nhwc, "SKIP_MIN_SHARE", 0.0)
    mr, nr = G.tile(4)
    real = nhwc._rows_plan
    monkeypatch.setattr(nhwc, "_rows_plan", lambda q, m, in_place=True: (2 * mr, 2, -(-q.kg // nr)))
    plain = (nhwc.forward(xh, w, b, p), nhwc.grad_input(gyh, w, p))  # blocks of positions, all panels
    monkeypatch.setattr(nhwc, "_rows_plan", real)
    caches = dict(nhwc._cpu.cache_sizes(), l2=4096)  # every weight array "outgrows" this L2
    monkeypatch.setattr(nhwc._cpu, "cache_sizes", lambda: caches)
    pb = nhwc._rows_plan(p, p.n * p.oh * p.ow)[2]
    if p.g == 1 or numba.get_num_threads() > 1:  # (one thread: the two groups are the two items)
        assert pb < -(-p.kg // G.tile(4)[1])
    got = (nhwc.forward(xh, w, b, p), nhwc.grad_input(gyh, w, p))
    np.testing.assert_array_equal(got[0], plain[0])
    np.testing.assert_array_equal(got[1], plain[1])
    want = _reference(x, w, b, gy, kw)
    np.testing.assert_allclose(got[0].transpose(0, 3, 1, 2), want["forward"], rtol=1e-4,
                               atol=1e-4 * np.abs(want["forward"]).max())


def test_few_positions_or_large_weights_split_the_output_channels():
    # MobileNet's 512 -> 512 1x1 layer on 3x3 planes (144 positions: three blocks of 56 for two
    # workers) and resnet50-3x3-512's 9.4 MB of weights: items of output-channel panels, every
    # position in one block; a wide plane with small weights keeps blocks of positions
    nr = G.tile(4)[1]
    for xs, ws in (((16, 512, 3, 3), (512, 512, 1, 1)), ((8, 512, 7, 7), (512, 512, 3, 3))):
        p = conv_params("conv2d", xs, ws, np.dtype(np.float32), 1, ws[2] // 2, 1, 1)
        bm, nw, pb = nhwc._rows_plan(p, p.n * p.oh * p.ow)
        if numba.get_num_threads() > 1 or ws[2] == 3:  # (one thread: three blocks are enough items)
            assert bm >= p.n * p.oh * p.ow
        if numba.get_num_threads() > 1:
            assert pb < -(-p.kg // nr) and nw == numba.get_num_threads()
    p = conv_params("conv2d", (8, 64, 56, 56), (64, 64, 3, 3), np.dtype(np.float32), 1, 1, 1, 1)
    assert nhwc._rows_plan(p, p.n * p.oh * p.ow)[2] == -(-p.kg // nr)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", SKIP_CASES, ids=[c[0] for c in SKIP_CASES])
def test_skipping_padding_taps_changes_no_bits(case, dtype, monkeypatch):
    # the skipping forward (and the stride-1 grad_input, a forward) against the reference and,
    # bit for bit, against the forward that multiplies the padding's zeros
    x, w, b, gy, kw = _make(case, dtype)
    p = _params(x, w, kw)
    xh, gyh = nhwc.to_nhwc(x), nhwc.to_nhwc(gy)
    monkeypatch.setattr(nhwc, "ALL_TAPS_MAX_CHANNELS", 0)  # thin groups sum all taps at once, unskipped
    plain = (nhwc.forward(xh, w, b, p), nhwc.grad_input(gyh, w, p))
    monkeypatch.setattr(nhwc, "SKIP_MIN_MACS", 0)
    monkeypatch.setattr(nhwc, "SKIP_MIN_SHARE", 0.0)
    assert nhwc.skips(p)
    calls = []
    real = nhwc.K.forward_rows
    monkeypatch.setattr(nhwc.K, "forward_rows", lambda *a: calls.append(a[24]) or real(*a))  # a[24]: skip
    got = (nhwc.forward(xh, w, b, p), nhwc.grad_input(gyh, w, p))
    assert calls and all(calls), "the kernel did not skip"
    np.testing.assert_array_equal(got[0], plain[0])
    np.testing.assert_array_equal(got[1], plain[1])
    want = _reference(x, w, b, gy, kw)
    del want["grad_weight"]
    assert_results({"forward": got[0].transpose(0, 3, 1, 2), "grad_input": got[1].transpose(0, 3, 1, 2)},
                   want, dtype, scale=4.0)


def test_gemm_takes_thin_groups_on_14x14_planes_to_the_channels_last_kernels(monkeypatch):
    # NCHW input: groups whose taps the NHWC forward sums at once go there up to 14x14 planes
    # (implicit.ROWS_MAX_PLANE_THIN), wider groups only up to ROWS_MAX_PLANE; values unchanged
    rng = np.random.default_rng(5)
    calls = []
    real = nhwc.forward
    monkeypatch.setattr(nhwc, "forward", lambda *a: calls.append(a[3].cg) or real(*a))
    for c in (32, 200):
        x = random_array(rng, (3, c, 14, 14), np.float32)
        w = random_array(rng, (24, c, 3, 3), np.float32)
        y = fastconv.conv2d(x, w, padding=1, algorithm="gemm")
        np.testing.assert_allclose(y, ref.conv2d(x.astype(np.float64), w.astype(np.float64), padding=1),
                                   rtol=1e-4, atol=1e-4 * np.sqrt(9 * c))
    assert calls == [32]


ALL_TAPS_CASES = [c for c in CASES if ROWS <= c[2][1] <= nhwc.ALL_TAPS_MAX_CHANNELS and c[2][2] * c[2][3] > 1] + [
    ("all-taps-5x5-edges", (3, 64, 6, 5), (NR + 7, 64, 5, 5), {"padding": 2}),  # 64 channels, kg % NR, MR edges
    ("all-taps-float-edge", (1, ROWS, 2, 3), (1, ROWS, 3, 3), {"padding": (2, 1)}),  # rows wholly in padding
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", ALL_TAPS_CASES, ids=[c[0] for c in ALL_TAPS_CASES])
def test_all_taps_in_one_call_equals_one_call_per_tap(case, dtype, monkeypatch):
    # thin groups sum a tile's taps in one ukernel_taps call: the reference's values, and within
    # rounding of the per-tap calls (the order of the sums differs)
    x, w, b, gy, kw = _make(case, dtype)
    p = _params(x, w, kw)
    assert nhwc.all_taps(p)
    xh, gyh = nhwc.to_nhwc(x), nhwc.to_nhwc(gy)
    calls = []
    real = nhwc.K.forward_rows
    monkeypatch.setattr(nhwc.K, "forward_rows", lambda *a: calls.append(a[25]) or real(*a))  # a[25]: alltaps
    got = (nhwc.forward(xh, w, b, p), nhwc.grad_input(gyh, w, p))
    assert calls and calls[0], "the kernel did not sum all taps at once"
    monkeypatch.setattr(nhwc, "ALL_TAPS_MAX_CHANNELS", 0)
    per_tap = (nhwc.forward(xh, w, b, p), nhwc.grad_input(gyh, w, p))
    tol = 1e-5 if dtype == np.float32 else 1e-12
    for a, c in zip(got, per_tap):
        np.testing.assert_allclose(a, c, rtol=tol, atol=tol * np.abs(c).max())
    want = _reference(x, w, b, gy, kw)
    del want["grad_weight"]
    assert_results({"forward": got[0].transpose(0, 3, 1, 2), "grad_input": got[1].transpose(0, 3, 1, 2)},
                   want, dtype, scale=4.0)


def test_skipping_keeps_the_nan_of_non_finite_weights(monkeypatch):
    # 0 * inf in the padding is NaN (as in PyTorch): a non-finite weight turns the skipping off
    monkeypatch.setattr(nhwc, "SKIP_MIN_MACS", 0)
    x, w, b, gy, kw = _make(SKIP_CASES[-1], np.float64)
    w[3, 1, 0, 0] = np.inf
    p = _params(x, w, kw)
    got = nhwc.forward(nhwc.to_nhwc(x), w, b, p).transpose(0, 3, 1, 2)
    want = ref.conv2d(x, w, b, **kw)
    assert np.isnan(want).any()
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    fin = np.isfinite(want)
    np.testing.assert_allclose(got[fin], want[fin], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", DTYPES)
def test_gemm_takes_small_nchw_planes_through_the_rows(dtype, monkeypatch):
    # algorithm='gemm' on NCHW input with small planes: converted, the row kernels, converted back
    x, w, b, gy, kw = _make(SKIP_CASES[-1], dtype)
    p = _params(x, w, kw)
    assert implicit._via_rows(p)
    assert implicit._via_rows(p, "grad_weight")
    calls = []
    for name in ("_forward_rows", "grad_weight"):
        real = getattr(nhwc, name)
        monkeypatch.setattr(nhwc, name, lambda *a, _f=real, _n=name, **k: calls.append(_n) or _f(*a, **k))
    y = fastconv.conv2d(x, w, b, algorithm="gemm", **kw)
    g = fastconv.conv2d_backward(gy, x, w, algorithm="gemm", **kw)
    # the forward, the stride-1 grad_input (a forward) and grad_weight
    assert sorted(calls) == ["_forward_rows", "_forward_rows", "grad_weight"]
    assert y.flags.c_contiguous and g.grad_input.flags.c_contiguous
    assert_results({"forward": y, "grad_input": g.grad_input, "grad_weight": g.grad_weight},
                   _reference(x, w, b, gy, kw), dtype, scale=4.0)


def test_gemm_small_planes_non_finite_weight_scatters():
    # the transposed forward would multiply the inf by gy's zero padding: grad_input scatters instead
    x, w, b, gy, kw = _make(SKIP_CASES[-1], np.float64)
    w[2, 3, 0, 1] = np.inf
    got = fastconv.conv2d_backward(gy, x, w, algorithm="gemm", **kw).grad_input
    want = ref.conv2d_grad_input(gy, x.shape, w, **kw)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    fin = np.isfinite(want)
    np.testing.assert_allclose(got[fin], want[fin], rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------------------- public ops
@pytest.mark.parametrize("algorithm", ["auto", "gemm", "direct", "im2col"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", [CASES[0], CASES[2], CASES[5]], ids=[CASES[0][0], CASES[2][0], CASES[5][0]])
def test_public_ops_keep_channels_last(case, dtype, algorithm):
    x, w, b, gy, kw = _make(case, dtype)
    xc, gyc = _cl(x), _cl(gy)
    x_before, gy_before = xc.copy(), gyc.copy()
    y = fastconv.conv2d(xc, w, b, algorithm=algorithm, **kw)
    g = fastconv.conv2d_backward(gyc, xc, w, algorithm=algorithm, **kw)
    gw, gb = fastconv.conv2d_grad_weight(gyc, xc, w, algorithm=algorithm, **kw)
    assert nhwc.is_channels_last(y) and nhwc.is_channels_last(g.grad_input)
    assert g.grad_weight.flags.c_contiguous
    want = _reference(x, w, b, gy, kw)
    assert_results({"forward": y, "grad_input": g.grad_input, "grad_weight": g.grad_weight}, want, dtype,
                   scale=4.0)
    np.testing.assert_allclose(gw, g.grad_weight, rtol=1e-5 if dtype == np.float32 else 1e-12, atol=1e-5)
    np.testing.assert_allclose(gb, gy.astype(np.float64).sum(axis=(0, 2, 3)), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(xc, x_before)
    np.testing.assert_array_equal(gyc, gy_before)
    assert nhwc.is_channels_last(xc) and nhwc.is_channels_last(gyc)


def test_channels_last_matches_nchw_bitwise_on_converted_paths():
    # an algorithm without NHWC kernels computes on converted copies: the same bits as from NCHW
    x, w, b, gy, kw = _make(CASES[5], np.float32)
    for alg in ("direct", "fft"):
        np.testing.assert_array_equal(fastconv.conv2d(_cl(x), w, b, algorithm=alg, **kw),
                                      fastconv.conv2d(x, w, b, algorithm=alg, **kw))


def test_mixed_layouts_and_out():
    x, w, b, gy, kw = _make(CASES[0], np.float64)
    want = _reference(x, w, b, gy, kw)
    # channels_last gradient of an NCHW input, and the reverse: each result in x's layout
    g = fastconv.conv2d_backward(_cl(gy), x, w, **kw)
    assert g.grad_input.flags.c_contiguous
    np.testing.assert_allclose(g.grad_input, want["grad_input"], rtol=1e-10, atol=1e-10)
    g = fastconv.conv2d_backward(gy, _cl(x), w, **kw)
    assert nhwc.is_channels_last(g.grad_input)
    np.testing.assert_allclose(g.grad_input, want["grad_input"], rtol=1e-10, atol=1e-10)
    out = np.empty(want["forward"].shape)
    assert fastconv.conv2d(_cl(x), w, b, out=out, **kw) is out
    np.testing.assert_allclose(out, want["forward"], rtol=1e-10, atol=1e-10)


def test_unbatched_hwc_input():
    x, w, b, gy, kw = _make(CASES[1], np.float32)
    x3 = np.ascontiguousarray(x[0].transpose(1, 2, 0)).transpose(2, 0, 1)  # (C, H, W) in HWC memory
    y = fastconv.conv2d(x3, w, b, **kw)
    assert y.shape == want_shape(x[0:1], w)[1:]
    np.testing.assert_allclose(y, ref.conv2d(x[0:1].astype(np.float64), w.astype(np.float64),
                                             b.astype(np.float64), **kw)[0], rtol=1e-4, atol=1e-4)


def want_shape(x, w):
    return (x.shape[0], w.shape[0], x.shape[2] - w.shape[2] + 1, x.shape[3] - w.shape[3] + 1)


def test_gemm_runs_natively_and_others_convert(monkeypatch):
    calls = []
    real = nhwc.forward
    monkeypatch.setattr(nhwc, "forward", lambda *a: calls.append(1) or real(*a))
    x, w, b, gy, kw = _make(CASES[0], np.float32)
    fastconv.conv2d(_cl(x), w, b, algorithm="gemm", **kw)
    assert calls == [1]
    fastconv.conv2d(_cl(x), w, b, algorithm="direct", **kw)
    monkeypatch.setattr(implicit, "ROWS_MAX_PLANE", 0)
    monkeypatch.setattr(implicit, "ROWS_MAX_PLANE_THIN", 0)
    fastconv.conv2d(x, w, b, algorithm="gemm", **kw)  # NCHW input, planes over ROWS_MAX_PLANE: NCHW kernels
    assert calls == [1]
    # depthwise: refused by the NHWC kernels, so even algorithm='gemm' computes on a converted copy
    xd = _cl(random_array(np.random.default_rng(2), (2, 16, 6, 6), np.float32))
    wd = random_array(np.random.default_rng(3), (16, 1, 3, 3), np.float32)
    y = fastconv.conv2d(xd, wd, groups=16, padding=1, algorithm="gemm")
    assert calls == [1] and nhwc.is_channels_last(y)
    np.testing.assert_allclose(y, ref.conv2d(np.asarray(xd, np.float64), wd.astype(np.float64), groups=16,
                                             padding=1), rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------------------- depthwise
DW_CASES = [
    # 3x3: the nine-term interior columns and the tap-by-tap borders
    ("dw-3x3-same", (2, 8, 7, 9), (8, 1, 3, 3), {"padding": 1}),
    ("dw-3x3-s2", (2, 16, 11, 10), (16, 1, 3, 3), {"stride": 2, "padding": 1}),
    ("dw-3x3-dilated", (1, 24, 9, 8), (24, 1, 3, 3), {"padding": "same", "dilation": 2}),
    ("dw-3x3-valid-s3", (2, 8, 5, 5), (8, 1, 3, 3), {"stride": 3}),
    ("dw-5x3-asym", (1, 9, 6, 7), (9, 1, 5, 3), {"stride": (2, 1), "padding": (2, 1), "dilation": (1, 2)}),
    ("dw-2x2", (2, 8, 4, 4), (8, 1, 2, 2), {}),
    ("dw-tiny-plane", (3, 32, 2, 3), (32, 1, 3, 3), {"padding": 1}),
    # runs of interior columns four at a time (sharing their input columns at stride 1), the rest
    # one by one, whole kernel rows in the padding, and dilated runs, in whole channel vectors
    ("dw-3x3-runs", (2, 32, 6, 13), (32, 1, 3, 3), {"padding": 1}),
    ("dw-3x3-pad2", (1, 16, 5, 9), (16, 1, 3, 3), {"padding": 2}),
    ("dw-3x3-d2-runs", (1, 16, 8, 14), (16, 1, 3, 3), {"padding": 2, "dilation": 2}),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", DW_CASES, ids=[c[0] for c in DW_CASES])
def test_depthwise_passes_against_reference(case, dtype):
    _, xs, ws, kw = case
    kw = dict(kw, groups=xs[1])
    x, w, b, gy, _ = _make((case[0], xs, ws, kw), dtype)
    p = _params(x, w, kw)
    assert nhwc.depthwise_serves(p, w)
    xh, gyh = nhwc.to_nhwc(x), nhwc.to_nhwc(gy)
    got = {"forward": nhwc.dw_forward(xh, w, b, p).transpose(0, 3, 1, 2),
           "grad_input": nhwc.dw_grad_input(gyh, w, p).transpose(0, 3, 1, 2),
           "grad_weight": nhwc.dw_grad_weight(gyh, xh, p)}
    assert_results(got, _reference(x, w, b, gy, kw), dtype, scale=4.0)
    # the public ops take these loops for channels_last input ('auto' chooses direct for depthwise)
    for alg in ("auto", "direct"):
        y = fastconv.conv2d(_cl(x), w, b, algorithm=alg, **kw)
        g = fastconv.conv2d_backward(_cl(gy), _cl(x), w, algorithm=alg, **kw)
        assert _nhwc_memory(y) and _nhwc_memory(g.grad_input)  # (a 1x1 output is both layouts)
        np.testing.assert_array_equal(y, got["forward"])
        np.testing.assert_array_equal(g.grad_input, got["grad_input"])
        np.testing.assert_array_equal(g.grad_weight, got["grad_weight"])


def test_depthwise_serves_only_finite_wide_depthwise():
    p = conv_params("conv2d", (2, 16, 6, 6), (16, 1, 3, 3), np.float32, 1, 1, 1, 16)
    w = np.ones((16, 1, 3, 3), np.float32)
    assert nhwc.depthwise_serves(p, w)
    w[3, 0, 1, 1] = np.inf
    assert not nhwc.depthwise_serves(p, w)
    narrow = conv_params("conv2d", (2, 4, 6, 6), (4, 1, 3, 3), np.float32, 1, 1, 1, 4)
    assert not nhwc.depthwise_serves(narrow, np.ones((4, 1, 3, 3), np.float32))
    multiplier = conv_params("conv2d", (2, 16, 6, 6), (32, 1, 3, 3), np.float32, 1, 1, 1, 16)
    assert not nhwc.depthwise_serves(multiplier, np.ones((32, 1, 3, 3), np.float32))


def test_depthwise_non_finite_weight_keeps_nchw_nan_pattern():
    # an infinite weight times the padding's zeros is NaN in the NCHW kernels (and the reference):
    # such calls run there, on converted copies, and give the same bits as from NCHW
    x, w, b, gy, kw = _make(("nan", (2, 16, 6, 7), (16, 1, 3, 3), {"padding": 1, "groups": 16}), np.float32)
    w[2, 0, 0, 0] = np.inf
    y = fastconv.conv2d(_cl(x), w, b, **kw)
    np.testing.assert_array_equal(y, fastconv.conv2d(x, w, b, **kw))
    assert np.isnan(y[:, 2]).any()


def test_depthwise_grad_weight_thread_invariant():
    x, w, b, gy, kw = _make(("t", (5, 16, 9, 8), (16, 1, 3, 3), {"padding": 1, "groups": 16}), np.float32)
    p = _params(x, w, kw)
    xh, gyh = nhwc.to_nhwc(x), nhwc.to_nhwc(gy)
    prev = numba.get_num_threads()
    out = []
    try:
        for n in (1, min(2, numba.config.NUMBA_NUM_THREADS)):
            numba.set_num_threads(n)
            out.append(nhwc.dw_grad_weight(gyh, xh, p))
    finally:
        numba.set_num_threads(prev)
    np.testing.assert_array_equal(out[0], out[1])


def test_auto_prefers_native_where_measured_faster():
    def pref(xs, ws, stride=1, padding=0, groups=1):
        p = conv_params("conv2d", xs, ws, np.float32, stride, padding, 1, groups)
        return {ps: nhwc.preferred(p, ps) for ps in ("forward", "grad_input", "grad_weight")}
    wide_1x1 = pref((8, 256, 56, 56), (64, 256, 1, 1))
    assert all(wide_1x1.values())
    assert pref((8, 128, 56, 56), (128, 128, 3, 3), stride=2, padding=1) == dict.fromkeys(wide_1x1, True)
    # stride-1 3x3: grad_weight's gathered panels lose to converting
    assert pref((8, 64, 56, 56), (64, 64, 3, 3), padding=1) == {"forward": True, "grad_input": True,
                                                                "grad_weight": False}
    # few positions: grad_input converts (the forward still runs natively)
    assert pref((8, 512, 7, 7), (512, 512, 3, 3), padding=1) == {"forward": True, "grad_input": False,
                                                                 "grad_weight": False}
    assert not any(pref((8, 3, 224, 224), (64, 3, 7, 7), stride=2, padding=3).values())  # 3 channels


def test_auto_runs_gemms_small_planes_natively():
    # where 'gemm' itself runs on the NHWC kernels (small planes), a channels_last input takes every
    # pass natively, grad_weight of a stride-1 3x3 layer included (nhwc.preferred alone says no)
    from fastconv import _dispatch, functional
    reg = _dispatch.registry()
    p = conv_params("conv2d", (8, 512, 7, 7), (512, 512, 3, 3), np.float32, 1, 1, 1, 1)
    assert not nhwc.preferred(p, "grad_weight")
    for pass_ in ("forward", "grad_input", "grad_weight"):
        assert implicit.via_channels_last(p, pass_)
        assert functional._native(p, reg["gemm"], "auto", pass_)
    assert not functional._native(p, reg["winograd"], "auto", "grad_weight")
    big = conv_params("conv2d", (8, 64, 56, 56), (64, 64, 3, 3), np.float32, 1, 1, 1, 1)
    assert not implicit.via_channels_last(big, "grad_weight")
    # native there only where this CPU's measurements say so (AVX-512: yes)
    assert functional._native(big, reg["gemm"], "auto", "grad_weight") == nhwc.native_beats_converting(
        big, "grad_weight")


def _p(xs, ws, stride=1, padding=1, dilation=1, groups=1):
    return conv_params("conv2d", xs, ws, np.float32, stride, padding, dilation, groups)


def test_native_beats_converting_where_measured():
    """AVX-512: 32-128 channel layers run natively (channels_last) or via NHWC (NCHW, small planes);
    never on AVX2 or the portable ISA, never for 16 or 256 channels or groups."""
    def passes(p, **kw):
        return tuple(nhwc.native_beats_converting(p, ps, **kw) for ps in ("forward", "grad_input", "grad_weight"))
    small = _p((32, 32, 28, 28), (32, 32, 3, 3))
    assert passes(small, isa="avx512") == (True, True, True)
    assert passes(small, isa="avx512", nchw=True) == (True, True, True)
    assert passes(conv_params("conv2d", (32, 32, 28, 28), (32, 32, 3, 3), np.float64, 1, 1, 1, 1),
                  isa="avx512") == (False, False, False)
    for isa in ("avx2", "portable"):
        assert passes(small, isa=isa) == (False, False, False)
        assert passes(small, isa=isa, nchw=True) == (False, False, False)
    big = _p((8, 64, 56, 56), (64, 64, 3, 3))  # Winograd catches up in the forward; NCHW keeps its planes
    assert passes(big, isa="avx512") == (False, False, True)
    assert passes(big, isa="avx512", nchw=True) == (False, False, False)
    dil = _p((8, 64, 64, 64), (64, 64, 3, 3), padding=2, dilation=2)
    assert passes(dil, isa="avx512") == (True, True, True)
    assert passes(dil, isa="avx512", nchw=True) == (False, False, True)
    for other in (_p((4, 16, 128, 128), (16, 16, 3, 3)), _p((32, 256, 8, 8), (256, 256, 3, 3)),
                  _p((8, 64, 14, 14), (64, 32, 3, 3), groups=2), _p((8, 64, 14, 14), (64, 64, 1, 1), padding=0)):
        assert passes(other, isa="avx512", nchw=True) == (False, False, False)
    # what pays with both conversions (an NCHW call) pays without them (a channels_last one)
    strided = _p((32, 32, 28, 28), (64, 32, 3, 3), stride=2)
    assert passes(strided, isa="avx512") == (True, True, True)
    assert passes(strided, isa="avx512", nchw=True) == (True, True, True)
    narrow_in = _p((32, 16, 28, 28), (32, 16, 3, 3), stride=2)  # 16 inputs: NCHW strided passes
    assert passes(narrow_in, isa="avx512", nchw=True) == (True, True, True)
    assert passes(narrow_in, isa="avx512") == (True, True, True)
    wide_strided = _p((16, 256, 14, 14), (256, 256, 3, 3), stride=2)  # 256 channels: not grad_weight
    assert passes(wide_strided, isa="avx512", nchw=True) == (True, True, False)
    assert passes(wide_strided, isa="avx512") == (True, True, False)
    widest = _p((16, 512, 14, 14), (512, 512, 3, 3), stride=2)
    assert passes(widest, isa="avx512", nchw=True) == (False, False, False)
    assert passes(_p((32, 16, 28, 28), (32, 16, 3, 3)), isa="avx512", nchw=True) == (False, False, False)
    narrow_out = _p((4, 32, 64, 64), (16, 32, 3, 3))  # 16 outputs: channels_last gradients only
    assert passes(narrow_out, isa="avx512") == (False, True, True)
    assert passes(narrow_out, isa="avx512", nchw=True) == (False, False, False)


@pytest.mark.parametrize("cl", [False, True])
def test_auto_via_nhwc_matches_reference(cl, monkeypatch):
    """Where native_beats_converting says so, 'auto' runs every pass on the NHWC kernels (a spy
    counts them) and the results match the float64 reference, in either input layout."""
    monkeypatch.setattr(nhwc, "native_beats_converting", lambda p, pass_, isa=None, nchw=False: True)
    calls = []
    for name in ("forward", "grad_input", "grad_weight"):
        real = getattr(nhwc, name)
        monkeypatch.setattr(nhwc, name, lambda *a, _real=real, _n=name, **k: calls.append(_n) or _real(*a, **k))
    x, w, b, gy, kw = _make(("t", (3, 32, 9, 8), (40, 32, 3, 3), {"padding": 1}), np.float64)
    if cl:
        x, gy = _cl(x), _cl(gy)
    y = fastconv.conv2d(x, w, b, **kw)
    gx, gw, gb = fastconv.conv2d_backward(gy, x, w, **kw)
    gw2, _ = fastconv.conv2d_grad_weight(gy, x, w, **kw)
    assert calls == ["forward", "grad_input", "grad_weight", "grad_weight"]
    xr, gyr = np.ascontiguousarray(x), np.ascontiguousarray(gy)
    np.testing.assert_allclose(y, ref.conv2d(xr, w, b, **kw), rtol=1e-10, atol=1e-10)
    rgx = ref.conv2d_grad_input(gyr, x.shape, w, **kw)
    rgw = ref.conv2d_grad_weight(gyr, xr, w.shape, **kw)
    for got, want in ((gx, rgx), (gw, rgw), (gw2, rgw), (gb, gyr.sum(axis=(0, 2, 3)))):
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10)
    assert nhwc.is_channels_last(y) == cl and nhwc.is_channels_last(gx) == cl
    if not cl:  # an NCHW call converts only within its workspace budget: the NCHW algorithms run then
        calls.clear()
        y2 = fastconv.conv2d(x, w, b, **kw, workspace_limit=4096)
        assert calls == [] and np.allclose(y2, y, rtol=1e-10, atol=1e-10)


# --------------------------------------------------------------------------------------- random geometries
_pairs = lambda s: st.one_of(s, st.tuples(s, s))  # noqa: E731


@st.composite
def _wide_cases(draw):
    """Geometries for the in-place rows forward (>= ROWS channels per group) and the depthwise loops
    (the fuzz of tests/test_fuzz.py draws at most 5 channels per group)."""
    depthwise = draw(st.booleans())
    if depthwise:
        groups = c = k = draw(st.integers(8, 24))
        cg = 1
    else:
        groups = draw(st.sampled_from([1, 1, 2]))
        cg, kg = draw(st.integers(ROWS, ROWS + 9)), draw(st.integers(1, 2 * NR + 3))
        if groups > 1:
            kg = max(kg, 8)
        c, k = cg * groups, kg * groups
    r, s = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    dilation = draw(_pairs(st.integers(1, 2)))
    padding = draw(st.one_of(_pairs(st.integers(0, 2)), st.sampled_from(["same", "valid"])))
    stride = 1 if padding == "same" else draw(_pairs(st.integers(1, 3)))
    n, h, w = draw(st.integers(1, 3)), draw(st.integers(1, 11)), draw(st.integers(1, 11))
    (pt, pb), (pl, pr) = ref.conv_pads(padding, (r, s), stride, dilation)
    dh, dw = (dilation, dilation) if isinstance(dilation, int) else dilation
    assume(h + pt + pb >= dh * (r - 1) + 1 and w + pl + pr >= dw * (s - 1) + 1)
    kw = {"stride": stride, "padding": padding, "dilation": dilation, "groups": groups}
    return (n, c, h, w), (k, cg, r, s), kw, draw(st.sampled_from(DTYPES)), draw(st.integers(0, 2**31))


@given(case=_wide_cases())
def test_random_geometries_against_reference(case):
    xs, ws, kw, dtype, seed = case
    x, w, b, gy, _ = _make(("fuzz", xs, ws, kw), dtype, seed=seed)
    p = _params(x, w, kw)
    xh, gyh = nhwc.to_nhwc(x), nhwc.to_nhwc(gy)
    if kw["groups"] == xs[1]:
        got = {"forward": nhwc.dw_forward(xh, w, b, p), "grad_input": nhwc.dw_grad_input(gyh, w, p),
               "grad_weight": nhwc.dw_grad_weight(gyh, xh, p)}
    else:
        got = {"forward": nhwc.forward(xh, w, b, p), "grad_input": nhwc.grad_input(gyh, w, p),
               "grad_weight": nhwc.grad_weight(gyh, xh, p)}
        with pytest.MonkeyPatch.context() as mp:  # and skipping the padding's taps: the same bits
            mp.setattr(nhwc, "SKIP_MIN_MACS", 0)
            mp.setattr(nhwc, "SKIP_MIN_SHARE", 0.0)
            np.testing.assert_array_equal(nhwc.forward(xh, w, b, p), got["forward"])
    got["forward"] = got["forward"].transpose(0, 3, 1, 2)
    got["grad_input"] = got["grad_input"].transpose(0, 3, 1, 2)
    assert_results(got, _reference(x, w, b, gy, kw), dtype, scale=8.0)
    # and through the public ops, in the input's layout
    xc = _cl(x)
    y = fastconv.conv2d(xc, w, b, **kw)
    assert _nhwc_memory(y) or not nhwc.is_channels_last(xc)  # a 1x1 or 1-channel input is both layouts
    assert_results({"forward": y}, {"forward": _reference(x, w, b, gy, kw)["forward"]}, dtype, scale=8.0)


def test_dw_beats_nchw_where_measured():
    """AVX-512, float32: small stride-1 planes (<= 14x14) and strided ones up to 48x48."""
    def dw(xs, stride=1, dtype=np.float32, isa="avx512"):
        p = conv_params("conv2d", xs, (xs[1], 1, 3, 3), dtype, stride, 1, 1, xs[1])
        return nhwc.dw_beats_nchw(p, isa=isa)
    assert dw((32, 128, 7, 7)) and dw((32, 128, 14, 14)) and dw((16, 32, 48, 48), stride=2)
    assert not dw((32, 64, 28, 28)) and not dw((8, 128, 56, 56)) and not dw((16, 32, 96, 96), stride=2)
    assert not dw((32, 128, 7, 7), dtype=np.float64) and not dw((32, 128, 7, 7), isa="avx2")


@pytest.mark.parametrize("stride", [1, 2])
def test_auto_depthwise_nchw_via_nhwc_matches_reference(stride, monkeypatch):
    """Where dw_beats_nchw says so, an NCHW depthwise call under 'auto' runs the NHWC loops (a spy
    counts them) and matches the float64 reference; an explicit algorithm keeps the NCHW kernels."""
    monkeypatch.setattr(nhwc, "dw_beats_nchw", lambda p, isa=None: True)
    calls = []
    for name in ("dw_forward", "dw_grad_input", "dw_grad_weight"):
        real = getattr(nhwc, name)
        monkeypatch.setattr(nhwc, name, lambda *a, _real=real, _n=name, **k: calls.append(_n) or _real(*a, **k))
    kw = {"stride": stride, "padding": 1, "groups": 24}
    x, w, b, gy, _ = _make(("t", (3, 24, 9, 8), (24, 1, 3, 3), kw), np.float64)
    y = fastconv.conv2d(x, w, b, **kw)
    gx, gw, gb = fastconv.conv2d_backward(gy, x, w, **kw)
    gw2, _ = fastconv.conv2d_grad_weight(gy, x, w, **kw)
    flipped = ["dw_forward"] if stride == 1 else []  # stride 1: grad_input is the flipped forward
    assert calls == ["dw_forward", "dw_grad_input", *flipped, "dw_grad_weight", "dw_grad_weight"]
    np.testing.assert_allclose(y, ref.conv2d(x, w, b, **kw), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(gx, ref.conv2d_grad_input(gy, x.shape, w, **kw), rtol=1e-10, atol=1e-10)
    for got in (gw, gw2):
        np.testing.assert_allclose(got, ref.conv2d_grad_weight(gy, x, w.shape, **kw), rtol=1e-10, atol=1e-10)
    assert y.flags.c_contiguous and gx.flags.c_contiguous  # NCHW in, NCHW out
    calls.clear()
    fastconv.conv2d(x, w, b, **kw, algorithm="direct")
    assert calls == []


def _packed_reference(w, g, kg, cg, r, s, nr, flipped):
    """pack_weights' layout written out with NumPy: panels of nr outputs over taps (rr, ss, cc)."""
    if flipped:  # the transposed convolution's kernel from the forward's (g*cg, kg, r, s) weights
        wt = w.reshape(g, cg, kg, r, s)[:, :, :, ::-1, ::-1].transpose(0, 2, 1, 3, 4)
    else:
        wt = w.reshape(g, kg, cg, r, s)
    npan = -(-kg // nr)
    out = np.zeros((g, npan, r, s, cg, nr), w.dtype)
    for jp in range(npan):
        blk = wt[:, jp * nr:(jp + 1) * nr]  # (g, nn, cg, r, s)
        out[:, jp, :, :, :, :blk.shape[1]] = blk.transpose(0, 3, 4, 2, 1)
    return out.reshape(-1)


@pytest.mark.parametrize("flipped", [False, True])
@pytest.mark.parametrize("g,kg,cg,r,s", [(1, 40, 20, 3, 3), (2, 33, 7, 5, 5), (1, 64, 300, 1, 1),
                                         (3, 8, 37, 3, 2), (1, 70, 150, 3, 3)])
def test_pack_weights_layout_and_finiteness(g, kg, cg, r, s, flipped):
    """Every panel element against the NumPy layout, channel blocks of every size (the kernel copies
    a block of channels at a time), both orientations; a NaN marks its panel, and only it, bad."""
    from fastconv._algorithms import _nhwc_kernels as K
    rng = np.random.default_rng(g * 1000 + kg + cg)
    shape = (g * cg, kg, r, s) if flipped else (g * kg, cg, r, s)
    w = rng.standard_normal(shape).astype(np.float32)
    npan = -(-kg // NR)
    pb = np.full(g * npan * r * s * cg * NR, np.nan, np.float32)
    bad = np.full(g * npan, 7, np.uint8)
    K.pack_weights(w.reshape(-1), g, kg, cg, r, s, pb, NR, bad, flipped)
    np.testing.assert_array_equal(pb, _packed_reference(w, g, kg, cg, r, s, NR, flipped))
    assert not bad.any()
    w.reshape(-1)[w.size - 1] = np.nan  # the last weight: last group's last panel
    K.pack_weights(w.reshape(-1), g, kg, cg, r, s, pb, NR, bad, flipped)
    want = np.zeros(g * npan, np.uint8)
    want[(g - 1) * npan + (kg - 1) // NR] = 1  # either way the last weight feeds output kg-1 of group g-1
    np.testing.assert_array_equal(bad, want)


# --------------------------------------------------------------------------------------- 1x1 layers
POINTWISE_CASES = [
    # (with the test's 64-row blocks and 100-position parts) 12 row blocks, the last partial, and
    # 7 parts of grad_weight's sum; one row block, so 3 column blocks of the output (and of gw's)
    ("row-blocks", (5, 37, 13, 11), (150, 37, 1, 1)),
    ("column-blocks", (2, 130, 3, 3), (200, 130, 1, 1)),
    ("thin", (3, 3, 17, 19), (2, 3, 1, 1)),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", POINTWISE_CASES, ids=[c[0] for c in POINTWISE_CASES])
def test_pointwise_layers_against_reference(case, dtype, monkeypatch):
    # small blocks and parts so that every cut of the products runs: rows, columns, summed parts
    monkeypatch.setattr(nhwc, "POINTWISE_ROWS", 64)
    monkeypatch.setattr(nhwc, "GW_SPLIT_POSITIONS", 100)
    for own in (False, True):  # the BLAS blocks (every layer), then the own kernel where it pays
        monkeypatch.setattr(nhwc, "OWN_PRODUCT_FORWARD", 4096 if own else 1 << 60)
        monkeypatch.setattr(nhwc, "OWN_PRODUCT_GRAD_INPUT", 8192 if own else 1 << 60)
        monkeypatch.setattr(nhwc, "OWN_PRODUCT_MIN_POSITIONS", 0)  # (these cases have few positions)
        _assert_passes_match_reference(case + ({},), dtype, nhwc.pointwise)


def test_own_product_for_wide_pointwise_layers():
    def p_of(c, k, plane=32):
        return conv_params("t", (2, c, plane, plane), (k, c, 1, 1), np.float32, 1, 0, 1, 1)
    def own(c, k, isa="avx512", plane=32):
        return [nhwc.own_product(p_of(c, k, plane), ps, isa) for ps in ("forward", "grad_input")]
    assert own(32, 40) == [False, False] and own(64, 64) == [True, False] and own(128, 64) == [True, True]
    assert own(16, 32) == [True, False] and own(32, 64) == [True, False]  # forwards of whole panels
    assert own(128, 64, "avx2") == [False, False]  # measured on AVX-512 only
    assert own(512, 512, plane=4) == [False, False]  # 32 positions: the BLAS blocks


def test_pointwise_only_for_one_product():
    def p_of(xs, ws, **kw):
        return conv_params("t", xs, ws, np.float32, kw.get("stride", 1), kw.get("padding", 0), 1,
                           kw.get("groups", 1))
    assert nhwc.pointwise(p_of((1, 4, 5, 5), (3, 4, 1, 1)))
    assert not nhwc.pointwise(p_of((1, 4, 5, 5), (3, 4, 1, 1), stride=2))
    assert not nhwc.pointwise(p_of((1, 4, 5, 5), (3, 4, 1, 1), padding=1))
    assert not nhwc.pointwise(p_of((1, 4, 5, 5), (4, 2, 1, 1), groups=2))
    assert not nhwc.pointwise(p_of((1, 4, 5, 5), (3, 4, 3, 3)))


def test_pointwise_bits_do_not_depend_on_the_threads(monkeypatch):
    monkeypatch.setattr(nhwc, "OWN_PRODUCT_FORWARD", 1 << 60)  # the BLAS blocks (the own kernel: above)
    monkeypatch.setattr(nhwc, "OWN_PRODUCT_GRAD_INPUT", 1 << 60)
    monkeypatch.setattr(nhwc, "POINTWISE_ROWS", 64)
    monkeypatch.setattr(nhwc, "GW_SPLIT_POSITIONS", 100)
    assert nhwc.pointwise(_params(np.zeros((4, 40, 9, 10)), np.zeros((130, 40, 1, 1)), {}))
    _assert_same_bits_for_thread_counts(("t", (4, 40, 9, 10), (130, 40, 1, 1), {}))


def test_auto_runs_channels_last_1x1_layers_as_one_product(monkeypatch):
    calls = []
    real = nhwc._pointwise_rows
    monkeypatch.setattr(nhwc, "_pointwise_rows", lambda *a: calls.append(a[-1]) or real(*a))
    x, w, b, gy, kw = _make(("t", (2, 24, 7, 6), (40, 24, 1, 1), {}), np.float32)
    y = fastconv.conv2d(_cl(x), w, b)
    g = fastconv.conv2d_backward(_cl(gy), _cl(x), w)
    assert calls == [True, False]  # the forward, then grad_input
    assert nhwc.is_channels_last(y) and nhwc.is_channels_last(g.grad_input)
    assert_results({"forward": y, "grad_input": g.grad_input, "grad_weight": g.grad_weight},
                   _reference(x, w, b, gy, kw), np.float32, scale=4.0)


def test_auto_converts_small_nchw_1x1_gradients_to_one_product(monkeypatch):
    from fastconv import functional
    calls = []
    real_rows, real_gw = nhwc._pointwise_rows, nhwc._pointwise_gw
    monkeypatch.setattr(nhwc, "_pointwise_rows", lambda *a: calls.append("gi") or real_rows(*a))
    monkeypatch.setattr(nhwc, "_pointwise_gw", lambda *a: calls.append("gw") or real_gw(*a))
    side = int(np.sqrt(functional.POINTWISE_NCHW_PLANE))
    x, w, b, gy, kw = _make(("t", (3, 24, side, side), (40, 24, 1, 1), {}), np.float32)
    g = fastconv.conv2d_backward(gy, x, w)
    assert calls == ["gi", "gw"] and not nhwc.is_channels_last(g.grad_input)
    assert_results({"grad_input": g.grad_input, "grad_weight": g.grad_weight},
                   {k: v for k, v in _reference(x, w, b, gy, kw).items() if k != "forward"}, np.float32, scale=4.0)
    calls.clear()
    x2, w2, _, gy2, _ = _make(("t", (3, 24, side + 1, side + 1), (40, 24, 1, 1), {}), np.float32)
    fastconv.conv2d_backward(gy2, x2, w2)  # larger planes keep their NCHW picks
    assert calls == []


# --------------------------------------------------------------------------------------- grad_weight by taps
NR64 = G.tile(8)[1]
TAPS_CASES = [
    ("taps-3x3-s2", (3, 16, 11, 9), (NR, 16, 3, 3), {"stride": 2, "padding": 1}),
    ("taps-1x1-s2", (2, 24, 9, 10), (2 * NR, 24, 1, 1), {"stride": 2}),
    ("taps-1x1-s1", (3, 20, 9, 10), (NR, 20, 1, 1), {}),  # one product (pointwise), by taps
    ("taps-dilated-pad", (2, 7, 12, 13), (NR, 7, 3, 2), {"padding": (2, 3), "dilation": (2, 3), "stride": (1, 2)}),
    ("taps-groups", (2, 20, 8, 8), (2 * NR, 10, 3, 3), {"groups": 2, "padding": 1}),
    ("taps-all-padding-rows", (1, 5, 2, 3), (NR, 5, 3, 3), {"padding": 3}),  # taps with no segment at all
    ("taps-stride-gt-kernel", (2, 15, 13, 11), (NR, 15, 2, 2), {"stride": 3, "padding": 1}),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", TAPS_CASES, ids=[c[0] for c in TAPS_CASES])
def test_grad_weight_by_taps_against_reference(case, dtype, monkeypatch):
    """The tap-by-tap grad_weight (both operands in place) against the reference, and against the
    gathered panels it replaces; the same bits at every thread count.  On any ISA."""
    monkeypatch.setattr(nhwc, "GW_TAPS", True)
    x, w, b, gy, kw = _make(case, dtype)
    p = _params(x, w, kw)
    assert nhwc.gw_taps(p)
    xh, gyh = nhwc.to_nhwc(x), nhwc.to_nhwc(gy)
    got = nhwc.grad_weight(gyh, xh, p)
    assert_results({"grad_weight": got}, {"grad_weight": _reference(x, w, b, gy, kw)["grad_weight"]}, dtype,
                   scale=8.0)
    monkeypatch.setattr(nhwc, "GW_TAPS", False)
    assert not nhwc.gw_taps(p)
    assert_results({"grad_weight": got}, {"grad_weight": nhwc.grad_weight(gyh, xh, p)}, dtype, scale=8.0)
    monkeypatch.setattr(nhwc, "GW_TAPS", True)
    _assert_same_bits_for_thread_counts(case, dtype)


def test_grad_weight_by_taps_only_for_few_channels_in_whole_panels(monkeypatch):
    monkeypatch.setattr(nhwc, "GW_TAPS", True)

    def p(c, k, r, stride=1):
        return _p((2, c, 8, 8), (k, c, r, r), padding=r // 2, stride=stride)
    assert nhwc.gw_taps(p(16, 32, 3)) and nhwc.gw_taps(p(64, 32, 3)) and nhwc.gw_taps(p(16, 128, 3))
    assert not nhwc.gw_taps(p(64, 64, 3)) and not nhwc.gw_taps(p(16, NR + 8, 3))  # too wide / partial panel
    assert nhwc.gw_taps(p(128, 64, 1, 2)) and not nhwc.gw_taps(p(128, 128, 1, 2))
    q = conv_params("conv2d", (2, 16, 8, 8), (NR64, 16, 3, 3), np.float64, 1, 1, 1, 1)
    assert nhwc.gw_taps(q)  # float64: panels of NR64 columns


def test_auto_takes_taps_over_winograd_for_small_channels_last_gradients(monkeypatch):
    monkeypatch.setattr(nhwc, "GW_TAPS", True)
    small = _p((4, 32, 14, 14), (NR, 32, 3, 3))
    assert nhwc.taps_beat_winograd(small)
    assert nhwc.taps_beat_winograd(_p((2, 16, 40, 40), (NR, 16, 3, 3)))  # 16 input channels: any plane
    assert not nhwc.taps_beat_winograd(_p((2, 32, 28, 28), (NR, 32, 3, 3)))
    calls = []
    real = nhwc.grad_weight
    monkeypatch.setattr(nhwc, "grad_weight", lambda *a: calls.append(1) or real(*a))
    x, w, b, gy, kw = _make(("t", (4, 32, 14, 14), (NR, 32, 3, 3), {"padding": 1}), np.float32)
    gw, gb = fastconv.conv2d_grad_weight(_cl(gy), _cl(x), w, padding=1)
    assert calls
    assert_results({"grad_weight": gw}, {"grad_weight": _reference(x, w, b, gy, kw)["grad_weight"]}, np.float32,
                   scale=8.0)


@pytest.mark.parametrize("oh, ow, sh, sw, ph, pw", [(3, 5, 1, 1, 0, 0), (4, 7, 2, 2, 1, 1), (1, 1, 1, 2, 3, 0),
                                                    (5, 2, 3, 1, 0, 2)])
def test_positions_step_as_position_decodes(oh, ow, sh, sw, ph, pw):
    # forward_rows' positions are stepped along the output rows (no divisions): the same image,
    # top row and left column as _position's decoding, across rows and images
    from fastconv._algorithms import _nhwc_kernels as NK

    plane = oh * ow
    bm = 3 * plane + 2
    for pos0 in (0, 1, ow - 1, plane - 1, plane + 1):
        mb = bm - pos0 % 3
        offs = np.full(3 * bm, -7, np.int64)
        NK._positions(offs, bm, mb, pos0, plane, ow, sh, sw, ph, pw)
        want = np.array([NK._position(pos0 + i, plane, ow, sh, sw, ph, pw) for i in range(mb)]).T
        np.testing.assert_array_equal(offs.reshape(3, bm)[:, :mb], want)
        assert (offs.reshape(3, bm)[:, mb:] == -7).all()


def test_auto_nchw_keeps_winograd_of_dilated_layers(monkeypatch):
    """An NCHW call whose 'auto' chose Winograd runs it, dilated layers too (phase sub-images), even
    where native_beats_converting would convert the pass: the NHWC GEMM lost there (8x64x64x64 -> 64
    dilation 2 grad_weight 14.8 ms converted, 9.4 kept); the result matches the reference."""
    from fastconv import functional

    monkeypatch.setattr(nhwc, "native_beats_converting", lambda p, pass_, isa=None, nchw=False: True)
    real_select = functional.select
    picked = []

    def select(fn, algorithm, p, pass_, threads):
        alg = real_select(fn, "winograd" if algorithm == "auto" else algorithm, p, pass_, threads)
        picked.append(alg.name)
        return alg

    monkeypatch.setattr(functional, "select", select)
    calls = []
    for name in ("forward", "grad_input", "grad_weight"):
        real = getattr(nhwc, name)
        monkeypatch.setattr(nhwc, name, lambda *a, _real=real, _n=name, **k: calls.append(_n) or _real(*a, **k))
    x, w, b, gy, kw = _make(("t", (2, 8, 11, 10), (8, 8, 3, 3), {"padding": 2, "dilation": 2}), np.float64)
    gx, gw, _ = fastconv.conv2d_backward(gy, x, w, **kw)
    gw2, _ = fastconv.conv2d_grad_weight(gy, x, w, **kw)
    assert set(picked) == {"winograd"} and calls == []
    np.testing.assert_allclose(gx, ref.conv2d_grad_input(gy, x.shape, w, **kw), rtol=1e-9, atol=1e-9)
    for got in (gw, gw2):
        np.testing.assert_allclose(got, ref.conv2d_grad_weight(gy, x, w.shape, **kw), rtol=1e-9, atol=1e-9)


# --------------------------------------------------------------------------------------- few channels
FEW_CASES = [  # a first layer's 1-4 input channels, output channels around whole vectors
    ("rgb-s2-same", (2, 3, 11, 13), (16, 3, 3, 3), {"stride": 2, "padding": 1}),
    ("rgb-k17", (3, 3, 9, 8), (17, 3, 3, 3), {"padding": 1}),
    ("grey-5x5", (2, 1, 12, 12), (6, 1, 5, 5), {"padding": 2}),
    ("stem-7x7", (1, 3, 19, 17), (64, 3, 7, 7), {"stride": 2, "padding": 3}),
    ("rgba-dilated", (2, 4, 10, 11), (33, 4, 3, 2), {"dilation": (2, 1), "padding": (2, 0), "stride": (1, 2)}),
    ("same-even", (1, 2, 7, 6), (3, 2, 4, 2), {"padding": "same"}),
    ("widest", (1, 3, 6, 5), (128, 3, 3, 3), {}),
    ("stride-past-kernel", (2, 3, 13, 14), (8, 3, 2, 2), {"stride": 3, "padding": 1}),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", FEW_CASES, ids=[c[0] for c in FEW_CASES])
def test_few_channel_kernels_against_reference(case, dtype):
    # forward and grad_weight of a first layer on the few-channel kernels (a zero-padded copy, output
    # channels as the lanes) against the float64 reference, and the public ops on channels_last
    # arrays in the input's layout
    x, w, b, gy, kw = _make(case, dtype)
    p = _params(x, w, kw)
    assert nhwc.few_channels(p) == (p.k * p.itemsize <= 8 * G.VBYTES)
    xh, gyh = nhwc.to_nhwc(x), nhwc.to_nhwc(gy)
    want = _reference(x, w, b, gy, kw)
    got = {"forward": nhwc.forward(xh, w, b, p).transpose(0, 3, 1, 2), "grad_weight": nhwc.grad_weight(gyh, xh, p)}
    assert_results(got, {k: want[k] for k in got}, dtype, scale=4.0)
    y = fastconv.conv2d(_cl(x), w, b, **kw)
    gw, gb = fastconv.conv2d_grad_weight(_cl(gy), _cl(x), w, **kw)
    assert _nhwc_memory(y) or x.shape[1] == 1
    assert_results({"forward": y, "grad_weight": gw}, {k: want[k] for k in ("forward", "grad_weight")}, dtype,
                   scale=4.0)


@pytest.mark.boundscheck
def test_few_channel_kernels_bounds_and_threads():
    # every output column and padded row reached (boundscheck run), the same bits for 1 and 2 threads
    case = ("few", (2, 3, 9, 10), (20, 3, 3, 3), {"padding": 1, "stride": (2, 1)})
    assert nhwc.few_channels(_params(*_make(case, np.float32)[:2], case[3]))
    _assert_same_bits_for_thread_counts(case)
    test_few_channel_kernels_against_reference(case, np.float32)


def test_auto_runs_first_layers_natively(monkeypatch):
    # a channels_last first layer's forward and grad_weight on the few-channel kernels, not converted
    x, w, b, gy, kw = _make(FEW_CASES[0], np.float32)
    p = _params(x, w, kw)
    assert nhwc.native_beats_converting(p, "forward") and nhwc.native_beats_converting(p, "grad_weight")
    assert not nhwc.native_beats_converting(p, "forward", nchw=True)
    calls = []
    real = nhwc._few_forward
    monkeypatch.setattr(nhwc, "_few_forward", lambda *a: calls.append(1) or real(*a))
    fastconv.conv2d(_cl(x), w, b, **kw)
    assert calls


FEW_GW_CASES = [  # grad_weight on the few-channel kernel: any input channels, output channels off the NR panels
    ("c16-k20", (2, 16, 18, 17), (20, 16, 3, 3), {"padding": 1}),
    ("c24-k40-s2", (3, 24, 35, 34), (40, 24, 3, 3), {"stride": 2, "padding": 1}),
    ("c9-k20-dilated", (2, 9, 20, 21), (20, 9, 3, 2), {"dilation": (2, 1), "padding": (2, 0)}),
    ("c5-k6-5x5", (2, 5, 20, 20), (6, 5, 5, 5), {"padding": 2}),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", FEW_GW_CASES, ids=[c[0] for c in FEW_GW_CASES])
def test_few_channel_grad_weight_of_wider_layers(case, dtype, monkeypatch):
    # the rule takes them (rows of at least FEW_GW_MIN_COLS, not a 1x1 product, no whole panels) and
    # they match the reference and the GEMM panels' result through the native pass and the public op
    x, w, b, gy, kw = _make(case, dtype)
    p = _params(x, w, kw)
    assert nhwc.few_grad_weight(p) and not nhwc.few_channels(p)
    calls = []
    real = nhwc._few_grad_weight
    monkeypatch.setattr(nhwc, "_few_grad_weight", lambda *a: calls.append(1) or real(*a))
    want = _reference(x, w, b, gy, kw)["grad_weight"]
    got = nhwc.grad_weight(nhwc.to_nhwc(gy), nhwc.to_nhwc(x), p)
    assert calls == [1]
    assert_results({"grad_weight": got}, {"grad_weight": want}, dtype, scale=4.0)
    gw, _ = fastconv.conv2d_grad_weight(_cl(gy), _cl(x), w, **kw)
    assert_results({"grad_weight": gw}, {"grad_weight": want}, dtype, scale=4.0)
    monkeypatch.setattr(nhwc, "FEW_GW_MIN_COLS", 10**6)  # the panels instead
    assert not nhwc.few_grad_weight(p)
    assert_results({"grad_weight": nhwc.grad_weight(nhwc.to_nhwc(gy), nhwc.to_nhwc(x), p)}, {"grad_weight": want},
                   dtype, scale=4.0)


def test_few_grad_weight_rule():
    def p_(xs, ws, **kw):
        return conv_params("t", xs, ws, np.dtype(np.float32), kw.get("stride", 1), kw.get("padding", 0), 1, 1, None)
    nr = G.tile(4)[1]
    assert nhwc.few_grad_weight(p_((32, 16, 28, 28), (16, 16, 3, 3), padding=1))
    assert not nhwc.few_grad_weight(p_((32, 16, 28, 28), (nr, 16, 3, 3), padding=1))      # whole panels
    assert not nhwc.few_grad_weight(p_((32, 16, 7, 7), (16, 16, 3, 3), padding=1))        # short rows
    assert not nhwc.few_grad_weight(p_((16, 16, 48, 48), (24, 16, 1, 1)))                 # a 1x1 product
    assert not nhwc.few_grad_weight(p_((2, 16, 20, 20), (8 * G.VBYTES + 8, 16, 3, 3)))    # too many channels


@pytest.mark.boundscheck
def test_few_channel_grad_weight_of_wider_layers_bounds_and_threads():
    _assert_same_bits_for_thread_counts(FEW_GW_CASES[1])


def test_few_channel_scratch_counts_against_the_budget():
    # the padded copy and sums count in nhwc.need: a budget below them refuses the native passes,
    # and 'auto' converts instead (same results)
    x, w, b, gy, kw = _make(FEW_CASES[0], np.float32)
    p = _params(x, w, kw)
    for pass_ in ("forward", "grad_weight"):
        need = nhwc.need(p, pass_)
        assert need >= p.n * (p.h + 2) * p.w * p.c * p.itemsize
        small = conv_params("conv2d", x.shape, w.shape, x.dtype, 2, 1, 1, 1, workspace_limit=need - 1)
        assert "workspace" in nhwc.supports(small, pass_)
    y = fastconv.conv2d(_cl(x), w, b, workspace_limit=4096, **kw)
    assert_results({"forward": y}, {"forward": _reference(x, w, b, gy, kw)["forward"]}, np.float32, scale=4.0)
