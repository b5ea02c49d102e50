"""Channels_last end to end: batch norm and the element-wise ops in (N, H, W, C) memory, the recorded
layout conversion (``contiguous``) and ``Module.to(memory_format=...)``, checked against the same
computation in NCHW (itself checked against PyTorch and the NumPy reference elsewhere)."""
import numpy as np
import pytest

import fastconv
from fastconv import autograd as A
from fastconv import layers_extra as LX
from fastconv._algorithms import nhwc
from fastconv.models import MODELS


def _cl(a):
    """A channels_last copy of the NCHW array ``a``."""
    return np.ascontiguousarray(a.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)


def _is_cl(a):
    return nhwc.is_channels_last(a)


def _tol(dtype):
    return {"rtol": 1e-5, "atol": 1e-6} if dtype == np.float32 else {"rtol": 1e-12, "atol": 1e-12}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(4, 16, 5, 7), (2, 3, 4, 4), (3, 70, 2, 3)])
@pytest.mark.parametrize("act", [None, "relu", "relu6"])
@pytest.mark.parametrize("training", [True, False])
def test_batch_norm_channels_last_matches_nchw(dtype, shape, act, training):
    rng = np.random.default_rng(0)
    c = shape[1]
    x = (rng.standard_normal(shape) * 3 + 1).astype(dtype)
    x[0, 0, 0, 0] = 9.0  # some clamped by relu6
    w, b = rng.standard_normal(c).astype(dtype), rng.standard_normal(c).astype(dtype)
    gy = rng.standard_normal(shape).astype(dtype)
    rm, rv = rng.standard_normal(c).astype(dtype), rng.random(c).astype(dtype) + 0.5
    stats = {}
    for name, xx, gg in (("nchw", x, gy), ("cl", _cl(x), _cl(gy))):
        rmc, rvc = rm.copy(), rv.copy()
        xt, wt, bt = A.Tensor(xx, True), A.Parameter(w.copy()), A.Parameter(b.copy())
        y = LX.batch_norm(xt, rmc, rvc, wt, bt, training=training, activation=act)
        y.backward(gg)
        stats[name] = (y.numpy(), xt.grad, wt.grad, bt.grad, rmc, rvc)
    y0, y1 = stats["nchw"][0], stats["cl"][0]
    assert _is_cl(y1) and _is_cl(stats["cl"][1]) and not _is_cl(y0)
    for a, b_ in zip(stats["nchw"], stats["cl"]):
        np.testing.assert_allclose(b_, a, **_tol(dtype))


def test_batch_norm_channels_last_with_gradient_in_the_other_layout():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((4, 16, 3, 5))
    gy = rng.standard_normal(x.shape)
    g_cl = fastconv.batch_norm_backward(_cl(gy), _cl(x), None, None, training=True)
    g_mixed = fastconv.batch_norm_backward(gy, _cl(x), None, None, training=True)
    g_nchw = fastconv.batch_norm_backward(gy, x, None, None, training=True)
    assert _is_cl(g_cl.grad_input) and _is_cl(g_mixed.grad_input)
    np.testing.assert_array_equal(g_mixed.grad_input, g_cl.grad_input)
    for a, b in zip(g_nchw, g_cl):
        np.testing.assert_allclose(b, a, rtol=1e-12, atol=1e-12)
    # an NCHW out= array takes the NCHW path, whatever x's layout
    out = np.empty(x.shape)
    fastconv.batch_norm(_cl(x), None, None, training=True, out=out)
    np.testing.assert_allclose(out, fastconv.batch_norm(x, None, None, training=True), rtol=1e-12, atol=1e-12)


