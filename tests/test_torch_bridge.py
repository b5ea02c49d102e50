"""fastconv.torch: custom operators (opcheck, gradcheck), drop-in modules, convert(), fallbacks and
torch.compile.  PyTorch's own operators are the reference.  Shapes are tiny: the cost is JIT and
tracing, not arithmetic."""
import copy
import os
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
nn = torch.nn
F = torch.nn.functional
ft = pytest.importorskip("fastconv.torch")

F32, F64 = torch.float32, torch.float64


def _rand(shape, dtype, seed, layout="contiguous"):
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(shape, generator=g, dtype=dtype)
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if layout == "strided":  # every other column of a wider tensor: neither layout is contiguous
        wide = torch.randn(shape[:3] + (2 * shape[3],), generator=g, dtype=dtype)
        return wide[..., ::2]
    return t


# (id, x shape, weight shape, stride, padding, dilation, groups, same, dtype, layout)
CONV_SAMPLES = [
    ("basic-f32", (2, 3, 6, 5), (4, 3, 3, 3), [1, 1], [0, 0], [1, 1], 1, False, F32, "contiguous"),
    ("stride2-pad1-f64", (2, 3, 7, 7), (4, 3, 3, 3), [2, 2], [1, 1], [1, 1], 1, False, F64, "contiguous"),
    ("asym-dilated-f32", (1, 2, 9, 8), (3, 2, 2, 3), [1, 2], [2, 1], [2, 1], 1, False, F32, "channels_last"),
    ("same-even-f64", (1, 2, 7, 6), (2, 2, 2, 4), [1, 1], [0, 0], [2, 2], 1, True, F64, "strided"),
    ("groups-f32", (2, 4, 6, 6), (6, 2, 3, 3), [1, 1], [1, 1], [1, 1], 2, False, F32, "strided"),
    ("depthwise-s2-f64", (2, 3, 7, 7), (6, 1, 3, 3), [2, 2], [1, 1], [1, 1], 3, False, F64, "channels_last"),
]


def _conv_args(s, requires_grad=True, bias=True):
    _, xs, ws, stride, pad, dil, groups, same, dtype, layout = s
    x = _rand(xs, dtype, 1, layout).requires_grad_(requires_grad)
    w = _rand(ws, dtype, 2).requires_grad_(requires_grad)
    b = _rand((ws[0],), dtype, 3).requires_grad_(requires_grad) if bias else None
    return x, w, b, stride, pad, dil, groups, same


@pytest.mark.parametrize("s", CONV_SAMPLES, ids=[s[0] for s in CONV_SAMPLES])
def test_opcheck_conv2d(s):
    torch.library.opcheck(torch.ops.fastconv.conv2d.default, _conv_args(s, bias=s[0] != "groups-f32"))


@pytest.mark.parametrize("s", CONV_SAMPLES[:3], ids=[s[0] for s in CONV_SAMPLES[:3]])
def test_opcheck_conv2d_backward(s):
    x, w, _, *rest = _conv_args(s, requires_grad=False)
    y = F.conv2d(x, w, None, rest[0], "same" if rest[4] else rest[1], rest[2], rest[3])
    torch.library.opcheck(torch.ops.fastconv.conv2d_backward.default, (torch.randn_like(y), x, w, *rest))


# (id, x shape, kernel, stride, padding, dilation, ceil_mode, dtype, layout)
POOL_SAMPLES = [
    ("k2-f32", (2, 3, 6, 6), [2, 2], [2, 2], [0, 0], [1, 1], False, F32, "contiguous"),
    ("k3s2p1-ceil-f64", (1, 2, 8, 7), [3, 3], [2, 2], [1, 1], [1, 1], True, F64, "channels_last"),
    ("asym-dilated-f32", (2, 2, 9, 8), [3, 2], [1, 2], [1, 0], [2, 1], False, F32, "strided"),
]


@pytest.mark.parametrize("s", POOL_SAMPLES, ids=[s[0] for s in POOL_SAMPLES])
def test_opcheck_max_pool2d(s):
    _, xs, k, st, p, d, ceil, dtype, layout = s
    x = _rand(xs, dtype, 4, layout).requires_grad_()
    torch.library.opcheck(torch.ops.fastconv.max_pool2d.default, (x, k, st, p, d, ceil))


