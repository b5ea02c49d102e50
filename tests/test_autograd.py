"""The define-by-run tape: gradients that belong to the forward they differentiate.

Each model is written as a ``Module`` subclass and checked against the same model in PyTorch with
the same weights (parameter names as PyTorch's, float32 and float64) and against float64 central
differences along a random direction: two forwards before one backward (same and different batch
sizes), a layer used twice, a residual model, a concat model.  Then the compatibility backward's
refusal, ``no_grad`` (nothing recorded, less memory), ``train``/``eval``, ``Parameter`` as an array,
NumPy on tensors that require grad, losses and the ``DataLoader``.
"""
import tracemalloc

import numpy as np
import pytest

import fastconv
from fastconv import autograd as A
from fastconv.layers import Conv2d, Flatten, Linear, MaxPool2d, Module, ModuleList, ReLU, Sequential
from fastconv.losses import CrossEntropyLoss, MSELoss
from fastconv.optim import SGD

FD_STEP = 1e-6


# --------------------------------------------------------------------------- models
class Residual(Module):
    """conv -> two residual blocks kept in a plain list -> pool -> linear."""

    def __init__(self, dtype, rng=0):
        rng = np.random.default_rng(rng)
        self.stem = Conv2d(2, 4, 3, padding=1, dtype=dtype, rng=rng)
        self.blocks = [Sequential(Conv2d(4, 4, 3, padding=1, dtype=dtype, rng=rng), ReLU(),
                                  Conv2d(4, 4, 3, padding=1, dtype=dtype, rng=rng)) for _ in range(2)]
        self.pool = MaxPool2d(2)
        self.fc = Linear(4 * 3 * 3, 3, dtype=dtype, rng=rng)

    def forward(self, x):
        h = A.relu(self.stem(x))
        for block in self.blocks:
            h = A.relu(h + block(h))
        return self.fc(A.flatten(self.pool(h)))


class Concat(Module):
    """Two branches concatenated on the channel axis (a U-Net skip), then a 1x1 conv and a head."""

    def __init__(self, dtype, rng=0):
        rng = np.random.default_rng(rng)
        self.left = Conv2d(2, 3, 3, padding=1, dtype=dtype, rng=rng)
        self.right = Sequential(Conv2d(2, 2, 1, dtype=dtype, rng=rng), ReLU())
        self.mix = Conv2d(5 + 2, 4, 1, dtype=dtype, rng=rng)
        self.head = Sequential(MaxPool2d(2), Flatten(), Linear(4 * 3 * 3, 3, dtype=dtype, rng=rng))

    def forward(self, x):
        return self.head(A.relu(self.mix(A.cat([self.left(x), self.right(x), x], axis=1))))


class Twice(Module):
    """One conv layer applied twice (weights shared), a second conv in between."""

    def __init__(self, dtype, rng=0):
        rng = np.random.default_rng(rng)
        self.shared = Conv2d(2, 2, 3, padding=1, dtype=dtype, rng=rng)
        self.other = Conv2d(2, 2, 3, padding=1, dtype=dtype, rng=rng)
        self.fc = Linear(2 * 6 * 6, 3, dtype=dtype, rng=rng)

    def forward(self, x):
        h = self.shared(A.relu(self.other(self.shared(x))))
        return self.fc(A.flatten(h))


def plain(dtype, rng=0):
    rng = np.random.default_rng(rng)
    return Sequential(Conv2d(2, 4, 3, padding=1, dtype=dtype, rng=rng), ReLU(), MaxPool2d(2), Flatten(),
                      Linear(4 * 3 * 3, 3, dtype=dtype, rng=rng))


MODELS = {"sequential": plain, "residual": Residual, "concat": Concat, "twice": Twice}


