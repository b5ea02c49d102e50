"""The fused Winograd passes (fastconv._algorithms.winograd_fused): the emitted matrices are
winograd's; forward and grad_weight against the float64 reference for every block size (block
boundaries, partial tiles, groups, channel remainders); U's panels against a NumPy transform;
grad_input's flipped kernel read in place; the forward independent of the thread count, grad_weight
reproducible per thread count; refusals of small budgets.  (Accuracy against im2col's error and
the NaN spread on the shared geometry cases are in test_winograd.py, which runs every kernel.)"""
import numba
import numpy as np
import pytest

import reference as ref
from fastconv._algorithms import _winograd_fused_kernels as K
from fastconv._algorithms import gemm as G
from fastconv._algorithms import nhwc
from fastconv._algorithms import winograd as W
from fastconv._algorithms import winograd_fused as WF
from fastconv._validation import conv_params


def _problem(xs, k, groups=1, padding=1, dtype=np.float64, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(xs).astype(dtype)
    w = rng.standard_normal((k, xs[1] // groups, 3, 3)).astype(dtype)
    b = rng.standard_normal(k).astype(dtype)
    p = conv_params("conv2d", xs, w.shape, np.dtype(dtype), 1, padding, 1, groups)
    return x, w, b, p


def test_the_emitted_matrices_are_winograds():
    for m in W.TILES:
        np.testing.assert_array_equal(np.array(K.BT[m], float), W._BT[m])
        np.testing.assert_array_equal(np.array(K.AT[m], float), W._AT[m])


@pytest.mark.parametrize("m", W.TILES)
@pytest.mark.parametrize("xs, k, groups, padding", [
    ((3, 5, 11, 13), 7, 1, 1),      # partial tiles at the bottom and right, channels below a vector
    ((2, 20, 9, 6), 34, 2, 0),      # groups; output channels past one NR panel
    ((1, 3, 5, 5), 2, 1, 2),        # every tile touches the padding
    ((2, 33, 8, 9), 17, 1, 1),      # a whole vector of channels plus a remainder
])
def test_every_block_size_matches_the_reference(xs, k, groups, padding, m):
    x, w, b, p = _problem(xs, k, groups, padding)
    want = ref.conv2d(x, w, b, padding=padding, groups=groups)
    xh = nhwc.to_nhwc(x)
    mr, _ = G.tile(8)
    total = WF.WN.tiles(p, m)[2]
    for tb in sorted({mr, 2 * mr, -(-total // mr) * mr}):
        got = WF.forward(xh, w, b, p, m, tb).transpose(0, 3, 1, 2)
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10 * np.abs(want).max())


_NCHW_CASES = [
    ((3, 5, 11, 13), 7, 1, 1, np.float64),    # partial tiles, channels below a 32-byte vector
    ((2, 20, 9, 6), 34, 2, 0, np.float32),    # groups; rows shorter than a vector
    ((1, 3, 5, 5), 2, 1, 2, np.float32),      # every tile touches the padding
    ((2, 17, 19, 24), 9, 1, (0, 3), np.float32),  # whole 8 x 8 blocks plus remainders, uneven padding
    ((2, 16, 16, 16), 16, 1, 1, np.float64),  # whole 4 x 4 float64 blocks only
    ((1, 9, 10, 12), 8, 1, (3, 2), np.float32),  # grad_input's padding negative on both axes
]


@pytest.mark.parametrize("m", W.TILES)
@pytest.mark.parametrize("xs, k, groups, padding, dtype", _NCHW_CASES)
def test_nchw_staging_gives_the_nhwc_kernels_results_bit_for_bit(xs, k, groups, padding, dtype, m):
    # the same transforms and products on rows staged from NCHW: forward, grad_input's flipped
    # kernel and grad_weight equal the NHWC kernels' exactly, for several block sizes
    x, w, b, p = _problem(xs, k, groups, padding, dtype)
    mr, _ = G.tile(p.itemsize)
    total = WF.WN.tiles(p, m)[2]
    gy = np.random.default_rng(1).standard_normal((p.n, p.k, p.oh, p.ow)).astype(dtype)
    q = W._transposed(p)
    for tb in sorted({mr, 3 * mr, -(-total // mr) * mr}):
        want = WF.forward(nhwc.to_nhwc(x), w, b, p, m, tb).transpose(0, 3, 1, 2)
        got = WF.forward(x, w, b, p, m, tb, nchw=True)
        assert got.shape == (p.n, p.k, p.oh, p.ow) and got.flags.c_contiguous
        np.testing.assert_array_equal(got, want)
        want = WF.forward(nhwc.to_nhwc(gy), w, None, q, m, tb, flip=True).transpose(0, 3, 1, 2)
        np.testing.assert_array_equal(WF.forward(gy, w, None, q, m, tb, flip=True, nchw=True), want)
        want = WF.grad_weight(nhwc.to_nhwc(gy), nhwc.to_nhwc(x), p, m, tb)
        np.testing.assert_array_equal(WF.grad_weight(gy, x, p, m, tb, nchw=True), want)
    want = ref.conv2d(x, w, b, padding=padding, groups=groups)  # and it is the convolution
    tol = 1e-10 if dtype == np.float64 else 1e-4
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol * np.abs(want).max())


def test_nchw_callers_run_the_staged_kernels_without_layout_copies(monkeypatch):
    # an NCHW caller's fused passes never convert whole arrays (to_nhwc / to_nchw)
    x, w, b, p = _problem((2, 16, 12, 12), 16, dtype=np.float32)
    gy = np.random.default_rng(1).standard_normal((2, 16, 12, 12)).astype(np.float32)
    calls = []
    monkeypatch.setattr(W._nhwc, "to_nhwc", lambda *a, **k: calls.append("to_nhwc"))
    monkeypatch.setattr(W._nhwc, "to_nchw", lambda *a, **k: calls.append("to_nchw"))
    y = W.forward(x, w, b, p, 4, fused=True)
    gx = W.grad_input(gy, w, p, 4, fused=True)
    gw = W.grad_weight(gy, x, p, 2, fused=True)
    assert calls == []
    np.testing.assert_allclose(y, ref.conv2d(x, w, b, padding=1), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(gx, ref.conv2d_grad_input(gy, x.shape, w, padding=1), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(gw, ref.conv2d_grad_weight(gy, x, w.shape, padding=1), rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("m", W.TILES)
def test_u_panels_are_g_w_gt_in_float64(m):
    x, w, b, p = _problem((1, 5, 6, 6), 37, dtype=np.float32)
    _, nr = G.tile(4)
    pu, npan = WF.pack_u(w, p, m)
    gm = W._G[m]
    u = np.einsum("ir,kcrs,js->kcij", gm, w.astype(np.float64), gm)  # (k, c, a, a)
    a = m + 2
    want = np.zeros((1, a * a, npan * nr, p.cg))
    want[0, :, :p.k, :] = u.reshape(p.k, p.cg, a * a).transpose(2, 0, 1)
    want = want.reshape(1, a * a, npan, nr, p.cg).transpose(0, 1, 2, 4, 3)
    np.testing.assert_allclose(pu.reshape(want.shape), want.astype(np.float32), rtol=1e-6, atol=1e-6)


def test_grad_input_reads_the_layers_kernel_flipped():
    x, w, b, p = _problem((2, 6, 10, 7), 10, groups=2)
    gy = np.random.default_rng(1).standard_normal((2, 10, p.oh, p.ow))
    q = W._transposed(p)
    flipped = np.ascontiguousarray(W._flipped(w, q))
    gyh = nhwc.to_nhwc(gy)
    for m in W.TILES:
        tb = WF.plan(q, m, numba.get_num_threads())[0]
        got = WF.forward(gyh, w, None, q, m, tb, flip=True)
        np.testing.assert_array_equal(got, WF.forward(gyh, flipped, None, q, m, tb))
        want = ref.conv2d_grad_input(gy, x.shape, w, padding=1, groups=2)
        np.testing.assert_allclose(got.transpose(0, 3, 1, 2), want, rtol=1e-10, atol=1e-10)


def test_results_do_not_depend_on_the_thread_count():
    x, w, b, p = _problem((4, 24, 20, 20), 40, dtype=np.float32)
    xh = nhwc.to_nhwc(x)
    prev = numba.get_num_threads()
    try:
        outs = []
        for t in sorted({1, prev}):
            numba.set_num_threads(t)
            outs.append(WF.forward(xh, w, b, p, 4, 28))
    finally:
        numba.set_num_threads(prev)
    np.testing.assert_array_equal(outs[0], outs[-1])


def test_a_budget_below_one_block_is_refused_with_the_need():
    _, _, _, p = _problem((2, 8, 8, 8), 8)
    import dataclasses
    reason = WF.plan(dataclasses.replace(p, workspace_limit=1000), 4, 2)
    assert isinstance(reason, str) and "workspace_limit is 1000" in reason and "bytes of workspace" in reason
    tb, words, fixed = WF.plan(p, 4, 2)
    mr, _ = G.tile(8)
    assert tb % mr == 0 and fixed + 2 * words * 8 <= p.workspace_limit


@pytest.mark.parametrize("n", [1, 15, 16, 3584, 7168, 4096 * 3])
@pytest.mark.parametrize("itemsize", [4, 8])
def test_element_strides_hold_the_rows_and_avoid_4k_multiples(n, itemsize):
    # successive elements' rows an odd number of cache lines apart: never a multiple of 4 KiB
    # (the same L1 sets), never shorter than the rows they hold
    s = WF.stride(n, itemsize)
    assert s >= n and s * itemsize % 64 == 0 and (s * itemsize // 64) % 2 == 1
    assert all(e * s * itemsize % 4096 for e in range(1, 36) if e % 64)
    assert s * itemsize - n * itemsize < 128


def test_the_model_prefers_it_where_it_measured_faster():
    # measured (Xeon, 2 threads, float32, NCHW caller, conversions included): 4x64x32x32 fused
    # 0.70 ms, packed 1.31; 32x32x14x14 fused 0.51, packed 1.13
    for xs, k in (((4, 64, 32, 32), 64), ((32, 32, 14, 14), 32)):
        p = conv_params("conv2d", xs, (k, xs[1], 3, 3), np.dtype(np.float32), 1, 1, 1, 1)
        assert W._cached_plan(p, "forward").fused


@pytest.mark.parametrize("m", W.TILES)
@pytest.mark.parametrize("xs, k, groups, padding", [
    ((3, 5, 11, 13), 7, 1, 1),
    ((2, 20, 9, 6), 34, 2, 0),
    ((1, 3, 5, 5), 2, 1, 2),
    ((2, 33, 8, 9), 40, 1, 1),      # sums wider than one NR panel of input channels plus a remainder
])
def test_grad_weight_matches_the_reference_for_every_block_size(xs, k, groups, padding, m):
    x, w, b, p = _problem(xs, k, groups, padding)
    gy = np.random.default_rng(2).standard_normal((xs[0], k, p.oh, p.ow))
    want = ref.conv2d_grad_weight(gy, x, w.shape, padding=padding, groups=groups)
    xh, gyh = nhwc.to_nhwc(x), nhwc.to_nhwc(gy)
    mr, _ = G.tile(8)
    total = WF.WN.tiles(p, m)[2]
    for tb in sorted({mr, 2 * mr, -(-total // mr) * mr}):
        got = WF.grad_weight(gyh, xh, p, m, tb)
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10 * np.abs(want).max())


def test_grad_weight_is_reproducible_per_thread_count_and_close_across():
    # fixed shares of the tile blocks per worker, sums added in worker order: the same bits on every
    # call with a thread count; another count adds in another order (float32 rounding only)
    x, w, b, p = _problem((4, 24, 20, 20), 40, dtype=np.float32)
    gy = np.random.default_rng(3).standard_normal((4, 40, 20, 20)).astype(np.float32)
    xh, gyh = nhwc.to_nhwc(x), nhwc.to_nhwc(gy)
    prev = numba.get_num_threads()
    try:
        outs = []
        for t in sorted({1, prev}):
            numba.set_num_threads(t)
            first = WF.grad_weight(gyh, xh, p, 2, 28)
            assert np.array_equal(WF.grad_weight(gyh, xh, p, 2, 28), first)
            outs.append(first)
    finally:
        numba.set_num_threads(prev)
    np.testing.assert_allclose(outs[0], outs[-1], rtol=1e-5, atol=1e-5 * np.abs(outs[0]).max())


def test_grad_weight_budget_refusal_names_the_need():
    _, _, _, p = _problem((2, 8, 8, 8), 8)
    import dataclasses
    reason = WF.gw_plan(dataclasses.replace(p, workspace_limit=1000), 2, 2)
    assert isinstance(reason, str) and "workspace_limit is 1000" in reason and "sums per worker" in reason


@pytest.mark.parametrize("k", [16, 5])
def test_the_thin_tile_serves_narrow_float32_products(k):
    # up to 16 output channels (forward) / input channels (grad_weight): on AVX-512 the products run
    # on the 16 x 16 tile; every block size and edge still matches the reference within float32
    x, w, b, p = _problem((3, k, 13, 18), k, dtype=np.float32)
    assert WF.thin(p) == WF.thin(p, "grad_weight") == (G.ISA == "avx512")
    gy = np.random.default_rng(4).standard_normal((3, k, p.oh, p.ow)).astype(np.float32)
    x64, w64, gy64 = (a.astype(np.float64) for a in (x, w, gy))
    want_y = ref.conv2d(x64, w64, b.astype(np.float64), padding=1)
    want_gw = ref.conv2d_grad_weight(gy64, x64, w.shape, padding=1)
    xh, gyh = nhwc.to_nhwc(x), nhwc.to_nhwc(gy)
    for m in W.TILES:
        total = WF.WN.tiles(p, m)[2]
        for tb in sorted({16, 32, -(-total // 16) * 16}):
            y = WF.forward(xh, w, b, p, m, tb).transpose(0, 3, 1, 2)
            np.testing.assert_allclose(y, want_y, rtol=1e-4, atol=1e-4 * np.abs(want_y).max())
            gw = WF.grad_weight(gyh, xh, p, m, tb)
            np.testing.assert_allclose(gw, want_gw, rtol=1e-4, atol=1e-4 * np.abs(want_gw).max())


def test_dilated_channels_last_layers_keep_the_nhwc_gemm_rule(monkeypatch):
    # Winograd has no NHWC kernel for dilated layers: where 'auto' picks it for one and the AVX-512
    # rule prefers the NHWC GEMM to converting, a channels_last call still runs the NHWC GEMM
    import fastconv
    from fastconv import _select
    x, w, b, p = _problem((2, 64, 64, 64), 64, padding=2, dtype=np.float32)
    p = conv_params("conv2d", x.shape, w.shape, np.dtype(np.float32), 1, 2, 2, 1)
    if not (nhwc.native_beats_converting(p, "forward") and _select.select("t", "auto", p, "forward",
                                                                           numba.get_num_threads()).name == "winograd"):
        pytest.skip("the rule or the pick differs on this CPU")
    calls = []
    monkeypatch.setattr(nhwc, "forward", lambda *a, _f=nhwc.forward: calls.append(1) or _f(*a))
    xc = np.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    y = fastconv.conv2d(xc, w, b, padding=2, dilation=2)
    assert calls and nhwc.is_channels_last(y)
    want = ref.conv2d(x.astype(np.float64), w.astype(np.float64), b.astype(np.float64), padding=2, dilation=2)
    np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
