"""The implicit-GEMM algorithm ('gemm'): its own tiling paths against the reference -- edge tiles
(output channels not a multiple of MR, positions not a multiple of NR), staged small planes,
weights split by rows, in-place and padded sources, grad_input's transposed forward and col2im
paths -- in float32 and float64, and its refusal of budgets it cannot work in.  The shared
geometries run in tests/test_conv.py through the registry."""
import numpy as np
import pytest

import fastconv
import reference as ref
from conftest import DTYPES, assert_results, random_array
from fastconv._algorithms import gemm as G
from fastconv._algorithms import implicit
from fastconv._validation import conv_params

MR, NR = G.tile(4)

# (id, x shape, weight shape, keyword arguments)
CASES = [
    # k not a multiple of MR, 37-wide rows: partial row panels and panels crossing output rows
    ("edge-tiles", (2, 5, 13, 37), (MR + 3, 5, 3, 3), {"padding": 1}),
    # > 256 positions: written in place; odd kernel, asymmetric stride and padding, dilation
    ("in-place-odd", (1, 3, 23, 29), (5, 3, 2, 5), {"stride": (1, 2), "padding": (0, 2), "dilation": (2, 1)}),
    ("stride3-prime", (3, 7, 31, 29), (11, 7, 3, 3), {"stride": 3, "padding": 1}),
    # small planes: positions of several images in one item, through staging
    ("staged", (9, 6, 7, 7), (16, 6, 3, 3), {"padding": 1}),
    ("staged-groups-stride", (8, 4, 8, 8), (6, 2, 3, 3), {"stride": 2, "padding": 1, "groups": 2}),
    ("groups-dilated", (2, 6, 20, 18), (9, 2, 3, 3), {"groups": 3, "dilation": 2, "padding": 2}),
    # 1x1 without padding: the input's planes are read in place and gathered as one run per tap
    ("1x1", (2, 16, 19, 17), (MR + 1, 16, 1, 1), {}),
    # ... with more channels per group than kc, taken as one block (implicit._forward_blk), partial
    # row panels, an edge panel of 16 positions
    ("1x1-in-place-kc-groups", (2, 2 * (int(G.blocking(np.float32)[0]) + 5), 16, 19),
     (2 * (MR + 2), int(G.blocking(np.float32)[0]) + 5, 1, 1), {"groups": 2}),
    ("1x1-stride2", (2, 4, 17, 18), (3, 4, 1, 1), {"stride": 2}),
    ("kernel-eq-input", (2, 2, 4, 5), (3, 2, 4, 5), {}),
    # two kc blocks of taps (225 for float32, kc 192): the forward runs panel by panel through both
    ("two-kc-blocks", (2, 25, 9, 10), (MR + 2, 25, 3, 3), {"padding": 1}),
    ("C1-N1", (1, 1, 17, 40), (2, 1, 5, 5), {"padding": "same"}),
    # a little more than one kc block of taps: taken as one block (implicit._forward_blk)
    ("one-long-block", (2, -(-(int(G.blocking(np.float32)[0]) + 1) // 9), 8, 11), (MR + 1,
     -(-(int(G.blocking(np.float32)[0]) + 1) // 9), 3, 3), {"padding": 1}),
]
IDS = [c[0] for c in CASES]


def _make(case, dtype, seed=0):
    _, xs, ws, kw = case
    rng = np.random.default_rng(seed)
    x, w, b = random_array(rng, xs, dtype), random_array(rng, ws, dtype), random_array(rng, ws[0], dtype)
    gy = random_array(rng, ref.conv2d(np.zeros(xs), np.zeros(ws), **kw).shape, dtype)
    return x, w, b, gy, kw


def _results(x, w, b, gy, kw, **extra):
    g = fastconv.conv2d_backward(gy, x, w, algorithm="gemm", **kw, **extra)
    return {"forward": fastconv.conv2d(x, w, b, algorithm="gemm", **kw, **extra),
            "grad_input": g.grad_input, "grad_weight": g.grad_weight}


def _reference(x, w, b, gy, kw):
    x64, w64, gy64 = (a.astype(np.float64) for a in (x, w, gy))
    return {"forward": ref.conv2d(x64, w64, b.astype(np.float64), **kw),
            "grad_input": ref.conv2d_grad_input(gy64, x.shape, w64, **kw),
            "grad_weight": ref.conv2d_grad_weight(gy64, x64, w.shape, **kw)}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_against_reference(case, dtype):
    x, w, b, gy, kw = _make(case, dtype)
    assert_results(_results(x, w, b, gy, kw), _reference(x, w, b, gy, kw), dtype, scale=4.0)


def test_unpadded_unit_stride_1x1_layers_take_their_channels_in_one_block():
    by_id = {c[0]: c for c in CASES}
    for name, want in (("1x1", True), ("1x1-in-place-kc-groups", True), ("1x1-stride2", False), ("edge-tiles", False)):
        _, xs, ws, kw = case = by_id[name]
        p = conv_params("t", xs, ws, np.float32, kw.get("stride", 1), kw.get("padding", 0), 1, kw.get("groups", 1))
        assert implicit._pointwise_in_place(p) is want, case[0]
        if want:
            assert implicit._forward_blk(p)[0] == max(int(G.blocking(np.float32)[0]), min(512, p.cg)), case[0]


def test_a_block_of_taps_a_little_longer_than_kc_is_not_split():
    kc = int(G.blocking(np.float32)[0])
    case = next(c for c in CASES if c[0] == "one-long-block")
    p = conv_params("t", case[1], case[2], np.float32, 1, 1, 1, 1)
    tn = p.cg * p.r * p.s
    assert kc < tn <= kc * 5 // 4
    assert implicit._forward_blk(p)[0] == tn
    wide = conv_params("t", (1, 64, 8, 8), (8, 64, 3, 3), np.float32, 1, 1, 1, 1)  # 576 taps: kc blocks
    assert implicit._forward_blk(wide)[0] == kc


@pytest.mark.parametrize("dtype", DTYPES)
def test_weights_split_by_rows(dtype):
    # weights too large for half of L2 and few positions: items split the weights' rows
    x, w, b, gy, kw = _make(("rows", (2, 64, 5, 5), (300, 64, 3, 3), {"padding": 1}), dtype)
    p = conv_params("conv2d", x.shape, w.shape, dtype, 1, 1, 1, 1)
    _, mblk, staged, *_ = implicit._forward_plan(p, 2)
    if G.packed_a_size(dtype, 300, 576) * np.dtype(dtype).itemsize > implicit._l2() // 2:
        assert staged and mblk < 300
    y = fastconv.conv2d(x, w, b, algorithm="gemm", **kw)
    want = ref.conv2d(x.astype(np.float64), w.astype(np.float64), b.astype(np.float64), **kw)
    assert_results({"forward": y}, {"forward": want}, dtype, scale=8.0)


def test_grad_input_paths_agree():
    # stride 1 runs the transposed forward; a non-finite weight forces the col2im scatter
    x, w, b, gy, kw = _make(("gi", (2, 8, 12, 11), (5, 8, 3, 3), {"padding": 1}), np.float64)
    p = conv_params("conv2d", x.shape, w.shape, np.float64, 1, 1, 1, 1)
    assert implicit._use_transposed(p) is not None
    a = implicit.grad_input(gy, w, p)
    b_ = implicit._grad_input_col2im(gy, w, p)
    np.testing.assert_allclose(a, b_, rtol=1e-12, atol=1e-12)
    w2 = w.copy()
    w2[0, 0, 0, 0] = np.inf
    gi = implicit.grad_input(gy, w2, p)
    want = ref.conv2d_grad_input(gy, x.shape, w2, padding=1)
    np.testing.assert_array_equal(np.isnan(gi), np.isnan(want))


def test_thread_counts_give_the_same_bits():
    import numba
    x, w, b, gy, kw = _make(("t", (3, 6, 21, 19), (17, 6, 3, 3), {"padding": 1, "stride": (1, 2)}), np.float32)
    prev = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        one = _results(x, w, b, gy, kw)
        numba.set_num_threads(min(2, numba.config.NUMBA_NUM_THREADS))
        two = _results(x, w, b, gy, kw)
    finally:
        numba.set_num_threads(prev)
    for name in one:
        np.testing.assert_array_equal(one[name], two[name], err_msg=name)


@pytest.mark.parametrize("pass_", ["forward", "grad_input", "grad_weight"])
def test_workspace_limit(pass_):
    xs, ws, kw = (2, 4, 9, 9), (5, 4, 3, 3), {"stride": 2, "padding": 1}
    p = conv_params("conv2d", xs, ws, np.float32, 2, 1, 1, 1)
    need = implicit._need(p, pass_, 1)
    assert need > 0
    small = conv_params("conv2d", xs, ws, np.float32, 2, 1, 1, 1, workspace_limit=need - 1)
    reason = implicit.supports(small, pass_)
    assert reason is not None and "workspace_limit" in reason and str(need) in reason
    assert implicit.cost(small, pass_, 1) == float("inf")
    x, w, b, gy, _ = _make(("w", xs, ws, kw), np.float32)
    with pytest.raises(fastconv.AlgorithmUnavailable, match="workspace"):
        if pass_ == "forward":
            fastconv.conv2d(x, w, b, algorithm="gemm", workspace_limit=need - 1, **kw)
        else:
            fastconv.conv2d_backward(gy, x, w, algorithm="gemm", workspace_limit=need - 1, **kw)
    # at the bound it computes
    exact = _results(x, w, b, gy, kw, workspace_limit=max(implicit._need(p, q, 1) for q in
                                                          ("forward", "grad_input", "grad_weight")))
    assert_results(exact, _reference(x, w, b, gy, kw), np.float32)


def test_cost_is_finite_and_grows_with_work():
    small = conv_params("conv2d", (2, 16, 28, 28), (32, 16, 3, 3), np.float32, 1, 1, 1, 1)
    big = conv_params("conv2d", (8, 16, 28, 28), (32, 16, 3, 3), np.float32, 1, 1, 1, 1)
    for pass_ in ("forward", "grad_input", "grad_weight"):
        assert 0 < implicit.cost(small, pass_, 2) < implicit.cost(big, pass_, 2) < float("inf")
        assert implicit.cost(big, pass_, 2) < implicit.cost(big, pass_, 1)


def _packed_reference(a, mr, kc):
    """pack_a_all's layout of A (m x k), built in NumPy: per kc block, MR-row panels, each panel
    column by column (``pa[pc*mp + i0*kb + p*mr + ii] = A[i0 + ii, pc + p]``), rows past m zero."""
    m, k = a.shape
    mp = -(-m // mr) * mr
    out = np.zeros(mp * k, a.dtype)
    ap = np.zeros((mp, k), a.dtype)
    ap[:m] = a
    for pc in range(0, k, kc):
        kb = min(kc, k - pc)
        for i0 in range(0, mp, mr):
            out[pc * mp + i0 * kb: pc * mp + (i0 + mr) * kb] = ap[i0:i0 + mr, pc:pc + kb].T.reshape(-1)
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("transposed", [False, True], ids=["rows", "transposed"])
def test_pack_weights_matches_the_packed_layout(dtype, transposed):
    # several matrices of different row counts (col2im's channel blocks), k over two kc blocks with a
    # partial one, row counts off the MR grid: every (matrix, kc block, panel) item of the kernel
    from fastconv._algorithms import _implicit_kernels as K
    mr = G.tile(np.dtype(dtype).itemsize)[0]
    kc = 8
    blk = np.array([kc, 64, 64], np.int64)
    rng = np.random.default_rng(3)
    kdim, full = 19, 2 * mr + 5
    w = rng.standard_normal(3 * full * kdim).astype(dtype)
    rows = np.array([full, mr - 1, 1], np.int64)
    aoffs = np.array([0, full * kdim, 2 * full * kdim], np.int64)
    pasz = G.packed_a_size(dtype, full, kdim)
    pa = np.full((3, pasz), np.nan, dtype)
    if transposed:  # A[t, q] = w[aoff + t + q*full]: rows of a transposed (kdim x full) block
        K.pack_weights(w, pa, aoffs, rows, kdim, 1, full, blk)
    else:
        K.pack_weights(w, pa, aoffs, rows, kdim, kdim, 1, blk)
    for i in range(3):
        block = w[aoffs[i]:aoffs[i] + full * kdim]
        a = block.reshape(kdim, full).T[:rows[i]] if transposed else block.reshape(full, kdim)[:rows[i]]
        want = _packed_reference(a, mr, kc)
        np.testing.assert_array_equal(pa[i, :want.size], want)


@pytest.mark.parametrize("dtype", DTYPES)
def test_pack_weights_flipped_is_the_transposed_kernel_packed(dtype):
    # grad_input's kernel packed straight from the layer's weights: the same bits as flipping and
    # channel-swapping with common.transposed_weight and packing that; two groups, taps over two kc
    # blocks with a partial one, a row count off the MR grid; an inf flags only its own panels
    from fastconv._algorithms import _implicit_kernels as K
    from fastconv._algorithms.common import transposed_weight
    mr = G.tile(np.dtype(dtype).itemsize)[0]
    kc = 8
    blk = np.array([kc, 64, 64], np.int64)
    g, kgo, cgo, r, s = 2, 3, mr + 2, 2, 3  # the layer: (g*kgo, cgo, r, s)
    w = np.random.default_rng(4).standard_normal((g * kgo, cgo, r, s)).astype(dtype)
    tn = kgo * r * s  # the transposed convolution's taps per output row
    pasz = G.packed_a_size(dtype, cgo, tn)
    items = g * -(-tn // kc) * -(-cgo // mr)
    pa = np.full((g, pasz), np.nan, dtype)
    bad = np.full(items, -1, np.int64)
    K.pack_weights_flipped(w.reshape(-1), pa, kgo, cgo, r * s, blk, bad)
    wt = transposed_weight(w, g).reshape(g, cgo, tn)
    for gi in range(g):
        want = _packed_reference(wt[gi], mr, kc)
        np.testing.assert_array_equal(pa[gi, :want.size], want)
    assert not bad.any()
    w[kgo + 1, mr + 1, 0, 2] = np.inf  # group 1, second row panel, tap (1, 2, 0, 0) of column 1*6 + 3
    K.pack_weights_flipped(w.reshape(-1), pa, kgo, cgo, r * s, blk, bad)
    npan = -(-cgo // mr)
    flagged = np.flatnonzero(bad)
    assert flagged.tolist() == [(1 * -(-tn // kc) + (1 * r * s + 3) // kc) * npan + 1]
