"""Argument normalisation, output-size formulas and every user-facing error message.

Public functions call one ``check_*`` function here; it returns contiguous arrays and a frozen
parameter record, so nothing past this module re-validates.  Messages read
``<function>: <argument> <rule>, got <value>``.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import numpy as np

from ._config import resolve_workspace_limit

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


# --------------------------------------------------------------------------- arrays and scalars
def as_float_array(fn, name, a, ndim, dtype=None):
    """Check that ``a`` is a float32/float64 ndarray of ``ndim`` dims (and of ``dtype`` if given)."""
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{fn}: {name} must be a numpy.ndarray, got {type(a).__name__}")
    if isinstance(a, np.ma.MaskedArray):  # the kernels would silently ignore the mask
        raise TypeError(f"{fn}: {name} must be a plain numpy.ndarray (fill the mask first: a.filled(0)), "
                        f"got a masked array")
    if a.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{fn}: {name} must have dtype float32 or float64, got {a.dtype}")
    if a.ndim != ndim:
        raise ValueError(f"{fn}: {name} must be {ndim}-D, got {a.ndim}-D array of shape {a.shape}")
    if dtype is not None and a.dtype != dtype:
        raise TypeError(f"{fn}: {name} must have the same dtype as the input ({dtype}), got {a.dtype}")
    return a


def as_input(fn, name, a, ndim, dtype=None):
    """:func:`as_float_array` for an array the call only reads: a read-only one comes back as a
    writeable copy in its own memory order.  numba types read-only arrays apart and compiles every
    kernel again for them (im2col's three passes: ~60 s per dtype); one copy is cheaper.  A
    broadcast one is left to the kernels' contiguous copies, after their memory checks.  Never for
    an array the call writes into (running statistics, ``out``)."""
    a = as_float_array(fn, name, a, ndim, dtype)
    return a.copy(order="K") if not a.flags.writeable and _dense(a) else a


def _dense(a):
    return all(st != 0 or n <= 1 for st, n in zip(a.strides, a.shape))


def float_dtype(fn, dtype):
    """A float32/float64 dtype from a user's ``dtype=`` argument."""
    try:
        dt = np.dtype(dtype)
    except TypeError:
        raise TypeError(f"{fn}: dtype must be float32 or float64, got {dtype!r}") from None
    if dt not in FLOAT_DTYPES:
        raise TypeError(f"{fn}: dtype must be float32 or float64, got {dt}")
    return dt


def _int(fn, name, v, rule="an int or a pair of ints"):
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
        raise TypeError(f"{fn}: {name} must be {rule}, got {v!r}")
    if not -2**62 < v < 2**62:  # kernels do int64 arithmetic on sums and products of these
        raise ValueError(f"{fn}: {name} must be below 2**62 in magnitude, got {v!r}")
    return int(v)


def pair(fn, name, v):
    """Normalise an int or a pair of ints to a tuple of two Python ints."""
    if isinstance(v, (tuple, list)):
        if len(v) == 1:  # PyTorch expands a one-element tuple, e.g. padding=(2,)
            v = (v[0], v[0])
        if len(v) != 2:
            raise ValueError(f"{fn}: {name} must be an int or a pair of ints, got {v!r}")
        return _int(fn, name, v[0]), _int(fn, name, v[1])
    v = _int(fn, name, v)
    return v, v


def positive_pair(fn, name, v):
    p = pair(fn, name, v)
    if p[0] < 1 or p[1] < 1:
        raise ValueError(f"{fn}: {name} must be positive, got {p}")
    return p


def nonnegative_pair(fn, name, v):
    p = pair(fn, name, v)
    if p[0] < 0 or p[1] < 0:
        raise ValueError(f"{fn}: {name} must be non-negative, got {p}")
    return p


def _bool(fn, name, v):
    if not isinstance(v, (bool, np.bool_)):
        raise TypeError(f"{fn}: {name} must be a bool, got {v!r}")
    return bool(v)


def shape4(fn, name, v):
    """Normalise a user-given 4-D shape (N, C, H, W)."""
    if not isinstance(v, (tuple, list)) or len(v) != 4:
        raise ValueError(f"{fn}: {name} must be a shape (N, C, H, W), got {v!r}")
    out = tuple(_int(fn, name, d, "a tuple of 4 ints (N, C, H, W)") for d in v)
    if min(out) < 0 or min(out[1:]) < 1:
        raise ValueError(f"{fn}: {name} must have N >= 0 and positive C, H, W, got {out}")
    return out


# --------------------------------------------------------------------------- memory
@functools.lru_cache(maxsize=None)
def _physical_memory():
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        return 1 << 40


def check_memory(fn, what, nbytes):
    """Refuse, before allocating, arrays that could not fit in this machine's memory."""
    limit = _physical_memory()
    if nbytes > limit:
        raise ValueError(
            f"{fn}: {what} would need {nbytes / 2**30:.1f} GiB, more than this machine's "
            f"{limit / 2**30:.1f} GiB of memory"
        )


def check_copy(fn, name, a):
    """Refuse a non-contiguous ``a`` (a broadcast view may be far larger than its memory) whose
    contiguous copy could not fit in memory."""
    if not a.flags.c_contiguous:
        check_memory(fn, f"a contiguous copy of {name} of shape {a.shape}", a.nbytes)


# --------------------------------------------------------------------------- geometry
def conv_out_size(size, pad_total, kernel, stride, dilation):
    """``floor((size + pad_total - dilation*(kernel-1) - 1) / stride) + 1`` (PyTorch's formula)."""
    return (size + pad_total - dilation * (kernel - 1) - 1) // stride + 1


def pool_out_size(size, pad, kernel, stride, dilation, ceil_mode):
    """PyTorch's pooling size: like convolution, rounding up under ``ceil_mode`` unless the last
    window would start in the right padding."""
    out = (size + 2 * pad - dilation * (kernel - 1) - 1 + (stride - 1 if ceil_mode else 0)) // stride + 1
    if ceil_mode and (out - 1) * stride >= size + pad:
        out -= 1
    return out


@dataclass(frozen=True)
class ConvParams:
    """Frozen geometry of one convolution (Notation: n c h w input, k r s weight, g groups,
    cg = c/g and kg = k/g per group, sh sw stride, ph0 ph1 pw0 pw1 top/bottom/left/right padding,
    dh dw dilation, oh ow output)."""

    n: int
    c: int
    h: int
    w: int
    k: int
    r: int
    s: int
    sh: int
    sw: int
    ph0: int
    ph1: int
    pw0: int
    pw1: int
    dh: int
    dw: int
    g: int
    oh: int
    ow: int
    dtype: np.dtype
    workspace_limit: int = 64 * 1024 * 1024  # bytes of scratch memory one call may use

    @property
    def cg(self):
        return self.c // self.g

    @property
    def kg(self):
        return self.k // self.g

    @property
    def hp(self):
        return self.h + self.ph0 + self.ph1

    @property
    def wp(self):
        return self.w + self.pw0 + self.pw1

    @property
    def padded(self):
        return self.ph0 or self.ph1 or self.pw0 or self.pw1

    @property
    def x_shape(self):
        return (self.n, self.c, self.h, self.w)

    @property
    def w_shape(self):
        return (self.k, self.cg, self.r, self.s)

    @property
    def y_shape(self):
        return (self.n, self.k, self.oh, self.ow)

    @property
    def macs(self):
        """Multiply-accumulates of the forward pass (each gradient costs the same)."""
        return self.n * self.k * self.oh * self.ow * self.cg * self.r * self.s

    @property
    def itemsize(self):
        return self.dtype.itemsize


def _conv_padding(fn, padding, ks, stride, dilation):
    if isinstance(padding, str):
        if padding == "valid":
            return (0, 0), (0, 0)
        if padding == "same":
            if stride != (1, 1):
                raise ValueError(f"{fn}: padding='same' requires stride 1, got stride={stride}")
            pads = []
            for k, d in zip(ks, dilation):
                total = d * (k - 1)
                pads.append((total // 2, total - total // 2))  # extra row/column at the end, as PyTorch
            return pads[0], pads[1]
        raise ValueError(f"{fn}: padding must be an int, a pair, 'same' or 'valid', got {padding!r}")
    ph, pw = nonnegative_pair(fn, "padding", padding)
    return (ph, ph), (pw, pw)


_PARAMS_CACHE: dict = {}


def _typed(v):
    """A hashable key for an argument that tells ``1``, ``True`` and ``1.0`` apart."""
    if isinstance(v, tuple):
        return tuple(_typed(e) for e in v)
    return type(v), v


def conv_params(fn, x_shape, w_shape, dtype, stride, padding, dilation, groups, workspace_limit=None):
    """Validate the geometry of a convolution and return its :class:`ConvParams`.

    Valid geometries are remembered (a layer calls with the same arguments every step), so repeated
    calls skip the checks; invalid ones always raise afresh.
    """
    try:
        key = (tuple(x_shape), tuple(w_shape), np.dtype(dtype), _typed(stride), _typed(padding),
               _typed(dilation), _typed(groups), _typed(workspace_limit),
               resolve_workspace_limit(fn, None) if workspace_limit is None else None)
        p = _PARAMS_CACHE.get(key)
    except TypeError:  # unhashable argument (a list): validate without the cache
        key, p = None, None
    if p is None:
        p = _conv_params(fn, x_shape, w_shape, dtype, stride, padding, dilation, groups, workspace_limit)
        if key is not None:
            if len(_PARAMS_CACHE) > 4096:
                _PARAMS_CACHE.clear()
            _PARAMS_CACHE[key] = p
    return p


def _conv_params(fn, x_shape, w_shape, dtype, stride, padding, dilation, groups, workspace_limit):
    n, c, h, w = x_shape
    k, cg, r, s = w_shape
    if min(w_shape) < 1:
        raise ValueError(f"{fn}: weight must have positive dimensions (K, C/groups, R, S), got {tuple(w_shape)}")
    if min(c, h, w) < 1:
        raise ValueError(f"{fn}: input must have positive C, H and W, got shape {tuple(x_shape)}")
    if isinstance(groups, (bool, np.bool_)) or not isinstance(groups, (int, np.integer)):
        raise TypeError(f"{fn}: groups must be an int, got {groups!r}")
    groups = int(groups)
    if groups < 1:
        raise ValueError(f"{fn}: groups must be positive, got {groups}")
    st = positive_pair(fn, "stride", stride)
    dl = positive_pair(fn, "dilation", dilation)
    if c != cg * groups:
        raise ValueError(
            f"{fn}: input channels must equal weight.shape[1] * groups ({cg} * {groups} = {cg * groups}), "
            f"got {c} (input shape {tuple(x_shape)}, weight shape {tuple(w_shape)})"
        )
    if k % groups:
        raise ValueError(f"{fn}: weight.shape[0] (out channels) must be divisible by groups={groups}, got {k}")
    (ph0, ph1), (pw0, pw1) = _conv_padding(fn, padding, (r, s), st, dl)
    oh = conv_out_size(h, ph0 + ph1, r, st[0], dl[0])
    ow = conv_out_size(w, pw0 + pw1, s, st[1], dl[1])
    if oh < 1 or ow < 1:
        raise ValueError(
            f"{fn}: dilated kernel must fit in the padded input: kernel "
            f"({dl[0] * (r - 1) + 1} x {dl[1] * (s - 1) + 1}) after dilation {dl}, padded input "
            f"({h + ph0 + ph1} x {w + pw0 + pw1}), got input {h}x{w}, kernel {r}x{s}, padding {padding!r}"
        )
    # A stride beyond the padded input (one output position) or a dilation of a 1-wide kernel has
    # no effect: clamped, so that no algorithm sizes a buffer by it (a phase split by a stride of
    # 10**6 allocated 10**6 columns per row).  The output-size formula still holds for the clamped
    # values (algorithms rely on it: stride 1, no padding and a 1x1 kernel mean oh == h).
    st = (min(st[0], h + ph0 + ph1), min(st[1], w + pw0 + pw1))
    dl = (1 if r == 1 else dl[0], 1 if s == 1 else dl[1])
    p = ConvParams(n, c, h, w, k, r, s, st[0], st[1], ph0, ph1, pw0, pw1, dl[0], dl[1], groups, oh, ow,
                   np.dtype(dtype), resolve_workspace_limit(fn, workspace_limit))
    isz = p.itemsize
    # a copy of the weight and int64 tables of its taps (about 64 bytes per tap at their peak)
    check_memory(fn, f"output of shape {p.y_shape} plus a padded copy of the input and of the weight",
                 isz * (n * k * oh * ow + n * c * p.hp * p.wp + k * cg * r * s) + 64 * cg * r * s)
    return p


def check_conv2d(fn, x, weight, bias, stride, padding, dilation, groups, workspace_limit=None):
    """Validate a forward call; returns ``(x, weight, bias, params)``."""
    x = as_input(fn, "input", x, 4)
    weight = as_input(fn, "weight", weight, 4, x.dtype)
    if bias is not None:
        bias = as_input(fn, "bias", bias, 1, x.dtype)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"{fn}: bias must have shape ({weight.shape[0]},) (out channels), got {bias.shape}")
    p = conv_params(fn, x.shape, weight.shape, x.dtype, stride, padding, dilation, groups, workspace_limit)
    return x, weight, bias, p


def check_conv2d_backward(fn, grad_output, x, weight, stride, padding, dilation, groups,
                          workspace_limit=None):
    """Validate a backward call; returns ``(grad_output, x, weight, params)``."""
    x = as_input(fn, "input", x, 4)
    weight = as_input(fn, "weight", weight, 4, x.dtype)
    grad_output = as_input(fn, "grad_output", grad_output, 4, x.dtype)
    p = conv_params(fn, x.shape, weight.shape, x.dtype, stride, padding, dilation, groups, workspace_limit)
    if grad_output.shape != p.y_shape:
        raise ValueError(f"{fn}: grad_output must have the output's shape {p.y_shape}, got {grad_output.shape}")
    return grad_output, x, weight, p


# --------------------------------------------------------------------------- pooling
@dataclass(frozen=True)
class PoolParams:
    """Frozen geometry of one pooling (kh kw window, sh sw stride, ph pw padding, dh dw dilation)."""

    n: int
    c: int
    h: int
    w: int
    kh: int
    kw: int
    sh: int
    sw: int
    ph: int
    pw: int
    dh: int
    dw: int
    oh: int
    ow: int

    @property
    def y_shape(self):
        return (self.n, self.c, self.oh, self.ow)


def pool_params(fn, x_shape, kernel_size, stride, padding, dilation, ceil_mode):
    n, c, h, w = x_shape
    if min(c, h, w) < 1:
        raise ValueError(f"{fn}: input must have positive C, H and W, got shape {tuple(x_shape)}")
    kh, kw = positive_pair(fn, "kernel_size", kernel_size)
    if stride is None or (isinstance(stride, (tuple, list)) and len(stride) == 0):
        sh, sw = kh, kw  # PyTorch: no stride (None or []) means stride = kernel_size
    else:
        sh, sw = positive_pair(fn, "stride", stride)
    ph, pw = nonnegative_pair(fn, "padding", padding)
    dh, dw = positive_pair(fn, "dilation", dilation)
    ceil_mode = _bool(fn, "ceil_mode", ceil_mode)
    if 2 * ph > kh or 2 * pw > kw:
        raise ValueError(
            f"{fn}: padding must be at most half of kernel_size ({kh}, {kw}), got ({ph}, {pw})"
        )
    oh = pool_out_size(h, ph, kh, sh, dh, ceil_mode)
    ow = pool_out_size(w, pw, kw, sw, dw, ceil_mode)
    if oh < 1 or ow < 1:
        raise ValueError(
            f"{fn}: output size must be positive: input {h}x{w} with kernel_size ({kh}, {kw}), "
            f"stride ({sh}, {sw}), padding ({ph}, {pw}), dilation ({dh}, {dw}) gives {oh}x{ow}"
        )
    check_memory(fn, f"output of shape {(n, c, oh, ow)}", 16 * n * c * oh * ow)
    # as for convolution: a stride or dilation that cannot matter is clamped (the sizes still hold)
    sh, sw = min(sh, h + 2 * ph + dh * (kh - 1) + 2), min(sw, w + 2 * pw + dw * (kw - 1) + 2)
    dh, dw = (1 if kh == 1 else dh), (1 if kw == 1 else dw)
    return PoolParams(n, c, h, w, kh, kw, sh, sw, ph, pw, dh, dw, oh, ow)


def check_grad_like(fn, grad_output, shape, dtype=None):
    grad_output = as_input(fn, "grad_output", grad_output, 4, dtype)
    if grad_output.shape != tuple(shape):
        raise ValueError(f"{fn}: grad_output must have the output's shape {tuple(shape)}, got {grad_output.shape}")
    return grad_output


def check_indices(fn, indices, shape):
    if not isinstance(indices, np.ndarray):
        raise TypeError(f"{fn}: indices must be a numpy.ndarray, got {type(indices).__name__}")
    if indices.dtype.kind not in "iu" or indices.dtype == np.bool_:
        raise TypeError(f"{fn}: indices must have an integer dtype, got {indices.dtype}")
    if indices.shape != tuple(shape):
        raise ValueError(f"{fn}: indices must have grad_output's shape {tuple(shape)}, got {indices.shape}")
    return indices if indices.flags.writeable or not _dense(indices) else indices.copy(order="K")  # as as_input


# --------------------------------------------------------------------------- new ops (issue 21)
def unbatched(fn, name, a, ndim):
    """Accept ``a`` with ``ndim`` dims or one fewer (an unbatched sample, as torch.nn.functional);
    returns ``(a with ndim dims, squeeze)`` where ``squeeze`` says to drop the batch axis again."""
    if isinstance(a, np.ndarray) and a.ndim == ndim - 1:
        return as_input(fn, name, a, ndim - 1)[None], True
    if isinstance(a, np.ndarray) and a.ndim != ndim:
        raise ValueError(f"{fn}: {name} must be {ndim - 1}-D (unbatched) or {ndim}-D (batched), got "
                         f"{a.ndim}-D array of shape {a.shape}")
    return as_input(fn, name, a, ndim), False


def squeezed(a, squeeze):
    """Undo :func:`unbatched`: drop the batch axis again when ``squeeze``."""
    return a[0] if squeeze else a


def any_float_array(fn, name, a, dtype=None):
    """A float32/float64 ndarray of any number of dimensions (element-wise ops)."""
    return as_float_array(fn, name, a, a.ndim if isinstance(a, np.ndarray) else 0, dtype)


def single(fn, name, v, positive=True):
    """A 1-D argument: an int or a one-element tuple (as PyTorch's conv1d)."""
    if isinstance(v, (tuple, list)):
        if len(v) != 1:
            raise ValueError(f"{fn}: {name} must be an int or a one-element tuple, got {v!r}")
        v = v[0]
    v = _int(fn, name, v, "an int or a one-element tuple")
    if v < (1 if positive else 0):
        raise ValueError(f"{fn}: {name} must be {'positive' if positive else 'non-negative'}, got {v}")
    return v


def real(fn, name, v, lo=None, hi=None):
    """A finite real number (bools refused) within ``[lo, hi]`` when given."""
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, float, np.integer, np.floating)):
        raise TypeError(f"{fn}: {name} must be a real number, got {v!r}")
    v = float(v)
    if not np.isfinite(v) or (lo is not None and v < lo) or (hi is not None and v > hi):
        rule = "finite" if lo is None and hi is None else f"in [{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise ValueError(f"{fn}: {name} must be {rule}, got {v!r}")
    return v


