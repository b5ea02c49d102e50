"""pytest-benchmark suite: every algorithm, ``auto`` and PyTorch side by side, one group per shape.

PyTorch runs in both of its CPU layouts: ``torch`` (NCHW) and ``torch-cl`` (channels_last: the 4-D
tensors in ``torch.channels_last`` memory format); ``perf_report.py`` compares against the faster.

Deselected from the default run (``perf`` marker).  Run it with::

    python -m pytest tests/perf -m perf -n 0 --benchmark-json=.benchmarks/perf.json
    python benchmarks/perf_report.py .benchmarks/perf.json

and in CI's short mode with ``-k "lenet5 or mobilenet" --benchmark-min-rounds=5
--benchmark-max-time=0.1``.  Each contestant is called once before timing (JIT compile, caches), and
its ``extra_info`` carries the GFLOP/s and the thread count for ``benchmarks/perf_report.py``.
"""
import time

import numba
import numpy as np
import pytest

import fastconv
from fastconv.cases import load_suite

pytest.importorskip("pytest_benchmark")

pytestmark = pytest.mark.perf

SUITE = load_suite()
TORCH = ("torch", "torch-cl")  # PyTorch on NCHW tensors, and on channels_last ones
CONTESTANTS = ("auto",) + fastconv.algorithms() + TORCH
PASSES = ("forward", "backward")


def _threads():
    return fastconv.get_num_threads() if hasattr(fastconv, "get_num_threads") else numba.get_num_threads()


def _torch():
    torch = pytest.importorskip("torch")
    torch.set_num_threads(_threads())
    return torch


def _tensors(torch, contestant, *arrays):
    """The arrays as tensors; for ``torch-cl`` the 4-D ones in channels_last memory format."""
    ts = [torch.from_numpy(a) for a in arrays]
    if contestant == "torch-cl":
        ts = [t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t for t in ts]
    return ts


def _conv_fn(case, contestant, pass_):
    x, w, b = case.arrays()
    gy = case.grad_output()
    kw = case.kwargs
    if contestant in TORCH:
        torch = _torch()
        tx, tw, tb, tgy = _tensors(torch, contestant, x, w, b, gy)
        if pass_ == "forward":
            def fn():
                with torch.no_grad():
                    return torch.nn.functional.conv2d(tx, tw, tb, **kw)
        else:
            def fn():
                return torch.ops.aten.convolution_backward(
                    tgy, tx, tw, [case.k], list(case.stride), list(case.padding), list(case.dilation),
                    False, [0, 0], case.groups, [True, True, True])
        return fn
    if pass_ == "forward":
        def fn():
            return fastconv.conv2d(x, w, b, **kw, algorithm=contestant)
    else:
        def fn():
            return fastconv.conv2d_backward(gy, x, w, **kw, algorithm=contestant)
    try:
        fn()  # compile (or load the numba cache) before anything is timed
    except ValueError as exc:
        if "cannot compute" in str(exc):
            pytest.skip(str(exc))
        raise
    return fn


def _pool_fn(case, contestant, pass_):
    x, gy, kw = case.arrays(), case.grad_output(), case.kwargs
    if contestant in TORCH:
        torch = _torch()
        aten = torch.ops.aten
        tx, tgy = _tensors(torch, contestant, x, gy)
        k, s, p = list(case.kernel), list(case.stride), list(case.padding)
        _, tidx = aten.max_pool2d_with_indices(tx, k, s, p, [1, 1], False)
        if pass_ == "forward":
            return lambda: aten.max_pool2d_with_indices(tx, k, s, p, [1, 1], False)
        return lambda: aten.max_pool2d_with_indices_backward(tgy, tx, k, s, p, [1, 1], False, tidx)
    _, idx = fastconv.max_pool2d(x, **kw, return_indices=True)
    if pass_ == "forward":
        return lambda: fastconv.max_pool2d(x, **kw, return_indices=True)
    return lambda: fastconv.max_pool2d_backward(gy, idx, x.shape)


def _record(benchmark, fn, case, contestant, pass_, op):
    benchmark.group = f"{op} {case.name} {pass_}"
    fn()
    benchmark(fn)
    median = benchmark.stats.stats.median
    benchmark.extra_info.update(op=op, shape=case.name, pass_=pass_, contestant=contestant,
                                threads=_threads(), gflops=case.flops(pass_) / median / 1e9)


@pytest.mark.parametrize("contestant", CONTESTANTS)
@pytest.mark.parametrize("pass_", PASSES)
@pytest.mark.parametrize("case", SUITE.conv, ids=lambda c: c.name)
def test_conv2d(benchmark, case, pass_, contestant):
    _record(benchmark, _conv_fn(case, contestant, pass_), case, contestant, pass_, "conv2d")


@pytest.mark.parametrize("contestant", ("fastconv",) + TORCH)
@pytest.mark.parametrize("pass_", PASSES)
@pytest.mark.parametrize("case", SUITE.pool, ids=lambda c: c.name)
def test_max_pool2d(benchmark, case, pass_, contestant):
    _record(benchmark, _pool_fn(case, contestant, pass_), case, contestant, pass_, "max_pool2d")


@pytest.mark.parametrize("pass_", PASSES)
@pytest.mark.parametrize("case", SUITE.conv, ids=lambda c: c.name)
def test_auto_choice(benchmark, case, pass_):
    """``auto`` timed interleaved with every explicit algorithm, round by round, so load spikes hit
    all of them alike; ``extra_info['auto_over_best']`` (ratio of the fastest rounds) is what
    ``perf_report.py`` checks.  The benchmark itself times ``auto`` again."""
    auto = _conv_fn(case, "auto", pass_)
    explicit = {}
    for alg in fastconv.algorithms():
        try:
            explicit[alg] = _conv_fn(case, alg, pass_)
        except pytest.skip.Exception:
            pass
    fns = [auto] + list(explicit.values())
    times = [[] for _ in fns]
    # at least --benchmark-min-rounds rounds, more (up to 50) while they fit in about a second
    min_rounds = max(3, getattr(benchmark, "_min_rounds", 5))
    start = time.perf_counter()
    for r in range(50):
        if r >= min_rounds and time.perf_counter() - start > 1.0:
            break
        for f, ts in zip(fns, times):
            t0 = time.perf_counter()
            f()
            ts.append(time.perf_counter() - t0)
    best = [min(ts) for ts in times]
    i = 1 + int(np.argmin(best[1:]))
    benchmark.group = f"auto-choice {pass_}"
    benchmark(auto)
    benchmark.extra_info.update(op="conv2d", shape=case.name, pass_=pass_, contestant="auto",
                                threads=_threads(), best=list(explicit)[i - 1],
                                auto_over_best=best[0] / best[i], rounds=len(times[0]),
                                gflops=case.flops(pass_) / benchmark.stats.stats.median / 1e9)