def torch_model(torch, name):
    """The same architecture in PyTorch, with the same parameter names."""
    nn, F = torch.nn, torch.nn.functional

    def seq_plain():
        return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                             nn.Linear(36, 3))

    class TResidual(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(2, 4, 3, padding=1)
            self.blocks = nn.ModuleList(nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
                                                      nn.Conv2d(4, 4, 3, padding=1)) for _ in range(2))
            self.pool = nn.MaxPool2d(2)
            self.fc = nn.Linear(36, 3)

        def forward(self, x):
            h = F.relu(self.stem(x))
            for block in self.blocks:
                h = F.relu(h + block(h))
            return self.fc(torch.flatten(self.pool(h), 1))

    class TConcat(nn.Module):
        def __init__(self):
            super().__init__()
            self.left = nn.Conv2d(2, 3, 3, padding=1)
            self.right = nn.Sequential(nn.Conv2d(2, 2, 1), nn.ReLU())
            self.mix = nn.Conv2d(7, 4, 1)
            self.head = nn.Sequential(nn.MaxPool2d(2), nn.Flatten(), nn.Linear(36, 3))

        def forward(self, x):
            return self.head(F.relu(self.mix(torch.cat([self.left(x), self.right(x), x], 1))))

    class TTwice(nn.Module):
        def __init__(self):
            super().__init__()
            self.shared = nn.Conv2d(2, 2, 3, padding=1)
            self.other = nn.Conv2d(2, 2, 3, padding=1)
            self.fc = nn.Linear(72, 3)

        def forward(self, x):
            return self.fc(torch.flatten(self.shared(F.relu(self.other(self.shared(x)))), 1))

    return {"sequential": seq_plain, "residual": TResidual, "concat": TConcat, "twice": TTwice}[name]()


def batch(dtype, n, seed):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, 2, 6, 6)).astype(dtype), rng.integers(0, 3, n)


def torch_grads(torch, name, model, x, y):
    net = torch_model(torch, name).to(torch.float64 if x.dtype == np.float64 else torch.float32)
    with torch.no_grad():
        net.load_state_dict({k: torch.from_numpy(v) for k, v in model.state_dict().items()})  # names must match
    loss = torch.nn.functional.cross_entropy(net(torch.from_numpy(x)), torch.from_numpy(y))
    loss.backward()
    return loss.item(), {k: p.grad.numpy() for k, p in net.named_parameters()}


def assert_grads_match(model, want, dtype, what):
    got = dict(model.named_parameters())
    assert sorted(got) == sorted(want), what
    for k, g in want.items():
        scale = max(1.0, float(np.abs(g).max()))
        tol = 1e-5 if dtype == np.float32 else 1e-12
        np.testing.assert_allclose(got[k].grad, g, rtol=tol, atol=tol * scale, err_msg=f"{what}: {k}")


# --------------------------------------------------------------------------- against PyTorch
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("between", [None, 4, 7], ids=["one-forward", "then-same-batch", "then-other-batch"])
def test_gradients_match_torch(torch, name, dtype, between):
    """``between``: a second forward (another batch of that size) runs before ``loss.backward()``;
    the gradients must still be those of the first forward (today's per-layer caches mixed them)."""
    model = MODELS[name](dtype)
    x, y = batch(dtype, 4, seed=1)
    loss_fn = CrossEntropyLoss()
    loss = loss_fn(model(x), y)
    if between is not None:
        xb, yb = batch(dtype, between, seed=2)
        other = loss_fn(model(xb), yb)  # a second graph, never differentiated
    loss.backward()
    want_loss, want = torch_grads(torch, name, model, x, y)
    assert loss.dtype == dtype and abs(loss.item() - want_loss) <= 1e-5 * max(1, abs(want_loss))
    assert_grads_match(model, want, dtype, f"{name}, forward in between: {between}")
    if between is not None:
        other.backward()  # the second graph is intact and adds its own gradients
        _, want_b = torch_grads(torch, name, model, xb, yb)
        for k, p in model.named_parameters():
            want_b[k] = want_b[k] + want[k]
        assert_grads_match(model, want_b, dtype, f"{name}: both losses")


# --------------------------------------------------------------------------- finite differences
def loss_value(model, x, y):
    with fastconv.no_grad():
        return CrossEntropyLoss()(model(x), y).item()


