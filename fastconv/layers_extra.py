"""The layers of modern CNNs (issue 21): :class:`BatchNorm2d`, :class:`Dropout`, :class:`AdaptiveAvgPool2d`,
:class:`ConvTranspose2d`, :class:`Conv1d`, :class:`ReLU6`, :class:`LeakyReLU`, and the recorded ops under
them (same pattern as :mod:`fastconv.autograd`: compute with :mod:`fastconv.functional`, hand
:func:`~fastconv.autograd.record` the backward).

``train()`` / ``eval()`` switch :class:`BatchNorm2d` between batch statistics (updating its running
buffers) and its running statistics, and :class:`Dropout` between dropping and the identity.

>>> import numpy as np
>>> from fastconv.layers import Conv2d, Sequential
>>> from fastconv.layers_extra import BatchNorm2d, ReLU6, AdaptiveAvgPool2d
>>> net = Sequential(Conv2d(1, 4, 3, padding=1, rng=0), BatchNorm2d(4), ReLU6(), AdaptiveAvgPool2d(1))
>>> net(np.ones((2, 1, 5, 5), np.float32)).shape
(2, 4, 1, 1)
>>> sorted(net.state_dict())[:3]
['0.bias', '0.weight', '1.bias']
"""
from __future__ import annotations


import numpy as np

from . import _validation as V
from . import _nn_functional as _nnf
from . import functional as F
from ._algorithms import norm as _norm
from .autograd import Parameter, Tensor, is_recording, record
from .layers import Module, _conv_channels, _positive_int, _rng, _uniform

__all__ = ["batch_norm", "dropout", "adaptive_avg_pool2d", "conv_transpose2d", "conv1d", "relu6", "leaky_relu",
           "BatchNorm2d", "Dropout", "AdaptiveAvgPool2d", "ConvTranspose2d", "Conv1d", "ReLU6", "LeakyReLU"]


def _data(a):
    return a.data if isinstance(a, Tensor) else a


# --------------------------------------------------------------------------- recorded ops
def batch_norm(x, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1, eps=1e-5, *,
               activation=None):
    """:func:`fastconv.batch_norm`, recorded (the running buffers are plain arrays, updated in place),
    followed by ``activation`` (None, ``'relu'`` or ``'relu6'``) fused into the same passes: the
    result and gradients are those of ``relu(batch_norm(...))`` without the activation's own pass
    over memory, output and gradient array (MobileNet's ReLU6 passes were 13% of an epoch).

    >>> w = Parameter(np.ones(2))
    >>> y = batch_norm(np.array([[1.0, 2.0], [3.0, 6.0]]), None, None, w, None, training=True, eps=0.0)
    >>> y.numpy()
    array([[-1., -1.],
           [ 1.,  1.]])
    >>> batch_norm(np.array([[1.0], [3.0]]), None, None, training=True, eps=0.0, activation="relu").numpy()
    array([[0.],
           [1.]])
    """
    fn = "batch_norm"
    if activation is not None and activation not in _norm.ACTIVATIONS:
        raise ValueError(f"{fn}: activation must be None or one of {sorted(_norm.ACTIVATIONS)}, got {activation!r}")
    args = _nnf._bn_forward_args(fn, _data(x), running_mean, running_var, _data(weight), _data(bias), training,
                                 momentum, eps)
    xd, wd, training = args[0], args[3], args[5]
    y, mean, invstd = _nnf._batch_norm(*args, None, activation)
    if not is_recording(x, weight, bias):
        return Tensor(y)

    # the statistics this forward used: the batch's, or in eval mode the running ones as they are now
    def backward(g, needs):
        g = V.same_shape(fn, "grad_output", V.any_float_array(fn, "grad_output", g, xd.dtype), xd.shape)
        gx, gw, gb = _nnf._batch_norm_backward(g, xd, mean, invstd, wd, training, activation, y)
        return gx, gw, gb
    return record("BatchNormBackward", y, (x, weight, bias), backward)


def dropout(x, p=0.5, training=True, rng=None):
    """:func:`fastconv.dropout`, recorded (the mask is kept for the backward).

    >>> dropout(Tensor(np.ones(4)), 0.5, training=False).numpy()
    array([1., 1., 1., 1.])
    """
    xd = _data(x)
    y, keep = F.dropout(xd, p, training, rng=rng, return_mask=True)
    if not is_recording(x):
        return Tensor(y)
    pp = p if training else 0.0
    return record("DropoutBackward", y, (x,), lambda g, n: (F.dropout_backward(g, keep, pp),))


