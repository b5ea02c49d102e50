"""Layers, loss and optimisers: against PyTorch with the same initial weights (forward, every
gradient, SGD and Adam steps), float64 finite differences for CrossEntropyLoss and Linear, the
initialisation, save/load and the layers' own errors."""
import math

import numpy as np
import pytest

import fastconv
from fastconv.layers import (SGD, Adam, AvgPool2d, Conv2d, CrossEntropyLoss, Flatten, Linear, MaxPool2d,
                             Module, Parameter, ReLU, Sequential)

from conftest import ALGORITHMS, TOL, skip_if_unsupported

FD_EPS = 1e-6


def small_net(dtype, rng=0, algorithm="auto"):
    """Every layer type once: conv (padding) -> relu -> max-pool -> grouped strided conv -> relu
    -> avg-pool -> flatten -> linear -> relu -> linear."""
    rng = np.random.default_rng(rng)
    return Sequential(
        Conv2d(2, 4, 3, padding=1, dtype=dtype, rng=rng, algorithm=algorithm), ReLU(), MaxPool2d(2),
        Conv2d(4, 6, 3, stride=2, padding=1, groups=2, dtype=dtype, rng=rng, algorithm=algorithm), ReLU(),
        AvgPool2d(2), Flatten(), Linear(6, 8, dtype=dtype, rng=rng), ReLU(), Linear(8, 3, dtype=dtype, rng=rng),
    )


def torch_twin(torch, model):
    """The same network in PyTorch with a copy of ``model``'s parameters."""
    nn = torch.nn
    layers = []
    for layer in model:
        if isinstance(layer, Conv2d):
            layers.append(nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride,
                                    layer.padding, layer.dilation, layer.groups, layer.bias is not None))
        elif isinstance(layer, Linear):
            layers.append(nn.Linear(layer.in_features, layer.out_features, layer.bias is not None))
        elif isinstance(layer, MaxPool2d):
            layers.append(nn.MaxPool2d(layer.kernel_size, layer.stride, layer.padding, layer.dilation))
        elif isinstance(layer, AvgPool2d):
            layers.append(nn.AvgPool2d(layer.kernel_size, layer.stride, layer.padding))
        elif isinstance(layer, ReLU):
            layers.append(nn.ReLU())
        elif isinstance(layer, Flatten):
            layers.append(nn.Flatten())
    net = nn.Sequential(*layers)
    dtype = torch.float64 if model[0].dtype == np.float64 else torch.float32
    net = net.to(dtype)
    with torch.no_grad():
        net.load_state_dict({k: torch.from_numpy(v) for k, v in model.state_dict().items()})
    return net


def data(dtype, n=5, seed=3):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, 2, 8, 8)).astype(dtype), rng.integers(0, 3, n)


def assert_close(got, want, dtype, kind="grad", scale=1.0, err_msg=""):
    rtol, atol = TOL[np.dtype(dtype)][kind]
    assert got.shape == tuple(want.shape), err_msg
    np.testing.assert_allclose(got, want, rtol=rtol * scale, atol=atol * scale, err_msg=err_msg)


