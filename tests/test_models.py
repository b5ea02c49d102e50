"""fastconv.models: shapes and parameter names, the same outputs and gradients as the identical PyTorch
networks after loading fastconv's weights, and a short training run of each on real MNIST digits
(the >= 97% runs are in the README, with their command lines)."""
import numpy as np
import pytest

import fastconv
from fastconv import train as train_cmd
from fastconv.models import MODELS, BasicBlock, ResNet, mobilenet, resnet

NAMES = list(MODELS)


@pytest.mark.parametrize("name", NAMES)
def test_models_output_shapes_in_train_and_eval(name):
    net = MODELS[name](rng=0)
    assert net(np.zeros((3, 1, 28, 28), np.float32)).shape == (3, 10)
    assert net.output_shape((1, 28, 28)) == (10,)
    with fastconv.no_grad():
        assert net.eval()(np.zeros((1, 1, 28, 28), np.float32)).shape == (1, 10)


def test_resnet_geometry_and_arguments():
    net = ResNet(3, 7, widths=(8, 16, 32, 32), blocks=2, rng=0)
    assert net(np.zeros((2, 3, 9, 9), np.float32)).shape == (2, 7)
    assert len(net.stages) == 3 and all(len(s) == 2 for s in net.stages)
    assert net.stages[2][0].shortcut is not None and net.stages[2][1].shortcut is None  # stride 2, then 1
    assert BasicBlock(4, 4).shortcut is None
    with pytest.raises(ValueError, match=r"ResNet: widths must be a non-empty tuple of channel counts, got \(\)"):
        ResNet(widths=())
    with pytest.raises(ValueError, match=r"ResNet: blocks must be positive, got 0"):
        ResNet(blocks=0)
    with pytest.raises(ValueError, match=r"build_model: model must be one of \['lenet', 'lenet5', 'resnet', "
                                         r"'mobilenet'\], got 'vgg'"):
        train_cmd.build_model((1, 28, 28), model="vgg")


def _run_both(torch, net, tnet, x, training):
    """Forward and backward of the same batch in both libraries; returns the outputs and gradients."""
    net.train(training)
    tnet.train(training)
    y = net(x)
    gy = np.random.default_rng(5).standard_normal(y.shape).astype(np.float32)
    (y * gy).sum().backward()
    tx = torch.from_numpy(x)
    ty = tnet(tx)
    ty.backward(torch.from_numpy(gy))
    grads = {k: p.grad for k, p in net.named_parameters()}
    tgrads = {k: p.grad.numpy() for k, p in tnet.named_parameters()}
    return np.asarray(y), ty.detach().numpy(), grads, tgrads


@pytest.mark.parametrize("name", NAMES)
def test_models_match_the_identical_torch_network(torch, name):
    from benchmarks.train_epoch_vs_torch import torch_model

    net = MODELS[name](rng=0)
    tnet = torch_model(torch, name)
    state = net.state_dict()
    assert sorted(state) == sorted(tnet.state_dict())  # the same names, so weights load both ways
    tnet.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()})
    x = np.random.default_rng(1).standard_normal((6, 1, 28, 28)).astype(np.float32)
    for training in (True, False):
        net.zero_grad()
        tnet.zero_grad()
        y, ty, grads, tgrads = _run_both(torch, net, tnet, x, training)
        np.testing.assert_allclose(y, ty, rtol=1e-4, atol=1e-4, err_msg=f"{name} training={training}")
        for k, g in grads.items():
            scale = max(1.0, float(np.abs(tgrads[k]).max()))
            np.testing.assert_allclose(g, tgrads[k], rtol=1e-3, atol=1e-4 * scale, err_msg=k)
    for k, v in net.state_dict().items():  # the training-mode pass moved both sets of running statistics alike
        np.testing.assert_allclose(v, tnet.state_dict()[k].numpy(), rtol=1e-4, atol=1e-6, err_msg=k)


@pytest.mark.parametrize("name", NAMES)
def test_a_short_training_run_learns(name):
    # 600 real digits, 3 epochs: a fraction of a second per epoch; the full runs reach >= 97%
    x_tr, y_tr, x_te, y_te = fastconv._data.load_mnist5k(0.2, 0)
    x_tr, y_tr, x_te, y_te = x_tr[:600], y_tr[:600], x_te[:300], y_te[:300]
    model = train_cmd.build_model((1, 28, 28), rng=0, mean=x_tr.mean(), std=x_tr.std(), model=name)
    opt = fastconv.Adam(model.parameters(), lr=3e-3)
    rng = np.random.default_rng(1)
    losses = [train_cmd.train_epoch(model, fastconv.CrossEntropyLoss(), opt, x_tr, y_tr, 32, rng)[0]
              for _ in range(3)]
    assert losses[-1] < 0.7 * losses[0], losses
    assert train_cmd.evaluate(model, x_te, y_te) > 0.4  # chance is 0.1; the ResNet saw 0.57 (BatchNorm warming up)


def test_command_line_trains_a_chosen_model(capsys):
    assert train_cmd.main(["--model", "mobilenet", "--epochs", "1", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "mobilenet, 31,370 parameters" in out and "test accuracy" in out
    assert train_cmd.main(["--model", "lenet5", "--epochs", "1", "--no-progress"]) == 2  # 8x8 digits
    assert "--model lenet5 cannot take 8x8 images" in capsys.readouterr().err


def test_saved_resnet_loads_into_a_fresh_one(tmp_path):
    net = train_cmd.build_model((1, 28, 28), rng=0, mean=0.1, std=0.3, model="resnet")
    net.train()
    net(np.random.default_rng(0).random((4, 1, 28, 28), dtype=np.float32))  # moves the running statistics
    net.save(tmp_path / "r.npz")
    fresh = train_cmd.build_model((1, 28, 28), rng=1, model="resnet").load(tmp_path / "r.npz")
    x = np.random.default_rng(1).random((2, 1, 28, 28), dtype=np.float32)
    with fastconv.no_grad():
        np.testing.assert_array_equal(np.asarray(fresh.eval()(x)), np.asarray(net.eval()(x)))
    assert mobilenet(rng=0).num_parameters() < resnet(rng=0).num_parameters()
