"""Stateless layer ops beyond convolution and pooling (issue 21): transposed and 1-D convolution,
batch normalisation, dropout, adaptive average pooling, ReLU6 and leaky ReLU, with their backward
passes.  Re-exported by :mod:`fastconv.functional`; the same conventions hold (validate once,
allocate or take ``out=``, call a kernel; PyTorch's semantics and argument names).
"""
from __future__ import annotations

import numpy as np

from . import _validation as V
from ._algorithms import elementwise as _ew
from ._algorithms import norm as _norm
from ._algorithms.nhwc import is_channels_last
from ._algorithms import pooling
from ._algorithms.common import bias_grad
from ._results import BatchNormGrads, Conv2dGrads
from ._select import select
from ._threads import apply as apply_threads

def _transpose_prepare(fn, x, weight, stride, padding, output_padding, groups, dilation, workspace_limit):
    p, extra = V.transpose_params(fn, x.shape, weight.shape, x.dtype, stride, padding, output_padding,
                                  dilation, groups, workspace_limit)
    if extra != (0, 0):  # rows the convolution would output beyond x: zero gradient there
        x = np.pad(x, ((0, 0), (0, 0), (0, extra[0]), (0, extra[1])))
    return x, p


def conv_transpose2d(x, weight, bias=None, stride=1, padding=0, output_padding=0, groups=1, dilation=1, *,
                     algorithm="auto", workspace_limit=None, out=None):
    """2-D transposed convolution (the gradient of :func:`conv2d` with respect to its input), as
    ``torch.nn.functional.conv_transpose2d``.

    Computed by the registry's ``grad_input`` pass of the convolution that maps the output back to
    ``x``, so every algorithm and ``'auto'`` serve it.

    Parameters
    ----------
    x : ndarray, shape (N, C_in, H, W) or unbatched (C_in, H, W), float32 or float64
    weight : ndarray, shape (C_in, C_out/groups, R, S), same dtype
    bias : ndarray, shape (C_out,), optional
    stride, padding, output_padding, dilation : int or (int, int)
        ``output_padding`` (added on the bottom/right) must be smaller than the stride or the dilation.
    groups : int
    algorithm : str
        ``'auto'`` or a name from :func:`fastconv.algorithms` (its ``grad_input`` pass).
    workspace_limit : int, optional
    out : ndarray, optional
        As :func:`conv2d`'s ``out`` (a copy into it, with the bias added on the way).

    Returns
    -------
    y : ndarray, shape (N, C_out, OH, OW), or (C_out, OH, OW) for an unbatched input
        ``OH = (H - 1)*sh - 2*ph + dh*(R - 1) + oph + 1`` and likewise ``OW``.

    Examples
    --------
    >>> import numpy as np, fastconv
    >>> y = fastconv.conv_transpose2d(np.ones((1, 1, 2, 2)), np.ones((1, 1, 2, 2)), stride=2)
    >>> y.shape, float(y.sum())
    ((1, 1, 4, 4), 16.0)
    """
    fn = "conv_transpose2d"
    x, squeeze = V.unbatched(fn, "input", x, 4)
    weight = V.as_float_array(fn, "weight", weight, 4, x.dtype)
    xp, p = _transpose_prepare(fn, x, weight, stride, padding, output_padding, groups, dilation,
                               workspace_limit)
    if bias is not None:
        bias = V.as_float_array(fn, "bias", bias, 1, x.dtype)
        if bias.shape[0] != p.c:
            raise ValueError(f"{fn}: bias must have shape ({p.c},) (out channels), got {bias.shape}")
    out = V.result_out(fn, out, p.x_shape, squeeze, p.dtype,
                       (("input", x), ("weight", weight), ("bias", bias)))
    threads = apply_threads(p.macs)
    alg = select(fn, algorithm, p, "grad_input", threads)
    y = np.zeros(p.x_shape, p.dtype) if p.n == 0 else alg.grad_input(xp, weight, p)
    if bias is None:
        return V.into_out(y, out, squeeze)
    if out is None:
        y += bias[:, None, None]
        return V.squeezed(y, squeeze)
    np.add(y, bias[:, None, None], out=out.reshape(y.shape))
    return out