@pytest.mark.parametrize("s", POOL_SAMPLES, ids=[s[0] for s in POOL_SAMPLES])
def test_opcheck_avg_pool2d(s):
    _, xs, k, st, p, _, ceil, dtype, layout = s
    x = _rand(xs, dtype, 5, layout).requires_grad_()
    count_include_pad = not ceil  # both settings, the padded sample without counting the padding
    torch.library.opcheck(torch.ops.fastconv.avg_pool2d.default, (x, k, st, p, ceil, count_include_pad))


def test_opcheck_pool_backward_ops():
    x = _rand((2, 2, 7, 6), F64, 6)
    y, idx = F.max_pool2d(x, 3, 2, 1, return_indices=True)
    torch.library.opcheck(torch.ops.fastconv.max_pool2d_backward.default, (torch.randn_like(y), idx, x))
    y = F.avg_pool2d(x, 3, 2, 1, ceil_mode=True)
    torch.library.opcheck(torch.ops.fastconv.avg_pool2d_backward.default,
                          (torch.randn_like(y), x, [3, 3], [2, 2], [1, 1], True, False))


# --------------------------------------------------------------------------- functional vs PyTorch
@pytest.mark.parametrize("s", CONV_SAMPLES, ids=[s[0] for s in CONV_SAMPLES])
def test_conv2d_matches_torch_with_grads_and_layout(s):
    x, w, b, stride, pad, dil, groups, same = _conv_args(s)
    padding = "same" if same else pad
    y = ft.conv2d(x, w, b, stride, padding, dil, groups)
    ref = F.conv2d(x, w, b, stride, padding, dil, groups)
    assert y.shape == ref.shape and y.dtype == ref.dtype
    # channels_last in, channels_last out (as PyTorch's own op)
    assert y.is_contiguous(memory_format=torch.channels_last) == ref.is_contiguous(memory_format=torch.channels_last)
    tol = {"rtol": 1e-5, "atol": 1e-5} if x.dtype == F32 else {"rtol": 1e-12, "atol": 1e-12}
    torch.testing.assert_close(y, ref, **tol)
    g = torch.randn_like(ref)
    for got, want in zip(torch.autograd.grad(y, (x, w, b), g), torch.autograd.grad(ref, (x, w, b), g)):
        torch.testing.assert_close(got, want, rtol=10 * tol["rtol"], atol=10 * tol["atol"])


def test_gradcheck_float64():
    x = _rand((2, 4, 6, 5), F64, 7).requires_grad_()
    w = _rand((4, 2, 3, 2), F64, 8).requires_grad_()
    b = _rand((4,), F64, 9).requires_grad_()
    assert torch.autograd.gradcheck(lambda x, w, b: ft.conv2d(x, w, b, (2, 1), 1, (1, 2), 2), (x, w, b))
    assert torch.autograd.gradcheck(lambda x, w, b: ft.conv2d(x, w, b, padding="same", dilation=2), (x[:, :2], w, b))
    # the tie-free pooling input: distinct values, so the max is differentiable at the sample
    xp = (torch.randperm(2 * 4 * 6 * 5, dtype=F64).reshape(2, 4, 6, 5) / 7).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: ft.max_pool2d(x, 3, 2, 1, ceil_mode=True), (xp,))
    assert torch.autograd.gradcheck(lambda x: ft.avg_pool2d(x, 3, 2, 1, True, False), (xp,))


def test_gradgradcheck_float64():
    """Double backward: the bridge recomputes the layer with PyTorch's op (a differentiable path)."""
    x = _rand((1, 2, 5, 5), F64, 10).requires_grad_()
    w = _rand((3, 2, 3, 3), F64, 11).requires_grad_()
    b = _rand((3,), F64, 12).requires_grad_()
    assert torch.autograd.gradgradcheck(lambda x, w, b: ft.conv2d(x, w, b, padding=1), (x, w, b))
    xp = (torch.randperm(50, dtype=F64).reshape(1, 2, 5, 5) / 7).requires_grad_()
    assert torch.autograd.gradgradcheck(lambda x: ft.max_pool2d(x, 2, 1), (xp,))
    assert torch.autograd.gradgradcheck(lambda x: ft.avg_pool2d(x, 3, 1, 1), (xp,))


