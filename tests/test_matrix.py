"""The fully connected view: conv2d_as_matrix against every algorithm's forward and backward pass,
the stored-entry and distinct-weight counts against closed forms, and summary's arithmetic."""
import io

import numpy as np
import pytest
import scipy.sparse

import fastconv
from conftest import ALGORITHMS, distinct_values, skip_if_unsupported

# (input (C, H, W), weight (K, C/groups, R, S), conv kwargs)
GEOMETRIES = [
    pytest.param((1, 5, 5), (1, 1, 3, 3), {}, id="1ch-3x3"),
    pytest.param((3, 7, 6), (4, 3, 3, 2), {"padding": 1}, id="pad1-asym"),
    pytest.param((2, 9, 8), (3, 2, 3, 3), {"stride": 2, "padding": (1, 2)}, id="stride2"),
    pytest.param((2, 9, 9), (2, 2, 3, 2), {"dilation": (2, 3), "padding": 2}, id="dilated"),
    pytest.param((4, 6, 6), (6, 2, 3, 3), {"groups": 2, "padding": "same"}, id="groups-same"),
    pytest.param((3, 5, 5), (3, 1, 5, 5), {"groups": 3}, id="depthwise-kernel-eq-input"),
    pytest.param((2, 4, 7), (2, 2, 2, 2), {"stride": (3, 1)}, id="stride-gt-kernel"),
]


def rows(a):
    return a.reshape(a.shape[0], -1)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("image, wshape, kw", GEOMETRIES)
