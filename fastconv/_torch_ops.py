"""The PyTorch bridge's computations: tensor <-> array exchange, the custom operators
(``torch.library.custom_op``, namespace ``fastconv``) with their fake implementations and autograd
formulas, and their eager ``torch.autograd.Function`` twins.

``fastconv.torch`` holds the public functions, modules and :func:`fastconv.torch.convert` on top of
these; it imports this module (which registers the operators) after checking that torch is there.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import functional as _fc
from ._threads import max_threads as _max_threads
from ._threads import current as _fc_current
from ._threads import threads as _fc_threads


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


def _is_cl(t: Tensor) -> bool:
    """A 4-D tensor in channels_last memory format (and not also NCHW-contiguous)."""
    return t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)


def _layout_array(t: Tensor) -> np.ndarray:
    """:func:`_array` for the convolutions and pools, which take channels_last arrays and return
    their results in that layout: a channels_last tensor is handed over as it is (an (N, C, H, W)
    array with NHWC strides)."""
    return t.detach().numpy() if _is_cl(t) else _array(t)


def _layout_tensor(a: np.ndarray) -> Tensor:
    """:func:`_tensor` that keeps a channels_last result's strides (a zero-copy tensor)."""
    return torch.from_numpy(a) if a.ndim == 4 and not a.flags.c_contiguous else _tensor(a)


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
def _format(x):
    """The memory format of the convolutions' and pools' results for input ``x`` (what the fakes
    promise): channels_last in, channels_last out."""
    return torch.channels_last if _is_cl(x) else torch.contiguous_format


def _conv2d_impl(x, weight, bias, stride, padding, dilation, groups, same):
    with _pool_threads():
        y = _fc.conv2d(_layout_array(x), _array(weight), None if bias is None else _array(bias), tuple(stride),
                       _conv_padding(padding, same), tuple(dilation), groups)
    return _layout_tensor(y)


def _bias_tensor(gb, weight):
    """grad_bias as a tensor; zeros where it was not computed (``need_bias`` False: the operators
    always return one)."""
    return _tensor(gb) if gb is not None else weight.new_zeros((weight.shape[0],))


def _conv2d_backward_impl(grad, x, weight, stride, padding, dilation, groups, same, need_bias=True):
    with _pool_threads():
        g = _fc.conv2d_backward(_layout_array(grad), _layout_array(x), _array(weight), tuple(stride),
                                _conv_padding(padding, same), tuple(dilation), groups, bias=need_bias)
    return _layout_tensor(g.grad_input), _tensor(g.grad_weight), _bias_tensor(g.grad_bias, weight)


def _conv2d_grad_weight_impl(grad, x, weight, stride, padding, dilation, groups, same, need_bias=True):
    with _pool_threads():
        gw, gb = _fc.conv2d_grad_weight(_layout_array(grad), _layout_array(x), _array(weight), tuple(stride),
                                        _conv_padding(padding, same), tuple(dilation), groups, bias=need_bias)
    return _tensor(gw), _bias_tensor(gb, weight)


@torch.library.custom_op("fastconv::conv2d", mutates_args=(), device_types="cpu")
def _conv2d_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], stride: List[int], padding: List[int],
               dilation: List[int], groups: int, same: bool) -> Tensor:
    return _conv2d_impl(x, weight, bias, stride, padding, dilation, groups, same)


@_conv2d_op.register_fake
def _(x, weight, bias, stride, padding, dilation, groups, same):
    oh = _conv_out(x.shape[2], padding[0], dilation[0], weight.shape[2], stride[0], same)
    ow = _conv_out(x.shape[3], padding[1], dilation[1], weight.shape[3], stride[1], same)
    return torch.empty((x.shape[0], weight.shape[0], oh, ow), dtype=x.dtype, device=x.device,
                       memory_format=_format(x))


@torch.library.custom_op("fastconv::conv2d_backward", mutates_args=(), device_types="cpu")
def _conv2d_backward_op(grad: Tensor, x: Tensor, weight: Tensor, stride: List[int], padding: List[int],
                        dilation: List[int], groups: int, same: bool,
                        need_bias: bool = True) -> Tuple[Tensor, Tensor, Tensor]:
    # grad_input, grad_weight and grad_bias, each pass with its own algorithm (grad_bias zeros, not
    # computed, without need_bias: a layer without bias)
    return _conv2d_backward_impl(grad, x, weight, stride, padding, dilation, groups, same, need_bias)


@_conv2d_backward_op.register_fake
def _(grad, x, weight, stride, padding, dilation, groups, same, need_bias=True):
    return torch.empty_like(x, memory_format=_format(x)), \
        torch.empty_like(weight, memory_format=torch.contiguous_format), weight.new_empty((weight.shape[0],))


