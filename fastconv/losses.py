"""Losses: modules whose value is a one-element :class:`~fastconv.autograd.Tensor` with ``.item()``
and ``.backward()`` (which differentiates the forward that produced its input).

>>> import numpy as np
>>> from fastconv.layers import Linear
>>> fc, loss_fn = Linear(3, 2, dtype=np.float64, rng=0), CrossEntropyLoss()
>>> loss = loss_fn(fc(np.ones((4, 3))), np.array([0, 1, 0, 1]))
>>> loss.backward(); fc.bias.grad.shape
(2,)
"""
from __future__ import annotations

import numpy as np

from . import autograd as A
from .autograd import Tensor
from .layers import Module, _tag_origin

__all__ = ["CrossEntropyLoss", "MSELoss"]


class _Loss(Module):
    def __init__(self, reduction="mean"):
        if reduction not in ("mean", "sum"):
            raise ValueError(f"{type(self).__name__}: reduction must be 'mean' or 'sum', got {reduction!r}")
        self.reduction = reduction

    def backward(self, grad_output=None):
        """Compatibility: the gradient of the last loss with respect to its first input (the logits),
        for ``model.backward(loss_fn.backward())``.  Prefer ``loss.backward()``."""
        fn = f"{type(self).__name__}.backward"
        out = self._last_out
        if out is None or out._node is None or out._node.backward is None:
            raise RuntimeError(f"{fn}: call the loss first (one backward per call)")
        logits = self._last_in[0]
        g = np.ones(out.shape, out.dtype) if grad_output is None else np.asarray(grad_output, out.dtype)
        (grad,) = A.run_backward(out, g, (logits,), stop_at_inputs=True)
        self._last_in, self._last_out = (), None
        _tag_origin(grad, logits)  # so model.backward can check it differentiates this forward
        return grad

    def extra_repr(self):
        return f"reduction={self.reduction!r}" if self.reduction != "mean" else ""


class CrossEntropyLoss(_Loss):
    """Softmax cross-entropy of logits ``(N, classes)`` against integer targets ``(N,)``.

    ``loss = -mean_n log_softmax(logits)[n, target[n]]`` computed as ``z - max(z) - log(sum(exp(z - max(z))))``
    so large logits do not overflow (see :func:`fastconv.autograd.cross_entropy`).

    >>> loss_fn = CrossEntropyLoss()
    >>> loss = loss_fn(np.array([[1000.0, 0.0], [0.0, 0.0]]), np.array([0, 1]))
    >>> round(loss.item(), 6)
    0.346574
    >>> loss_fn.backward()   # compatibility: the gradient with respect to the logits
    array([[ 0.  ,  0.  ],
           [ 0.25, -0.25]])
    """

    def forward(self, logits, target):
        return A.cross_entropy(logits, target, self.reduction)


class MSELoss(_Loss):
    """Mean squared error (``reduction='sum'``: summed), as ``torch.nn.MSELoss``.

    >>> p = A.Parameter(np.array([1.0, 3.0]))
    >>> loss = MSELoss()(p, np.zeros(2)); loss.item()
    5.0
    """

    def forward(self, prediction, target):
        return A.mse_loss(prediction, target, self.reduction)
