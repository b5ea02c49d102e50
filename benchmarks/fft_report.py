"""The FFT algorithm's table for issue 4: every shape of the suite where FFT is eligible, per pass.

    python benchmarks/fft_report.py [--only name,name] [--rounds 3] [--threads 2] [--dtype float32]

Per shape and pass (forward, grad_input, grad_weight, and fwd+bwd = the three together against
PyTorch's forward + autograd backward): milliseconds of ``fft``, of ``direct`` and of PyTorch, the
ratio PyTorch/fft (above 1: fft is faster) and fft/direct, and both cost models' estimates (so the
dispatcher's choice can be checked against the measurement).  Timings are medians of interleaved
rounds in one process after two warm-up rounds, so ratios survive a noisy machine better than
absolute times.
"""
import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import fastconv  # noqa: E402
from fastconv._dispatch import registry  # noqa: E402
from fastconv._validation import conv_params  # noqa: E402
from fastconv.cases import load_suite  # noqa: E402


def medians(fns, rounds):
    """Median seconds of each function, calls interleaved round by round after two warm-ups."""
    for _ in range(2):
        for f in fns:
            f()
    times = [[] for _ in fns]
    for _ in range(rounds):
        for f, t in zip(fns, times):
            t0 = time.perf_counter()
            f()
            t.append(time.perf_counter() - t0)
    return [float(np.median(t)) for t in times]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", help="comma-separated case names (default: the whole suite)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    ap.add_argument("--no-direct", action="store_true", help="skip the direct algorithm (faster)")
    a = ap.parse_args()
    import numba
    import torch

    numba.set_num_threads(a.threads)
    torch.set_num_threads(a.threads)
    dt = np.dtype(a.dtype)
    tdt = torch.float32 if dt == np.float32 else torch.float64
    algs = registry()
    fft, direct = algs["fft"], algs["direct"]
    cases = load_suite().conv
    if a.only:
        keep = set(a.only.split(","))
        cases = [c for c in cases if c.name in keep]
    rng = np.random.default_rng(0)
    head = (f"{'shape':20} {'pass':11} {'ms fft':>9} {'ms direct':>10} {'ms torch':>9} {'torch/fft':>9} "
            f"{'fft/direct':>10} {'model fft':>9} {'model dir':>9}")
    print(f"# fastconv fft vs direct vs PyTorch, {a.dtype}, {a.threads} threads, median of {a.rounds} rounds")
    print(head)
    print("-" * len(head))
    for c in cases:
        g = c.groups
        xs, ws = (c.n, c.c, c.h, c.w), (c.k, c.c // g, c.r, c.s)
        p = conv_params("conv2d", xs, ws, dt, c.stride, c.padding, c.dilation, g)
        if fft.supports(p, "forward") is not None:
            print(f"{c.name:20} not eligible: {fft.supports(p, 'forward')}")
            continue
        x = rng.standard_normal(xs).astype(dt)
        w = rng.standard_normal(ws).astype(dt)
        b = rng.standard_normal(c.k).astype(dt)
        gy = rng.standard_normal(p.y_shape).astype(dt)
        tx, tw, tb, tgy = (torch.from_numpy(v) for v in (x, w, b, gy))
        txg, twg, tbg = (torch.from_numpy(v.copy()).requires_grad_(True) for v in (x, w, b))
        tkw = dict(stride=c.stride, padding=c.padding, dilation=c.dilation, groups=g)
        bias_sizes = [c.k]
        conv_bwd = torch.ops.aten.convolution_backward
        pad = [p.ph0, p.pw0]  # the suite's paddings are symmetric pairs
        tx_t = tx

        def torch_pass(mask):
            return lambda: conv_bwd(tgy, tx_t, tw, bias_sizes, [p.sh, p.sw], pad, [p.dh, p.dw], False,
                                    [0, 0], g, mask)

        def torch_fwd():
            with torch.no_grad():
                torch.nn.functional.conv2d(tx, tw, tb, **tkw)

        def torch_all():
            torch.autograd.grad(torch.nn.functional.conv2d(txg, twg, tbg, **tkw), (txg, twg, tbg), tgy)

        rows = [
            ("forward", lambda al: (lambda: al.forward(x, w, b, p)), torch_fwd),
            ("grad_input", lambda al: (lambda: al.grad_input(gy, w, p)), torch_pass([True, False, False])),
            ("grad_weight", lambda al: (lambda: al.grad_weight(gy, x, p)), torch_pass([False, True, False])),
        ]
        total = {"fft": 0.0, "direct": 0.0}
        for name, make, tfn in rows:
            fns = [make(fft), tfn] + ([] if a.no_direct else [make(direct)])
            t = medians(fns, a.rounds)
            tf, tt = t[0], t[1]
            td = float("nan") if a.no_direct else t[2]
            total["fft"] += tf
            total["direct"] += td
            print(f"{c.name:20} {name:11} {tf*1e3:9.2f} {td*1e3:10.2f} {tt*1e3:9.2f} {tt/tf:9.2f} "
                  f"{tf/td:10.2f} {fft.cost(p, name, fastconv.get_num_threads())*1e3:9.2f} {direct.cost(p, name, fastconv.get_num_threads())*1e3:9.2f}")
        tt = medians([torch_all], a.rounds)[0]
        print(f"{c.name:20} {'fwd+bwd':11} {total['fft']*1e3:9.2f} {total['direct']*1e3:10.2f} {tt*1e3:9.2f} "
              f"{tt/total['fft']:9.2f} {total['fft']/total['direct']:10.2f}")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