@pytest.mark.parametrize("name", list(MODELS))
def test_gradients_match_finite_differences(name):
    """float64 central differences along a random direction of all parameters, after a second
    forward of a different batch size between the loss and its backward."""
    model = MODELS[name](np.float64)
    x, y = batch(np.float64, 3, seed=3)
    loss = CrossEntropyLoss()(model(x), y)
    model(batch(np.float64, 5, seed=4)[0])
    loss.backward()
    rng = np.random.default_rng(5)
    params = list(model.parameters())
    dirs = [rng.standard_normal(p.shape) for p in params]
    analytic = sum(float((p.grad * d).sum()) for p, d in zip(params, dirs))
    for p, d in zip(params, dirs):
        p.data += FD_STEP * d
    up = loss_value(model, x, y)
    for p, d in zip(params, dirs):
        p.data -= 2 * FD_STEP * d
    down = loss_value(model, x, y)
    numeric = (up - down) / (2 * FD_STEP)
    assert abs(analytic - numeric) <= 1e-6 * max(1.0, abs(numeric)), (analytic, numeric)


def test_input_gradient_of_a_branching_model_matches_finite_differences():
    model = Residual(np.float64)
    x, y = batch(np.float64, 2, seed=6)
    xt = fastconv.Tensor(x, requires_grad=True)
    CrossEntropyLoss()(model(xt), y).backward()
    d = np.random.default_rng(7).standard_normal(x.shape)
    numeric = (loss_value(model, x + FD_STEP * d, y) - loss_value(model, x - FD_STEP * d, y)) / (2 * FD_STEP)
    assert abs(float((xt.grad * d).sum()) - numeric) <= 1e-6 * max(1.0, abs(numeric))


def test_frozen_parameter_gets_no_gradient_and_the_others_are_unchanged():
    """A parameter with requires_grad=False (frozen, as in fine-tuning) is a constant: its .grad
    stays zero and every other gradient, and the input's, is what the unfrozen model gives."""
    x, y = batch(np.float64, 2, seed=8)
    grads = []
    for freeze in (False, True):
        model = Residual(np.float64)
        model.stem.weight.requires_grad = not freeze
        xt = fastconv.Tensor(x, requires_grad=True)
        CrossEntropyLoss()(model(xt), y).backward()
        grads.append((xt.grad, {n: p.grad.copy() for n, p in model.named_parameters()}))
    (x0, free), (x1, frozen) = grads
    assert free["stem.weight"].any() and not frozen["stem.weight"].any()
    assert np.array_equal(x0, x1)
    assert all(np.array_equal(free[n], frozen[n]) for n in free if n != "stem.weight")


# --------------------------------------------------------------------------- the graph's lifetime
def test_second_backward_of_one_forward_is_refused():
    model = plain(np.float64)
    loss = CrossEntropyLoss()(model(batch(np.float64, 2, 0)[0]), np.array([0, 1]))
    loss.backward()
    with pytest.raises(RuntimeError, match=r"already differentiated .*\(one backward per forward"):
        loss.backward()


def test_failed_backward_changes_no_gradient():
    model = plain(np.float64)
    out = model(batch(np.float64, 2, 0)[0])
    with pytest.raises(ValueError, match=r"Tensor.backward: gradient must be a float array of the output's shape"):
        out.backward(np.ones((2, 4)))
    assert all(not p.grad.any() for p in model.parameters())
    out.backward(np.ones((2, 3)))  # the graph is intact
    assert model[0].weight.grad.any()


def test_compat_backward_refuses_a_gradient_of_another_forward():
    """The issue's sequence: loss of batch A, a forward of batch B, then the old-style backward."""
    model, loss_fn = plain(np.float64), CrossEntropyLoss()
    xa, ya = batch(np.float64, 4, 8)
    loss_fn(model(xa), ya)
    model(batch(np.float64, 4, 9)[0])
    with pytest.raises(RuntimeError, match=r"Sequential.backward: grad_output is the gradient of a loss computed "
                                           r"from another forward .* call loss.backward\(\) instead"):
        model.backward(loss_fn.backward())
    assert all(not p.grad.any() for p in model.parameters())
    # without a forward in between the old style still works, and agrees with loss.backward()
    loss_fn(model(xa), ya)
    model.backward(loss_fn.backward(), input_grad=False)
    old = [p.grad.copy() for p in model.parameters()]
    model.zero_grad()
    loss_fn(model(xa), ya).backward()
    for a, p in zip(old, model.parameters()):
        np.testing.assert_array_equal(a, p.grad)