def adaptive_avg_pool2d(x, output_size):
    """:func:`fastconv.adaptive_avg_pool2d`, recorded.

    >>> adaptive_avg_pool2d(Tensor(np.ones((1, 2, 4, 4))), 1).shape
    (1, 2, 1, 1)
    """
    xd = _data(x)
    y = F.adaptive_avg_pool2d(xd, output_size)
    if not is_recording(x):
        return Tensor(y)
    shape = xd.shape
    return record("AdaptiveAvgPool2dBackward", y, (x,), lambda g, n: (F.adaptive_avg_pool2d_backward(g, shape),))


def conv_transpose2d(x, weight, bias=None, stride=1, padding=0, output_padding=0, groups=1, dilation=1, *,
                     algorithm="auto"):
    """:func:`fastconv.conv_transpose2d`, recorded.

    >>> conv_transpose2d(Tensor(np.ones((1, 1, 2, 2))), Parameter(np.ones((1, 1, 2, 2))), stride=2).shape
    (1, 1, 4, 4)
    """
    xd, wd, bd = _data(x), _data(weight), _data(bias)
    geo = dict(stride=stride, padding=padding, output_padding=output_padding, groups=groups, dilation=dilation,
               algorithm=algorithm)
    y = F.conv_transpose2d(xd, wd, bd, **geo)
    if not is_recording(x, weight, bias):
        return Tensor(y)

    def backward(g, needs):
        gx, gw, gb = F.conv_transpose2d_backward(g, xd, wd, **geo)
        return gx, gw, gb
    return record("ConvTranspose2dBackward", y, (x, weight, bias), backward)


def conv1d(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, *, algorithm="auto"):
    """:func:`fastconv.conv1d`, recorded.

    >>> conv1d(Tensor(np.ones((1, 1, 5))), Parameter(np.ones((2, 1, 3)))).shape
    (1, 2, 3)
    """
    xd, wd, bd = _data(x), _data(weight), _data(bias)
    geo = dict(stride=stride, padding=padding, dilation=dilation, groups=groups, algorithm=algorithm)
    y = F.conv1d(xd, wd, bd, **geo)
    if not is_recording(x, weight, bias):
        return Tensor(y)

    def backward(g, needs):
        gx, gw, gb = F.conv1d_backward(g, xd, wd, **geo)
        return gx, gw, gb
    return record("Conv1dBackward", y, (x, weight, bias), backward)


def relu6(x):
    """:func:`fastconv.relu6`, recorded.

    >>> relu6(Tensor(np.array([-1.0, 7.0]))).numpy()
    array([0., 6.])
    """
    xd = _data(x)
    y = F.relu6(xd)
    if not is_recording(x):
        return Tensor(y)
    return record("Relu6Backward", y, (x,), lambda g, n: (F.relu6_backward(g, xd),))


def leaky_relu(x, negative_slope=0.01):
    """:func:`fastconv.leaky_relu`, recorded.

    >>> leaky_relu(Tensor(np.array([-1.0, 2.0])), 0.5).numpy()
    array([-0.5,  2. ])
    """
    xd = _data(x)
    y = F.leaky_relu(xd, negative_slope)
    if not is_recording(x):
        return Tensor(y)
    return record("LeakyReluBackward", y, (x,), lambda g, n: (F.leaky_relu_backward(g, xd, negative_slope),))


