"""Fit the constants of ``algorithm='auto'``'s cost model on this machine and report its accuracy.

    python benchmarks/calibrate.py                 # measure, fit, print the table (writes nothing)
    python benchmarks/calibrate.py --write         # ... and store the fit in fastconv/_calibration.json
                                                   #     as the table of this CPU's vector ISA
    python benchmarks/calibrate.py --only lenet5-c1,resnet50-1x1-256 --rounds 3

Every registered algorithm's ``cost(p, pass_, threads)`` is a model of seconds with constants guessed from
first principles.  This script times every eligible algorithm, per pass, on the public suite
(``fastconv/shapes.json``), on batch-1 copies of it (the small-layer regime where per-call
overheads decide) and on small-plane training layers (:data:`TRAINING`), then searches for each pass one scale factor per algorithm that makes auto's
picks cost the least time (see :func:`fit`).  ``'auto'`` applies the stored correction.  The printed table shows, per
shape and pass, the measured best algorithm, the calibrated model's pick and its time over the best;
the summary line is the fraction of cases where the pick is within 10% of the best.

Timing: one untimed warm-up call of each contestant (JIT compilation), then the median of up to
``--rounds`` interleaved rounds per case (:func:`interleaved`).
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import os
import platform
import sys
import time

import numpy as np

import fastconv
from fastconv import _cpu as _cpuinfo
from fastconv import _dispatch, _select, _threads
from fastconv import _validation as V
from fastconv.cases import ConvCase, load_suite

CAL_PATH = os.path.join(os.path.dirname(os.path.abspath(fastconv.__file__)), "_calibration.json")


def interleaved(calls, rounds, budget=1.5):
    """Median seconds of each of ``calls`` ({name: f}), timed in interleaved rounds (one call of
    each per round, the order rotated), so that the VM's drift over a case -- 5-20% within minutes
    here -- moves every contestant alike instead of whichever ran in the slow minute; at least 2
    rounds, more while the case's budget (``budget`` seconds per contestant) lasts."""
    names = list(calls)
    for f in calls.values():
        f()  # warm: compilation, kept buffers
    ts = {n: [] for n in names}
    t_end = time.perf_counter() + budget * len(names)
    for r in range(rounds):
        for n in names[r % len(names):] + names[:r % len(names)]:
            t0 = time.perf_counter()
            calls[n]()
            ts[n].append(time.perf_counter() - t0)
        if time.perf_counter() > t_end and r >= 1:
            break
    return {n: float(np.median(v)) for n, v in ts.items()}


# Layers of the small networks people train on CPU (benchmarks/torch_train_step.py's ResNet-18 on
# 32x32 at batch 32, MobileNet on 96x96 at batch 16): planes of 4x4 to 32x32, where per-item and
# weight-streaming costs decide and the suite's 56x56 layers say little.  Without them auto took
# Winograd for ResNet-18's 512-channel 4x4 layer (44.7 ms forward, direct 24.0).
TRAINING = (
    ConvCase("resnet18-3x3-512@4", 32, 512, 4, 4, 512, 3, 3, padding=(1, 1)),
    ConvCase("resnet18-3x3-256@8", 32, 256, 8, 8, 256, 3, 3, padding=(1, 1)),
    ConvCase("resnet18-3x3-128@16", 32, 128, 16, 16, 128, 3, 3, padding=(1, 1)),
    ConvCase("resnet18-3x3-64@32", 32, 64, 32, 32, 64, 3, 3, padding=(1, 1)),
    ConvCase("resnet18-3x3-s2@16", 32, 128, 16, 16, 256, 3, 3, stride=(2, 2), padding=(1, 1)),
    ConvCase("mobilenet-1x1-256@6", 16, 256, 6, 6, 256, 1, 1),
    ConvCase("mobilenet-dw-s2@24", 16, 64, 24, 24, 64, 3, 3, stride=(2, 2), padding=(1, 1), groups=64),
    # thin groups on small planes (``fastconv train --model resnet``'s 14x14 and 7x7 blocks), where the
    # channels_last forward sums all taps per call (gemm's route there measured 1.3-1.5x the others)
    ConvCase("resnet-mini-3x3-32@14", 32, 32, 14, 14, 32, 3, 3, padding=(1, 1)),
    ConvCase("resnet-mini-3x3-64@7", 32, 64, 7, 7, 64, 3, 3, padding=(1, 1)),
    # its stride-2 blocks (auto took direct's phases for the 28x28 one's grad_input: 2.6 ms, gemm 1.1)
    ConvCase("resnet-mini-3x3-s2@28", 32, 16, 28, 28, 32, 3, 3, stride=(2, 2), padding=(1, 1)),
    ConvCase("resnet-mini-3x3-s2@14", 32, 32, 14, 14, 64, 3, 3, stride=(2, 2), padding=(1, 1)),
    # a U-Net's thin full-resolution layer (benchmarks/torch_train_step.py's unet at batch 4)
    ConvCase("unet-3x3-16@128", 4, 16, 128, 128, 16, 3, 3, padding=(1, 1)),
    # where auto's picks cost those networks most (2026-12-04, AVX-512): im2col's thousands of tiny
    # depthwise products (grad_input 0.85 ms, direct 0.19), the 3-channel stride-2 stem's
    # grad_input (direct 1.3, im2col 0.6), 1x1 layers on 12x12 and 3x3 planes, the U-Net's
    # one-output head (direct 0.30 ms, im2col 0.10) and ResNet-18's stride-2 1x1 shortcut
    ConvCase("mobilenet-dw-s2@12", 16, 128, 12, 12, 128, 3, 3, stride=(2, 2), padding=(1, 1), groups=128),
    ConvCase("mobilenet-stem@96", 16, 3, 96, 96, 16, 3, 3, stride=(2, 2), padding=(1, 1)),
    ConvCase("mobilenet-1x1-128@12", 16, 128, 12, 12, 128, 1, 1),
    ConvCase("mobilenet-1x1-512@3", 16, 512, 3, 3, 512, 1, 1),
    ConvCase("unet-1x1-head@128", 4, 16, 128, 128, 1, 1, 1),
    ConvCase("resnet18-1x1-s2@16", 32, 128, 16, 16, 256, 1, 1, stride=(2, 2)),
)
_TRAINING_NAMES = frozenset(c.name for c in TRAINING)


