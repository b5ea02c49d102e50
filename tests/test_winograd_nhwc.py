"""The batch-wide Winograd forward (fastconv._algorithms.winograd_nhwc): chunks of tiles and thread
counts change no bit, grad_input's kernel read flipped in place equals the flipped copy, channels_last
calls run it natively and return channels_last results equal to the reference, the plan's budget
and choice.  (Its accuracy against the float64 reference and im2col, on every padding and group
geometry, is tests/test_winograd.py's, parametrised over both forward kernels.)"""
import dataclasses

import numba
import numpy as np
import pytest

import fastconv
import reference as ref
from fastconv._algorithms import nhwc
from fastconv._algorithms import winograd as W
from fastconv._algorithms import winograd_fused as WF
from fastconv._algorithms import winograd_kpanel as WK
from fastconv._algorithms import winograd_nhwc as WN
from fastconv._validation import conv_params


def _problem(shape, k, groups=1, padding=1, dtype=np.float32, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(dtype)
    w = (rng.standard_normal((k, shape[1] // groups, 3, 3)) / np.sqrt(9 * shape[1] // groups)).astype(dtype)
    b = rng.standard_normal(k).astype(dtype)
    p = conv_params("conv2d", shape, w.shape, np.dtype(dtype), 1, padding, 1, groups)
    return x, w, b, p


@pytest.mark.parametrize("m", W.TILES)
def test_chunks_of_tiles_change_no_bit(m):
    x, w, b, p = _problem((3, 6, 9, 11), 10, groups=2)
    xh = nhwc.to_nhwc(x)
    whole = WN.forward(xh, w, b, p, m, 10**6)
    for tc in (1, 5, 7):  # chunks that split images and tile rows, and a last partial chunk
        np.testing.assert_array_equal(WN.forward(xh, w, b, p, m, tc), whole)
    want = ref.conv2d(x.astype(np.float64), w.astype(np.float64), b.astype(np.float64), padding=1, groups=2)
    np.testing.assert_allclose(whole.transpose(0, 3, 1, 2), want, rtol=1e-4, atol=1e-4)


def test_thread_counts_change_no_bit():
    x, w, b, p = _problem((4, 16, 8, 8), 24)
    xh = nhwc.to_nhwc(x)
    before = numba.get_num_threads()
    try:
        got = []
        for t in sorted({1, 2, before}):
            numba.set_num_threads(t)
            got.append(WN.forward(xh, w, b, p, 4, 50))
    finally:
        numba.set_num_threads(before)
    for g in got[1:]:
        np.testing.assert_array_equal(g, got[0])


@pytest.mark.parametrize("groups", [1, 3])
def test_grad_input_reads_the_flipped_kernel_in_place(groups):
    # flip=True transforms the layer's weight as grad_input's kernel (flipped, channels swapped
    # within each group): the same bits as the forward on an explicitly flipped copy
    x, w, b, p = _problem((2, 6, 7, 5), 9, groups=groups, dtype=np.float64)
    q = W._transposed(p)
    gy = np.random.default_rng(1).standard_normal((2, 9, p.oh, p.ow))
    gyh = nhwc.to_nhwc(gy)
    flipped = np.ascontiguousarray(W._flipped(w, q))
    got = WN.forward(gyh, w, None, q, 2, 100, flip=True)
    np.testing.assert_array_equal(got, WN.forward(gyh, flipped, None, q, 2, 100))
    want = ref.conv2d_grad_input(gy, x.shape, w, padding=1, groups=groups)
    np.testing.assert_allclose(got.transpose(0, 3, 1, 2), want, rtol=1e-10, atol=1e-10)


def _cl(a):
    return np.ascontiguousarray(a.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)


def test_channels_last_calls_run_it_natively_and_keep_the_layout(monkeypatch):
    # a deep small-plane layer, where every pass's plan is an NHWC one (batch-wide, fused or by
    # output-channel panels): the kernels read the caller's channels_last memory themselves (no
    # NCHW copy), results come back channels_last
    x, w, b, p = _problem((8, 256, 8, 8), 256)
    plans = [W._cached_plan(q, pass_) for q, pass_ in ((p, "forward"), (W._transposed(p), "forward"),
                                                        (p, "grad_weight"))]
    assert all(pl.batch or pl.fused or pl.kpanel for pl in plans)
    gy = np.random.default_rng(2).standard_normal(x.shape).astype(np.float32)
    x64, w64, gy64 = x.astype(np.float64), w.astype(np.float64), gy.astype(np.float64)
    want_y = ref.conv2d(x64, w64, b.astype(np.float64), padding=1)
    want_gx = ref.conv2d_grad_input(gy64, x.shape, w64, padding=1)
    want_gw = ref.conv2d_grad_weight(gy64, x64, w.shape, padding=1)
    xc, gyc = _cl(x), _cl(gy)
    read = []
    for mod, name in ((WF, "forward"), (WN, "forward"), (WK, "forward_nhwc"), (WF, "grad_weight"),
                      (WN, "grad_weight"), (WK, "grad_weight_nhwc")):
        def spy(a, *args, _real=getattr(mod, name), **kw):
            read.append(a)
            return _real(a, *args, **kw)
        monkeypatch.setattr(mod, name, spy)
    y = fastconv.conv2d(xc, w, b, padding=1, algorithm="winograd")
    g = fastconv.conv2d_backward(gyc, xc, w, padding=1, algorithm="winograd")
    assert len(read) == 3 and all(np.shares_memory(a, src) for a, src in zip(read, (xc, gyc, gyc)))
    for got, want in ((y, want_y), (g.grad_input, want_gx), (g.grad_weight, want_gw)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(np.abs(want).max()))
    assert nhwc.is_channels_last(y) and nhwc.is_channels_last(g.grad_input)
    np.testing.assert_array_equal(xc, _cl(x))  # the input is not touched


def test_a_budget_below_one_tile_is_refused_with_the_need():
    x, w, b, p = _problem((2, 8, 8, 8), 8)
    small = dataclasses.replace(p, workspace_limit=1000)
    reason = WN.plan(small, 2, 2)
    assert isinstance(reason, str) and "workspace_limit is 1000" in reason
    tc = WN.plan(p, 2, 2)[0]
    assert 1 <= tc <= WN.tiles(p, 2)[2]


def test_the_plan_takes_an_nhwc_kernel_for_deep_small_planes_only():
    # modelled: ResNet's 256-channel 8x8 layer at batch 32 goes to an NHWC kernel or the one by
    # output-channel panels (measured for an NCHW caller, conversions included: fused 7.4 ms,
    # batch-wide 7.1, packed 8.8; Zen 4: by panels 6.1, fused 6.5, batch-wide 10.0), a small
    # 8-channel 40x40 layer at batch 2 stays on the packed kernel (0.10 ms, fused 0.15: its fixed
    # cost per call; by panels 0.28, packed 0.19 on the Zen 4)
    deep = conv_params("conv2d", (32, 256, 8, 8), (256, 256, 3, 3), np.dtype(np.float32), 1, 1, 1, 1)
    thin = conv_params("conv2d", (2, 8, 40, 40), (8, 8, 3, 3), np.dtype(np.float32), 1, 1, 1, 1)
    pl = W._cached_plan(deep, "forward")
    assert pl.batch or pl.fused or pl.kpanel
    pl = W._cached_plan(thin, "forward")
    assert not (pl.batch or pl.fused or pl.kpanel)


@pytest.mark.parametrize("k", [1, 5])
def test_results_do_not_share_the_kept_scratch(k):
    # U, V, M and the NHWC copies are kept between calls; a result handed back must not be one of
    # them (with one output channel the NHWC output is already NCHW)
    x, w, b, p = _problem((2, 3, 6, 6), k)
    first = W.forward(x, w, b, p, 2, True)
    keep = first.copy()
    W.forward(x * 2, w, b, p, 2, True)
    W.grad_input(first * 3, w, p, 2, True)
    np.testing.assert_array_equal(first, keep)


@pytest.mark.boundscheck
@pytest.mark.parametrize("m", W.TILES)
def test_every_pass_with_forced_chunks_against_the_reference(m):
    # odd planes, groups, asymmetric padding beyond the kernel (grad_input's transposed problem then
    # crops), chunks that end mid-image: CI also runs this with NUMBA_BOUNDSCHECK=1 (every index checked)
    x, w, b, p = _problem((3, 4, 7, 6), 6, groups=2, dtype=np.float64)
    p = dataclasses.replace(p, ph0=0, ph1=3, pw0=2, pw1=1, oh=7 + 3 - 2, ow=6 + 3 - 2)
    gy = np.random.default_rng(3).standard_normal((3, 6, p.oh, p.ow))
    xp = np.pad(x, ((0, 0), (0, 0), (0, 3), (2, 1)))
    for tc in (5, 10**6):
        y = WN.forward(nhwc.to_nhwc(x), w, b, p, m, tc).transpose(0, 3, 1, 2)
        np.testing.assert_allclose(y, ref.conv2d(xp, w, b, groups=2), rtol=1e-10, atol=1e-10)
        q = W._transposed(p)
        gx = WN.forward(nhwc.to_nhwc(gy), w, None, q, m, tc, flip=True).transpose(0, 3, 1, 2)
        want = ref.conv2d_grad_input(gy, xp.shape, w, groups=2)[:, :, 0:7, 2:8]
        np.testing.assert_allclose(gx, want, rtol=1e-10, atol=1e-10)
        gw = WN.grad_weight(nhwc.to_nhwc(gy), nhwc.to_nhwc(x), p, m, tc)
        np.testing.assert_allclose(gw, ref.conv2d_grad_weight(gy, xp, w.shape, groups=2), rtol=1e-10, atol=1e-10)


def test_free_workspace_releases_the_kept_buffers():
    fastconv.free_workspace()
    x, w, b, p = _problem((2, 16, 8, 8), 16)
    W.forward(x, w, b, p, 2, True)
    assert fastconv.free_workspace() >= 16 * 16 * 16 * 4  # U's 16 elements per channel pair, at least
    assert fastconv.free_workspace() == 0
