"""What ``fastconv bench`` measures with: interleaved timing, the sgemm and same-shape GEMM
yardsticks, the plain NumPy references, and the contestants of one case and pass -- fastconv's
algorithms, and PyTorch in this process or in a worker process driven call by call (see
:mod:`fastconv.bench` for how the figures are used).
"""
from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
import time

import numpy as np

from . import cases as _cases

#: Names of the PyTorch reference rows by layout: NCHW, channels_last.
TORCH_LAYOUTS = {"nchw": "torch", "cl": "torch-cl"}


# --------------------------------------------------------------------------- timing
def time_interleaved(fns, budget=1.0, min_rounds=3, max_rounds=15, stat="median"):
    """Seconds per call of each function in ``fns`` (``stat``: ``'median'`` or ``'min'`` of the
    rounds), timed round-robin so load spikes hit every contestant alike.  Each round calls them in
    another order (a fixed-seed shuffle): the call after a pause (a reference call in another
    process sleeps around its call) runs on cold cores here, up to 2x slower for a
    sub-millisecond layer, and shuffling spreads that over all contestants instead of charging it
    to whichever follows the reference every round (a rotation would keep the cyclic order).

    Every function is called twice first (compile, caches, page faults); the number of rounds fills
    ``budget`` seconds, clipped to ``[min_rounds, max_rounds]``.  A function with a true
    ``returns_seconds`` attribute times itself (a call into another process) and returns the seconds.

    >>> t = time_interleaved([lambda: sum(range(100)), lambda: None], budget=0.01)
    >>> len(t), all(s >= 0 for s in t)
    (2, True)
    """
    est = []
    for f in fns:
        _timed(f)
        est.append(_timed(f))
    rounds = int(min(max_rounds, max(min_rounds, budget / max(sum(est), 1e-9))))
    times = [[] for _ in fns]
    order = np.random.default_rng(0)
    for _ in range(rounds):
        for j in order.permutation(len(fns)):
            times[j].append(_timed(fns[j]))
    reduce = np.min if stat == "min" else np.median
    return [float(reduce(ts)) for ts in times]


def _timed(f):
    if getattr(f, "returns_seconds", False):
        return f()
    t0 = time.perf_counter()
    f()
    return time.perf_counter() - t0


def _matmul_seconds(g, m, n, k, rounds):
    """Best time of one float32 ``(g, m, k) @ (g, k, n)`` product with numpy's BLAS as limited."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((g, m, k), dtype=np.float32)
    b = rng.standard_normal((g, k, n), dtype=np.float32)
    out = np.empty((g, m, n), np.float32)
    np.matmul(a, b, out=out)
    best = math.inf
    for _ in range(rounds):
        t0 = time.perf_counter()
        np.matmul(a, b, out=out)
        best = min(best, time.perf_counter() - t0)
    return best


def sgemm_gflops(size=1024, rounds=5):
    """Best GFLOP/s of a float32 ``size^3`` matrix product with numpy's BLAS as currently limited."""
    return 2.0 * size ** 3 / _matmul_seconds(1, size, size, size, rounds) / 1e9


def gemm_shapes(case, pass_):
    """``(groups, M, N, K)`` of the matrix products an im2col convolution does in this pass:
    forward ``W (K/g x C/g*R*S) @ cols``; backward ``W.T @ gy`` (grad_input's columns) and
    ``gy @ cols.T`` (grad_weight), over ``N*OH*OW`` output positions."""
    g, kg, cg = case.groups, case.k // case.groups, case.c // case.groups
    taps, pos = cg * case.r * case.s, case.n * case.oh * case.ow
    if pass_ == "forward":
        return [(g, kg, pos, taps)]
    return [(g, taps, pos, kg), (g, kg, taps, pos)]