@pytest.mark.parametrize("s", CONV_SAMPLES[:2], ids=[s[0] for s in CONV_SAMPLES[:2]])
def test_opcheck_conv2d_grad_weight(s):
    x, w, _, *rest = _conv_args(s, requires_grad=False)
    y = F.conv2d(x, w, None, rest[0], "same" if rest[4] else rest[1], rest[2], rest[3])
    torch.library.opcheck(torch.ops.fastconv.conv2d_grad_weight.default, (torch.randn_like(y), x, w, *rest))


@pytest.mark.parametrize("s", CONV_SAMPLES[:2], ids=[s[0] for s in CONV_SAMPLES[:2]])
def test_opcheck_backward_operators_without_the_bias_gradient(s):
    x, w, _, *rest = _conv_args(s, requires_grad=False)
    y = F.conv2d(x, w, None, rest[0], "same" if rest[4] else rest[1], rest[2], rest[3])
    gy = torch.randn_like(y)
    torch.library.opcheck(torch.ops.fastconv.conv2d_backward.default, (gy, x, w, *rest, False))
    torch.library.opcheck(torch.ops.fastconv.conv2d_grad_weight.default, (gy, x, w, *rest, False))


@pytest.mark.parametrize("route", ["eager", "operator"])
def test_a_layer_without_bias_skips_the_bias_gradient(route, monkeypatch):
    import fastconv.torch as ftm

    def conv(x, w, b):
        if route == "eager":
            return ft.conv2d(x, w, b, 1, 1)
        return torch.ops.fastconv.conv2d(x, w, b, [1, 1], [1, 1], [1, 1], 1, False)

    x = _rand((2, 2, 5, 5), F32, 13).requires_grad_()
    w = _rand((3, 2, 3, 3), F32, 14).requires_grad_()
    b = _rand((3,), F32, 15).requires_grad_()
    seen = []
    real = ftm._fc.conv2d_backward
    monkeypatch.setattr(ftm._fc, "conv2d_backward", lambda *a, **k: seen.append(k["bias"]) or real(*a, **k))
    for bias in (None, b):
        gx, gw = torch.autograd.grad(conv(x, w, bias).square().sum(), (x, w))
        wx, ww = torch.autograd.grad(F.conv2d(x, w, bias, 1, 1).square().sum(), (x, w))
        torch.testing.assert_close(gx, wx)
        torch.testing.assert_close(gw, ww)
    assert seen == [False, True]


@pytest.mark.parametrize("route", ["eager", "operator"])
def test_only_needed_grads_are_computed(route, monkeypatch):
    """A first layer (input without grad) runs only the weight-gradient pass: conv2d_backward, which
    would also compute the input gradient, is never called; frozen weights get no gradient."""
    import fastconv.torch as ftm

    def conv(x, w, b):
        if route == "eager":
            return ft.conv2d(x, w, b, 1, 1)
        return torch.ops.fastconv.conv2d(x, w, b, [1, 1], [1, 1], [1, 1], 1, False)

    x = _rand((2, 2, 5, 5), F32, 13)
    w = _rand((3, 2, 3, 3), F32, 14).requires_grad_()
    b = _rand((3,), F32, 15).requires_grad_()
    calls = []
    real = ftm._fc.conv2d_backward
    monkeypatch.setattr(ftm._fc, "conv2d_backward", lambda *a, **k: calls.append(1) or real(*a, **k))
    y = conv(x, w, b)
    y.square().sum().backward()
    assert x.grad is None and calls == []
    gw, gb = torch.autograd.grad(F.conv2d(x, w, b, 1, 1).square().sum(), (w, b))
    torch.testing.assert_close(w.grad, gw, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b.grad, gb, rtol=1e-5, atol=1e-5)
    xg, wf = x.clone().requires_grad_(), w.detach()   # frozen weights: the input gradient only
    conv(xg, wf, None).square().sum().backward()
    assert wf.grad is None and calls == [1]
    ref = torch.autograd.grad(F.conv2d(xg, wf, None, 1, 1).square().sum(), xg)[0]
    torch.testing.assert_close(xg.grad, ref, rtol=1e-5, atol=1e-5)


