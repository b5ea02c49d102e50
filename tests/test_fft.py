"""The FFT algorithm: every geometry against the reference and PyTorch, tilings forced by small
workspace budgets, refusal of impossible budgets, the stated error bound (wide dynamic range
included) and the documented spread of NaN/Inf over whole output tiles."""
import numpy as np
import pytest

import fastconv
import reference as ref
from conftest import GEOMETRIES, DTYPES, random_array
from fastconv._algorithms import _fft_plan, fft
from fastconv._validation import conv_params

# (id, x shape, weight shape, keyword arguments)
CASES = GEOMETRIES + [
    ("big-kernel-padded", (2, 3, 20, 17), (4, 3, 9, 7), {"padding": (4, 3)}),
    ("big-kernel-stride-dilated", (2, 2, 23, 21), (3, 2, 5, 4), {"stride": (2, 3), "dilation": (2, 3), "padding": 3}),
]
CASE_IDS = [c[0] for c in CASES]
EPS = {np.dtype(np.float32): np.finfo(np.float32).eps, np.dtype(np.float64): np.finfo(np.float64).eps}
# The stated bound (fft.py's docstring): |error| <= BOUND_C * eps * log2(nh*nw) * sum over the
# contracted channel of ||plane||_2 * ||plane||_2 (see _bounds), with BOUND_C = 1.  Measured worst
# ratio of the error to it over these tests: 0.25 (float64 forward).
BOUND_C = 1.0


def make(case, dtype, seed=0, scale_x=None):
    _, xs, ws, kw = case
    rng = np.random.default_rng(seed)
    x = random_array(rng, xs, dtype)
    if scale_x is not None:
        x = (x * scale_x(rng, xs)).astype(dtype)
    w = random_array(rng, ws, dtype)
    b = random_array(rng, ws[0], dtype)
    y_shape = ref.conv2d(np.zeros(xs), np.zeros(ws), **kw).shape
    gy = random_array(rng, y_shape, dtype)
    return x, w, b, gy, kw


def _params(x, w, kw, workspace_limit=None):
    return conv_params("conv2d", x.shape, w.shape, x.dtype, kw.get("stride", 1), kw.get("padding", 0),
                       kw.get("dilation", 1), kw.get("groups", 1), workspace_limit)


def _norms(a):
    return np.sqrt((np.asarray(a, np.float64) ** 2).sum(axis=(2, 3)))


def _bounds(x, w, gy, kw, p):
    """Per-plane error bounds of forward, grad_input and grad_weight (the module's stated bound)."""
    g = kw.get("groups", 1)
    k, cg = w.shape[0], w.shape[1]
    kg = k // g
    nx, nw_, ngy = _norms(x), _norms(w), _norms(gy)  # (n, c), (k, cg), (n, k)
    fwd = np.zeros((x.shape[0], k))
    gin = np.zeros(x.shape[:2])
    gwt = np.zeros((k, cg))
    for gi in range(g):
        ks, cs = slice(gi * kg, (gi + 1) * kg), slice(gi * cg, (gi + 1) * cg)
        fwd[:, ks] = nx[:, cs] @ nw_[ks].T
        gin[:, cs] = ngy[:, ks] @ nw_[ks]
        gwt[ks] = ngy[:, ks].T @ nx[:, cs]
    out = {}
    for name, nrm in (("forward", fwd), ("grad_input", gin), ("grad_weight", gwt)):
        pl = fft._plan(p, name)
        out[name] = BOUND_C * EPS[p.dtype] * np.log2(pl.nh * pl.nw) * nrm
    return out


def run_fft(x, w, b, gy, kw, **extra):
    y = fastconv.conv2d(x, w, b, algorithm="fft", **kw, **extra)
    g = fastconv.conv2d_backward(gy, x, w, algorithm="fft", **kw, **extra)
    return {"forward": y, "grad_input": g.grad_input, "grad_weight": g.grad_weight, "grad_bias": g.grad_bias}