def check_out(fn, out, shape, dtype):
    """A user's ``out=`` array: a writeable C-contiguous ndarray of the result's shape and dtype."""
    if out is None:
        return None
    if not isinstance(out, np.ndarray):
        raise TypeError(f"{fn}: out must be a numpy.ndarray, got {type(out).__name__}")
    if out.dtype != dtype:
        raise TypeError(f"{fn}: out must have the result's dtype {dtype}, got {out.dtype}")
    if out.shape != tuple(shape):
        raise ValueError(f"{fn}: out must have the result's shape {tuple(shape)}, got {out.shape}")
    if not out.flags.c_contiguous or not out.flags.writeable:
        raise ValueError(f"{fn}: out must be C-contiguous and writeable, got strides {out.strides}"
                         f"{'' if out.flags.writeable else ' (read-only)'}")
    return out


def result_out(fn, out, shape, squeeze, dtype, inputs):
    """``out=`` of an op whose batched result has ``shape`` (without its batch axis when ``squeeze``):
    :func:`check_out` and :func:`check_no_overlap` against ``inputs``; None when not given."""
    out = check_out(fn, out, shape[1:] if squeeze else shape, dtype)
    check_no_overlap(fn, out, inputs)
    return out


def into_out(y, out, squeeze):
    """The op's result ``y`` (batched, any layout): copied into ``out`` and ``out`` returned when one
    was given (:func:`result_out`), else ``y`` without its batch axis when ``squeeze``."""
    if out is None:
        return squeezed(y, squeeze)
    np.copyto(out.reshape(y.shape), y)
    return out


