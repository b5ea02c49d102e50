"""The recorded ops of :mod:`fastconv.autograd`: each computes its result with NumPy or
:mod:`fastconv.functional` and records its backward with :func:`fastconv.autograd.record`.

Re-exported by ``fastconv.autograd`` (the public names), whose :class:`Tensor` operators and NumPy
dispatch call them.
"""
from __future__ import annotations

import numpy as np

from . import _validation as V
from . import functional as F
from ._threads import blas_for as _blas_for
from .autograd import Parameter, Tensor, _data, _recorded, _unwrap, is_recording  # noqa: F401 (Parameter: examples)


# --------------------------------------------------------------------------- ops
def _unbroadcast(g, shape):
    """Sum ``g`` over the axes NumPy broadcasting added or stretched to reach ``g.shape``."""
    if g.shape == shape:
        return g
    lead = g.ndim - len(shape)
    if lead:
        g = g.sum(axis=tuple(range(lead)))
    axes = tuple(i for i, s in enumerate(shape) if s == 1 and g.shape[i] != 1)
    return g.sum(axis=axes, keepdims=True) if axes else g


def add(a, b):
    """``a + b`` with NumPy broadcasting, recorded.

    >>> p = Parameter(np.zeros((2, 1)))
    >>> add(p, np.ones((2, 3))).sum().backward(); p.grad
    array([[3.],
           [3.]])
    """
    ad, bd = _data(a), _data(b)
    y = ad + bd
    if not is_recording(a, b):
        return Tensor(y)
    sa, sb = np.shape(ad), np.shape(bd)
    return _recorded("AddBackward", y, (a, b),
                  lambda g, n: (_unbroadcast(g, sa) if n[0] else None, _unbroadcast(g, sb) if n[1] else None))


def mul(a, b):
    """``a * b`` with NumPy broadcasting, recorded.

    >>> p = Parameter(np.array([1.0, 2.0]))
    >>> mul(p, p).sum().backward(); p.grad
    array([2., 4.])
    """
    ad, bd = _data(a), _data(b)
    y = ad * bd
    if not is_recording(a, b):
        return Tensor(y)
    sa, sb = np.shape(ad), np.shape(bd)
    return _recorded("MulBackward", y, (a, b),
                  lambda g, n: (_unbroadcast(g * bd, sa) if n[0] else None,
                                _unbroadcast(g * ad, sb) if n[1] else None))


def _div(a, b):
    ad, bd = _data(a), _data(b)
    y = ad / bd
    if not is_recording(a, b):
        return Tensor(y)
    sa, sb = np.shape(ad), np.shape(bd)
    return _recorded("DivBackward", y, (a, b),
                  lambda g, n: (_unbroadcast(g / bd, sa) if n[0] else None,
                                _unbroadcast(-g * ad / (bd * bd), sb) if n[1] else None))


def _sum(a, axis=None, keepdims=False):
    ad = _data(a)
    y = np.asarray(ad.sum(axis=axis, keepdims=keepdims))
    if not is_recording(a):
        return Tensor(y)
    shape = ad.shape

    def backward(g, needs):
        if axis is not None and not keepdims:
            g = np.expand_dims(g, axis)
        return (np.broadcast_to(g, shape).copy(),)
    return _recorded("SumBackward", y, (a,), backward)


def _getitem(a, index):
    ad = _data(a)
    index = _unwrap(index)
    y = ad[index]
    if not is_recording(a):
        return Tensor(y)

    def backward(g, needs):
        gx = np.zeros(ad.shape, g.dtype)
        np.add.at(gx, index, g)  # add.at: an advanced index may name an element twice
        return (gx,)
    return _recorded("IndexBackward", np.asarray(y), (a,), backward)


