"""Planning and cost model of the FFT algorithm: how a pass is cut into tiles, batch chunks and
output-channel chunks under ``p.workspace_limit``, and what a plan costs in seconds (see
:mod:`fastconv._algorithms.fft` for the method and the notation).
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple

import scipy.fft as sfft


class Plan(NamedTuple):
    """How one pass is cut: FFT size (nh, nw), tile extent (th, tw) in the pass's output rows and
    columns, batch chunk nb and output-channel chunk kb; ws is the workspace in bytes."""

    nh: int
    nw: int
    th: int
    tw: int
    nb: int
    kb: int
    ws: int


def _span(pass_, t, st, e):
    """Rows of the FFT buffer that a tile of ``t`` rows of the pass's output needs."""
    return t + e if pass_ == "grad_input" else (t - 1) * st + e + 1


def _tile(pass_, nfft, st, e):
    """Most rows of the pass's output that one FFT of length ``nfft`` serves (< 1: none)."""
    return nfft - e if pass_ == "grad_input" else (nfft - e - 1) // st + 1


def _whole(pass_, total, n_out, st, e, p0):
    """grad_input only: the shortest FFT that serves a whole axis of ``total`` input rows in one
    tile (else 0).  The stride-spread gradient (``(n_out - 1)*st + 1`` rows) correlated with the
    kernel has ``(n_out - 1)*st + 1 + e`` rows of support, and the kept rows are ``[p0, p0 + total)``
    of it: one circular transform holding both without overlap needs only the longer of the two,
    less than the ``total + e`` an overlap-save tile needs when the padding is smaller than the
    kernel (``valid``: ``total`` instead of ``total + e``).  Outputs are read modulo the length."""
    if pass_ != "grad_input":
        return 0
    return max((n_out - 1) * st + 1 + e, p0 + total)


