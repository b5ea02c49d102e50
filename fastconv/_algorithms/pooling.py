"""Max- and average-pooling (also adaptive average and channels_last): the Python drivers, which
validate nothing (functional did), allocate the outputs and call the kernels of
:mod:`fastconv._algorithms._pooling_kernels` (numba's cache is kept per source file).
"""
import numpy as np

# the layout helpers shared with the convolutions: is_channels_last, and NHWC <-> NCHW by a tiled
# parallel transpose (a view where the array already has the layout)
from .._config import result, result_zeros
from .nhwc import channels_last_view as _nchw_view
from .nhwc import is_channels_last, to_nchw
from .nhwc import to_nhwc as _nhwc
from ._pooling_kernels import (_adaptive_avg_backward, _adaptive_avg_backward_nhwc, _adaptive_avg_forward,
                               _adaptive_avg_forward_nhwc, _avg_backward, _avg_backward_nhwc, _avg_backward_sep,
                               _avg_forward, _avg_forward_nhwc, _avg_forward_sep, _max_backward, _max_backward_nhwc,
                               _max_forward, _max_forward_2x2, _max_forward_3x3, _max_forward_3x3_rows,
                               _max_forward_nhwc, _max_forward_sep)


# --------------------------------------------------------------------------- Python drivers
def _planes(a):
    n, c, h, w = a.shape
    return np.ascontiguousarray(a).reshape(n * c, h, w)


def _is_2x2(p):
    return ((p.kh, p.kw, p.sh, p.sw, p.ph, p.pw, p.dh, p.dw) == (2, 2, 2, 2, 0, 0, 1, 1)
            and 2 * p.oh <= p.h and 2 * p.ow <= p.w)


def _is_3x3(p):
    # _max_forward_3x3's cases: 3x3 windows without dilation, each holding an input element (as
    # _is_separable's)
    return ((p.kh, p.kw, p.dh, p.dw) == (3, 3, 1, 1) and p.ph < 3 and p.pw < 3
            and (p.oh - 1) * p.sh - p.ph < p.h and (p.ow - 1) * p.sw - p.pw < p.w and p.h * p.w < 2**31)


def _is_separable(p):
    # _max_forward_sep's cases: column stride 1, or 3-wide windows at column stride 2; every window
    # holds an input element: the last ones start inside the plane (ceil_mode keeps them there) and
    # the first ones reach it
    return ((p.dh, p.dw) == (1, 1) and (p.sw == 1 or (p.sw, p.kw) == (2, 3)) and p.pw < p.kw and p.ph < p.kh
            and (p.oh - 1) * p.sh - p.ph < p.h and (p.ow - 1) * p.sw - p.pw < p.w and p.h * p.w < 2**31)


def max_forward_work(p):
    """The forward's work in the thread policy's units (``fastconv._threads.SERIAL_WORK``): compared
    elements, a quarter of them on the 2x2 path, which is ~4x cheaper per element (LeNet's pool,
    301K elements, 0.154 ms on one thread and 0.079 on two on the Zen 4 VM)."""
    size = p.n * p.c * p.h * p.w
    return size // 4 if _is_2x2(p) else size


# Below this many channels a channels_last max-pool runs the NCHW kernels on a transposed copy and
# transposes the results back: the NHWC kernels' inner loop is over channels, and LeNet's 6 channels
# ran ~9x slower that way (14.7 vs 1.6 ms fwd+bwd on lenet5-pool, shared 2-core machine).
CL_MIN_CHANNELS = 16


def _to_cl(a):
    return _nchw_view(_nhwc(a))