def cases(only):
    suite = load_suite()
    training = {c.name for c in TRAINING}
    conv = suite.conv if not only else [suite.conv_case(n) for n in only if n not in training]
    out = []
    for c in conv:
        out.append((c.name, c))
        if c.n > 1:
            out.append((c.name + "@n1", c.scaled(batch=1)))
    out += [(c.name, c) for c in TRAINING if not only or c.name in only]
    return out


def measure(cases_, rounds, dtype=np.float32):
    rows = []
    for label, c in cases_:
        x, w, b = c.arrays(dtype)
        gy = c.grad_output(dtype)
        kw = c.kwargs
        p = V.conv_params("calibrate", x.shape, w.shape, x.dtype, kw["stride"], kw["padding"], kw["dilation"],
                          kw["groups"])
        for pass_ in _dispatch.PASSES:
            args = {"forward": (x, w, b), "grad_input": (gy, w), "grad_weight": (gy, x)}[pass_]
            threads = _threads.apply(p.macs if pass_ == "forward" else 2 * p.macs)  # as the public ops
            algs = _dispatch.eligible(p, pass_)
            calls = {alg.name: functools.partial(getattr(alg, pass_), *args, p) for alg in algs}
            times = interleaved(calls, rounds)
            raw = {alg.name: alg.cost(p, pass_, threads) for alg in algs}
            rows.append({"case": label, "pass": pass_, "times": times, "raw": raw})
            print(f"  {label:24s} {pass_:12s} " + "  ".join(f"{k} {v * 1e3:8.3f} ms" for k, v in times.items()),
                  file=sys.stderr, flush=True)
    return rows


#: Weight of the public suite's own shapes (not their batch-1 copies, not TRAINING) in the fit's
#: loss: they are the yardstick PyTorch is compared on.  2026-12-04 (AVX-512, interleaved timings of
#: the 135 case-passes), geometric means of auto / best, unweighted fit -> weighted: suite 1.036 ->
#: 1.023, training layers 1.063 -> 1.070, all 1.051 -> 1.050 (the table before: 1.035, 1.078, 1.055).
SUITE_WEIGHT = 2.0


def _weight(row):
    name = row.get("case", "")
    return 1.0 if "@" in name or name in _TRAINING_NAMES else SUITE_WEIGHT


