"""Named shape cases: the public suite (``shapes.json``) as convolution and pooling cases.

The suite is shared by ``python -m fastconv bench``, the asv benchmarks (``benchmarks/``) and the
pytest-benchmark suite (``tests/perf``).  Each case knows its array shapes, its keyword arguments in
``torch.nn.functional`` style (so one dict serves fastconv and PyTorch), its arithmetic and how to
scale itself to another batch or image size.

This module imports only numpy and the standard library: the asv benchmarks load it from the
working tree by file path, so they can run against fastconv wheels built from older commits that
did not have it.

Notation: ``n`` batch, ``c`` input channels, ``h, w`` input size, ``k`` output channels,
``r, s`` kernel size, ``oh, ow`` output size, ``g`` groups.

Examples
--------
>>> from fastconv import cases
>>> suite = cases.load_suite()
>>> c = suite.conv_case("lenet5-c1")
>>> c.x_shape, c.w_shape, c.y_shape
((64, 1, 32, 32), (6, 1, 5, 5), (64, 6, 28, 28))
>>> c.kwargs
{'stride': (1, 1), 'padding': (0, 0), 'dilation': (1, 1), 'groups': 1}
>>> c.flops("forward") == 2 * 64 * 6 * 28 * 28 * 25
True
>>> c.scaled(batch=8, spatial=2.0).x_shape
(8, 1, 64, 64)
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from typing import NamedTuple

import numpy as np

SUITE_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "shapes.json")

#: Passes a convolution case can be timed on; ``'backward'`` is grad_input + grad_weight + grad_bias.
CONV_PASSES = ("forward", "backward", "grad_input", "grad_weight")
#: Passes a pooling case can be timed on.
POOL_PASSES = ("forward", "backward")


def _pair(name, field, v):
    if isinstance(v, (list, tuple)) and len(v) == 2 and all(isinstance(e, int) for e in v):
        return int(v[0]), int(v[1])
    if isinstance(v, int) and not isinstance(v, bool):
        return v, v
    raise ValueError(f"load_suite: {field} of case {name!r} must be an int or a pair of ints, got {v!r}")


def _out(size, pad, dil, ker, stride):
    return (size + 2 * pad - dil * (ker - 1) - 1) // stride + 1


def _scale_size(size, spatial, minimum):
    return max(int(round(size * spatial)), minimum, 1)


@dataclass(frozen=True)
class ConvCase:
    """One ``conv2d`` geometry of the suite (stride, padding, dilation as pairs)."""

    name: str
    n: int
    c: int
    h: int
    w: int
    k: int
    r: int
    s: int
    stride: tuple = (1, 1)
    padding: tuple = (0, 0)
    dilation: tuple = (1, 1)
    groups: int = 1

    @property
    def oh(self):
        return _out(self.h, self.padding[0], self.dilation[0], self.r, self.stride[0])

    @property
    def ow(self):
        return _out(self.w, self.padding[1], self.dilation[1], self.s, self.stride[1])

    @property
    def x_shape(self):
        return (self.n, self.c, self.h, self.w)

    @property
    def w_shape(self):
        return (self.k, self.c // self.groups, self.r, self.s)

    @property
    def y_shape(self):
        return (self.n, self.k, self.oh, self.ow)

    @property
    def kwargs(self):
        """Keyword arguments for ``fastconv.conv2d`` and ``torch.nn.functional.conv2d`` alike."""
        return {"stride": self.stride, "padding": self.padding, "dilation": self.dilation,
                "groups": self.groups}

    @property
    def macs(self):
        """Multiply-adds of the forward pass."""
        return self.n * self.k * self.oh * self.ow * (self.c // self.groups) * self.r * self.s

    def flops(self, pass_="forward"):
        """Floating-point operations (2 per multiply-add) of ``pass_`` (one of :data:`CONV_PASSES`).

        grad_input and grad_weight each cost as much as the forward pass; ``'backward'`` is both.
        """
        if pass_ not in CONV_PASSES:
            raise ValueError(f"ConvCase.flops: pass_ must be one of {CONV_PASSES}, got {pass_!r}")
        return 2 * self.macs * (2 if pass_ == "backward" else 1)

    @property
    def nbytes(self):
        """Bytes of input, weight and output in float32."""
        return 4 * (int(np.prod(self.x_shape)) + int(np.prod(self.w_shape)) + int(np.prod(self.y_shape)))

    def scaled(self, batch=None, spatial=1.0):
        """This case with batch ``batch`` (default: unchanged) and ``h, w`` scaled by ``spatial``.

        The image never shrinks below the (dilated) kernel's footprint; the name records the change,
        e.g. ``'lenet5-c1@n8x2'``.
        """
        n = self.n if batch is None else int(batch)
        if n < 1 or spatial <= 0:
            raise ValueError(f"ConvCase.scaled: batch and spatial must be positive, got {batch!r}, {spatial!r}")
        min_h = self.dilation[0] * (self.r - 1) + 1 - 2 * self.padding[0]
        min_w = self.dilation[1] * (self.s - 1) + 1 - 2 * self.padding[1]
        tag = f"@n{n}" + ("" if spatial == 1 else f"x{spatial:g}")
        return replace(self, name=self.name + tag, n=n, h=_scale_size(self.h, spatial, min_h),
                       w=_scale_size(self.w, spatial, min_w))

    def arrays(self, dtype=np.float32, seed=0):
        """Random ``(x, weight, bias)`` of this case's shapes, standard normal, reproducible by ``seed``."""
        rng = np.random.default_rng(seed)
        x = rng.standard_normal(self.x_shape).astype(dtype)
        wt = rng.standard_normal(self.w_shape).astype(dtype)
        b = rng.standard_normal(self.k).astype(dtype)
        return x, wt, b

    def grad_output(self, dtype=np.float32, seed=1):
        """A random gradient of this case's output."""
        return np.random.default_rng(seed).standard_normal(self.y_shape).astype(dtype)


