"""The algorithm registry and the resolution of ``algorithm=`` (``'auto'`` included).

Each :class:`Algorithm` entry is complete: the three passes, ``supports`` and ``cost``.  A new
algorithm is one module in ``_algorithms/`` plus one ``register`` line at the bottom of this file;
tests and benchmarks parametrise over :func:`algorithms`, so they pick it up.
"""
from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from typing import Callable, Optional

import numba

from ._algorithms import direct, fft, im2col, winograd

PASSES = ("forward", "grad_input", "grad_weight")


@dataclass(frozen=True)
class Algorithm:
    """One convolution algorithm.

    ``forward(x, w, b, p) -> y``, ``grad_input(gy, w, p) -> gx`` and ``grad_weight(gy, x, p) -> gw``
    take validated arrays and :class:`~fastconv._validation.ConvParams`.  ``supports(p, pass_)``
    returns ``None`` when the algorithm can serve that pass, else the reason in words.
    ``cost(p, pass_)`` estimates seconds; ``'auto'`` picks the cheapest supported entry.
    """

    name: str
    forward: Callable
    grad_input: Callable
    grad_weight: Callable
    supports: Callable[..., Optional[str]]
    cost: Callable[..., float]


_REGISTRY: dict[str, Algorithm] = {}


_AUTO_CACHE: dict = {}  # (params, pass) -> the cost model's choice
_CAL_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_calibration.json")


@functools.lru_cache(maxsize=1)
def _load_calibration() -> dict:
    try:
        with open(_CAL_PATH, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def calibration() -> dict:
    """``{"algorithm/pass": [a, b]}``: auto's cost for that pass is ``a * alg.cost(p, pass) + b`` seconds.

    Fitted by ``benchmarks/calibrate.py --write`` (see ``_calibration.json`` for the machine, date and
    the accuracy of the resulting choice); empty when no calibration is shipped.
    """
    return dict(_load_calibration().get("coef", {}))


def calibrated_cost(alg, p, pass_) -> float:
    """The cost model's estimate in seconds, with this machine's fitted correction applied."""
    a, b = _load_calibration().get("coef", {}).get(f"{alg.name}/{pass_}", (1.0, 0.0))
    return a * alg.cost(p, pass_) + b


def register(alg: Algorithm) -> None:
    _REGISTRY[alg.name] = alg
    _AUTO_CACHE.clear()


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


AUTOTUNE = [False]  # set by fastconv._tuning.set_autotune (and FASTCONV_AUTOTUNE at import)


def select(fn, algorithm, p, pass_) -> Algorithm:
    """Resolve ``algorithm`` (a registered name or ``'auto'``) for one pass of one geometry.

    An explicit name that cannot serve the case raises; it never falls back to another algorithm.
    """
    if not isinstance(algorithm, str):
        raise TypeError(f"{fn}: algorithm must be a str, got {type(algorithm).__name__}")
    if algorithm == "auto":
        if AUTOTUNE[0]:
            from ._tuning import tuned
            return tuned(p, pass_)
        # the costs of the multithreaded algorithms depend on the pool size: it is part of the key
        key = (p, pass_, numba.get_num_threads())
        best = _AUTO_CACHE.get(key)
        if best is None:
            best_cost = float("inf")
            for alg in _REGISTRY.values():
                if alg.supports(p, pass_) is None:
                    c = calibrated_cost(alg, p, pass_)
                    if c < best_cost:
                        best, best_cost = alg, c
            if len(_AUTO_CACHE) > 4096:
                _AUTO_CACHE.clear()
            _AUTO_CACHE[key] = best
        return best  # 'direct' supports everything, so there is always one
    alg = _REGISTRY.get(algorithm)
    if alg is None:
        names = ", ".join(repr(n) for n in ("auto",) + algorithms())
        raise ValueError(f"{fn}: algorithm must be one of {names}, got {algorithm!r}")
    reason = alg.supports(p, pass_)
    if reason is not None:
        raise ValueError(f"{fn}: algorithm={algorithm!r} cannot compute the {pass_} pass here: {reason}")
    return alg


register(Algorithm("direct", direct.forward, direct.grad_input, direct.grad_weight,
                   direct.supports, direct.cost))
register(Algorithm("im2col", im2col.forward, im2col.grad_input, im2col.grad_weight,
                   im2col.supports, im2col.cost))
register(Algorithm("fft", fft.forward, fft.grad_input, fft.grad_weight, fft.supports, fft.cost))
register(Algorithm("winograd", winograd.forward, winograd.grad_input, winograd.grad_weight,
                   winograd.supports, winograd.cost))
