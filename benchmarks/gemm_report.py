"""fastconv's own sgemm against numpy's OpenBLAS, and both against the micro-kernel's FMA peak.

    python benchmarks/gemm_report.py [--rounds 7] [--dtype float32] [--only name,name] [--passes]
                                     [--cpu-time]

Rows:

* ``1024^3``: one whole GEMM through the Python entries, ``gemm(a, b, c)`` against
  ``np.matmul(a, b, out=c)``, with numba's pool and OpenBLAS's pool at 1 and then 2 threads.
* ``<layer>``: the GEMM product im2col runs per worker for that suite layer's forward pass (M = K/g
  output channels, K = C/g*R*S taps, N = the tile of output positions im2col's planner picks at 2
  threads), A = weights and B = column tile, both row-major.  With ``--passes`` also the two
  gradient products: grad_weight ``gy (M x N) . col.T`` (M = K/g, N = taps of a channel block,
  K = positions) and grad_input ``w.T . gy`` (M = taps, N = positions, K = K/g).  Timed as im2col
  calls them: from inside numba workers, each worker repeating the product on its own output,
  with 1 worker and with 2 workers at once (throughput, as the convolution's workers run);
  OpenBLAS through the same function pointer im2col uses, held to one thread per worker.  Ours
  packs A once per timed call (``pack_a_all``, then ``gemm_serial_packed`` per product), as im2col
  would pack its weights once for all its tiles; a call is ``reps`` products (~2e7 flops), so
  where ``reps`` is 1 (resnet50-3x3-512) the packing is counted in full.

Columns: ms per product (per worker), GFLOP/s (all workers together), % of the FMA peak of that
many workers (the micro-kernel's MR x NR FMAs on registers alone, measured in the same rounds),
and own/OpenBLAS as the median of per-round speed ratios (above 1: ours is faster).  Rounds are
interleaved, contestants shuffled each round, medians reported.  Timings on a shared machine swing
far more than ratios within a round: quote the ratios.
"""
import argparse
import os
import sys
import time

import numba
import numpy as np
from numba import prange

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from fastconv import _cpu  # noqa: E402
from fastconv._algorithms import _blas as BL, im2col  # noqa: E402
from fastconv._algorithms import gemm as G  # noqa: E402
from fastconv._jit import kernel  # noqa: E402
from fastconv._validation import conv_params  # noqa: E402
from fastconv.cases import load_suite  # noqa: E402

LAYERS = ["alexnet-c1", "resnet50-stem", "resnet50-3x3-64", "resnet50-1x1-256", "resnet50-3x3-s2",
          "resnet50-3x3-512", "vgg16-3x3-128", "dilated-3x3-d2", "lenet5-c1", "lenet5-c3"]


@kernel
def _own_loop(reps, m, n, k, a, ars, acs, b, brs, bcs, c, pa, ws, blk):
    # A (the weights, or their transpose) packed once per call, as im2col would for all its tiles
    for wid in prange(c.shape[0]):
        G.pack_a_all(m, k, a, 0, ars, acs, pa[wid], blk)
        for _ in range(reps):
            G.gemm_serial_packed(m, n, k, pa[wid], b, 0, brs, bcs, 0, c[wid], 0, n, ws[wid], blk)


@kernel
def _blas_loop(reps, m, n, k, ta, tb, a, lda, b, ldb, c, fn, ints):
    for wid in prange(c.shape[0]):
        tr = BL._chars()
        one = np.ones(1, dtype=c.dtype)
        zero = np.zeros(1, dtype=c.dtype)
        for _ in range(reps):
            BL._gemm(fn, ints[wid], tr, ta, tb, m, n, k, one, a, lda, b, ldb, zero, c[wid], n)


