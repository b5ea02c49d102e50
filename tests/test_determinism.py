"""Determinism: what each algorithm guarantees about the bits of its results.

Same inputs, algorithm and thread count give bitwise identical results, run after run and process
after process, for every algorithm and pass.  (Calls below ``SERIAL_WORK`` multiply-accumulates run
on one thread whatever the setting, so the cases here are larger than that.)  Across thread counts (1 vs 2 threads of numba's pool,
set with :func:`fastconv.threads`) the guarantee differs:

| algorithm | forward | grad_input | grad_weight | grad_bias | why |
|---|---|---|---|---|---|
| direct | bitwise | bitwise | bitwise | bitwise | work items are fixed by the shape (image, group, channel block, row block; tap blocks for grad_weight), each reduced in a fixed order; which worker runs an item (claimed one at a time) does not matter |
| im2col | rounding | rounding | rounding | bitwise | tile sizes, channel blocks and grad_weight's batch split follow the thread count, so BLAS may sum in a different grouping (seen: grad_weight with a batch split, and forward on a small strided case) |
| fft | bitwise | bitwise | bitwise | bitwise | the tiling plan ignores the thread count; scipy.fft's workers split independent 1-D transforms; contractions own their frequencies |
| auto | as the algorithm it picks for that thread count | | | | |
| max_pool2d, avg_pool2d and backward | bitwise | | | | one work item per (image, channel) plane |

"rounding" means equal within the dtype's tolerance (``conftest.TOL``), not bitwise.
The table is what the registry's ``Algorithm.thread_invariant`` fields claim; the tests read those
fields, so an algorithm registered later is held to its own claim.
"""
import hashlib
import json
import subprocess
import sys
import textwrap

import numba
import numpy as np
import pytest

import fastconv
from conftest import ALGORITHMS, TOL

PASSES = ("forward", "grad_input", "grad_weight", "grad_bias")
# each algorithm's own claim (Algorithm.thread_invariant); grad_bias is one shared reduction
THREAD_INVARIANT = {name: set(alg.thread_invariant) | {"grad_bias"}
                    for name, alg in fastconv._dispatch.registry().items()}
CASES = {  # each above SERIAL_WORK (so 2 threads really run) and split into several work items
    "basic-groups": ((4, 6, 20, 19), (8, 3, 3, 3), {"groups": 2, "padding": 1}),
    "strided": ((4, 8, 31, 29), (12, 8, 3, 3), {"stride": 2, "padding": 1}),
    "pointwise": ((4, 32, 16, 16), (24, 32, 1, 1), {}),
    "batch-split": ((6, 2, 40, 40), (2, 2, 3, 3), {"padding": 1}),  # fewer channel blocks than threads
    "large-kernel": ((2, 3, 32, 30), (4, 3, 7, 7), {"padding": 3}),
    "dilated-same": ((3, 8, 32, 30), (8, 4, 3, 2), {"dilation": 2, "groups": 2, "padding": "same"}),
}
# fastconv runs calls with less work than this on one thread (fastconv/_threads.py)
SERIAL_WORK = getattr(__import__("fastconv._threads", fromlist=["_"]), "SERIAL_WORK", 0)
DTYPES = [np.float32, np.float64]
needs_two = pytest.mark.skipif(numba.config.NUMBA_NUM_THREADS < 2, reason="needs NUMBA_NUM_THREADS >= 2")


def _threads(n):
    return fastconv.threads(n)


def _inputs(case, dtype, seed=0):
    xs, ws, kw = CASES[case]
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(xs).astype(dtype)
    w = rng.standard_normal(ws).astype(dtype)
    b = rng.standard_normal(ws[0]).astype(dtype)
    gy = rng.standard_normal(fastconv.conv2d(x, w, **kw, algorithm="direct").shape).astype(dtype)
    return x, w, b, gy, kw


def _run(algorithm, x, w, b, gy, kw):
    """Every pass, or None when the algorithm refuses this case (its documented ValueError)."""
    try:
        out = {"forward": fastconv.conv2d(x, w, b, **kw, algorithm=algorithm)}
        out.update(fastconv.conv2d_backward(gy, x, w, **kw, algorithm=algorithm)._asdict())
    except ValueError as exc:
        if isinstance(exc, fastconv.AlgorithmUnavailable):
            return None
        raise
    return out


def _bits(results):
    return {name: a.tobytes() for name, a in results.items()}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("algorithm", ALGORITHMS + ("auto",))