def reference(x, w, b, gy, kw):
    return {"forward": ref.conv2d(x, w, b, **kw), "grad_input": ref.conv2d_grad_input(gy, x.shape, w, **kw),
            "grad_weight": ref.conv2d_grad_weight(gy, x, w.shape, **kw), "grad_bias": ref.conv2d_grad_bias(gy)}


def assert_within_bound(got, want, x, w, gy, kw, p):
    bounds = _bounds(x, w, gy, kw, p)
    for name in ("forward", "grad_input", "grad_weight"):
        assert got[name].dtype == x.dtype and got[name].shape == want[name].shape, name
        err = np.abs(got[name].astype(np.float64) - want[name])
        bnd = bounds[name][..., None, None] if name != "grad_weight" else bounds[name][..., None, None]
        if name == "forward":
            bnd = bnd + EPS[p.dtype] * np.abs(want[name])  # the bias is added once, rounded once
        assert np.all(err <= bnd), (name, float((err / bnd).max()))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_matches_reference_within_bound(case, dtype):
    x, w, b, gy, kw = make(case, dtype)
    got = run_fft(x, w, b, gy, kw)
    want = reference(x, w, b, gy, kw)
    assert_within_bound(got, want, x, w, gy, kw, _params(x, w, kw))
    np.testing.assert_allclose(got["grad_bias"], want["grad_bias"], rtol=1e-5 if dtype == np.float32 else 1e-12)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", [CASES[1], CASES[5], CASES[9], CASES[14], CASES[15]],
                         ids=[CASE_IDS[i] for i in (1, 5, 9, 14, 15)])
@pytest.mark.filterwarnings("ignore:Using padding='same':UserWarning")
def test_matches_torch(torch, case, dtype):
    x, w, b, gy, kw = make(case, dtype, seed=1)
    got = run_fft(x, w, b, gy, kw)
    tx, tw, tb = (torch.tensor(a, requires_grad=True) for a in (x, w, b))
    ty = torch.nn.functional.conv2d(tx, tw, tb, **kw)
    ty.backward(torch.tensor(gy))
    want = {"forward": ty.detach().numpy(), "grad_input": tx.grad.numpy(), "grad_weight": tw.grad.numpy()}
    tol = 1e-4 if dtype == np.float32 else 1e-11
    for name, value in want.items():
        np.testing.assert_allclose(got[name], value, rtol=tol, atol=tol * 10, err_msg=name)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", [CASES[1], CASES[8], CASES[11], CASES[14], CASES[15]],
                         ids=[CASE_IDS[i] for i in (1, 8, 11, 14, 15)])
@pytest.mark.parametrize("limit", [3000, 12000, 40000])
def test_small_workspace_tiles_give_the_same_results(case, dtype, limit):
    x, w, b, gy, kw = make(case, dtype, seed=2)
    p = _params(x, w, kw, limit)
    plans = [fft._plan(p, ps) for ps in ("forward", "grad_input", "grad_weight")]
    if any(isinstance(pl, str) for pl in plans):
        with pytest.raises(ValueError, match="cannot compute the"):
            run_fft(x, w, b, gy, kw, workspace_limit=limit)
        return
    assert all(pl.ws <= limit for pl in plans)
    got = run_fft(x, w, b, gy, kw, workspace_limit=limit)
    assert_within_bound(got, reference(x, w, b, gy, kw), x, w, gy, kw, _params(x, w, kw))


def test_small_budget_really_tiles():
    # one plane cut into several spatial tiles, batch and channel chunks
    case = ("tiles", (3, 4, 30, 26), (6, 2, 5, 3), {"padding": 2, "groups": 2, "dilation": (1, 2)})
    x, w, b, gy, kw = make(case, np.float64, seed=3)
    p = _params(x, w, kw, 20000)
    for name in ("forward", "grad_input", "grad_weight"):
        pl = fft._plan(p, name)
        tot = (p.h, p.w) if name == "grad_input" else (p.oh, p.ow)
        assert pl.ws <= 20000
        assert pl.th < tot[0] or pl.tw < tot[1], (name, pl)
    got = run_fft(x, w, b, gy, kw, workspace_limit=20000)
    assert_within_bound(got, reference(x, w, b, gy, kw), x, w, gy, kw, p)


