"""conv2d's unbatched (C, H, W) spelling (forward, backward, grad_weight, the recorded op) and its
``out=`` argument; the error rows for both live in test_validation.py's table."""
import numpy as np
import pytest

import fastconv
from conftest import ALGORITHMS, TOL, run_conv

F32, F64 = np.float32, np.float64
# one geometry every algorithm serves (winograd needs 3x3, stride 1), one strided with groups
CASES = [
    pytest.param((3, 7, 6), (4, 3, 3, 3), {"padding": 1}, id="3x3-pad1"),
    pytest.param((4, 9, 8), (6, 2, 3, 3), {"stride": 2, "padding": 1, "groups": 2}, id="s2-groups"),
]


def _arrays(x_shape, w_shape, dtype, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(x_shape).astype(dtype), rng.standard_normal(w_shape).astype(dtype),
            rng.standard_normal(w_shape[0]).astype(dtype))


@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("x_shape, w_shape, kw", CASES)
@pytest.mark.parametrize("algorithm", ALGORITHMS + ("auto",))
def test_unbatched_is_the_batched_result_without_its_batch_axis(algorithm, x_shape, w_shape, kw, dtype):
    x, w, b = _arrays(x_shape, w_shape, dtype)
    batched = run_conv(algorithm, x[None], w, b, **kw)  # skips where the algorithm cannot serve the case
    gy = np.random.default_rng(1).standard_normal(batched["forward"].shape[1:]).astype(dtype)
    batched = run_conv(algorithm, x[None], w, b, gy[None], **kw)
    y = fastconv.conv2d(x, w, b, algorithm=algorithm, **kw)
    g = fastconv.conv2d_backward(gy, x, w, algorithm=algorithm, **kw)
    gw, gb = fastconv.conv2d_grad_weight(gy, x, w, algorithm=algorithm, **kw)
    assert y.shape == batched["forward"].shape[1:] and y.dtype == dtype
    assert g.grad_input.shape == x.shape and g.grad_input.dtype == dtype
    # same algorithm, same thread count, same bits
    np.testing.assert_array_equal(y, batched["forward"][0])
    np.testing.assert_array_equal(g.grad_input, batched["grad_input"][0])
    np.testing.assert_array_equal(g.grad_weight, batched["grad_weight"])
    np.testing.assert_array_equal(g.grad_bias, batched["grad_bias"])
    np.testing.assert_array_equal(gw, batched["grad_weight"])
    np.testing.assert_array_equal(gb, batched["grad_bias"])


@pytest.mark.parametrize("x_shape, w_shape, kw", CASES)
def test_unbatched_matches_torch(torch, x_shape, w_shape, kw):
    x, w, b = _arrays(x_shape, w_shape, F64)
    tx, tw, tb = (torch.from_numpy(a.copy()).requires_grad_(True) for a in (x, w, b))
    ty = torch.nn.functional.conv2d(tx, tw, tb, **kw)  # PyTorch takes (C, H, W) as one image too
    gy = np.random.default_rng(1).standard_normal(tuple(ty.shape))
    ty.backward(torch.from_numpy(gy))
    rtol, atol = TOL[np.dtype(F64)]["grad"]
    np.testing.assert_allclose(fastconv.conv2d(x, w, b, **kw), ty.detach().numpy(), rtol=rtol, atol=atol)
    g = fastconv.conv2d_backward(gy, x, w, **kw)
    for got, want in zip(g, (tx.grad, tw.grad, tb.grad)):
        np.testing.assert_allclose(got, want.numpy(), rtol=rtol, atol=atol)


def test_recorded_conv2d_trains_on_an_unbatched_input():
    x, w, b = _arrays((3, 7, 6), (4, 3, 3, 3), F64)
    tw, tb = fastconv.Parameter(w.copy()), fastconv.Parameter(b.copy())
    y = fastconv.autograd.conv2d(fastconv.Tensor(x), tw, tb, padding=1)
    assert y.shape == (4, 7, 6)
    (y * y).sum().backward()
    g = fastconv.conv2d_backward(2 * np.asarray(y), x, w, padding=1)
    np.testing.assert_allclose(tw.grad, g.grad_weight, rtol=1e-12)
    np.testing.assert_allclose(tb.grad, g.grad_bias, rtol=1e-12)


@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("unbatched", [False, True])
@pytest.mark.parametrize("algorithm", ALGORITHMS + ("auto",))
def test_out_is_written_and_returned(algorithm, unbatched, dtype):
    x, w, b = _arrays((2, 3, 7, 6), (4, 3, 3, 3), dtype)
    x = x[0] if unbatched else x
    try:
        want = fastconv.conv2d(x, w, b, padding=1, algorithm=algorithm)
    except fastconv.AlgorithmUnavailable as exc:
        pytest.skip(str(exc))
    out = np.full(want.shape, np.nan, dtype)  # every element must be overwritten
    assert fastconv.conv2d(x, w, b, padding=1, algorithm=algorithm, out=out) is out
    np.testing.assert_array_equal(out, want)


def test_out_with_an_empty_batch_and_a_non_contiguous_input():
    w = np.ones((2, 3, 3, 3))
    out = np.full((0, 2, 3, 3), np.nan)
    assert fastconv.conv2d(np.zeros((0, 3, 5, 5)), w, out=out) is out
    x = np.random.default_rng(0).standard_normal((1, 3, 5, 10))[..., ::2]  # strided input, contiguous out
    out = np.empty((1, 2, 3, 3))
    fastconv.conv2d(x, w, out=out)
    np.testing.assert_array_equal(out, fastconv.conv2d(x.copy(), w))


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("algorithm", ALGORITHMS + ("auto",))
def test_without_bias_the_bias_gradient_is_skipped_and_the_rest_unchanged(algorithm, layout):
    x, w, _ = _arrays((2, 4, 9, 8), (6, 4, 3, 3), F32)
    gy = np.random.default_rng(2).standard_normal((2, 6, 9, 8)).astype(F32)
    if layout == "channels_last":
        x, gy = (np.ascontiguousarray(a.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2) for a in (x, gy))
    kw = {"padding": 1, "algorithm": algorithm}
    try:
        full = fastconv.conv2d_backward(gy, x, w, **kw)
    except ValueError as e:  # an algorithm that cannot serve the case
        pytest.skip(str(e))
    lean = fastconv.conv2d_backward(gy, x, w, bias=False, **kw)
    assert lean.grad_bias is None and full.grad_bias.shape == (6,)
    np.testing.assert_array_equal(lean.grad_input, full.grad_input)
    np.testing.assert_array_equal(lean.grad_weight, full.grad_weight)
    gw, gb = fastconv.conv2d_grad_weight(gy, x, w, bias=False, **kw)
    assert gb is None
    np.testing.assert_array_equal(gw, fastconv.conv2d_grad_weight(gy, x, w, **kw)[0])
    empty = fastconv.conv2d_backward(gy[:0], x[:0], w, bias=False, **kw)
    assert empty.grad_bias is None and not empty.grad_weight.any()