def test_batch_norm_channels_last_bits_do_not_depend_on_the_threads():
    rng = np.random.default_rng(2)
    x = _cl(rng.standard_normal((8, 32, 9, 9)).astype(np.float32))
    gy = _cl(rng.standard_normal(x.shape).astype(np.float32))
    runs = []
    for n in (1, fastconv.max_threads()):
        with fastconv.threads(n):
            y = fastconv.batch_norm(x, None, None, training=True)
            g = fastconv.batch_norm_backward(gy, x, None, None, training=True)
        runs.append((y, *g))
    for a, b in zip(*runs):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("op, grad", [
    (fastconv.relu, fastconv.relu_backward),
    (fastconv.relu6, fastconv.relu6_backward),
    (lambda x: fastconv.leaky_relu(x, 0.1), lambda g, x: fastconv.leaky_relu_backward(g, x, 0.1)),
])
def test_element_wise_ops_keep_channels_last(op, grad):
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((2, 5, 3, 4)) * 4).astype(np.float32)
    gy = rng.standard_normal(x.shape).astype(np.float32)
    y, g = op(_cl(x)), grad(_cl(gy), _cl(x))
    assert _is_cl(y) and _is_cl(g)
    np.testing.assert_array_equal(y, op(x))
    np.testing.assert_array_equal(g, grad(gy, x))
    np.testing.assert_array_equal(grad(gy, _cl(x)), g)  # a gradient in the other layout: same values


def test_contiguous_converts_and_sends_the_gradient_back_in_the_input_layout():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, 3, 4, 5))
    xt = A.Tensor(x, True)
    y = A.contiguous(xt, "channels_last")
    assert _is_cl(y.numpy()) and np.array_equal(y.numpy(), x)
    gy = rng.standard_normal(x.shape)
    (y * A.Tensor(gy)).sum().backward()
    assert xt.grad.flags.c_contiguous and np.array_equal(xt.grad, gy)
    back = A.Tensor(_cl(x), True)
    z = A.contiguous(back, "contiguous_format")
    assert z.numpy().flags.c_contiguous
    (z * A.Tensor(gy)).sum().backward()
    assert _is_cl(back.grad) and np.array_equal(back.grad, gy)
    assert A.contiguous(y, "channels_last") is y  # already in that layout
    one = A.Tensor(np.zeros((2, 1, 3, 3)))
    assert A.contiguous(one, "channels_last") is one  # one channel: both layouts
    with pytest.raises(ValueError, match="contiguous: memory_format must be one of"):
        A.contiguous(xt, "nhwc")
    with pytest.raises(ValueError, match=r"contiguous: input must be 4-D \(N, C, H, W\), got shape \(3,\)"):
        A.contiguous(np.zeros(3), "channels_last")


@pytest.mark.parametrize("name", sorted(MODELS))
def test_models_in_channels_last_match_nchw(name):
    """Same outputs and parameter gradients (1e-5 relative), and the activations do stay
    channels_last (every convolution's output)."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((4, 1, 28, 28)).astype(np.float32)
    labels = rng.integers(0, 10, 4)
    grads, outs = [], []
    for fmt in (None, "channels_last"):
        model = MODELS[name](rng=0)
        if fmt:
            model.to(memory_format=fmt)
            seen = []
            for m in model.modules():
                if isinstance(m, fastconv.layers.Conv2d):
                    orig = m.forward
                    m.forward = (lambda f: lambda inp: (lambda y: (seen.append(y.numpy()), y)[1])(f(inp)))(orig)
        model.train()
        out = model(x)
        fastconv.CrossEntropyLoss()(out, labels).backward()
        outs.append(out.numpy())
        grads.append({k: p.grad for k, p in model.named_parameters()})
    assert seen and all(_is_cl(a) for a in seen)
    np.testing.assert_allclose(outs[1], outs[0], rtol=1e-5, atol=1e-6)
    for k in grads[0]:
        scale = max(1e-3, float(np.abs(grads[0][k]).max()))
        np.testing.assert_allclose(grads[1][k], grads[0][k], rtol=1e-4, atol=1e-5 * scale, err_msg=k)


def test_module_to_rejects_unknown_memory_formats():
    with pytest.raises(ValueError, match=r"ResNet.to: memory_format must be one of \('channels_last', "
                                         r"'contiguous_format'\), got 'nhwc'"):
        MODELS["resnet"](rng=0).to(memory_format="nhwc")
    net = MODELS["resnet"](rng=0).to(memory_format="channels_last").to(memory_format="contiguous_format")
    assert not _is_cl(net.stem[0](np.zeros((1, 1, 6, 6), np.float32)).numpy())