def test_impossible_budget_is_refused_and_auto_skips_fft():
    x, w, b, gy, kw = make(CASES[14], np.float32, seed=4)
    p = _params(x, w, kw, 256)
    for name in ("forward", "grad_input", "grad_weight"):
        reason = fft.supports(p, name)
        assert isinstance(reason, str) and "workspace_limit=256" in reason
        assert fft.cost(p, name, 2) == float("inf")
    with pytest.raises(ValueError, match=r"conv2d: algorithm='fft' cannot compute the forward pass here: .*workspace"):
        fastconv.conv2d(x, w, b, algorithm="fft", workspace_limit=256, **kw)
    with pytest.raises(ValueError, match=r"conv2d_backward: algorithm='fft' cannot compute the grad_input"):
        fastconv.conv2d_backward(gy, x, w, algorithm="fft", workspace_limit=256, **kw)
    y = fastconv.conv2d(x, w, b, workspace_limit=256, **kw)  # auto: another algorithm
    np.testing.assert_allclose(y, ref.conv2d(x, w, b, **kw), rtol=1e-4, atol=1e-4)


def _wide_range(rng, shape):
    """Per-element magnitudes spread over 10^-4 .. 10^4."""
    return 10.0 ** rng.uniform(-4, 4, shape)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", [CASES[0], CASES[7], CASES[14]], ids=[CASE_IDS[i] for i in (0, 7, 14)])
def test_error_bound_with_wide_dynamic_range(case, dtype):
    x, w, b, gy, kw = make(case, dtype, seed=5, scale_x=_wide_range)
    got = run_fft(x, w, b, gy, kw)
    assert_within_bound(got, reference(x, w, b, gy, kw), x, w, gy, kw, _params(x, w, kw))


def test_small_outputs_lose_relative_accuracy_in_float32():
    # the documented weakness: an output far smaller than its plane's norm is not relatively accurate
    x = np.zeros((1, 1, 16, 16), np.float32)
    x[0, 0, :8] = 1e4
    x[0, 0, 8:] = 1e-3
    w = np.ones((1, 1, 3, 3), np.float32)
    y = fastconv.conv2d(x, w, algorithm="fft")
    want = ref.conv2d(x, w)
    small = want < 1
    rel = np.abs(y[small] - want[small]) / want[small]
    assert rel.max() > 1e-3  # would be ~1e-7 for the direct method
    p = _params(x, w, {})
    bound = _bounds(x, w, np.zeros_like(want, dtype=np.float32), {}, p)["forward"]
    assert np.abs(y - want).max() <= bound.max()


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("dtype", DTYPES)
def test_nonfinite_input_poisons_the_whole_output_plane(bad, dtype):
    case = ("nan", (3, 2, 12, 11), (4, 2, 3, 3), {"padding": 1})
    x, w, b, gy, kw = make(case, dtype, seed=6)
    x[1, 0, 5, 4] = bad
    y = fastconv.conv2d(x, w, b, algorithm="fft", **kw)
    assert fft._plan(_params(x, w, kw), "forward").th == 12  # one tile per plane
    assert np.isnan(y[1]).all()  # every output channel of image 1, every position
    assert np.isfinite(y[[0, 2]]).all()
    g = fastconv.conv2d_backward(gy, x, w, algorithm="fft", **kw)
    assert np.isfinite(g.grad_input).all()  # grad_input never reads x
    assert np.isnan(g.grad_weight[:, 0]).all() and np.isfinite(g.grad_weight[:, 1]).all()
    # the direct method only poisons the windows that touch the value
    yd = fastconv.conv2d(x, w, b, algorithm="direct", **kw)
    assert np.isnan(yd[1]).sum() < yd[1].size


