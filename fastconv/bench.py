"""``python -m fastconv bench``: time fastconv on a shape suite against PyTorch (or plain NumPy).

For every case and pass the contestants -- each registered algorithm, ``auto`` and the reference
(PyTorch's CPU ops when torch is installed, else a plain NumPy implementation) -- are warmed (JIT
compile and first-touch costs stay out of the figures) and then timed interleaved, round by round,
with the same thread count, so the ratios hold even when the machine is busy.  PyTorch runs in a
worker process of its own, driven round by round: in one process the idle workers of numba's OpenMP
pool and PyTorch's compete for the cores (``--same-process`` measures that way anyway).  A
plain float32 matrix product (sgemm, 1024^3, numpy's BLAS) timed in the same run gives each row a
"% of sgemm" yardstick: how close the layer gets to the machine's dense-GEMM speed.

PyTorch is timed in both of its CPU memory layouts: ``torch`` (NCHW, contiguous tensors) and
``torch-cl`` (channels_last: the 4-D tensors in ``torch.channels_last`` memory format, the layout
PyTorch's CPU guides recommend and often the faster one).  The "vs" ratio of every row, and the
summary's geometric means, are taken against the FASTER of the two per shape and pass, so a fastconv
figure above 1 beats PyTorch's best layout (``--torch-layout nchw`` or ``cl`` times only one).

Examples
--------
>>> from fastconv.bench import Row, format_table
>>> rows = [Row("conv2d", "lenet5-c1", "forward", "direct", 1.5, 10.0, 2.0, 12.5),
...         Row("conv2d", "lenet5-c1", "forward", "torch", 3.0, 5.0, 1.0, 6.25)]
>>> print(format_table(rows, "torch"))
shape      pass     algorithm    ms  GFLOP/s  vs torch  % sgemm
---------  -------  ---------  ----  -------  --------  -------
lenet5-c1  forward  direct     1.50     10.0     x2.00     12.5
lenet5-c1  forward  torch      3.00      5.0     x1.00      6.2
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import subprocess
import sys
import time
from typing import NamedTuple

import numpy as np

from . import cases as _cases
# the measuring side; its public names (timing, yardsticks, NumPy references) are this module's too
from ._bench_measure import (GEMM_SETTLE, TORCH_LAYOUTS, _conv_contestants, _pool_contestants,  # noqa: F401
                             _TorchProcess, gemm_seconds, gemm_shapes, numpy_conv2d, numpy_conv2d_backward,
                             numpy_max_pool2d, numpy_max_pool2d_backward, sgemm_gflops, time_interleaved)

PASS_ALIASES = {"fwd": "forward", "bwd": "backward", "forward": "forward", "backward": "backward"}


class Row(NamedTuple):
    """One line of the table: times in ms, speeds in GFLOP/s, ``vs_ref`` = reference time / this time."""

    op: str
    shape: str
    pass_: str
    algorithm: str
    ms: float
    gflops: float
    vs_ref: float
    pct_sgemm: float
    pct_gemm: float = float("nan")  # % of the same-shape GEMMs' speed (see gemm_seconds)
    #: the reference row ``vs_ref`` divides by (the faster PyTorch layout of this shape and pass)
    ref_algorithm: str = ""
    #: reference time / this time against each reference row by name (``{'torch': .., 'torch-cl': ..}``)
    vs_each: dict = {}


#: Names of the reference rows: PyTorch in NCHW, PyTorch in channels_last, the plain NumPy baseline.
REFERENCE_NAMES = frozenset(TORCH_LAYOUTS.values()) | {"numpy"}


# --------------------------------------------------------------------------- the suite
def run(suite, passes=("forward", "backward"), algorithms=None, reference="torch", budget=1.0,
        min_rounds=3, max_rounds=15, sgemm=None, progress=True, stat="median", same_process=False,
        threads=None, gemm=False, torch_layouts=("nchw", "cl")):
    """Time every case and pass of ``suite``; returns a list of :class:`Row` (reference rows included).

    ``algorithms`` defaults to ``('auto',) + fastconv.algorithms()``; ``reference`` is ``'torch'``
    or ``'numpy'``; ``sgemm`` is the GFLOP/s the "% of sgemm" column divides by; ``gemm`` also times
    each conv case's own matrix products (:func:`gemm_seconds`) for the "% gemm" column.  PyTorch runs
    in a worker process with ``threads`` threads (default: numba's current count) unless ``same_process``.
    With the torch reference, each layout of ``torch_layouts`` (``'nchw'``, ``'cl'``) gives a reference
    row (``torch``, ``torch-cl``) and every ``vs_ref`` is against the faster of them (``ref_algorithm``).
    """
    import fastconv
    import numba
    torch = worker = None
    if reference == "torch" and same_process:
        import torch
        torch.set_num_threads(numba.get_num_threads() if threads is None else threads)
    elif reference == "torch":
        worker = _TorchProcess(numba.get_num_threads() if threads is None else threads)
    algorithms = ("auto",) + fastconv.algorithms() if algorithms is None else tuple(algorithms)
    layouts = tuple(torch_layouts)
    if not layouts or any(lay not in TORCH_LAYOUTS for lay in layouts):
        raise ValueError(f"run: torch_layouts must name some of nchw, cl, got {torch_layouts!r}")
    tasks = [("conv2d", c, p) for c in suite.conv for p in passes]
    tasks += [("max_pool2d", c, p) for c in suite.pool for p in passes]
    bar = _progress(len(tasks), progress)
    rows = []
    try:
        for op, case, pass_ in tasks:
            bar.set_postfix_str(f"{case.name} {pass_}")
            if op == "conv2d":
                named = _conv_contestants(case, pass_, algorithms, reference, torch, worker, layouts)
            else:
                named = _pool_contestants(case, pass_, reference, torch, worker, layouts)
            times = time_interleaved([f for _, f in named], budget, min_rounds, max_rounds, stat)
            refs = {name: t for (name, _), t in zip(named, times) if name in REFERENCE_NAMES}
            ref_name = min(refs, key=refs.get)  # the faster PyTorch layout of this shape and pass
            t_ref = refs[ref_name]
            flops = case.flops(pass_)
            t_gemm = float("nan")
            if gemm and op == "conv2d":
                t_gemm = gemm_seconds(case, pass_)
                time.sleep(GEMM_SETTLE)
            for (name, _), t in zip(named, times):
                gf = flops / t / 1e9
                pct = 100.0 * gf / sgemm if (sgemm and op == "conv2d") else float("nan")
                rows.append(Row(op, case.name, pass_, name, 1e3 * t, gf, t_ref / t, pct, 100.0 * t_gemm / t,
                                ref_name, {n: tr / t for n, tr in refs.items()}))
            bar.update(1)
    finally:
        bar.close()
        if worker is not None:
            worker.close()
    return rows


class _NoBar:
    def set_postfix_str(self, s):
        pass

    def update(self, n):
        pass

    def close(self):
        pass


def _progress(total, enabled):
    if not enabled:
        return _NoBar()
    try:
        from tqdm import tqdm
    except ImportError:
        return _NoBar()
    return tqdm(total=total, desc="fastconv bench", unit="case", file=sys.stderr, leave=False)


# --------------------------------------------------------------------------- output
def format_table(rows, reference):
    """The rows as an aligned text table (pooling rows show element operations as GFLOP/s, no % sgemm)."""
    gemm = any(not math.isnan(r.pct_gemm) for r in rows)
    head = ("shape", "pass", "algorithm", "ms", "GFLOP/s", f"vs {reference}", "% sgemm") + (("% gemm",) if gemm else ())
    body = [(r.shape if r.op == "conv2d" else f"{r.shape} (pool)", r.pass_, r.algorithm, f"{r.ms:.2f}" if r.ms >= 1 else f"{r.ms:.3f}",
             f"{r.gflops:.1f}", f"x{r.vs_ref:.2f}", "-" if math.isnan(r.pct_sgemm) else f"{r.pct_sgemm:.1f}")
            + ((("-" if math.isnan(r.pct_gemm) else f"{r.pct_gemm:.1f}"),) if gemm else ())
            for r in rows]
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    left = 3  # text columns are left-aligned, numbers right-aligned

    def line(cells):
        return "  ".join(c.ljust(wd) if i < left else c.rjust(wd)
                         for i, (c, wd) in enumerate(zip(cells, widths))).rstrip()
    return "\n".join([line(head), line(["-" * wd for wd in widths])] + [line(b) for b in body])


def summary(rows, reference):
    """Geometric-mean speed vs the reference per (op, algorithm, pass), as text lines; each ratio is
    against the faster reference row of its shape and pass (PyTorch's faster layout)."""
    groups = {}
    for r in rows:
        if r.algorithm != reference and r.algorithm not in REFERENCE_NAMES:
            groups.setdefault((r.op, r.algorithm, r.pass_), []).append(r.vs_ref)
    both = {r.algorithm for r in rows} >= set(TORCH_LAYOUTS.values())
    against = f"{reference}'s faster layout" if both else reference
    lines = []
    for (op, alg, pass_), v in groups.items():
        gm = math.exp(sum(math.log(x) for x in v) / len(v))
        lines.append(f"{op} {alg:8} {pass_:8}: x{gm:.2f} vs {against} (geometric mean over {len(v)} shapes)")
    return lines


def plot(rows, reference, path):
    """Grouped bar chart of speed vs the reference (one group per shape and pass) written to ``path``."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    groups = list(dict.fromkeys((r.shape, r.pass_) for r in rows))
    algs = list(dict.fromkeys(r.algorithm for r in rows
                              if r.algorithm != reference and r.algorithm not in REFERENCE_NAMES))
    speed = {(r.shape, r.pass_, r.algorithm): r.vs_ref for r in rows}
    fig, ax = plt.subplots(figsize=(max(6.0, 0.6 * len(groups) * max(1, len(algs))), 4.5))
    width = 0.8 / max(1, len(algs))
    for i, alg in enumerate(algs):
        xs = [gi + (i - (len(algs) - 1) / 2) * width for gi, g in enumerate(groups) if g + (alg,) in speed]
        ys = [speed[g + (alg,)] for g in groups if g + (alg,) in speed]
        ax.bar(xs, ys, width, label=alg)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels([f"{s}\n{p}" for s, p in groups], rotation=60, ha="right", fontsize=7)
    ax.set_ylabel(f"speed vs {reference}, faster layout (>1: faster)")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------- command line
def _parser():
    p = argparse.ArgumentParser(
        prog="python -m fastconv bench",
        description="Time fastconv's conv2d and max_pool2d (forward and backward) on a shape suite "
                    "against PyTorch (or plain NumPy when torch is not installed).")
    p.add_argument("--shapes", metavar="FILE", help="a shape file like fastconv/shapes.json (default: the public suite)")
    p.add_argument("--only", metavar="NAME[,NAME]", help="only these cases of the suite")
    p.add_argument("--passes", default="forward,backward", help="forward,backward (or fwd,bwd); default both")
    p.add_argument("--algorithms", metavar="ALG[,ALG]",
                   help="conv algorithms to time (default: auto and every registered one)")
    p.add_argument("--threads", type=int, help="threads for fastconv, the reference and sgemm (default: all)")
    p.add_argument("--reference", choices=("torch", "numpy"), help="baseline (default: torch when installed)")
    p.add_argument("--torch-layout", choices=("best", "nchw", "cl"), default="best",
                   help="PyTorch layout(s) to time: best (default) = both NCHW ('torch' rows) and channels_last "
                        "('torch-cl' rows), ratios against the faster per shape and pass; nchw or cl: only that one")
    p.add_argument("--quick", action="store_true", help="few rounds per case: a rough figure in seconds")
    p.add_argument("--budget", type=float, help="seconds of timing per case and pass (default 1.0, quick 0.2)")
    p.add_argument("--gemm", action="store_true",
                   help="also time each conv layer's own matrix products (numpy BLAS, same threads): the "
                        "'%% gemm' column is that plain GEMM's time over the contestant's, in percent")
    p.add_argument("--same-process", action="store_true",
                   help="run PyTorch in this process too (its thread pool then competes with numba's)")
    p.add_argument("--stat", choices=("median", "min"), default="median",
                   help="figure per contestant: median of the rounds (default) or the fastest round, "
                        "steadier on a busy machine")
    p.add_argument("--json", metavar="FILE", help="write the results as JSON")
    p.add_argument("--plot", metavar="FILE.png", help="write a grouped bar chart (needs matplotlib)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--torch-step", action="store_true",
                   help="instead: one SGD training step and one inference pass of four networks, PyTorch vs "
                        "fastconv.torch.convert (runs benchmarks/torch_train_step.py; --threads, --quick apply)")
    return p


def _fail(msg):
    print(f"fastconv bench: {msg}", file=sys.stderr)
    return 2


def main(argv=None):
    """Run the benchmark command line (``python -m fastconv bench --help``); returns the exit status."""
    try:
        a = _parser().parse_args(argv)
    except SystemExit as exc:  # --help, or a usage error already printed by argparse
        return int(exc.code or 0)
    if a.torch_step:
        return _torch_step(a)
    import fastconv

    passes = []
    for s in a.passes.split(","):
        if s.strip() not in PASS_ALIASES:
            return _fail(f"--passes must name forward/backward (fwd/bwd), got {s.strip()!r}")
        passes.append(PASS_ALIASES[s.strip()])
    passes = tuple(dict.fromkeys(passes))
    known = ("auto",) + fastconv.algorithms()
    algorithms = None
    if a.algorithms:
        algorithms = tuple(s.strip() for s in a.algorithms.split(",") if s.strip())
        bad = [s for s in algorithms if s not in known]
        if bad or not algorithms:
            return _fail(f"--algorithms must name some of {', '.join(known)}, got {a.algorithms!r}")
    try:
        suite = _cases.load_suite(a.shapes)
        if a.only:
            suite = suite.only(a.only)
    except (OSError, ValueError) as exc:
        return _fail(str(exc))
    if a.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            return _fail("--plot needs matplotlib: pip install 'fastconv[bench]' (or matplotlib)")
    reference = a.reference
    has_torch = importlib.util.find_spec("torch") is not None  # not imported here: see --same-process
    if reference is None:
        reference = "torch" if has_torch else "numpy"
    elif reference == "torch" and not has_torch:
        return _fail("--reference torch needs PyTorch installed")

    import numba
    threads = a.threads if a.threads is not None else numba.config.NUMBA_NUM_THREADS
    if not 1 <= threads <= numba.config.NUMBA_NUM_THREADS:
        return _fail(f"--threads must be between 1 and NUMBA_NUM_THREADS={numba.config.NUMBA_NUM_THREADS}, "
                     f"got {threads}")
    _set_threads(threads, reference)
    budget = a.budget if a.budget is not None else (0.2 if a.quick else 1.0)
    rounds = (1, 5) if a.quick else (3, 15)

    # sgemm is timed before and after the suite and the better figure kept: a busy moment at either
    # end would otherwise inflate every "% of sgemm".
    sgemm = sgemm_gflops(rounds=3 if a.quick else 7)
    time.sleep(GEMM_SETTLE)  # its spinning BLAS workers would slow the first case's rounds
    layouts = ("nchw", "cl") if a.torch_layout == "best" else (a.torch_layout,)
    rows = run(suite, passes, algorithms, reference, budget, *rounds, sgemm=None, progress=not a.no_progress,
               stat=a.stat, same_process=a.same_process, threads=threads, gemm=a.gemm, torch_layouts=layouts)
    sgemm = max(sgemm, sgemm_gflops(rounds=3 if a.quick else 7))
    rows = [r._replace(pct_sgemm=100.0 * r.gflops / sgemm) if r.op == "conv2d" else r for r in rows]
    header = (f"fastconv {fastconv.__version__} | {threads} threads | {a.stat} of interleaved rounds | "
              f"reference: {reference}"
              f"{' ' + _torch_version() if reference == 'torch' else ''}"
              f"{(' (same process)' if a.same_process else ' (own process)') if reference == 'torch' else ''}"
              f"{(' ' + _LAYOUT_NOTE[a.torch_layout]) if reference == 'torch' else ''} | sgemm {sgemm:.1f} GFLOP/s | "
              f"{platform.machine()} {os.cpu_count()} cpus")
    print(header)
    print(format_table(rows, reference))
    print()
    print("\n".join(summary(rows, reference)))
    if a.json:
        doc = {"meta": {"fastconv": fastconv.__version__, "threads": threads, "reference": reference,
                        "sgemm_gflops": sgemm, "stat": a.stat, "machine": platform.machine(), "cpus": os.cpu_count(),
                        "python": platform.python_version(), "numpy": np.__version__,
                        "numba": numba.__version__, "quick": a.quick, "same_process": a.same_process,
                        "torch": _torch_version() if reference == "torch" else None,
                        # which rows are references, and that vs_ref divides by the faster of them
                        "reference_rows": [TORCH_LAYOUTS[lay] for lay in layouts] if reference == "torch"
                        else [reference],
                        "vs_ref_against": "fastest reference row per shape and pass"},
               "rows": [dict(r._asdict()) for r in rows]}
        with open(a.json, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=1, allow_nan=True)
        print(f"wrote {a.json}")
    if a.plot:
        plot(rows, reference, a.plot)
        print(f"wrote {a.plot}")
    return 0


_LAYOUT_NOTE = {"best": "NCHW (torch) + channels_last (torch-cl), vs = against the faster",
                "nchw": "NCHW only (torch)", "cl": "channels_last only (torch-cl)"}


def _torch_version():
    from importlib.metadata import version
    return f"torch {version('torch')}"


def _set_threads(n, reference):
    """One thread count for fastconv (numba and its BLAS use), numpy's BLAS and torch."""
    import fastconv
    import numba
    if hasattr(fastconv, "set_num_threads"):
        fastconv.set_num_threads(n)
    numba.set_num_threads(n)
    # numpy's own BLAS only (sgemm, the NumPy reference): the BLAS that kernels call inside numba is
    # fastconv's business.
    try:
        from threadpoolctl import ThreadpoolController
        for ctl in ThreadpoolController().select(user_api="blas").lib_controllers:
            if "numpy" in ctl.filepath:
                ctl.set_num_threads(n)
    except ImportError:
        pass
    if reference == "torch" and "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(n)


def _torch_step(a):
    """``--torch-step``: run benchmarks/torch_train_step.py (a source checkout's) in a child process."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = os.path.join(root, "benchmarks", "torch_train_step.py")
    if not os.path.exists(script):
        return _fail(f"--torch-step needs a source checkout of fastconv (no {script})")
    if importlib.util.find_spec("torch") is None:
        return _fail("--torch-step needs PyTorch: pip install 'fastconv[torch]'")
    cmd = [sys.executable, script] + (["--quick"] if a.quick else []) + \
        (["--threads", str(a.threads)] if a.threads else [])
    # the checkout's fastconv, not another installed copy: the script's own folder is benchmarks/
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    return subprocess.run(cmd, env=env).returncode