@dataclass(frozen=True)
class PoolCase:
    """One ``max_pool2d``/``avg_pool2d`` geometry of the suite (kernel, stride, padding as pairs)."""

    name: str
    n: int
    c: int
    h: int
    w: int
    kernel: tuple
    stride: tuple
    padding: tuple = (0, 0)

    @property
    def oh(self):
        return _out(self.h, self.padding[0], 1, self.kernel[0], self.stride[0])

    @property
    def ow(self):
        return _out(self.w, self.padding[1], 1, self.kernel[1], self.stride[1])

    @property
    def x_shape(self):
        return (self.n, self.c, self.h, self.w)

    @property
    def y_shape(self):
        return (self.n, self.c, self.oh, self.ow)

    @property
    def kwargs(self):
        """Keyword arguments for ``fastconv.max_pool2d`` and ``torch.nn.functional.max_pool2d``."""
        return {"kernel_size": self.kernel, "stride": self.stride, "padding": self.padding}

    def flops(self, pass_="forward"):
        """Element operations: one comparison (or addition) per window element, forward or backward."""
        if pass_ not in POOL_PASSES:
            raise ValueError(f"PoolCase.flops: pass_ must be one of {POOL_PASSES}, got {pass_!r}")
        return self.n * self.c * self.oh * self.ow * self.kernel[0] * self.kernel[1]

    def scaled(self, batch=None, spatial=1.0):
        """This case with batch ``batch`` and ``h, w`` scaled by ``spatial`` (see :meth:`ConvCase.scaled`)."""
        n = self.n if batch is None else int(batch)
        if n < 1 or spatial <= 0:
            raise ValueError(f"PoolCase.scaled: batch and spatial must be positive, got {batch!r}, {spatial!r}")
        tag = f"@n{n}" + ("" if spatial == 1 else f"x{spatial:g}")
        return replace(self, name=self.name + tag, n=n, h=_scale_size(self.h, spatial, self.kernel[0]),
                       w=_scale_size(self.w, spatial, self.kernel[1]))

    def arrays(self, dtype=np.float32, seed=0):
        """A random input ``x`` of this case's shape."""
        return np.random.default_rng(seed).standard_normal(self.x_shape).astype(dtype)

    def grad_output(self, dtype=np.float32, seed=1):
        """A random gradient of this case's output."""
        return np.random.default_rng(seed).standard_normal(self.y_shape).astype(dtype)


