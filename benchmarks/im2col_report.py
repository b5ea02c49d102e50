"""The im2col algorithm's table for issue 3: speed against PyTorch and against a same-run sgemm, peak
memory with and without the workspace budget, and the small-shape check against ``direct``.

    python benchmarks/im2col_report.py [--only name,name] [--rounds 5] [--threads 2] [--cpu-time]

Per shape: forward time and GFLOP/s, PyTorch's forward time and the ratio (above 1: fastconv is
faster), a plain sgemm of the same matrix sizes (``(K/g x C/g*R*S) @ (C/g*R*S x N*OH*OW)``, numpy's
BLAS on the same threads) and im2col's GFLOP/s as a percentage of it; forward+backward against
PyTorch (grad_input, grad_weight, grad_bias); the traced peak memory of one forward call at the
default budget and at a 4 MiB one, beside the full column matrix that an untiled im2col would build.
All timings are medians of rounds in one process; fastconv and PyTorch are interleaved round by
round, so their ratios survive a noisy machine better than absolute times.  The sgemm is timed on
its own in each round (see :func:`forward_rounds`), followed by a pause
(``fastconv.bench.GEMM_SETTLE``: OpenBLAS's idle workers keep spinning for ~0.1 s after a
multithreaded call and would share the cores of a convolution timed then); % sgemm is the median
over rounds of the round's ratio.
"""
import argparse
import contextlib
import math
import os
import sys
import time
import tracemalloc

import numba
import numpy as np
from numba import prange

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import fastconv  # noqa: E402
from fastconv._algorithms import _blas, im2col  # noqa: E402
from fastconv.bench import GEMM_SETTLE  # noqa: E402
from fastconv.cases import load_suite  # noqa: E402
from fastconv._validation import conv_params  # noqa: E402

TARGETS = ["alexnet-c1", "resnet50-stem", "resnet50-3x3-64", "resnet50-1x1-256", "resnet50-3x3-s2",
           "resnet50-3x3-512", "vgg16-3x3-128", "dilated-3x3-d2"]
SMALL = ["lenet5-c1", "lenet5-c3"]


CLOCK = time.perf_counter


def medians(fns, rounds, per_round=None):
    """Median seconds of each function, calls interleaved round by round after two warm-ups, in a
    (fixed-seed) shuffled order each round: a fixed order would always run one contestant right
    after the other's call (PyTorch's OpenMP workers spin for a while after each call)."""
    for _ in range(2):
        for f in fns:
            f()
    times = [[] for _ in fns]
    order = np.random.default_rng(0)
    for _ in range(rounds):
        for j in order.permutation(len(fns)):
            t0 = CLOCK()
            fns[j]()
            times[j].append(CLOCK() - t0)
    if per_round is not None:
        per_round.extend(times)
    return [float(np.median(t)) for t in times]


def paired_ratio(a, b):
    """Median over rounds of a[i] / b[i]: each round's two calls ran within milliseconds of each
    other, so the ratio holds where the machine's speed drifts between rounds."""
    return float(np.median(np.asarray(a) / np.asarray(b)))


def forward_rounds(fc, torch_fwd, sgemm, rounds, flops, gemm_flops):
    """Forward medians of fastconv, PyTorch and the sgemm, measured round by round, and the median
    over rounds of fastconv's GFLOP/s as a percentage of that round's sgemm.

    Each round: the sgemm twice (the first call wakes BLAS's pool, the second is timed), a pause
    for BLAS's spinning workers to sleep (GEMM_SETTLE), one untimed fastconv call (the first call
    after a pause runs on cold cores), then fastconv and PyTorch in a shuffled order.  The sgemm
    gets its best conditions, so the percentage errs against fastconv, and a machine that slows
    down for a few seconds slows both sides of a round's ratio alike.
    """
    order = np.random.default_rng(0)
    for f in (fc, torch_fwd, sgemm):
        f()
    tf, tt, tg, pct = [], [], [], []
    for _ in range(rounds):
        sgemm()
        t0 = CLOCK()
        sgemm()
        tg.append(CLOCK() - t0)
        time.sleep(GEMM_SETTLE)
        fc()
        for j in order.permutation(2):
            f, out = ((fc, tf), (torch_fwd, tt))[j]
            t0 = CLOCK()
            f()
            out.append(CLOCK() - t0)
        pct.append(100.0 * (flops / tf[-1]) / (gemm_flops / tg[-1]))
    return (float(np.median(tf)), float(np.median(tt)), float(np.median(tg)), float(np.median(pct)),
            paired_ratio(tt, tf))


