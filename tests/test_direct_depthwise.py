"""The direct algorithm's depthwise path (one channel per group): every geometry it serves, its 3x3
fast kernels and its generic taps, against the NumPy reference; non-finite values and determinism."""
import numpy as np
import pytest

import fastconv
import reference as ref
from conftest import assert_results, random_array, run_conv

# (id, x shape, kernel (R, S), keyword arguments); groups = C
CASES = [
    ("3x3-pad1", (2, 5, 9, 11), (3, 3), {"padding": 1}),
    ("3x3-stride2", (2, 3, 9, 10), (3, 3), {"padding": 1, "stride": 2}),
    ("3x3-stride-rows", (1, 3, 9, 10), (3, 3), {"padding": 1, "stride": (2, 1)}),
    ("3x3-dilation2", (1, 4, 10, 7), (3, 3), {"padding": 2, "dilation": 2}),
    ("3x3-dilation-rows", (1, 2, 10, 9), (3, 3), {"padding": "same", "dilation": (2, 1)}),
    ("3x3-valid", (2, 2, 6, 6), (3, 3), {}),
    ("3x3-asym-pad", (3, 2, 12, 13), (3, 3), {"padding": (1, 0)}),
    ("non-square", (2, 2, 8, 9), (2, 5), {"stride": (2, 3), "padding": (0, 2), "dilation": (1, 2)}),
    ("5x5-same", (1, 3, 7, 8), (5, 5), {"padding": "same"}),
    ("4x3-stride3", (2, 4, 16, 17), (4, 3), {"stride": 3, "padding": 3}),
    ("1x1", (2, 4, 5, 6), (1, 1), {}),
    ("kernel-eq-input", (1, 2, 5, 5), (5, 5), {}),
    ("long-rows", (1, 2, 90, 150), (3, 3), {"padding": 1}),  # several row blocks per plane
    ("3x3-same-3-rows", (1, 2, 3, 17), (3, 3), {"padding": "same"}),
    ("3x3-same-3-cols", (3, 2, 13, 3), (3, 3), {"padding": 1}),
]
# 3x3 'same' planes run as flat runs with their edges rewritten (_dw_same3x3): the smallest such
# planes, and planes too thin for it (fewer than 3 rows or columns: the padded kernel); planes this
# small take the channel-vectorised kernels unless the plane-wise ones are forced
TINY_SAME = [
    ("3x3-plane", (2, 3, 3, 3)),
    ("3-rows", (1, 2, 3, 5)),
    ("3-cols", (3, 2, 4, 3)),
    ("2-rows", (1, 2, 2, 6)),
    ("1-col", (1, 2, 5, 1)),
]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_depthwise_matches_reference(case, dtype):
    _, xs, (r, s), kw = case
    c = xs[1]
    kw = dict(kw, groups=c)
    rng = np.random.default_rng(0)
    x, w, b = random_array(rng, xs, dtype), random_array(rng, (c, 1, r, s), dtype), random_array(rng, c, dtype)
    gy = random_array(rng, ref.conv2d(x, w, **kw).shape, dtype)
    x0, w0, gy0 = x.copy(), w.copy(), gy.copy()
    got = run_conv("direct", x, w, b, gy, **kw)
    want = {"forward": ref.conv2d(x, w, b, **kw), "grad_input": ref.conv2d_grad_input(gy, x.shape, w, **kw),
            "grad_weight": ref.conv2d_grad_weight(gy, x, w.shape, **kw), "grad_bias": ref.conv2d_grad_bias(gy)}
    assert_results(got, want, dtype, scale=np.sqrt(xs[0] * xs[2] * xs[3]))
    assert np.array_equal(x, x0) and np.array_equal(w, w0) and np.array_equal(gy, gy0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", TINY_SAME, ids=[c[0] for c in TINY_SAME])
def test_plane_kernels_on_the_smallest_same_planes(case, dtype, monkeypatch):
    from fastconv._algorithms import direct as D
    monkeypatch.setattr(D, "_CV", False)
    _, xs = case
    c = xs[1]
    kw = dict(padding=1, groups=c)
    rng = np.random.default_rng(2)
    x, w, b = random_array(rng, xs, dtype), random_array(rng, (c, 1, 3, 3), dtype), random_array(rng, c, dtype)
    gy = random_array(rng, xs, dtype)
    got = run_conv("direct", x, w, b, gy, **kw)
    want = {"forward": ref.conv2d(x, w, b, **kw), "grad_input": ref.conv2d_grad_input(gy, x.shape, w, **kw),
            "grad_weight": ref.conv2d_grad_weight(gy, x, w.shape, **kw), "grad_bias": ref.conv2d_grad_bias(gy)}
    assert_results(got, want, dtype, scale=np.sqrt(xs[0] * xs[2] * xs[3]))


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("where", ["x", "gy"])
def test_depthwise_nonfinite_propagates_like_the_reference(stride, where):
    # an Inf in the input must not turn the columns the fast grad_weight discards into NaN; the
    # flat 3x3 'same' grad_weight takes only finite planes (of both), at the edges too
    rng = np.random.default_rng(1)
    x = random_array(rng, (2, 3, 9, 9), np.float64)
    w = random_array(rng, (3, 1, 3, 3), np.float64)
    kw = {"padding": 1, "stride": stride, "groups": 3}
    gy = random_array(rng, ref.conv2d(x, w, **kw).shape, np.float64)
    a = x if where == "x" else gy
    a[0, 1, 4, a.shape[3] - 1] = np.inf
    a[1, 2, 0, 3] = np.nan
    y = fastconv.conv2d(x, w, algorithm="direct", **kw)
    g = fastconv.conv2d_backward(gy, x, w, algorithm="direct", **kw)
    for got, want in ((y, ref.conv2d(x, w, **kw)), (g.grad_weight, ref.conv2d_grad_weight(gy, x, w.shape, **kw))):
        np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
        np.testing.assert_array_equal(np.isinf(got), np.isinf(want))
        fin = np.isfinite(want)
        np.testing.assert_allclose(got[fin], want[fin], rtol=1e-10, atol=1e-10)


def test_depthwise_is_deterministic():
    rng = np.random.default_rng(2)
    x = random_array(rng, (3, 16, 20, 21), np.float32)
    w = random_array(rng, (16, 1, 3, 3), np.float32)
    gy = random_array(rng, (3, 16, 20, 21), np.float32)
    kw = {"padding": 1, "groups": 16}
    a = [fastconv.conv2d(x, w, algorithm="direct", **kw) for _ in range(2)]
    g = [fastconv.conv2d_backward(gy, x, w, algorithm="direct", **kw) for _ in range(2)]
    assert np.array_equal(a[0], a[1])
    assert np.array_equal(g[0].grad_input, g[1].grad_input) and np.array_equal(g[0].grad_weight, g[1].grad_weight)