def tile_products(case, passes):
    """(label, m, n, k, A transposed, B transposed) of im2col's per-worker GEMMs for ``case``."""
    p = conv_params("conv2d", case.x_shape, case.w_shape, np.float32, case.stride, case.padding,
                    case.dilation, case.groups)
    tn = p.cg * p.r * p.s
    direct = im2col._direct(p)
    with_threads = numba.get_num_threads()
    numba.set_num_threads(min(2, numba.config.NUMBA_NUM_THREADS))
    try:
        plan = im2col._Plan(p, tn, p.kg, p.g, p.n, 0, direct)
        out = [(f"{case.name} fwd", p.kg, plan.mmax, tn, False, False)]
        if passes:
            cb = im2col._channel_block(p, p.n * p.g, 2)
            out.append((f"{case.name} gw", p.kg, cb * p.r * p.s, plan.mmax, False, True))
            out.append((f"{case.name} gx", cb * p.r * p.s, plan.mmax, p.kg, True, False))
    finally:
        numba.set_num_threads(with_threads)
    return out


CLOCK = time.perf_counter


def _time(fn, threads=1):
    """Seconds of one call: wall time, or with ``--cpu-time`` the process's CPU time divided by the
    threads at work (what the call would take with a core per thread: on a machine shared with
    busy processes wall time mostly measures how long the scheduler left us waiting)."""
    t0 = CLOCK()
    fn()
    dt = CLOCK() - t0
    return dt / threads if CLOCK is time.process_time else dt