# --------------------------------------------------------------------------- against PyTorch
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("algorithm", ALGORITHMS + ("auto",))
def test_network_forward_backward_matches_torch(torch, dtype, algorithm):
    model = small_net(dtype, algorithm=algorithm)
    net = torch_twin(torch, model)
    x, y = data(dtype)
    loss_fn = CrossEntropyLoss()
    try:
        logits = model(x)
        loss = loss_fn(logits, y)
        gx = model.backward(loss_fn.backward())
    except ValueError as exc:
        if isinstance(exc, fastconv.AlgorithmUnavailable):
            pytest.skip(str(exc))
        raise
    xt = torch.from_numpy(x).requires_grad_(True)
    out = net(xt)
    lt = torch.nn.functional.cross_entropy(out, torch.from_numpy(y))
    lt.backward()
    assert logits.dtype == dtype and gx.dtype == dtype
    assert_close(logits, out.detach().numpy(), dtype, "forward", err_msg="logits")
    assert math.isclose(loss, lt.item(), rel_tol=TOL[np.dtype(dtype)]["forward"][0] * 10)
    assert_close(gx, xt.grad.numpy(), dtype, err_msg="grad_input")
    grads = dict(net.named_parameters())
    for name, p in model.named_parameters():
        assert p.grad.dtype == dtype
        assert_close(p.grad, grads[name].grad.numpy(), dtype, err_msg=name)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name, kwargs", [
    pytest.param("SGD", dict(lr=0.1), id="sgd"),
    pytest.param("SGD", dict(lr=0.1, momentum=0.9, weight_decay=1e-2), id="sgd-momentum-wd"),
    pytest.param("SGD", dict(lr=0.1, momentum=0.9, nesterov=True), id="sgd-nesterov"),
    pytest.param("SGD", dict(lr=0.1, momentum=0.5, dampening=0.3), id="sgd-dampening"),
    pytest.param("Adam", dict(lr=0.01), id="adam"),
    pytest.param("Adam", dict(lr=0.01, betas=(0.8, 0.99), eps=1e-6, weight_decay=1e-2), id="adam-wd"),
])
def test_optimizer_steps_match_torch(torch, dtype, name, kwargs):
    model = small_net(dtype)
    net = torch_twin(torch, model)
    opt = {"SGD": SGD, "Adam": Adam}[name](model.parameters(), **kwargs)
    topt = getattr(torch.optim, name)(net.parameters(), **kwargs)
    loss_fn = CrossEntropyLoss()
    for step in range(3):  # the second and third steps use the momentum / moment buffers
        x, y = data(dtype, seed=10 + step)
        opt.zero_grad()
        loss_fn(model(x), y)
        model.backward(loss_fn.backward(), input_grad=False)
        opt.step()
        topt.zero_grad()
        torch.nn.functional.cross_entropy(net(torch.from_numpy(x)), torch.from_numpy(y)).backward()
        topt.step()
    tparams = dict(net.named_parameters())
    for pname, p in model.named_parameters():
        assert_close(p.data, tparams[pname].detach().numpy(), dtype, scale=10, err_msg=f"{name} {pname}")


def test_default_init_matches_torch_distribution(torch):
    # PyTorch: kaiming_uniform_(a=sqrt(5)) = U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weight and bias
    for ours, theirs, fan_in in [
        (Conv2d(8, 64, (3, 5), groups=2, rng=0), torch.nn.Conv2d(8, 64, (3, 5), groups=2), 4 * 15),
        (Linear(300, 200, rng=0), torch.nn.Linear(300, 200), 300),
    ]:
        bound = 1 / math.sqrt(fan_in)
        for name, p in ours.named_parameters():
            t = getattr(theirs, name).detach().numpy()
            assert p.data.shape == t.shape and p.data.dtype == np.float32
            assert np.abs(p.data).max() <= bound and np.abs(t).max() <= bound
            if p.data.size > 1000:  # uniform on [-b, b]: std b/sqrt(3)
                assert abs(p.data.std() - bound / math.sqrt(3)) < 0.05 * bound
                assert abs(t.std() - bound / math.sqrt(3)) < 0.05 * bound


def test_rng_makes_init_reproducible():
    a, b = Conv2d(3, 4, 3, rng=7), Conv2d(3, 4, 3, rng=np.random.default_rng(7))
    np.testing.assert_array_equal(a.weight.data, b.weight.data)
    assert not np.array_equal(a.weight.data, Conv2d(3, 4, 3, rng=8).weight.data)