def reshape(x, shape):
    """``x.reshape(shape)``, recorded (the gradient is reshaped back).

    >>> reshape(Tensor(np.zeros((2, 3))), (3, 2)).shape
    (3, 2)
    """
    xd = _data(x)
    y = xd.reshape(shape)
    if not is_recording(x):
        return Tensor(y)
    old = xd.shape
    return _recorded("ReshapeBackward", y, (x,), lambda g, n: (g.reshape(old),))


MEMORY_FORMATS = ("channels_last", "contiguous_format")


def contiguous(x, memory_format="contiguous_format"):
    """``x`` (N, C, H, W) with its memory in ``memory_format`` -- ``'channels_last'`` (N, H, W, C)
    or ``'contiguous_format'`` (N, C, H, W), as PyTorch's ``Tensor.contiguous(memory_format=)`` --
    recorded: the gradient goes back in ``x``'s layout.  ``x`` itself where it is in that layout
    already (a 1-channel or 1x1 array is in both).

    >>> y = contiguous(Tensor(np.zeros((1, 3, 2, 2))), "channels_last")
    >>> y.shape, y.numpy().strides
    ((1, 3, 2, 2), (96, 8, 48, 24))
    """
    from ._algorithms import nhwc

    if memory_format not in MEMORY_FORMATS:
        raise ValueError(f"contiguous: memory_format must be one of {MEMORY_FORMATS}, got {memory_format!r}")
    xd = _data(x)
    if xd.ndim != 4:
        raise ValueError(f"contiguous: input must be 4-D (N, C, H, W), got shape {xd.shape}")
    last = memory_format == "channels_last"
    if xd.transpose(0, 2, 3, 1).flags.c_contiguous if last else xd.flags.c_contiguous:
        return x if isinstance(x, Tensor) else Tensor(xd)
    y = nhwc.channels_last_view(nhwc.to_nhwc(xd)) if last else nhwc.to_nchw(xd)
    if not is_recording(x):
        return Tensor(y)
    back = nhwc.to_nchw if last else (lambda g: nhwc.channels_last_view(nhwc.to_nhwc(g)))
    return _recorded("ContiguousBackward", y, (x,), lambda g, n: (back(g),))


def flatten(x, start_dim=1):
    """Merge the axes from ``start_dim`` on (PyTorch's ``torch.flatten``), recorded.

    >>> flatten(Tensor(np.zeros((2, 3, 4)))).shape
    (2, 12)
    """
    xd = _data(x)
    return reshape(x, xd.shape[:start_dim] + (-1,))


def cat(tensors, axis=1):
    """Concatenate along ``axis`` (default the channel axis of NCHW), recorded: each input gets its
    slice of the gradient (a U-Net skip connection).

    >>> a, b = Parameter(np.zeros((1, 2))), Parameter(np.zeros((1, 3)))
    >>> y = cat([a, b], axis=1); y.shape
    (1, 5)
    >>> (y * np.arange(5.0)).sum().backward(); a.grad, b.grad
    (array([[0., 1.]]), array([[2., 3., 4.]]))
    """
    tensors = tuple(tensors)
    if not tensors:
        raise ValueError("cat: tensors must hold at least one tensor, got none")
    datas = [_data(t) for t in tensors]
    y = np.concatenate(datas, axis=axis)
    if not is_recording(*tensors):
        return Tensor(y)
    bounds = np.cumsum([d.shape[axis] for d in datas])[:-1]

    def backward(g, needs):
        return tuple(np.split(g, bounds, axis=axis))
    return _recorded("CatBackward", y, tensors, backward)


def relu(x):
    """:func:`fastconv.relu`, recorded (backward :func:`fastconv.relu_backward`).

    >>> relu(Tensor(np.array([-1.0, 2.0])))
    Tensor([0., 2.])
    """
    xd = _data(x)
    y = F.relu(xd)
    if not is_recording(x):
        return Tensor(y)
    return _recorded("ReluBackward", y, (x,), lambda g, n: (F.relu_backward(g, xd),))