def conv_transpose2d_backward(grad_output, x, weight, stride=1, padding=0, output_padding=0, groups=1,
                              dilation=1, *, algorithm="auto", workspace_limit=None):
    """Gradients of :func:`conv_transpose2d`: ``grad_input`` is the convolution (:func:`conv2d`'s
    forward pass) of ``grad_output`` with the weight, ``grad_weight`` is conv2d's weight gradient with
    the roles of input and output gradient swapped, ``grad_bias = grad_output.sum(axis=(0, 2, 3))``.

    Returns
    -------
    Conv2dGrads
        ``(grad_input like x, grad_weight like weight, grad_bias (C_out,))``.

    Examples
    --------
    >>> import numpy as np, fastconv
    >>> g = fastconv.conv_transpose2d_backward(np.ones((1, 1, 4, 4)), np.ones((1, 1, 2, 2)),
    ...                                        np.ones((1, 1, 2, 2)), stride=2)
    >>> g.grad_input[0, 0], g.grad_weight[0, 0, 0], g.grad_bias
    (array([[4., 4.],
           [4., 4.]]), array([4., 4.]), array([16.]))
    """
    fn = "conv_transpose2d_backward"
    x, squeeze = V.unbatched(fn, "input", x, 4)
    weight = V.as_float_array(fn, "weight", weight, 4, x.dtype)
    grad_output = V.as_float_array(fn, "grad_output", grad_output, 3 if squeeze else 4, x.dtype)
    if squeeze:
        grad_output = grad_output[None]
    xp, p = _transpose_prepare(fn, x, weight, stride, padding, output_padding, groups, dilation,
                               workspace_limit)
    if grad_output.shape != p.x_shape:
        shape = p.x_shape[1:] if squeeze else p.x_shape
        raise ValueError(f"{fn}: grad_output must have the output's shape {shape}, got "
                         f"{grad_output.shape[1:] if squeeze else grad_output.shape}")
    threads = apply_threads(2 * p.macs)
    alg_f = select(fn, algorithm, p, "forward", threads)
    alg_w = select(fn, algorithm, p, "grad_weight", threads)
    if p.n == 0:
        return Conv2dGrads(np.zeros(x.shape[1:] if squeeze else x.shape, p.dtype), np.zeros(p.w_shape, p.dtype),
                           np.zeros(p.c, p.dtype))
    gx = alg_f.forward(grad_output, weight, None, p)[:, :, :x.shape[2], :x.shape[3]]
    gw = alg_w.grad_weight(xp, grad_output, p)
    return Conv2dGrads(V.squeezed(np.ascontiguousarray(gx), squeeze), gw, bias_grad(grad_output))


def _conv1d_args(fn, x, weight, stride, padding, dilation):
    x, squeeze = V.unbatched(fn, "input", x, 3)
    weight = V.as_float_array(fn, "weight", weight, 3, x.dtype)
    st = V.single(fn, "stride", stride)
    dl = V.single(fn, "dilation", dilation)
    pd = padding if isinstance(padding, str) else (0, V.single(fn, "padding", padding, positive=False))
    return x[:, :, None, :], weight[:, :, None, :], squeeze, (1, st), pd, (1, dl)


def conv1d(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, *, algorithm="auto",
           workspace_limit=None, out=None):
    """1-D convolution of a batch of sequences, as ``torch.nn.functional.conv1d`` (a :func:`conv2d`
    with ``H = R = 1``, so every algorithm serves it).

    Parameters
    ----------
    x : ndarray, shape (N, C, L) or unbatched (C, L), float32 or float64
    weight : ndarray, shape (K, C/groups, S)
    bias : ndarray, shape (K,), optional
    stride, dilation : int or (int,), positive
    padding : int, (int,), 'same' or 'valid'
    groups : int
    algorithm, workspace_limit, out
        As :func:`conv2d`.

    Returns
    -------
    y : ndarray, shape (N, K, OL), or (K, OL) unbatched; ``OL = floor((L + 2*p - d*(S-1) - 1) / s) + 1``

    Examples
    --------
    >>> import numpy as np, fastconv
    >>> fastconv.conv1d(np.arange(5.0).reshape(1, 1, 5), np.ones((1, 1, 2)))[0, 0]
    array([1., 3., 5., 7.])
    """
    fn = "conv1d"
    x4, w4, squeeze, st, pd, dl = _conv1d_args(fn, x, weight, stride, padding, dilation)
    x4, w4, bias, p = V.check_conv2d(fn, x4, w4, bias, st, pd, dl, groups, workspace_limit)
    out = V.result_out(fn, out, (p.n, p.k, p.ow), squeeze, p.dtype,
                       (("input", x4), ("weight", w4), ("bias", bias)))
    threads = apply_threads(p.macs)
    alg = select(fn, algorithm, p, "forward", threads)
    y = np.zeros(p.y_shape, dtype=p.dtype) if p.n == 0 else alg.forward(x4, w4, bias, p)
    return V.into_out(y[:, :, 0, :], out, squeeze)


