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
    if name in ("Conv2d", "ConvTranspose2d"):
        kh, kw = layer.kernel_size
        d = f"{name} {layer.in_channels}->{layer.out_channels} {kh}x{kw}"
        d += "" if layer.stride == (1, 1) else f" s{layer.stride[0]}" if layer.stride[0] == layer.stride[1] \
            else f" s{layer.stride}"
        return d + ("" if layer.groups == 1 else f" g{layer.groups}")
    if name == "Conv1d":
        return f"Conv1d {layer.in_channels}->{layer.out_channels} {layer.kernel_size}" + \
            ("" if layer.groups == 1 else f" g{layer.groups}")
    if name == "Linear":
        return f"Linear {layer.in_features}->{layer.out_features}"
    if name in ("MaxPool2d", "AvgPool2d"):
        return f"{name} {layer.kernel_size[0]}x{layer.kernel_size[1]}"
    if name == "BatchNorm2d":
        return f"BatchNorm2d {layer.num_features}"
    if name == "Dropout":
        return f"Dropout p={layer.p}"
    if name == "AdaptiveAvgPool2d":
        return f"AdaptiveAvgPool2d {layer.output_size}"
    if name == "LeakyReLU":
        return f"LeakyReLU {layer.negative_slope}"
    return name


def _linear_cost(layer, in_shape, out_shape):
    """("as fully connected" cell, MACs) of a layer that is a linear map, else ("-", 0)."""
    from .layers import Conv2d, Linear
    from .layers_extra import Conv1d, ConvTranspose2d

    if not isinstance(layer, (Conv2d, Linear, ConvTranspose2d, Conv1d)):
        return "-", 0
    n_in, n_out = int(np.prod(in_shape)), int(np.prod(out_shape))
    fc = f"{n_in * n_out + (n_out if layer.bias is not None else 0):,}"
    if isinstance(layer, Conv2d):
        return fc, layer.params(in_shape).macs
    if isinstance(layer, Linear):
        return fc, n_in * n_out
    taps = int(np.prod(layer.weight.shape[1:]))  # each input (transposed) or output (1-D) element's
    return fc, (n_in if isinstance(layer, ConvTranspose2d) else n_out) * taps


def _rule_rows(fn, model, shape):
    """Rows of a Sequential's layers (or of one layer) by their shape rules: nothing is computed."""
    from .layers import Sequential

    rows = []
    for i, layer in enumerate(model.layers if isinstance(model, Sequential) else [model]):
        try:
            out = layer.output_shape(shape)
        except ValueError as exc:  # the layer's own message, about a per-sample shape
            raise ValueError(f"{fn}: layer {i} ({_describe(layer)}) cannot take a sample of shape {shape}: "
                             f"{exc}") from None
        rows.append((str(i), layer, shape, tuple(out), layer.num_parameters()))
        shape = tuple(out)
    return rows


def _traced_rows(fn, model, shape):
    """Rows of every innermost layer of a model with its own ``forward`` (residual blocks, branches),
    in the order one forward pass on a zero sample calls them: the forward *is* the architecture.
    A layer called twice shows twice, its parameters once."""
    from .autograd import no_grad

    leaves = [(name, m) for name, m in model.named_modules() if not any(True for _ in m.children())]
    rows, counted = [], set()

    def tracer(name, m):
        def forward(*args, **kwargs):
            y = type(m).forward(m, *args, **kwargs)
            params = 0 if id(m) in counted else m.num_parameters()
            counted.add(id(m))
            rows.append((name, m, tuple(args[0].shape[1:]), tuple(y.shape[1:]), params))
            return y
        return forward

    params = list(model.parameters())
    dtype = params[0].dtype if params else np.float32
    for name, m in leaves:  # an instance attribute shadows the class's forward until deleted
        m.forward = tracer(name, m)
    try:
        with no_grad():
            model(np.zeros((1,) + shape, dtype))
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{fn}: the model cannot take a sample of shape {shape}: {exc}") from None
    finally:
        for _, m in leaves:
            del m.forward
    return rows


def summary(model, input_shape, *, file=None):
    """Print (and return) a table of a model's layers: output shape, parameters, the parameters a
    fully connected layer with the same input and output sizes would need, and multiply-accumulates.

    Parameters
    ----------
    model : fastconv.layers.Module
        One layer or a ``Sequential`` of layers (rows from the layers' shape rules, nothing computed),
        or any model built of blocks (residual blocks, branches, nested ``Sequential`` s): then one row
        per innermost layer, in the order a forward pass on one zero sample calls them, named by its
        attribute path (``'blocks.0.conv1'``).
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
    for the linear layers (``Conv2d``, ``ConvTranspose2d``, ``Conv1d``, ``Linear``); other layers show
    ``-``.  MACs are per sample for the forward pass of those linear layers (normalisation, pooling
    and activations, memory-bound, count 0); each of the two gradients costs about as many again.
    The total of parameters is the model's (a parameter shared by two layers counts once).

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

    A model with a shortcut lists the layers its forward calls:

    >>> from fastconv.layers import Module
    >>> from fastconv.layers_extra import BatchNorm2d, AdaptiveAvgPool2d
    >>> class Block(Module):
    ...     def __init__(self):
    ...         self.conv, self.bn = Conv2d(4, 4, 3, padding=1, bias=False), BatchNorm2d(4)
    ...         self.pool = AdaptiveAvgPool2d(1)
    ...     def forward(self, x):
    ...         return self.pool(x + self.bn(self.conv(x)))
    >>> _ = fastconv.summary(Block(), (4, 8, 8))
    layer                     output shape  params  as fully connected   MACs
    conv Conv2d 4->4 3x3      (4, 8, 8)        144              65,536  9,216
    bn BatchNorm2d 4          (4, 8, 8)          8                   -      0
    pool AdaptiveAvgPool2d 1  (4, 1, 1)          0                   -      0
    total                                      152                      9,216
    """
    from .layers import Module, Sequential

    fn = "summary"
    if not isinstance(model, Module):
        raise TypeError(f"{fn}: model must be a fastconv layer or Sequential, got {type(model).__name__}")
    if not isinstance(input_shape, (tuple, list)) or not input_shape:
        raise ValueError(f"{fn}: input_shape must be one sample's shape, e.g. (C, H, W), got {input_shape!r}")
    shape = tuple(V._int(fn, "input_shape", d, "a tuple of ints") for d in input_shape)
    inner = model.layers if isinstance(model, Sequential) else [model]
    composite = any(True for m in inner for _ in m.children())  # else each row is a layer with a shape rule
    modes = [(m, m.training) for m in model.modules()]
    model.eval()  # a forward in training mode would move BatchNorm's running statistics
    try:
        traced = (_traced_rows if composite else _rule_rows)(fn, model, shape)
    finally:
        for m, mode in modes:
            m.training = mode
    rows, total_macs = [], 0
    for name, layer, in_shape, out, params in traced:
        fc, macs = _linear_cost(layer, in_shape, out)
        rows.append((f"{name} {_describe(layer)}", str(out), f"{params:,}", fc, f"{macs:,}"))
        total_macs += macs
    header = ("layer", "output shape", "params", "as fully connected", "MACs")
    footer = ("total", "", f"{model.num_parameters():,}", "", f"{total_macs:,}")
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
