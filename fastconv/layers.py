"""Layers that hold parameters and the cache their backward pass needs; the arithmetic is in
:mod:`fastconv.functional` (which also validates the arrays each call receives).

Every layer is called for its forward pass, ``layer(x)``, and ``layer.backward(grad_output)``
returns the gradient with respect to that input and *adds* the gradients of its parameters to
their ``.grad`` (as PyTorch accumulates), so call ``zero_grad()`` between steps.  The forward
pass keeps what its backward pass needs; one backward per forward.

Initialisation is PyTorch's default: weights and biases of :class:`Conv2d` and :class:`Linear`
drawn from ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))`` (``kaiming_uniform_(a=sqrt(5))``), with
``fan_in = in_channels/groups * kernel height * kernel width`` or ``in_features``.

>>> import numpy as np
>>> from fastconv.layers import Conv2d, ReLU, MaxPool2d, Flatten, Linear, Sequential
>>> from fastconv.layers import CrossEntropyLoss, SGD
>>> model = Sequential(Conv2d(1, 4, 3, padding=1, rng=0), ReLU(), MaxPool2d(2), Flatten(),
...                    Linear(4 * 4 * 4, 10, rng=1))
>>> x = np.random.default_rng(2).standard_normal((5, 1, 8, 8)).astype(np.float32)
>>> loss_fn, opt = CrossEntropyLoss(), SGD(model.parameters(), lr=0.1, momentum=0.9)
>>> first = loss_fn(model(x), np.arange(5))
>>> for _ in range(20):
...     opt.zero_grad()
...     loss = loss_fn(model(x), np.arange(5))
...     _ = model.backward(loss_fn.backward(), input_grad=False)
...     opt.step()
>>> bool(loss < first / 10)
True
"""
from __future__ import annotations

import math
import os

import numpy as np

from . import _validation as V
from . import functional as F
from ._algorithms.common import bias_grad
from ._dispatch import algorithms
from ._select import select
from ._threads import apply as apply_threads

__all__ = [
    "Parameter", "Module", "Conv2d", "MaxPool2d", "AvgPool2d", "ReLU", "Flatten", "Linear", "Sequential",
    "CrossEntropyLoss", "SGD", "Adam",
]


# --------------------------------------------------------------------------- argument checks
def _positive_int(fn, name, v):
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
        raise TypeError(f"{fn}: {name} must be an int, got {v!r}")
    if v < 1:
        raise ValueError(f"{fn}: {name} must be positive, got {v}")
    return int(v)


def _nonnegative_number(fn, name, v):
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, float, np.integer, np.floating)):
        raise TypeError(f"{fn}: {name} must be a number, got {v!r}")
    if not (v >= 0 and math.isfinite(v)):
        raise ValueError(f"{fn}: {name} must be a finite number >= 0, got {v!r}")
    return float(v)


_float_dtype = V.float_dtype


def _rng(fn, rng):
    if rng is None or isinstance(rng, (int, np.integer)) and not isinstance(rng, (bool, np.bool_)):
        return np.random.default_rng(rng)
    if isinstance(rng, np.random.Generator):
        return rng
    raise TypeError(f"{fn}: rng must be None, an int seed or a numpy.random.Generator, got {rng!r}")


def _uniform(rng, shape, fan_in, dtype):
    bound = 1.0 / math.sqrt(fan_in)
    return rng.uniform(-bound, bound, size=shape).astype(dtype)


def _conv_param_grads(grad_output, x, weight, stride, padding, dilation, groups, algorithm):
    """Weight and bias gradients of a convolution without its input gradient.

    :func:`fastconv.conv2d_backward` always computes all three; this is its validation and
    dispatch for the ``grad_weight`` pass alone (for a network's first layer, whose input gradient
    nobody uses -- a third of that layer's backward time).
    """
    fn = "conv2d_backward"
    grad_output, x, weight, p = V.check_conv2d_backward(fn, grad_output, x, weight, stride, padding,
                                                        dilation, groups)
    threads = apply_threads(p.macs)  # first: 'auto' chooses for the thread count the call runs with
    alg = select(fn, algorithm, p, "grad_weight", threads)
    if p.n == 0:
        return np.zeros(p.w_shape, p.dtype), np.zeros(p.k, p.dtype)
    return alg.grad_weight(grad_output, x, p), bias_grad(grad_output)