def test_eager_calls_skip_the_operator_dispatch():
    """Eager calls run autograd.Functions (an operator call costs ~30 us of dispatch more), calls
    under no_grad the computation alone; the operators stay what torch.compile traces (see the
    dynamo test) and give the same gradients (gradcheck through them here)."""
    x = _rand((1, 2, 6, 6), F64, 30).requires_grad_()
    w = _rand((3, 2, 3, 3), F64, 31).requires_grad_()
    assert type(ft.conv2d(x, w).grad_fn).__name__ == "_Conv2dFunctionBackward"
    assert type(ft.max_pool2d(x, 2).grad_fn).__name__ == "_MaxPool2dFunctionBackward"
    assert type(ft.avg_pool2d(x, 2).grad_fn).__name__ == "_AvgPool2dFunctionBackward"
    with torch.no_grad():
        assert ft.conv2d(x, w).grad_fn is None
    op = torch.ops.fastconv
    assert torch.autograd.gradcheck(lambda x, w: op.conv2d(x, w, None, [2, 1], [1, 0], [1, 1], 1, False), (x, w))
    xp = (torch.randperm(72, dtype=F64).reshape(1, 2, 6, 6) / 7).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: op.max_pool2d(x, [3, 3], [2, 2], [1, 1], [1, 1], True)[0], (xp,))
    assert torch.autograd.gradcheck(lambda x: op.avg_pool2d(x, [3, 3], [2, 2], [1, 1], True, False), (xp,))


def test_max_pool_indices_match_torch():
    x = torch.randperm(2 * 3 * 7 * 7, dtype=F32).reshape(2, 3, 7, 7)
    y, i = ft.max_pool2d(x, 3, 2, 1, ceil_mode=True, return_indices=True)
    yr, ir = F.max_pool2d(x, 3, 2, 1, ceil_mode=True, return_indices=True)
    assert torch.equal(y, yr) and torch.equal(i, ir) and i.dtype == torch.int64


# --------------------------------------------------------------------------- batch_norm
# (id, training, running statistics given, affine, dtype, layout)
BN_SAMPLES = [
    ("train-stats-f32", True, True, True, F32, "contiguous"),
    ("train-nostats-f64", True, False, True, F64, "strided"),
    ("eval-f64", False, True, True, F64, "channels_last"),
    ("eval-noaffine-f32", False, True, False, F32, "contiguous"),
]


def _bn_args(s, seed=40):
    _, training, stats, affine, dtype, layout = s
    x = _rand((3, 4, 5, 6), dtype, seed, layout).requires_grad_()
    rm = _rand((4,), dtype, seed + 1) if stats else None
    rv = _rand((4,), dtype, seed + 2).abs() + 0.5 if stats else None
    w = _rand((4,), dtype, seed + 3).requires_grad_() if affine else None
    b = _rand((4,), dtype, seed + 4).requires_grad_() if affine else None
    return x, rm, rv, w, b, training, 0.3, 1e-4


@pytest.mark.parametrize("s", BN_SAMPLES, ids=[s[0] for s in BN_SAMPLES])
def test_opcheck_batch_norm(s):
    torch.library.opcheck(torch.ops.fastconv.batch_norm.default, _bn_args(s))
    x, rm, rv, w, *_ = _bn_args(s)
    torch.library.opcheck(torch.ops.fastconv.batch_norm_backward.default,
                          (torch.randn_like(x), x.detach(), None if s[1] else rm, None if s[1] else rv,
                           None if w is None else w.detach(), s[1], 1e-4))


@pytest.mark.parametrize("s", BN_SAMPLES, ids=[s[0] for s in BN_SAMPLES])
def test_batch_norm_matches_torch_with_grads_and_running_stats(s):
    """Output, gradients and the running statistics updated in place, against F.batch_norm."""
    x, rm, rv, w, b, training, momentum, eps = _bn_args(s)
    xr, rmr, rvr = x.detach().clone().requires_grad_(), *(None if t is None else t.clone() for t in (rm, rv))
    wr, br = (None if t is None else t.detach().clone().requires_grad_() for t in (w, b))
    y = ft.batch_norm(x, rm, rv, w, b, training, momentum, eps)
    ref = F.batch_norm(xr, rmr, rvr, wr, br, training, momentum, eps)
    tol = {"rtol": 1e-5, "atol": 1e-5} if x.dtype == F32 else {"rtol": 1e-12, "atol": 1e-12}
    torch.testing.assert_close(y, ref, **tol)
    assert y.is_contiguous(memory_format=torch.channels_last) == ref.is_contiguous(memory_format=torch.channels_last)
    for got, want in ((rm, rmr), (rv, rvr)):
        if got is not None:
            torch.testing.assert_close(got, want, **tol)
    g = torch.randn_like(ref)
    ours = [t for t in (x, w, b) if t is not None]
    theirs = [t for t in (xr, wr, br) if t is not None]
    for got, want in zip(torch.autograd.grad(y, ours, g), torch.autograd.grad(ref, theirs, g)):
        torch.testing.assert_close(got, want, rtol=10 * tol["rtol"], atol=10 * tol["atol"])


