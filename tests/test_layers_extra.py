"""Layers of fastconv.layers_extra against torch.nn (same weights): forward, input and parameter gradients
in train and eval mode, BatchNorm2d's running buffers, and a ResNet-style model whose PyTorch state_dict
loads by the same key names and gives the same outputs."""
import numpy as np
import pytest

from fastconv import autograd as A
from fastconv.layers import Conv2d, Flatten, Linear, Module, Sequential
from fastconv.layers_extra import (AdaptiveAvgPool2d, BatchNorm2d, Conv1d, ConvTranspose2d, Dropout, LeakyReLU,
                                   ReLU6)


D = np.float64


def _pair(torch, name):
    """(fastconv layer, torch layer, input shape) with the torch layer holding the fastconv weights."""
    nn = torch.nn
    if name == "bn":
        f, t, shape = BatchNorm2d(3, momentum=0.3, dtype=D), nn.BatchNorm2d(3, momentum=0.3), (4, 3, 3, 2)
        f.weight.data[...] = [0.5, 1.5, -1.0]
        f.bias.data[...] = [0.1, -0.2, 0.3]
    elif name == "bn-noaffine":
        f, t, shape = BatchNorm2d(2, affine=False, dtype=D), nn.BatchNorm2d(2, affine=False), (3, 2, 2, 2)
    elif name == "convt":
        f = ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1, groups=2, rng=0, dtype=D)
        t, shape = nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1, groups=2), (2, 4, 3, 3)
    elif name == "conv1d":
        f, t, shape = Conv1d(3, 4, 3, stride=2, padding=1, rng=0, dtype=D), nn.Conv1d(3, 4, 3, stride=2, padding=1), (2, 3, 9)
    elif name == "adaptive":
        f, t, shape = AdaptiveAvgPool2d((2, 3)), nn.AdaptiveAvgPool2d((2, 3)), (2, 3, 5, 7)
    elif name == "relu6":
        f, t, shape = ReLU6(), nn.ReLU6(), (2, 3, 4)
    elif name == "leaky":
        f, t, shape = LeakyReLU(0.2), nn.LeakyReLU(0.2), (2, 3, 4)
    t = t.double()
    with torch.no_grad():
        for n, p in f.named_parameters():
            dict(t.named_parameters())[n].copy_(torch.from_numpy(p.data))
    return f, t, shape


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("name", ["bn", "bn-noaffine", "convt", "conv1d", "adaptive", "relu6", "leaky"])
def test_layer_matches_torch(torch, name, mode):
    f, t, shape = _pair(torch, name)
    getattr(f, mode)()
    getattr(t, mode)()
    rng = np.random.default_rng(1)
    for step in range(2):  # a second step sees the running statistics the first one updated
        x = rng.standard_normal(shape) * 2 + 0.5
        xt = torch.from_numpy(x.copy()).requires_grad_(True)
        xf = A.Tensor(x, requires_grad=True)
        y, yt = f(xf), t(xt)
        gy = rng.standard_normal(y.shape)
        (y * gy).sum().backward()
        yt.backward(torch.from_numpy(gy))
        np.testing.assert_allclose(y.numpy(), yt.detach().numpy(), rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(xf.grad, xt.grad.numpy(), rtol=1e-9, atol=1e-10)
        tp = dict(t.named_parameters())
        for n, p in f.named_parameters():
            np.testing.assert_allclose(p.grad, tp[n].grad.numpy(), rtol=1e-9, atol=1e-10, err_msg=n)
            p.grad = None
            tp[n].grad = None
        if name.startswith("bn"):
            np.testing.assert_allclose(f.running_mean, t.running_mean.numpy(), rtol=1e-12)
            np.testing.assert_allclose(f.running_var, t.running_var.numpy(), rtol=1e-12)
            assert int(f.num_batches_tracked) == int(t.num_batches_tracked)


def test_batchnorm_cumulative_average_and_no_running_stats(torch):
    f, t = BatchNorm2d(2, momentum=None, dtype=np.float64), torch.nn.BatchNorm2d(2, momentum=None).double()
    rng = np.random.default_rng(0)
    for _ in range(3):
        x = rng.standard_normal((3, 2, 2, 2))
        f(x)
        t(torch.from_numpy(x))
    np.testing.assert_allclose(f.running_var, t.running_var.numpy(), rtol=1e-12)
    g = BatchNorm2d(2, track_running_stats=False).eval()  # batch statistics even in eval mode, as PyTorch
    y = g(rng.standard_normal((4, 2, 3, 3)).astype(np.float32)).numpy()
    assert abs(float(y.mean())) < 1e-5


def test_dropout_modes():
    d = Dropout(0.25, rng=0)
    x = np.ones((40, 50), np.float32)
    xt = A.Tensor(x, requires_grad=True)
    y = d(xt)
    kept = y.numpy() != 0
    assert 0.7 < kept.mean() < 0.8
    y.sum().backward()
    np.testing.assert_allclose(xt.grad, kept / 0.75, rtol=1e-6)  # gradient through the same mask
    d.eval()
    np.testing.assert_array_equal(d(x).numpy(), x)


# --------------------------------------------------------------------------- a ResNet-style model
class _Block(Module):
    def __init__(self, c, rng):
        self.conv1 = Conv2d(c, c, 3, padding=1, bias=False, rng=rng)
        self.bn1 = BatchNorm2d(c)
        self.conv2 = Conv2d(c, c, 3, padding=1, bias=False, rng=rng + 1)
        self.bn2 = BatchNorm2d(c)

    def forward(self, x):
        h = A.relu(self.bn1(self.conv1(x)))
        return A.relu(self.bn2(self.conv2(h)) + x)


class _Net(Module):
    def __init__(self):
        self.stem = Sequential(Conv2d(1, 8, 3, padding=1, bias=False, rng=0), BatchNorm2d(8))
        self.block = _Block(8, 1)
        self.head = Sequential(AdaptiveAvgPool2d(1), Flatten(), Linear(8, 10, rng=3))

    def forward(self, x):
        return self.head(self.block(A.relu(self.stem(x))))


def _torch_net(torch):
    nn = torch.nn

    class Block(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
            self.bn1 = nn.BatchNorm2d(c)
            self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
            self.bn2 = nn.BatchNorm2d(c)

        def forward(self, x):
            h = torch.relu(self.bn1(self.conv1(x)))
            return torch.relu(self.bn2(self.conv2(h)) + x)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8))
            self.block = Block(8)
            self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))

        def forward(self, x):
            return self.head(self.block(torch.relu(self.stem(x))))
    torch.manual_seed(0)
    return Net()