def conv1d_backward(grad_output, x, weight, stride=1, padding=0, dilation=1, groups=1, *, algorithm="auto",
                    workspace_limit=None):
    """Gradients of :func:`conv1d` (input, weight, bias), through :func:`conv2d_backward`'s passes.

    Examples
    --------
    >>> import numpy as np, fastconv
    >>> g = fastconv.conv1d_backward(np.ones((1, 1, 4)), np.arange(5.0).reshape(1, 1, 5), np.ones((1, 1, 2)))
    >>> g.grad_input[0, 0], g.grad_weight[0, 0], g.grad_bias
    (array([1., 2., 2., 2., 1.]), array([ 6., 10.]), array([4.]))
    """
    fn = "conv1d_backward"
    x4, w4, squeeze, st, pd, dl = _conv1d_args(fn, x, weight, stride, padding, dilation)
    grad_output = V.as_float_array(fn, "grad_output", grad_output, 2 if squeeze else 3, x4.dtype)
    g4 = (grad_output[None] if squeeze else grad_output)[:, :, None, :]
    g4, x4, w4, p = V.check_conv2d_backward(fn, g4, x4, w4, st, pd, dl, groups, workspace_limit)
    threads = apply_threads(2 * p.macs)
    alg_i = select(fn, algorithm, p, "grad_input", threads)
    alg_w = select(fn, algorithm, p, "grad_weight", threads)
    if p.n == 0:
        gx, gw = np.zeros(p.x_shape, p.dtype), np.zeros(p.w_shape, p.dtype)
    else:
        if alg_i is alg_w and alg_i.backward is not None:  # one call shares work between the passes
            gx, gw = alg_i.backward(g4, x4, w4, p)
        else:
            gx = alg_i.grad_input(g4, w4, p)
            gw = alg_w.grad_weight(g4, x4, p)
    return Conv2dGrads(V.squeezed(gx[:, :, 0, :], squeeze), gw[:, :, 0, :], bias_grad(g4))


def _bn_args(fn, x, running_mean, running_var, weight, training, eps):
    x = V.any_float_array(fn, "input", x)
    if x.ndim < 2:
        raise ValueError(f"{fn}: input must be at least 2-D (N, C, ...), got shape {x.shape}")
    c = x.shape[1]
    training = V._bool(fn, "training", training)
    eps = V.real(fn, "eps", eps, lo=0.0)
    stats = []
    for name, a in (("running_mean", running_mean), ("running_var", running_var), ("weight", weight)):
        if a is not None:
            a = V.as_float_array(fn, name, a, 1)
            if a.shape != (c,):
                raise ValueError(f"{fn}: {name} must have shape ({c},) (the input's channels), got {a.shape}")
        stats.append(a)
    if not training and (running_mean is None or running_var is None):
        raise ValueError(f"{fn}: running_mean and running_var must be given when training is False, got "
                         f"{'None' if running_mean is None else 'an array'} and "
                         f"{'None' if running_var is None else 'an array'}")
    if training and x.size // max(c, 1) < 2:
        raise ValueError(f"{fn}: training needs more than 1 value per channel, got input of shape {x.shape}")
    V.check_copy(fn, "the input", x)
    return x, stats[0], stats[1], stats[2], training, eps


def _bn_stats(x3, running_mean, running_var, training, eps):
    if training:
        mean, var = _norm.moments(x3)
    else:
        mean, var = running_mean.astype(np.float64), running_var.astype(np.float64)
    return mean, 1.0 / np.sqrt(var + eps), var