def test_batch_norm_gradcheck_and_module():
    x = _rand((3, 2, 4, 3), F64, 50).requires_grad_()
    w, b = _rand((2,), F64, 51).requires_grad_(), _rand((2,), F64, 52).requires_grad_()
    rm, rv = torch.zeros(2, dtype=F64), torch.ones(2, dtype=F64)
    for training in (True, False):
        assert torch.autograd.gradcheck(lambda x, w, b: ft.batch_norm(x, rm.clone(), rv.clone(), w, b, training),
                                        (x, w, b))
        assert torch.autograd.gradgradcheck(lambda x, w, b: ft.batch_norm(x, rm.clone(), rv.clone(), w, b, training),
                                            (x, w, b))
    op = torch.ops.fastconv  # the operator's own autograd formula (what torch.compile traces)
    assert torch.autograd.gradcheck(lambda x, w, b: op.batch_norm(x, None, None, w, b, True, 0.1, 1e-5)[0], (x, w, b))
    # the module: momentum=None (a cumulative average), num_batches_tracked, eval, state_dict keys
    torch.manual_seed(3)
    ref = nn.BatchNorm2d(2, momentum=None)
    assert not ft.convert(ref)[1].swapped  # opt-in
    fast, report = ft.convert(ref, batch_norm=True)
    assert len(report.swapped) == 1 and type(fast) is ft.BatchNorm2d
    assert fast.state_dict().keys() == ref.state_dict().keys()
    for step in range(3):
        xi = _rand((4, 2, 3, 3), F32, 60 + step)
        torch.testing.assert_close(fast(xi), ref(xi), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast.running_var, ref.running_var, rtol=1e-6, atol=1e-6)
    assert int(fast.num_batches_tracked) == int(ref.num_batches_tracked) == 3
    fast.eval()
    ref.eval()
    torch.testing.assert_close(fast(xi), ref(xi), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- modules and convert
def test_modules_are_drop_in():
    torch.manual_seed(0)
    a = nn.Conv2d(3, 4, 3, stride=2, padding=1, bias=True)
    torch.manual_seed(0)
    b = ft.Conv2d(3, 4, 3, stride=2, padding=1, bias=True)
    assert isinstance(b, nn.Conv2d)
    assert a.state_dict().keys() == b.state_dict().keys()
    for k in a.state_dict():  # same initialisation under the same seed
        assert torch.equal(a.state_dict()[k], b.state_dict()[k])
    c = nn.Conv2d(3, 4, 3, stride=2, padding=1)
    c.load_state_dict(b.state_dict())  # checkpoints load both ways
    b.load_state_dict(c.state_dict())
    x = _rand((2, 3, 8, 8), F32, 15)
    torch.testing.assert_close(b(x), a(x), rtol=1e-5, atol=1e-5)
    assert repr(ft.MaxPool2d(2)) == repr(nn.MaxPool2d(2))


@pytest.mark.parametrize("mode", ["reflect", "circular"])
def test_conv_padding_modes(mode):
    torch.manual_seed(1)
    ref = nn.Conv2d(2, 3, 3, padding=(1, 2), padding_mode=mode)
    fast, report = ft.convert(ref)
    assert len(report.swapped) == 1
    x = _rand((1, 2, 6, 7), F32, 16)
    torch.testing.assert_close(fast(x), ref(x), rtol=1e-5, atol=1e-5)


def lenet():
    return nn.Sequential(
        nn.Conv2d(1, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5), nn.ReLU(), nn.AvgPool2d(2),
        nn.Flatten(), nn.Linear(16 * 5 * 5, 10))


class Block(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.c1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.b1 = nn.BatchNorm2d(cout)
        self.c2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.b2 = nn.BatchNorm2d(cout)
        self.down = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                     if stride != 1 or cin != cout else nn.Identity())

    def forward(self, x):
        return F.relu(self.b2(self.c2(F.relu(self.b1(self.c1(x))))) + self.down(x))


def resnet_style():
    return nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.MaxPool2d(3, 2, 1), Block(8, 8, 1), Block(8, 16, 2),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))


