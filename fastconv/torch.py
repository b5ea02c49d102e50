"""fastconv under PyTorch: custom operators, drop-in modules and :func:`convert`.

``fastconv.torch`` puts fastconv's CPU kernels under a PyTorch model::

    import fastconv.torch
    model, report = fastconv.torch.convert(model)   # nn.Conv2d / MaxPool2d / AvgPool2d swapped
    print(report)

It needs PyTorch (``pip install 'fastconv[torch]'``); ``import fastconv`` never imports torch.

What it registers
-----------------
Custom operators (``torch.library.custom_op``, namespace ``fastconv``, CPU): ``fastconv::conv2d``,
``fastconv::max_pool2d`` (values and int64 indices), ``fastconv::avg_pool2d`` and their backward
operators (``conv2d_backward``, ``conv2d_grad_weight`` for a layer whose input needs no gradient,
``max_pool2d_backward``, ``avg_pool2d_backward``).  Each forward operator has a fake (meta)
implementation, so ``torch.compile`` traces through it without a graph break, and an autograd
formula whose backward is again a fastconv operator, so a compiled graph keeps fastconv in both
passes.  Only the gradients autograd asks for are computed (``ctx.needs_input_grad``).

``convert(model, batch_norm=True)`` also swaps ``nn.BatchNorm2d`` (operators ``fastconv::batch_norm``,
``fastconv::batch_norm_backward``; the forward returns the updated running statistics, which the
caller copies into the buffers, so the operator stays functional as autograd and torch.compile need).

Eager calls (no tracing, plain tensors) run the same computations through
``torch.autograd.Function`` twins instead: a custom-operator call costs ~30 us of dispatch where a
Function costs ~7 (measured on a 2-core Xeon), which a converted MobileNet pays about 60 times per
training step.  Calls with nothing to differentiate (``torch.no_grad``, inference) call the
computation directly.

Data exchange
-------------
Contiguous (NCHW) tensors are shared with NumPy without a copy (``Tensor.numpy()`` /
``torch.from_numpy``).  A channels_last or otherwise strided tensor is copied to NCHW first (one
read and one write of the tensor, the same pass PyTorch's own ``.contiguous()`` makes), and the
result is copied back to the input's memory format: a channels_last network therefore pays two
layout copies per layer and direction.  Run converted models in the default NCHW layout.

What falls back to PyTorch
--------------------------
Every call checks what fastconv can serve and otherwise calls PyTorch's own operator, so a model
never fails mid-training because of the bridge: non-CPU tensors, dtypes other than float32/float64,
mixed dtypes, non-strided layouts, inputs that are not 3-D or 4-D, ``divisor_override``.  Double
backward (``create_graph=True``) recomputes the layer with PyTorch's operator to get a
differentiable gradient.  ``padding_mode`` 'reflect' / 'replicate' / 'circular' pads with
``torch.nn.functional.pad`` (as ``nn.Conv2d`` does) and convolves with fastconv.

Threads
-------
During a call, one setting governs both pools: fastconv's operators run on
``min(torch.get_num_threads(), fastconv.max_threads())`` threads, so ``torch.set_num_threads`` (or
:func:`set_num_threads` here, which sets both libraries) is the one knob.  PyTorch's OpenMP pool and
numba's never run at the same time (an operator is called from the thread that runs the graph);
numba's idle workers sleep (``fastconv._jit``), PyTorch's spin briefly after each of its parallel
regions unless ``OMP_WAIT_POLICY=passive`` is set before torch is imported
(``benchmarks/torch_train_step.py --oversubscription`` measures the difference).
"""
from __future__ import annotations

try:
    import torch
    import torch.nn.functional as F
    from torch import Tensor, nn
except ImportError as exc:  # pragma: no cover - exercised without torch installed
    raise ImportError(
        "fastconv.torch needs PyTorch, an optional extra: pip install 'fastconv[torch]' "
        "(or install torch yourself)") from exc

import copy
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import numpy as np

from . import functional as _fc
from ._threads import max_threads as _max_threads
from ._threads import set_num_threads as _fc_set_num_threads
from ._threads import current as _fc_current
from ._threads import threads as _fc_threads

__all__ = [
    "AvgPool2d",
    "BatchNorm2d",
    "Conv2d",
    "ConversionReport",
    "MaxPool2d",
    "avg_pool2d",
    "batch_norm",
    "conv2d",
    "convert",
    "max_pool2d",
    "set_num_threads",
]

_DTYPES = (torch.float32, torch.float64)


# --------------------------------------------------------------------------- helpers
def _pair(v, fn, name):
    if isinstance(v, int):
        return [int(v), int(v)]
    v = list(v)
    if len(v) == 1:
        return [int(v[0]), int(v[0])]
    if len(v) != 2:
        raise ValueError(f"{fn}: {name} must be an int or a pair, got {v!r}")
    return [int(v[0]), int(v[1])]


def _array(t: Tensor) -> np.ndarray:
    """A NumPy view of ``t`` (no copy when ``t`` is NCHW-contiguous; one copy otherwise)."""
    return t.detach().contiguous().numpy()