# --------------------------------------------------------------------------- finite differences
def numeric_grad(f, a, eps=FD_EPS):
    g = np.zeros_like(a)
    it = np.nditer(a, flags=["multi_index"])
    for _ in it:
        i = it.multi_index
        old = a[i]
        a[i] = old + eps
        fp = f()
        a[i] = old - eps
        fm = f()
        a[i] = old
        g[i] = (fp - fm) / (2 * eps)
    return g


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_cross_entropy_finite_differences(reduction):
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((4, 5)) * 3
    target = np.array([0, 4, 2, 2])
    loss_fn = CrossEntropyLoss(reduction)
    loss_fn(logits, target)
    analytic = loss_fn.backward()
    numeric = numeric_grad(lambda: loss_fn(logits, target), logits)
    np.testing.assert_allclose(analytic, numeric, rtol=1e-7, atol=1e-9)


def test_cross_entropy_is_stable_and_matches_torch(torch):
    logits = np.array([[1e4, 0.0, -1e4], [-1e4, 1e4, 1e4], [0.0, 0.0, 0.0]], np.float32)
    target = np.array([0, 1, 2])
    loss_fn = CrossEntropyLoss()
    loss = loss_fn(logits, target)
    grad = loss_fn.backward()
    want = torch.nn.functional.cross_entropy(torch.from_numpy(logits), torch.from_numpy(target))
    assert math.isfinite(loss) and np.isfinite(grad).all()
    assert math.isclose(loss, want.item(), rel_tol=1e-6)