#: Seconds to wait after the same-shape GEMMs: OpenBLAS's workers spin for ~0.1 s after a
#: multithreaded call, and a convolution timed meanwhile shares its cores with them (resnet50-3x3-64's
#: im2col forward: 17 ms alone, 38-43 ms right after an sgemm, 20 ms 0.1 s after it).
GEMM_SETTLE = 0.25


def gemm_seconds(case, pass_, rounds=3):
    """Best time of the plain float32 matrix products of :func:`gemm_shapes` with numpy's BLAS as
    currently limited: "a plain sgemm of similar size", the yardstick of issue 3's "% of sgemm"
    (a 1024^3 product runs faster than the thin products of most layers)."""
    return sum(_matmul_seconds(g, m, n, k, rounds) for g, m, n, k in gemm_shapes(case, pass_))


# --------------------------------------------------------------------------- plain NumPy references
def _windows(xp, i, j, case):
    """``xp[..., i*dh + sh*oh_index, j*dw + sw*ow_index]`` for all output positions (a strided view)."""
    (sh, sw), (dh, dw) = case.stride, case.dilation
    return xp[..., i * dh: i * dh + sh * (case.oh - 1) + 1: sh, j * dw: j * dw + sw * (case.ow - 1) + 1: sw]


def numpy_conv2d(x, w, b, case):
    """Forward convolution as ``R*S`` batched matrix products (plain NumPy, the no-torch baseline)."""
    n, g = x.shape[0], case.groups
    cg, kg, p = case.c // g, case.k // g, case.oh * case.ow
    ph, pw = case.padding
    xp = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw))).reshape(n, g, cg, x.shape[2] + 2 * ph, -1)
    wg = w.reshape(g, kg, cg, case.r, case.s)
    y = np.zeros((n, g, kg, p), x.dtype)
    for i in range(case.r):
        for j in range(case.s):
            y += wg[:, :, :, i, j] @ _windows(xp, i, j, case).reshape(n, g, cg, p)
    return y.reshape(n, case.k, case.oh, case.ow) + b[:, None, None]


def numpy_conv2d_backward(gy, x, w, case):
    """grad_input, grad_weight, grad_bias of :func:`numpy_conv2d`."""
    n, g = x.shape[0], case.groups
    cg, kg, p = case.c // g, case.k // g, case.oh * case.ow
    ph, pw = case.padding
    h, wd = x.shape[2], x.shape[3]
    xp = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw))).reshape(n, g, cg, h + 2 * ph, wd + 2 * pw)
    wg = w.reshape(g, kg, cg, case.r, case.s)
    gyg = gy.reshape(n, g, kg, p)
    gxp = np.zeros_like(xp)
    gw = np.empty_like(wg)
    for i in range(case.r):
        for j in range(case.s):
            xs = _windows(xp, i, j, case).reshape(n, g, cg, p)
            gw[:, :, :, i, j] = (gyg @ xs.transpose(0, 1, 3, 2)).sum(axis=0)
            _windows(gxp, i, j, case)[...] += (wg[:, :, :, i, j].transpose(0, 2, 1) @ gyg).reshape(
                n, g, cg, case.oh, case.ow)
    gx = gxp[..., ph:ph + h, pw:pw + wd].reshape(x.shape)
    return gx, gw.reshape(w.shape), gy.sum(axis=(0, 2, 3))


def numpy_max_pool2d(x, case):
    """Max pooling with flat ``ih*W + iw`` indices of the maxima (plain NumPy)."""
    from numpy.lib.stride_tricks import sliding_window_view
    (kh, kw), (sh, sw), (ph, pw) = case.kernel, case.stride, case.padding
    xp = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)), constant_values=-np.inf)
    win = sliding_window_view(xp, (kh, kw), axis=(2, 3))[:, :, ::sh, ::sw][:, :, :case.oh, :case.ow]
    win = win.reshape(win.shape[:4] + (kh * kw,))
    a = win.argmax(axis=-1)
    y = np.take_along_axis(win, a[..., None], axis=-1)[..., 0]
    ih = np.arange(case.oh)[:, None] * sh + a // kw - ph
    iw = np.arange(case.ow)[None, :] * sw + a % kw - pw
    return y, ih * x.shape[3] + iw


