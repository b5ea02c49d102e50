"""A dilated stride-1 convolution as an undilated one on the input's phase sub-images.

With dilation (dh, dw) and stride 1, output (i, j) = (dh*i' + pi, dw*j' + pj) only reads padded
input rows ``dh*(i' + r) + pi`` and columns ``dw*(j' + s) + pj``: the phase sub-image
``X_{pi,pj}[u, v] = x_pad[dh*u + pi, dw*v + pj]`` convolved with the same (undilated) kernel,
unpadded, gives exactly the outputs of phase (pi, pj).  The dh*dw phases are stacked into the
batch (padded with zeros to one size: ceil(oh/dh) + R - 1 rows and so on), so that an algorithm
that serves only dilation 1 (Winograd) runs all of them in one call:

* forward: y[:, :, pi::dh, pj::dw] = conv(X_{pi,pj}) cropped to the phase's outputs;
* grad_input: the stacked grad_output (zero outside each phase's outputs) through the undilated
  grad_input, then each phase's rows and columns back to the input positions they came from
  (the padded input's positions fall into exactly one phase each: an assignment, no sums);
* grad_weight: the undilated grad_weight of the stacked problem: its sum over the batch is the sum
  over images and phases.

The copies (numba kernels over the planes) cost one pass over the input and one over the output.
"""
from __future__ import annotations

import dataclasses

import numpy as np
from numba import prange

from .._config import result
from .._jit import kernel, micro
from .common import _gather, _scatter, _zero