def mobilenet_style():
    def dw(cin, cout, stride):
        return [nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False), nn.BatchNorm2d(cin), nn.ReLU6(),
                nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU6()]
    return nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU6(),
                         *dw(8, 16, 1), *dw(16, 24, 2), nn.AvgPool2d(4), nn.Flatten(), nn.Linear(24, 10))


def _rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


@pytest.mark.parametrize("build,shape,swapped,batch_norm", [
    (lenet, (2, 1, 28, 28), 4, False), (resnet_style, (2, 3, 16, 16), 7, False),
    (mobilenet_style, (2, 3, 16, 16), 6, False), (resnet_style, (2, 3, 16, 16), 13, True),
    (mobilenet_style, (2, 3, 16, 16), 11, True)], ids=["lenet", "resnet", "mobilenet", "resnet-bn", "mobilenet-bn"])
def test_converted_model_matches(build, shape, swapped, batch_norm):
    """Outputs and every parameter gradient of the converted model within 1e-5 (relative to the
    tensor's largest entry) of the original's, in float32.

    A few BatchNorm weight gradients are ill-conditioned (a sum that cancels to ~1e-5 of its terms):
    there PyTorch's own float32 result is 1e-3 away from float64, so each tensor is compared with a
    float64 run of the original and may be off by at most max(1e-5, 3 x PyTorch float32's error).
    """
    torch.manual_seed(0)
    ref = build()
    ref64 = copy.deepcopy(ref).double()
    fast, report = ft.convert(ref, batch_norm=batch_norm)
    assert len(report.swapped) == swapped and not report.left
    assert all(type(m).__module__ == "torch.nn.modules.conv" for m in ref.modules() if isinstance(m, nn.Conv2d))
    x = _rand(shape, F32, 17)
    results = []
    for model, inp in ((fast, x), (ref, x), (ref64, x.double())):
        y = model(inp)
        y.square().sum().backward()
        results.append([("output", y)] + [(name, p.grad) for name, p in model.named_parameters()])
    for (name, got), (_, want), (_, exact) in zip(*results):
        bound = max(1e-5, 3 * _rel_err(want.double(), exact))
        assert _rel_err(got.double(), exact) <= bound, (name, _rel_err(got.double(), exact), bound)
        assert _rel_err(got, want) <= 1e-5 or bound > 1e-5, name


def test_convert_inplace_keeps_parameters_and_reports_what_it_left():
    class MyConv(nn.Conv2d):  # a subclass may have its own forward: never swapped
        pass

    net = nn.Sequential(nn.Conv2d(2, 2, 3), MyConv(2, 2, 1), nn.AvgPool2d(2, divisor_override=3),
                        nn.Conv2d(2, 2, 1).half())
    params = list(net.parameters())
    out, report = ft.convert(net, inplace=True)
    assert out is net and list(out.parameters()) == params and type(net[0]) is ft.Conv2d
    left = {name: why for name, _, why in report.left}
    assert set(left) == {"1", "2", "3"}
    assert "subclass" in left["1"] and "divisor_override" in left["2"] and "float16" in left["3"]
    assert "left to PyTorch" in str(report)
    with pytest.raises(TypeError, match="convert: model must be a torch.nn.Module"):
        ft.convert(object())
    with pytest.raises(TypeError, match="convert: batch_norm must be a bool, got 1"):
        ft.convert(net, batch_norm=1)


# --------------------------------------------------------------------------- fallbacks
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fallback_dtypes(dtype):
    x, w = _rand((1, 2, 6, 6), F32, 18).to(dtype), _rand((3, 2, 3, 3), F32, 19).to(dtype)
    assert torch.equal(ft.conv2d(x, w, padding=1), F.conv2d(x, w, padding=1))
    assert torch.equal(ft.max_pool2d(x, 2), F.max_pool2d(x, 2))
    assert torch.equal(ft.avg_pool2d(x, 2), F.avg_pool2d(x, 2))


