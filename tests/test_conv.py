"""conv2d and conv2d_backward: every registered algorithm against the NumPy reference, PyTorch,
finite differences and each other."""
import json
import pathlib

import numpy as np
import pytest

import fastconv
import reference as ref
from conftest import (ALGORITHMS, DTYPES, FD_RTOL, FD_STEP, assert_results, random_array,
                      run_conv, skip_if_unsupported)

# (id, x shape (N, C, H, W), weight shape (K, C/groups, R, S), keyword arguments)
CASES = [
    ("basic", (2, 3, 7, 6), (4, 3, 3, 3), {}),
    ("n1-c1", (1, 1, 5, 5), (1, 1, 3, 3), {"padding": 1}),
    ("kernel-eq-input", (2, 2, 4, 5), (3, 2, 4, 5), {}),
    ("stride-gt-kernel", (2, 2, 9, 8), (2, 2, 2, 2), {"stride": 3}),
    ("asymmetric", (1, 3, 8, 5), (2, 3, 3, 2), {"stride": (2, 1), "padding": (1, 0)}),
    ("stride2-pad1", (2, 3, 8, 8), (4, 3, 3, 3), {"stride": 2, "padding": 1}),
    ("1x1", (2, 4, 5, 5), (3, 4, 1, 1), {}),
    ("dilation", (2, 2, 9, 9), (3, 2, 3, 3), {"dilation": 2, "padding": 2}),
    ("dilation-asym-stride", (1, 2, 10, 8), (2, 2, 2, 3), {"dilation": (3, 1), "stride": (1, 2)}),
    ("groups", (2, 4, 6, 6), (6, 2, 3, 3), {"groups": 2, "padding": 1}),
    ("depthwise", (2, 3, 6, 6), (3, 1, 3, 3), {"groups": 3, "padding": 1}),
    ("depthwise-multiplier", (1, 3, 5, 5), (6, 1, 3, 3), {"groups": 3, "stride": 2}),
    ("same-odd", (2, 2, 6, 5), (3, 2, 3, 3), {"padding": "same"}),
    ("same-even", (1, 2, 6, 7), (2, 2, 2, 4), {"padding": "same"}),
    ("same-dilated", (1, 2, 7, 7), (2, 2, 3, 2), {"padding": "same", "dilation": 2}),
    ("valid", (1, 2, 6, 6), (2, 2, 3, 3), {"padding": "valid"}),
    # planes and channel counts big enough that kernels split them into several (partial) blocks
    ("row-blocks", (1, 2, 40, 37), (10, 2, 3, 3), {"padding": 1}),
    ("channel-blocks-groups", (2, 18, 6, 5), (20, 9, 3, 2), {"groups": 2, "padding": (0, 1)}),
    # computed as the stride-1 layer on the positions it reads (functional._pointwise)
    ("1x1-strided", (2, 4, 9, 7), (6, 2, 1, 1), {"stride": (2, 3), "groups": 2}),
]
CASE_IDS = [c[0] for c in CASES]


def make_inputs(case, dtype, seed=0, bias=True):
    _, xs, ws, kw = case
    rng = np.random.default_rng(seed)
    x = random_array(rng, xs, dtype)
    w = random_array(rng, ws, dtype)
    b = random_array(rng, ws[0], dtype) if bias else None
    y_shape = ref.conv2d(np.zeros(xs), np.zeros(ws), **kw).shape
    gy = random_array(rng, y_shape, dtype)
    return x, w, b, gy, kw


def reference_results(x, w, b, gy, kw):
    return {
        "forward": ref.conv2d(x, w, b, **kw),
        "grad_input": ref.conv2d_grad_input(gy, x.shape, w, **kw),
        "grad_weight": ref.conv2d_grad_weight(gy, x, w.shape, **kw),
        "grad_bias": ref.conv2d_grad_bias(gy),
    }


def torch_results(torch, x, w, b, gy, kw):
    tx, tw, tb = (torch.tensor(a, requires_grad=True) for a in (x, w, b))
    ty = torch.nn.functional.conv2d(tx, tw, tb, **kw)
    ty.backward(torch.tensor(gy))
    return {"forward": ty.detach().numpy(), "grad_input": tx.grad.numpy(),
            "grad_weight": tw.grad.numpy(), "grad_bias": tb.grad.numpy()}