def check_elementwise_out(fn, out, x):
    """``out=`` of an element-wise op on ``x``: :func:`check_out`, and either ``x`` itself (in place:
    element i is read before it is written) or no memory shared with a C-contiguous ``x`` -- a
    partly overlapping ``out`` would overwrite elements not yet read.  (A non-contiguous ``x`` is
    copied before the kernel runs, so any ``out`` is safe then.)"""
    out = check_out(fn, out, x.shape, x.dtype)
    if (out is not None and x.flags.c_contiguous and np.may_share_memory(out, x)
            and out.ctypes.data != x.ctypes.data):
        raise ValueError(f"{fn}: out must be the input itself or not overlap it (the kernel reads the input "
                         f"while writing out), got an array partly overlapping it")
    return out


def check_no_overlap(fn, out, inputs):
    """``out`` shares no memory with any of the ``(name, array)`` pairs in ``inputs`` (None skipped).

    ``np.may_share_memory`` compares address ranges only (constant time), so two interleaved views
    that touch no common element are refused too; an exact answer can cost exponential time.
    """
    if out is None:
        return
    for name, a in inputs:
        if a is not None and np.may_share_memory(out, a):
            raise ValueError(f"{fn}: out must not overlap the {name} (the kernels read it while writing out), "
                             f"got an array sharing memory with it")