def conv2d(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, *, algorithm="auto"):
    """:func:`fastconv.conv2d`, recorded; its backward computes only the gradients needed (no
    input gradient for a network's input: :func:`fastconv.conv2d_grad_weight`).

    >>> w = Parameter(np.ones((1, 1, 2, 2)))
    >>> y = conv2d(np.ones((1, 1, 3, 3)), w); y.shape
    (1, 1, 2, 2)
    >>> y.sum().backward(); w.grad[0, 0]
    array([[4., 4.],
           [4., 4.]])
    """
    xd, wd, bd = _data(x), _data(weight), _data(bias)
    y = F.conv2d(xd, wd, bd, stride, padding, dilation, groups, algorithm=algorithm)
    if not is_recording(x, weight, bias):
        return Tensor(y)

    def backward(g, needs):
        # (no bias: its gradient's pass over g is skipped, None in its place)
        if needs[0]:
            return F.conv2d_backward(g, xd, wd, stride, padding, dilation, groups, algorithm=algorithm,
                                     bias=bd is not None)
        gw, gb = F.conv2d_grad_weight(g, xd, wd, stride, padding, dilation, groups, algorithm=algorithm,
                                      bias=bd is not None)
        return None, gw, gb
    return _recorded("Conv2dBackward", y, (x, weight, bias), backward)


def max_pool2d(x, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False):
    """:func:`fastconv.max_pool2d`, recorded (the indices are kept only when recording).

    >>> max_pool2d(Tensor(np.arange(16.0).reshape(1, 1, 4, 4)), 2).shape
    (1, 1, 2, 2)
    """
    xd = _data(x)
    if not is_recording(x):
        return Tensor(F.max_pool2d(xd, kernel_size, stride, padding, dilation, ceil_mode))
    y, idx = F.max_pool2d(xd, kernel_size, stride, padding, dilation, ceil_mode, return_indices=True)
    shape = xd.shape
    return _recorded("MaxPool2dBackward", y, (x,), lambda g, n: (F.max_pool2d_backward(g, idx, shape),))


def avg_pool2d(x, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True):
    """:func:`fastconv.avg_pool2d`, recorded.

    >>> avg_pool2d(Tensor(np.ones((1, 1, 4, 4))), 2).shape
    (1, 1, 2, 2)
    """
    xd = _data(x)
    args = (kernel_size, stride, padding, ceil_mode, count_include_pad)
    y = F.avg_pool2d(xd, *args)
    if not is_recording(x):
        return Tensor(y)
    shape = xd.shape
    return _recorded("AvgPool2dBackward", y, (x,), lambda g, n: (F.avg_pool2d_backward(g, shape, *args),))


def linear(x, weight, bias=None):
    """``x @ weight.T + bias`` for ``x`` of shape ``(N, in)``, ``weight (out, in)``, recorded.

    >>> w = Parameter(np.ones((2, 3)))
    >>> linear(np.ones((4, 3)), w).sum().backward(); w.grad
    array([[4., 4., 4.],
           [4., 4., 4.]])
    """
    xd, wd, bd = _data(x), _data(weight), _data(bias)
    work = xd.size * wd.shape[0] if xd.ndim == 2 and wd.ndim == 2 else 1 << 62
    with _blas_for(work):  # small products on one BLAS thread
        y = xd @ wd.T
    if bd is not None:
        y += bd
    if not is_recording(x, weight, bias):
        return Tensor(y)

    def backward(g, needs):
        with _blas_for(work):
            return (g @ wd if needs[0] else None, g.T @ xd if needs[1] else None,
                    g.sum(axis=0) if needs[2] else None)
    return _recorded("LinearBackward", y, (x, weight, bias), backward)


