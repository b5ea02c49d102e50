"""The fully connected view of a convolution: its matrix, and a model summary that counts what
weight sharing and sparse connectivity save.

A convolution of one ``(C, H, W)`` image is a linear map, so it is a fully connected layer
``y = W @ x`` on the flattened image -- with a matrix ``W`` of shape ``(K*OH*OW, C*H*W)`` that is
mostly zeros (each output sees only its window: sparse connectivity) and whose non-zeros repeat the
same ``K*C/groups*R*S`` kernel values at every position (weight sharing).  Its transpose is the
backward pass: ``W.T @ g`` is the input gradient, a correlation with the flipped kernel.
"""
from __future__ import annotations

import numpy as np

from . import _validation as V

__all__ = ["conv2d_as_matrix", "summary"]


def _image_shape(fn, input_shape):
    if not isinstance(input_shape, (tuple, list)) or len(input_shape) != 3:
        raise ValueError(f"{fn}: input_shape must be one image's shape (C, H, W), got {input_shape!r}")
    out = tuple(V._int(fn, "input_shape", d) for d in input_shape)
    if min(out) < 1:
        raise ValueError(f"{fn}: input_shape must have positive C, H, W, got {out}")
    return out


def conv2d_as_matrix(weight, input_shape, stride=1, padding=0, dilation=1, groups=1, *, sparse=True):
    """The matrix of :func:`fastconv.conv2d` for one image shape: a convolution as a fully connected layer.

    Parameters
    ----------
    weight : ndarray, shape (K, C/groups, R, S), float32 or float64
    input_shape : tuple (C, H, W)
        Shape of one image (no batch axis).
    stride, padding, dilation, groups
        As :func:`fastconv.conv2d`.
    sparse : bool
        Return a ``scipy.sparse.csr_array`` holding only the connections (True) or a dense ndarray.

    Returns
    -------
    W : scipy.sparse.csr_array or ndarray, shape (K*OH*OW, C*H*W), weight's dtype
        ``conv2d(x, weight, ...).reshape(N, -1) == x.reshape(N, -1) @ W.T`` (add the bias per output
        channel separately), and ``(W.T @ g.reshape(N, -1).T).T`` is the input gradient.  Row
        ``(k*OH + i)*OW + j`` holds output ``(k, i, j)``; column ``(c*H + ih)*W + iw`` input ``(c, ih, iw)``.

    Notes
    -----
    Padding positions are zeros of the input, so they have no column: row ``(k, i, j)`` stores one
    entry per tap ``(c, r, s)`` whose input position lies inside the image.  Without padding that is
    ``nnz = K*OH*OW*(C/groups)*R*S`` stored entries drawn from only ``K*(C/groups)*R*S`` distinct
    weights, against ``K*OH*OW*C*H*W`` entries of a dense layer.

    Raises
    ------
    TypeError, ValueError
        As :func:`fastconv.conv2d`, and for an ``input_shape`` that is not ``(C, H, W)``.

    Examples
    --------
    >>> import numpy as np, fastconv
    >>> w = np.array([[[[1.0, 2.0]]]])                 # one 1x2 filter
    >>> fastconv.conv2d_as_matrix(w, (1, 1, 4), sparse=False)
    array([[1., 2., 0., 0.],
           [0., 1., 2., 0.],
           [0., 0., 1., 2.]])
    >>> x = np.random.default_rng(0).standard_normal((2, 3, 6, 6))
    >>> w = np.random.default_rng(1).standard_normal((4, 3, 3, 3))
    >>> W = fastconv.conv2d_as_matrix(w, (3, 6, 6), padding=1)
    >>> W.shape, W.nnz
    ((144, 108), 3072)
    >>> np.allclose(x.reshape(2, -1) @ W.T, fastconv.conv2d(x, w, padding=1).reshape(2, -1))
    True
    """
    fn = "conv2d_as_matrix"
    from .autograd import Tensor

    if isinstance(weight, Tensor):  # a layer's Parameter: its values (a matrix records no gradient)
        weight = weight.data
    weight = V.as_float_array(fn, "weight", weight, 4)
    c, h, w = _image_shape(fn, input_shape)
    sparse = V._bool(fn, "sparse", sparse)
    p = V.conv_params(fn, (1, c, h, w), weight.shape, weight.dtype, stride, padding, dilation, groups)
    k, cg, r, s, oh, ow = p.k, p.cg, p.r, p.s, p.oh, p.ow
    ih = np.arange(oh)[:, None] * p.sh + np.arange(r)[None, :] * p.dh - p.ph0   # (oh, r)
    iw = np.arange(ow)[:, None] * p.sw + np.arange(s)[None, :] * p.dw - p.pw0   # (ow, s)
    vh, vw = (ih >= 0) & (ih < h), (iw >= 0) & (iw < w)
    nnz = k * cg * int(vh.sum()) * int(vw.sum())
    V.check_memory(fn, f"a matrix with {nnz} stored entries", nnz * (weight.itemsize + 16))
    if not sparse:
        V.check_memory(fn, f"a dense matrix of shape ({k * oh * ow}, {c * h * w})",
                       k * oh * ow * c * h * w * weight.itemsize)
    # Entries in (k, i, j, c, r, s) order: rows ascending, and within a row columns ascending.
    full = (k, oh, ow, cg, r, s)
    ci = np.arange(k)[:, None] // p.kg * cg + np.arange(cg)[None, :]              # (k, cg) input channel
    col = ((ci[:, None, None, :, None, None] * h + ih[None, :, None, None, :, None]) * w
           + iw[None, None, :, None, None, :])
    valid = np.broadcast_to(vh[None, :, None, None, :, None] & vw[None, None, :, None, None, :], full)
    col = np.broadcast_to(col, full)[valid]
    val = np.broadcast_to(weight[:, None, None, :, :, :], full)[valid]
    counts = valid.reshape(k * oh * ow, -1).sum(axis=1)
    shape = (k * oh * ow, c * h * w)
    if not sparse:
        dense = np.zeros(shape, weight.dtype)
        dense[np.repeat(np.arange(shape[0]), counts), col] = val
        return dense
    import scipy.sparse

    indptr = np.zeros(shape[0] + 1, np.int64)
    np.cumsum(counts, out=indptr[1:])
    return scipy.sparse.csr_array((val, col.astype(np.int64), indptr), shape=shape)