@numba.njit(parallel=True)
def _replay_gemms(fn, ints, wt, col, out, kg, tn, m, items):
    nw = col.shape[0]
    for wid in prange(nw):
        iv = ints[wid]
        tr = _blas._chars()
        one = np.ones(1, out.dtype)
        zero = np.zeros(1, out.dtype)
        for _ in range(wid, items, nw):
            _blas._gemm(fn, iv, tr, _blas._N, _blas._N, kg, m, tn, one, wt, tn, col[wid], m, zero,
                        out[wid], m)


def gemms_alone(c, x, w, kw, rounds):
    """Median seconds of the BLAS calls of im2col's forward alone: the same tiles (the plan of
    ``im2col.forward``), each worker multiplying its own, already gathered, column tile, with no
    gather, bias or copy.  The floor of any im2col that calls these GEMMs, with its threads."""
    p = conv_params("im2col_report", x.shape, w.shape, x.dtype, kw.get("stride", 1), kw.get("padding", 0),
                    kw.get("dilation", 1), kw.get("groups", 1))
    tn = p.cg * p.r * p.s
    plan = im2col._Plan(p, tn, p.kg, p.g, p.n, im2col._copy_bytes(x, p), im2col._direct(p))
    items = -(-p.n // plan.nb) * p.g * (-(-p.oh // plan.rb) if plan.nb == 1 else 1)
    m = plan.mmax
    rng = np.random.default_rng(0)
    col = rng.standard_normal((plan.nw, tn * m)).astype(x.dtype)
    out = np.empty((plan.nw, p.kg * m), x.dtype)
    wt = np.ascontiguousarray(w[:p.kg]).reshape(-1)
    fn, ints = _blas._BLAS.args(x.dtype, plan.nw)

    def run():
        with _blas.serial_blas:
            _replay_gemms(fn, ints, wt, col, out, p.kg, tn, m, items)

    return medians([run], rounds)[0]


def peak_mib(f):
    tracemalloc.start()
    f()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak / 2**20


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", help="comma-separated case names (default: the issue's shapes)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cpu-time", action="store_true",
                    help="time by process CPU time (with --threads 1: immune to waiting for a core on a "
                         "busy machine)")
    a = ap.parse_args()
    global CLOCK
    if a.cpu_time:
        if a.threads != 1:
            ap.error("--cpu-time needs --threads 1 (CPU time adds up over threads)")
        CLOCK = time.process_time
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(a.threads)
    fastconv.set_num_threads(min(a.threads, fastconv.max_threads()))
    cases = {c.name: c for c in load_suite().conv}
    names = a.only.split(",") if a.only else TARGETS + SMALL
    print(f"im2col vs PyTorch {torch.__version__}, {a.threads} threads, float32, median of {a.rounds} "
          f"interleaved rounds of {'CPU' if a.cpu_time else 'wall'} time; ratio > 1: fastconv faster")
    head = (f"{'shape':18} {'fwd ms':>8} {'GFLOP/s':>8} {'torch ms':>8} {'ratio':>6} {'sgemm GF/s':>10} "
            f"{'%sgemm':>6} | {'fwd+bwd ms':>10} {'torch ms':>8} {'ratio':>6} | "
            f"{'peak MiB 64M/4M':>15} {'full cols MiB':>13}")
    print(head)
    print("-" * len(head))
    fwd_ratios, fb_ratios, small = {}, {}, []
    for name in names:
        c = cases[name]
        kw = c.kwargs
        x, w, b = c.arrays(np.float32)
        gy = c.grad_output(np.float32)
        g = c.groups
        tx, tw, tb = (torch.from_numpy(v).requires_grad_(True) for v in (x, w, b))
        tgy = torch.from_numpy(gy)
        oh, ow = c.oh, c.ow
        mm, kk, nn = c.k // g, (c.c // g) * c.r * c.s, c.n * oh * ow
        rng = np.random.default_rng(0)
        am = rng.standard_normal((mm, kk)).astype(np.float32)
        bm = rng.standard_normal((kk, nn)).astype(np.float32)

        def fc_fwd():
            fastconv.conv2d(x, w, b, **kw, algorithm="im2col")

        def t_fwd():
            with torch.no_grad():
                F.conv2d(tx, tw, tb, **kw)

        def sgemm():
            np.matmul(am, bm)

        def fc_fb():
            fastconv.conv2d(x, w, b, **kw, algorithm="im2col")
            fastconv.conv2d_backward(gy, x, w, **kw, algorithm="im2col")

        def t_fb():
            torch.autograd.grad(F.conv2d(tx, tw, tb, **kw), (tx, tw, tb), tgy)

        tf, tt, tg, pct, fwd_ratio = forward_rounds(fc_fwd, t_fwd, sgemm, a.rounds, 2.0 * c.macs,
                                                    2.0 * mm * kk * nn)
        runs = []
        tfb, ttb = medians([fc_fb, t_fb], a.rounds, runs)
        fb_ratio = paired_ratio(runs[1], runs[0])
        flops = 2.0 * c.macs
        gf, gg = flops / tf / 1e9, 2.0 * mm * kk * nn / tg / 1e9
        p64 = peak_mib(fc_fwd)
        p4 = peak_mib(lambda: fastconv.conv2d(x, w, b, **kw, algorithm="im2col", workspace_limit=4 << 20))
        full = g * kk * nn * 4 / 2**20
        fwd_ratios[name], fb_ratios[name] = fwd_ratio, fb_ratio
        print(f"{name:18} {tf * 1e3:8.2f} {gf:8.1f} {tt * 1e3:8.2f} {fwd_ratio:6.2f} {gg:10.1f} "
              f"{pct:5.0f}% | {tfb * 1e3:10.2f} {ttb * 1e3:8.2f} {fb_ratio:6.2f} | "
              f"{p64:7.1f}/{p4:<7.1f} {full:13.1f}", flush=True)
        if name in SMALL:
            def direct_fwd():
                fastconv.conv2d(x, w, b, **kw, algorithm="direct")
            runs = []
            ti, td = medians([fc_fwd, direct_fwd], a.rounds * 4, runs)
            # the same call with the BLAS pool left multithreaded inside numba's workers: the
            # contention that holding BLAS to one thread per worker avoids
            im2col.serial_blas, guard = contextlib.nullcontext(), im2col.serial_blas
            try:
                (tc,) = medians([fc_fwd], a.rounds)
            finally:
                im2col.serial_blas = guard
            tgm = gemms_alone(c, x, w, kw, a.rounds * 4)
            small.append(f"{name}: im2col {ti * 1e3:.3f} ms, direct {td * 1e3:.3f} ms, "
                         f"im2col/direct = {paired_ratio(runs[0], runs[1]):.2f}; with BLAS left at "
                         f"{a.threads} threads inside the workers: {tc * 1e3:.3f} ms; the forward's "
                         f"BLAS calls alone (no gather): {tgm * 1e3:.3f} ms = {tgm / td:.2f} x direct")

    def gmean(v):
        return math.exp(sum(map(math.log, v)) / len(v)) if v else float("nan")

    tgt = [n for n in fwd_ratios if n in TARGETS]
    if tgt:
        print(f"\nissue-3 shapes ({len(tgt)}): forward ratio min x{min(fwd_ratios[n] for n in tgt):.2f}, "
              f"geomean x{gmean([fwd_ratios[n] for n in tgt]):.2f}; forward+backward geomean "
              f"x{gmean([fb_ratios[n] for n in tgt]):.2f}")
    for line in small:
        print(line)
    print(f"thread pools: numba {fastconv.get_num_threads()} threads; the BLAS inside kernels held to "
          f"1 thread per worker")


if __name__ == "__main__":
    main()