def fit(rows, sweeps=20):
    """Per pass, a scale factor per algorithm (``direct``'s fixed at 1) that minimises the weighted
    sum over the measured cases of log(time of auto's pick / time of the best) (the public suite's
    shapes weighted SUITE_WEIGHT).

    Only the ranking matters to ``auto``, so the factors are searched on a grid of log-scales
    (e**-3 .. e**3, step 0.1) rather than fitted to the absolute times; ties go to the factors
    closest to the models' median errors (the start): a factor the measured picks leave free then
    keeps the model's own scale for shapes the cases do not cover (ties going to 1 had set fft's
    forward factor to 1.5 against its median 3.2, and auto took fft for ResNet-18's 128-channel
    16x16 layer: 38 ms where Winograd takes 13).  The search starts from each model's median error and goes by coordinates: each
    algorithm's factor in turn over the whole grid, the others held, until a sweep changes nothing
    (a full grid over five algorithms is 61**4 combinations per pass, hours in Python).  Returned as ``{"algorithm/pass": [a, 0.0]}``
    (cost = a * model).
    """
    coef = {}
    grid = np.round(np.arange(-3.0, 3.0001, 0.1), 1)
    for pass_ in _dispatch.PASSES:
        rr = [r for r in rows if r["pass"] == pass_]
        names = sorted({n for r in rr for n in r["times"]} - {"direct"})
        # start from each model's median error relative to direct's (the coordinate search alone
        # stalls where two algorithms must move together)
        base = np.median([math.log(r["times"]["direct"] / r["raw"]["direct"]) for r in rr if "direct" in r["times"]]
                         or [0.0])
        logs = {}
        for n in names:
            errs = [math.log(r["times"][n] / r["raw"][n]) - base for r in rr if n in r["times"] and r["raw"][n] > 0]
            logs[n] = float(np.clip(np.round(np.median(errs), 1), -3.0, 3.0)) if errs else 0.0

        def key(trial_logs):
            trial = {f"{n}/{pass_}": [math.exp(a), 0.0] for n, a in trial_logs.items()}
            loss = sum(_weight(r) * math.log(r["times"][pick(r, trial)] / min(r["times"].values())) for r in rr)
            return (round(loss, 9), sum(abs(a - start[n]) for n, a in trial_logs.items()))

        start = dict(logs)
        best = key(logs)
        for _ in range(sweeps):
            changed = False
            for n in names:
                for a in grid:
                    trial = dict(logs, **{n: float(a)})
                    k = key(trial)
                    if k < best:
                        best, logs, changed = k, trial, True
            if not changed:
                break
        coef.update({f"{n}/{pass_}": [math.exp(a), 0.0] for n, a in logs.items()})
    return coef


def pick(row, coef):
    def cal(name):
        a, b = coef.get(f"{name}/{row['pass']}", (1.0, 0.0))
        return a * row["raw"][name] + b
    return min(row["raw"], key=cal)


def report(rows, coef):
    within = {pass_: [0, 0] for pass_ in _dispatch.PASSES}
    print(f"| case | pass | best | best ms | auto pick | auto / best |")
    print("|---|---|---|---:|---|---:|")
    for r in rows:
        best = min(r["times"], key=r["times"].get)
        choice = pick(r, coef)
        ratio = r["times"][choice] / r["times"][best]
        within[r["pass"]][0] += ratio <= 1.1
        within[r["pass"]][1] += 1
        print(f"| {r['case']} | {r['pass']} | {best} | {r['times'][best] * 1e3:.3f} | {choice} | {ratio:.2f} |")
    suite = [r for r in rows if "@" not in r["case"]]
    if suite and len(suite) < len(rows):
        ok = sum(r["times"][pick(r, coef)] <= 1.1 * min(r["times"].values()) for r in suite)
        print(f"\nsuite shapes only (no batch-1 copies): auto within 10% of the best in {ok}/{len(suite)} "
              f"= {ok / len(suite):.0%} of shape x pass cases")
    acc = {k: v[0] / v[1] for k, v in within.items() if v[1]}
    total = sum(v[0] for v in within.values()) / max(1, sum(v[1] for v in within.values()))
    print("\nauto within 10% of the best: " + ", ".join(f"{k} {v:.0%}" for k, v in acc.items())
          + f"; all passes {total:.0%}")
    return acc, total


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", help="comma-separated case names")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--write", action="store_true", help="store the fit in fastconv/_calibration.json")
    ap.add_argument("--json", help="also write the measurements to this file")
    ap.add_argument("--from", dest="from_json", help="refit from measurements saved with --json (no timing)")
    a = ap.parse_args(argv)
    only = a.only.split(",") if a.only else None
    if a.from_json:
        with open(a.from_json) as f:
            rows = json.load(f)["rows"]
    else:
        rows = measure(cases(only), a.rounds)
        if a.json:  # the measurements first: they are the expensive part
            with open(a.json, "w") as f:
                json.dump({"rows": rows}, f, indent=1)
    print("## with the stored calibration (as shipped)")
    acc0, total0 = report(rows, _select.calibration())
    coef = fit(rows)
    print("\n## with the new fit")
    acc, total = report(rows, coef)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"rows": rows, "coef": coef}, f, indent=1)
    if a.write:
        from fastconv._select import _cpu
        import numba
        data = {"machine": f"{_cpu()}, {os.cpu_count()} cores", "threads": fastconv.get_num_threads(),
                "date": time.strftime("%Y-%m-%d"), "numba": numba.__version__, "numpy": np.__version__,
                "python": platform.python_version(), "cases": len(rows), "accuracy": acc, "accuracy_all": total,
                "coef": coef}
        isa = _cpuinfo.calibration_key()  # this ISA and maker: the other tables stay as they are
        try:
            with open(CAL_PATH, encoding="utf-8") as f:
                stored = json.load(f)
        except (OSError, ValueError):
            stored = {}
        tables = stored.get("by_isa", {})
        tables[isa] = dict(data, isa=isa)
        with open(CAL_PATH, "w") as f:
            json.dump({"by_isa": dict(sorted(tables.items()))}, f, indent=1)
        print(f"wrote the {isa} table of {CAL_PATH}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