# --------------------------------------------------------------------------- parameters and modules
class Parameter:
    """A trainable array ``data`` and the gradient ``grad`` (same shape and dtype) accumulated into it.

    >>> p = Parameter(np.ones(3, np.float32))
    >>> p.grad
    array([0., 0., 0.], dtype=float32)
    """

    __slots__ = ("data", "grad")

    def __init__(self, data):
        self.data = V.as_float_array("Parameter", "data", data, data.ndim if isinstance(data, np.ndarray) else 0)
        self.grad = np.zeros_like(data)

    @property
    def shape(self):
        return self.data.shape

    def __repr__(self):
        return f"Parameter(shape={self.data.shape}, dtype={self.data.dtype})"


class Module:
    """Base class: parameter traversal, gradients reset, and ``.npz`` state save/load.

    Subclasses define ``forward``, ``backward`` and ``output_shape`` (the per-image shape this
    layer maps an input ``(C, H, W)`` or ``(F,)`` to, used by :func:`fastconv.summary`).
    """

    _params: tuple = ()

    def __call__(self, x):
        return self.forward(x)

    def named_parameters(self, prefix=""):
        """Yield ``(name, Parameter)`` pairs, named as PyTorch names them (``'0.weight'``, ...)."""
        for name in self._params:
            p = getattr(self, name)
            if p is not None:
                yield prefix + name, p

    def parameters(self):
        """Yield the :class:`Parameter` objects of this layer (and of the layers it contains)."""
        for _, p in self.named_parameters():
            yield p

    def zero_grad(self):
        for p in self.parameters():
            p.grad[...] = 0

    def num_parameters(self):
        return sum(p.data.size for p in self.parameters())

    def state_dict(self):
        """Copies of all parameter arrays by name."""
        return {name: p.data.copy() for name, p in self.named_parameters()}

    def load_state_dict(self, state):
        """Copy arrays (a dict or an ``.npz`` archive) into the parameters; names and shapes must match."""
        fn = f"{type(self).__name__}.load_state_dict"
        own = dict(self.named_parameters())
        keys = set(state.keys()) if hasattr(state, "keys") else None
        if keys is None:
            raise TypeError(f"{fn}: state must be a mapping of names to arrays, got {type(state).__name__}")
        if keys != set(own):
            raise ValueError(f"{fn}: state must have the parameters {sorted(own)}, got {sorted(keys)} "
                             f"(missing {sorted(set(own) - keys)}, unexpected {sorted(keys - set(own))})")
        for name, p in own.items():
            a = np.asarray(state[name])
            if a.shape != p.data.shape:
                raise ValueError(f"{fn}: {name} must have shape {p.data.shape}, got {a.shape}")
            p.data[...] = a
        return self

    def save(self, file):
        """Save the parameters to an ``.npz`` file (``numpy.savez``; a ``.npz`` suffix is added if missing)."""
        np.savez(file, **self.state_dict())

    def load(self, file):
        """Load parameters saved by :meth:`save` into this model (same architecture)."""
        fn = f"{type(self).__name__}.load"
        if isinstance(file, (str, os.PathLike)) and not os.path.exists(file):
            if os.path.exists(os.fspath(file) + ".npz"):  # numpy.savez added the suffix
                file = os.fspath(file) + ".npz"
            else:
                raise FileNotFoundError(f"{fn}: no such file {os.fspath(file)!r}")
        with np.load(file, allow_pickle=False) as data:
            return self.load_state_dict({k: data[k] for k in data.files})

    def output_shape(self, input_shape):
        return tuple(input_shape)

    def extra_repr(self):
        return ""

    def __repr__(self):
        return f"{type(self).__name__}({self.extra_repr()})"

    def _cached(self, name):
        value = getattr(self, name, None)
        if value is None:
            raise RuntimeError(f"{type(self).__name__}.backward: call forward first "
                               f"(one backward per forward)")
        return value

    def _done(self, name, result):
        """Drop the forward state ``name`` once a backward has succeeded, and return ``result``.

        A backward that raises (a wrong grad_output, say) keeps the state, so it can be retried.
        """
        setattr(self, name, None)
        return result


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
    >>> conv.backward(np.ones_like(y)).shape, conv.bias.grad[0]
    ((2, 3, 5, 5), np.float32(50.0))
    """

    _params = ("weight", "bias")

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1,
                 bias=True, *, algorithm="auto", dtype=np.float32, rng=None):
        fn = "Conv2d"
        self.in_channels = _positive_int(fn, "in_channels", in_channels)
        self.out_channels = _positive_int(fn, "out_channels", out_channels)
        self.groups = _positive_int(fn, "groups", groups)
        if self.in_channels % self.groups or self.out_channels % self.groups:
            raise ValueError(f"{fn}: in_channels and out_channels must be divisible by groups={self.groups}, "
                             f"got {self.in_channels} and {self.out_channels}")
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
            names = ", ".join(repr(n) for n in ("auto",) + algorithms())
            raise ValueError(f"{fn}: algorithm must be one of {names}, got {algorithm!r}")
        self.algorithm = algorithm
        self.dtype = _float_dtype(fn, dtype)
        rng = _rng(fn, rng)
        kh, kw = self.kernel_size
        fan_in = self.in_channels // self.groups * kh * kw
        self.weight = Parameter(_uniform(rng, (self.out_channels, self.in_channels // self.groups, kh, kw),
                                         fan_in, self.dtype))
        self.bias = Parameter(_uniform(rng, (self.out_channels,), fan_in, self.dtype)) if bias else None
        self._x = None

    def _geometry(self):
        return dict(stride=self.stride, padding=self.padding, dilation=self.dilation, groups=self.groups,
                    algorithm=self.algorithm)

    def forward(self, x):
        if isinstance(x, np.ndarray) and x.dtype != self.dtype and x.dtype in V.FLOAT_DTYPES:
            raise TypeError(f"Conv2d: input must have the layer's dtype {self.dtype}, got {x.dtype} "
                            f"(build the layer with dtype={x.dtype.name} or convert the input)")
        y = F.conv2d(x, self.weight.data, None if self.bias is None else self.bias.data, **self._geometry())
        self._x = x
        return y

    def backward(self, grad_output, input_grad=True):
        """Add the weight and bias gradients to ``.grad``; return the input gradient (``None`` and
        not computed with ``input_grad=False``, as for a network's input)."""
        x = self._cached("_x")
        if not input_grad:
            gw, gb = _conv_param_grads(grad_output, x, self.weight.data, **self._geometry())
            self.weight.grad += gw
            if self.bias is not None:
                self.bias.grad += gb
            return self._done("_x", None)
        g = F.conv2d_backward(grad_output, x, self.weight.data, **self._geometry())
        self.weight.grad += g.grad_weight
        if self.bias is not None:
            self.bias.grad += g.grad_bias
        return self._done("_x", g.grad_input)

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
    >>> pool(x)[0, 0]
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
        self._cache = None

    def forward(self, x):
        y, idx = F.max_pool2d(x, self.kernel_size, self.stride, self.padding, self.dilation, self.ceil_mode,
                              return_indices=True)
        self._cache = (idx, x.shape)
        return y

    def backward(self, grad_output):
        idx, shape = self._cached("_cache")
        return self._done("_cache", F.max_pool2d_backward(grad_output, idx, shape))

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
        self._shape = None

    def _args(self):
        return self.kernel_size, self.stride, self.padding, self.ceil_mode, self.count_include_pad

    def forward(self, x):
        y = F.avg_pool2d(x, *self._args())
        self._shape = x.shape
        return y

    def backward(self, grad_output):
        return self._done("_shape", F.avg_pool2d_backward(grad_output, self._cached("_shape"), *self._args()))

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
    (array([0., 2.]), array([0., 5.]))
    """

    def __init__(self):
        self._x = None

    def forward(self, x):
        y = F.relu(x)
        self._x = x
        return y

    def backward(self, grad_output):
        return self._done("_x", F.relu_backward(grad_output, self._cached("_x")))


class Flatten(Module):
    """Reshape ``(N, d1, d2, ...)`` to ``(N, d1*d2*...)`` (``start_dim=1``, as PyTorch's default).

    >>> Flatten()(np.zeros((2, 3, 4, 4))).shape
    (2, 48)
    """

    def __init__(self):
        self._shape = None

    def forward(self, x):
        if not isinstance(x, np.ndarray) or x.ndim < 1:
            raise TypeError(f"Flatten: input must be a numpy.ndarray with a batch axis, got {type(x).__name__}")
        self._shape = x.shape
        return x.reshape(x.shape[0], -1)

    def backward(self, grad_output):
        shape = self._cached("_shape")
        want = (shape[0], int(np.prod(shape[1:])))
        if not isinstance(grad_output, np.ndarray) or grad_output.shape != want:
            got = grad_output.shape if isinstance(grad_output, np.ndarray) else type(grad_output).__name__
            raise ValueError(f"Flatten.backward: grad_output must be an array of the output's shape {want}, "
                             f"got {got}")
        return self._done("_shape", grad_output.reshape(shape))

    def output_shape(self, input_shape):
        return (int(np.prod(input_shape)),)


class Linear(Module):
    """Fully connected layer ``y = x @ weight.T + bias``, weight ``(out_features, in_features)``.

    >>> fc = Linear(3, 2, rng=0)
    >>> y = fc(np.ones((4, 3), np.float32)); y.shape
    (4, 2)
    >>> fc.backward(np.ones((4, 2), np.float32)).shape, fc.bias.grad
    ((4, 3), array([4., 4.], dtype=float32))
    """

    _params = ("weight", "bias")

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
        self._x = None

    def forward(self, x):
        fn = "Linear"
        x = V.as_float_array(fn, "input", x, 2, self.dtype)
        if x.shape[1] != self.in_features:
            raise ValueError(f"{fn}: input must have shape (N, {self.in_features}), got {x.shape}")
        y = x @ self.weight.data.T
        if self.bias is not None:
            y += self.bias.data
        self._x = x
        return y

    def backward(self, grad_output, input_grad=True):
        fn = "Linear.backward"
        x = self._cached("_x")
        grad_output = V.as_float_array(fn, "grad_output", grad_output, 2, self.dtype)
        if grad_output.shape != (x.shape[0], self.out_features):
            raise ValueError(f"{fn}: grad_output must have the output's shape {(x.shape[0], self.out_features)}, "
                             f"got {grad_output.shape}")
        self.weight.grad += grad_output.T @ x
        if self.bias is not None:
            self.bias.grad += grad_output.sum(axis=0)
        return self._done("_x", grad_output @ self.weight.data if input_grad else None)

    def output_shape(self, input_shape):
        if tuple(input_shape) != (self.in_features,):
            raise ValueError(f"Linear: input must have shape ({self.in_features},) per sample, got {tuple(input_shape)}")
        return (self.out_features,)

    def extra_repr(self):
        return f"{self.in_features}, {self.out_features}" + ("" if self.bias is not None else ", bias=False")


class Sequential(Module):
    """Layers applied in order; ``backward`` runs them in reverse.

    >>> net = Sequential(Linear(4, 3, rng=0), ReLU(), Linear(3, 2, rng=1))
    >>> len(net), [name for name, _ in net.named_parameters()]
    (3, ['0.weight', '0.bias', '2.weight', '2.bias'])
    """

    def __init__(self, *layers):
        for i, layer in enumerate(layers):
            if not isinstance(layer, Module):
                raise TypeError(f"Sequential: layers must be fastconv layers, got {type(layer).__name__} "
                                f"at position {i}")
        self.layers = list(layers)

    def __len__(self):
        return len(self.layers)

    def __getitem__(self, i):
        return self.layers[i]

    def __iter__(self):
        return iter(self.layers)

    def named_parameters(self, prefix=""):
        for i, layer in enumerate(self.layers):
            yield from layer.named_parameters(f"{prefix}{i}.")

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x

    def backward(self, grad_output, input_grad=True):
        """Backward through all layers; ``input_grad=False`` skips the first layer's input gradient
        where it can (a network's input needs none) and returns ``None``."""
        for i in range(len(self.layers) - 1, -1, -1):
            layer = self.layers[i]
            if i == 0 and not input_grad and isinstance(layer, (Conv2d, Linear)):
                return layer.backward(grad_output, input_grad=False)
            grad_output = layer.backward(grad_output)
        return grad_output if input_grad else None

    def output_shape(self, input_shape):
        for layer in self.layers:
            input_shape = layer.output_shape(input_shape)
        return input_shape

    def __repr__(self):
        inner = "".join(f"\n  ({i}): {layer!r}" for i, layer in enumerate(self.layers))
        return f"Sequential({inner}\n)"


# --------------------------------------------------------------------------- loss
class CrossEntropyLoss:
    """Softmax cross-entropy of logits ``(N, classes)`` against integer targets ``(N,)``.

    ``loss = -mean_n log_softmax(logits)[n, target[n]]`` computed as ``z - max(z) - log(sum(exp(z - max(z))))``
    so large logits do not overflow.  ``backward()`` returns ``(softmax(logits) - onehot) / N``.

    >>> loss_fn = CrossEntropyLoss()
    >>> round(loss_fn(np.array([[1000.0, 0.0], [0.0, 0.0]]), np.array([0, 1])), 6)
    0.346574
    >>> loss_fn.backward()
    array([[ 0.  ,  0.  ],
           [ 0.25, -0.25]])
    """

    def __init__(self, reduction="mean"):
        if reduction not in ("mean", "sum"):
            raise ValueError(f"CrossEntropyLoss: reduction must be 'mean' or 'sum', got {reduction!r}")
        self.reduction = reduction
        self._cache = None

    def __call__(self, logits, target):
        return self.forward(logits, target)

    def forward(self, logits, target):
        fn = "CrossEntropyLoss"
        logits = V.as_float_array(fn, "logits", logits, 2)
        if not isinstance(target, np.ndarray) or target.dtype.kind not in "iu":
            raise TypeError(f"{fn}: target must be an integer numpy.ndarray, got "
                            f"{getattr(target, 'dtype', type(target).__name__)}")
        n, k = logits.shape
        if target.shape != (n,):
            raise ValueError(f"{fn}: target must have shape ({n},) to match logits {logits.shape}, got {target.shape}")
        if n and (target.min() < 0 or target.max() >= k):
            raise ValueError(f"{fn}: target must lie in [0, {k}), got values from {target.min()} to {target.max()}")
        z = logits - logits.max(axis=1, keepdims=True)
        e = np.exp(z)
        s = e.sum(axis=1, keepdims=True)
        picked = z[np.arange(n), target] - np.log(s[:, 0])
        total = -picked.sum(dtype=np.float64)
        e /= s  # softmax, kept for backward
        self._cache = (e, target)
        return float(total / n if self.reduction == "mean" and n else total)

    def backward(self):
        """Gradient of the last loss with respect to its logits."""
        if self._cache is None:
            raise RuntimeError("CrossEntropyLoss.backward: call the loss first (one backward per call)")
        p, target = self._cache
        self._cache = None
        n = p.shape[0]
        p[np.arange(n), target] -= 1
        if self.reduction == "mean" and n:
            p *= p.dtype.type(1.0 / n)
        return p


# --------------------------------------------------------------------------- optimisers
class _Optimizer:
    """Parameters are gathered, per dtype, into one flat buffer whose views become their ``.data``
    and ``.grad``: a step is then a handful of whole-buffer operations instead of a handful per
    parameter (what PyTorch's ``foreach`` implementations do).  Layers read ``.data`` and add into
    ``.grad`` in place, so they see the views; a parameter whose ``.data`` or ``.grad`` was replaced
    by another array is copied back into the buffer at the next step."""

    def __init__(self, fn, params, lr, weight_decay):
        if isinstance(params, Parameter) or not hasattr(params, "__iter__"):
            raise TypeError(f"{fn}: params must be an iterable of Parameter objects (model.parameters()), "
                            f"got {type(params).__name__}")
        params = list(params)
        if not params:
            raise ValueError(f"{fn}: params must contain at least one Parameter, got an empty sequence")
        for p in params:
            if not isinstance(p, Parameter):
                raise TypeError(f"{fn}: params must be Parameter objects (model.parameters()), "
                                f"got {type(p).__name__}")
        self.params = list({id(p): p for p in params}.values())  # each parameter once
        self.lr = _nonnegative_number(fn, "lr", lr)
        self.weight_decay = _nonnegative_number(fn, "weight_decay", weight_decay)
        self._groups = []  # (params, flat data, flat grad, [(data view, grad view)])
        for dt in dict.fromkeys(p.data.dtype for p in self.params):
            group = [p for p in self.params if p.data.dtype == dt]
            total = sum(p.data.size for p in group)
            data, grad = np.empty(total, dt), np.empty(total, dt)
            self._groups.append((group, data, grad, []))
        self._bind(force=True)

    def _bind(self, force=False):
        """Point every parameter's ``.data`` and ``.grad`` at its slice of the group buffers."""
        for group, data, grad, views in self._groups:
            if not force and all(p.data is d and p.grad is g for p, (d, g) in zip(group, views)):
                continue
            views.clear()
            off = 0
            for p in group:
                n = p.data.size
                d, g = data[off:off + n].reshape(p.data.shape), grad[off:off + n].reshape(p.data.shape)
                if p.data is not d:
                    d[...] = p.data
                if p.grad is not g:
                    g[...] = p.grad
                p.data, p.grad = d, g
                views.append((d, g))
                off += n

    def zero_grad(self):
        """Set every parameter's gradient to zero."""
        self._bind()
        for _, _, grad, _ in self._groups:
            grad[...] = 0

    def step(self):
        """Update every parameter from its ``.grad``."""
        self._bind()
        for i, (_, data, grad, _) in enumerate(self._groups):
            g = grad + self.weight_decay * data if self.weight_decay else grad
            self._update(i, data, g)


class SGD(_Optimizer):
    """Stochastic gradient descent with optional momentum and weight decay (PyTorch's update rule).

    ``g = grad + weight_decay*p``; with momentum ``buf = momentum*buf + (1-dampening)*g`` (``buf = g``
    at the first step) and ``g = buf`` (or ``g + momentum*buf`` with ``nesterov``); ``p -= lr*g``.

    >>> p = Parameter(np.array([1.0])); p.grad[:] = 2.0
    >>> opt = SGD([p], lr=0.1, momentum=0.9)
    >>> opt.step(); opt.step(); p.data
    array([0.42])
    """

    def __init__(self, params, lr, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False):
        fn = "SGD"
        super().__init__(fn, params, lr, weight_decay)
        self.momentum = _nonnegative_number(fn, "momentum", momentum)
        self.dampening = _nonnegative_number(fn, "dampening", dampening)
        self.nesterov = V._bool(fn, "nesterov", nesterov)
        if self.nesterov and (self.momentum == 0 or self.dampening != 0):
            raise ValueError(f"{fn}: nesterov requires momentum > 0 and dampening = 0, "
                             f"got momentum={momentum}, dampening={dampening}")
        self._bufs = [None] * len(self._groups)

    def _update(self, i, data, g):
        if self.momentum:
            buf = self._bufs[i]
            if buf is None:
                buf = self._bufs[i] = np.array(g, copy=True)
            else:
                buf *= self.momentum
                buf += (1.0 - self.dampening) * g
            g = g + self.momentum * buf if self.nesterov else buf
        data -= self.lr * g


class Adam(_Optimizer):
    """Adam (Kingma & Ba), PyTorch's update with bias correction and L2 ``weight_decay``.

    >>> p = Parameter(np.array([1.0])); p.grad[:] = 0.5
    >>> opt = Adam([p], lr=0.1)
    >>> opt.step(); p.data  # the first step moves each weight by about lr
    array([0.9])
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        fn = "Adam"
        super().__init__(fn, params, lr, weight_decay)
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"{fn}: betas must be a pair of numbers in [0, 1), got {betas!r}")
        self.betas = tuple(_nonnegative_number(fn, "betas", b) for b in betas)
        if max(self.betas) >= 1:
            raise ValueError(f"{fn}: betas must be a pair of numbers in [0, 1), got {betas!r}")
        self.eps = _nonnegative_number(fn, "eps", eps)
        if self.eps == 0:  # a weight whose gradient has been 0 so far would get 0/0 = NaN
            raise ValueError(f"{fn}: eps must be a number > 0, got {eps!r}")
        self.t = 0
        self._m = [np.zeros_like(data) for _, data, _, _ in self._groups]
        self._v = [np.zeros_like(data) for _, data, _, _ in self._groups]

    def step(self):
        """Update every parameter from its ``.grad``."""
        self.t += 1
        super().step()

    def _update(self, i, data, g):
        b1, b2 = self.betas
        step_size = self.lr / (1.0 - b1 ** self.t)
        bc2_sqrt = math.sqrt(1.0 - b2 ** self.t)
        m, v = self._m[i], self._v[i]
        m *= b1
        m += (1.0 - b1) * g
        v *= b2
        v += (1.0 - b2) * (g * g)
        denom = np.sqrt(v)
        denom /= bc2_sqrt
        denom += self.eps
        m_hat = m / denom
        m_hat *= step_size
        data -= m_hat
