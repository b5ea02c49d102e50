"""The Winograd passes by output-channel panels (fastconv._algorithms.winograd_kpanel): the emitted
G is winograd's; the forward and grad_weight against the float64 reference across blocks of
channels, tile panels per item, partial panels of output channels and tiles, groups and paddings;
NCHW and channels_last arrays read in place and both output layouts; grad_input's flipped kernel
read in place; U's float32 transform against a float64 one; results independent of the thread
count; the plans chosen for the small planes they are for.  (Accuracy against im2col's error and the NaN spread
on the shared geometry cases are in test_winograd.py, which runs every kernel.)"""
import numba
import numpy as np
import pytest

import reference as ref
from fastconv._algorithms import _winograd_kpanel_kernels as K
from fastconv._algorithms import gemm as G
from fastconv._algorithms import nhwc
from fastconv._algorithms import winograd as W
from fastconv._algorithms import winograd_kpanel as WK
from fastconv._validation import conv_params
from test_winograd_fused import _problem


def test_the_emitted_g_is_winograds():
    for m in W.TILES:
        np.testing.assert_array_equal(np.array(K.G[m], float), W._G[m])


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of U of one vector of channels and items of one tile panel: small cases then cross
    every block boundary."""
    monkeypatch.setattr(WK, "_U_BYTES", 1)
    monkeypatch.setattr(WK, "_M_BYTES", 1)
    monkeypatch.setattr(WK, "_IN_BYTES", 1)


@pytest.mark.boundscheck
@pytest.mark.parametrize("m", W.TILES)
@pytest.mark.parametrize("xs, k, groups, padding", [
    ((3, 5, 11, 13), 7, 1, 1),      # partial tiles at the bottom and right, channels below a vector
    ((2, 20, 9, 6), 34, 2, 0),      # groups; output channels past one MR panel
    ((1, 3, 5, 5), 2, 1, 2),        # every tile touches the padding
    ((2, 37, 8, 9), 17, 1, 1),      # channels past two vectors (blocks of U), a remainder
    ((9, 4, 7, 7), 5, 1, 1),        # 144 tiles: several NR panels and a partial last one
])
@pytest.mark.parametrize("blocks", ["planned", "small"])
def test_forward_matches_the_reference(xs, k, groups, padding, m, blocks, request):
    if blocks == "small":
        request.getfixturevalue("small_blocks")
    x, w, b, p = _problem(xs, k, groups, padding)
    want = ref.conv2d(x, w, b, padding=padding, groups=groups)
    tpc = WK.plan(p, m, numba.get_num_threads())[0]
    got = WK.forward(x, w, b, p, m, tpc)
    assert got.shape == want.shape and got.flags.c_contiguous
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10 * np.abs(want).max())
    got = WK.forward(x, w, None, p, m, tpc)
    np.testing.assert_allclose(got, want - b[None, :, None, None], rtol=1e-10, atol=1e-10 * np.abs(want).max())


@pytest.mark.boundscheck
@pytest.mark.parametrize("m", W.TILES)
@pytest.mark.parametrize("xs, k, groups, padding", [
    ((3, 5, 11, 13), 7, 1, 1),      # partial tiles, channels below a panel
    ((2, 20, 9, 6), 34, 2, 0),      # groups; output channels past one MR panel
    ((1, 3, 5, 5), 2, 1, 2),        # every tile touches the padding
    ((2, 37, 8, 9), 17, 1, (0, 2)),  # input channels past an NR panel; uneven padding
    ((9, 4, 7, 7), 5, 1, 1),        # several NR tile panels and a partial last one
])
@pytest.mark.parametrize("blocks", ["planned", "small"])
def test_grad_weight_matches_the_reference(xs, k, groups, padding, m, blocks, request):
    if blocks == "small":
        request.getfixturevalue("small_blocks")
    x, w, b, p = _problem(xs, k, groups, padding)
    gy = np.random.default_rng(1).standard_normal((p.n, p.k, p.oh, p.ow))
    want = ref.conv2d_grad_weight(gy, x, w.shape, padding=padding, groups=groups)
    got = WK.grad_weight(gy, x, p, m, WK.gw_plan(p, m, numba.get_num_threads())[0])
    assert got.shape == want.shape and got.flags.c_contiguous
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10 * np.abs(want).max())


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_grad_weight_reads_either_layout_in_place(dtype):
    x, w, b, p = _problem((3, 24, 10, 9), 20, dtype=dtype)
    gy = np.random.default_rng(1).standard_normal((p.n, p.k, p.oh, p.ow)).astype(dtype)
    cb = WK.gw_plan(p, 4, numba.get_num_threads())[0]
    want = WK.grad_weight(gy, x, p, 4, cb)
    xh, gyh = nhwc.to_nhwc(x), nhwc.to_nhwc(gy)
    np.testing.assert_array_equal(WK.grad_weight(nhwc.channels_last_view(gyh), x, p, 4, cb), want)
    np.testing.assert_array_equal(WK.grad_weight_nhwc(gyh, xh, p, 4, cb), want)
    tol = 1e-10 if dtype == np.float64 else 1e-4
    ref_gw = ref.conv2d_grad_weight(gy.astype(np.float64), x.astype(np.float64), w.shape, padding=1)
    np.testing.assert_allclose(want, ref_gw, rtol=tol, atol=tol * np.abs(ref_gw).max())


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_channels_last_in_place_and_either_output_layout(dtype):
    x, w, b, p = _problem((3, 24, 10, 9), 20, dtype=dtype)
    tpc = WK.plan(p, 4, numba.get_num_threads())[0]
    want = WK.forward(x, w, b, p, 4, tpc)
    xcl = nhwc.channels_last_view(nhwc.to_nhwc(x))
    assert nhwc.is_channels_last(xcl)
    np.testing.assert_array_equal(WK.forward(xcl, w, b, p, 4, tpc), want)  # same sums, same bits
    yh = WK.forward(xcl, w, b, p, 4, tpc, nhwc_out=True)
    assert yh.shape == (3, 10, 9, 20) and yh.flags.c_contiguous
    np.testing.assert_array_equal(yh.transpose(0, 3, 1, 2), want)
    np.testing.assert_array_equal(WK.forward_nhwc(nhwc.to_nhwc(x), w, b, p, 4, tpc), yh)
    x2 = x[:, :, ::2, :]  # neither layout: copied first
    p2 = conv_params("conv2d", x2.shape, w.shape, np.dtype(dtype), 1, 1, 1, 1)
    np.testing.assert_array_equal(WK.forward(x2, w, b, p2, 4, tpc), WK.forward(np.ascontiguousarray(x2), w, b, p2, 4, tpc))
    tol = 1e-10 if dtype == np.float64 else 1e-4
    np.testing.assert_allclose(want, ref.conv2d(x, w, b, padding=1), rtol=tol, atol=tol * np.abs(want).max())


def test_grad_input_reads_the_layers_kernel_flipped():
    x, w, b, p = _problem((2, 6, 10, 7), 10, groups=2)
    gy = np.random.default_rng(1).standard_normal((2, 10, p.oh, p.ow))
    q = W._transposed(p)
    flipped = np.ascontiguousarray(W._flipped(w, q))
    want = ref.conv2d_grad_input(gy, x.shape, w, padding=1, groups=2)
    for m in W.TILES:
        tpc = WK.plan(q, m, numba.get_num_threads())[0]
        got = WK.forward(gy, w, None, q, m, tpc, flip=True)
        np.testing.assert_array_equal(got, WK.forward(gy, flipped, None, q, m, tpc))
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(W.grad_input(gy, w, p, m=m, kpanel=True), want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("m", W.TILES)
def test_u_vectors_are_g_w_gt(m):
    # one call per vector of channels, with a channel count that ends inside the vector (lanes past
    # it repeat the last channel), non-flipped and flipped taps, against a float64 transform
    lanes = G.VBYTES // 4
    a = m + 2
    rng = np.random.default_rng(3)
    w = rng.standard_normal((2, lanes + 3, 3, 3)).astype(np.float32)
    gm = W._G[m]

    @numba.njit
    def run(w, u, flip, n, ue):
        for c0 in range(0, n, lanes):
            if m == 4:
                K._u_vec4(w, 9 * (n + c0), 9, flip, n - c0, u, c0, ue)
            else:
                K._u_vec2(w, 9 * (n + c0), 9, flip, n - c0, u, c0, ue)

    n = lanes + 3
    ue = 2 * lanes
    for flip in (0, 1):
        u = np.full(a * a * ue, np.nan, np.float32)
        run(w.reshape(-1), u, flip, n, ue)
        g = w[1].astype(np.float64)[:, ::-1, ::-1] if flip else w[1].astype(np.float64)
        want = np.einsum("ir,crs,js->ijc", gm, g, gm).reshape(a * a, n)
        got = u.reshape(a * a, ue)
        np.testing.assert_allclose(got[:, :n], want, rtol=1e-6, atol=1e-6 * np.abs(want).max())
        np.testing.assert_array_equal(got[:, n:2 * lanes], np.repeat(got[:, n - 1:n], 2 * lanes - n, axis=1))


def test_results_do_not_depend_on_the_thread_count():
    x, w, b, p = _problem((4, 24, 9, 9), 40, dtype=np.float32)
    gy = np.random.default_rng(1).standard_normal((p.n, p.k, p.oh, p.ow)).astype(np.float32)
    prev = numba.get_num_threads()
    try:
        outs = []
        for t in sorted({1, prev}):
            numba.set_num_threads(t)
            outs.append((WK.forward(x, w, b, p, 4, 1), WK.grad_weight(gy, x, p, 4, 32)))
    finally:
        numba.set_num_threads(prev)
    for y, gw in outs[1:]:
        np.testing.assert_array_equal(y, outs[0][0])
        np.testing.assert_array_equal(gw, outs[0][1])


def test_small_deep_planes_take_it_and_a_small_budget_refuses():
    # resnet50-3x3-512's 7x7 planes: the weights' transform per panel is what the plan is for
    _, _, _, p = _problem((8, 512, 7, 7), 512, dtype=np.float32)
    fw, gw = W._cached_plan(p, "forward", kpanel=True), W._cached_plan(p, "grad_weight", kpanel=True)
    assert not isinstance(fw, str) and not isinstance(gw, str)
    if G.ISA == "avx512":  # the models were fitted there (Zen 4): forward 10 -> 5.5 ms, grad_weight 9.2 -> 6.2
        assert W._cached_plan(p, "forward").kpanel and W._cached_plan(p, "grad_weight").kpanel
    _, _, _, p = _problem((2, 8, 9, 9), 8, dtype=np.float32)
    import dataclasses
    small = dataclasses.replace(p, workspace_limit=1024)
    for reason in (WK.plan(small, 4, 2), WK.gw_plan(small, 4, 2)):
        assert isinstance(reason, str) and "workspace_limit is 1024" in reason
