"""The layers of :mod:`fastconv.layers` on :class:`fastconv.layers.Module`: :class:`Conv2d`,
:class:`MaxPool2d`, :class:`AvgPool2d`, :class:`ReLU`, :class:`Flatten`, :class:`Linear`.

``fastconv.layers`` (the base class, the containers, :class:`Sequential`) re-exports them: import
them from there.
"""
from __future__ import annotations

import numpy as np

from . import _validation as V
from . import autograd as A
from .autograd import Parameter, Tensor
from .layers import Module, _conv_channels, _float_dtype, _positive_int, _rng, _uniform


# --------------------------------------------------------------------------- layers
class Conv2d(Module):
    """2-D convolution layer (see :func:`fastconv.conv2d`), weight ``(out, in/groups, kh, kw)``.

    Parameters
    ----------
    in_channels, out_channels : int
        Both divisible by ``groups``.
    kernel_size, stride, padding, dilation, groups
        As :func:`fastconv.conv2d` (``padding`` may be ``'same'`` or ``'valid'``).
    bias : bool
    algorithm : str
        ``'auto'`` or a name from :func:`fastconv.algorithms`, used for forward and backward.
    dtype : float32 or float64
    rng : None, int or numpy.random.Generator
        Source of the initial weights (PyTorch's default distribution).

    Examples
    --------
    >>> conv = Conv2d(3, 8, 3, padding=1, rng=0)
    >>> conv.weight.shape, conv.bias.shape
    ((8, 3, 3, 3), (8,))
    >>> y = conv(np.zeros((2, 3, 5, 5), np.float32)); y.shape
    (2, 8, 5, 5)
    >>> y.sum().backward(); conv.bias.grad[0]
    np.float32(50.0)
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1,
                 bias=True, *, algorithm="auto", dtype=np.float32, rng=None):
        from . import algorithms  # the public list (the package imports this module)

        fn = "Conv2d"
        self.in_channels, self.out_channels, self.groups = _conv_channels(fn, in_channels, out_channels, groups)
        self.kernel_size = V.positive_pair(fn, "kernel_size", kernel_size)
        self.stride = V.positive_pair(fn, "stride", stride)
        self.dilation = V.positive_pair(fn, "dilation", dilation)
        if isinstance(padding, str):
            V._conv_padding(fn, padding, self.kernel_size, self.stride, self.dilation)  # validates
            self.padding = padding
        else:
            self.padding = V.nonnegative_pair(fn, "padding", padding)
        bias = V._bool(fn, "bias", bias)
        if not isinstance(algorithm, str):
            raise TypeError(f"{fn}: algorithm must be a str, got {type(algorithm).__name__}")
        if algorithm != "auto" and algorithm not in algorithms():
            names = ", ".join(repr(n) for n in ("auto",) + tuple(algorithms()))
            raise ValueError(f"{fn}: algorithm must be one of {names}, got {algorithm!r}")
        self.algorithm = algorithm
        self.dtype = _float_dtype(fn, dtype)
        rng = _rng(fn, rng)
        kh, kw = self.kernel_size
        fan_in = self.in_channels // self.groups * kh * kw
        self.weight = Parameter(_uniform(rng, (self.out_channels, self.in_channels // self.groups, kh, kw),
                                         fan_in, self.dtype))
        self.bias = Parameter(_uniform(rng, (self.out_channels,), fan_in, self.dtype)) if bias else None

    def forward(self, x):
        dt = getattr(x, "dtype", None)
        if dt is not None and dt != self.dtype and dt in V.FLOAT_DTYPES:
            raise TypeError(f"Conv2d: input must have the layer's dtype {self.dtype}, got {dt} "
                            f"(build the layer with dtype={dt.name} or convert the input)")
        last = getattr(self, "memory_format", None) == "channels_last"  # (Module.to)
        if last and getattr(x, "ndim", 0) == 4:
            x = A.contiguous(x, "channels_last")
        y = A.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups,
                     algorithm=self.algorithm)
        return A.contiguous(y, "channels_last") if last and y.ndim == 4 else y

    def params(self, input_shape):
        """:class:`~fastconv._validation.ConvParams` of one image of shape ``(C, H, W)``."""
        return V.conv_params(type(self).__name__, _sample_chw(self, input_shape), self.weight.shape, self.dtype,
                             self.stride, self.padding, self.dilation, self.groups)

    def output_shape(self, input_shape):
        p = self.params(input_shape)
        return (p.k, p.oh, p.ow)

    def extra_repr(self):
        s = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
             f"stride={self.stride}, padding={self.padding}")
        if self.dilation != (1, 1):
            s += f", dilation={self.dilation}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        return s + ("" if self.bias is not None else ", bias=False")


class MaxPool2d(Module):
    """Max pooling layer (see :func:`fastconv.max_pool2d`); backward routes gradients to the maxima.

    >>> pool = MaxPool2d(2)
    >>> x = np.arange(16.0).reshape(1, 1, 4, 4)
    >>> pool(x).numpy()[0, 0]
    array([[ 5.,  7.],
           [13., 15.]])
    >>> pool.backward(np.ones((1, 1, 2, 2)))[0, 0, 1]
    array([0., 1., 0., 1.])
    """

    def __init__(self, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False):
        fn = "MaxPool2d"
        self.kernel_size = V.positive_pair(fn, "kernel_size", kernel_size)
        self.stride = self.kernel_size if stride is None else V.positive_pair(fn, "stride", stride)
        self.padding = V.nonnegative_pair(fn, "padding", padding)
        self.dilation = V.positive_pair(fn, "dilation", dilation)
        self.ceil_mode = V._bool(fn, "ceil_mode", ceil_mode)
        if 2 * self.padding[0] > self.kernel_size[0] or 2 * self.padding[1] > self.kernel_size[1]:
            raise ValueError(f"{fn}: padding must be at most half of kernel_size {self.kernel_size}, "
                             f"got {self.padding}")

    def forward(self, x):
        return A.max_pool2d(x, self.kernel_size, self.stride, self.padding, self.dilation, self.ceil_mode)

    def output_shape(self, input_shape):
        p = V.pool_params(type(self).__name__, _sample_chw(self, input_shape), self.kernel_size, self.stride,
                          self.padding, self.dilation, self.ceil_mode)
        return p.y_shape[1:]

    def extra_repr(self):
        return f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}"


class AvgPool2d(Module):
    """Average pooling layer (see :func:`fastconv.avg_pool2d`).

    >>> pool = AvgPool2d(2)
    >>> pool(np.ones((1, 1, 4, 4))).shape, pool.backward(np.ones((1, 1, 2, 2)))[0, 0, 0, 0]
    ((1, 1, 2, 2), np.float64(0.25))
    """

    def __init__(self, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True):
        fn = "AvgPool2d"
        self.kernel_size = V.positive_pair(fn, "kernel_size", kernel_size)
        self.stride = self.kernel_size if stride is None else V.positive_pair(fn, "stride", stride)
        self.padding = V.nonnegative_pair(fn, "padding", padding)
        self.ceil_mode = V._bool(fn, "ceil_mode", ceil_mode)
        self.count_include_pad = V._bool(fn, "count_include_pad", count_include_pad)
        if 2 * self.padding[0] > self.kernel_size[0] or 2 * self.padding[1] > self.kernel_size[1]:
            raise ValueError(f"{fn}: padding must be at most half of kernel_size {self.kernel_size}, "
                             f"got {self.padding}")

    def forward(self, x):
        return A.avg_pool2d(x, self.kernel_size, self.stride, self.padding, self.ceil_mode, self.count_include_pad)

    def output_shape(self, input_shape):
        p = V.pool_params(type(self).__name__, _sample_chw(self, input_shape), self.kernel_size, self.stride,
                          self.padding, 1, self.ceil_mode)
        return p.y_shape[1:]

    def extra_repr(self):
        return f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}"


def _sample_chw(layer, input_shape):
    """``(1, C, H, W)`` for one sample's shape ``(C, H, W)``; a clear error for anything else."""
    if not isinstance(input_shape, (tuple, list)) or len(input_shape) != 3:
        raise ValueError(f"{type(layer).__name__}: input shape of one sample must be (C, H, W), got {input_shape!r}")
    return (1,) + tuple(input_shape)