def test_fallback_other_cases():
    x = _rand((2, 6, 6), F32, 20).requires_grad_()   # unbatched (C, H, W): served, squeezed back
    w = _rand((3, 2, 3, 3), F32, 21)
    torch.testing.assert_close(ft.conv2d(x, w), F.conv2d(x, w))
    torch.testing.assert_close(ft.max_pool2d(x, 2), F.max_pool2d(x, 2))
    torch.testing.assert_close(ft.avg_pool2d(x, 2, divisor_override=3), F.avg_pool2d(x, 2, divisor_override=3))
    x64 = x.detach().double()                          # mixed dtypes: PyTorch decides (and raises)
    with pytest.raises(RuntimeError):
        ft.conv2d(x64, w)


def test_set_num_threads_sets_both():
    import fastconv
    old = torch.get_num_threads(), fastconv.get_num_threads()
    try:
        ft.set_num_threads(1)
        assert torch.get_num_threads() == 1 and fastconv.get_num_threads() == 1
        with pytest.raises(ValueError, match="set_num_threads: n must be between"):
            ft.set_num_threads(fastconv.max_threads() + 1)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(old[0])
        fastconv.set_num_threads(old[1])


def test_torch_is_optional():
    """``import fastconv`` does not import torch; ``import fastconv.torch`` without it names the extra."""
    code = ("import sys, fastconv\n"
            "print('imported torch:', 'torch' in sys.modules)\n"
            "sys.modules['torch'] = None\n"
            "try:\n    import fastconv.torch\nexcept ImportError as e:\n    print('ERR', e)\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.getcwd()] + sys.path))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "imported torch: False" in out.stdout, out.stdout
    assert "ERR" in out.stdout and "fastconv[torch]" in out.stdout, out.stdout


# --------------------------------------------------------------------------- torch.compile
def test_dynamo_no_graph_break_and_compiled_step_matches():
    torch.manual_seed(0)
    ref = lenet()
    fast, _ = ft.convert(ref)
    x = _rand((2, 1, 28, 28), F32, 22)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(fast)(x)
    assert explained.graph_break_count == 0 and explained.graph_count == 1
    # aot_eager: the same tracing (fake tensors, joint forward/backward graph) as inductor, without
    # its code generation, which would dominate this test's time.
    compiled = torch.compile(fast, backend="aot_eager", fullgraph=True)
    y = compiled(x)
    yr = ref(x)
    assert _rel_err(y, yr) <= 1e-5
    y.sum().backward()
    yr.sum().backward()
    for p, q in zip(fast.parameters(), ref.parameters()):
        assert _rel_err(p.grad, q.grad) <= 1e-5


def test_dynamo_batch_norm_model_no_graph_break_and_running_stats():
    """A converted model with BatchNorm2d (running statistics updated in training) compiles whole and
    updates its statistics as the original does."""
    torch.manual_seed(0)
    ref = resnet_style()
    fast, _ = ft.convert(ref, batch_norm=True)
    x = _rand((2, 3, 16, 16), F32, 23)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(copy.deepcopy(fast))(x)
    assert explained.graph_break_count == 0 and explained.graph_count == 1
    compiled = torch.compile(fast, backend="aot_eager", fullgraph=True)
    y, yr = compiled(x), ref(x)
    assert _rel_err(y, yr) <= 1e-5
    y.square().sum().backward()
    yr.square().sum().backward()
    for (name, p), q in zip(fast.named_parameters(), ref.parameters()):
        assert _rel_err(p.grad, q.grad) <= 1e-4, name
    for (name, b), c in zip(fast.named_buffers(), ref.buffers()):
        assert _rel_err(b.double(), c.double()) <= 1e-5, name


# --------------------------------------------------------------------------- the benchmark's networks
def test_benchmark_networks_convert_completely():
    """benchmarks/torch_train_step.py's four networks: every conv and pool swapped, nothing left."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path.insert(0, root)
    try:
        from benchmarks import torch_train_step as tts
    finally:
        sys.path.remove(root)
    expected = {"lenet": 4, "resnet18": 20, "mobilenet": 28, "unet": 19}  # U-Net: one pool module, reused
    batch_norms = {"lenet": 0, "resnet18": 20, "mobilenet": 27, "unet": 0}
    for name, count in expected.items():
        net = tts.build(name)
        _, report = ft.convert(net)
        assert len(report.swapped) == count and not report.left, (name, report)
        _, report = ft.convert(net, batch_norm=True)
        assert len(report.swapped) == count + batch_norms[name] and not report.left, (name, report)
    with pytest.raises(ValueError, match="unknown network"):
        tts.build("vgg")


def test_docstring_examples():
    import doctest
    result = doctest.testmod(ft, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0, result
