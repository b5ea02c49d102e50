"""The algorithm registry: what each convolution algorithm is and offers.

This module is a leaf of the house: it knows the algorithms (the modules below it) and nothing above
it.  Choosing among them for ``algorithm='auto'`` lives in :mod:`fastconv._select`.

Adding an algorithm is one module and one line: write ``_algorithms/NAME.py`` with the three passes,
``supports`` and ``cost``, and add one ``register(Algorithm(...))`` line at the bottom of this file.
Tests, ``fastconv bench``, asv and ``'auto'`` read the registry and the metadata fields, never names.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

from ._algorithms import direct, fft, im2col, implicit, winograd

PASSES = ("forward", "grad_input", "grad_weight")
NAN_SPREADS = ("window", "tile", "plane")


class AlgorithmUnavailable(ValueError):
    """An explicitly requested algorithm cannot serve this case (a ``ValueError``).

    The message names the function, the algorithm, the pass and the reason, e.g.
    ``conv2d: algorithm='fft' cannot compute the forward pass here: its smallest tiling needs ...``.
    Callers that try several algorithms catch this type; any other ``ValueError`` is a bad argument.

    Examples
    --------
    >>> import numpy as np, fastconv
    >>> try:
    ...     fastconv.conv2d(np.ones((1, 1, 4, 4)), np.ones((1, 1, 3, 3)), algorithm="fft", workspace_limit=1)
    ... except fastconv.AlgorithmUnavailable as e:
    ...     print(str(e)[:58])
    conv2d: algorithm='fft' cannot compute the forward pass he
    """


@dataclass(frozen=True)
class Algorithm:
    """One convolution algorithm.

    ``forward(x, w, b, p) -> y``, ``grad_input(gy, w, p) -> gx`` and ``grad_weight(gy, x, p) -> gw``
    take validated contiguous-or-not arrays and :class:`~fastconv._validation.ConvParams`.
    ``supports(p, pass_)`` returns ``None`` when the algorithm can serve that pass, else the reason in
    words.  ``cost(p, pass_, threads)`` is the algorithm's work model in nominal seconds for a pool of
    ``threads``; :mod:`fastconv._select` turns it into this machine's seconds with the fitted table.

    Optional fields:

    * ``backward(gy, x, w, p) -> (gx, gw)``: both gradients in one call, sharing work through local
      variables; ``conv2d_backward`` uses it when both passes chose this algorithm.
    * ``nan_spread``: how far one NaN/Inf in an input reaches in the output -- ``'window'`` (exactly
      the outputs whose window touches it, as PyTorch), ``'tile'`` (the whole transform tile that
      holds it) or ``'plane'`` (the whole output plane).
    * ``thread_invariant``: the passes whose bits do not depend on the thread count.
    * ``float32_error``: how many times a direct sum's float32 rounding error the results may carry
      (Winograd F(4x4)'s transforms: up to 16x im2col's, measured; see its module docstring); tests
      scale their float32 tolerances by it.
    """

    name: str
    forward: Callable
    grad_input: Callable
    grad_weight: Callable
    supports: Callable[..., Optional[str]]
    cost: Callable[..., float]
    backward: Optional[Callable] = None
    nan_spread: str = "window"
    thread_invariant: frozenset = field(default_factory=lambda: frozenset(PASSES))
    float32_error: float = 1.0

    def __post_init__(self):
        if self.nan_spread not in NAN_SPREADS:
            raise ValueError(f"Algorithm: nan_spread must be one of {NAN_SPREADS}, got {self.nan_spread!r}")
        object.__setattr__(self, "thread_invariant", frozenset(self.thread_invariant))
        if not self.thread_invariant <= set(PASSES):
            raise ValueError(f"Algorithm: thread_invariant must be a subset of {PASSES}, "
                             f"got {sorted(self.thread_invariant)}")


_REGISTRY: dict[str, Algorithm] = {}
_listeners: list[Callable[[], None]] = []  # called on every change (the choice caches forget)


def register(alg: Algorithm) -> Algorithm:
    """Add (or replace) an algorithm under ``alg.name``; returns it."""
    if not isinstance(alg, Algorithm):
        raise TypeError(f"register: alg must be an Algorithm, got {type(alg).__name__}")
    if alg.name == "auto":
        raise ValueError("register: name 'auto' is reserved")
    _REGISTRY[alg.name] = alg
    for f in _listeners:
        f()
    return alg


def unregister(name: str) -> None:
    """Remove an algorithm (tests register throwaway ones)."""
    _REGISTRY.pop(name, None)
    for f in _listeners:
        f()


def on_change(f: Callable[[], None]) -> None:
    """Call ``f()`` whenever the registry changes."""
    _listeners.append(f)


def registry() -> dict:
    """Name -> :class:`Algorithm` (a copy)."""
    return dict(_REGISTRY)


def eligible(p, pass_) -> list:
    """The registered algorithms that can serve this pass of this geometry."""
    return [alg for alg in _REGISTRY.values() if alg.supports(p, pass_) is None]


def algorithms() -> tuple:
    """Names of the registered convolution algorithms, e.g. ``('direct', ...)``.

    Examples
    --------
    >>> import fastconv
    >>> "direct" in fastconv.algorithms()
    True
    """
    return tuple(_REGISTRY)


register(Algorithm("direct", direct.forward, direct.grad_input, direct.grad_weight, direct.supports,
                   direct.cost))
register(Algorithm("im2col", im2col.forward, im2col.grad_input, im2col.grad_weight, im2col.supports,
                   im2col.cost, thread_invariant=()))
register(Algorithm("fft", fft.forward, fft.grad_input, fft.grad_weight, fft.supports, fft.cost,
                   backward=fft.backward, nan_spread="tile"))
register(Algorithm("winograd", winograd.forward, winograd.grad_input, winograd.grad_weight, winograd.supports,
                   winograd.cost, nan_spread="tile", thread_invariant=(), float32_error=16.0))
register(Algorithm("gemm", implicit.forward, implicit.grad_input, implicit.grad_weight, implicit.supports,
                   implicit.cost))