def _tensor(a: np.ndarray) -> Tensor:
    """A tensor sharing ``a``'s memory (fastconv's outputs are fresh, contiguous and writable)."""
    return torch.from_numpy(np.ascontiguousarray(a))


class _pool_threads:
    """Run fastconv's kernels on PyTorch's thread count for the duration of one operator call.

    When fastconv already runs on that count (after :func:`set_num_threads`, or by default when
    both libraries use every core) nothing is switched: entering ``fastconv.threads`` costs ~4 us,
    which a converted MobileNet pays ~100 times per training step.
    """

    __slots__ = ("_cm",)

    def __enter__(self):
        n = max(1, min(torch.get_num_threads(), _max_threads()))
        if n == _fc_current():
            self._cm = None
            return n
        self._cm = _fc_threads(n)
        return self._cm.__enter__()

    def __exit__(self, *exc):
        if self._cm is None:
            return False
        return self._cm.__exit__(*exc)


def set_num_threads(n: int) -> None:
    """Set the thread count of PyTorch's intra-op pool and fastconv's pool together.

    Parameters
    ----------
    n : int
        ``1 <= n <= fastconv.max_threads()``.

    Examples
    --------
    >>> import torch, fastconv.torch
    >>> old = torch.get_num_threads()
    >>> fastconv.torch.set_num_threads(1)
    >>> torch.get_num_threads()
    1
    >>> fastconv.torch.set_num_threads(old)
    """
    _fc_set_num_threads(n)  # validates first: a bad n changes neither library
    torch.set_num_threads(int(n))


def _serves(*tensors) -> bool:
    """Whether fastconv can compute on these tensors (else the caller uses PyTorch's operator)."""
    first = tensors[0]
    for t in tensors:
        if t is None:
            continue
        if (t.device.type != "cpu" or t.layout != torch.strided or t.dtype not in _DTYPES
                or t.dtype != first.dtype or t.is_quantized):
            return False
    return first.dim() == 4