def numpy_max_pool2d_backward(gy, idx, shape):
    """Scatter-add of ``gy`` to the maxima (plain NumPy)."""
    n, c, h, w = shape
    gx = np.zeros((n * c, h * w), gy.dtype)
    np.add.at(gx, (np.arange(n * c)[:, None], idx.reshape(n * c, -1)), gy.reshape(n * c, -1))
    return gx.reshape(shape)


# --------------------------------------------------------------------------- contestants
def _torch_tensors(torch, arrays, layout):
    """The arrays as tensors; with ``layout='cl'`` the 4-D ones in channels_last memory format (as a
    PyTorch user with ``model.to(memory_format=torch.channels_last)`` hands them over)."""
    ts = [torch.from_numpy(a) for a in arrays]
    if layout == "cl":
        ts = [t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t for t in ts]
    return ts


def _torch_conv(case, x, w, b, gy, torch, layout="nchw"):
    tx, tw, tb, tgy = _torch_tensors(torch, (x, w, b, gy), layout)
    kw = case.kwargs
    aten = torch.ops.aten

    def forward():
        with torch.no_grad():
            torch.nn.functional.conv2d(tx, tw, tb, **kw)

    def backward():
        aten.convolution_backward(tgy, tx, tw, [case.k], list(case.stride), list(case.padding),
                                  list(case.dilation), False, [0, 0], case.groups, [True, True, True])
    return {"forward": forward, "backward": backward}


def _torch_pool(case, x, gy, torch, layout="nchw"):
    tx, tgy = _torch_tensors(torch, (x, gy), layout)
    k, s, p = list(case.kernel), list(case.stride), list(case.padding)
    aten = torch.ops.aten
    _, tidx = aten.max_pool2d_with_indices(tx, k, s, p, [1, 1], False)
    return {"forward": lambda: aten.max_pool2d_with_indices(tx, k, s, p, [1, 1], False),
            "backward": lambda: aten.max_pool2d_with_indices_backward(tgy, tx, k, s, p, [1, 1], False, tidx)}


def _conv_contestants(case, pass_, algorithms, reference, torch, worker=None, layouts=("nchw", "cl")):
    """``[(name, fn)]`` for one conv case and pass, the reference rows last (one per PyTorch layout in
    ``layouts``); algorithms that cannot serve it are left out."""
    import fastconv
    x, w, b = case.arrays()
    gy = case.grad_output()
    kw = case.kwargs
    out = []
    for alg in algorithms:
        if pass_ == "forward":
            def fn(alg=alg):
                return fastconv.conv2d(x, w, b, **kw, algorithm=alg)
        else:
            def fn(alg=alg):
                return fastconv.conv2d_backward(gy, x, w, **kw, algorithm=alg)
        try:
            fn()  # the compile happens here, outside any timing
        except fastconv.AlgorithmUnavailable:
            continue
        out.append((alg, fn))
    if worker is not None:
        out += [(TORCH_LAYOUTS[lay], worker.contestant("conv2d", case, pass_, lay)) for lay in layouts]
    elif reference == "torch":
        out += [(TORCH_LAYOUTS[lay], _torch_conv(case, x, w, b, gy, torch, lay)[pass_]) for lay in layouts]
    elif pass_ == "forward":
        out.append(("numpy", lambda: numpy_conv2d(x, w, b, case)))
    else:
        out.append(("numpy", lambda: numpy_conv2d_backward(gy, x, w, case)))
    return out


