"""Thread safety: Python threads calling fastconv at the same time get the serial results, bit for bit.

Kernels release the GIL, so 8 Python threads really run parallel kernels at once, each entering
numba's pool.  fastconv selects a thread-safe layer ('threadsafe': TBB or OpenMP; numba's
'workqueue' layer aborts the process on concurrent entry).  Each thread uses its own data, and
thread counts are pinned with :func:`fastconv.threads` (per Python thread), so the comparison with
serial results is bitwise for every algorithm -- including im2col, whose bits follow the thread
count (``test_determinism.py``).
"""
import threading

import numba
import numpy as np
import pytest

import fastconv
from conftest import ALGORITHMS

N_THREADS = 8
# fastconv runs calls with less work than this on one thread (fastconv/_threads.py)
SERIAL_WORK = getattr(__import__("fastconv._threads", fromlist=["_"]), "SERIAL_WORK", 0)
ROUNDS = 3
POOL = {"kernel_size": 3, "stride": 2, "padding": 1}


def _job(i, algorithm):
    """A distinct problem per thread: shapes, geometry and dtype vary with ``i``."""
    rng = np.random.default_rng(100 + i)
    dtype = (np.float32, np.float64)[i % 2]
    n, c, k = 2 + i % 3, 8 + i % 4, 8 + i % 5  # above SERIAL_WORK: calls really use the pool
    h, w = 30 + i, 29 - i // 2
    kw = [{"padding": 1}, {"stride": 2}, {"padding": "same", "dilation": 2}, {"groups": 2, "padding": (0, 1)}][i % 4]
    if kw.get("groups"):
        c, k = 2 * c, 2 * k
    x = rng.standard_normal((n, c, h, w)).astype(dtype)
    wt = rng.standard_normal((k, c // kw.get("groups", 1), 3, 3)).astype(dtype)
    b = rng.standard_normal(k).astype(dtype)
    y = fastconv.conv2d(x, wt, **kw, algorithm="direct")
    assert y.size * wt[0].size >= SERIAL_WORK
    gy = rng.standard_normal(y.shape).astype(dtype)
    px = rng.standard_normal((2, 8 + i, 96, 90)).astype(dtype)
    return x, wt, b, gy, kw, algorithm, px


def _work(job):
    x, w, b, gy, kw, algorithm, px = job
    out = []
    for alg in (algorithm, "direct"):  # an algorithm that refuses this case still exercises direct
        try:
            out.append(fastconv.conv2d(x, w, b, **kw, algorithm=alg))
            out.extend(fastconv.conv2d_backward(gy, x, w, **kw, algorithm=alg))
            break
        except ValueError as exc:
            if not isinstance(exc, fastconv.AlgorithmUnavailable):
                raise
    y, idx = fastconv.max_pool2d(px, **POOL, return_indices=True)
    out += [y, idx, fastconv.max_pool2d_backward(np.cos(y), idx, px.shape)]
    a = fastconv.avg_pool2d(px, **POOL, count_include_pad=False)
    out += [a, fastconv.avg_pool2d_backward(np.sin(a), px.shape, **POOL)]
    return [r.tobytes() for r in out]


def _concurrently(jobs, counts):
    """Run ``_work(jobs[i])`` ROUNDS times in thread i (pinned to ``counts[i]`` numba threads), all
    threads released together; returns each thread's results per round or raises its error."""
    barrier = threading.Barrier(len(jobs))
    results = [None] * len(jobs)
    errors = []

    def run(i):
        try:
            with fastconv.threads(counts[i]):
                barrier.wait()
                results[i] = [_work(jobs[i]) for _ in range(ROUNDS)]
        except BaseException as exc:  # reported in the main thread
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    if errors:
        raise errors[0]
    return results


def _serial(jobs, counts):
    """The jobs one after another, in one Python thread that is not the main thread.

    im2col's results differ in rounding (about 1e-6 relative, GEMM-like) between calls from the
    main thread and calls from another Python thread that has set its thread count -- seen on
    2026-11-26 at every thread count, with BLAS held to one thread; the cause (numba's per-thread
    pool vs OpenBLAS) is not found.  Concurrency itself changes no bits: the reference is a
    serial run in a worker thread, like the concurrent ones.
    """
    out = []

    def run():
        for job, n in zip(jobs, counts):
            with fastconv.threads(n):
                out.append(_work(job))

    t = threading.Thread(target=run)
    t.start()
    t.join(timeout=600)
    assert not t.is_alive() and len(out) == len(jobs), "the serial reference run failed or hung"
    return out


def test_fastconv_selects_a_thread_safe_layer():
    fastconv.conv2d(np.ones((1, 1, 3, 3)), np.ones((1, 1, 2, 2)))  # the layer starts at the first kernel
    assert numba.threading_layer() != "workqueue"


def _env_after_import(env):
    import os
    import subprocess
    import sys
    code = ("import os, fastconv; "
            "print(os.environ.get('GOMP_SPINCOUNT', '-'), os.environ.get('OMP_WAIT_POLICY', '-'))")
    base = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    return subprocess.run([sys.executable, "-c", code], env={**base, **env}, check=True, capture_output=True,
                          text=True, timeout=300).stdout.split()


def test_pool_wait_policy_is_set_for_numba_only_and_user_settings_win():
    """fastconv sets GOMP_SPINCOUNT (its short spin) only while numba's pool starts: the variable is
    gone after the import, so a PyTorch imported later keeps its own default; a user's settings,
    an empty one included, stay as they were."""
    from fastconv import _jit
    assert 0 < _jit.SPIN_COUNT < 300_000  # shorter than GNU OpenMP's default spin
    assert _env_after_import({}) == ["-", "-"]
    assert _env_after_import({"GOMP_SPINCOUNT": "0"}) == ["0", "-"]
    assert _env_after_import({"OMP_WAIT_POLICY": "passive"}) == ["-", "passive"]
    assert _env_after_import({"OMP_WAIT_POLICY": ""}) == ["-"]  # empty: set, left alone (prints '')


@pytest.mark.parametrize("algorithm", ALGORITHMS + ("auto",))
def test_eight_threads_match_serial_results(algorithm):
    jobs = [_job(i, algorithm) for i in range(N_THREADS)]
    counts = [numba.config.NUMBA_NUM_THREADS] * N_THREADS
    serial = _serial(jobs, counts)
    for i, rounds in enumerate(_concurrently(jobs, counts)):
        for r, got in enumerate(rounds):
            bad = [j for j, (g, s) in enumerate(zip(got, serial[i])) if g != s]
            assert not bad, f"thread {i}, round {r}: results {bad} differ from the serial ones"


def test_per_thread_counts_do_not_leak_between_threads():
    # threads pinned to 1 and to all of numba's threads at the same time: each gets the bits of its
    # own count (im2col's tiling follows the count, so a leak would show)
    jobs = [_job(i, ALGORITHMS[i % len(ALGORITHMS)]) for i in range(N_THREADS)]
    counts = [1 + i % numba.config.NUMBA_NUM_THREADS for i in range(N_THREADS)]
    serial = _serial(jobs, counts)
    for i, rounds in enumerate(_concurrently(jobs, counts)):
        for got in rounds:
            assert got == serial[i], f"thread {i} ({counts[i]} numba threads) differs from serial"
