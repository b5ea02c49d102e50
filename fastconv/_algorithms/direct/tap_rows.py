"""grad_weight of the direct algorithm for layers with few output channels (LeNet's, a U-Net's
first ones): output channels as vector lanes, several taps' sums in registers.

``gw[t, kk] = sum over images b and output positions (oy, ox) of
xq[b, c_t, oy*sh + r_t*dh, ox*sw + s_t*dw] * gy[b, kk, oy, ox]`` for every tap t = (c, r, s):
each image's output gradient is turned into rows of positions x ``kp`` channels (kp: k rounded up
to whole vectors, zeros past k), and the emitted loop ``_row_dot`` (shared with the channels_last
first layers) sums a few taps' products along a run of positions with one broadcast input element
and one vector of the gradient row per tap and position.  The per-tap dot products of the other
grad_weight kernels reduce every sum across the lanes at its end, which for lenet5-c3's
100-position planes cost as much as the products (0.46-0.54 ms against PyTorch's 0.24).

With stride 1 rows and an input free of NaN/Inf the output rows of an image are one run: the
gradient rows get the input's row pitch with zeros in the extra columns (whose inputs they then
multiply), so a tap is one loop over the whole image; otherwise one loop per output row.  The sums
are kept per part (a fixed block of images, GW_PARTS of them at most) and added in order: the
result does not depend on the thread count.  Kept in a file of its own: numba's cache is per file.
"""
import numpy as np
from numba import prange

from ..._jit import BOUNDSCHECK, kernel
from .._gemm_kernels import VBYTES, _lanes
from .._nhwc_small_kernels import MAX_VECTORS, _npos, _positions, _row_dot

#: Most parts the images are summed in (a count from the shape alone: the bits do not depend on
#: the threads); enough for two threads to share out evenly.
GW_PARTS = 8

_u = np.uint64


@kernel
def grad_weight_rows(xq, toff, gy, oh, ow, wq, sh, sw, merged, kp, per, parts, grows):
    """``parts[q, t*kp + kk]`` = the sum over images ``q*per .. q*per + per - 1`` of tap t's products
    (module docstring); ``xq`` (n, c, L) padded planes of row pitch ``wq`` (``pad_planes``, no
    column split), ``toff[t]`` tap t's offset in an image's planes, ``gy`` (n, k, oh, ow)
    C-contiguous, ``grows`` (parts, oh*wq*kp) the parts' gradient rows."""
    nn, k = gy.shape[0], gy.shape[1]
    npart = parts.shape[0]
    lanes = _lanes(gy)
    nv = kp // lanes
    npos = _npos(nv)
    nt = toff.size
    img = xq.shape[1] * xq.shape[2]
    xf = xq.reshape(-1)
    gf = gy.reshape(-1)
    run = (oh - 1) * wq + ow
    if BOUNDSCHECK:  # _row_dot reads unchecked
        last = toff.max() + ((oh - 1) * sh * wq + (ow - 1) * sw if not merged else run - 1)
        if last >= img or toff.min() < 0:
            raise IndexError("grad_weight_rows: a tap reads past the image's planes")
    for pq in prange(npart):
        acc = parts[pq]
        g = grows[pq]
        for i in range(acc.size):
            acc[i] = 0
        for i in range(g.size):
            g[i] = 0  # the columns past ow and the channels past k stay zero
        for b in range(pq * per, min(nn, (pq + 1) * per)):
            for kk in range(k):
                src = _u((b * k + kk) * oh * ow)
                for oy in range(_u(oh)):
                    d = oy * _u(wq * kp) + _u(kk)
                    s0 = src + oy * _u(ow)
                    for ox in range(_u(ow)):
                        g[d + ox * _u(kp)] = gf[s0 + ox]
            x0 = b * img
            for t in range(0, nt, npos):
                if merged:
                    _row_dot(xf, x0, toff[t:], run, g, 0, kp, acc, t * kp, nv, 1, nt - t)
                else:
                    for oy in range(oh):
                        _row_dot(xf, x0 + oy * sh * wq, toff[t:], ow, g, oy * wq * kp, kp, acc, t * kp, nv,
                                 sw, nt - t)


def padded_channels(k, itemsize):
    """k output channels rounded up to whole vectors: the gradient rows' ``kp``."""
    lanes = VBYTES // itemsize
    return -(-k // lanes) * lanes


def usable(k, itemsize):
    """Whether k output channels fit the emitted loop (at most MAX_VECTORS vectors)."""
    return padded_channels(k, itemsize) <= MAX_VECTORS * (VBYTES // itemsize)


def taps_per_pass(kp, itemsize):
    """Taps whose sums one pass of the emitted loop keeps in registers for kp channels."""
    return _positions(kp // (VBYTES // itemsize))
