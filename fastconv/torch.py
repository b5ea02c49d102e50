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
``torch.from_numpy``).  The convolutions and pools also take channels_last tensors as they are
(fastconv's ops accept channels_last arrays and return their results in that layout; the GEMM and
depthwise passes compute on it natively, other algorithms on converted copies).  Other strided
tensors (and batch norm's inputs) are copied to NCHW first (one read and one write, PyTorch's
``.contiguous()``) and the result copied back to the input's memory format.  Measured (2 threads,
AVX2, README "Use under PyTorch"): channels_last pays for a MobileNet-style network (step 0.79x of
PyTorch's best against 0.62x in NCHW), NCHW for a U-Net (0.88x against 0.73x).

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
numba's idle workers spin ~0.1 ms, then sleep (``fastconv._jit.SPIN_COUNT``), PyTorch's spin for
several ms after each of its parallel regions unless ``OMP_WAIT_POLICY=passive`` is set before torch
is imported
(``benchmarks/torch_train_step.py --oversubscription`` measures the difference).  Where PyTorch's
wheel loads the same GNU OpenMP library as numba (the registry's CPU wheel of torch 2.13 does: one
``libgomp.so.1`` in the process), there is one runtime and one spin count for both, the first to
start it setting it: importing fastconv first gives PyTorch's loops fastconv's short spin too.
"""
from __future__ import annotations

try:
    import torch
    import torch.nn.functional as F
    from torch import nn
except ImportError as exc:  # pragma: no cover - exercised without torch installed
    raise ImportError(
        "fastconv.torch needs PyTorch, an optional extra: pip install 'fastconv[torch]' "
        "(or install torch yourself)") from exc

import copy
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

from ._threads import set_num_threads as _fc_set_num_threads
# the bridge's computations and operators (importing it registers the fastconv:: operators); _fc is
# fastconv.functional, reached through here by tests and benchmarks/torch_train_step.py
from ._torch_ops import (_DTYPES, _AvgPool2dFunction, _BatchNormFunction, _Conv2dFunction, _MaxPool2dFunction,
                         _avg_pool2d_impl, _avg_pool2d_op, _batch_norm_impl, _batch_norm_op, _conv2d_impl,
                         _conv2d_op, _eager, _fc, _like_input, _max_pool2d_impl, _max_pool2d_op, _pair,
                         _pool_args, _serves)  # noqa: F401 (_fc)

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


# --------------------------------------------------------------------------- threads
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