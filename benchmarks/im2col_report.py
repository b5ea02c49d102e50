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
its own, followed by a pause (``fastconv.bench.GEMM_SETTLE``: OpenBLAS's idle workers keep
spinning for ~0.1 s after a multithreaded call and would share the cores of a convolution timed
then).
"""
import argparse
import contextlib
import math
import os
import sys
import time
import tracemalloc

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import fastconv  # noqa: E402
from fastconv._algorithms import im2col  # noqa: E402
from fastconv.bench import GEMM_SETTLE  # noqa: E402
from fastconv.cases import load_suite  # noqa: E402

TARGETS = ["alexnet-c1", "resnet50-stem", "resnet50-3x3-64", "resnet50-1x1-256", "resnet50-3x3-s2",
           "resnet50-3x3-512", "vgg16-3x3-128", "dilated-3x3-d2"]
SMALL = ["lenet5-c1", "lenet5-c3"]


CLOCK = time.perf_counter


def medians(fns, rounds):
    """Median seconds of each function, calls interleaved round by round after two warm-ups."""
    for _ in range(2):
        for f in fns:
            f()
    times = [[] for _ in fns]
    for _ in range(rounds):
        for f, t in zip(fns, times):
            t0 = CLOCK()
            f()
            t.append(CLOCK() - t0)
    return [float(np.median(t)) for t in times]


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

        tf, tt = medians([fc_fwd, t_fwd], a.rounds)
        (tg,) = medians([sgemm], a.rounds)
        time.sleep(GEMM_SETTLE)
        tfb, ttb = medians([fc_fb, t_fb], a.rounds)
        flops = 2.0 * c.macs
        gf, gg = flops / tf / 1e9, 2.0 * mm * kk * nn / tg / 1e9
        p64 = peak_mib(fc_fwd)
        p4 = peak_mib(lambda: fastconv.conv2d(x, w, b, **kw, algorithm="im2col", workspace_limit=4 << 20))
        full = g * kk * nn * 4 / 2**20
        fwd_ratios[name], fb_ratios[name] = tt / tf, ttb / tfb
        print(f"{name:18} {tf * 1e3:8.2f} {gf:8.1f} {tt * 1e3:8.2f} {tt / tf:6.2f} {gg:10.1f} "
              f"{100 * gf / gg:5.0f}% | {tfb * 1e3:10.2f} {ttb * 1e3:8.2f} {ttb / tfb:6.2f} | "
              f"{p64:7.1f}/{p4:<7.1f} {full:13.1f}", flush=True)
        if name in SMALL:
            def direct_fwd():
                fastconv.conv2d(x, w, b, **kw, algorithm="direct")
            ti, td = medians([fc_fwd, direct_fwd], a.rounds * 4)
            # the same call with the BLAS pool left multithreaded inside numba's workers: the
            # contention that holding BLAS to one thread per worker avoids
            im2col.serial_blas, guard = contextlib.nullcontext(), im2col.serial_blas
            try:
                (tc,) = medians([fc_fwd], a.rounds)
            finally:
                im2col.serial_blas = guard
            small.append(f"{name}: im2col {ti * 1e3:.3f} ms, direct {td * 1e3:.3f} ms, "
                         f"im2col/direct = {ti / td:.2f}; with BLAS left at {a.threads} threads "
                         f"inside the workers: {tc * 1e3:.3f} ms")

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