def same_shape(fn, name, a, shape):
    if a.shape != tuple(shape):
        raise ValueError(f"{fn}: {name} must have the input's shape {tuple(shape)}, got {a.shape}")
    return a


def transpose_params(fn, x_shape, w_shape, dtype, stride, padding, output_padding, dilation, groups,
                     workspace_limit=None):
    """Geometry of a transposed convolution as the :class:`ConvParams` of the convolution whose
    grad_input it is (that convolution's input is the transposed one's output).  Returns
    ``(params, (eh, ew))``: ``params.oh = h + eh`` -- the extra rows/columns (``output_padding``
    of a stride or more, possible when it is below the dilation instead) get zero input."""
    n, cin, h, w = x_shape
    if isinstance(groups, (bool, np.bool_)) or not isinstance(groups, (int, np.integer)):
        raise TypeError(f"{fn}: groups must be an int, got {groups!r}")
    if groups < 1:
        raise ValueError(f"{fn}: groups must be positive, got {groups}")
    if min(w_shape) < 1:
        raise ValueError(f"{fn}: weight must have positive dimensions (C_in, C_out/groups, R, S), got {tuple(w_shape)}")
    if min(cin, h, w) < 1:
        raise ValueError(f"{fn}: input must have positive C, H and W, got shape {tuple(x_shape)}")
    if w_shape[0] != cin:
        raise ValueError(f"{fn}: weight.shape[0] must equal the input channels {cin}, got weight shape "
                         f"{tuple(w_shape)}")
    if cin % groups:
        raise ValueError(f"{fn}: input channels must be divisible by groups={groups}, got {cin}")
    if isinstance(padding, str):
        raise ValueError(f"{fn}: padding must be an int or a pair of ints, got {padding!r}")
    st = positive_pair(fn, "stride", stride)
    pd = nonnegative_pair(fn, "padding", padding)
    op = nonnegative_pair(fn, "output_padding", output_padding)
    dl = positive_pair(fn, "dilation", dilation)
    if op[0] >= max(st[0], dl[0]) or op[1] >= max(st[1], dl[1]):
        raise ValueError(f"{fn}: output_padding must be smaller than stride or dilation (stride {st}, "
                         f"dilation {dl}), got {op}")
    r, s = w_shape[2], w_shape[3]
    oh = (h - 1) * st[0] - 2 * pd[0] + dl[0] * (r - 1) + op[0] + 1
    ow = (w - 1) * st[1] - 2 * pd[1] + dl[1] * (s - 1) + op[1] + 1
    if oh < 1 or ow < 1:
        raise ValueError(f"{fn}: output size must be positive: input {h}x{w}, kernel {r}x{s}, stride {st}, "
                         f"padding {pd}, output_padding {op}, dilation {dl} give {oh}x{ow}")
    p = conv_params(fn, (n, w_shape[1] * groups, oh, ow), tuple(w_shape), dtype, st, pd, dl, int(groups),
                    workspace_limit)
    return p, (p.oh - h, p.ow - w)