def test_linear_finite_differences():
    rng = np.random.default_rng(1)
    fc = Linear(4, 3, dtype=np.float64, rng=2)
    x = rng.standard_normal((5, 4))
    gy = rng.standard_normal((5, 3))

    def f():
        return float((fc(x) * gy).sum())

    fc(x)
    gx = fc.backward(gy)
    np.testing.assert_allclose(gx, numeric_grad(f, x), rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(fc.weight.grad, numeric_grad(f, fc.weight.data), rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(fc.bias.grad, numeric_grad(f, fc.bias.data), rtol=1e-7, atol=1e-9)


def test_conv_layer_finite_differences():
    rng = np.random.default_rng(2)
    conv = Conv2d(2, 3, 3, stride=(1, 2), padding=1, dilation=(2, 1), dtype=np.float64, rng=3)
    x = rng.standard_normal((2, 2, 6, 5))
    gy = rng.standard_normal(conv(x).shape)

    def f():
        return float((conv(x) * gy).sum())

    conv(x)
    gx = conv.backward(gy)
    np.testing.assert_allclose(gx, numeric_grad(f, x), rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(conv.weight.grad, numeric_grad(f, conv.weight.data), rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(conv.bias.grad, numeric_grad(f, conv.bias.data), rtol=1e-6, atol=1e-8)


# --------------------------------------------------------------------------- behaviour
def test_gradients_accumulate_until_zero_grad():
    model = small_net(np.float64)
    x, y = data(np.float64)
    loss_fn = CrossEntropyLoss()
    loss_fn(model(x), y)
    model.backward(loss_fn.backward())
    once = [p.grad.copy() for p in model.parameters()]
    loss_fn(model(x), y)
    model.backward(loss_fn.backward())
    for g, p in zip(once, model.parameters()):
        np.testing.assert_allclose(p.grad, 2 * g)
    model.zero_grad()
    assert all(not p.grad.any() for p in model.parameters())


def test_input_grad_false_gives_the_same_parameter_gradients():
    x, y = data(np.float64)
    grads = []
    for input_grad in (True, False):
        model = small_net(np.float64)
        loss_fn = CrossEntropyLoss()
        loss_fn(model(x), y)
        gx = model.backward(loss_fn.backward(), input_grad=input_grad)
        assert (gx is None) == (not input_grad)
        grads.append([p.grad for p in model.parameters()])
    for a, b in zip(*grads):
        np.testing.assert_array_equal(a, b)


def test_backward_needs_a_forward_first():
    conv = Conv2d(1, 1, 1)
    with pytest.raises(RuntimeError, match=r"Conv2d.backward: call forward first"):
        conv.backward(np.zeros((1, 1, 2, 2), np.float32))
    conv(np.zeros((1, 1, 2, 2), np.float32))
    conv.backward(np.zeros((1, 1, 2, 2), np.float32))
    with pytest.raises(RuntimeError, match=r"one backward per forward"):
        conv.backward(np.zeros((1, 1, 2, 2), np.float32))
    with pytest.raises(RuntimeError, match=r"CrossEntropyLoss.backward: call the loss first"):
        CrossEntropyLoss().backward()


def test_forward_errors_name_the_operation():
    with pytest.raises(TypeError, match=r"Conv2d: input must have the layer's dtype float32, got float64"):
        Conv2d(1, 2, 3)(np.zeros((1, 1, 4, 4), np.float64))
    assert Conv2d(1, 2, 3)(np.zeros((1, 4, 4), np.float32)).shape == (2, 2, 2)  # unbatched, as nn.Conv2d
    with pytest.raises(ValueError, match=r"conv2d: input must be 3-D \(unbatched\) or 4-D \(batched\), got 2-D"):
        Conv2d(1, 2, 3)(np.zeros((4, 4), np.float32))
    with pytest.raises(ValueError, match=r"Linear: input must have shape \(N, 3\), got \(2, 4\)"):
        Linear(3, 2)(np.zeros((2, 4), np.float32))
    with pytest.raises(TypeError, match=r"Flatten: input must be a numpy.ndarray"):
        Flatten()([1, 2])
    with pytest.raises(TypeError, match=r"relu: input must be a numpy.ndarray"):
        ReLU()([1.0])
    with pytest.raises(ValueError, match=r"CrossEntropyLoss: target must lie in \[0, 3\), got values from 0 to 3"):
        CrossEntropyLoss()(np.zeros((2, 3)), np.array([0, 3]))
    with pytest.raises(TypeError, match=r"CrossEntropyLoss: target must be an integer"):
        CrossEntropyLoss()(np.zeros((2, 3)), np.array([0.0, 1.0]))
    with pytest.raises(ValueError, match=r"CrossEntropyLoss: target must have shape \(2,\)"):
        CrossEntropyLoss()(np.zeros((2, 3)), np.array([0]))


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_conv_layer_uses_the_named_algorithm(algorithm):
    conv = Conv2d(3, 4, 3, padding="same", algorithm=algorithm, dtype=np.float64, rng=0)
    x = np.random.default_rng(0).standard_normal((2, 3, 7, 7))
    try:
        want = fastconv.conv2d(x, conv.weight.data, conv.bias.data, padding="same", algorithm=algorithm)
    except ValueError as exc:
        skip_if_unsupported(exc)
    np.testing.assert_array_equal(conv(x), want)
    # and its backward: the same gradients as the functional op with that algorithm
    gy = np.random.default_rng(1).standard_normal(want.shape)
    g = fastconv.conv2d_backward(gy, x, conv.weight.data, padding="same", algorithm=algorithm)
    np.testing.assert_array_equal(conv.backward(gy), g.grad_input)
    np.testing.assert_array_equal(conv.weight.grad, g.grad_weight)


def test_failed_backward_keeps_the_forward_state():
    conv, fc, flat = Conv2d(2, 3, 3, dtype=np.float64, rng=0), Linear(4, 2, dtype=np.float64, rng=0), Flatten()
    x = np.ones((1, 2, 5, 5))
    y = conv(x)
    with pytest.raises(ValueError, match=r"Conv2d.backward: grad_output must be an array of the output.s shape \(1, 3, 3, 3\), got \(1, 3, 2, 2\)"):
        conv.backward(np.ones((1, 3, 2, 2)))
    assert conv.backward(np.ones(y.shape)).shape == x.shape  # retried with the right shape
    with pytest.raises(RuntimeError, match=r"Conv2d.backward: call forward first"):
        conv.backward(np.ones(y.shape))  # one backward per forward
    fc(np.ones((3, 4)))
    with pytest.raises(ValueError, match=r"Linear.backward: grad_output"):
        fc.backward(np.ones((3, 5)))
    assert fc.backward(np.ones((3, 2))).shape == (3, 4)
    flat(np.ones((2, 3, 2, 2)))
    with pytest.raises(ValueError, match=r"Flatten.backward: grad_output must be an array of the output's shape \(2, 12\), got \(2, 11\)"):
        flat.backward(np.ones((2, 11)))
    assert flat.backward(np.ones((2, 12))).shape == (2, 3, 2, 2)


def test_optimizer_arguments_are_checked():
    with pytest.raises(TypeError, match=r"SGD: params must be an iterable of Parameter objects .*got NoneType"):
        SGD(None, lr=0.1)
    with pytest.raises(ValueError, match=r"Adam: eps must be a number > 0, got 0"):
        Adam([Parameter(np.zeros(2))], eps=0)


def test_save_and_load_round_trip(tmp_path):
    model = small_net(np.float32, rng=0)
    other = small_net(np.float32, rng=1)
    model.save(tmp_path / "m")     # exactly this path (numpy.savez alone would append .npz)
    other.load(tmp_path / "m")
    x, _ = data(np.float32)
    np.testing.assert_array_equal(model(x), other(x))
    with pytest.raises(FileNotFoundError, match=r"Sequential.load: no such file"):
        other.load(tmp_path / "missing.npz")
    with pytest.raises(ValueError, match=r"Sequential.load_state_dict: state must have the parameters"):
        Sequential(Linear(2, 2)).load(tmp_path / "m")
    state = model.state_dict()
    state["0.weight"] = state["0.weight"][:1]
    with pytest.raises(ValueError, match=r"0.weight must have shape \(4, 2, 3, 3\), got \(1, 2, 3, 3\)"):
        other.load_state_dict(state)


def test_optimizer_keeps_working_when_data_is_replaced():
    p = Parameter(np.array([1.0, 2.0]))
    opt = SGD([p, p], lr=0.5)   # a parameter listed twice is updated once
    p.grad[:] = 1.0
    opt.step()
    np.testing.assert_array_equal(p.data, [0.5, 1.5])
    p.data = np.array([10.0, 20.0])  # rebinding by the user is picked up at the next step
    opt.step()
    np.testing.assert_array_equal(p.data, [9.5, 19.5])
    opt.zero_grad()
    assert not p.grad.any()


def test_optimizer_groups_mixed_dtypes():
    a, b = Parameter(np.ones(2, np.float32)), Parameter(np.ones(3))
    a.grad[:] = 1
    b.grad[:] = 2
    Adam([a, b], lr=0.1).step()
    assert a.data.dtype == np.float32 and b.data.dtype == np.float64
    np.testing.assert_allclose(a.data, 0.9, rtol=1e-6)
    np.testing.assert_allclose(b.data, 0.9, rtol=1e-6)


def test_training_reduces_the_loss():
    model = small_net(np.float32)
    opt = Adam(model.parameters(), lr=0.05)
    loss_fn = CrossEntropyLoss()
    x, y = data(np.float32, n=8)
    first = loss_fn(model(x), y)
    for _ in range(30):
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        model.backward(loss_fn.backward(), input_grad=False)
        opt.step()
    assert loss < 0.2 * first


def test_layer_output_shapes_and_repr():
    model = small_net(np.float32)
    assert model.output_shape((2, 8, 8)) == (3,)
    x, _ = data(np.float32, n=1)
    shape = x.shape[1:]
    for layer in model:
        x = layer(x)
        shape = layer.output_shape(shape)
        assert x.shape[1:] == shape, layer
    assert "Conv2d(2, 4, kernel_size=(3, 3)" in repr(model)
    assert isinstance(model, Module) and model.num_parameters() == sum(p.data.size for p in model.parameters())
