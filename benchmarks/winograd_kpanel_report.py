"""Winograd by output-channel panels against the plan 'auto' took before it and PyTorch (both CPU
layouts), same process, interleaved rounds, on small planes with many channels.

    python benchmarks/winograd_kpanel_report.py [--threads 2] [--rounds 7]

"before" is the cheapest of the other forward plans by winograd's own models (packed, batch-wide,
fused: what 'auto' took before), and the batch-wide F(2x2) grad_weight; PyTorch's column under
grad_weight is its forward + grad_weight (autograd cannot run grad_weight alone).  Prints a
markdown table (ms, medians).
"""
import argparse
import time

import numpy as np

SHAPES = [(8, 512, 7, 512), (32, 512, 4, 512), (32, 256, 8, 256), (16, 256, 6, 256), (8, 256, 14, 256)]


def _medians(fs, rounds):
    for f in fs.values():
        f()
        f()
    ts = {k: [] for k in fs}
    for _ in range(rounds):
        for k, f in fs.items():
            t = time.perf_counter()
            f()
            ts[k].append(time.perf_counter() - t)
    return {k: float(np.median(v)) * 1e3 for k, v in ts.items()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=7)
    a = ap.parse_args(argv)
    import torch
    import torch.nn.functional as F

    import fastconv as fc
    from fastconv._algorithms import winograd as W
    from fastconv._validation import conv_params

    torch.set_num_threads(a.threads)
    fc.set_num_threads(a.threads)
    rng = np.random.default_rng(0)
    cl = torch.channels_last
    print("| layer | pass | before (plan) | by panels | PyTorch NCHW | PyTorch channels_last |")
    print("|---|---|---:|---:|---:|---:|")
    for n, c, h, k in SHAPES:
        x = rng.standard_normal((n, c, h, h)).astype(np.float32)
        w = rng.standard_normal((k, c, 3, 3)).astype(np.float32)
        gy = rng.standard_normal((n, k, h, h)).astype(np.float32)
        p = conv_params("conv2d", x.shape, w.shape, np.float32, 1, 1, 1, 1)
        tx, tw, tg = torch.from_numpy(x).requires_grad_(), torch.from_numpy(w).requires_grad_(), torch.from_numpy(gy)
        cx = tx.detach().contiguous(memory_format=cl).requires_grad_()
        cw = tw.detach().contiguous(memory_format=cl).requires_grad_()
        cg = tg.contiguous(memory_format=cl)
        old = [W._cached_plan(p, "forward", m, batch=b) for m in W.TILES for b in (False, True)]
        old += [pl for pl in (W._cached_plan(p, "forward", fused=True),) if not isinstance(pl, str)]
        old = min((pl for pl in old if not isinstance(pl, str)),
                  key=lambda pl: W._cost_of(p, "forward", pl, a.threads) * (W._BATCH_MARGIN if pl.batch else 1.0))
        kind = ("fused" if old.fused else "batch-wide" if old.batch else "packed") + f" F({old.m}x{old.m})"
        r = _medians({
            "old": lambda: W.forward(x, w, None, p, m=old.m, batch=None if old.fused else old.batch,
                                     fused=True if old.fused else None),
            "new": lambda: W.forward(x, w, None, p, kpanel=True),
            "tn": lambda: F.conv2d(tx.detach(), tw.detach(), None, padding=1),
            "tc": lambda: F.conv2d(cx.detach(), cw.detach(), None, padding=1),
        }, a.rounds)
        print(f"| {n}x{c}x{h}x{h} -> {k} | forward | {r['old']:.2f} ({kind}) | {r['new']:.2f} | {r['tn']:.2f} | "
              f"{r['tc']:.2f} |", flush=True)
        r = _medians({
            "old": lambda: W.grad_weight(gy, x, p, m=2, batch=True),
            "new": lambda: W.grad_weight(gy, x, p, kpanel=True),
            "tn": lambda: torch.autograd.grad(F.conv2d(tx, tw, None, padding=1), tw, tg),
            "tc": lambda: torch.autograd.grad(F.conv2d(cx, cw, None, padding=1), cw, cg),
        }, a.rounds)
        print(f"| | grad_weight | {r['old']:.2f} (batch-wide F(2x2)) | {r['new']:.2f} | {r['tn']:.2f} | {r['tc']:.2f} |",
              flush=True)


if __name__ == "__main__":
    main()