def _pool_contestants(case, pass_, reference, torch, worker=None, layouts=("nchw", "cl")):
    import fastconv
    x, gy = case.arrays(), case.grad_output()
    kw = case.kwargs
    _, idx = fastconv.max_pool2d(x, **kw, return_indices=True)
    if pass_ == "forward":
        out = [("fastconv", lambda: fastconv.max_pool2d(x, **kw, return_indices=True))]
    else:
        out = [("fastconv", lambda: fastconv.max_pool2d_backward(gy, idx, x.shape))]
    if worker is not None:
        out += [(TORCH_LAYOUTS[lay], worker.contestant("max_pool2d", case, pass_, lay)) for lay in layouts]
    elif reference == "torch":
        out += [(TORCH_LAYOUTS[lay], _torch_pool(case, x, gy, torch, lay)[pass_]) for lay in layouts]
    elif pass_ == "forward":
        out.append(("numpy", lambda: numpy_max_pool2d(x, case)))
    else:
        _, nidx = numpy_max_pool2d(x, case)
        out.append(("numpy", lambda: numpy_max_pool2d_backward(gy, nidx, x.shape)))
    return out


_WORKER = "from fastconv._bench_measure import _torch_worker; _torch_worker()"


class _TorchProcess:
    """PyTorch's side of the benchmark in a child process, driven one timed call at a time.

    Protocol: one JSON object per line each way.  ``{"op": "setup", "kind", "case", "pass", "layout"}``
    builds and warms a reference call and answers its ``"id"``; ``{"op": "run", "id"}`` answers
    ``{"seconds": ...}`` for one call of it (several calls, one per layout, are live at once).
    """

    GAP = 0.01

    def __init__(self, threads):
        self.proc = subprocess.Popen([sys.executable, "-c", _WORKER, str(threads)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, bufsize=1)

    def _ask(self, msg):
        self.proc.stdin.write(json.dumps(msg) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("fastconv bench: the PyTorch worker process exited (see its error above)")
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"fastconv bench: the PyTorch worker failed: {reply['error']}")
        return reply

    def contestant(self, op, case, pass_, layout="nchw"):
        ident = self._ask({"op": "setup", "kind": op, "case": dataclasses.asdict(case), "pass": pass_,
                           "layout": layout})["id"]

        def once():
            # Idle OpenMP workers spin for a while before they sleep; a pause on each side of the
            # reference call keeps one process's spinning pool from slowing the other's timed call.
            time.sleep(self.GAP)
            seconds = self._ask({"op": "run", "id": ident})["seconds"]
            time.sleep(self.GAP)
            return seconds
        once.returns_seconds = True
        return once

    def close(self):
        try:
            self.proc.stdin.close()
            self.proc.wait(timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()


def _torch_worker():
    """Main loop of the PyTorch worker process (see :class:`_TorchProcess`)."""
    import torch
    torch.set_num_threads(int(sys.argv[1]))
    fns, next_id = {}, 0
    for line in sys.stdin:
        msg = json.loads(line)
        try:
            if msg["op"] == "setup":
                fields = {k: tuple(v) if isinstance(v, list) else v for k, v in msg["case"].items()}
                layout = msg.get("layout", "nchw")
                if msg["kind"] == "conv2d":
                    case = _cases.ConvCase(**fields)
                    x, w, b = case.arrays()
                    fn = _torch_conv(case, x, w, b, case.grad_output(), torch, layout)[msg["pass"]]
                else:
                    case = _cases.PoolCase(**fields)
                    fn = _torch_pool(case, case.arrays(), case.grad_output(), torch, layout)[msg["pass"]]
                fn()
                # the calls of one case (one per layout) stay live together; a new case frees the old
                key = (msg["kind"], msg["pass"], str(fields))
                fns = {i: kf for i, kf in fns.items() if kf[0] == key}
                next_id += 1
                fns[next_id] = (key, fn)
                reply = {"ok": True, "id": next_id}
            else:
                t0 = time.perf_counter()
                fns[msg["id"]][1]()
                reply = {"seconds": time.perf_counter() - t0}
        except Exception as exc:  # reported to the parent, which raises it
            reply = {"error": f"{type(exc).__name__}: {exc}"}
        print(json.dumps(reply), flush=True)