def batch_norm(x, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1, eps=1e-5,
               *, out=None):
    """Batch normalisation over the batch and spatial axes of each channel, as
    ``torch.nn.functional.batch_norm``.

    ``y = (x - mean) / sqrt(var + eps) * weight + bias``, with the batch's mean and biased variance
    when ``training`` (then ``running_mean`` and ``running_var``, if given, are updated in place:
    ``r = (1 - momentum) * r + momentum * batch_value``, the variance unbiased by ``M / (M - 1)``)
    and the running statistics otherwise.

    Parameters
    ----------
    x : ndarray, shape (N, C, ...) , float32 or float64
    running_mean, running_var : ndarray, shape (C,), or None (training only)
    weight, bias : ndarray, shape (C,), optional (1 and 0)
    training : bool
    momentum : float
    eps : float, >= 0
    out : ndarray, optional
        C-contiguous array of ``x``'s shape and dtype to write the result into (may be ``x``).

    Returns
    -------
    y : ndarray, shape and dtype of ``x``

    Examples
    --------
    >>> import numpy as np, fastconv
    >>> x = np.array([[1.0], [3.0]])
    >>> rm, rv = np.zeros(1), np.ones(1)
    >>> fastconv.batch_norm(x, rm, rv, training=True, eps=0.0)[:, 0]
    array([-1.,  1.])
    >>> rm, rv
    (array([0.2]), array([1.1]))
    """
    fn = "batch_norm"
    args = _bn_forward_args(fn, x, running_mean, running_var, weight, bias, training, momentum, eps)
    y = V.check_out(fn, out, args[0].shape, args[0].dtype)
    return _batch_norm(*args, y, None)[0]


def _bn_forward_args(fn, x, running_mean, running_var, weight, bias, training, momentum, eps):
    """:func:`batch_norm`'s arguments validated, in its order."""
    x, running_mean, running_var, weight, training, eps = _bn_args(fn, x, running_mean, running_var, weight,
                                                                   training, eps)
    momentum = V.real(fn, "momentum", momentum)
    c = x.shape[1]
    if bias is not None:
        bias = V.as_float_array(fn, "bias", bias, 1)
        if bias.shape != (c,):
            raise ValueError(f"{fn}: bias must have shape ({c},) (the input's channels), got {bias.shape}")
    for name, a in (("running_mean", running_mean), ("running_var", running_var)):
        if training and a is not None and not a.flags.writeable:
            raise ValueError(f"{fn}: {name} must be writeable when training (it is updated in place), got a "
                             f"read-only array")
    return x, running_mean, running_var, weight, bias, training, momentum, eps


def _batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps, y, act):
    """:func:`batch_norm` of validated arguments, followed by the activation ``act`` (None, 'relu' or
    'relu6') in the same pass; returns ``(y, mean, invstd)``, the statistics used (float64, None for
    an empty ``x``), for :func:`_batch_norm_backward`."""
    y = _norm.empty_like(x) if y is None else y
    if x.size == 0:
        return y, None, None
    c = x.shape[1]
    # channels_last in and out (rows of channels) where both are; otherwise NCHW planes
    rows = is_channels_last(x) and is_channels_last(y)
    x3, y3 = _norm.view(x, rows), _norm.view(y, rows)  # (y: a view, in its own layout)
    apply_threads(x.size)
    mean, invstd, var = _bn_stats(x3, running_mean, running_var, training, eps)
    a = invstd if weight is None else invstd * weight
    d = -mean * a if bias is None else bias - mean * a
    if training:  # after the statistics are read: running_mean may be the same array as an input
        cnt = x.size // c
        if running_mean is not None:
            running_mean *= 1 - momentum
            running_mean += momentum * mean
        if running_var is not None:
            running_var *= 1 - momentum
            running_var += momentum * var * (cnt / (cnt - 1))
    if act is None:
        _norm.affine(x3, a, d, y3)
    else:
        _norm.affine_act(x3, a, d, act, y3)
    return y, mean, invstd


