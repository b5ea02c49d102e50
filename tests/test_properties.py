"""Hypothesis property tests over shapes and arguments, against the NumPy reference."""
import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

import fastconv
import reference as ref
from conftest import ALGORITHMS, TOL, assert_results, run_conv

small = st.integers(1, 3)
pair_or_int = lambda s: st.one_of(s, st.tuples(s, s))  # noqa: E731


@st.composite
def conv_cases(draw):
    groups = draw(st.integers(1, 3))
    cg, kg = draw(small), draw(small)
    r, s = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    dilation = draw(pair_or_int(st.integers(1, 2)))
    padding = draw(st.one_of(pair_or_int(st.integers(0, 2)), st.sampled_from(["same", "valid"])))
    stride = 1 if padding == "same" else draw(pair_or_int(st.integers(1, 3)))
    n, h, w = draw(st.integers(0, 2)), draw(st.integers(1, 9)), draw(st.integers(1, 9))
    kw = {"stride": stride, "padding": padding, "dilation": dilation, "groups": groups}
    x_shape, w_shape = (n, cg * groups, h, w), (kg * groups, cg, r, s)
    (pt, pb), (pl, pr) = ref.conv_pads(padding, (r, s), stride, dilation)
    dh, dw = (dilation, dilation) if isinstance(dilation, int) else dilation
    assume(h + pt + pb >= dh * (r - 1) + 1 and w + pl + pr >= dw * (s - 1) + 1)
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    seed = draw(st.integers(0, 2**16))
    return x_shape, w_shape, kw, dtype, seed


def _conv_inputs(case):
    x_shape, w_shape, kw, dtype, seed = case
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(x_shape).astype(dtype)
    w = rng.standard_normal(w_shape).astype(dtype)
    b = rng.standard_normal(w_shape[0]).astype(dtype)
    y_ref = ref.conv2d(x, w, b, **kw)
    gy = rng.standard_normal(y_ref.shape).astype(dtype)
    return x, w, b, gy, kw, y_ref


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@given(case=conv_cases())
def test_conv_matches_reference(algorithm, case):
    x, w, b, gy, kw, y_ref = _conv_inputs(case)
    got = run_conv(algorithm, x, w, b, gy, **kw)
    want = {"forward": y_ref,
            "grad_input": ref.conv2d_grad_input(gy, x.shape, w, **kw),
            "grad_weight": ref.conv2d_grad_weight(gy, x, w.shape, **kw),
            "grad_bias": ref.conv2d_grad_bias(gy)}
    assert_results(got, want, x.dtype)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@given(case=conv_cases())
def test_conv_grad_input_is_the_adjoint_of_the_forward(algorithm, case):
    # <conv(x, w), gy> == <x, grad_input(gy)> and == <w, grad_weight(gy)> without bias
    x, w, _, gy, kw, _ = _conv_inputs(case)
    got = run_conv(algorithm, x, w, None, gy, **kw)
    lhs = float(np.vdot(got["forward"].astype(np.float64), gy))
    rtol, atol = TOL[np.dtype(x.dtype)]["grad"]
    # plain floats: pytest >= 9.2 rejects numpy scalars as approx tolerances
    scale = float(atol * (1 + np.abs(got["forward"]).sum() + np.abs(gy).sum()))
    assert float(np.vdot(x.astype(np.float64), got["grad_input"])) == pytest.approx(lhs, rel=rtol, abs=scale)
    assert float(np.vdot(w.astype(np.float64), got["grad_weight"])) == pytest.approx(lhs, rel=rtol, abs=scale)


@st.composite
def pool_cases(draw, with_dilation):
    kh, kw = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    ph, pw = draw(st.integers(0, kh // 2)), draw(st.integers(0, kw // 2))
    stride = draw(st.one_of(st.none(), pair_or_int(st.integers(1, 3))))
    dilation = draw(pair_or_int(st.integers(1, 3))) if with_dilation else 1
    ceil_mode = draw(st.booleans())
    n, c, h, w = draw(st.integers(0, 2)), draw(st.integers(1, 2)), draw(st.integers(1, 9)), draw(st.integers(1, 9))
    sh, sw = (kh, kw) if stride is None else ((stride, stride) if isinstance(stride, int) else stride)
    dh, dw = (dilation, dilation) if isinstance(dilation, int) else dilation
    assume(ref.pool_out_size(h, ph, kh, sh, dh, ceil_mode) >= 1)
    assume(ref.pool_out_size(w, pw, kw, sw, dw, ceil_mode) >= 1)
    args = {"kernel_size": (kh, kw), "stride": stride, "padding": (ph, pw), "ceil_mode": ceil_mode}
    if with_dilation:
        args["dilation"] = dilation
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    return (n, c, h, w), args, dtype, draw(st.integers(0, 2**16))


@given(case=pool_cases(with_dilation=True))
def test_max_pool_matches_reference(case):
    shape, kw, dtype, seed = case
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(dtype)
    if x.size:
        x.flat[rng.integers(x.size)] = np.nan  # NaN must propagate exactly as the reference
    y, idx = fastconv.max_pool2d(x, **kw, return_indices=True)
    y_ref, idx_ref = ref.max_pool2d(x, **kw)
    assert y.shape == y_ref.shape and y.dtype == dtype and idx.dtype == np.int64
    np.testing.assert_array_equal(y, y_ref)
    np.testing.assert_array_equal(idx, idx_ref)
    gy = rng.standard_normal(y.shape).astype(dtype)
    in_range = (idx_ref >= 0) & (idx_ref < shape[2] * shape[3])
    assume(in_range.all())  # a window wholly outside the input has no valid index (as PyTorch)
    assert_results({"grad_input": fastconv.max_pool2d_backward(gy, idx, shape)},
                   {"grad_input": ref.max_pool2d_backward(gy, idx_ref, shape)}, dtype)


@given(case=pool_cases(with_dilation=False), count_include_pad=st.booleans())
def test_avg_pool_matches_reference(case, count_include_pad):
    shape, kw, dtype, seed = case
    kw = dict(kw, count_include_pad=count_include_pad)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(dtype)
    y_ref = ref.avg_pool2d(x, **kw)
    gy = rng.standard_normal(y_ref.shape).astype(dtype)
    got = {"forward": fastconv.avg_pool2d(x, **kw), "grad_input": fastconv.avg_pool2d_backward(gy, shape, **kw)}
    assert_results(got, {"forward": y_ref, "grad_input": ref.avg_pool2d_backward(gy, shape, **kw)}, dtype)
