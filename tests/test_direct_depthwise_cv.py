"""The direct algorithm's channel-vectorised depthwise kernels (direct/depthwise_cv.py), forced on
and off, against the float64 reference on strides, dilations, paddings, odd channel counts (a
partial last block) and both dtypes; and the rule that picks them (strided layers)."""
import numpy as np
import pytest

import fastconv
from fastconv._algorithms import direct as D
from fastconv._validation import conv_params

GEOMETRIES = [  # (n, c, h, w), stride, padding, dilation
    ((2, 5, 7, 9), 1, 1, 1),
    ((3, 17, 11, 6), 2, 1, 1),
    ((1, 33, 13, 13), 3, 2, 2),
    ((2, 3, 5, 5), 2, 0, 1),
    ((1, 20, 4, 7), (2, 1), (0, 2), (1, 2)),
    ((2, 40, 9, 8), (1, 3), (3, 1), 1),
]


@pytest.fixture
def forced(request, monkeypatch):
    monkeypatch.setattr(D, "_CV", request.param)
    return request.param


@pytest.mark.parametrize("forced", [True, False], indirect=True, ids=["cv", "plane"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("shape, stride, padding, dilation", GEOMETRIES)
def test_depthwise_kernels_match_the_reference(shape, stride, padding, dilation, dtype, forced):
    rng = np.random.default_rng(7)
    n, c, h, w = shape
    x = rng.standard_normal(shape).astype(dtype)
    wt = rng.standard_normal((c, 1, 3, 3)).astype(dtype)
    b = rng.standard_normal(c).astype(dtype)
    kw = dict(stride=stride, padding=padding, dilation=dilation, groups=c)
    y = fastconv.conv2d(x, wt, b, algorithm="direct", **kw)
    gy = rng.standard_normal(y.shape).astype(dtype)
    g = fastconv.conv2d_backward(gy, x, wt, algorithm="direct", **kw)
    x64, w64, b64, gy64 = (a.astype(np.float64) for a in (x, wt, b, gy))
    want_y = fastconv.conv2d(x64, w64, b64, algorithm="im2col", **kw)
    want = fastconv.conv2d_backward(gy64, x64, w64, algorithm="im2col", **kw)
    tol = 1e-12 if dtype == np.float64 else 1e-5
    for got, ref in [(y, want_y), (g.grad_input, want.grad_input), (g.grad_weight, want.grad_weight),
                     (g.grad_bias, want.grad_bias)]:
        assert got.dtype == dtype and got.shape == ref.shape
        np.testing.assert_allclose(got, ref, rtol=tol, atol=tol * max(1.0, float(np.abs(ref).max())))


def test_strided_and_tiny_depthwise_layers_take_the_channel_vectorised_kernels():
    s2 = conv_params("conv2d", (16, 64, 24, 24), (64, 1, 3, 3), np.float32, 2, 1, 1, 64)
    s1 = conv_params("conv2d", (16, 64, 24, 24), (64, 1, 3, 3), np.float32, 1, 1, 1, 64)
    dense = conv_params("conv2d", (16, 64, 24, 24), (64, 64, 3, 3), np.float32, 2, 1, 1, 1)
    assert D._cv_depthwise(s2) and not D._cv_depthwise(s1) and not D._cv_depthwise(dense)
    # stride 1 on planes of at most 36 outputs (MobileNet's 6x6 and 3x3 layers) with 16 channels or more
    tiny = conv_params("conv2d", (16, 256, 6, 6), (256, 1, 3, 3), np.float32, 1, 1, 1, 256)
    small = conv_params("conv2d", (16, 256, 7, 7), (256, 1, 3, 3), np.float32, 1, 1, 1, 256)
    assert D._cv_depthwise(tiny) and not D._cv_depthwise(small)
    one = conv_params("conv2d", (16, 1, 6, 6), (1, 1, 3, 3), np.float32, 1, 1, 1, 1)  # nothing to vectorise
    assert not D._cv_depthwise(one)


@pytest.mark.parametrize("forced", [True], indirect=True, ids=["cv"])
def test_nan_weight_reaches_only_real_terms(forced):
    """grad_input sums only the real products (as PyTorch): a NaN weight taints the input positions
    its tap reaches from real outputs, not the whole plane."""
    x = np.ones((1, 2, 6, 6))
    w = np.ones((2, 1, 3, 3))
    w[0, 0, 0, 0] = np.nan
    gy = np.ones((1, 2, 3, 3))
    gx = fastconv.conv2d_backward(gy, x, w, stride=2, padding=1, groups=2, algorithm="direct").grad_input
    assert np.isfinite(gx[0, 1]).all()
    # tap (0, 0) of output (i, j) reads padded (2i, 2j): input (2i - 1, 2j - 1), i.e. rows/cols 1, 3
    nan = np.isnan(gx[0, 0])
    assert nan[1::2, 1::2][:2, :2].all() and nan.sum() == 4