def test_registry_lists_direct():
    assert "direct" in ALGORITHMS
    assert all(isinstance(a, str) for a in ALGORITHMS)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_matches_reference(algorithm, case, dtype):
    x, w, b, gy, kw = make_inputs(case, dtype)
    got = run_conv(algorithm, x, w, b, gy, **kw)
    assert_results(got, reference_results(x, w, b, gy, kw), dtype, algorithm=algorithm)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.filterwarnings("ignore:Using padding='same':UserWarning")
def test_matches_torch(torch, algorithm, case, dtype):
    x, w, b, gy, kw = make_inputs(case, dtype, seed=1)
    got = run_conv(algorithm, x, w, b, gy, **kw)
    assert_results(got, torch_results(torch, x, w, b, gy, kw), dtype, algorithm=algorithm)


def _directional(f, a, v):
    """Central difference of scalar ``f`` at ``a`` along ``v``."""
    return (f(a + FD_STEP * v) - f(a - FD_STEP * v)) / (2 * FD_STEP)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_gradients_match_finite_differences(algorithm, case):
    # loss = <conv2d(x, w, b), gy>; its gradients are conv2d_backward(gy, ...)
    x, w, b, gy, kw = make_inputs(case, np.float64, seed=2)
    got = run_conv(algorithm, x, w, b, gy, **kw)
    rng = np.random.default_rng(3)

    def loss(xx, ww, bb):
        return float(np.vdot(fastconv.conv2d(xx, ww, bb, algorithm=algorithm, **kw), gy))

    for name, arg, f in [("grad_input", x, lambda a: loss(a, w, b)),
                         ("grad_weight", w, lambda a: loss(x, a, b)),
                         ("grad_bias", b, lambda a: loss(x, w, a))]:
        v = rng.standard_normal(arg.shape)
        numeric = _directional(f, arg, v)
        analytic = float(np.vdot(got[name], v))
        assert analytic == pytest.approx(numeric, rel=FD_RTOL, abs=FD_RTOL), name