def _sizes(pass_, total, st, e, whole=0):
    """Candidate FFT lengths, largest (whole extent in one tile) first."""
    full = sfft.next_fast_len(_span(pass_, total, st, e), real=True)
    cand = {full}
    if 0 < whole < full:
        cand.add(sfft.next_fast_len(whole, real=True))
    for m in range(2, 17):
        cand.add(sfft.next_fast_len(_span(pass_, -(-total // m), st, e), real=True))
    t = 1
    while t < total:
        cand.add(sfft.next_fast_len(_span(pass_, t, st, e), real=True))
        t *= 2
    return sorted((c for c in cand if c <= full), reverse=True)


def _workspace(p, pass_, nh, nw, nb, kb):
    """Peak bytes of one step: the scratch buffers of a call (see :func:`fastconv._config.scratch`) -- one real
    tile buffer shared by the input and output tiles, the input and output spectra, the kernel
    row DFTs -- all alive at once, since they are kept for the next call."""
    isz = p.itemsize
    pl, f, wf = nh * nw, nh * (nw // 2 + 1), nw // 2 + 1
    t = wf * p.r * 2 * p.cg * kb * isz  # kernel row DFTs (grad_weight: its row sums)
    c, k = p.c, p.k
    if pass_ == "forward":
        return t + pl * nb * max(c, kb) * isz + f * nb * (c + kb) * 2 * isz
    if pass_ == "grad_input":
        return t + pl * nb * max(k, c) * isz + f * nb * (k + c) * 2 * isz
    return t + p.r * p.s * p.cg * kb * isz + pl * nb * max(c, k) * isz + f * nb * (c + k) * 2 * isz


# Cost model: single-thread seconds fitted to thread_time() measurements on the 2-core EPYC (AVX2)
# development box (numba 0.68, scipy 1.17, float32; shared and loaded, so +-25%), then divided by
# the thread count at 60% efficiency.  Constants are rounded *up*, and a call has a fixed floor
# (about ten scipy/numba dispatches with their thread wake-ups and buffer allocations) so small
# layers never look cheap: the tiny cases measured 0.1 ms of CPU per pass on one thread.
_C_CALL = 2.5e-4      # per call
_C_STEP = 2.5e-4      # per (tile, batch chunk, channel chunk) step: 6-8 kernel / FFT launches
_C_FFT = 0.35e-9      # per plane element per log2(plane size), one transform
_C_MAC = 0.35e-9      # per complex multiply-add in the contraction kernels (grad_weight: x1.3)
_C_MEM = 2.5e-9       # per element packed into / unpacked from a channels-last buffer
_C_ROW = 0.2e-9       # per multiply-add of the kernel row DFTs (and grad_weight's column sums)
_C_LOOP = 5e-9        # per inner vector loop of the contraction kernels (start-up and remainder)


def _single_cost(p, pass_, pl):
    """Single-thread seconds of one pass under plan ``pl`` (without the per-call floor)."""
    nh, nw, th, tw, nb, kb = pl.nh, pl.nw, pl.th, pl.tw, pl.nb, pl.kb
    tot_h, tot_w = (p.h, p.w) if pass_ == "grad_input" else (p.oh, p.ow)
    tiles = -(-tot_h // th) * -(-tot_w // tw)
    nch, kch = -(-max(p.n, 1) // nb), -(-p.k // kb)
    wf = nw // 2 + 1
    planes = max(p.n, 1) * (p.c + p.k)
    fft = planes * nh * nw * math.log2(max(nh * nw, 2)) * _C_FFT
    rdft = p.r / (4 if nh % 4 == 0 else (2 if nh % 2 == 0 else 1))  # radix-4/2 step over rows
    macs = nh * wf * p.cg * p.k * (max(p.n, 1) + nch * rdft) * (1.3 if pass_ == "grad_weight" else 1.0)
    rows = nch * wf * p.r * p.s * p.cg * p.k * 2
    mem = planes * nh * nw * _C_MEM
    # every channel chunk streams the batch chunk's input (forward) / result (grad_input) spectra
    # again, and short inner loops (few channels per group) cost their overhead
    reread = (kch - 1) * nh * wf * max(p.n, 1) * p.c * 2 * _C_MEM if pass_ != "grad_weight" else 0.0
    loops = nh * wf * (max(p.n, 1) * max(1, p.cg // 2) * p.g + nch * p.r) * _C_LOOP
    return tiles * (fft + macs * _C_MAC + rows * _C_ROW + mem + reread + loops)


def _steps(p, pass_, pl):
    tot_h, tot_w = (p.h, p.w) if pass_ == "grad_input" else (p.oh, p.ow)
    tiles = -(-tot_h // pl.th) * -(-tot_w // pl.tw)
    return tiles * -(-max(p.n, 1) // pl.nb) * -(-p.k // pl.kb)


# Tilings are chosen for this thread count whatever the pool size, so that a call's result (its
# rounding) never depends on the thread count or on which thread count planned first.
_PLAN_THREADS = 2


def _cost_of(p, pass_, pl, threads):
    # the per-step launches do not get faster with more threads (each is a fork/join); the rest
    # scaled 1.3-1.9x from 1 to 2 threads on the (shared) development box: 60% efficiency assumed
    return (_C_CALL + _steps(p, pass_, pl) * _C_STEP
            + _single_cost(p, pass_, pl) / (1.0 + 0.6 * (threads - 1)))


@functools.lru_cache(maxsize=256)
def _plan(p, pass_):
    """The cheapest :class:`Plan` whose workspace fits ``p.workspace_limit``, or a reason string."""
    eh, ew = p.dh * (p.r - 1), p.dw * (p.s - 1)
    tot_h, tot_w = (p.h, p.w) if pass_ == "grad_input" else (p.oh, p.ow)
    best, best_cost, smallest = None, float("inf"), None
    whole_h = _whole(pass_, tot_h, p.oh, p.sh, eh, p.ph0)
    whole_w = _whole(pass_, tot_w, p.ow, p.sw, ew, p.pw0)
    for nh in _sizes(pass_, tot_h, p.sh, eh, whole_h):
        th = tot_h if 0 < whole_h <= nh else min(tot_h, _tile(pass_, nh, p.sh, eh))
        if th < 1:
            continue
        for nw in _sizes(pass_, tot_w, p.sw, ew, whole_w):
            tw = tot_w if 0 < whole_w <= nw else min(tot_w, _tile(pass_, nw, p.sw, ew))
            if tw < 1:
                continue
            nb = max(p.n, 1)  # n == 0 is answered before any pass runs
            while True:
                kb = p.k
                while kb > 1 and _workspace(p, pass_, nh, nw, nb, kb) > p.workspace_limit:
                    kb = -(-kb // 2)
                ws = _workspace(p, pass_, nh, nw, nb, kb)
                if ws <= p.workspace_limit or nb == 1:
                    break
                nb = -(-nb // 2)
            pl = Plan(nh, nw, th, tw, nb, kb, ws)
            if smallest is None or ws < smallest.ws:
                smallest = pl
            if ws > p.workspace_limit:
                continue
            c = _cost_of(p, pass_, pl, _PLAN_THREADS)
            if c < best_cost:
                best, best_cost = pl, c
    if best is None:
        need = smallest.ws if smallest else 0
        return (f"its smallest tiling needs {need} bytes of workspace, more than workspace_limit="
                f"{p.workspace_limit}")
    return best