class ReLU(Module):
    """Rectified linear unit (see :func:`fastconv.relu`).

    >>> act = ReLU()
    >>> act(np.array([-1.0, 2.0])), act.backward(np.array([5.0, 5.0]))
    (Tensor([0., 2.], grad_fn=<ReluBackward>), array([0., 5.]))
    """

    def forward(self, x):
        return A.relu(x)

    def output_shape(self, input_shape):
        return tuple(input_shape)


class Flatten(Module):
    """Reshape ``(N, d1, d2, ...)`` to ``(N, d1*d2*...)`` (``start_dim=1``, as PyTorch's default).

    >>> Flatten()(np.zeros((2, 3, 4, 4))).shape
    (2, 48)
    """

    def forward(self, x):
        if not isinstance(x, (np.ndarray, Tensor)) or x.ndim < 1:
            raise TypeError(f"Flatten: input must be a numpy.ndarray with a batch axis, got {type(x).__name__}")
        return A.flatten(x, 1)

    def output_shape(self, input_shape):
        return (int(np.prod(input_shape)),)


class Linear(Module):
    """Fully connected layer ``y = x @ weight.T + bias``, weight ``(out_features, in_features)``.

    >>> fc = Linear(3, 2, rng=0)
    >>> y = fc(np.ones((4, 3), np.float32)); y.shape
    (4, 2)
    >>> y.sum().backward(); fc.bias.grad
    array([4., 4.], dtype=float32)
    """

    def __init__(self, in_features, out_features, bias=True, *, dtype=np.float32, rng=None):
        fn = "Linear"
        self.in_features = _positive_int(fn, "in_features", in_features)
        self.out_features = _positive_int(fn, "out_features", out_features)
        bias = V._bool(fn, "bias", bias)
        self.dtype = _float_dtype(fn, dtype)
        rng = _rng(fn, rng)
        self.weight = Parameter(_uniform(rng, (self.out_features, self.in_features), self.in_features,
                                         self.dtype))
        self.bias = Parameter(_uniform(rng, (self.out_features,), self.in_features, self.dtype)) if bias else None

    def forward(self, x):
        fn = "Linear"
        V.as_float_array(fn, "input", x.data if isinstance(x, Tensor) else x, 2, self.dtype)
        if x.shape[1] != self.in_features:
            raise ValueError(f"{fn}: input must have shape (N, {self.in_features}), got {x.shape}")
        return A.linear(x, self.weight, self.bias)

    def output_shape(self, input_shape):
        if tuple(input_shape) != (self.in_features,):
            raise ValueError(f"Linear: input must have shape ({self.in_features},) per sample, got {tuple(input_shape)}")
        return (self.out_features,)

    def extra_repr(self):
        return f"{self.in_features}, {self.out_features}" + ("" if self.bias is not None else ", bias=False")
