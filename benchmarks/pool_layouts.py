"""Pooling forward + backward in both layouts, fastconv against PyTorch, in one process.

    python benchmarks/pool_layouts.py [--threads 2] [--rounds 7] [--kind max,avg,adaptive]

For every pooling shape of the public suite (``fastconv/shapes.json``): fastconv with an NCHW input and
with a channels_last one (NCHW shape, NHWC strides: pooled natively, result in the same layout), PyTorch
in NCHW and in channels_last.  Calls are interleaved round by round; each figure is a median.  The ratio
is PyTorch's faster layout over fastconv's faster layout (above 1: fastconv is faster).
"""
import argparse
import json
import os
import time

import numpy as np

import fastconv as fc

SHAPES = os.path.join(os.path.dirname(os.path.abspath(fc.__file__)), "shapes.json")


def _cl(a):
    return np.ascontiguousarray(a.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)


def _fastconv(kind, x, gy, k, st, pd):
    if kind == "max":
        def f():
            _, i = fc.max_pool2d(x, k, st, pd, return_indices=True)
            fc.max_pool2d_backward(gy, i, x.shape)
    elif kind == "avg":
        def f():
            fc.avg_pool2d(x, k, st, pd)
            fc.avg_pool2d_backward(gy, x.shape, k, st, pd)
    else:
        def f():
            fc.adaptive_avg_pool2d(x, 1)
            fc.adaptive_avg_pool2d_backward(gy, x.shape)
    return f


def _torch(torch, F, kind, x, gy, k, st, pd):
    x = x.requires_grad_(True)
    if kind == "max":
        return lambda: torch.autograd.grad(F.max_pool2d(x, k, st, pd), x, gy)
    if kind == "avg":
        return lambda: torch.autograd.grad(F.avg_pool2d(x, k, st, pd), x, gy)
    return lambda: torch.autograd.grad(F.adaptive_avg_pool2d(x, 1), x, gy)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--kind", default="max,avg,adaptive")
    a = p.parse_args()
    import torch
    import torch.nn.functional as F
    torch.set_num_threads(a.threads)
    fc.set_num_threads(a.threads)
    rng = np.random.default_rng(0)
    print(f"{'shape':22}{'kind':9}{'fc NCHW':>9}{'fc CL':>9}{'torch NCHW':>12}{'torch CL':>10}  ratio (ms, fwd+bwd)")
    for c in json.load(open(SHAPES))["max_pool2d"]:
        x = rng.standard_normal((c["N"], c["C"], c["H"], c["W"])).astype(np.float32)
        k, st, pd = c["kernel"], c.get("stride", c["kernel"]), c.get("padding", 0)
        for kind in a.kind.split(","):
            y = {"max": lambda: fc.max_pool2d(x, k, st, pd), "avg": lambda: fc.avg_pool2d(x, k, st, pd),
                 "adaptive": lambda: fc.adaptive_avg_pool2d(x, 1)}[kind]()
            gy = rng.standard_normal(y.shape).astype(np.float32)
            fns = {
                "fc NCHW": _fastconv(kind, x, gy, k, st, pd),
                "fc CL": _fastconv(kind, _cl(x), _cl(gy), k, st, pd),
                "torch NCHW": _torch(torch, F, kind, torch.from_numpy(x.copy()), torch.from_numpy(gy.copy()), k, st, pd),
                "torch CL": _torch(torch, F, kind, torch.from_numpy(x.copy()).contiguous(memory_format=torch.channels_last),
                                   torch.from_numpy(gy.copy()).contiguous(memory_format=torch.channels_last), k, st, pd),
            }
            for f in fns.values():  # compile and warm
                f(); f()
            times = {name: [] for name in fns}
            for _ in range(a.rounds):
                for name, f in fns.items():
                    t = time.perf_counter()
                    f()
                    times[name].append(time.perf_counter() - t)
            med = {name: 1e3 * float(np.median(v)) for name, v in times.items()}
            ratio = min(med["torch NCHW"], med["torch CL"]) / min(med["fc NCHW"], med["fc CL"])
            print(f"{c['name']:22}{kind:9}{med['fc NCHW']:9.2f}{med['fc CL']:9.2f}{med['torch NCHW']:12.2f}"
                  f"{med['torch CL']:10.2f}  x{ratio:.2f}", flush=True)


if __name__ == "__main__":
    main()