# The other way round, NCHW planes with at least CL_MIN_CHANNELS channels whose output rows are at
# most this short run the channels_last kernels on a transposed copy (outputs transposed back): the
# NCHW kernels' row loops then cover a vector or less.  2 threads, Zen 4, ms NCHW / via channels_last
# (transposes included), max with indices: 16x512x3x3 3x3/s1/p1 0.83 / 0.16, 16x64x14x14 3x3/s1/p1
# 0.62 / 0.35, 16x128x20x20 3x3/s2/p1 0.93 / 0.36, 32x256x8x8 2x2 0.52 / 0.28, 32x64x12x12 2x2
# 0.19 / 0.12; kept: 32x64x16x16 2x2 0.07 / 0.17, 16x32x32x32 3x3/s1 0.86 / 1.27.  Average (forward
# / backward): 32x256x8x8 2x2 1.28 / 0.19 and 1.49 / 0.17, 16x512x3x3 3x3/s1/p1 0.45 / 0.08,
# 8x64x56x56 2x2 0.82 / 0.31 and 0.94 / 0.51; kept: 64x6x28x28 2x2 0.26 / 0.42 (6 channels),
# 8x64x112x112 3x3/s2/p1 3.26 / 3.46.  The 2x2 max kernel loses only on large tensors: LeNet's
# 32x16x10x10 0.050 / 0.073, 16x64x6x6 0.042 / 0.054 (hence NCHW_VIA_CL_2X2_MIN elements).
NCHW_VIA_CL_MAX_COLS = {"max2x2": 6, "max": 16, "avg": 32}
NCHW_VIA_CL_2X2_MIN = 1 << 18


def _via_cl(x, p, kind):
    two = kind == "max" and _is_2x2(p)
    return (not is_channels_last(x) and p.c >= CL_MIN_CHANNELS and p.h * p.w < 2**31 and x.size
            and p.ow <= NCHW_VIA_CL_MAX_COLS["max2x2" if two else kind]
            and (not two or x.size >= NCHW_VIA_CL_2X2_MIN))


def max_forward(x, p):
    if is_channels_last(x) and p.c < CL_MIN_CHANNELS:
        y, idx = max_forward(to_nchw(x), p)
        return _to_cl(y), _to_cl(idx)
    if _via_cl(x, p, "max"):
        y, idx = _max_forward_cl(x, p)
        return to_nchw(y), to_nchw(idx)
    if is_channels_last(x) and p.h * p.w < 2**31:
        return _max_forward_cl(x, p)
    y = result(p.y_shape, x.dtype)
    idx = result(p.y_shape, np.int64)
    if y.size and _is_2x2(p):
        _max_forward_2x2(_planes(x), y.reshape(-1, p.oh, p.ow), idx.reshape(-1, p.oh, p.ow))
    elif y.size and _is_3x3(p) and p.sw <= 2:
        _max_forward_3x3_rows(_planes(x), y.reshape(-1, p.oh, p.ow), idx.reshape(-1, p.oh, p.ow), p.sh, p.sw, p.ph,
                              p.pw)
    elif y.size and _is_3x3(p):
        _max_forward_3x3(_planes(x), y.reshape(-1, p.oh, p.ow), idx.reshape(-1, p.oh, p.ow), p.sh, p.sw, p.ph, p.pw)
    elif y.size and _is_separable(p):
        _max_forward_sep(_planes(x), y.reshape(-1, p.oh, p.ow), idx.reshape(-1, p.oh, p.ow),
                         p.kh, p.kw, p.sh, p.sw, p.ph, p.pw)
    elif y.size:
        _max_forward(_planes(x), y.reshape(-1, p.oh, p.ow), idx.reshape(-1, p.oh, p.ow),
                     p.kh, p.kw, p.sh, p.sw, p.ph, p.pw, p.dh, p.dw, x.dtype.type(-np.inf))
    return y, idx


def max_backward(gy, idx, input_shape):
    """Scatter ``gy`` to the flat positions ``idx``; returns ``(grad_input, ok)``."""
    if is_channels_last(gy) and input_shape[1] < CL_MIN_CHANNELS:
        gx, ok = max_backward(to_nchw(gy), to_nchw(idx), input_shape)
        return _to_cl(gx), ok
    if is_channels_last(gy):
        return _max_backward_cl(gy, idx, input_shape)
    n, c, h, w = input_shape
    gx = result((n * c, h * w), gy.dtype)
    bad = np.zeros(n * c, dtype=np.uint8)
    if gy.size == 0:
        gx[:] = 0
    elif gx.size:
        _max_backward(np.ascontiguousarray(gy).reshape(n * c, -1),
                      np.ascontiguousarray(idx, dtype=np.int64).reshape(n * c, -1), gx, bad)
    return gx.reshape(input_shape), not bad.any()