@torch.library.custom_op("fastconv::conv2d_grad_weight", mutates_args=(), device_types="cpu")
def _conv2d_grad_weight_op(grad: Tensor, x: Tensor, weight: Tensor, stride: List[int], padding: List[int],
                           dilation: List[int], groups: int, same: bool,
                           need_bias: bool = True) -> Tuple[Tensor, Tensor]:
    # grad_weight and grad_bias only: a first layer's input needs no gradient, and its grad_input
    # pass would be the most expensive of the three (it is as large as the network's input)
    return _conv2d_grad_weight_impl(grad, x, weight, stride, padding, dilation, groups, same, need_bias)


@_conv2d_grad_weight_op.register_fake
def _(grad, x, weight, stride, padding, dilation, groups, same, need_bias=True):
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
        gx, gw, gb = backward(grad, x, weight, stride, padding, dilation, groups, same, need_b)
    elif need_w or need_b:
        gw, gb = grad_weight(grad, x, weight, stride, padding, dilation, groups, same, need_b)
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
        y, idx = _fc.max_pool2d(_layout_array(x), tuple(kernel_size), tuple(stride), tuple(padding),
                                tuple(dilation), ceil_mode, return_indices=True)
    return _layout_tensor(y), _layout_tensor(idx)


def _max_pool2d_backward_impl(grad, indices, x):
    with _pool_threads():
        gx = _fc.max_pool2d_backward(_layout_array(grad), _layout_array(indices), tuple(x.shape))
    return _layout_tensor(gx)


@torch.library.custom_op("fastconv::max_pool2d", mutates_args=(), device_types="cpu")
def _max_pool2d_op(x: Tensor, kernel_size: List[int], stride: List[int], padding: List[int],
                   dilation: List[int], ceil_mode: bool) -> Tuple[Tensor, Tensor]:
    return _max_pool2d_impl(x, kernel_size, stride, padding, dilation, ceil_mode)


@_max_pool2d_op.register_fake
def _(x, kernel_size, stride, padding, dilation, ceil_mode):
    shape = _pool_shape(x, kernel_size, stride, padding, dilation, ceil_mode)
    return (torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=_format(x)),
            torch.empty(shape, dtype=torch.int64, device=x.device, memory_format=_format(x)))


@torch.library.custom_op("fastconv::max_pool2d_backward", mutates_args=(), device_types="cpu")
def _max_pool2d_backward_op(grad: Tensor, indices: Tensor, x: Tensor) -> Tensor:
    return _max_pool2d_backward_impl(grad, indices, x)


@_max_pool2d_backward_op.register_fake
def _(grad, indices, x):
    return torch.empty_like(x, memory_format=_format(grad))  # the gradient's layout


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


def _avg_pool2d_impl(x, kernel_size, stride, padding, ceil_mode, count_include_pad):
    with _pool_threads():
        y = _fc.avg_pool2d(_layout_array(x), tuple(kernel_size), tuple(stride), tuple(padding), ceil_mode,
                           count_include_pad)
    return _layout_tensor(y)


def _avg_pool2d_backward_impl(grad, x, kernel_size, stride, padding, ceil_mode, count_include_pad):
    with _pool_threads():
        gx = _fc.avg_pool2d_backward(_layout_array(grad), tuple(x.shape), tuple(kernel_size), tuple(stride),
                                     tuple(padding), ceil_mode, count_include_pad)
    return _layout_tensor(gx)


@torch.library.custom_op("fastconv::avg_pool2d", mutates_args=(), device_types="cpu")
def _avg_pool2d_op(x: Tensor, kernel_size: List[int], stride: List[int], padding: List[int], ceil_mode: bool,
                   count_include_pad: bool) -> Tensor:
    return _avg_pool2d_impl(x, kernel_size, stride, padding, ceil_mode, count_include_pad)


@_avg_pool2d_op.register_fake
def _(x, kernel_size, stride, padding, ceil_mode, count_include_pad):
    return torch.empty(_pool_shape(x, kernel_size, stride, padding, (1, 1), ceil_mode), dtype=x.dtype,
                       device=x.device, memory_format=_format(x))


@torch.library.custom_op("fastconv::avg_pool2d_backward", mutates_args=(), device_types="cpu")
def _avg_pool2d_backward_op(grad: Tensor, x: Tensor, kernel_size: List[int], stride: List[int],
                            padding: List[int], ceil_mode: bool, count_include_pad: bool) -> Tensor:
    return _avg_pool2d_backward_impl(grad, x, kernel_size, stride, padding, ceil_mode, count_include_pad)


@_avg_pool2d_backward_op.register_fake
def _(grad, x, kernel_size, stride, padding, ceil_mode, count_include_pad):
    return torch.empty_like(x, memory_format=_format(grad))  # the gradient's layout


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