def test_same_thread_count_gives_the_same_bits(algorithm, case, dtype):
    x, w, b, gy, kw = _inputs(case, dtype)
    for n in sorted({1, numba.config.NUMBA_NUM_THREADS}):
        with _threads(n):
            runs = [_run(algorithm, x, w, b, gy, kw) for _ in range(3)]
        if runs[0] is None:
            pytest.skip(f"{algorithm} refuses {case}")
        for r in runs[1:]:
            assert _bits(r) == _bits(runs[0]), f"{n} threads: {[k for k in r if r[k].tobytes() != runs[0][k].tobytes()]}"


def test_cases_are_large_enough_to_use_two_threads():
    for name, (xs, ws, kw) in CASES.items():
        y = fastconv.conv2d(np.zeros(xs), np.zeros(ws), **kw)
        macs = y.size * ws[1] * ws[2] * ws[3]
        assert macs >= SERIAL_WORK, f"{name}: {macs} MACs would run on one thread"


def _guarantee(algorithm, case, dtype, pass_):
    """'bitwise' or 'rounding' for 1 vs 2 threads, per the table in the module docstring."""
    if algorithm == "auto":
        if pass_ == "grad_bias":
            return "bitwise"  # shared by every algorithm
        xs, ws, kw = CASES[case]
        chosen = set()
        for n in (1, 2):
            with _threads(n):
                chosen.add(fastconv.choose_algorithm(xs, ws, **kw, dtype=np.dtype(dtype).name,
                                                     pass_="forward" if pass_ == "forward" else pass_))
        if len(chosen) > 1:
            return "rounding"
        algorithm = chosen.pop()
    return "bitwise" if pass_ in THREAD_INVARIANT.get(algorithm, ()) else "rounding"


@needs_two
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("algorithm", ALGORITHMS + ("auto",))
def test_one_versus_two_threads(algorithm, case, dtype):
    x, w, b, gy, kw = _inputs(case, dtype, seed=1)
    with _threads(1):
        one = _run(algorithm, x, w, b, gy, kw)
    with _threads(2):
        two = _run(algorithm, x, w, b, gy, kw)
    if one is None:
        pytest.skip(f"{algorithm} refuses {case}")
    for name in PASSES:
        if _guarantee(algorithm, case, dtype, name) == "bitwise":
            assert one[name].tobytes() == two[name].tobytes(), f"{name} differs between 1 and 2 threads"
        else:
            rtol, atol = TOL[np.dtype(dtype)]["forward" if name == "forward" else "grad"]
            np.testing.assert_allclose(two[name], one[name], rtol=rtol, atol=atol * 10, err_msg=name)


@needs_two
@pytest.mark.parametrize("dtype", DTYPES)
def test_pooling_is_the_same_on_any_thread_count(dtype):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((4, 8, 96, 90)).astype(dtype)
    assert x.size >= SERIAL_WORK
    results = []
    for n in (1, 2, 1, 2):
        with _threads(n):
            y, idx = fastconv.max_pool2d(x, 3, stride=2, padding=1, dilation=(1, 2), return_indices=True)
            a = fastconv.avg_pool2d(x, 3, stride=2, padding=1, ceil_mode=True, count_include_pad=False)
            results.append([y, idx, fastconv.max_pool2d_backward(np.cos(y), idx, x.shape), a,
                            fastconv.avg_pool2d_backward(np.cos(a), x.shape, 3, stride=2, padding=1, ceil_mode=True)])
    for r in results[1:]:
        assert [a.tobytes() for a in r] == [a.tobytes() for a in results[0]]


def _digest(results):
    h = hashlib.sha256()
    for name in PASSES:
        h.update(results[name].tobytes())
    return h.hexdigest()


_PROCESS_SCRIPT = textwrap.dedent("""
    import hashlib, json, pathlib, sys
    sys.path.insert(0, {tests!r})
    import fastconv, test_determinism as t
    src = hashlib.sha256()
    for f in sorted(pathlib.Path(fastconv.__file__).parent.rglob("*.py")):
        src.update(f.read_bytes())
    out = {{}}
    for algorithm in fastconv.algorithms() + ("auto",):
        r = t._run(algorithm, *t._inputs("basic-groups", "float32", seed=3))
        out[algorithm] = None if r is None else t._digest(r)
    print(json.dumps({{"source": src.hexdigest(), "digests": out}}))
""")


def test_same_bits_in_fresh_processes():
    import pathlib

    tests = str(pathlib.Path(__file__).resolve().parent)
    runs = []
    for _ in range(2):
        proc = subprocess.run([sys.executable, "-c", _PROCESS_SCRIPT.format(tests=tests)], capture_output=True,
                              text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-2000:]
        runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    if runs[0]["source"] != runs[1]["source"]:
        pytest.skip("fastconv's source changed between the two processes")
    assert runs[0]["digests"] == runs[1]["digests"]
    assert any(d is not None for d in runs[0]["digests"].values())