def adaptive_size(fn, output_size, h, w):
    """PyTorch's ``output_size``: an int, or a pair whose ``None`` entries keep the input size."""
    if isinstance(output_size, (tuple, list)) and len(output_size) == 2:
        v = tuple(d if o is None else o for o, d in zip(output_size, (h, w)))
    else:
        v = output_size
    oh, ow = positive_pair(fn, "output_size", v)
    return oh, ow


def generator(fn, rng):
    """``rng=`` as a numpy Generator: None (fresh entropy), an int seed or a Generator."""
    if rng is None or (isinstance(rng, (int, np.integer)) and not isinstance(rng, (bool, np.bool_))):
        if rng is not None and rng < 0:
            raise ValueError(f"{fn}: rng seed must be non-negative, got {rng}")
        return np.random.default_rng(rng)
    if isinstance(rng, np.random.Generator):
        return rng
    raise TypeError(f"{fn}: rng must be None, an int seed or a numpy.random.Generator, got {type(rng).__name__}")


def divisor(fn, v):
    """``divisor_override``: None (0 to the kernels) or a nonzero int, as PyTorch."""
    if v is None:
        return 0
    v = _int(fn, "divisor_override", v, "None or an int")
    if v == 0:
        raise ValueError(f"{fn}: divisor_override must be nonzero, got 0")
    return v
