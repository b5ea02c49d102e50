"""Small image classifiers written with fastconv's own :class:`~fastconv.layers.Module` API: LeNet-5,
a ResNet-style network (batch normalisation, residual blocks, global average pooling) and a
MobileNet-style one (depthwise-separable blocks).  ``python -m fastconv train --model NAME`` trains
them; their parameters and buffers are named as the same PyTorch modules name them, so a
``state_dict`` moves between the two libraries key for key.

>>> import numpy as np
>>> from fastconv.models import resnet
>>> net = resnet(rng=0)
>>> net(np.zeros((2, 1, 28, 28), np.float32)).shape
(2, 10)
>>> [k for k in net.state_dict() if k.startswith("stages.0.0.shortcut")][:3]
['stages.0.0.shortcut.0.weight', 'stages.0.0.shortcut.1.weight', 'stages.0.0.shortcut.1.bias']
"""
from __future__ import annotations

import numpy as np

from . import autograd as A
from .layers import Conv2d, Flatten, Linear, MaxPool2d, Module, ReLU, Sequential, _positive_int, _rng
from .layers_extra import AdaptiveAvgPool2d, BatchNorm2d, ReLU6

__all__ = ["BasicBlock", "DepthwiseSeparable", "ResNet", "lenet5", "resnet", "mobilenet", "MODELS"]


def _widths(fn, widths):
    if not isinstance(widths, (tuple, list)) or len(widths) < 1:
        raise ValueError(f"{fn}: widths must be a non-empty tuple of channel counts, got {widths!r}")
    return tuple(_positive_int(fn, "widths", w) for w in widths)


def lenet5(in_channels=1, classes=10, *, rng=None, dtype=np.float32):
    """LeNet-5 (LeCun et al., 1998) with ReLU and max-pooling: 5x5 conv to 6 channels ('same'), 2x2
    max-pool, 5x5 conv to 16, 2x2 max-pool, then 120, 84 and ``classes`` units.  For 28x28 images
    (the second pool gives 16x5x5); images must be at least 10x10 (see :meth:`~Module.output_shape`).

    >>> lenet5(rng=0).num_parameters()
    61706
    """
    rng = _rng("lenet5", rng)
    return Sequential(
        Conv2d(in_channels, 6, 5, padding=2, dtype=dtype, rng=rng), ReLU(), MaxPool2d(2),
        Conv2d(6, 16, 5, dtype=dtype, rng=rng), ReLU(), MaxPool2d(2), Flatten(),
        Linear(16 * 5 * 5, 120, dtype=dtype, rng=rng), ReLU(), Linear(120, 84, dtype=dtype, rng=rng), ReLU(),
        Linear(84, classes, dtype=dtype, rng=rng),
    )


#: activation layers a preceding BatchNorm2d applies fused (exact types: a subclass may differ)
_FUSED = {ReLU: "relu", ReLU6: "relu6"}


def _conv_bn_act(conv_bn, x, activation):
    """``act(conv_bn(x))`` for a :func:`_conv_bn` pair, the activation fused into the BatchNorm."""
    conv, bn = conv_bn
    return bn(conv(x), activation=activation)


class _FusedSequential(Sequential):
    """:class:`Sequential` that runs a :func:`_conv_bn` pair followed by ReLU or ReLU6 with the
    activation fused into the BatchNorm (same values and parameter names; one pass fewer each way).

    >>> net = _FusedSequential(_conv_bn(1, 2, 3, 1, 1, np.random.default_rng(0), np.float32), ReLU6())
    >>> x = np.random.default_rng(1).standard_normal((2, 1, 4, 4)).astype(np.float32)
    >>> bool(np.array_equal(net(x).numpy(), Sequential(*net.layers)(x).numpy()))
    True
    """

    def forward(self, x):
        layers, i = self.layers, 0
        while i < len(layers):
            act = _FUSED.get(type(layers[i + 1])) if i + 1 < len(layers) else None
            layer = layers[i]
            if (act is not None and type(layer) is Sequential and len(layer) == 2
                    and type(layer[1]) is BatchNorm2d):
                x = _conv_bn_act(layer, x, act)
                i += 2
            else:
                x = layer(x)
                i += 1
        return x


def _conv_bn(cin, cout, k, stride, groups, rng, dtype):
    """Conv (no bias: BatchNorm's shift takes its place) then BatchNorm, as ``nn.Sequential`` names them."""
    return Sequential(Conv2d(cin, cout, k, stride=stride, padding=k // 2, groups=groups, bias=False, dtype=dtype,
                             rng=rng), BatchNorm2d(cout, dtype=dtype))