def _views(x, w, gy):
    """Non-contiguous views with the values of ``x``, ``w`` and ``gy``."""
    xt = np.ascontiguousarray(x.transpose(0, 1, 3, 2)).transpose(0, 1, 3, 2)  # F-ordered planes
    wbig = np.zeros((w.shape[0] * 2,) + w.shape[1:3] + (w.shape[3] * 2,), w.dtype)
    wbig[::2, :, :, ::2] = w
    gybig = np.zeros(gy.shape[:3] + (gy.shape[3] + 3,), gy.dtype)
    gybig[..., 1:-2] = gy
    return xt, wbig[::2, :, :, ::2], gybig[..., 1:-2]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", [CASES[0], CASES[9], CASES[13]], ids=["basic", "groups", "same-even"])
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_non_contiguous_inputs(algorithm, case, dtype):
    x, w, b, gy, kw = make_inputs(case, dtype, seed=4)
    xv, wv, gyv = _views(x, w, gy)
    bv = np.repeat(b, 2)[::2]
    assert not (xv.flags.c_contiguous or wv.flags.c_contiguous or gyv.flags.c_contiguous
                or bv.flags.c_contiguous)
    got = run_conv(algorithm, xv, wv, bv, gyv, **kw)
    assert_results(got, reference_results(x, w, b, gy, kw), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_read_only_inputs(algorithm, dtype):
    case = CASES[5]
    arrays = make_inputs(case, dtype, seed=5)
    for a in arrays[:4]:
        a.setflags(write=False)
    x, w, b, gy, kw = arrays
    got = run_conv(algorithm, x, w, b, gy, **kw)
    assert_results(got, reference_results(x, w, b, gy, kw), dtype)


@pytest.mark.parametrize("case", [CASES[0], CASES[10], CASES[12]], ids=["basic", "depthwise", "same-odd"])
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_inputs_not_modified(algorithm, case):
    arrays = make_inputs(case, np.float32, seed=6)
    x, w, b, gy, kw = arrays
    xv, wv, gyv = _views(x, w, gy)
    before = [a.copy() for a in (x, w, b, gy, xv, wv, gyv)]
    run_conv(algorithm, x, w, b, gy, **kw)
    run_conv(algorithm, xv, wv, b, gyv, **kw)
    for a, a0 in zip((x, w, b, gy, xv, wv, gyv), before):
        np.testing.assert_array_equal(a, a0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", [CASES[0], CASES[9], CASES[13]], ids=["basic", "groups", "same-even"])
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_empty_batch(algorithm, case, dtype):
    _, xs, ws, kw = case
    rng = np.random.default_rng(7)
    x = np.zeros((0,) + xs[1:], dtype)
    w, b = random_array(rng, ws, dtype), random_array(rng, ws[0], dtype)
    gy = np.zeros((0,) + ref.conv2d(np.zeros(xs), w, **kw).shape[1:], dtype)
    got = run_conv(algorithm, x, w, b, gy, **kw)
    want = {"forward": gy, "grad_input": x, "grad_weight": np.zeros(ws), "grad_bias": np.zeros(ws[0])}
    assert_results(got, want, dtype)


def test_empty_batch_shapes_match_torch(torch):
    x = np.zeros((0, 2, 6, 5), np.float32)
    w = np.ones((4, 1, 3, 2), np.float32)
    y = fastconv.conv2d(x, w, stride=(2, 1), padding=1, groups=2)
    ty = torch.nn.functional.conv2d(torch.tensor(x), torch.tensor(w), stride=(2, 1), padding=1, groups=2)
    assert y.shape == tuple(ty.shape) and y.dtype == np.float32


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_auto_and_default_algorithm(case, dtype):
    x, w, b, gy, kw = make_inputs(case, dtype, seed=8)
    want = reference_results(x, w, b, gy, kw)
    assert_results(run_conv("auto", x, w, b, gy, **kw), want, dtype)
    got = {"forward": fastconv.conv2d(x, w, b, **kw)}
    got.update(fastconv.conv2d_backward(gy, x, w, **kw)._asdict())
    assert_results(got, want, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_algorithms_agree(case, dtype):
    # every algorithm that serves the case, and auto, against the reference on the same inputs
    x, w, b, gy, kw = make_inputs(case, dtype, seed=9)
    want = reference_results(x, w, b, gy, kw)
    served = []
    for algorithm in ALGORITHMS + ("auto",):
        try:
            got = run_conv(algorithm, x, w, b, gy, **kw)
        except pytest.skip.Exception:
            continue
        assert_results(got, want, dtype, algorithm=algorithm)
        served.append(algorithm)
    assert "direct" in served and "auto" in served  # direct serves every case


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_deterministic(algorithm, dtype):
    # enough work items (n*k, c, k) for every thread, and long reductions
    case = ("det", (4, 6, 12, 11), (8, 3, 3, 3), {"groups": 2, "padding": 1})
    x, w, b, gy, kw = make_inputs(case, dtype, seed=10)
    first = run_conv(algorithm, x, w, b, gy, **kw)
    second = run_conv(algorithm, x, w, b, gy, **kw)
    for name in first:
        np.testing.assert_array_equal(first[name], second[name], err_msg=name)
        assert first[name].tobytes() == second[name].tobytes(), name  # bitwise, -0.0 and NaN included


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_no_bias_equals_zero_bias_and_keeps_dtype(algorithm, dtype):
    x, w, b, gy, kw = make_inputs(CASES[0], dtype, seed=11)
    y0 = run_conv(algorithm, x, w, None, **kw)["forward"]
    y1 = run_conv(algorithm, x, w, np.zeros_like(b), **kw)["forward"]
    assert y0.dtype == dtype
    np.testing.assert_array_equal(y0, y1)


def _shape_suite():
    """The public shape suite (fastconv/shapes.json, a copy of shared/shapes.json shipped with the
    package) shrunk to N=1, few channels and small images, keeping each layer's kernel, stride,
    padding, dilation and depthwise-ness."""
    from fastconv.cases import SUITE_PATH
    path = pathlib.Path(SUITE_PATH)
    cases = []
    for c in json.loads(path.read_text())["conv2d"]:
        r, s = c["R"], c["S"]
        st, pad, dil, g = c.get("stride", 1), c.get("padding", 0), c.get("dilation", 1), c.get("groups", 1)
        cin = 3 if g > 1 else min(c["C"], 3)
        groups = cin if g > 1 else 1
        k = cin if g > 1 else min(c["K"], 4)
        hw = min(c["H"], dil * (r - 1) + 1 + 3 * st)
        cases.append(pytest.param((1, cin, hw, hw + 1), (k, cin // groups, r, s),
                                  {"stride": st, "padding": pad, "dilation": dil, "groups": groups},
                                  id=c["name"]))
    return cases


@pytest.mark.parametrize("xs, ws, kw", _shape_suite())
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_shape_suite_layers_shrunk(algorithm, xs, ws, kw):
    x, w, b, gy, kw = make_inputs(("suite", xs, ws, kw), np.float64, seed=12)
    got = run_conv(algorithm, x, w, b, gy, **kw)
    assert_results(got, reference_results(x, w, b, gy, kw), np.float64)


def test_explicit_algorithm_refusal_is_the_only_skipped_error():
    with pytest.raises(pytest.skip.Exception):
        skip_if_unsupported(fastconv.AlgorithmUnavailable("conv2d: algorithm='x' cannot compute the forward pass here: y"))
    with pytest.raises(ValueError, match="stride"):  # the same words in a plain ValueError are an error
        skip_if_unsupported(ValueError("conv2d: algorithm='x' cannot compute the forward pass: stride"))


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_concurrent_calls_from_python_threads(algorithm):
    # kernels release the GIL; parallel kernels entered from several threads must neither abort
    # (numba's workqueue layer would) nor mix up results
    from concurrent.futures import ThreadPoolExecutor

    inputs = [make_inputs(case, np.float64, seed=20 + i) for i, case in enumerate(CASES[:4])]
    serial = [run_conv(algorithm, x, w, b, gy, **kw) for x, w, b, gy, kw in inputs]
    with ThreadPoolExecutor(max_workers=4) as pool:
        threaded = list(pool.map(lambda a: run_conv(algorithm, a[0], a[1], a[2], a[3], **a[4]), inputs * 3))
    for i, got in enumerate(threaded):
        for name, value in serial[i % len(inputs)].items():
            np.testing.assert_array_equal(got[name], value, err_msg=name)


@pytest.mark.parametrize("channels_last", [False, True])
def test_strided_1x1_runs_as_the_stride_1_layer_on_the_positions_it_reads(channels_last, monkeypatch):
    from fastconv import functional
    seen = []
    original = functional.select
    monkeypatch.setattr(functional, "select", lambda fn, a, p, *r: seen.append(p) or original(fn, a, p, *r))
    rng = np.random.default_rng(4)
    x, w, b = (random_array(rng, s, np.float64) for s in ((3, 4, 10, 9), (5, 4, 1, 1), (5,)))
    gy = random_array(rng, (3, 5, 4, 3), np.float64)
    xin = np.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2) if channels_last else x
    y = fastconv.conv2d(xin, w, b, stride=(3, 4))
    g = fastconv.conv2d_backward(gy, xin, w, stride=(3, 4))
    # NCHW runs the reduced layer; channels_last keeps the NHWC kernels' strided GEMM
    assert [(p.h, p.w, p.sh, p.sw) for p in seen] == [(10, 9, 3, 4) if channels_last else (4, 3, 1, 1)] * 3
    np.testing.assert_allclose(y, ref.conv2d(x, w, b, stride=(3, 4)), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(g.grad_input, ref.conv2d_grad_input(gy, x.shape, w, stride=(3, 4)), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(g.grad_weight, ref.conv2d_grad_weight(gy, x, w.shape, stride=(3, 4)), rtol=1e-12, atol=1e-12)
    assert g.grad_input.shape == x.shape and (g.grad_input[:, :, 1::3] == 0).all()
    if channels_last:  # results keep the input's layout
        assert not y.flags.c_contiguous and y.transpose(0, 2, 3, 1).flags.c_contiguous
        assert g.grad_input.transpose(0, 2, 3, 1).flags.c_contiguous