# --------------------------------------------------------------------------- layers
class BatchNorm2d(Module):
    """Batch normalisation over ``(N, H, W)`` of each channel (see :func:`fastconv.batch_norm`), as
    ``torch.nn.BatchNorm2d``: learnable ``weight`` (ones) and ``bias`` (zeros) when ``affine``, buffers
    ``running_mean`` (zeros), ``running_var`` (ones) and ``num_batches_tracked`` when
    ``track_running_stats``.  ``momentum=None`` keeps a cumulative average, as PyTorch.

    >>> bn = BatchNorm2d(3)
    >>> y = bn(np.random.default_rng(0).standard_normal((4, 3, 2, 2)).astype(np.float32))
    >>> bool(abs(y.numpy().mean()) < 1e-6), bn.running_var.shape, int(bn.num_batches_tracked)
    (True, (3,), 1)
    """

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True, *,
                 dtype=np.float32):
        fn = "BatchNorm2d"
        self.num_features = _positive_int(fn, "num_features", num_features)
        self.eps = V.real(fn, "eps", eps, lo=0.0)
        self.momentum = None if momentum is None else V.real(fn, "momentum", momentum)
        self.affine = V._bool(fn, "affine", affine)
        self.track_running_stats = V._bool(fn, "track_running_stats", track_running_stats)
        self.dtype = V.float_dtype(fn, dtype)
        c = self.num_features
        self.weight = Parameter(np.ones(c, self.dtype)) if self.affine else None
        self.bias = Parameter(np.zeros(c, self.dtype)) if self.affine else None
        if self.track_running_stats:
            self.register_buffer("running_mean", np.zeros(c, self.dtype))
            self.register_buffer("running_var", np.ones(c, self.dtype))
            self.register_buffer("num_batches_tracked", np.zeros((), np.int64))
        else:
            self.running_mean = self.running_var = None

    def forward(self, x, activation=None):
        """Normalise ``x``; ``activation`` (None, ``'relu'`` or ``'relu6'``) is applied in the same
        pass (see :func:`batch_norm`): ``bn(x, activation='relu')`` is ``relu(bn(x))``, faster."""
        if activation is not None and activation not in _norm.ACTIVATIONS:
            raise ValueError(f"BatchNorm2d: activation must be None or one of {sorted(_norm.ACTIVATIONS)}, got "
                             f"{activation!r}")
        xd = _data(x)
        if getattr(xd, "ndim", 4) != 4:
            raise ValueError(f"BatchNorm2d: input must be 4-D (N, C, H, W), got shape {getattr(xd, 'shape', None)}")
        batch_stats = self.training or not self.track_running_stats
        momentum = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats:
            self.num_batches_tracked += 1
            if self.momentum is None:  # cumulative moving average, as PyTorch
                momentum = 1.0 / float(self.num_batches_tracked)
        rm, rv = (self.running_mean, self.running_var) if self.track_running_stats else (None, None)
        return batch_norm(x, rm, rv, self.weight, self.bias, batch_stats, momentum, self.eps, activation=activation)

    def output_shape(self, input_shape):
        return tuple(input_shape)

    def extra_repr(self):
        return f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}"


class Dropout(Module):
    """Dropout (see :func:`fastconv.dropout`): active in ``train()`` mode, the identity after ``eval()``.

    >>> d = Dropout(0.5, rng=0)
    >>> y = d(np.ones((2, 8), np.float32)).numpy(); sorted(set(y.ravel().tolist()))
    [0.0, 2.0]
    >>> d.eval()(np.ones(3)).numpy()
    array([1., 1., 1.])
    """

    def __init__(self, p=0.5, *, rng=None):
        self.p = V.real("Dropout", "p", p, 0.0, 1.0)
        self.rng = _rng("Dropout", rng)

    def forward(self, x):
        return dropout(x, self.p, self.training, self.rng)

    def output_shape(self, input_shape):
        return tuple(input_shape)

    def extra_repr(self):
        return f"p={self.p}"


class AdaptiveAvgPool2d(Module):
    """Adaptive average pooling to ``output_size`` (see :func:`fastconv.adaptive_avg_pool2d`); ``1`` is
    global average pooling.

    >>> AdaptiveAvgPool2d(1)(np.ones((2, 3, 5, 5))).shape
    (2, 3, 1, 1)
    """

    def __init__(self, output_size):
        fn = "AdaptiveAvgPool2d"
        if isinstance(output_size, (tuple, list)) and len(output_size) == 2:
            for v in output_size:
                if v is not None:
                    V.positive_pair(fn, "output_size", v)
        else:
            V.positive_pair(fn, "output_size", output_size)
        self.output_size = output_size

    def forward(self, x):
        return adaptive_avg_pool2d(x, self.output_size)

    def output_shape(self, input_shape):
        c, h, w = input_shape
        return (c,) + V.adaptive_size(type(self).__name__, self.output_size, h, w)

    def extra_repr(self):
        return f"output_size={self.output_size}"