def run(rounds, dtype, only, passes):
    from threadpoolctl import threadpool_limits

    rng = np.random.default_rng(0)
    isz = np.dtype(dtype).itemsize
    mr, nr = G.tile(isz)
    blk = G.blocking(dtype)
    nmax = min(2, numba.config.NUMBA_NUM_THREADS)
    print(f"# CPU: {_cpu.describe()}, tile {mr}x{nr}, blocking kc,mc,nc = {blk.tolist()}, "
          f"numba threads up to {nmax}, load average {os.getloadavg()[0]:.1f}")
    rows = []
    peaks = {t: [] for t in range(1, nmax + 1)}

    # 1024^3 through the Python entries
    big = 1024
    a = rng.standard_normal((big, big)).astype(dtype)
    b = rng.standard_normal((big, big)).astype(dtype)
    c1, c2 = np.empty((big, big), dtype), np.empty((big, big), dtype)
    cases = []
    for t in range(1, nmax + 1):
        def own(t=t):
            G.gemm(a, b, c1, threads=t)

        def blas(t=t):
            with threadpool_limits(t, user_api="blas"):
                np.matmul(a, b, out=c2)
        cases.append(("1024^3 (whole GEMM)", t, big, big, big, own, blas, 1))

    suite = {c.name: c for c in load_suite().conv}
    fn, _ = BL._BLAS.args(dtype, 1)
    for name in LAYERS:
        if only and name not in only:
            continue
        for label, m, n, k, ta, tb in tile_products(suite[name], passes):
            A = rng.standard_normal((k, m) if ta else (m, k)).astype(dtype)
            B = rng.standard_normal((n, k) if tb else (k, n)).astype(dtype)
            af, bf = A.reshape(-1), B.reshape(-1)
            ars, acs = (1, m) if ta else (k, 1)
            brs, bcs = (1, k) if tb else (n, 1)
            lda, ldb = A.shape[1], B.shape[1]
            reps = max(1, int(2e7 // (2 * m * n * k)))  # ~2e7 flops (0.3-1 ms) per call, at least one product
            for t in range(1, nmax + 1):
                cown = np.empty((t, m * n), dtype)
                cbl = np.empty((t, m * n), dtype)
                ws = np.empty((t, G.workspace_size(dtype)), dtype)
                pa = np.empty((t, G.packed_a_size(dtype, m, k)), dtype)
                ints = np.zeros((t, 8), dtype=BL._BLAS.args(dtype, 1)[1].dtype)

                def own(t=t, cown=cown, pa=pa, ws=ws, reps=reps, m=m, n=n, k=k, af=af, bf=bf, ars=ars, acs=acs,
                        brs=brs, bcs=bcs):
                    numba.set_num_threads(t)
                    _own_loop(reps, m, n, k, af, ars, acs, bf, brs, bcs, cown, pa, ws, blk)

                def blas(t=t, cbl=cbl, ints=ints, reps=reps, m=m, n=n, k=k, af=af, bf=bf, ta=ta, tb=tb,
                         lda=lda, ldb=ldb):
                    numba.set_num_threads(t)
                    with BL.serial_blas:
                        _blas_loop(reps, m, n, k, int(ta), int(tb), af, lda, bf, ldb, cbl, fn, ints)
                cases.append((label, t, m, n, k, own, blas, reps))
                # same products: check once that both agree
                own(), blas()
                err = np.abs(cown - cbl).max() / max(1e-30, np.abs(cbl).max())
                if err > 1e-4:
                    raise SystemExit(f"{label}: own and OpenBLAS differ by {err:.2e} (relative)")

    for _, t, *_rest, own, blas, _reps in cases:  # warm-up (compiles)
        own(), blas()
    times = {i: ([], []) for i in range(len(cases))}
    order = np.random.default_rng(1)
    for _ in range(rounds):
        for t in peaks:
            peaks[t].append(G.peak_gflops(dtype, t, steps=1_000_000))
        for i in order.permutation(len(cases)):
            own, blas = cases[i][5], cases[i][6]
            pair = [(0, own), (1, blas)]
            if order.random() < 0.5:
                pair.reverse()
            for j, f in pair:
                times[i][j].append(_time(f, cases[i][1]))
    numba.set_num_threads(nmax)
    peak = {t: float(np.median(v)) for t, v in peaks.items()}
    print("# FMA peak of the micro-kernel on registers alone: "
          + ", ".join(f"{t} thread(s) {peak[t]:.1f} GFLOP/s" for t in peak))
    print(f"{'product':28s} {'thr':>3s} {'M':>5s} {'N':>6s} {'K':>5s} | {'own ms':>8s} {'GFLOP/s':>8s} "
          f"{'%peak':>6s} | {'BLAS ms':>8s} {'GFLOP/s':>8s} {'%peak':>6s} | {'own/BLAS':>8s}")
    for i, (label, t, m, n, k, _own, _blas, reps) in enumerate(cases):
        to, tb_ = np.array(times[i][0]), np.array(times[i][1])
        per = 1 if label.startswith("1024") else reps
        fl = 2.0 * m * n * k * per * (1 if label.startswith("1024") else t)
        mo, mb = np.median(to), np.median(tb_)
        ratio = np.median(tb_ / to)
        go, gb = fl / mo / 1e9, fl / mb / 1e9
        print(f"{label:28s} {t:3d} {m:5d} {n:6d} {k:5d} | {mo / per * 1e3:8.3f} {go:8.1f} "
              f"{100 * go / peak[t]:5.0f}% | {mb / per * 1e3:8.3f} {gb:8.1f} {100 * gb / peak[t]:5.0f}% | "
              f"{ratio:8.2f}")
        rows.append((label, t, m, n, k, mo, mb, ratio))
    print(f"# load average at the end {os.getloadavg()[0]:.1f}")
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    ap.add_argument("--only", default="", help="comma-separated layer names")
    ap.add_argument("--passes", action="store_true", help="also the gradient passes' products")
    ap.add_argument("--cpu-time", action="store_true",
                    help="time by process CPU time / threads instead of wall time (shared machines)")
    args = ap.parse_args(argv)
    if args.cpu_time:
        global CLOCK
        CLOCK = time.process_time
        G.CLOCK = time.process_time
    only = {s for s in args.only.split(",") if s}
    run(args.rounds, np.dtype(args.dtype).type, only, args.passes)


if __name__ == "__main__":
    main()
