"""Stateless public operations: validate, choose an algorithm, allocate, call a kernel.

Semantics follow ``torch.nn.functional``: NCHW arrays, weights ``(K, C/groups, R, S)``, int-or-pair
arguments, float32 or float64 (the output has the input's dtype).  Inputs are never modified, and
non-contiguous or read-only arrays are accepted.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from . import _validation as V
from ._algorithms import elementwise as _ew
from ._algorithms import implicit as _implicit
from ._algorithms import nhwc as _nhwc
from ._algorithms import norm as _norm
from ._algorithms import pooling
from ._algorithms import winograd_nhwc as _winograd_nhwc
from ._algorithms.common import bias_grad
from ._config import reports_memory
from ._select import select
from ._threads import apply as apply_threads
from ._results import Conv2dGrads
# the layer ops of issue 21 live in their own module; re-exported so fastconv.functional.X is unchanged
from ._nn_functional import (  # noqa: F401
    BatchNormGrads,
    adaptive_avg_pool2d,
    adaptive_avg_pool2d_backward,
    batch_norm,
    batch_norm_backward,
    conv1d,
    conv1d_backward,
    conv_transpose2d,
    conv_transpose2d_backward,
    dropout,
    dropout_backward,
    leaky_relu,
    leaky_relu_backward,
    relu6,
    relu6_backward,
)


@reports_memory
def conv2d(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, *, algorithm="auto",
           workspace_limit=None, out=None):
    """2-D convolution (cross-correlation, as in deep learning) of a batch of images.

    ``y[n, k, i, j] = b[k] + sum_{c, r, s} x_pad[n, g*C/groups + c, i*sh + r*dh, j*sw + s*dw] * w[k, c, r, s]``
    where ``g = k // (K/groups)`` is the group of output channel ``k``.

    Parameters
    ----------
    x : ndarray, shape (N, C, H, W) or unbatched (C, H, W), float32 or float64
        Any strides; with channels_last memory (``x.transpose(0, 2, 3, 1)`` C-contiguous, as
        PyTorch's channels_last tensors) the result comes back in that layout too, computed natively
        where the GEMM or depthwise passes serve it (README "channels_last arrays").
    weight : ndarray, shape (K, C/groups, R, S), same dtype as ``x``
    bias : ndarray, shape (K,), optional
    stride, dilation : int or (int, int), positive
    padding : int, (int, int), 'same' or 'valid'
        Zeros added on both sides.  ``'same'`` (stride 1 only) keeps ``H x W``, padding
        ``dilation*(R-1)`` in total with the extra row/column at the bottom/right, as PyTorch.
    groups : int
        ``C`` and ``K`` must be divisible by it; ``groups == C`` is a depthwise convolution.
    algorithm : str
        ``'auto'`` (cheapest eligible by the cost model) or a name from :func:`fastconv.algorithms`.
    workspace_limit : int, optional
        Scratch-memory budget of this call in bytes (default: :func:`fastconv.get_workspace_limit`).
    out : ndarray, optional
        Array to hold the result: the result's shape and dtype, C-contiguous, writeable, sharing no
        memory with ``x``, ``weight`` or ``bias``.  It is returned.

    Returns
    -------
    y : ndarray, shape (N, K, OH, OW), or (K, OH, OW) for an unbatched input
        ``OH = floor((H + 2*ph - dh*(R-1) - 1) / sh) + 1`` and likewise ``OW``.

    Raises
    ------
    TypeError
        Non-ndarray or non-float inputs, mixed dtypes, non-int arguments, an ``out`` of another dtype.
    ValueError
        Bad shapes, channel/group mismatch, non-positive stride or dilation, negative padding, a
        kernel larger than the padded input, an unknown algorithm or one that cannot serve the case,
        an ``out`` of the wrong shape, not C-contiguous, read-only or overlapping an input.

    Notes
    -----
    The algorithms allocate their own result today, so ``out=`` copies it in (one write of the
    output): it keeps a caller's buffer, not the allocation.

    Examples
    --------
    >>> import numpy as np, fastconv
    >>> x = np.arange(16, dtype=np.float32).reshape(1, 1, 4, 4)
    >>> w = np.ones((1, 1, 3, 3), dtype=np.float32)
    >>> fastconv.conv2d(x, w)[0, 0]
    array([[45., 54.],
           [81., 90.]], dtype=float32)
    >>> fastconv.conv2d(x, w, padding="same").shape
    (1, 1, 4, 4)
    >>> y = np.empty((1, 2, 2), np.float32)                     # unbatched (C, H, W), into out=
    >>> fastconv.conv2d(x[0], w, out=y) is y, y[0, 0]
    (True, array([45., 54.], dtype=float32))
    """
    fn = "conv2d"
    x, squeeze = V.unbatched(fn, "input", x, 4)  # (C, H, W) convolves as one image, as PyTorch
    x, weight, bias, p = V.check_conv2d(fn, x, weight, bias, stride, padding, dilation, groups,
                                          workspace_limit)
    out = V.result_out(fn, out, p.y_shape, squeeze, p.dtype, (("input", x), ("weight", weight), ("bias", bias)))
    threads = apply_threads(p.macs)  # first: 'auto' chooses for the thread count the call runs with
    x, p = _pointwise(x, p)
    alg = select(fn, algorithm, p, "forward", threads)
    if p.n == 0:
        y = np.zeros(p.y_shape, dtype=p.dtype)
    elif _nhwc.is_channels_last(x):  # channels_last in, channels_last out, as PyTorch
        if _depthwise(p, alg, algorithm, weight):
            y = _nhwc.dw_forward(_nhwc.to_nhwc(x), weight, bias, p)
        elif _native(p, alg, algorithm, "forward"):
            y = _nhwc.forward(_nhwc.to_nhwc(x), weight, bias, p)
        elif (yh := _batch_wide(alg, "forward", _nhwc.to_nhwc(x), weight, bias, p)) is not None:
            y = yh
        else:
            y = _nhwc.to_nhwc(alg.forward(_nhwc.to_nchw(x), weight, bias, p))
        y = _nhwc.channels_last_view(y)
    elif _dw_via_nhwc(p, algorithm, weight):
        y = _as_nchw(_nhwc.dw_forward(_nhwc.to_nhwc(x), weight, bias, p))
    elif _via_nhwc(p, alg, algorithm, "forward"):
        y = _as_nchw(_nhwc.forward(_nhwc.to_nhwc(x), weight, bias, p))
    else:
        y = alg.forward(x, weight, bias, p)
    return V.into_out(y, out, squeeze)


@reports_memory
def conv2d_backward(grad_output, x, weight, stride=1, padding=0, dilation=1, groups=1, *, algorithm="auto",
                    workspace_limit=None, bias=True):
    """Gradients of :func:`conv2d` with respect to input, weight and bias.

    ``grad_input`` is the transposed convolution of ``grad_output`` with the weight -- the
    correlation of the stride-dilated ``grad_output`` with the flipped, channel-swapped kernel
    (``W.T @ g`` for the convolution's matrix ``W``); ``grad_weight`` correlates ``grad_output``
    with the input; ``grad_bias = grad_output.sum(axis=(0, 2, 3))``.

    Parameters
    ----------
    grad_output : ndarray, shape (N, K, OH, OW), or (K, OH, OW) with an unbatched ``x``
        Gradient of the loss with respect to the output of ``conv2d(x, weight, ...)``.
    x, weight, stride, padding, dilation, groups
        As given to :func:`conv2d`.
    algorithm : str
        ``'auto'`` chooses for each pass (grad_input, grad_weight) separately; a name is used for
        both and raises if it cannot serve either.
    workspace_limit : int, optional
        Scratch-memory budget of this call in bytes (default: :func:`fastconv.get_workspace_limit`).
    bias : bool
        Whether to compute ``grad_bias`` (default); ``False`` (a layer without bias) skips its pass
        over ``grad_output`` and returns None in its place.

    Returns
    -------
    Conv2dGrads
        ``(grad_input (N, C, H, W), grad_weight (K, C/groups, R, S), grad_bias (K,))``; ``grad_input``
        is (C, H, W) for an unbatched ``x``, and channels_last when ``x`` is.

    Examples
    --------
    >>> import numpy as np, fastconv
    >>> x = np.ones((1, 1, 3, 3)); w = np.ones((1, 1, 2, 2))
    >>> g = fastconv.conv2d_backward(np.ones((1, 1, 2, 2)), x, w)
    >>> g.grad_input[0, 0]
    array([[1., 2., 1.],
           [2., 4., 2.],
           [1., 2., 1.]])
    >>> g.grad_weight[0, 0], g.grad_bias
    (array([[4., 4.],
           [4., 4.]]), array([4.]))
    """
    fn = "conv2d_backward"
    bias = V._bool(fn, "bias", bias)
    grad_output, x, squeeze = _unbatched_pair(fn, grad_output, x)
    grad_output, x, weight, p = V.check_conv2d_backward(fn, grad_output, x, weight, stride, padding,
                                                        dilation, groups, workspace_limit)
    threads = apply_threads(2 * p.macs)  # first: 'auto' chooses for the thread count the call runs with
    full = p
    x, p = _pointwise(x, p)
    alg_i = select(fn, algorithm, p, "grad_input", threads)
    alg_w = select(fn, algorithm, p, "grad_weight", threads)
    if p.n == 0:
        return Conv2dGrads(np.zeros(full.x_shape, p.dtype), np.zeros(p.w_shape, p.dtype),
                           np.zeros(p.k, p.dtype) if bias else None)
    if _nhwc.is_channels_last(x):
        gx, gw, gb = _backward_channels_last(grad_output, x, weight, p, alg_i, alg_w, algorithm, bias)
    else:
        grad_output = _nhwc.to_nchw(grad_output)  # a channels_last gradient of an NCHW input
        dw = _dw_via_nhwc(p, algorithm, weight)
        via_i, via_w = _via_nhwc(p, alg_i, algorithm, "grad_input"), _via_nhwc(p, alg_w, algorithm, "grad_weight")
        gyh = _nhwc.to_nhwc(grad_output) if dw or via_i or via_w else None
        if dw:
            gx = _as_nchw(_nhwc.dw_grad_input(gyh, weight, p))
            gw = _nhwc.dw_grad_weight(gyh, _nhwc.to_nhwc(x), p)
        elif via_i or via_w:
            gx = _as_nchw(_nhwc.grad_input(gyh, weight, p)) if via_i else alg_i.grad_input(grad_output, weight, p)
            gw = _nhwc.grad_weight(gyh, _nhwc.to_nhwc(x), p) if via_w else alg_w.grad_weight(grad_output, x, p)
        elif alg_i is alg_w and alg_i.backward is not None:  # one call shares work between the passes
            gx, gw = alg_i.backward(grad_output, x, weight, p)
        else:
            gx = alg_i.grad_input(grad_output, weight, p)
            gw = alg_w.grad_weight(grad_output, x, p)
        gb = bias_grad(grad_output) if bias else None
    if p is not full:  # the reduced 1x1 layer's input gradient lands on every stride-th position
        gx = _spread(gx, full)
    return Conv2dGrads(V.squeezed(gx, squeeze), gw, gb)


def _pointwise(x, p):
    """A strided 1x1 layer without padding reads every ``sh``-th row and ``sw``-th column only: in
    NCHW it runs as the stride-1 layer on those, copied once.  Returns ``(x, p)`` reduced, or as
    given.  2 threads, float32, stride 2, forward / forward + backward ms: 32x16x28x28 -> 32 0.64 ->
    0.33 / 1.47 -> 0.99, 32x128x16x16 -> 256 4.31 -> 2.20 / 9.74 -> 4.79.  channels_last inputs
    keep the NHWC kernels' strided 1x1 GEMM (the copy made them slower: 1.77 -> 2.97 forward for
    32x64x32x32 -> 128)."""
    if p.r != 1 or p.s != 1 or (p.sh == 1 and p.sw == 1) or p.padded or _nhwc.is_channels_last(x):
        return x, p
    xs = np.ascontiguousarray(x[:, :, :(p.oh - 1) * p.sh + 1:p.sh, :(p.ow - 1) * p.sw + 1:p.sw])
    return xs, dataclasses.replace(p, h=p.oh, w=p.ow, sh=1, sw=1, dh=1, dw=1)


def _spread(gx, p):
    """The input gradient of the strided 1x1 layer ``p`` from the reduced layer's ``gx``: zeros
    between the read positions."""
    out = np.zeros(p.x_shape, p.dtype)
    out[:, :, :(p.oh - 1) * p.sh + 1:p.sh, :(p.ow - 1) * p.sw + 1:p.sw] = gx
    return out


#: The algorithms whose work the channels_last GEMM passes (:mod:`._algorithms.nhwc`) do natively.
_GEMM_FAMILY = ("gemm", "im2col")


def _native(p, alg, algorithm, pass_):
    """Whether a channels_last call runs this pass on the NHWC kernels (no layout conversion): with
    ``algorithm='gemm'`` whenever they can serve it; under ``'auto'`` when it chose ``gemm`` or
    ``im2col`` (any algorithm for a 1x1 layer, a plain GEMM in NHWC) and the NHWC pass measured
    faster than converting (:func:`._algorithms.nhwc.preferred`), or when it chose ``gemm`` where
    that runs the pass on the NHWC kernels anyway (small planes: ``implicit.via_channels_last``),
    or, under ``'auto'``, where the NHWC pass measured faster than converting for any algorithm
    (:func:`._algorithms.nhwc.native_beats_converting`) or the layer is one matrix product there
    (``nhwc.pointwise``: 1x1, stride 1, unpadded, one group), and a grad_weight of few channels on
    small planes even where it chose Winograd (``nhwc.taps_beat_winograd``).  Other algorithms
    compute in NCHW, converted both ways."""
    auto_native = algorithm == "auto" and ((not _winograd_in_place(alg, p) and (
        (alg.name == "gemm" and _implicit.via_channels_last(p, pass_)) or _nhwc.native_beats_converting(p, pass_)
        or _nhwc.pointwise(p))) or (pass_ == "grad_weight" and _nhwc.taps_beat_winograd(p)))
    if algorithm != "gemm" and not auto_native and not (
            algorithm == "auto" and (alg.name in _GEMM_FAMILY or p.r * p.s == 1) and _nhwc.preferred(p, pass_)):
        return False
    return _nhwc.supports(p, pass_) is None


def _winograd_in_place(alg, p):
    """Whether ``alg`` is Winograd on an undilated layer, where its NHWC kernels (fused or batch-wide)
    beat the NHWC GEMM passes that the rules below prefer to the other algorithms (4x64x32x32
    forward 0.78 ms fused, 1.09 on the NHWC GEMM; 4x32x64x64 grad_weight 0.8-1.0 fused, 1.6 on the
    GEMM).  Dilated layers have no NHWC Winograd: the rules keep them."""
    return alg.name == "winograd" and (p.dh, p.dw) == (1, 1)


def _via_nhwc(p, alg, algorithm, pass_):
    """Whether an NCHW call under ``'auto'`` runs this pass on the NHWC kernels, its operands
    converted (:func:`._algorithms.nhwc.native_beats_converting` with ``nchw``, or the gradients
    of a 1x1 layer on small planes: :data:`POINTWISE_NCHW_PLANE`), where ``alg`` (the pass's choice) is not Winograd
    -- dilated layers included, which have no NHWC Winograd: converted to the NHWC GEMM, their
    grad_weight lost to Winograd on the phase sub-images (2 threads, AVX-512 Xeon, ms converted /
    kept: 8x64x64x64 -> 64 3x3 dilation 2 14.8 / 9.4, 8x128x32x32 -> 128 14.3 / 8.7, dilation 3
    15.3 / 11.2).  A channels_last call (:func:`_native`) keeps its NHWC route: there Winograd's
    two conversions cost more (4x32x128x128 -> 32 5.7 / 9.3)."""
    if not (algorithm == "auto" and alg.name != "winograd"
            and (_nhwc.native_beats_converting(p, pass_, nchw=True) or _small_pointwise(p, pass_))
            and _nhwc.supports(p, pass_) is None):
        return False
    return _nhwc.need(p, pass_) + _nhwc_copies(p) <= p.workspace_limit


#: Output positions per image up to which the gradients of an NCHW 1x1 layer convert to run as one
#: product in NHWC (``nhwc.pointwise``): 2 threads, ms backward, NCHW 'auto' -> converted, two runs:
#: 16x512x3x3 -> 512 2.33, 1.63 -> 1.00, 0.91; 16x256x3x3 -> 512 1.22, 0.85 -> 0.68, 0.62; at 6x6
#: even (16x256x6x6 -> 256 1.19, 0.78 -> 1.06, 0.97) and the forward even or behind (16x128x6x6 ->
#: 256 0.21, 0.19 -> 0.29, 0.29), so it keeps its NCHW pick.
POINTWISE_NCHW_PLANE = 16


def _small_pointwise(p, pass_):
    return pass_ != "forward" and _nhwc.pointwise(p) and p.oh * p.ow <= POINTWISE_NCHW_PLANE


def _dw_via_nhwc(p, algorithm, w):
    """Whether an NCHW depthwise call under ``'auto'`` runs on the NHWC depthwise loops, converted
    both ways (:func:`._algorithms.nhwc.dw_beats_nchw`: small or strided planes)."""
    return (algorithm == "auto" and _nhwc.dw_beats_nchw(p) and _nhwc_copies(p) <= p.workspace_limit
            and _nhwc.depthwise_serves(p, w))


def _as_nchw(ah):
    """The C-contiguous NCHW copy of a C-contiguous (N, H, W, C) result."""
    return _nhwc.to_nchw(_nhwc.channels_last_view(ah))


def _nhwc_copies(p):
    """Bytes of the NHWC copies of an NCHW call's input and output (or gradients) that
    :func:`_via_nhwc` and :func:`_dw_via_nhwc` count against the workspace budget."""
    return (p.n * p.c * p.h * p.w + p.n * p.k * p.oh * p.ow) * p.itemsize


def _batch_wide(alg, pass_, *args):
    """A channels_last pass on Winograd's batch-wide kernels, which compute in NHWC (no conversion),
    where ``alg`` is Winograd and its plan for the pass is the batch-wide one; else None."""
    if alg.name != "winograd":
        return None
    return getattr(_winograd_nhwc, "native_" + pass_)(*args)


def _depthwise(p, alg, algorithm, w):
    """Whether a channels_last depthwise pass runs on the NHWC depthwise loops (direct loop nests):
    with ``algorithm='direct'`` or ``'auto'`` wherever they serve -- converting to NCHW and back
    costs more than the pass (16x256x12x12 stride 2: grad_input 0.21 ms on the loops, 2.5 ms
    converted to im2col, 'auto's NCHW pick)."""
    return algorithm in ("auto", "direct") and _nhwc.depthwise_serves(p, w)


def _backward_channels_last(gy, x, w, p, alg_i, alg_w, algorithm, bias=True):
    """conv2d_backward of a channels_last ``x``: grad_input in ``x``'s layout, each pass native or on
    NCHW copies (made once, when a pass needs them)."""
    gyh = _nhwc.to_nhwc(gy)
    nchw = {}

    def as_nchw(name, a):
        if name not in nchw:
            nchw[name] = _nhwc.to_nchw(a)
        return nchw[name]

    if _depthwise(p, alg_i, algorithm, w):
        gxh = _nhwc.dw_grad_input(gyh, w, p)
    elif _native(p, alg_i, algorithm, "grad_input"):
        gxh = _nhwc.grad_input(gyh, w, p)
    elif (gh := _batch_wide(alg_i, "grad_input", gyh, w, p)) is not None:
        gxh = gh
    else:
        gxh = _nhwc.to_nhwc(alg_i.grad_input(as_nchw("gy", gy), w, p))
    if _depthwise(p, alg_w, algorithm, w):
        gw = _nhwc.dw_grad_weight(gyh, _nhwc.to_nhwc(x), p)
    elif _native(p, alg_w, algorithm, "grad_weight"):
        gw = _nhwc.grad_weight(gyh, _nhwc.to_nhwc(x), p)
    elif (g := _batch_wide(alg_w, "grad_weight", gyh, _nhwc.to_nhwc(x), p)) is not None:
        gw = g
    else:
        gw = alg_w.grad_weight(as_nchw("gy", gy), as_nchw("x", x), p)
    return _nhwc.channels_last_view(gxh), gw, _nhwc.bias_grad(gyh) if bias else None


def _unbatched_pair(fn, grad_output, x):
    """An unbatched ``x`` (C, H, W) takes an unbatched ``grad_output`` (K, OH, OW): both get a batch axis."""
    x, squeeze = V.unbatched(fn, "input", x, 4)
    if squeeze:
        grad_output = V.as_input(fn, "grad_output", grad_output, 3, x.dtype)[None]
    return grad_output, x, squeeze


@reports_memory
def max_pool2d(x, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False, return_indices=False, *,
               out=None):
    """2-D max pooling.

    Parameters
    ----------
    x : ndarray, shape (N, C, H, W) or unbatched (C, H, W), float32 or float64
    kernel_size : int or (int, int)
    stride : int or (int, int), optional
        Defaults to ``kernel_size``.
    padding : int or (int, int)
        Implicit -inf on both sides; at most half of ``kernel_size``.
    dilation : int or (int, int)
    ceil_mode : bool
        Round the output size up (a last window may start in the input or left padding only).
    return_indices : bool
        Also return the flat position ``ih*W + iw`` of each maximum in its ``H x W`` plane (int64).
    out : ndarray, optional
        Array to hold the pooled values (as :func:`conv2d`'s ``out``: the result's shape and dtype,
        C-contiguous, writeable, sharing no memory with ``x``); it is returned in ``y``'s place.  The
        kernels allocate their own result, so this is a copy into it.

    Returns
    -------
    y : ndarray, shape (N, C, OH, OW)
        ``OH = floor((H + 2*ph - dh*(kh-1) - 1 + (sh-1 if ceil_mode else 0)) / sh) + 1``, reduced by
        one under ``ceil_mode`` when the last window would start at or after ``H + ph``.
    indices : ndarray of int64, same shape (only with ``return_indices=True``)

    Notes
    -----
    NaN propagates (a NaN in the window is the maximum); of equal maxima the first is indexed.

    Examples
    --------
    >>> import numpy as np, fastconv
    >>> x = np.arange(16.0).reshape(1, 1, 4, 4)
    >>> y, i = fastconv.max_pool2d(x, 2, return_indices=True)
    >>> y[0, 0], i[0, 0]
    (array([[ 5.,  7.],
           [13., 15.]]), array([[ 5,  7],
           [13, 15]]))
    """
    fn = "max_pool2d"
    x, squeeze = V.unbatched(fn, "input", x, 4)  # (C, H, W) pools as one image, as PyTorch
    p = V.pool_params(fn, x.shape, kernel_size, stride, padding, dilation, ceil_mode)
    V.check_copy(fn, "the input", x)
    return_indices = V._bool(fn, "return_indices", return_indices)
    out = V.result_out(fn, out, p.y_shape, squeeze, x.dtype, (("input", x),))
    apply_threads(pooling.max_forward_work(p))
    y, idx = pooling.max_forward(x, p)
    y = V.into_out(y, out, squeeze)
    return (y, V.squeezed(idx, squeeze)) if return_indices else y


@reports_memory
def max_pool2d_backward(grad_output, indices, input_shape):
    """Gradient of :func:`max_pool2d`: each ``grad_output`` element goes to the input position
    its ``indices`` entry names (and sums where windows overlap on one maximum).

    Parameters
    ----------
    grad_output : ndarray, shape (N, C, OH, OW)
    indices : integer ndarray, same shape, from ``max_pool2d(..., return_indices=True)``
    input_shape : tuple (N, C, H, W)

    Returns
    -------
    grad_input : ndarray, shape ``input_shape``, dtype of ``grad_output``

    Raises
    ------
    ValueError
        Mismatched shapes, or an index outside ``[0, H*W)``.

    Examples
    --------
    >>> import numpy as np, fastconv
    >>> x = np.arange(16.0).reshape(1, 1, 4, 4)
    >>> y, i = fastconv.max_pool2d(x, 2, return_indices=True)
    >>> fastconv.max_pool2d_backward(np.ones_like(y), i, x.shape)[0, 0]
    array([[0., 0., 0., 0.],
           [0., 1., 0., 1.],
           [0., 0., 0., 0.],
           [0., 1., 0., 1.]])
    """
    fn = "max_pool2d_backward"
    input_shape = V.shape4(fn, "input_shape", input_shape)
    grad_output = V.as_input(fn, "grad_output", grad_output, 4)
    if grad_output.shape[:2] != input_shape[:2]:
        raise ValueError(f"{fn}: grad_output must have input_shape's N and C {input_shape[:2]}, "
                         f"got shape {grad_output.shape}")
    indices = V.check_indices(fn, indices, grad_output.shape)
    V.check_copy(fn, "grad_output", grad_output)
    V.check_copy(fn, "indices", indices)
    V.check_memory(fn, f"grad_input of shape {input_shape}", grad_output.itemsize * int(np.prod(input_shape)))
    apply_threads(grad_output.size)
    gx, ok = pooling.max_backward(grad_output, indices, input_shape)
    if not ok:
        hw = input_shape[2] * input_shape[3]
        raise ValueError(f"{fn}: indices must lie in [0, H*W) = [0, {hw}), got values from "
                         f"{int(indices.min())} to {int(indices.max())}")
    return gx


@reports_memory
def avg_pool2d(x, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True,
               divisor_override=None, *, out=None):
    """2-D average pooling.

    Parameters
    ----------
    x : ndarray, shape (N, C, H, W), float32 or float64
    kernel_size, stride, padding, ceil_mode
        As :func:`max_pool2d` (no dilation); padding is zeros.
    count_include_pad : bool
        Divide by the window size clipped to the padded input (True) or by the number of real input
        elements in the window (False).
    divisor_override : int, optional
        Divide every window's sum by this nonzero int instead.
    out : ndarray, optional
        As :func:`max_pool2d`'s ``out``.

    Returns
    -------
    y : ndarray, shape (N, C, OH, OW)
        ``OH`` as :func:`max_pool2d` with dilation 1.

    Examples
    --------
    >>> import numpy as np, fastconv
    >>> x = np.arange(16.0).reshape(1, 1, 4, 4)
    >>> fastconv.avg_pool2d(x, 2)[0, 0]
    array([[ 2.5,  4.5],
           [10.5, 12.5]])
    >>> fastconv.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)[0, 0, 0]
    array([2.5, 3. , 4. , 4.5])
    """
    fn = "avg_pool2d"
    x, squeeze = V.unbatched(fn, "input", x, 4)  # (C, H, W) pools as one image, as PyTorch
    p = V.pool_params(fn, x.shape, kernel_size, stride, padding, 1, ceil_mode)
    V.check_copy(fn, "the input", x)
    include = V._bool(fn, "count_include_pad", count_include_pad)
    divisor = V.divisor(fn, divisor_override)
    out = V.result_out(fn, out, p.y_shape, squeeze, x.dtype, (("input", x),))
    apply_threads(x.size)
    return V.into_out(pooling.avg_forward(x, p, include, divisor), out, squeeze)


@reports_memory
def avg_pool2d_backward(grad_output, input_shape, kernel_size, stride=None, padding=0, ceil_mode=False,
                        count_include_pad=True, divisor_override=None):
    """Gradient of :func:`avg_pool2d`: each ``grad_output`` element spread evenly (by the same
    divisor as the forward pass) over the input elements of its window.

    Examples
    --------
    >>> import numpy as np, fastconv
    >>> fastconv.avg_pool2d_backward(np.ones((1, 1, 1, 1)), (1, 1, 2, 2), 2)[0, 0]
    array([[0.25, 0.25],
           [0.25, 0.25]])
    """
    fn = "avg_pool2d_backward"
    input_shape = V.shape4(fn, "input_shape", input_shape)
    p = V.pool_params(fn, input_shape, kernel_size, stride, padding, 1, ceil_mode)
    grad_output = V.check_grad_like(fn, grad_output, p.y_shape)
    V.check_memory(fn, f"grad_input of shape {input_shape}", grad_output.itemsize * int(np.prod(input_shape)))
    apply_threads(int(np.prod(input_shape)))
    return pooling.avg_backward(grad_output, p, V._bool(fn, "count_include_pad", count_include_pad),
                                V.divisor(fn, divisor_override))


@reports_memory
def relu(x, *, out=None):
    """Rectified linear unit ``max(x, 0)`` (NaN stays NaN, as PyTorch).

    ``out`` (optional): a C-contiguous writeable array of ``x``'s shape and dtype to hold the result
    and be returned -- ``x`` itself (in place, as ``torch.relu_``) or one sharing no memory with it.
    Without it the result is a new array.

    Examples
    --------
    >>> import numpy as np, fastconv
    >>> fastconv.relu(np.array([-1.0, 0.0, 2.0]))
    array([0., 0., 2.])
    >>> x = np.array([-1.0, 3.0]); fastconv.relu(x, out=x) is x, x
    (True, array([0., 3.]))
    """
    x = V.as_float_array("relu", "input", x, x.ndim if isinstance(x, np.ndarray) else 0)
    y = V.check_elementwise_out("relu", out, x)
    if y is None:
        V.check_memory("relu", f"output of shape {x.shape}", x.nbytes)
        y = _norm.empty_like(x)  # a channels_last input gives a channels_last result
    apply_threads(x.size)
    _ew.relu(*_norm.flats(y, x))
    return y


@reports_memory
def relu_backward(grad_output, x):
    """Gradient of :func:`relu`: 0 where ``x <= 0``, else ``grad_output`` (so a NaN input passes the
    gradient through, as PyTorch's ``threshold_backward``).

    Examples
    --------
    >>> import numpy as np, fastconv
    >>> fastconv.relu_backward(np.ones(3), np.array([-1.0, 0.0, 2.0]))
    array([0., 0., 1.])
    """
    fn = "relu_backward"
    x = V.as_float_array(fn, "input", x, x.ndim if isinstance(x, np.ndarray) else 0)
    grad_output = V.as_float_array(fn, "grad_output", grad_output, x.ndim, x.dtype)
    V.check_memory(fn, f"output of shape {x.shape}", x.nbytes)
    if grad_output.shape != x.shape:
        raise ValueError(f"{fn}: grad_output must have the input's shape {x.shape}, got {grad_output.shape}")
    gx = _norm.empty_like(x)
    apply_threads(x.size)
    _ew.relu_backward(*_norm.flats(gx, grad_output, x))
    return gx


def conv2d_grad_weight(grad_output, x, weight, stride=1, padding=0, dilation=1, groups=1, *, algorithm="auto",
                       workspace_limit=None, bias=True):
    """Weight and bias gradients of :func:`conv2d` without the input gradient.

    :func:`conv2d_backward` computes the input gradient too; a network's first layer needs none,
    which is a third of that layer's backward time.  Arguments as :func:`conv2d_backward`'s
    (``bias=False``: no ``grad_bias``, None in its place).

    Returns
    -------
    (grad_weight, grad_bias) : tuple of ndarrays, shapes (K, C/groups, R, S) and (K,)

    Examples
    --------
    >>> import numpy as np, fastconv
    >>> gw, gb = fastconv.conv2d_grad_weight(np.ones((1, 1, 2, 2)), np.ones((1, 1, 3, 3)), np.ones((1, 1, 2, 2)))
    >>> gw[0, 0], gb
    (array([[4., 4.],
           [4., 4.]]), array([4.]))
    """
    fn = "conv2d_grad_weight"
    bias = V._bool(fn, "bias", bias)
    grad_output, x, _ = _unbatched_pair(fn, grad_output, x)
    grad_output, x, weight, p = V.check_conv2d_backward(fn, grad_output, x, weight, stride, padding,
                                                        dilation, groups, workspace_limit)
    threads = apply_threads(p.macs)
    alg = select(fn, algorithm, p, "grad_weight", threads)
    if p.n == 0:
        return np.zeros(p.w_shape, p.dtype), np.zeros(p.k, p.dtype) if bias else None
    if _nhwc.is_channels_last(x):
        gyh = _nhwc.to_nhwc(grad_output)
        gb = _nhwc.bias_grad(gyh) if bias else None
        if _depthwise(p, alg, algorithm, weight):
            return _nhwc.dw_grad_weight(gyh, _nhwc.to_nhwc(x), p), gb
        if _native(p, alg, algorithm, "grad_weight"):
            return _nhwc.grad_weight(gyh, _nhwc.to_nhwc(x), p), gb
        return alg.grad_weight(_nhwc.to_nchw(grad_output), _nhwc.to_nchw(x), p), gb
    grad_output = _nhwc.to_nchw(grad_output)
    gb = bias_grad(grad_output) if bias else None
    if _dw_via_nhwc(p, algorithm, weight):
        return _nhwc.dw_grad_weight(_nhwc.to_nhwc(grad_output), _nhwc.to_nhwc(x), p), gb
    if _via_nhwc(p, alg, algorithm, "grad_weight"):
        return _nhwc.grad_weight(_nhwc.to_nhwc(grad_output), _nhwc.to_nhwc(x), p), gb
    return alg.grad_weight(grad_output, x, p), gb