def batch_norm_backward(grad_output, x, running_mean, running_var, weight=None, training=False, eps=1e-5):
    """Gradients of :func:`batch_norm` with respect to its input, weight and bias.

    In training mode the batch statistics are recomputed from ``x`` (so pass the same ``x``; the
    running statistics are not used or changed); in eval mode the running statistics are constants.

    Returns
    -------
    BatchNormGrads
        ``(grad_input like x, grad_weight (C,), grad_bias (C,))``; ``grad_weight`` is computed even when
        ``weight`` is None (as if it were ones).

    Examples
    --------
    >>> import numpy as np, fastconv
    >>> g = fastconv.batch_norm_backward(np.array([[1.0], [0.0]]), np.array([[1.0], [3.0]]), None, None,
    ...                                  training=True, eps=0.0)
    >>> g.grad_input[:, 0], g.grad_weight, g.grad_bias
    (array([0., 0.]), array([-1.]), array([1.]))
    """
    fn = "batch_norm_backward"
    x, running_mean, running_var, weight, training, eps = _bn_args(fn, x, running_mean, running_var, weight,
                                                                   training, eps)
    grad_output = V.any_float_array(fn, "grad_output", grad_output, x.dtype)
    V.same_shape(fn, "grad_output", grad_output, x.shape)
    if x.size == 0:
        return _batch_norm_backward(grad_output, x, None, None, weight, training)
    apply_threads(2 * x.size)
    mean, invstd, _ = _bn_stats(_norm.view(x), running_mean, running_var, training, eps)
    return _batch_norm_backward(grad_output, x, mean, invstd, weight, training)


def _batch_norm_backward(grad_output, x, mean, invstd, weight, training, act=None, y=None):
    """:func:`batch_norm_backward` of validated arguments with the statistics the forward used
    (``_batch_norm``'s); with ``act``, of the fused activation too, masked by its output ``y``."""
    c = x.shape[1]
    if x.size == 0:
        return BatchNormGrads(np.zeros_like(x), np.zeros(c, x.dtype), np.zeros(c, x.dtype))
    rows = is_channels_last(x)  # the gradients in x's layout (grad_output and y brought to it)
    x3, g3 = _norm.view(x, rows), _norm.view(grad_output, rows)
    apply_threads(2 * x.size)
    if act is None:
        s1, s2 = _norm.grad_sums(g3, x3, mean)
    else:
        y3 = _norm.view(y, rows)
        s1, s2 = _norm.grad_sums_act(g3, y3, x3, mean, act)
    w = np.ones(c) if weight is None else weight.astype(np.float64)
    a = w * invstd
    if training:
        m = x.size // c
        b = -w * invstd ** 3 * s2 / m
        d = -a * s1 / m - b * mean
    else:
        b = d = np.zeros(c)
    gx = _norm.empty_like(x)
    gx3 = _norm.view(gx, rows)
    if act is None:
        _norm.affine2(g3, x3, a, b, d, gx3)
    else:
        _norm.affine2_act(g3, y3, x3, a, b, d, act, gx3)
    return BatchNormGrads(gx, (s2 * invstd).astype(x.dtype), s1.astype(x.dtype))


def dropout(x, p=0.5, training=True, *, rng=None, out=None, return_mask=False):
    """Dropout: zero each element with probability ``p`` and scale the rest by ``1 / (1 - p)``, as
    ``torch.nn.functional.dropout`` (identity when not training).

    Parameters
    ----------
    x : ndarray, any shape, float32 or float64
    p : float in [0, 1]
    training : bool
    rng : None, int or numpy.random.Generator
        Source of the mask: a seed makes it reproducible.
    out : ndarray, optional
        C-contiguous array of ``x``'s shape and dtype for the result (may be ``x``).
    return_mask : bool
        Also return the boolean mask of kept elements (for :func:`dropout_backward`).

    Examples
    --------
    >>> import numpy as np, fastconv
    >>> y, keep = fastconv.dropout(np.ones(6), 0.5, rng=0, return_mask=True)
    >>> bool(np.all(y == 2 * keep))
    True
    """
    fn = "dropout"
    x = V.any_float_array(fn, "input", x)
    p = V.real(fn, "p", p, 0.0, 1.0)
    training = V._bool(fn, "training", training)
    return_mask = V._bool(fn, "return_mask", return_mask)
    gen = V.generator(fn, rng)
    y = V.check_out(fn, out, x.shape, x.dtype)
    y = np.empty(x.shape, x.dtype) if y is None else y
    if not training or p == 0.0:
        keep = np.ones(x.shape, np.bool_)
        if y is not x:
            np.copyto(y, x)
    else:
        keep = gen.random(x.shape, dtype=np.float32) >= np.float32(p) if p < 1.0 else np.zeros(x.shape, np.bool_)
        apply_threads(x.size)
        _norm.masked_scale(np.ascontiguousarray(x).reshape(-1), keep.reshape(-1),
                           0.0 if p == 1.0 else 1.0 / (1.0 - p), y.reshape(-1))
    return (y, keep) if return_mask else y