def test_no_grad_records_nothing_and_evaluation_is_lighter():
    model = plain(np.float32)
    x = np.random.default_rng(0).standard_normal((256, 2, 6, 6)).astype(np.float32)
    for mode in (fastconv.no_grad, fastconv.enable_grad):  # compile and warm up outside the measurement
        with mode():
            model(x)

    def held_and_peak(grad):
        tracemalloc.start()
        with fastconv.enable_grad() if grad else fastconv.no_grad():
            y = model(x)
        held, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        return y, held, peak

    y0, held_nograd, peak_nograd = held_and_peak(False)
    y1, held_grad, peak_grad = held_and_peak(True)
    assert not y0.requires_grad and y0.grad_fn is None and y1.grad_fn == "LinearBackward"
    np.testing.assert_array_equal(np.asarray(y0), np.asarray(y1))
    assert model._last_out is y1  # only a recorded forward is kept for the compatibility backward
    # the recorded forward keeps every activation (and the pooling indices) for its backward
    assert held_nograd < 0.25 * held_grad, (held_nograd, held_grad)
    assert peak_nograd < peak_grad, (peak_nograd, peak_grad)


def test_train_and_eval_reach_every_submodule():
    model = Residual(np.float32)
    assert all(m.training for m in model.modules())
    assert model.eval() is model and not any(m.training for m in model.modules())
    assert model.blocks[1][2].training is False
    model.train()
    assert all(m.training for m in model.modules())
    assert len(list(model.modules())) == 1 + 1 + 2 * 4 + 1 + 1


def test_parameters_registered_like_torch(torch):
    names = [n for n, _ in Residual(np.float32).named_parameters()]
    assert names == [n for n, _ in torch_model(torch, "residual").named_parameters()]
    twice = Twice(np.float32)
    assert [n for n, _ in twice.named_parameters()] == ["shared.weight", "shared.bias", "other.weight",
                                                        "other.bias", "fc.weight", "fc.bias"]
    listed = ModuleList([twice.shared, twice.shared])  # one layer twice: its parameters once
    assert [n for n, _ in listed.named_parameters()] == ["0.weight", "0.bias"]
    assert sorted(Concat(np.float32).state_dict()) == sorted(torch_model(torch, "concat").state_dict())


def test_state_dict_round_trip_of_a_custom_model(tmp_path):
    a, b = Concat(np.float32, rng=0), Concat(np.float32, rng=1)
    a.save(tmp_path / "concat")  # written to exactly this path
    assert (tmp_path / "concat").exists() and not (tmp_path / "concat.npz").exists()
    b.load(tmp_path / "concat")
    x, _ = batch(np.float32, 2, 0)
    with fastconv.no_grad():
        np.testing.assert_array_equal(np.asarray(a(x)), np.asarray(b(x)))


# --------------------------------------------------------------------------- arrays and tensors
def test_parameter_is_usable_as_an_array():
    conv = Conv2d(1, 2, 3, dtype=np.float64, rng=0)
    w = np.asarray(conv.weight)
    assert w is conv.weight.data and w.shape == (2, 1, 3, 3) and conv.weight.dtype == np.float64
    assert len(conv.weight) == 2 and conv.weight.ndim == 4 and conv.weight.size == 18
    np.testing.assert_array_equal(np.asarray(conv.weight + 1), w + 1)
    np.testing.assert_array_equal(np.asarray(2 * conv.weight - w), w)
    m = fastconv.conv2d_as_matrix(conv.weight, (1, 4, 4), sparse=False)
    np.testing.assert_array_equal(m, fastconv.conv2d_as_matrix(w, (1, 4, 4), sparse=False))
    with fastconv.no_grad():
        assert float(np.abs(conv.weight).max()) == float(np.abs(w).max())