def test_resnet_block_loads_a_torch_state_dict(torch):
    tnet = _torch_net(torch)
    rng = np.random.default_rng(0)
    tnet.train()
    with torch.no_grad():  # a few training-mode passes give the running statistics non-default values
        for _ in range(2):
            tnet(torch.from_numpy(rng.standard_normal((6, 1, 8, 8)).astype(np.float32)))
    state = {k: v.numpy() for k, v in tnet.state_dict().items()}
    net = _Net().load_state_dict(state)
    assert sorted(state) == sorted(net.state_dict())
    x = rng.standard_normal((4, 1, 8, 8)).astype(np.float32)
    for mode in ("eval", "train"):
        getattr(tnet, mode)()
        getattr(net, mode)()
        with torch.no_grad():
            want = tnet(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(net(x).numpy(), want, rtol=1e-5, atol=1e-5, err_msg=mode)
    np.testing.assert_allclose(net.block.bn1.running_mean, tnet.block.bn1.running_mean.numpy(), rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- BatchNorm fused with its activation
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("activation", ["relu", "relu6"])
@pytest.mark.parametrize("training", [True, False])
def test_batch_norm_fused_activation_equals_the_separate_ops(activation, training, dtype):
    from fastconv.layers_extra import relu6
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((3, 4, 5, 6)) * 4).astype(dtype)
    x[0, 0, 0, :3] = [np.nan, np.inf, -np.inf]  # NaN/Inf outputs: the mask must follow each activation's rule
    gy = rng.standard_normal(x.shape).astype(dtype)
    grads = []
    for fused in (False, True):
        bn = BatchNorm2d(4, dtype=dtype)
        bn.weight.data[:] = rng.standard_normal(4) if not fused else grads[0][3]
        bn.bias.data[:] = rng.standard_normal(4) if not fused else grads[0][4]
        bn.running_var[:] = 2.0
        bn.train(training)
        xt = A.Tensor(x.copy(), requires_grad=True)
        act = {"relu": A.relu, "relu6": relu6}[activation]
        y = bn(xt, activation=activation) if fused else act(bn(xt))
        (y * gy).sum().backward()
        grads.append((y.numpy(), xt.grad, bn.weight.grad, bn.weight.data.copy(), bn.bias.data.copy(),
                       bn.bias.grad, bn.running_mean.copy()))
    names = ("output", "grad_input", "grad_weight", "weight", "bias", "grad_bias", "running_mean")
    rtol = 1e-12 if dtype == np.float64 else 1e-5  # the sums vectorise differently with the mask inside
    for name, a, b in zip(names, *grads):
        if name in ("output", "running_mean"):
            np.testing.assert_array_equal(a, b, err_msg=name)  # the same affine map and clamp: the same bits
        else:
            np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * np.nanmax(np.abs(b)), err_msg=name)


def test_batch_norm_fused_activation_rejects_an_unknown_name():
    bn = BatchNorm2d(2)
    with pytest.raises(ValueError, match=r"BatchNorm2d: activation must be None or one of \['relu', 'relu6'\], "
                                         r"got 'gelu'"):
        bn(np.zeros((2, 2, 3, 3), np.float32), activation="gelu")
    assert int(bn.num_batches_tracked) == 0


def test_models_with_fused_batch_norm_match_the_unfused_network():
    from fastconv.models import _FusedSequential, mobilenet
    net = mobilenet(rng=0)
    plain = Sequential(*net.layers)  # the same layers, each activation run on its own
    assert type(net) is _FusedSequential
    x = np.random.default_rng(0).standard_normal((2, 1, 28, 28)).astype(np.float32)
    y1 = net(x)
    y1.sum().backward()
    g1 = {k: p.grad.copy() for k, p in net.named_parameters()}
    for _, p in net.named_parameters():
        p.grad[...] = 0
    y2 = plain(x)
    y2.sum().backward()
    np.testing.assert_array_equal(y1.numpy(), y2.numpy())
    for k, p in plain.named_parameters():
        np.testing.assert_allclose(g1[k], p.grad, rtol=1e-4, atol=1e-5 * np.abs(p.grad).max(), err_msg=k)