def dropout_backward(grad_output, mask, p):
    """Gradient of :func:`dropout`: ``grad_output * mask / (1 - p)`` (zero everywhere when ``p == 1``).

    Examples
    --------
    >>> import numpy as np, fastconv
    >>> fastconv.dropout_backward(np.ones(3), np.array([True, False, True]), 0.5)
    array([2., 0., 2.])
    """
    fn = "dropout_backward"
    grad_output = V.any_float_array(fn, "grad_output", grad_output)
    p = V.real(fn, "p", p, 0.0, 1.0)
    if not isinstance(mask, np.ndarray) or mask.dtype != np.bool_:
        raise TypeError(f"{fn}: mask must be a boolean numpy.ndarray (from dropout(..., return_mask=True)), got "
                        f"{type(mask).__name__ if not isinstance(mask, np.ndarray) else mask.dtype}")
    if mask.shape != grad_output.shape:
        raise ValueError(f"{fn}: mask must have grad_output's shape {grad_output.shape}, got {mask.shape}")
    gx = np.empty(grad_output.shape, grad_output.dtype)
    apply_threads(gx.size)
    _norm.masked_scale(np.ascontiguousarray(grad_output).reshape(-1), np.ascontiguousarray(mask).reshape(-1),
                       0.0 if p == 1.0 else 1.0 / (1.0 - p), gx.reshape(-1))
    return gx


def adaptive_avg_pool2d(x, output_size, *, out=None):
    """Adaptive average pooling to ``output_size``, as ``torch.nn.functional.adaptive_avg_pool2d``:
    output cell ``i`` averages rows ``floor(i*H/OH)`` to ``ceil((i+1)*H/OH) - 1`` (and likewise
    columns).  ``output_size=1`` is global average pooling.

    Parameters
    ----------
    x : ndarray, shape (N, C, H, W) or unbatched (C, H, W)
    output_size : int or (int or None, int or None)
        ``None`` keeps that input size.
    out : ndarray, optional
        C-contiguous array of the result's shape and dtype.

    Examples
    --------
    >>> import numpy as np, fastconv
    >>> fastconv.adaptive_avg_pool2d(np.arange(16.0).reshape(1, 1, 4, 4), 1)[0, 0]
    array([[7.5]])
    >>> fastconv.adaptive_avg_pool2d(np.arange(16.0).reshape(1, 4, 4), (2, None)).shape
    (1, 2, 4)
    """
    fn = "adaptive_avg_pool2d"
    x, squeeze = V.unbatched(fn, "input", x, 4)
    n, c, h, w = x.shape
    if min(c, h, w) < 1:
        raise ValueError(f"{fn}: input must have positive C, H and W, got shape {x.shape}")
    oh, ow = V.adaptive_size(fn, output_size, h, w)
    V.check_memory(fn, f"output of shape {(n, c, oh, ow)}", x.itemsize * n * c * oh * ow)
    shape = (n, c, oh, ow)
    out = V.check_out(fn, out, shape[1:] if squeeze else shape, x.dtype)
    apply_threads(x.size)
    y = pooling.adaptive_avg_forward(x, (oh, ow), None if out is None else out.reshape(shape))
    return out if out is not None else V.squeezed(y, squeeze)


