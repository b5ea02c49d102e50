"""Optimisers: SGD and Adam with PyTorch's update rules, over :class:`~fastconv.autograd.Parameter`
objects (``model.parameters()``).

>>> import numpy as np
>>> from fastconv.autograd import Parameter
>>> p = Parameter(np.array([1.0])); p.grad[:] = 0.5
>>> opt = SGD([p], lr=0.1); opt.step(); opt.zero_grad(); p.data, p.grad
(array([0.95]), array([0.]))
"""
from __future__ import annotations

import math

import numpy as np

from . import _validation as V
from .autograd import Parameter

__all__ = ["SGD", "Adam"]


def _nonnegative_number(fn, name, v):
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, float, np.integer, np.floating)):
        raise TypeError(f"{fn}: {name} must be a number, got {v!r}")
    if not (v >= 0 and math.isfinite(v)):
        raise ValueError(f"{fn}: {name} must be a finite number >= 0, got {v!r}")
    return float(v)


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
