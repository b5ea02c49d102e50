"""channels_last inputs: fastconv's conv2d (forward, forward + backward) on arrays with NHWC memory
against PyTorch's channels_last path, same process and threads, on the public shape suite.

    python benchmarks/channels_last_report.py [--threads 2] [--rounds 7] [NAME ...]

Prints ms (25th percentile of the rounds after a warm-up call) and PyTorch / fastconv.
"""
import argparse
import json
import time
from pathlib import Path

import numpy as np


def _time(f, rounds):
    f()
    ts = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t0)
    return float(np.percentile(ts, 25)) * 1e3


def main(argv=None):
    import torch
    import fastconv as fc
    F = torch.nn.functional
    ap = argparse.ArgumentParser(prog="channels_last_report", description=__doc__.split("\n\n")[0])
    ap.add_argument("names", nargs="*", help="shape names (default: all of shapes.json's conv2d)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=7)
    a = ap.parse_args(argv)
    fc.set_num_threads(a.threads)
    torch.set_num_threads(a.threads)
    shapes = json.loads((Path(fc.__file__).parent / "shapes.json").read_text())["conv2d"]
    rng = np.random.default_rng(0)
    print(f"{'shape':18s} {'fwd ms':>8s} {'torch':>8s} {'ratio':>6s} | {'fwd+bwd':>8s} {'torch':>8s} {'ratio':>6s}")
    for sh in shapes:
        if a.names and sh["name"] not in a.names:
            continue
        n, c, h, w, k, r, s = (sh[key] for key in "NCHWKRS")
        st, pd, dl, g = sh.get("stride", 1), sh.get("padding", 0), sh.get("dilation", 1), sh.get("groups", 1)
        x = rng.random((n, c, h, w), dtype=np.float32)
        wt = rng.random((k, c // g, r, s), dtype=np.float32)
        xt = torch.from_numpy(x).contiguous(memory_format=torch.channels_last)
        wtt = torch.from_numpy(wt)
        xcl = xt.numpy()  # (N, C, H, W) with NHWC memory
        y = fc.conv2d(xcl, wt, None, st, pd, dl, g)
        gyt = torch.from_numpy(rng.random(y.shape, dtype=np.float32)).contiguous(memory_format=torch.channels_last)
        gy = gyt.numpy()
        xr, wr = xt.clone().requires_grad_(), wtt.clone().requires_grad_()

        def torch_fb():
            F.conv2d(xr, wr, None, st, pd, dl, g).backward(gyt)

        fwd = _time(lambda: fc.conv2d(xcl, wt, None, st, pd, dl, g), a.rounds)
        tfwd = _time(lambda: F.conv2d(xt, wtt, None, st, pd, dl, g), a.rounds)
        fb = _time(lambda: (fc.conv2d(xcl, wt, None, st, pd, dl, g),
                            fc.conv2d_backward(gy, xcl, wt, st, pd, dl, g)), a.rounds)
        tfb = _time(torch_fb, a.rounds)
        print(f"{sh['name']:18s} {fwd:8.2f} {tfwd:8.2f} {tfwd / fwd:6.2f} | {fb:8.2f} {tfb:8.2f} {tfb / fb:6.2f}",
              flush=True)


if __name__ == "__main__":
    main()