def adaptive_avg_pool2d_backward(grad_output, input_shape):
    """Gradient of :func:`adaptive_avg_pool2d`: each ``grad_output`` element spread evenly over its window.

    Examples
    --------
    >>> import numpy as np, fastconv
    >>> fastconv.adaptive_avg_pool2d_backward(np.ones((1, 1, 1, 1)), (1, 1, 2, 2))[0, 0]
    array([[0.25, 0.25],
           [0.25, 0.25]])
    """
    fn = "adaptive_avg_pool2d_backward"
    squeeze = isinstance(input_shape, (tuple, list)) and len(input_shape) == 3
    input_shape = V.shape4(fn, "input_shape", (1, *input_shape) if squeeze else input_shape)
    grad_output = V.as_float_array(fn, "grad_output", grad_output, 3 if squeeze else 4)
    if squeeze:
        grad_output = grad_output[None]
    if grad_output.shape[:2] != input_shape[:2] or min(grad_output.shape[2:]) < 1:
        raise ValueError(f"{fn}: grad_output must have input_shape's N and C {input_shape[:2]} and a positive "
                         f"size, got shape {grad_output.shape}")
    V.check_memory(fn, f"grad_input of shape {input_shape}", grad_output.itemsize * int(np.prod(input_shape)))
    apply_threads(int(np.prod(input_shape)))
    return V.squeezed(pooling.adaptive_avg_backward(grad_output, input_shape), squeeze)


def _elementwise_out(fn, x, out):
    y = V.check_elementwise_out(fn, out, x)
    return _norm.empty_like(x) if y is None else y


def _elementwise_grad(kern, grad_output, x, *args):
    """A new array ``kern`` fills from ``grad_output`` and ``x`` (same shape and dtype, checked)."""
    gx = _norm.empty_like(x)
    apply_threads(x.size)
    g1, x1, gx1 = _norm.flats(gx, grad_output, x)
    kern(g1, x1, *args, gx1)
    return gx


def relu6(x, *, out=None):
    """``min(max(x, 0), 6)`` (NaN stays NaN, as PyTorch's ``hardtanh``).

    Examples
    --------
    >>> import numpy as np, fastconv
    >>> fastconv.relu6(np.array([-1.0, 3.0, 7.0]))
    array([0., 3., 6.])
    """
    x = V.any_float_array("relu6", "input", x)
    y = _elementwise_out("relu6", x, out)
    apply_threads(x.size)
    _ew.relu6(*_norm.flats(y, x))
    return y


def relu6_backward(grad_output, x):
    """Gradient of :func:`relu6`: ``grad_output`` where ``0 < x < 6``, else 0 (also for a NaN input,
    as PyTorch's ``hardtanh_backward``).

    Examples
    --------
    >>> import numpy as np, fastconv
    >>> fastconv.relu6_backward(np.ones(3), np.array([-1.0, 3.0, 6.0]))
    array([0., 1., 0.])
    """
    fn = "relu6_backward"
    x = V.any_float_array(fn, "input", x)
    grad_output = V.same_shape(fn, "grad_output", V.any_float_array(fn, "grad_output", grad_output, x.dtype), x.shape)
    return _elementwise_grad(_ew.relu6_backward, grad_output, x)


def leaky_relu(x, negative_slope=0.01, *, out=None):
    """``x`` where ``x > 0``, else ``negative_slope * x``, as ``torch.nn.functional.leaky_relu``.

    Examples
    --------
    >>> import numpy as np, fastconv
    >>> fastconv.leaky_relu(np.array([-2.0, 3.0]), 0.5)
    array([-1.,  3.])
    """
    fn = "leaky_relu"
    x = V.any_float_array(fn, "input", x)
    slope = x.dtype.type(V.real(fn, "negative_slope", negative_slope))
    y = _elementwise_out(fn, x, out)
    apply_threads(x.size)
    x1, y1 = _norm.flats(y, x)
    _ew.leaky_relu(x1, slope, y1)
    return y


def leaky_relu_backward(grad_output, x, negative_slope=0.01):
    """Gradient of :func:`leaky_relu`: ``grad_output`` where ``x > 0``, else ``negative_slope * grad_output``.

    Examples
    --------
    >>> import numpy as np, fastconv
    >>> fastconv.leaky_relu_backward(np.ones(2), np.array([-2.0, 3.0]), 0.5)
    array([0.5, 1. ])
    """
    fn = "leaky_relu_backward"
    x = V.any_float_array(fn, "input", x)
    grad_output = V.same_shape(fn, "grad_output", V.any_float_array(fn, "grad_output", grad_output, x.dtype), x.shape)
    slope = x.dtype.type(V.real(fn, "negative_slope", negative_slope))
    return _elementwise_grad(_ew.leaky_relu_backward, grad_output, x, slope)