def _like_input(y: Tensor, x: Tensor) -> Tensor:
    """``y`` (NCHW) in ``x``'s memory format: channels_last in, channels_last out, as PyTorch."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return y.contiguous(memory_format=torch.channels_last)
    return y


def _double_backward(ctx) -> bool:
    """True in a ``create_graph=True`` backward: gradients must themselves be differentiable."""
    return torch.is_grad_enabled() and any(
        t.requires_grad for t in ctx.saved_tensors if isinstance(t, Tensor))


# --------------------------------------------------------------------------- conv2d
def _conv_out(size, pad, dil, k, stride, same):
    if same:
        return size
    return (size + 2 * pad - dil * (k - 1) - 1) // stride + 1


def _conv_padding(padding, same):
    return "same" if same else tuple(padding)


# The computations, shared by the custom operators (what torch.compile traces) and the eager
# autograd.Functions below (what an eager step runs: an operator call costs ~30 us of dispatch
# over the Function's ~7, ~100 us per convolution layer and training step with its backward).
def _conv2d_impl(x, weight, bias, stride, padding, dilation, groups, same):
    with _pool_threads():
        y = _fc.conv2d(_array(x), _array(weight), None if bias is None else _array(bias), tuple(stride),
                       _conv_padding(padding, same), tuple(dilation), groups)
    return _tensor(y)


def _conv2d_backward_impl(grad, x, weight, stride, padding, dilation, groups, same):
    with _pool_threads():
        g = _fc.conv2d_backward(_array(grad), _array(x), _array(weight), tuple(stride),
                                _conv_padding(padding, same), tuple(dilation), groups)
    return _tensor(g.grad_input), _tensor(g.grad_weight), _tensor(g.grad_bias)


def _conv2d_grad_weight_impl(grad, x, weight, stride, padding, dilation, groups, same):
    with _pool_threads():
        gw, gb = _fc.conv2d_grad_weight(_array(grad), _array(x), _array(weight), tuple(stride),
                                        _conv_padding(padding, same), tuple(dilation), groups)
    return _tensor(gw), _tensor(gb)


@torch.library.custom_op("fastconv::conv2d", mutates_args=(), device_types="cpu")
def _conv2d_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], stride: List[int], padding: List[int],
               dilation: List[int], groups: int, same: bool) -> Tensor:
    return _conv2d_impl(x, weight, bias, stride, padding, dilation, groups, same)


@_conv2d_op.register_fake
def _(x, weight, bias, stride, padding, dilation, groups, same):
    oh = _conv_out(x.shape[2], padding[0], dilation[0], weight.shape[2], stride[0], same)
    ow = _conv_out(x.shape[3], padding[1], dilation[1], weight.shape[3], stride[1], same)
    return x.new_empty((x.shape[0], weight.shape[0], oh, ow))


@torch.library.custom_op("fastconv::conv2d_backward", mutates_args=(), device_types="cpu")
def _conv2d_backward_op(grad: Tensor, x: Tensor, weight: Tensor, stride: List[int], padding: List[int],
                        dilation: List[int], groups: int, same: bool) -> Tuple[Tensor, Tensor, Tensor]:
    # grad_input, grad_weight and grad_bias, each pass with its own algorithm
    return _conv2d_backward_impl(grad, x, weight, stride, padding, dilation, groups, same)


@_conv2d_backward_op.register_fake
def _(grad, x, weight, stride, padding, dilation, groups, same):
    return torch.empty_like(x, memory_format=torch.contiguous_format), \
        torch.empty_like(weight, memory_format=torch.contiguous_format), weight.new_empty((weight.shape[0],))


@torch.library.custom_op("fastconv::conv2d_grad_weight", mutates_args=(), device_types="cpu")
def _conv2d_grad_weight_op(grad: Tensor, x: Tensor, weight: Tensor, stride: List[int], padding: List[int],
                           dilation: List[int], groups: int, same: bool) -> Tuple[Tensor, Tensor]:
    # grad_weight and grad_bias only: a first layer's input needs no gradient, and its grad_input
    # pass would be the most expensive of the three (it is as large as the network's input)
    return _conv2d_grad_weight_impl(grad, x, weight, stride, padding, dilation, groups, same)


@_conv2d_grad_weight_op.register_fake
def _(grad, x, weight, stride, padding, dilation, groups, same):
    return torch.empty_like(weight, memory_format=torch.contiguous_format), weight.new_empty((weight.shape[0],))


def _conv2d_setup(ctx, inputs, output):
    x, weight, bias, stride, padding, dilation, groups, same = inputs
    ctx.args = (stride, padding, dilation, groups, same)
    ctx.has_bias = bias is not None
    ctx.save_for_backward(x, weight, bias)


def _conv2d_gradients(ctx, grad, backward, grad_weight):
    """(gx, gw, gb, None x 5): only what autograd asks for (``ctx.needs_input_grad``), through the
    operators (``backward``/``grad_weight``) or their eager implementations."""
    x, weight, bias = ctx.saved_tensors
    stride, padding, dilation, groups, same = ctx.args
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    need_b = need_b and ctx.has_bias
    gx = gw = gb = None
    if _double_backward(ctx):
        with torch.enable_grad():
            y = F.conv2d(x, weight, bias, stride, "same" if same else padding, dilation, groups)
            wrt = [t for t, need in ((x, need_x), (weight, need_w), (bias, need_b)) if need]
            got = iter(torch.autograd.grad(y, wrt, grad, create_graph=True, allow_unused=True))
        return (next(got) if need_x else None, next(got) if need_w else None,
                next(got) if need_b else None, None, None, None, None, None)
    if need_x:
        gx, gw, gb = backward(grad, x, weight, stride, padding, dilation, groups, same)
    elif need_w or need_b:
        gw, gb = grad_weight(grad, x, weight, stride, padding, dilation, groups, same)
    return gx, gw if need_w else None, gb if need_b else None, None, None, None, None, None


def _conv2d_grad(ctx, grad):
    return _conv2d_gradients(ctx, grad, _conv2d_backward_op, _conv2d_grad_weight_op)


_conv2d_op.register_autograd(_conv2d_grad, setup_context=_conv2d_setup)


class _Conv2dFunction(torch.autograd.Function):
    """The eager twin of ``fastconv::conv2d`` (same computation and gradients, less dispatch).

    ``forward`` takes ``ctx`` and calls the setup itself: with a separate ``setup_context``,
    ``Function.apply`` binds its arguments through ``inspect.signature``, +20 us a call.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups, same):
        out = _conv2d_impl(x, weight, bias, stride, padding, dilation, groups, same)
        _conv2d_setup(ctx, (x, weight, bias, stride, padding, dilation, groups, same), out)
        return out

    @staticmethod
    def backward(ctx, grad):
        return _conv2d_gradients(ctx, grad, _conv2d_backward_impl, _conv2d_grad_weight_impl)


