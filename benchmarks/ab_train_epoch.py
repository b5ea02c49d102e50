"""Same-process A/B of one LeNet training epoch (and a no_grad evaluation) on the bundled digits:
this checkout's fastconv against another checkout's, imported from a copy under another name.

    python benchmarks/ab_train_epoch.py OLD_CHECKOUT [--rounds 7]

OLD_CHECKOUT is a directory holding a ``fastconv`` package (e.g. a worktree of main).  Both models
have the same architecture and initial weights and run on one thread; the rounds alternate A and B
and the medians are reported.  The first round of each is a warm-up (JIT compile) and not counted.
"""
import argparse
import importlib
import os
import shutil
import statistics
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_old(checkout):
    tmp = tempfile.mkdtemp(prefix="fastconv_ab_")
    shutil.copytree(os.path.join(checkout, "fastconv"), os.path.join(tmp, "fastconv_old"),
                    ignore=shutil.ignore_patterns("__pycache__"))
    sys.path.insert(0, tmp)
    return importlib.import_module("fastconv_old")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("old")
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    sys.path.insert(0, HERE)
    import fastconv as new
    from fastconv import train as new_train
    old = load_old(args.old)
    old_train = importlib.import_module("fastconv_old.train")
    print("new:", new.__file__, "\nold:", old.__file__)
    x_tr, y_tr, x_te, y_te = new_train._data.load_digits(0.2, 0)
    mean, std = x_tr.mean(), x_tr.std()
    x_tr, x_te = (x_tr - mean) / std, (x_te - mean) / std

    def setup(mod, train_mod):
        model = train_mod.build_model(x_tr.shape[1:], 10, rng=0)
        if isinstance(model[0], getattr(train_mod, "Standardize", ())):
            model = mod.layers.Sequential(*model.layers[1:])  # the same network as the old one
        return model, mod.CrossEntropyLoss(), mod.Adam(model.parameters(), lr=3e-3)

    runs = {"old": (old, old_train, setup(old, old_train)), "new": (new, new_train, setup(new, new_train))}
    times = {k: [] for k in runs}
    evals = {k: [] for k in runs}
    with new.threads(1), old.threads(1):
        for r in range(args.rounds + 1):
            for name, (mod, train_mod, (model, loss_fn, opt)) in runs.items():
                t0 = time.perf_counter()
                train_mod.train_epoch(model, loss_fn, opt, x_tr, y_tr, 32, np.random.default_rng(r))
                t1 = time.perf_counter()
                train_mod.evaluate(model, x_te, y_te)
                t2 = time.perf_counter()
                if r:
                    times[name].append(t1 - t0)
                    evals[name].append(t2 - t1)
    for name in runs:
        print(f"{name}: train epoch median {1e3 * statistics.median(times[name]):.1f} ms "
              f"(min {1e3 * min(times[name]):.1f}, all {[round(1e3 * t) for t in times[name]]}); "
              f"evaluation median {1e3 * statistics.median(evals[name]):.1f} ms")
    print(f"new/old train epoch: {statistics.median(times['new']) / statistics.median(times['old']):.3f}")


if __name__ == "__main__":
    main()