def test_nonfinite_input_stays_in_its_tile():
    case = ("nan-tiles", (1, 1, 40, 8), (1, 1, 3, 3), {"padding": 1})
    x, w, b, gy, kw = make(case, np.float64, seed=7)
    x[0, 0, 2, 3] = np.nan
    limit = 3000
    pl = fft._plan(_params(x, w, kw, limit), "forward")
    assert pl.th < 40
    y = fastconv.conv2d(x, w, b, algorithm="fft", workspace_limit=limit, **kw)
    assert np.isnan(y[0, 0, :pl.th]).all()  # the tile holding row 2 (its halo reaches row 3)
    assert np.isfinite(y[0, 0, pl.th + 1:]).all()


def test_nonfinite_weight_poisons_its_output_channel():
    case = ("nanw", (2, 2, 9, 9), (3, 2, 3, 3), {})
    x, w, b, gy, kw = make(case, np.float32, seed=8)
    w[1, 1, 0, 2] = np.inf
    y = fastconv.conv2d(x, w, b, algorithm="fft")
    assert np.isnan(y[:, 1]).all()
    assert np.isfinite(y[:, [0, 2]]).all()


@pytest.mark.parametrize("xs, ws, kw, fft_wins", [
    ((1, 1, 5, 5), (1, 1, 3, 3), {}, False),
    ((64, 1, 32, 32), (6, 1, 5, 5), {}, False),             # lenet5-c1: fft measured 5-10x slower
    ((64, 6, 14, 14), (16, 6, 5, 5), {}, False),            # lenet5-c3: 1.1-2.8x slower
    ((8, 64, 56, 56), (64, 64, 3, 3), {"padding": 1}, False),  # resnet50-3x3-64: ~1.8x slower
    ((4, 16, 64, 64), (16, 16, 15, 15), {"padding": 7}, True),  # bigkernel-15x15: 2-4x faster
    ((8, 64, 64, 64), (128, 64, 9, 9), {}, True),           # convnet-L2-9x9: 2-6x faster
])
def test_auto_uses_fft_only_where_it_measured_faster(xs, ws, kw, fft_wins):
    # the cost model's floor and constants, fitted to single-thread times (module comment): small
    # planes must never be sent to FFT (an earlier model did), large kernels must
    # the same holds at one and at two threads, whatever was asked before (caches cleared)
    from fastconv import _select, _threads
    p = conv_params("conv2d", xs, ws, np.float32, 1, kw.get("padding", 0), 1, 1)
    for n in (1, 2):
        _select._CHOICES.clear()
        fft._plan.cache_clear()
        with fastconv.threads(n):
            t = _threads.apply()
            for name in ("forward", "grad_input", "grad_weight"):
                assert fft.cost(p, name, t) >= _fft_plan._C_CALL
                assert (_select.select("conv2d", "auto", p, name, t).name == "fft") == fft_wins, (xs, ws, name, n)


def test_cost_charges_stride_as_stride_one():
    base = conv_params("conv2d", (4, 8, 40, 40), (8, 8, 7, 7), np.float32, 1, 3, 1, 1)
    strided = conv_params("conv2d", (4, 8, 40, 40), (8, 8, 7, 7), np.float32, 2, 3, 1, 1)
    assert fft.cost(strided, "forward", 2) >= 0.8 * fft.cost(base, "forward", 2)
    assert fft.supports(strided, "forward") is None


@pytest.mark.parametrize("dtype", DTYPES)
def test_deterministic_and_thread_count_independent(dtype):
    # fastconv sets the pool size on every call, so the count is pinned through fastconv; the plan
    # cache is cleared in between so that each count plans for itself
    x, w, b, gy, kw = make(CASES[14], dtype, seed=9)
    fft._plan.cache_clear()
    with fastconv.threads(2):
        first = run_fft(x, w, b, gy, kw)
        again = run_fft(x, w, b, gy, kw)
    fft._plan.cache_clear()
    with fastconv.threads(1):
        single = run_fft(x, w, b, gy, kw)
    for name in first:
        assert first[name].tobytes() == again[name].tobytes(), name
        assert first[name].tobytes() == single[name].tobytes(), name


