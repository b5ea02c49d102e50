"""Naive NumPy references for the tests.  Imports nothing from fastconv.

Slow on purpose: explicit Python loops over kernel taps and pooling windows, vectorised only over
the batch and channel axes.  Everything is computed in float64 whatever the input dtype; callers
compare with a per-dtype tolerance.  Semantics are PyTorch's (``torch.nn.functional``).
"""
import numpy as np


def _pair(v):
    return (v, v) if isinstance(v, int) else (v[0], v[1])


# --------------------------------------------------------------------------- convolution
def conv_pads(padding, kernel, stride, dilation):
    """``((top, bottom), (left, right))`` for an int, a pair, 'valid' or 'same'.

    'same' pads ``dilation*(k-1)`` in total, the odd one at the bottom/right (PyTorch).
    """
    if padding == "valid":
        return (0, 0), (0, 0)
    if padding == "same":
        assert _pair(stride) == (1, 1)
        out = []
        for k, d in zip(_pair(kernel), _pair(dilation)):
            total = d * (k - 1)
            out.append((total // 2, total - total // 2))
        return out[0], out[1]
    ph, pw = _pair(padding)
    return (ph, ph), (pw, pw)


def _geometry(x_shape, w_shape, stride, padding, dilation):
    _, _, h, w = x_shape
    _, _, r, s = w_shape
    sh, sw = _pair(stride)
    dh, dw = _pair(dilation)
    (pt, pb), (pl, pr) = conv_pads(padding, (r, s), stride, dilation)
    oh = (h + pt + pb - dh * (r - 1) - 1) // sh + 1
    ow = (w + pl + pr - dw * (s - 1) - 1) // sw + 1
    return sh, sw, dh, dw, (pt, pb, pl, pr), oh, ow


def _tap(x_padded, r, s, sh, sw, dh, dw, oh, ow):
    """The ``(.., oh, ow)`` view of the padded input that tap ``(r, s)`` multiplies."""
    return x_padded[..., r * dh: r * dh + (oh - 1) * sh + 1: sh, s * dw: s * dw + (ow - 1) * sw + 1: sw]


def conv2d(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """``y[n, k, i, j] = b[k] + sum_{c, r, s} x_pad[n, g*cg + c, i*sh + r*dh, j*sw + s*dw] * w[k, c, r, s]``."""
    x = np.asarray(x, np.float64)
    weight = np.asarray(weight, np.float64)
    n, c, _, _ = x.shape
    k, cg, rr, ss = weight.shape
    kg = k // groups
    sh, sw, dh, dw, (pt, pb, pl, pr), oh, ow = _geometry(x.shape, weight.shape, stride, padding, dilation)
    xp = np.pad(x, ((0, 0), (0, 0), (pt, pb), (pl, pr)))
    y = np.zeros((n, k, oh, ow))
    for g in range(groups):
        ks, cs = slice(g * kg, (g + 1) * kg), slice(g * cg, (g + 1) * cg)
        for r in range(rr):
            for s in range(ss):
                patch = _tap(xp[:, cs], r, s, sh, sw, dh, dw, oh, ow)  # (n, cg, oh, ow)
                y[:, ks] += np.einsum("ncij,kc->nkij", patch, weight[ks, :, r, s])
    if bias is not None:
        y += np.asarray(bias, np.float64)[None, :, None, None]
    return y


def conv2d_grad_input(grad_output, x_shape, weight, stride=1, padding=0, dilation=1, groups=1):
    """Scatter every ``grad_output[n, k, i, j] * w[k, c, r, s]`` to the input position it read."""
    gy = np.asarray(grad_output, np.float64)
    weight = np.asarray(weight, np.float64)
    n, c, h, w = x_shape
    k, cg, rr, ss = weight.shape
    kg = k // groups
    sh, sw, dh, dw, (pt, pb, pl, pr), oh, ow = _geometry(x_shape, weight.shape, stride, padding, dilation)
    gxp = np.zeros((n, c, h + pt + pb, w + pl + pr))
    for g in range(groups):
        ks, cs = slice(g * kg, (g + 1) * kg), slice(g * cg, (g + 1) * cg)
        for r in range(rr):
            for s in range(ss):
                view = _tap(gxp[:, cs], r, s, sh, sw, dh, dw, oh, ow)
                view += np.einsum("nkij,kc->ncij", gy[:, ks], weight[ks, :, r, s])
    return gxp[:, :, pt:pt + h, pl:pl + w]


def conv2d_grad_weight(grad_output, x, w_shape, stride=1, padding=0, dilation=1, groups=1):
    """``gw[k, c, r, s] = sum_{n, i, j} grad_output[n, k, i, j] * x_pad[n, g*cg + c, i*sh + r*dh, j*sw + s*dw]``."""
    gy = np.asarray(grad_output, np.float64)
    x = np.asarray(x, np.float64)
    k, cg, rr, ss = w_shape
    kg = k // groups
    sh, sw, dh, dw, (pt, pb, pl, pr), oh, ow = _geometry(x.shape, w_shape, stride, padding, dilation)
    xp = np.pad(x, ((0, 0), (0, 0), (pt, pb), (pl, pr)))
    gw = np.zeros(w_shape)
    for g in range(groups):
        ks, cs = slice(g * kg, (g + 1) * kg), slice(g * cg, (g + 1) * cg)
        for r in range(rr):
            for s in range(ss):
                patch = _tap(xp[:, cs], r, s, sh, sw, dh, dw, oh, ow)
                gw[ks, :, r, s] = np.einsum("nkij,ncij->kc", gy[:, ks], patch)
    return gw


def conv2d_grad_bias(grad_output):
    return np.asarray(grad_output, np.float64).sum(axis=(0, 2, 3))


# --------------------------------------------------------------------------- pooling
def pool_out_size(size, pad, kernel, stride, dilation, ceil_mode):
    """PyTorch's pooling output size; under ceil_mode the last window must start before ``size + pad``."""
    span = size + 2 * pad - dilation * (kernel - 1) - 1
    out = (-(-span // stride) if ceil_mode else span // stride) + 1
    if ceil_mode and (out - 1) * stride >= size + pad:
        out -= 1
    return out


def _pool_args(kernel_size, stride, padding, dilation):
    kh, kw = _pair(kernel_size)
    sh, sw = (kh, kw) if stride is None else _pair(stride)
    return kh, kw, sh, sw, _pair(padding), _pair(dilation)


def max_pool2d(x, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False):
    """Values (float64) and flat indices ``ih*W + iw`` as PyTorch's CPU kernel: window taps clipped to
    the input, start at -inf with the first in-bounds position, replace when ``v > best or isnan(v)``."""
    x = np.asarray(x, np.float64)
    n, c, h, w = x.shape
    kh, kw, sh, sw, (ph, pw), (dh, dw) = _pool_args(kernel_size, stride, padding, dilation)
    oh = pool_out_size(h, ph, kh, sh, dh, ceil_mode)
    ow = pool_out_size(w, pw, kw, sw, dw, ceil_mode)
    y = np.empty((n, c, oh, ow))
    idx = np.empty((n, c, oh, ow), np.int64)
    for i in range(oh):
        for j in range(ow):
            h0, w0 = i * sh - ph, j * sw - pw
            while h0 < 0:  # first in-bounds row/column of the dilated window
                h0 += dh
            while w0 < 0:
                w0 += dw
            best = np.full((n, c), -np.inf)
            where = np.full((n, c), h0 * w + w0, np.int64)
            for r in range(kh):
                ih = i * sh - ph + r * dh
                if not 0 <= ih < h:
                    continue
                for s in range(kw):
                    iw = j * sw - pw + s * dw
                    if not 0 <= iw < w:
                        continue
                    v = x[:, :, ih, iw]
                    take = (v > best) | np.isnan(v)
                    best = np.where(take, v, best)
                    where = np.where(take, ih * w + iw, where)
            y[:, :, i, j] = best
            idx[:, :, i, j] = where
    return y, idx


def max_pool2d_backward(grad_output, indices, input_shape):
    """Add each ``grad_output`` element to the input position its index names."""
    n, c, h, w = input_shape
    gy = np.asarray(grad_output, np.float64)
    m = gy.shape[2] * gy.shape[3]
    gy, idx = gy.reshape(n * c, m), np.asarray(indices).reshape(n * c, m)
    gx = np.zeros((n * c, h * w))
    for plane in range(n * c):
        for o in range(gy.shape[1]):
            gx[plane, idx[plane, o]] += gy[plane, o]
    return gx.reshape(input_shape)


def _avg_windows(h, w, kernel_size, stride, padding, ceil_mode, count_include_pad):
    """Yield ``(i, j, taps, divisor)`` per output; taps are the in-bounds ``(ih, iw)``.

    The divisor counts window taps inside the padded input (count_include_pad) or inside the input.
    """
    kh, kw, sh, sw, (ph, pw), _ = _pool_args(kernel_size, stride, padding, 1)
    oh = pool_out_size(h, ph, kh, sh, 1, ceil_mode)
    ow = pool_out_size(w, pw, kw, sw, 1, ceil_mode)
    for i in range(oh):
        for j in range(ow):
            taps, padded_taps = [], 0
            for r in range(kh):
                for s in range(kw):
                    ih, iw = i * sh - ph + r, j * sw - pw + s
                    if -ph <= ih < h + ph and -pw <= iw < w + pw:
                        padded_taps += 1
                    if 0 <= ih < h and 0 <= iw < w:
                        taps.append((ih, iw))
            yield i, j, oh, ow, taps, (padded_taps if count_include_pad else len(taps))


def avg_pool2d(x, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True):
    x = np.asarray(x, np.float64)
    n, c, h, w = x.shape
    y = None
    for i, j, oh, ow, taps, div in _avg_windows(h, w, kernel_size, stride, padding, ceil_mode,
                                                 count_include_pad):
        if y is None:
            y = np.zeros((n, c, oh, ow))
        total = np.zeros((n, c))
        for ih, iw in taps:
            total += x[:, :, ih, iw]
        y[:, :, i, j] = total / div if taps else 0.0  # a window with no input element gives 0
    return y


def avg_pool2d_backward(grad_output, input_shape, kernel_size, stride=None, padding=0, ceil_mode=False,
                        count_include_pad=True):
    gy = np.asarray(grad_output, np.float64)
    n, c, h, w = input_shape
    gx = np.zeros(input_shape)
    for i, j, _, _, taps, div in _avg_windows(h, w, kernel_size, stride, padding, ceil_mode,
                                               count_include_pad):
        for ih, iw in taps:
            gx[:, :, ih, iw] += gy[:, :, i, j] / div
    return gx


# --------------------------------------------------------------------------- activation
def relu(x):
    x = np.asarray(x)
    return np.where(np.isnan(x) | (x > 0), x, 0).astype(x.dtype)


def relu_backward(grad_output, x):
    # PyTorch threshold_backward: zero where x <= 0; a NaN input (NaN <= 0 is false) passes the gradient
    return np.where(np.asarray(x) <= 0, 0, grad_output).astype(np.asarray(grad_output).dtype)
