"""Winograd against im2col and PyTorch (both CPU layouts) in one process, with its own U-Net case.

    PYTHONPATH=. python benchmarks/winograd_report.py [--threads 2] [--rounds 7] [--only name,...]

For each case and pass (forward; forward + backward) prints the median time of interleaved rounds,
the effective rate (direct-convolution flops / time), the real rate (the GEMM flops Winograd
actually does / time), the ratio to the faster PyTorch layout (above 1: fastconv is faster) and
the largest float32 error relative to the largest |output| for winograd and im2col against a
float64 im2col result.  The cases: three layers of the public suite and a 3x3, 32-channel,
128x128 U-Net layer (batch 4) that is not in the suite.  Absolute times on a shared machine drift;
ratios within one run hold better.
"""
import argparse
import time

import numpy as np

CASES = {  # name: (N, C, H, W, K), 3x3, padding 1
    "resnet50-3x3-64": (8, 64, 56, 56, 64),
    "vgg16-3x3-128": (4, 128, 56, 56, 128),
    "resnet50-3x3-512": (8, 512, 7, 7, 512),
    "unet-3x3-32-128": (4, 32, 128, 128, 32),
}


def _median_rounds(fns, rounds):
    for f in fns:
        f()
        f()
    times = [[] for _ in fns]
    for _ in range(rounds):
        for f, t in zip(fns, times):
            s = time.perf_counter()
            f()
            t.append(time.perf_counter() - s)
    return [float(np.median(t)) for t in times]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--only")
    a = ap.parse_args()
    import torch
    import torch.nn.functional as F

    import fastconv
    from fastconv._algorithms import winograd
    from fastconv._validation import conv_params
    torch.set_num_threads(a.threads)
    fastconv.set_num_threads(a.threads)
    names = a.only.split(",") if a.only else list(CASES)
    rng = np.random.default_rng(0)
    print(f"{'case':18} {'pass':7} {'algo':8} {'ms':>8} {'eff GF/s':>9} {'real GF/s':>9} "
          f"{'torch ms':>9} {'x torch':>8} {'err':>8}")
    for name in names:
        n, c, h, w, k = CASES[name]
        x = rng.standard_normal((n, c, h, w)).astype(np.float32)
        wt = rng.standard_normal((k, c, 3, 3)).astype(np.float32)
        b = rng.standard_normal(k).astype(np.float32)
        y64 = fastconv.conv2d(x.astype(np.float64), wt.astype(np.float64), b.astype(np.float64), padding=1,
                              algorithm="im2col")
        gy = rng.standard_normal(y64.shape).astype(np.float32)
        p = conv_params("conv2d", x.shape, wt.shape, np.float32, 1, 1, 1, 1)
        direct_flops = 2.0 * p.macs
        pl = winograd._cached_plan(p, "forward")
        th, tw = winograd._tiles(p, pl.m)
        gemm_flops = 2.0 * (pl.m + 2) ** 2 * k * c * n * th * tw
        tx, tw_, tb, tgy = (torch.from_numpy(v.copy()) for v in (x, wt, b, gy))
        txc = tx.contiguous(memory_format=torch.channels_last)
        for v in (tx, txc, tw_, tb):
            v.requires_grad_(True)
        for pass_ in ("fwd", "fwdbwd"):
            def run(alg, pass_=pass_):
                def f():
                    fastconv.conv2d(x, wt, b, padding=1, algorithm=alg)
                    if pass_ == "fwdbwd":
                        fastconv.conv2d_backward(gy, x, wt, padding=1, algorithm=alg)
                return f

            def trun(tin, pass_=pass_):
                def f():
                    if pass_ == "fwd":
                        with torch.no_grad():
                            F.conv2d(tin, tw_, tb, padding=1)
                    else:
                        torch.autograd.grad(F.conv2d(tin, tw_, tb, padding=1), (tin, tw_, tb), tgy)
                return f
            t_w, t_i, t_tn, t_tc = _median_rounds([run("winograd"), run("im2col"), trun(tx), trun(txc)], a.rounds)
            tt = min(t_tn, t_tc)
            mult = 1 if pass_ == "fwd" else 3
            scale = float(np.abs(y64).max())
            for alg, t in (("winograd", t_w), ("im2col", t_i)):
                err = float(np.abs(fastconv.conv2d(x, wt, b, padding=1, algorithm=alg) - y64).max()) / scale
                real = gemm_flops * mult / t / 1e9 if alg == "winograd" else direct_flops * mult / t / 1e9
                print(f"{name:18} {pass_:7} {alg:8} {t * 1e3:8.2f} {direct_flops * mult / t / 1e9:9.1f} "
                      f"{real:9.1f} {tt * 1e3:9.2f} {tt / t:8.2f} {err:8.1e}", flush=True)


if __name__ == "__main__":
    main()