def stacked(p):
    """The parameters of the stacked undilated problem for ``p`` (stride 1): batch n*dh*dw, sub-images
    ceil(oh/dh) + (R - 1) x ceil(ow/dw) + (S - 1), padding 0, dilation 1."""
    ohs, ows = -(-p.oh // p.dh), -(-p.ow // p.dw)
    hs, ws = ohs + p.r - 1, ows + p.s - 1
    return dataclasses.replace(p, n=p.n * p.dh * p.dw, h=hs, w=ws, oh=ohs, ow=ows, ph0=0, ph1=0, pw0=0, pw1=0,
                               dh=1, dw=1)


@micro
def _valid(size, pad0, d, ph, count):
    # sub-image indices [v0, v1) whose source d*v + ph - pad0 lies in [0, size), v < count
    v0 = max(0, (pad0 - ph + d - 1) // d)
    v1 = min(count, (size - 1 + pad0 - ph) // d + 1) if size - 1 + pad0 - ph >= 0 else 0
    return v0, max(v0, v1)


# The copies run over flat arrays through common._gather / _scatter (unsigned offsets, constant
# steps 1 and 2; per-row views and signed strided indexing kept them scalar).  8x64x64x64,
# dilation 2, 2 threads, one process: the input's split 1.65 -> 0.76 ms, the output's merge
# 0.78 -> 0.61 (and the results on kept memory, not faulted in afresh: the forward 8.1 -> 6.4 ms).

@kernel
def _split(x, out, dh, dw, ph0, pw0):
    # out[(pi*dw + pj)*n + b, c, u, v] = x[b, c, dh*u + pi - ph0, dw*v + pj - pw0], 0 outside x
    n, c, h, w = x.shape
    hs, ws = out.shape[2], out.shape[3]
    xf = x.reshape(-1)
    of = out.reshape(-1)
    for it in prange(n * c):
        b = it // c
        ch = it - b * c
        for pi in range(dh):
            for pj in range(dw):
                ob = (((pi * dw + pj) * n + b) * c + ch) * hs * ws
                v0, v1 = _valid(w, pw0, dw, pj, ws)
                for u in range(hs):
                    o0 = ob + u * ws
                    r = dh * u + pi - ph0
                    if r < 0 or r >= h:
                        _zero(of, o0, ws)
                        continue
                    _zero(of, o0, v0)
                    s0 = ((b * c + ch) * h + r) * w + dw * v0 + pj - pw0
                    _gather(xf, s0, dw, of, o0 + v0, v1 - v0)
                    _zero(of, o0 + v1, ws - v1)


@kernel
def _merge(ys, y, dh, dw):
    # y[b, k, dh*i + pi, dw*j + pj] = ys[(pi*dw + pj)*n + b, k, i, j]
    n, k, oh, ow = y.shape
    ohs, ows = ys.shape[2], ys.shape[3]
    yf = y.reshape(-1)
    sf = ys.reshape(-1)
    for it in prange(n * k):
        b = it // k
        ch = it - b * k
        for r in range(oh):
            pi = r % dh
            i = r // dh
            d0 = ((b * k + ch) * oh + r) * ow
            for pj in range(dw):
                s0 = ((((pi * dw + pj) * n + b) * k + ch) * ohs + i) * ows
                cnt = (ow - pj + dw - 1) // dw
                _scatter(sf, s0, yf, d0 + pj, dw, cnt)


@kernel
def _split_out(gy, out, dh, dw):
    # out[(pi*dw + pj)*n + b, k, i, j] = gy[b, k, dh*i + pi, dw*j + pj], 0 past the output
    n, k, oh, ow = gy.shape
    ohs, ows = out.shape[2], out.shape[3]
    gf = gy.reshape(-1)
    of = out.reshape(-1)
    for it in prange(n * k):
        b = it // k
        ch = it - b * k
        for pi in range(dh):
            for pj in range(dw):
                ob = (((pi * dw + pj) * n + b) * k + ch) * ohs * ows
                cnt = min(ows, (ow - pj + dw - 1) // dw)
                for i in range(ohs):
                    o0 = ob + i * ows
                    r = dh * i + pi
                    if r >= oh:
                        _zero(of, o0, ows)
                        continue
                    s0 = ((b * k + ch) * oh + r) * ow + pj
                    _gather(gf, s0, dw, of, o0, cnt)
                    _zero(of, o0 + cnt, ows - cnt)


@kernel
def _merge_in(gxs, gx, dh, dw, ph0, pw0):
    # gx[b, c, r, col] = gxs[(pi*dw + pj)*n + b, c, u, v] with r + ph0 = dh*u + pi, col + pw0 = dw*v + pj
    # (0 where u, v fall outside the sub-images: positions no output reads)
    n, c, h, w = gx.shape
    hs, ws = gxs.shape[2], gxs.shape[3]
    gf = gx.reshape(-1)
    sf = gxs.reshape(-1)
    for it in prange(n * c):
        b = it // c
        ch = it - b * c
        for r in range(h):
            u = (r + ph0) // dh
            pi = r + ph0 - u * dh
            d0 = ((b * c + ch) * h + r) * w
            if u >= hs:
                _zero(gf, d0, w)
                continue
            for pj in range(dw):
                s0 = ((((pi * dw + pj) * n + b) * c + ch) * hs + u) * ws
                v0, v1 = _valid(w, pw0, dw, pj, ws)
                _scatter(sf, s0 + v0, gf, d0 + dw * v0 + pj - pw0, dw, v1 - v0)
                # columns of this phase past the sub-image: no output reads them
                for v in range(v1, (w + pw0 - pj + dw - 1) // dw):
                    gf[d0 + dw * v + pj - pw0] = 0


def split_input(x, p, q):
    """(n*dh*dw, c, q.h, q.w) stacked phase sub-images of the zero-padded ``x``, phase-major."""
    out = result((p.dh * p.dw * p.n, p.c, q.h, q.w), x.dtype)
    _split(np.ascontiguousarray(x), out, p.dh, p.dw, p.ph0, p.pw0)
    return out


def split_output(gy, p, q):
    """(n*dh*dw, k, q.oh, q.ow) stacked phases of ``gy``, zero past each phase's outputs."""
    out = result((p.dh * p.dw * p.n, p.k, q.oh, q.ow), gy.dtype)
    _split_out(np.ascontiguousarray(gy), out, p.dh, p.dw)
    return out


def merge_output(ys, p, q):
    """The (n, k, oh, ow) output from the stacked phases' outputs."""
    y = result((p.n, p.k, p.oh, p.ow), ys.dtype)
    _merge(np.ascontiguousarray(ys), y, p.dh, p.dw)
    return y


def merge_input(gxs, p, q):
    """The (n, c, h, w) input gradient from the stacked phases' input gradients."""
    gx = result((p.n, p.c, p.h, p.w), gxs.dtype)
    _merge_in(np.ascontiguousarray(gxs), gx, p.dh, p.dw, p.ph0, p.pw0)
    return gx