class Suite(NamedTuple):
    """The cases of one shape file: ``conv`` and ``pool`` tuples, in file order."""

    conv: tuple
    pool: tuple

    def conv_case(self, name):
        """The convolution case called ``name``."""
        return _by_name("conv_case", self.conv, name)

    def pool_case(self, name):
        """The pooling case called ``name``."""
        return _by_name("pool_case", self.pool, name)

    def only(self, names):
        """The suite restricted to ``names`` (a list or a comma-separated string), every name known.

        >>> load_suite().only("lenet5-c1,lenet5-pool")
        Suite(conv=(ConvCase(name='lenet5-c1', ...),), pool=(PoolCase(name='lenet5-pool', ...),))
        """
        if isinstance(names, str):
            names = [s.strip() for s in names.split(",") if s.strip()]
        known = {c.name for c in self.conv + self.pool}
        unknown = [s for s in names if s not in known]
        if unknown:
            raise ValueError(f"only: names must be cases of the suite ({', '.join(sorted(known))}), "
                             f"got {', '.join(unknown)}")
        keep = set(names)
        return Suite(tuple(c for c in self.conv if c.name in keep), tuple(c for c in self.pool if c.name in keep))


def _by_name(fn, cases, name):
    for c in cases:
        if c.name == name:
            return c
    raise ValueError(f"{fn}: name must be one of {', '.join(c.name for c in cases)}, got {name!r}")


def _int_field(name, entry, key, default=None):
    v = entry.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"load_suite: {key} of case {name!r} must be a positive int, got {v!r}")
    return v


def _conv_case(entry):
    name = entry.get("name")
    if not isinstance(name, str):
        raise ValueError(f"load_suite: every conv2d case needs a string 'name', got {entry!r}")
    n, c, h, w, k, r, s = (_int_field(name, entry, key) for key in "NCHWKRS")
    g = _int_field(name, entry, "groups", 1)
    if c % g or k % g:
        raise ValueError(f"load_suite: C and K of case {name!r} must be divisible by groups={g}, got C={c}, K={k}")
    case = ConvCase(name, n, c, h, w, k, r, s, _pair(name, "stride", entry.get("stride", 1)),
                    _pair(name, "padding", entry.get("padding", 0)),
                    _pair(name, "dilation", entry.get("dilation", 1)), g)
    if case.oh < 1 or case.ow < 1:
        raise ValueError(f"load_suite: case {name!r} has no output (kernel larger than the padded input)")
    return case


def _pool_case(entry):
    name = entry.get("name")
    if not isinstance(name, str):
        raise ValueError(f"load_suite: every max_pool2d case needs a string 'name', got {entry!r}")
    n, c, h, w = (_int_field(name, entry, key) for key in "NCHW")
    kernel = _pair(name, "kernel", entry.get("kernel"))
    return PoolCase(name, n, c, h, w, kernel, _pair(name, "stride", entry.get("stride", entry.get("kernel"))),
                    _pair(name, "padding", entry.get("padding", 0)))


def load_suite(path=None):
    """Read a shape file (default: the public suite shipped with fastconv).

    Parameters
    ----------
    path : str or os.PathLike, optional
        A JSON file like ``fastconv/shapes.json``: ``{"conv2d": [...], "max_pool2d": [...]}``, each
        entry with ``name, N, C, H, W`` and ``K, R, S`` (conv) or ``kernel`` (pool); ``stride``,
        ``padding``, ``dilation``, ``groups`` optional.  Either list may be missing.

    Returns
    -------
    Suite
        ``Suite(conv=(ConvCase, ...), pool=(PoolCase, ...))``.

    Raises
    ------
    ValueError
        A missing or malformed field, duplicate names, or an empty file.

    Examples
    --------
    >>> suite = load_suite()
    >>> [c.name for c in suite.pool]
    ['lenet5-pool', 'vgg16-pool', 'resnet50-pool']
    """
    path = SUITE_PATH if path is None else os.fspath(path)
    with open(path, encoding="utf-8") as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as exc:
            raise ValueError(f"load_suite: path must be a JSON shape file, got {path!r} ({exc})") from None
    if not isinstance(data, dict):
        raise ValueError(f"load_suite: path must hold a JSON object with 'conv2d'/'max_pool2d' lists, got {path!r}")
    conv = tuple(_conv_case(e) for e in data.get("conv2d", []))
    pool = tuple(_pool_case(e) for e in data.get("max_pool2d", []))
    if not conv and not pool:
        raise ValueError(f"load_suite: path must name at least one case, got none in {path!r}")
    names = [c.name for c in conv + pool]
    dup = sorted({x for x in names if names.count(x) > 1})
    if dup:
        raise ValueError(f"load_suite: case names must be unique, got duplicates {', '.join(dup)}")
    return Suite(conv, pool)