@pytest.mark.parametrize("kw", [{}, {"padding": 1}, {"padding": (0, 2), "stride": 2}, {"dilation": 2, "padding": (3, 1)}],
                         ids=["valid", "pad1", "stride2", "dilated"])
def test_grad_input_whole_plane_reads_circularly(kw):
    # with padding smaller than the kernel, one grad_input transform is shorter than the
    # overlap-save tile (h + eh): the result is read modulo the FFT size and must still be exact
    x, w, _, gy, _ = make(("c", (2, 3, 17, 16), (4, 3, 5, 5), kw), np.float64)
    p = _params(x, w, kw)
    pl = fft._plan(p, "grad_input")
    eh = kw.get("dilation", 1) * 4
    assert pl.th == 17 and pl.tw == 16
    if not kw:
        assert pl.nh < 17 + eh and pl.nw < 16 + eh
    got = fastconv.conv2d_backward(gy, x, w, algorithm="fft", **kw).grad_input
    want = ref.conv2d_grad_input(gy, x.shape, w, **kw)
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10)


def test_scratch_buffers_are_reused_and_released():
    x, w, b, gy, kw = make(CASES[-2], np.float32)
    fastconv.free_workspace()
    first = run_fft(x, w, b, gy, kw)
    held = fastconv.free_workspace()
    assert held > 0  # the FFT tiles and spectra were kept for reuse
    run_fft(x, w, b, gy, kw)
    again = run_fft(x, w, b, gy, kw)  # from reused, dirty buffers: the same bits
    for name in first:
        assert np.array_equal(first[name], again[name]), name
    assert fastconv.free_workspace() == held and fastconv.free_workspace() == 0


@pytest.mark.parametrize("kw", [{}, {"padding": 1}, {"stride": 2}], ids=["valid", "pad1", "stride2"])
def test_backward_reuses_the_gradient_spectrum_with_the_same_bits(kw, monkeypatch):
    # conv2d_backward transforms grad_output once when both passes use the same whole-plane buffer;
    # grad_weight alone (its own transform) must give the same bits
    x, w, _, gy, _ = make(("c", (3, 4, 20, 18), (5, 4, 7, 5), kw), np.float64, seed=5)
    p = _params(x, w, kw)
    calls = []
    original = fft._rfft2
    monkeypatch.setattr(fft, "_rfft2", lambda a, role: calls.append(a.shape) or original(a, role))
    g = fastconv.conv2d_backward(gy, x, w, algorithm="fft", **kw)
    gi_pl, gw_pl = fft._plan(p, "grad_input"), fft._plan(p, "grad_weight")
    shareable = gi_pl.th == p.h and gi_pl.tw == p.w and (gi_pl.nh, gi_pl.nw) == (gw_pl.nh, gw_pl.nw)
    assert len(calls) == (2 if shareable else 3)
    if not kw:
        assert shareable
    alone = fft.grad_weight(gy, x, p)
    assert np.array_equal(g.grad_weight, alone)
    want = ref.conv2d_grad_weight(gy, x, w.shape, **kw)
    np.testing.assert_allclose(g.grad_weight, want, rtol=1e-10, atol=1e-10)


def test_public_scipy_fft_fallback_gives_the_same_results(monkeypatch):
    # without scipy's private pocketfft binding the public scipy.fft functions run (fresh outputs)
    x, w, b, gy, kw = make(CASES[-1], np.float64, seed=6)
    fast = run_fft(x, w, b, gy, kw)
    monkeypatch.setattr(fft, "_pocket", None)
    slow = run_fft(x, w, b, gy, kw)
    for name in fast:
        np.testing.assert_allclose(slow[name], fast[name], rtol=1e-12, atol=1e-12, err_msg=name)