def avg_forward(x, p, count_include_pad, divisor_override=0):
    """``divisor_override`` 0 means none (PyTorch refuses 0 itself)."""
    via = _via_cl(x, p, "avg")
    if via or is_channels_last(x):
        y = result((p.n, p.oh, p.ow, p.c), x.dtype)
        if y.size:
            _avg_forward_nhwc(_nhwc(x), y, p.kh, p.kw, p.sh, p.sw, p.ph, p.pw, bool(count_include_pad),
                              int(divisor_override))
        return to_nchw(_nchw_view(y)) if via else _nchw_view(y)
    y = result(p.y_shape, x.dtype)
    if y.size:
        kernel = _avg_forward_sep if p.sw <= 2 else _avg_forward
        kernel(_planes(x), y.reshape(-1, p.oh, p.ow), p.kh, p.kw, p.sh, p.sw, p.ph, p.pw,
               bool(count_include_pad), int(divisor_override), x.dtype.type(0))
    return y


def avg_backward(gy, p, count_include_pad, divisor_override=0):
    via = _via_cl(gy, p, "avg")
    if via or is_channels_last(gy):
        gx = result((p.n, p.h, p.w, p.c), gy.dtype)
        if gx.size:
            _avg_backward_nhwc(_nhwc(gy), gx, p.kh, p.kw, p.sh, p.sw, p.ph, p.pw, bool(count_include_pad),
                               int(divisor_override))
        return to_nchw(_nchw_view(gx)) if via else _nchw_view(gx)
    sep = p.sw <= 2 and gy.size > 0  # _avg_backward_sep writes every element of gx
    gx = (result if sep else result_zeros)((p.n * p.c, p.h, p.w), gy.dtype)
    if gx.size:
        (_avg_backward_sep if sep else _avg_backward)(
            _planes(gy), gx, p.kh, p.kw, p.sh, p.sw, p.ph, p.pw, bool(count_include_pad), int(divisor_override))
    return gx.reshape(p.n, p.c, p.h, p.w)


# --------------------------------------------------------------------------- adaptive average pooling
def adaptive_avg_forward(x, out_hw, out=None):
    n, c = x.shape[:2]
    if is_channels_last(x) and out is None:
        y = result((n,) + tuple(out_hw) + (c,), x.dtype)
        if y.size:
            _adaptive_avg_forward_nhwc(_nhwc(x), y, x.dtype.type(0))
        return _nchw_view(y)
    y = result((n, c) + tuple(out_hw), x.dtype) if out is None else out
    if y.size:
        _adaptive_avg_forward(_planes(x), y.reshape(n * c, *out_hw), x.dtype.type(0))
    return y


def adaptive_avg_backward(gy, input_shape):
    n, c, h, w = input_shape
    if is_channels_last(gy):
        gx = result((n, h, w, c), gy.dtype)
        if gx.size:
            _adaptive_avg_backward_nhwc(_nhwc(gy), gx)
        return _nchw_view(gx)
    gx = result((n * c, h, w), gy.dtype)
    if gy.size == 0:
        gx[:] = 0
    elif gx.size:
        _adaptive_avg_backward(_planes(gy), gx)
    return gx.reshape(input_shape)




# --------------------------------------------------------------------------- channels_last (NHWC)
# (the kernels and why they exist: _pooling_kernels.py)
def _max_forward_cl(x, p):
    y = result((p.n, p.oh, p.ow, p.c), x.dtype)
    idx = result((p.n, p.oh, p.ow, p.c), np.int64)
    if y.size:
        _max_forward_nhwc(_nhwc(x), y, idx, p.kh, p.kw, p.sh, p.sw, p.ph, p.pw, p.dh, p.dw,
                          x.dtype.type(-np.inf))
    return _nchw_view(y), _nchw_view(idx)


def _max_backward_cl(gy, idx, input_shape):
    n, c, h, w = input_shape
    gx = result((n, h * w, c), gy.dtype)
    bad = np.zeros(n, dtype=np.uint8)
    if gy.size == 0:
        gx[:] = 0
    elif gx.size:
        oh, ow = gy.shape[2], gy.shape[3]
        _max_backward_nhwc(_nhwc(gy).reshape(n, oh * ow, c),
                           _nhwc(idx.astype(np.int64, copy=False)).reshape(n, oh * ow, c), gx, bad)
    return _nchw_view(gx.reshape(n, h, w, c)), not bad.any()