class ConvTranspose2d(Module):
    """Transposed convolution layer (see :func:`fastconv.conv_transpose2d`), weight
    ``(in, out/groups, kh, kw)``, PyTorch's default initialisation (``fan_in = out/groups * kh * kw``,
    as PyTorch computes it from the weight's second axis).

    >>> up = ConvTranspose2d(4, 2, 2, stride=2, rng=0)
    >>> up.weight.shape, up(np.zeros((1, 4, 3, 3), np.float32)).shape
    ((4, 2, 2, 2), (1, 2, 6, 6))
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, output_padding=0, groups=1,
                 bias=True, dilation=1, *, algorithm="auto", dtype=np.float32, rng=None):
        fn = "ConvTranspose2d"
        self.in_channels, self.out_channels, self.groups = _conv_channels(fn, in_channels, out_channels, groups)
        self.kernel_size = V.positive_pair(fn, "kernel_size", kernel_size)
        self.stride = V.positive_pair(fn, "stride", stride)
        self.padding = V.nonnegative_pair(fn, "padding", padding)
        self.output_padding = V.nonnegative_pair(fn, "output_padding", output_padding)
        self.dilation = V.positive_pair(fn, "dilation", dilation)
        for a in range(2):
            if self.output_padding[a] >= max(self.stride[a], self.dilation[a]):
                raise ValueError(f"{fn}: output_padding must be smaller than stride or dilation (stride "
                                 f"{self.stride}, dilation {self.dilation}), got {self.output_padding}")
        self.algorithm = algorithm
        self.dtype = V.float_dtype(fn, dtype)
        rng = _rng(fn, rng)
        kh, kw = self.kernel_size
        fan_in = self.out_channels // self.groups * kh * kw
        self.weight = Parameter(_uniform(rng, (self.in_channels, self.out_channels // self.groups, kh, kw), fan_in,
                                         self.dtype))
        self.bias = Parameter(_uniform(rng, (self.out_channels,), fan_in, self.dtype)) if V._bool(fn, "bias", bias) \
            else None

    def forward(self, x):
        return conv_transpose2d(x, self.weight, self.bias, self.stride, self.padding, self.output_padding,
                                self.groups, self.dilation, algorithm=self.algorithm)

    def output_shape(self, input_shape):
        c, h, w = input_shape
        (kh, kw), (sh, sw), (ph, pw), (oh, ow), (dh, dw) = (self.kernel_size, self.stride, self.padding,
                                                              self.output_padding, self.dilation)
        return (self.out_channels, (h - 1) * sh - 2 * ph + dh * (kh - 1) + oh + 1,
                (w - 1) * sw - 2 * pw + dw * (kw - 1) + ow + 1)

    def extra_repr(self):
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, output_padding={self.output_padding}")


class Conv1d(Module):
    """1-D convolution layer (see :func:`fastconv.conv1d`), weight ``(out, in/groups, k)``, PyTorch's
    default initialisation.

    >>> conv = Conv1d(2, 3, 5, padding=2, rng=0)
    >>> conv.weight.shape, conv(np.zeros((4, 2, 16), np.float32)).shape
    ((3, 2, 5), (4, 3, 16))
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1,
                 bias=True, *, algorithm="auto", dtype=np.float32, rng=None):
        fn = "Conv1d"
        self.in_channels, self.out_channels, self.groups = _conv_channels(fn, in_channels, out_channels, groups)
        self.kernel_size = V.single(fn, "kernel_size", kernel_size)
        self.stride = V.single(fn, "stride", stride)
        self.dilation = V.single(fn, "dilation", dilation)
        self.padding = padding if isinstance(padding, str) else V.single(fn, "padding", padding, positive=False)
        self.algorithm = algorithm
        self.dtype = V.float_dtype(fn, dtype)
        rng = _rng(fn, rng)
        fan_in = self.in_channels // self.groups * self.kernel_size
        self.weight = Parameter(_uniform(rng, (self.out_channels, self.in_channels // self.groups, self.kernel_size),
                                         fan_in, self.dtype))
        self.bias = Parameter(_uniform(rng, (self.out_channels,), fan_in, self.dtype)) if V._bool(fn, "bias", bias) \
            else None

    def forward(self, x):
        return conv1d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups,
                      algorithm=self.algorithm)

    def output_shape(self, input_shape):
        fn = type(self).__name__
        if not isinstance(input_shape, (tuple, list)) or len(input_shape) != 2:
            raise ValueError(f"{fn}: input shape of one sample must be (C, L), got {input_shape!r}")
        pad = self.padding if isinstance(self.padding, str) else (0, self.padding)
        k, cg, s = self.weight.shape
        p = V.conv_params(fn, (1, input_shape[0], 1, input_shape[1]), (k, cg, 1, s), self.dtype, (1, self.stride),
                          pad, (1, self.dilation), self.groups)
        return (p.k, p.ow)

    def extra_repr(self):
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}")


class ReLU6(Module):
    """``min(max(x, 0), 6)`` (see :func:`fastconv.relu6`).

    >>> ReLU6()(np.array([-1.0, 8.0])).numpy()
    array([0., 6.])
    """

    def forward(self, x):
        return relu6(x)

    def output_shape(self, input_shape):
        return tuple(input_shape)


class LeakyReLU(Module):
    """``x if x > 0 else negative_slope * x`` (see :func:`fastconv.leaky_relu`).

    >>> LeakyReLU(0.1)(np.array([-1.0, 2.0])).numpy()
    array([-0.1,  2. ])
    """

    def __init__(self, negative_slope=0.01):
        self.negative_slope = V.real("LeakyReLU", "negative_slope", negative_slope)

    def forward(self, x):
        return leaky_relu(x, self.negative_slope)

    def output_shape(self, input_shape):
        return tuple(input_shape)

    def extra_repr(self):
        return f"negative_slope={self.negative_slope}"