def cross_entropy(logits, target, reduction="mean"):
    """Softmax cross-entropy of ``logits (N, classes)`` against integer ``target (N,)``, recorded.

    Computed as ``z - max(z) - log(sum(exp(z - max(z))))`` so large logits do not overflow; the
    gradient is ``(softmax(logits) - onehot) / N`` (without ``/ N`` for ``reduction='sum'``).

    >>> z = Tensor(np.array([[1000.0, 0.0], [0.0, 0.0]]), requires_grad=True)
    >>> loss = cross_entropy(z, np.array([0, 1])); round(loss.item(), 6)
    0.346574
    >>> loss.backward(); z.grad
    array([[ 0.  ,  0.  ],
           [ 0.25, -0.25]])
    """
    fn = "CrossEntropyLoss"
    if reduction not in ("mean", "sum"):
        raise ValueError(f"{fn}: reduction must be 'mean' or 'sum', got {reduction!r}")
    ld = V.as_float_array(fn, "logits", _data(logits), 2)
    if not isinstance(target, np.ndarray) or target.dtype.kind not in "iu":
        raise TypeError(f"{fn}: target must be an integer numpy.ndarray, got "
                        f"{getattr(target, 'dtype', type(target).__name__)}")
    n, k = ld.shape
    if target.shape != (n,):
        raise ValueError(f"{fn}: target must have shape ({n},) to match logits {ld.shape}, got {target.shape}")
    if n and (target.min() < 0 or target.max() >= k):
        raise ValueError(f"{fn}: target must lie in [0, {k}), got values from {target.min()} to {target.max()}")
    z = ld - ld.max(axis=1, keepdims=True)
    e = np.exp(z)
    s = e.sum(axis=1, keepdims=True)
    total = -(z[np.arange(n), target] - np.log(s[:, 0])).sum(dtype=np.float64)
    value = np.asarray(total / n if reduction == "mean" and n else total, dtype=ld.dtype)
    if not is_recording(logits):
        return Tensor(value)
    e /= s  # softmax, kept for backward (which runs once, so it may work in place)

    def backward(g, needs):
        p = e
        p[np.arange(n), target] -= 1
        scale = g.item() / n if reduction == "mean" and n else g.item()
        if scale != 1:
            p *= p.dtype.type(scale)
        return p, None
    return _recorded("CrossEntropyBackward", value, (logits, target), backward)


def mse_loss(prediction, target, reduction="mean"):
    """Mean (or summed) squared error ``(prediction - target)**2``, recorded.

    >>> p = Parameter(np.array([1.0, 3.0]))
    >>> loss = mse_loss(p, np.array([0.0, 0.0])); loss.item()
    5.0
    >>> loss.backward(); p.grad
    array([1., 3.])
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"MSELoss: reduction must be 'mean' or 'sum', got {reduction!r}")
    pd, td = _data(prediction), _data(target)
    if np.shape(pd) != np.shape(td):
        raise ValueError(f"MSELoss: target must have the prediction's shape {np.shape(pd)}, got {np.shape(td)}")
    d = pd - td
    total = np.asarray((d * d).sum(dtype=np.float64) / (d.size if reduction == "mean" and d.size else 1),
                       dtype=pd.dtype)
    if not is_recording(prediction, target):
        return Tensor(total)
    scale = 2.0 / (d.size if reduction == "mean" and d.size else 1)
    return _recorded("MSEBackward", total, (prediction, target),
                  lambda g, n: (d * (scale * g.item()) if n[0] else None, d * (-scale * g.item()) if n[1] else None))


_UFUNC_OPS = {np.add: add, np.multiply: mul, np.true_divide: _div,
              np.subtract: lambda a, b: add(a, mul(b, -1)), np.negative: lambda a: mul(a, -1)}
_NONDIFFERENTIABLE_UFUNCS = {np.less, np.less_equal, np.greater, np.greater_equal, np.equal, np.not_equal,
                             np.isfinite, np.isnan, np.isinf, np.sign}
_FUNCTION_OPS = {np.concatenate: lambda arrays, axis=0: cat(arrays, axis),
                 np.reshape: lambda a, shape, **kw: reshape(a, shape),
                 np.sum: lambda a, axis=None, keepdims=False: _sum(a, axis, keepdims)}