def _eager(*tensors):
    """How to run on these tensors: ``None`` -- the custom operator (while torch.compile,
    torch.export or torch.jit.trace trace, which need it, or for a tensor subclass such as a fake or
    functorch tensor, which may need its registrations); ``False`` -- the computation alone
    (nothing to differentiate); ``True`` -- the eager autograd.Function."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        return None
    grad = False
    for t in tensors:
        if t is not None:
            if type(t) is not Tensor and type(t) is not nn.Parameter:
                return None
            grad = grad or t.requires_grad
    return grad and torch.is_grad_enabled()


def conv2d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """``torch.nn.functional.conv2d`` computed by fastconv where it can (else by PyTorch).

    Same arguments and result as :func:`torch.nn.functional.conv2d`; autograd and
    ``torch.compile`` work through it.  The output has the input's memory format.

    Examples
    --------
    >>> import torch, fastconv.torch
    >>> x = torch.ones(1, 1, 4, 4); w = torch.ones(1, 1, 3, 3)
    >>> fastconv.torch.conv2d(x, w)[0, 0]
    tensor([[9., 9.],
            [9., 9.]])
    """
    fn = "fastconv.torch.conv2d"
    if not _serves(input if input.dim() != 3 else input.unsqueeze(0), weight, bias) or weight.dim() != 4:
        return F.conv2d(input, weight, bias, stride, padding, dilation, groups)
    if input.dim() == 3:
        return conv2d(input.unsqueeze(0), weight, bias, stride, padding, dilation, groups).squeeze(0)
    same = isinstance(padding, str) and padding == "same"
    if isinstance(padding, str):
        if padding not in ("same", "valid"):
            raise ValueError(f"{fn}: padding must be 'same', 'valid' or ints, got {padding!r}")
        pad = [0, 0]
    else:
        pad = _pair(padding, fn, "padding")
    args = (input, weight, bias, _pair(stride, fn, "stride"), pad, _pair(dilation, fn, "dilation"), int(groups), same)
    how = _eager(input, weight, bias)
    y = _conv2d_op(*args) if how is None else _Conv2dFunction.apply(*args) if how else _conv2d_impl(*args)
    return _like_input(y, input)


# --------------------------------------------------------------------------- pooling
def _pool_out(size, pad, k, stride, dil, ceil_mode):
    out = (size + 2 * pad - dil * (k - 1) - 1 + (stride - 1 if ceil_mode else 0)) // stride + 1
    if ceil_mode and (out - 1) * stride >= size + pad:
        out = out - 1
    return out


def _pool_shape(x, kernel, stride, padding, dilation, ceil_mode):
    return (x.shape[0], x.shape[1],
            _pool_out(x.shape[2], padding[0], kernel[0], stride[0], dilation[0], ceil_mode),
            _pool_out(x.shape[3], padding[1], kernel[1], stride[1], dilation[1], ceil_mode))


def _max_pool2d_impl(x, kernel_size, stride, padding, dilation, ceil_mode):
    with _pool_threads():
        y, idx = _fc.max_pool2d(_array(x), tuple(kernel_size), tuple(stride), tuple(padding), tuple(dilation),
                                ceil_mode, return_indices=True)
    return _tensor(y), _tensor(idx)


def _max_pool2d_backward_impl(grad, indices, x):
    with _pool_threads():
        gx = _fc.max_pool2d_backward(_array(grad), _array(indices), tuple(x.shape))
    return _tensor(gx)


@torch.library.custom_op("fastconv::max_pool2d", mutates_args=(), device_types="cpu")
def _max_pool2d_op(x: Tensor, kernel_size: List[int], stride: List[int], padding: List[int],
                   dilation: List[int], ceil_mode: bool) -> Tuple[Tensor, Tensor]:
    return _max_pool2d_impl(x, kernel_size, stride, padding, dilation, ceil_mode)


@_max_pool2d_op.register_fake
def _(x, kernel_size, stride, padding, dilation, ceil_mode):
    shape = _pool_shape(x, kernel_size, stride, padding, dilation, ceil_mode)
    return x.new_empty(shape), x.new_empty(shape, dtype=torch.int64)


@torch.library.custom_op("fastconv::max_pool2d_backward", mutates_args=(), device_types="cpu")
def _max_pool2d_backward_op(grad: Tensor, indices: Tensor, x: Tensor) -> Tensor:
    return _max_pool2d_backward_impl(grad, indices, x)


@_max_pool2d_backward_op.register_fake
def _(grad, indices, x):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _max_pool2d_setup(ctx, inputs, output):
    x, kernel_size, stride, padding, dilation, ceil_mode = inputs
    ctx.args = (kernel_size, stride, padding, dilation, ceil_mode)
    ctx.mark_non_differentiable(output[1])
    # x is saved for its shape (and for double backward); saving does not copy it.
    ctx.save_for_backward(x, output[1])


def _max_pool2d_gradient(ctx, grad, backward):
    x, indices = ctx.saved_tensors
    if not ctx.needs_input_grad[0]:
        return None, None, None, None, None, None
    if _double_backward(ctx):
        kernel_size, stride, padding, dilation, ceil_mode = ctx.args
        with torch.enable_grad():
            y = F.max_pool2d(x, kernel_size, stride, padding, dilation, ceil_mode)
            (gx,) = torch.autograd.grad(y, x, grad, create_graph=True)
        return gx, None, None, None, None, None
    return backward(grad, indices, x), None, None, None, None, None


def _max_pool2d_grad(ctx, grad, _grad_indices):
    return _max_pool2d_gradient(ctx, grad, _max_pool2d_backward_op)


_max_pool2d_op.register_autograd(_max_pool2d_grad, setup_context=_max_pool2d_setup)


class _MaxPool2dFunction(torch.autograd.Function):
    """The eager twin of ``fastconv::max_pool2d``."""

    @staticmethod
    def forward(ctx, x, kernel_size, stride, padding, dilation, ceil_mode):
        out = _max_pool2d_impl(x, kernel_size, stride, padding, dilation, ceil_mode)
        _max_pool2d_setup(ctx, (x, kernel_size, stride, padding, dilation, ceil_mode), out)
        return out

    @staticmethod
    def backward(ctx, grad, _grad_indices):
        return _max_pool2d_gradient(ctx, grad, _max_pool2d_backward_impl)


def _pool_args(fn, kernel_size, stride, padding, dilation=1):
    k = _pair(kernel_size, fn, "kernel_size")
    s = k if stride is None or (not isinstance(stride, int) and len(stride) == 0) else _pair(stride, fn, "stride")
    return k, s, _pair(padding, fn, "padding"), _pair(dilation, fn, "dilation")


def max_pool2d(input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False, return_indices=False):
    """``torch.nn.functional.max_pool2d`` computed by fastconv where it can (else by PyTorch).

    Indices, when returned, are PyTorch's: the flat position ``ih*W + iw`` in each input plane.

    Examples
    --------
    >>> import torch, fastconv.torch
    >>> x = torch.arange(16.0).reshape(1, 1, 4, 4)
    >>> fastconv.torch.max_pool2d(x, 2)[0, 0]
    tensor([[ 5.,  7.],
            [13., 15.]])
    """
    if not _serves(input if input.dim() != 3 else input.unsqueeze(0)):
        return F.max_pool2d(input, kernel_size, stride, padding, dilation, ceil_mode=ceil_mode,
                            return_indices=return_indices)
    if input.dim() == 3:
        out = max_pool2d(input.unsqueeze(0), kernel_size, stride, padding, dilation, ceil_mode, return_indices)
        return (out[0].squeeze(0), out[1].squeeze(0)) if return_indices else out.squeeze(0)
    k, s, p, d = _pool_args("fastconv.torch.max_pool2d", kernel_size, stride, padding, dilation)
    args = (input, k, s, p, d, bool(ceil_mode))
    how = _eager(input)
    y, idx = (_max_pool2d_op(*args) if how is None else _MaxPool2dFunction.apply(*args) if how
              else _max_pool2d_impl(*args))
    y = _like_input(y, input)
    return (y, _like_input(idx, input)) if return_indices else y


def _avg_pool2d_impl(x, kernel_size, stride, padding, ceil_mode, count_include_pad):
    with _pool_threads():
        y = _fc.avg_pool2d(_array(x), tuple(kernel_size), tuple(stride), tuple(padding), ceil_mode,
                           count_include_pad)
    return _tensor(y)


def _avg_pool2d_backward_impl(grad, x, kernel_size, stride, padding, ceil_mode, count_include_pad):
    with _pool_threads():
        gx = _fc.avg_pool2d_backward(_array(grad), tuple(x.shape), tuple(kernel_size), tuple(stride),
                                     tuple(padding), ceil_mode, count_include_pad)
    return _tensor(gx)


@torch.library.custom_op("fastconv::avg_pool2d", mutates_args=(), device_types="cpu")
def _avg_pool2d_op(x: Tensor, kernel_size: List[int], stride: List[int], padding: List[int], ceil_mode: bool,
                   count_include_pad: bool) -> Tensor:
    return _avg_pool2d_impl(x, kernel_size, stride, padding, ceil_mode, count_include_pad)


@_avg_pool2d_op.register_fake
def _(x, kernel_size, stride, padding, ceil_mode, count_include_pad):
    return x.new_empty(_pool_shape(x, kernel_size, stride, padding, (1, 1), ceil_mode))


@torch.library.custom_op("fastconv::avg_pool2d_backward", mutates_args=(), device_types="cpu")
def _avg_pool2d_backward_op(grad: Tensor, x: Tensor, kernel_size: List[int], stride: List[int],
                            padding: List[int], ceil_mode: bool, count_include_pad: bool) -> Tensor:
    return _avg_pool2d_backward_impl(grad, x, kernel_size, stride, padding, ceil_mode, count_include_pad)


@_avg_pool2d_backward_op.register_fake
def _(grad, x, kernel_size, stride, padding, ceil_mode, count_include_pad):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _avg_pool2d_setup(ctx, inputs, output):
    x, kernel_size, stride, padding, ceil_mode, count_include_pad = inputs
    ctx.args = (kernel_size, stride, padding, ceil_mode, count_include_pad)
    ctx.save_for_backward(x)  # for its shape (and double backward); saving does not copy it


def _avg_pool2d_gradient(ctx, grad, backward):
    (x,) = ctx.saved_tensors
    none = (None,) * 5
    if not ctx.needs_input_grad[0]:
        return (None,) + none
    kernel_size, stride, padding, ceil_mode, count_include_pad = ctx.args
    if _double_backward(ctx):
        with torch.enable_grad():
            y = F.avg_pool2d(x, kernel_size, stride, padding, ceil_mode, count_include_pad)
            (gx,) = torch.autograd.grad(y, x, grad, create_graph=True)
        return (gx,) + none
    return (backward(grad, x, kernel_size, stride, padding, ceil_mode, count_include_pad),) + none


def _avg_pool2d_grad(ctx, grad):
    return _avg_pool2d_gradient(ctx, grad, _avg_pool2d_backward_op)


_avg_pool2d_op.register_autograd(_avg_pool2d_grad, setup_context=_avg_pool2d_setup)


class _AvgPool2dFunction(torch.autograd.Function):
    """The eager twin of ``fastconv::avg_pool2d``."""

    @staticmethod
    def forward(ctx, x, kernel_size, stride, padding, ceil_mode, count_include_pad):
        out = _avg_pool2d_impl(x, kernel_size, stride, padding, ceil_mode, count_include_pad)
        _avg_pool2d_setup(ctx, (x, kernel_size, stride, padding, ceil_mode, count_include_pad), out)
        return out

    @staticmethod
    def backward(ctx, grad):
        return _avg_pool2d_gradient(ctx, grad, _avg_pool2d_backward_impl)


def avg_pool2d(input, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True,
               divisor_override=None):
    """``torch.nn.functional.avg_pool2d`` computed by fastconv where it can (else by PyTorch).

    ``divisor_override`` is left to PyTorch.

    Examples
    --------
    >>> import torch, fastconv.torch
    >>> x = torch.arange(16.0).reshape(1, 1, 4, 4)
    >>> fastconv.torch.avg_pool2d(x, 2)[0, 0]
    tensor([[ 2.5000,  4.5000],
            [10.5000, 12.5000]])
    """
    if divisor_override is not None or not _serves(input if input.dim() != 3 else input.unsqueeze(0)):
        return F.avg_pool2d(input, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override)
    if input.dim() == 3:
        return avg_pool2d(input.unsqueeze(0), kernel_size, stride, padding, ceil_mode, count_include_pad).squeeze(0)
    k, s, p, _ = _pool_args("fastconv.torch.avg_pool2d", kernel_size, stride, padding)
    args = (input, k, s, p, bool(ceil_mode), bool(count_include_pad))
    how = _eager(input)
    y = (_avg_pool2d_op(*args) if how is None else _AvgPool2dFunction.apply(*args) if how
         else _avg_pool2d_impl(*args))
    return _like_input(y, input)


# --------------------------------------------------------------------------- batch_norm
def _stat(t):
    """A NumPy view of a (C,) tensor, or None."""
    return None if t is None else _array(t)


def _batch_norm_impl(x, running_mean, running_var, weight, bias, training, momentum, eps):
    """``(y, new running_mean, new running_var)``: in training fastconv updates copies of the running
    statistics (the caller copies them back with ``copy_``, so the operator is functional, as
    autograd formulas and torch.compile need); empty tensors where there is nothing to update."""
    new = []
    for t in (running_mean, running_var):
        new.append(t.detach().clone() if training and t is not None else x.new_empty((0,)))
    stats = [_stat(n) if training else _stat(t) for n, t in zip(new, (running_mean, running_var))]
    stats = [None if t is None else a for a, t in zip(stats, (running_mean, running_var))]
    with _pool_threads():
        y = _fc.batch_norm(_array(x), stats[0], stats[1], _stat(weight), _stat(bias), training, momentum, eps)
    return _tensor(y), new[0], new[1]


def _batch_norm_backward_impl(grad, x, running_mean, running_var, weight, training, eps):
    with _pool_threads():
        g = _fc.batch_norm_backward(_array(grad), _array(x), _stat(running_mean), _stat(running_var),
                                    _stat(weight), training, eps)
    return _tensor(g.grad_input), _tensor(g.grad_weight), _tensor(g.grad_bias)


@torch.library.custom_op("fastconv::batch_norm", mutates_args=(), device_types="cpu")
def _batch_norm_op(x: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                   weight: Optional[Tensor], bias: Optional[Tensor], training: bool, momentum: float,
                   eps: float) -> Tuple[Tensor, Tensor, Tensor]:
    return _batch_norm_impl(x, running_mean, running_var, weight, bias, training, momentum, eps)


@_batch_norm_op.register_fake
def _(x, running_mean, running_var, weight, bias, training, momentum, eps):
    def stat(t):
        return x.new_empty((x.shape[1],) if training and t is not None else (0,))
    return torch.empty_like(x, memory_format=torch.contiguous_format), stat(running_mean), stat(running_var)


@torch.library.custom_op("fastconv::batch_norm_backward", mutates_args=(), device_types="cpu")
def _batch_norm_backward_op(grad: Tensor, x: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                            weight: Optional[Tensor], training: bool, eps: float) -> Tuple[Tensor, Tensor, Tensor]:
    return _batch_norm_backward_impl(grad, x, running_mean, running_var, weight, training, eps)


@_batch_norm_backward_op.register_fake
def _(grad, x, running_mean, running_var, weight, training, eps):
    return (torch.empty_like(x, memory_format=torch.contiguous_format), x.new_empty((x.shape[1],)),
            x.new_empty((x.shape[1],)))


def _batch_norm_setup(ctx, inputs, output):
    x, running_mean, running_var, weight, bias, training, momentum, eps = inputs
    ctx.args = (training, eps)
    ctx.has_bias = bias is not None
    ctx.mark_non_differentiable(output[1], output[2])
    # training recomputes the batch statistics from x; eval normalises with the running ones
    if training:
        ctx.save_for_backward(x, weight, bias, None, None)
    else:
        ctx.save_for_backward(x, weight, bias, running_mean, running_var)


def _batch_norm_gradient(ctx, grad, backward):
    x, weight, bias, running_mean, running_var = ctx.saved_tensors
    training, eps = ctx.args
    need_x, _, _, need_w, need_b = ctx.needs_input_grad[:5]
    need_w = need_w and weight is not None
    need_b = need_b and ctx.has_bias
    none = (None,) * 3
    if not (need_x or need_w or need_b):
        return (None,) * 5 + none
    if _double_backward(ctx):
        with torch.enable_grad():  # no running statistics in training: recomputing must not update them
            y = F.batch_norm(x, running_mean, running_var, weight, bias, training, 0.0, eps)
            wrt = [t for t, need in ((x, need_x), (weight, need_w), (bias, need_b)) if need]
            got = iter(torch.autograd.grad(y, wrt, grad, create_graph=True, allow_unused=True))
        return (next(got) if need_x else None, None, None, next(got) if need_w else None,
                next(got) if need_b else None) + none
    gx, gw, gb = backward(grad, x, running_mean, running_var, weight, training, eps)
    return (gx if need_x else None, None, None, gw if need_w else None, gb if need_b else None) + none


def _batch_norm_grad(ctx, grad, _grad_mean, _grad_var):
    return _batch_norm_gradient(ctx, grad, _batch_norm_backward_op)


_batch_norm_op.register_autograd(_batch_norm_grad, setup_context=_batch_norm_setup)


class _BatchNormFunction(torch.autograd.Function):
    """The eager twin of ``fastconv::batch_norm``."""

    @staticmethod
    def forward(ctx, x, running_mean, running_var, weight, bias, training, momentum, eps):
        out = _batch_norm_impl(x, running_mean, running_var, weight, bias, training, momentum, eps)
        _batch_norm_setup(ctx, (x, running_mean, running_var, weight, bias, training, momentum, eps), out)
        return out

    @staticmethod
    def backward(ctx, grad, _grad_mean, _grad_var):
        return _batch_norm_gradient(ctx, grad, _batch_norm_backward_impl)


def batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1, eps=1e-5):
    """``torch.nn.functional.batch_norm`` computed by fastconv where it can (else by PyTorch).

    Same arguments and result, running statistics updated in place in training as PyTorch does
    (the variance unbiased).  4-D float32/float64 CPU tensors are served; anything else goes to
    PyTorch's operator.

    Examples
    --------
    >>> import torch, fastconv.torch
    >>> x = torch.tensor([1.0, 3.0]).reshape(2, 1, 1, 1)
    >>> rm, rv = torch.zeros(1), torch.ones(1)
    >>> fastconv.torch.batch_norm(x, rm, rv, training=True, eps=0.0).flatten()
    tensor([-1.,  1.])
    >>> rm, rv
    (tensor([0.2000]), tensor([1.1000]))
    """
    stats = (running_mean, running_var)
    if (not _serves(input, weight, bias, *stats) or any(t is not None and not t.is_contiguous() for t in stats)
            or (not training and (running_mean is None or running_var is None))):
        return F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
    args = (input, running_mean, running_var, weight, bias, bool(training), float(momentum), float(eps))
    how = _eager(input, weight, bias, *stats)
    y, new_mean, new_var = (_batch_norm_op(*args) if how is None else _BatchNormFunction.apply(*args) if how
                            else _batch_norm_impl(*args))
    if training:  # in place, as PyTorch's operator (its version counter moves, so autograd sees it)
        if running_mean is not None:
            running_mean.copy_(new_mean)
        if running_var is not None:
            running_var.copy_(new_var)
    return _like_input(y, input)


# --------------------------------------------------------------------------- modules
class Conv2d(nn.Conv2d):
    """``torch.nn.Conv2d`` whose forward runs on fastconv (same constructor, parameters, init and
    ``state_dict`` keys, so checkpoints load both ways).

    Examples
    --------
    >>> import torch, fastconv.torch
    >>> conv = fastconv.torch.Conv2d(3, 8, 3, padding=1)
    >>> conv(torch.randn(2, 3, 16, 16)).shape
    torch.Size([2, 8, 16, 16])
    >>> sorted(conv.state_dict())
    ['bias', 'weight']
    """

    def forward(self, input):
        if self.padding_mode != "zeros":  # pad as nn.Conv2d does, then a zero-padding convolution
            input = F.pad(input, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            return conv2d(input, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)
        return conv2d(input, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class MaxPool2d(nn.MaxPool2d):
    """``torch.nn.MaxPool2d`` whose forward runs on fastconv.

    Examples
    --------
    >>> import torch, fastconv.torch
    >>> fastconv.torch.MaxPool2d(2)(torch.randn(1, 3, 8, 8)).shape
    torch.Size([1, 3, 4, 4])
    """

    def forward(self, input):
        return max_pool2d(input, self.kernel_size, self.stride, self.padding, self.dilation, self.ceil_mode,
                          self.return_indices)


class AvgPool2d(nn.AvgPool2d):
    """``torch.nn.AvgPool2d`` whose forward runs on fastconv.

    Examples
    --------
    >>> import torch, fastconv.torch
    >>> fastconv.torch.AvgPool2d(2)(torch.randn(1, 3, 8, 8)).shape
    torch.Size([1, 3, 4, 4])
    """

    def forward(self, input):
        return avg_pool2d(input, self.kernel_size, self.stride, self.padding, self.ceil_mode,
                          self.count_include_pad, self.divisor_override)


class BatchNorm2d(nn.BatchNorm2d):
    """``torch.nn.BatchNorm2d`` whose forward runs on fastconv (same constructor, parameters,
    buffers and ``state_dict`` keys; running statistics, ``momentum=None`` and
    ``num_batches_tracked`` as PyTorch's).

    Examples
    --------
    >>> import torch, fastconv.torch
    >>> bn = fastconv.torch.BatchNorm2d(3)
    >>> bn(torch.randn(4, 3, 5, 5)).shape, int(bn.num_batches_tracked)
    (torch.Size([4, 3, 5, 5]), 1)
    """

    def forward(self, input):
        # nn.BatchNorm2d's forward, calling fastconv's batch_norm
        self._check_input_dim(input)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        bn_training = self.training or (self.running_mean is None and self.running_var is None)
        track = not self.training or self.track_running_stats
        return batch_norm(input, self.running_mean if track else None, self.running_var if track else None,
                          self.weight, self.bias, bn_training, factor, self.eps)


# --------------------------------------------------------------------------- convert
_SWAPS = {nn.Conv2d: Conv2d, nn.MaxPool2d: MaxPool2d, nn.AvgPool2d: AvgPool2d}
_SWAPS_BN = {nn.BatchNorm2d: BatchNorm2d}


@dataclass
class ConversionReport:
    """What :func:`convert` swapped (``swapped``: module names and types) and what it left to
    PyTorch and why (``left``: ``(name, type, reason)``)."""

    swapped: List[Tuple[str, str]] = field(default_factory=list)
    left: List[Tuple[str, str, str]] = field(default_factory=list)

    def __str__(self):
        lines = [f"fastconv.torch.convert: {len(self.swapped)} module(s) swapped, {len(self.left)} left to PyTorch"]
        lines += [f"  swapped  {name or '(root)'}: {kind}" for name, kind in self.swapped]
        lines += [f"  left     {name or '(root)'}: {kind} ({why})" for name, kind, why in self.left]
        return "\n".join(lines)


def _why_not(m) -> Optional[str]:
    """Why module ``m`` (an exact nn.Conv2d / MaxPool2d / AvgPool2d) stays with PyTorch, or None."""
    params = list(m.parameters(recurse=False))
    if any(p.device.type != "cpu" for p in params):
        return "parameters not on the CPU"
    if any(p.dtype not in _DTYPES for p in params):
        return f"parameter dtype {params[0].dtype} (fastconv computes in float32/float64)"
    if isinstance(m, nn.AvgPool2d) and m.divisor_override is not None:
        return "divisor_override is not supported by fastconv"
    return None


def convert(model: nn.Module, inplace: bool = False, *, batch_norm: bool = False):
    """Swap every supported ``nn.Conv2d`` / ``nn.MaxPool2d`` / ``nn.AvgPool2d`` in ``model`` for its
    fastconv twin, keeping parameters, buffers, hooks and ``state_dict`` keys.

    Parameters
    ----------
    model : torch.nn.Module
    inplace : bool
        Change ``model`` itself (its parameters stay the same objects, so an existing optimizer keeps
        working) instead of a deep copy.
    batch_norm : bool
        Also swap ``nn.BatchNorm2d`` for :class:`BatchNorm2d` (off by default: see Notes).

    Returns
    -------
    (model, ConversionReport)
        The converted model and what was swapped and what was left to PyTorch (and why).

    Notes
    -----
    Only modules of exactly these types are swapped (their class is changed in place: the fastconv
    twins add no state).  A subclass with its own ``forward`` is left alone and reported.  Swapped
    modules still fall back to PyTorch at run time for inputs fastconv cannot serve (CUDA, half, ...).

    ``batch_norm=True``: fastconv's batch norm was 1.3-1.5x faster than PyTorch's (NCHW, forward and
    backward) on 48x48 planes but up to 2x slower on planes of 6x6 and smaller (its per-call cost,
    ~0.2 ms); on the benchmark's ResNet-18 and MobileNet-style nets inference got 10-19% faster and a
    training step changed by -4% to +1% (2-core Xeon, 1 thread, shared machine).

    Examples
    --------
    >>> import torch, fastconv.torch
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.MaxPool2d(2))
    >>> fast, report = fastconv.torch.convert(net)
    >>> type(fast[0]).__module__, len(report.swapped)
    ('fastconv.torch', 2)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert: model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(inplace, bool):
        raise TypeError(f"convert: inplace must be a bool, got {inplace!r}")
    if not isinstance(batch_norm, bool):
        raise TypeError(f"convert: batch_norm must be a bool, got {batch_norm!r}")
    swaps = {**_SWAPS, **_SWAPS_BN} if batch_norm else _SWAPS
    if not inplace:
        model = copy.deepcopy(model)
    report = ConversionReport()
    for name, m in model.named_modules():
        kind = type(m).__name__
        twin = swaps.get(type(m))
        if twin is None:
            if isinstance(m, tuple(swaps)) and not isinstance(m, tuple(swaps.values())):
                report.left.append((name, kind, "a subclass with its own forward"))
            continue
        why = _why_not(m)
        if why is not None:
            report.left.append((name, kind, why))
            continue
        m.__class__ = twin
        report.swapped.append((name, kind))
    return model, report