class BasicBlock(Module):
    """ResNet's basic block (He et al., 2016): ``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``
    with 3x3 convolutions; the shortcut is the identity, or a strided 1x1 convolution and BatchNorm
    where the stride or the channel count changes.

    >>> block = BasicBlock(4, 8, stride=2, rng=0)
    >>> block(np.zeros((1, 4, 6, 6), np.float32)).shape
    (1, 8, 3, 3)
    """

    def __init__(self, in_channels, out_channels, stride=1, *, rng=None, dtype=np.float32):
        rng = _rng("BasicBlock", rng)
        self.conv1 = Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False, dtype=dtype, rng=rng)
        self.bn1 = BatchNorm2d(out_channels, dtype=dtype)
        self.conv2 = Conv2d(out_channels, out_channels, 3, padding=1, bias=False, dtype=dtype, rng=rng)
        self.bn2 = BatchNorm2d(out_channels, dtype=dtype)
        self.shortcut = (_conv_bn(in_channels, out_channels, 1, stride, 1, rng, dtype)
                         if stride != 1 or in_channels != out_channels else None)

    def forward(self, x):
        h = self.bn1(self.conv1(x), activation="relu")  # relu(bn1(...)) in one pass
        h = self.bn2(self.conv2(h))
        return A.relu(h + (x if self.shortcut is None else self.shortcut(x)))


class ResNet(Module):
    """A ResNet for small images: a 3x3 stem (conv, BatchNorm, ReLU) to ``widths[0]`` channels, then
    per further width a stage of ``blocks`` :class:`BasicBlock` s, the first with stride 2; global
    average pooling and one linear layer.  Any image size of at least 1x1 works (the pooling is global).

    >>> ResNet(1, 10, widths=(8, 16), rng=0)(np.zeros((1, 1, 8, 8), np.float32)).shape
    (1, 10)
    """

    def __init__(self, in_channels=1, classes=10, *, widths=(16, 32, 64), blocks=1, rng=None, dtype=np.float32):
        fn = "ResNet"
        widths = _widths(fn, widths)
        blocks = _positive_int(fn, "blocks", blocks)
        rng = _rng(fn, rng)
        self.stem = _conv_bn(in_channels, widths[0], 3, 1, 1, rng, dtype)
        self.stages = [Sequential(*[BasicBlock(cin if i == 0 else cout, cout, 2 if i == 0 else 1, rng=rng, dtype=dtype)
                                    for i in range(blocks)])
                       for cin, cout in zip(widths[:-1], widths[1:])]
        self.pool = AdaptiveAvgPool2d(1)
        self.fc = Linear(widths[-1], classes, dtype=dtype, rng=rng)

    def forward(self, x):
        h = _conv_bn_act(self.stem, x, "relu")
        for stage in self.stages:
            h = stage(h)
        h = self.pool(h)
        return self.fc(h.reshape(h.shape[0], -1))


def resnet(in_channels=1, classes=10, *, widths=(16, 32, 64), blocks=1, rng=None, dtype=np.float32):
    """The :class:`ResNet` that ``fastconv train --model resnet`` trains: stem to 16 channels at full
    resolution, one basic block to 32 channels at 1/2 and one to 64 at 1/4 (on 28x28: 14x14 and 7x7),
    global average pooling, 10 logits; 5.7 M multiply-accumulates per 28x28 image.

    >>> resnet(rng=0).num_parameters()
    73082
    """
    return ResNet(in_channels, classes, widths=widths, blocks=blocks, rng=rng, dtype=dtype)


class DepthwiseSeparable(Module):
    """MobileNet's block (Howard et al., 2017): a 3x3 depthwise convolution (one filter per channel,
    ``groups = in_channels``) and a 1x1 pointwise one, each followed by BatchNorm and ReLU6.

    >>> DepthwiseSeparable(8, 16, stride=2, rng=0)(np.zeros((1, 8, 6, 6), np.float32)).shape
    (1, 16, 3, 3)
    """

    def __init__(self, in_channels, out_channels, stride=1, *, rng=None, dtype=np.float32):
        rng = _rng("DepthwiseSeparable", rng)
        self.depthwise = _conv_bn(in_channels, in_channels, 3, stride, in_channels, rng, dtype)
        self.pointwise = _conv_bn(in_channels, out_channels, 1, 1, 1, rng, dtype)
        self.act = ReLU6()

    def forward(self, x):
        # self.act (as in the PyTorch twin) runs fused into each BatchNorm: the same values, one
        # pass over the activations fewer each way
        return _conv_bn_act(self.pointwise, _conv_bn_act(self.depthwise, x, "relu6"), "relu6")


def mobilenet(in_channels=1, classes=10, *, widths=(32, 64, 128, 128), rng=None, dtype=np.float32):
    """A MobileNet-style network: a 3x3 stem (conv, BatchNorm, ReLU6) to ``widths[0]`` channels, then one
    :class:`DepthwiseSeparable` block per further width (stride 2 for the first two: 28x28 -> 14x14 ->
    7x7, stride 1 after), global average pooling and one linear layer.

    >>> mobilenet(rng=0).num_parameters()
    31370
    """
    fn = "mobilenet"
    widths = _widths(fn, widths)
    rng = _rng(fn, rng)
    blocks = [DepthwiseSeparable(cin, cout, 2 if i < 2 else 1, rng=rng, dtype=dtype)
              for i, (cin, cout) in enumerate(zip(widths[:-1], widths[1:]))]
    return _FusedSequential(_conv_bn(in_channels, widths[0], 3, 1, 1, rng, dtype), ReLU6(), *blocks,
                            AdaptiveAvgPool2d(1), Flatten(), Linear(widths[-1], classes, dtype=dtype, rng=rng))


# name -> builder(in_channels, classes, rng=..., dtype=...), for the command line and the benchmark
MODELS = {"lenet5": lenet5, "resnet": resnet, "mobilenet": mobilenet}