def _describe(layer):
    name = type(layer).__name__
    if name == "Conv2d":
        return f"Conv2d {layer.in_channels}->{layer.out_channels} {layer.kernel_size[0]}x{layer.kernel_size[1]}"
    if name == "Linear":
        return f"Linear {layer.in_features}->{layer.out_features}"
    if name in ("MaxPool2d", "AvgPool2d"):
        return f"{name} {layer.kernel_size[0]}x{layer.kernel_size[1]}"
    return name


def summary(model, input_shape, *, file=None):
    """Print (and return) a table of a model's layers: output shape, parameters, the parameters a
    fully connected layer with the same input and output sizes would need, and multiply-accumulates.

    Parameters
    ----------
    model : fastconv.layers.Sequential or one layer
    input_shape : tuple
        Shape of one sample without the batch axis, e.g. ``(C, H, W)``.
    file : file-like, optional
        Where to print (default ``sys.stdout``).

    Returns
    -------
    str
        The table as printed.

    Notes
    -----
    "As fully connected" counts ``in*out`` weights (plus ``out`` biases where the layer has a bias)
    for ``Conv2d`` and ``Linear``; layers without parameters show ``-``.  MACs are per sample for
    the forward pass; each of the two gradients costs about as many again.

    Examples
    --------
    The textbook arithmetic: a 32x32 grey image into a 500-neuron hidden layer needs 512,000
    weights, while 6 filters of 5x5 map it to 28x28x6 with 150.

    >>> import fastconv
    >>> from fastconv.layers import Conv2d, Flatten, Linear, Sequential
    >>> _ = fastconv.summary(Sequential(Flatten(), Linear(32 * 32, 500, bias=False)), (1, 32, 32))
    layer               output shape     params  as fully connected     MACs
    0 Flatten           (1024,)               0                   -        0
    1 Linear 1024->500  (500,)          512,000             512,000  512,000
    total                               512,000                      512,000
    >>> _ = fastconv.summary(Conv2d(1, 6, 5, bias=False), (1, 32, 32))
    layer              output shape   params  as fully connected     MACs
    0 Conv2d 1->6 5x5  (6, 28, 28)       150           4,816,896  117,600
    total                                150                      117,600
    """
    from .layers import Conv2d, Linear, Module, Sequential

    fn = "summary"
    if not isinstance(model, Module):
        raise TypeError(f"{fn}: model must be a fastconv layer or Sequential, got {type(model).__name__}")
    if not isinstance(input_shape, (tuple, list)) or not input_shape:
        raise ValueError(f"{fn}: input_shape must be one sample's shape, e.g. (C, H, W), got {input_shape!r}")
    shape = tuple(V._int(fn, "input_shape", d, "a tuple of ints") for d in input_shape)
    layers = model.layers if isinstance(model, Sequential) else [model]
    rows, total_params, total_macs = [], 0, 0
    for i, layer in enumerate(layers):
        try:
            out = layer.output_shape(shape)
        except ValueError as exc:  # the layer's own message, about a per-sample shape
            raise ValueError(f"{fn}: layer {i} ({_describe(layer)}) cannot take a sample of shape {shape}: "
                             f"{exc}") from None
        params = layer.num_parameters()
        fc, macs = "-", 0
        if isinstance(layer, (Conv2d, Linear)):
            n_in, n_out = int(np.prod(shape)), int(np.prod(out))
            fc = f"{n_in * n_out + (n_out if layer.bias is not None else 0):,}"
            macs = layer.params(shape).macs if isinstance(layer, Conv2d) else n_in * n_out
        rows.append((f"{i} {_describe(layer)}", str(out), f"{params:,}", fc, f"{macs:,}"))
        total_params += params
        total_macs += macs
        shape = out
    header = ("layer", "output shape", "params", "as fully connected", "MACs")
    footer = ("total", "", f"{total_params:,}", "", f"{total_macs:,}")
    table = [header] + rows + [footer]
    widths = [max(len(row[j]) for row in table) for j in range(5)]
    lines = []
    for row in table:
        cells = [row[0].ljust(widths[0]), row[1].ljust(widths[1])]
        cells += [row[j].rjust(widths[j]) for j in (2, 3, 4)]
        lines.append("  ".join(cells).rstrip())
    text = "\n".join(lines)
    print(text, file=file)
    return text