def test_matrix_times_input_is_the_convolution(algorithm, image, wshape, kw):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3,) + image)
    w = rng.standard_normal(wshape)
    W = fastconv.conv2d_as_matrix(w, image, **kw)
    assert isinstance(W, scipy.sparse.csr_array) and W.has_sorted_indices and W.dtype == np.float64
    try:
        y = fastconv.conv2d(x, w, algorithm=algorithm, **kw)
    except ValueError as exc:
        skip_if_unsupported(exc)
    assert W.shape == (y[0].size, x[0].size)
    np.testing.assert_allclose(rows(x) @ W.T, rows(y), rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(fastconv.conv2d_as_matrix(w, image, sparse=False, **kw), W.toarray())


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("image, wshape, kw", GEOMETRIES)
def test_transpose_times_gradient_is_grad_input(algorithm, image, wshape, kw):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2,) + image)
    w = rng.standard_normal(wshape)
    W = fastconv.conv2d_as_matrix(w, image, **kw)
    gy = rng.standard_normal((2, W.shape[0]))
    try:
        g = fastconv.conv2d_backward(gy.reshape((2, -1) + fastconv.conv2d(x, w, **kw).shape[2:]), x, w,
                                     algorithm=algorithm, **kw)
    except ValueError as exc:
        skip_if_unsupported(exc)
    np.testing.assert_allclose((W.T @ gy.T).T, rows(g.grad_input), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("padding, dilation", [(0, 1), (1, 1), (2, 1), (1, 2), (3, 2)])
def test_backward_is_a_correlation_with_the_flipped_kernel(padding, dilation):
    # stride 1: W.T @ g = conv2d(g, w flipped in space with in/out channels swapped, padding d*(R-1)-p)
    rng = np.random.default_rng(2)
    image, w = (3, 7, 8), rng.standard_normal((4, 3, 3, 3))
    W = fastconv.conv2d_as_matrix(w, image, padding=padding, dilation=dilation)
    oh, ow = fastconv.conv2d(np.zeros((1,) + image), w, padding=padding, dilation=dilation).shape[2:]
    g = rng.standard_normal((2, 4, oh, ow))
    flipped = np.ascontiguousarray(w[:, :, ::-1, ::-1].transpose(1, 0, 2, 3))
    full = dilation * 2 - padding
    if full < 0:
        pytest.skip("padding wider than the dilated kernel: the correlation would need cropping")
    corr = fastconv.conv2d(g, flipped, padding=full, dilation=dilation)
    np.testing.assert_allclose((W.T @ rows(g).T).T, rows(corr), rtol=1e-12, atol=1e-12)


def axis_hits(size, out, kernel, stride, dilation, pad):
    """Per kernel offset, the number of output positions whose tap lands inside the input."""
    i = np.arange(out)[:, None] * stride + np.arange(kernel)[None, :] * dilation - pad
    return ((i >= 0) & (i < size)).sum(axis=0)


@pytest.mark.parametrize("image, wshape, kw", GEOMETRIES)
def test_stored_entries_and_distinct_weights(image, wshape, kw):
    w = distinct_values(np.random.default_rng(3), wshape) + 1.0   # all distinct, none zero
    W = fastconv.conv2d_as_matrix(w, image, **kw)
    k, cg, r, s = wshape
    y = fastconv.conv2d(np.ones((1,) + image), np.ones(wshape), **kw)
    # sparse connectivity: one stored entry per (output, tap inside the image) -- conv of ones counts them
    assert W.nnz == int(y.sum())
    # weight sharing: every weight stored, and only weights: K*C/groups*R*S distinct values
    values, counts = np.unique(W.data, return_counts=True)
    np.testing.assert_array_equal(values, np.sort(w.ravel()))
    # each weight w[k, c, r, s] is used by as many outputs as its row offset r and column offset s hit the image
    from fastconv._validation import conv_params
    p = conv_params("t", (1,) + image, wshape, np.float64, kw.get("stride", 1), kw.get("padding", 0),
                    kw.get("dilation", 1), kw.get("groups", 1))
    hr = axis_hits(p.h, p.oh, r, p.sh, p.dh, p.ph0)
    hs = axis_hits(p.w, p.ow, s, p.sw, p.dw, p.pw0)
    uses = dict(zip(values, counts))
    for (kk, cc, rr, ss), v in np.ndenumerate(w):
        assert uses[v] == hr[rr] * hs[ss]


@pytest.mark.parametrize("k, c, h, r", [(6, 1, 32, 5), (16, 6, 14, 5), (4, 3, 9, 3)])
def test_closed_form_counts_without_padding(k, c, h, r):
    w = distinct_values(np.random.default_rng(4), (k, c, r, r)) + 1.0
    W = fastconv.conv2d_as_matrix(w, (c, h, h))
    o = h - r + 1
    assert W.shape == (k * o * o, c * h * h)
    assert W.nnz == k * o * o * c * r * r                   # each output sees C*R*S inputs
    assert len(np.unique(W.data)) == k * c * r * r         # ... through K*C*R*S shared weights
    assert np.all(np.unique(W.data, return_counts=True)[1] == o * o)  # each weight used OH*OW times


@pytest.mark.parametrize("r, h", [(3, 8), (5, 9), (7, 7)])
def test_closed_form_counts_same_padding(r, h):
    # 'same', odd kernel, stride 1: p = (R-1)/2 rows of padding lose p(p+1)/2 taps at each edge
    k, c, p = 2, 3, (r - 1) // 2
    w = np.ones((k, c, r, r))
    W = fastconv.conv2d_as_matrix(w, (c, h, h), padding="same")
    per_axis = h * r - p * (p + 1)
    assert W.nnz == k * c * per_axis * per_axis


def test_float32_and_sparse_false():
    w = np.ones((1, 1, 2, 2), np.float32)
    W = fastconv.conv2d_as_matrix(w, (1, 3, 3), sparse=False)
    assert isinstance(W, np.ndarray) and W.dtype == np.float32 and W.shape == (4, 9)
    assert fastconv.conv2d_as_matrix(w, [1, 3, 3]).dtype == np.float32


# --------------------------------------------------------------------------- summary
def test_summary_textbook_arithmetic():
    out = io.StringIO()
    fc = fastconv.summary(fastconv.Sequential(fastconv.Flatten(), fastconv.Linear(1024, 500, bias=False)),
                          (1, 32, 32), file=out)
    assert out.getvalue() == fc + "\n"
    assert "512,000" in fc.splitlines()[2]
    conv = fastconv.summary(fastconv.Conv2d(1, 6, 5, bias=False), (1, 32, 32), file=io.StringIO())
    line = conv.splitlines()[1]
    assert "(6, 28, 28)" in line and " 150 " in line
    assert f"{1024 * 28 * 28 * 6:,}" in line            # the same map as a dense layer
    assert f"{28 * 28 * 6 * 25:,}" in line              # multiply-accumulates = connections


def test_summary_of_a_network_totals():
    from fastconv.train import build_model

    model = build_model((1, 8, 8), rng=0)
    text = fastconv.summary(model, (1, 8, 8), file=io.StringIO())
    lines = text.splitlines()
    assert len(lines) == len(model) + 2
    assert lines[-1].split()[1] == f"{model.num_parameters():,}"
    assert "(10,)" in lines[-2]
    with pytest.raises(ValueError, match=r"summary: layer \d+ \(Linear 512->\d+\) cannot take a sample of shape "
                                         r"\(\d+,\): Linear: input must have shape \(512,\) per sample"):
        fastconv.summary(model, (1, 16, 16), file=io.StringIO())
    with pytest.raises(ValueError, match=r"summary: layer \d+ \(Conv2d 1->\d+ .*\) cannot take a sample of shape "
                                         r"\(3, 8, 8\): Conv2d: input channels"):
        fastconv.summary(model, (3, 8, 8), file=io.StringIO())
    with pytest.raises(TypeError, match=r"summary: input_shape must be a tuple of ints, got 8.0"):
        fastconv.summary(model, (1, 8.0, 8), file=io.StringIO())


def test_summary_names_a_batch_shape_given_instead_of_one_sample():
    from fastconv.layers import Conv2d, MaxPool2d, Sequential
    with pytest.raises(ValueError, match=r"summary: layer 0 .*Conv2d: input shape of one sample must be \(C, H, W\), got \(1, 1, 28, 28\)"):
        fastconv.summary(Sequential(Conv2d(1, 6, 5)), (1, 1, 28, 28))
    with pytest.raises(ValueError, match=r"MaxPool2d: input shape of one sample must be \(C, H, W\)"):
        fastconv.summary(MaxPool2d(2), (28, 28))


def test_summary_covers_the_layers_of_modern_cnns():
    from fastconv.layers import Conv2d, Flatten, Linear, Sequential
    from fastconv.layers_extra import (AdaptiveAvgPool2d, BatchNorm2d, Conv1d, ConvTranspose2d, Dropout, LeakyReLU,
                                       ReLU6)
    net = Sequential(Conv2d(3, 8, 3, padding=1, rng=0), BatchNorm2d(8), ReLU6(), Dropout(0.2, rng=0),
                     ConvTranspose2d(8, 4, 2, stride=2, rng=0), LeakyReLU(0.1), AdaptiveAvgPool2d(1), Flatten(),
                     Linear(4, 10, rng=0))
    lines = fastconv.summary(net, (3, 6, 6), file=io.StringIO()).splitlines()
    assert [ln.split()[1] for ln in lines[1:-1]] == ["Conv2d", "BatchNorm2d", "ReLU6", "Dropout", "ConvTranspose2d",
                                                     "LeakyReLU", "AdaptiveAvgPool2d", "Flatten", "Linear"]
    # each row's shape is what the forward really gives
    x = np.zeros((2, 3, 6, 6), np.float32)
    for line, layer in zip(lines[1:-1], net):
        x = np.asarray(layer(x))
        assert str(x.shape[1:]) in line, line
    bn, tconv = lines[2].split(), lines[5].split()
    assert bn[-3:] == ["16", "-", "0"]                   # weight and bias; no fully connected view, no MACs
    assert "s2" in lines[5]
    # the transposed convolution: 8 x 6 x 6 inputs, each spreading over 4 outputs x 2x2 taps
    assert tconv[-1] == f"{8 * 6 * 6 * 4 * 2 * 2:,}" and tconv[-3] == f"{8 * 4 * 2 * 2 + 4:,}"
    assert tconv[-2] == f"{8 * 6 * 6 * 4 * 12 * 12 + 4 * 12 * 12:,}"
    assert lines[-1].split()[1] == f"{net.num_parameters():,}"
    one_d = fastconv.summary(Sequential(Conv1d(2, 4, 3, stride=2, rng=0), ReLU6()), (2, 11), file=io.StringIO())
    row = one_d.splitlines()[1].split()
    assert row[:3] == ["0", "Conv1d", "2->4"] and "(4, 5)" in one_d
    assert row[-1] == f"{4 * 5 * 2 * 3:,}"              # 4 x 5 outputs, 2 x 3 taps each
    with pytest.raises(ValueError, match=r"summary: layer 0 \(Conv1d 2->4 3\) cannot take a sample of shape "
                                         r"\(2, 4, 4\): Conv1d: input shape of one sample must be \(C, L\)"):
        fastconv.summary(Sequential(Conv1d(2, 4, 3)), (2, 4, 4), file=io.StringIO())


def test_summary_of_a_residual_model_follows_its_forward():
    from fastconv.autograd import relu
    from fastconv.layers import Conv2d, Linear, Module
    from fastconv.layers_extra import AdaptiveAvgPool2d, BatchNorm2d

    class Block(Module):
        def __init__(self):
            self.conv1, self.bn1 = Conv2d(4, 4, 3, padding=1, bias=False, rng=1), BatchNorm2d(4)
            self.conv2, self.bn2 = Conv2d(4, 4, 3, padding=1, bias=False, rng=2), BatchNorm2d(4)

        def forward(self, x):
            return relu(x + self.bn2(self.conv2(relu(self.bn1(self.conv1(x))))))

    class Net(Module):
        def __init__(self):
            self.stem = Conv2d(1, 4, 3, stride=2, padding=1, rng=0)
            self.blocks = [Block(), Block()]
            self.pool, self.fc = AdaptiveAvgPool2d(1), Linear(4, 10, rng=3)

        def forward(self, x):
            h = self.stem(x)
            for b in self.blocks:
                h = b(h)
            h = self.pool(h)
            return self.fc(h.reshape(h.shape[0], -1))

    net = Net()
    net.train()
    before = {k: v.copy() for k, v in net.state_dict().items()}
    lines = fastconv.summary(net, (1, 8, 8), file=io.StringIO()).splitlines()
    names = [ln.split()[0] for ln in lines[1:-1]]
    assert names == ["stem", "blocks.0.conv1", "blocks.0.bn1", "blocks.0.conv2", "blocks.0.bn2", "blocks.1.conv1",
                     "blocks.1.bn1", "blocks.1.conv2", "blocks.1.bn2", "pool", "fc"]
    assert "(4, 4, 4)" in lines[1] and "(4, 1, 1)" in lines[-3] and "(10,)" in lines[-2]
    assert lines[-1].split()[1] == f"{net.num_parameters():,}"
    assert sum(int(ln.split()[-3].replace(",", "")) for ln in lines[1:-1]) == net.num_parameters()
    assert lines[-1].split()[-1] == f"{4 * 4 * 4 * 9 + 4 * 16 * 36 * 4 + 40:,}"  # stem, 4 convs, fc
    # the model is as it was: same buffers (no batch statistics taken), training mode, no tracer left
    for k, v in net.state_dict().items():
        np.testing.assert_array_equal(v, before[k], err_msg=k)
    assert net.training and net.blocks[0].bn1.training
    assert all("forward" not in vars(m) for m in net.modules())
    with pytest.raises(ValueError, match=r"summary: the model cannot take a sample of shape \(3, 8, 8\): conv2d: "
                                         r"input channels"):
        fastconv.summary(net, (3, 8, 8), file=io.StringIO())
    assert all("forward" not in vars(m) for m in net.modules())