def test_numpy_on_a_tensor_that_requires_grad_refuses_instead_of_dropping_the_gradient():
    p = fastconv.Parameter(np.ones((2, 3)))
    with pytest.raises(TypeError, match=r"numpy.exp: an operand is a fastconv Tensor that requires grad"):
        np.exp(p)
    with pytest.raises(TypeError, match=r"numpy.stack: .*requires grad"):
        np.stack([p, p])
    y = np.concatenate([p, p], axis=1)  # recorded, as fastconv.cat
    assert isinstance(y, fastconv.Tensor) and y.shape == (2, 6)
    (np.ones((2, 3)) * p - p / 2).sum().backward()  # ndarray <op> Tensor is recorded too
    np.testing.assert_array_equal(p.grad, np.full((2, 3), 0.5))


def test_indexing_and_mean_are_recorded():
    p = fastconv.Parameter(np.arange(6.0).reshape(2, 3))
    (p[:, [0, 0, 2]].mean() * 3).backward()
    np.testing.assert_allclose(p.grad, [[1, 0, 0.5], [1, 0, 0.5]])  # 3/6 per pick


def test_losses_have_item_and_backward(torch):
    logits = fastconv.Tensor(np.array([[2.0, -1.0, 0.5], [0.0, 0.0, 3.0]]), requires_grad=True)
    loss = CrossEntropyLoss(reduction="sum")(logits, np.array([2, 0]))
    assert isinstance(loss.item(), float) and f"{loss:.3f}" == f"{loss.item():.3f}"
    loss.backward()
    tl = torch.tensor(logits.data, requires_grad=True)
    torch.nn.functional.cross_entropy(tl, torch.tensor([2, 0]), reduction="sum").backward()
    np.testing.assert_allclose(logits.grad, tl.grad.numpy(), rtol=1e-12)
    p = fastconv.Parameter(np.array([1.0, -2.0]))
    MSELoss()(p, np.array([0.0, 1.0])).backward()
    np.testing.assert_allclose(p.grad, [1.0, -3.0])


def test_pytorch_style_loop_trains_a_residual_model():
    model = Residual(np.float32)
    opt = SGD(model.parameters(), lr=0.1, momentum=0.9)
    loss_fn = CrossEntropyLoss()
    x, y = batch(np.float32, 8, 11)
    first = None
    for _ in range(25):
        for xb, yb in fastconv.DataLoader(x, y, batch_size=8, shuffle=True, rng=0):
            loss = loss_fn(model(xb), yb)
            loss.backward()
            opt.step()
            opt.zero_grad()
            first = loss.item() if first is None else first
    assert loss.item() < 0.2 * first


def test_dataloader_batches():
    x, y = np.arange(14).reshape(7, 2), np.arange(7)
    loader = fastconv.DataLoader(x, y, batch_size=3, shuffle=True, rng=1)
    seen = [yb for _, yb in loader]
    assert [len(b) for b in seen] == [3, 3, 1]
    assert sorted(np.concatenate(seen)) == list(range(7))
    first, second = [np.concatenate([yb for _, yb in loader]) for _ in range(2)]
    assert not np.array_equal(first, second)  # a new order every pass
    xs = [xb for xb, _ in fastconv.DataLoader(x, y, batch_size=3, drop_last=True)]
    assert len(xs) == 2 and np.array_equal(xs[1], x[3:6])
    with pytest.raises(ValueError, match=r"DataLoader: arrays must have the same length, got \[7, 6\]"):
        fastconv.DataLoader(x, y[:6])
    with pytest.raises(ValueError, match=r"DataLoader: batch_size must be positive, got 0"):
        fastconv.DataLoader(x, batch_size=0)


def test_a_convolution_without_bias_skips_the_bias_gradient(monkeypatch):
    from fastconv import functional as Fn
    seen = []
    real = Fn.conv2d_backward
    monkeypatch.setattr(Fn, "conv2d_backward", lambda *a, **k: seen.append(k["bias"]) or real(*a, **k))
    rng = np.random.default_rng(0)
    x = A.Parameter(rng.standard_normal((2, 3, 6, 6)))
    w = A.Parameter(rng.standard_normal((4, 3, 3, 3)))
    A.conv2d(x, w).sum().backward()
    want = real(np.ones((2, 4, 4, 4)), np.asarray(x), np.asarray(w))
    np.testing.assert_allclose(w.grad, want.grad_weight)
    np.testing.assert_allclose(x.grad, want.grad_input)
    assert seen == [False]
