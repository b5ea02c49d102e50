"""Faults of a user's machine rather than of the inputs: a damaged or unwritable JIT cache, processes
starting together on an empty cache, interrupted calls, memory that runs out, and the doctor report.

Each fault runs in a subprocess on a copy of the package (``fastconv/`` copied to a temporary folder,
imported through ``PYTHONPATH``) with its own cache folders, so the repository's ``__pycache__``,
the user's caches and this process are never touched.  JIT compiling is what costs here (seconds per
kernel), so every subprocess uses one cheap kernel, ``avg_pool2d``'s per-window one (column stride 4),
and the cache that the parallel first run fills is copied for the tests after it.
"""
from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 600  # a cold compile under a loaded 2-core CI runner; a hang is a failure, not a wait

# Run first in every subprocess: the one kernel, a check of its result against NumPy, and the cache
# statistics and CacheWarnings, printed as one JSON line after "RESULT".
PRELUDE = """
import json, warnings
warnings.simplefilter("always")
_caught = warnings.catch_warnings(record=True)
W = _caught.__enter__()
warnings.simplefilter("always")
import numpy as np
import fastconv
from fastconv._algorithms import pooling
X = np.arange(8 * 8 * 32 * 32, dtype=np.float32).reshape(8, 8, 32, 32) % 97
REF = X.reshape(8, 8, 8, 4, 8, 4).mean(axis=(3, 5))

def call():
    # column stride 4: the per-window NCHW kernel, not the separable one; fewer than
    # pooling.CL_MIN_CHANNELS channels, so not the channels_last kernel either
    y = fastconv.avg_pool2d(X, 4)
    assert np.array_equal(y, REF), "wrong result"

def report(**extra):
    st = pooling._avg_forward.stats
    out = dict(hits=sum(st.cache_hits.values()), misses=sum(st.cache_misses.values()),
               warnings=[str(w.message) for w in W if w.category.__name__ == "CacheWarning"], **extra)
    print("RESULT " + json.dumps(out))
"""


def _copy_package(parent: Path) -> Path:
    shutil.copytree(ROOT / "fastconv", parent / "fastconv", ignore=shutil.ignore_patterns("__pycache__"))
    return parent


def _env(pkg: Path, cache: Path | None, home: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NUMBA_", "FASTCONV_"))}
    env.update(PYTHONPATH=str(pkg), XDG_CACHE_HOME=str(home / "xdg"), HOME=str(home),
               FASTCONV_CACHE_DIR=str(home / "fastconv"))
    if cache is not None:
        env["NUMBA_CACHE_DIR"] = str(cache)
    return env


def _start(pkg, code, cache, home):
    return subprocess.Popen([sys.executable, "-c", PRELUDE + textwrap.dedent(code)], cwd=pkg,
                            env=_env(pkg, cache, home), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _result(proc):
    out, err = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 0, f"subprocess failed ({proc.returncode}):\n{out}\n{err[-3000:]}"
    lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
    assert lines, f"no result:\n{out}\n{err[-3000:]}"
    return json.loads(lines[-1][len("RESULT "):])


def _run(pkg, code, cache, home):
    return _result(_start(pkg, code, cache, home))


def _cache_files(cache: Path, suffix: str):
    return sorted(cache.rglob(f"*{suffix}"))


@pytest.fixture(scope="module")
def warm(tmp_path_factory):
    """Four processes started together on an empty cache (``pytest -n 4``, a job array): their
    results, and the package copy and cache folder they leave for the other tests."""
    base = tmp_path_factory.mktemp("faults")
    pkg, cache = _copy_package(base / "pkg"), base / "cache"
    procs = [_start(pkg, "call(); report()", cache, base) for _ in range(4)]
    return pkg, cache, base, [_result(p) for p in procs]


def test_parallel_first_runs_all_succeed_and_leave_a_valid_cache(warm, tmp_path):
    pkg, cache, _, results = warm
    for r in results:  # each computed the right result (checked inside), compiled or loaded, no warning
        assert r["hits"] + r["misses"] == 1 and r["warnings"] == [], results
    assert len(_cache_files(cache, ".nbi")) == 1 and len(_cache_files(cache, ".nbc")) >= 1
    assert not list(cache.rglob("*.tmp.*")), "a temporary file was left behind"
    later = _run(pkg, "call(); report()", cache, tmp_path)
    assert (later["hits"], later["misses"], later["warnings"]) == (1, 0, [])


@pytest.mark.parametrize("kind,damage", [(".nbi", "truncate"), (".nbc", "garbage")])
def test_damaged_cache_file_is_discarded_recompiled_and_rewritten(warm, tmp_path, kind, damage):
    pkg, cache0, _, _ = warm
    cache = tmp_path / "cache"
    shutil.copytree(cache0, cache)
    damaged = _cache_files(cache, kind)
    assert damaged
    for f in damaged:  # every file of this kind, of every kernel module in the cache
        data = f.read_bytes()
        f.write_bytes(data[: len(data) // 3] if damage == "truncate" else os.urandom(len(data)))
    # before the fix: _pickle.UnpicklingError on every call, in every process
    first = _run(pkg, "call(); call(); report()", cache, tmp_path)
    assert (first["hits"], first["misses"]) == (0, 1)
    assert len(first["warnings"]) == len(damaged)  # once per damaged file, naming it
    for f, message in zip(damaged, sorted(first["warnings"])):
        assert str(f) in message and "recompiled" in message
    again = _run(pkg, "call(); report()", cache, tmp_path)  # the next process loads a good cache again
    assert (again["hits"], again["misses"], again["warnings"]) == (1, 0, [])


def _block(home: Path) -> Path:
    """A regular file: any directory asked for under it cannot be created, even by root."""
    blocker = home / "blocker"
    blocker.write_text("")
    return blocker


def test_no_writable_cache_location_compiles_in_memory_and_warns_once(tmp_path):
    pkg = _copy_package(tmp_path / "pkg")
    for d in {f.parent for f in (pkg / "fastconv").rglob("*.py")}:  # a read-only install, as root too
        (d / "__pycache__").write_text("")
    home = _block(tmp_path)  # HOME, XDG_CACHE_HOME (numba's user-wide cache) and NUMBA_CACHE_DIR under a file
    # before the fix: RuntimeError "cannot cache function ...: no locator available" at import
    r = _run(pkg, "call(); call(); report()", home / "numba", home)
    assert (r["hits"], r["misses"]) == (0, 1)
    assert len(r["warnings"]) == 1, r["warnings"]
    assert "no writable location" in r["warnings"][0] and "set NUMBA_CACHE_DIR" in r["warnings"][0]


def test_unwritable_numba_cache_dir_falls_back_with_a_warning(warm, tmp_path):
    _, cache0, _, _ = warm
    pkg = _copy_package(tmp_path / "pkg")
    # the package's own __pycache__ is writable and holds the warm cache (file names do not depend on it)
    [pooling_py] = (pkg / "fastconv").rglob("pooling.py")
    target = pooling_py.parent / "__pycache__"
    target.mkdir()
    for f in _cache_files(cache0, ".nbi") + _cache_files(cache0, ".nbc"):
        shutil.copy(f, target / f.name)
    bad = _block(tmp_path) / "numba"
    r = _run(pkg, "call(); report()", bad, tmp_path)
    assert (r["hits"], r["misses"]) == (1, 0)
    assert len(r["warnings"]) == 1 and f"NUMBA_CACHE_DIR={bad}" in r["warnings"][0], r["warnings"]


def test_interrupted_calls_leave_settings_and_results_intact(warm, tmp_path):
    pkg, cache0, _, _ = warm
    code = """
    import signal
    import numba
    import scipy.linalg.cython_blas  # loaded, so its BLAS is in the state compared
    from threadpoolctl import ThreadpoolController, threadpool_info
    for lib in ThreadpoolController().select(user_api="blas").lib_controllers:
        lib.set_num_threads(fastconv.max_threads())

    def state():  # (numba's own count is set by every call for that call: compared where threads() restores it)
        blas = sorted((i["filepath"], i["num_threads"]) for i in threadpool_info() if i["user_api"] == "blas")
        return fastconv.get_num_threads(), blas

    call()
    before = state()
    checked = []

    def interrupt(*args, **kwargs):  # a callback that a signal or a progress bar would be
        raise KeyboardInterrupt

    # 0. while threads(1) applies its settings (the interrupt lands between two of them)
    from fastconv import _threads
    real_blas = _threads._numpy_blas
    _threads._numpy_blas = interrupt
    try:
        with fastconv.threads(1):
            pass
    except KeyboardInterrupt:
        checked.append("threads-enter")
    finally:
        _threads._numpy_blas = real_blas
    assert state() == before, (state(), before)

    # 1. from inside a call run under threads(1): the kernel call raises
    real = pooling._avg_forward
    pooling._avg_forward = interrupt
    numba.set_num_threads(fastconv.max_threads())
    try:
        with fastconv.threads(1):
            call()
    except KeyboardInterrupt:
        checked.append("threads")
    finally:
        pooling._avg_forward = real
    assert state() == before and numba.get_num_threads() == fastconv.max_threads(), (state(), before)
    call()

    # 2. inside im2col's section that holds BLAS to one thread (a 1x1 convolution compiles nothing first)
    from fastconv._algorithms import im2col
    blas = getattr(im2col, "_BLAS", None)
    if blas is not None and hasattr(blas, "args"):
        blas.args = interrupt
        w = np.ones((4, 8, 1, 1), np.float32)
        try:
            fastconv.conv2d(X, w, algorithm="im2col")
        except KeyboardInterrupt:
            checked.append("blas")
        del blas.args
        assert state() == before and blas._depth == 0, (state(), before)
        call()

    # 3. KeyboardInterrupt from a SIGALRM handler at timer-chosen moments during calls
    def on_alarm(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGALRM, on_alarm)
    fastconv.set_num_threads(1)
    before = state()
    hits = 0
    for i in range(20):
        signal.setitimer(signal.ITIMER_REAL, 0.0002 + 0.0003 * i)
        try:
            for _ in range(10000):
                call()
        except KeyboardInterrupt:
            hits += 1
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        assert state() == before, (i, state(), before)
        call()
    checked.append(f"signal x{hits}")
    report(checked=checked)
    """
    r = _run(pkg, code, cache0, tmp_path)
    assert r["checked"][:2] == ["threads-enter", "threads"] and r["checked"][-1].startswith("signal x")
    assert int(r["checked"][-1].split("x")[1]) >= 10  # the interrupts did land


def test_memory_error_names_the_call_and_bytes_and_changes_nothing(warm, tmp_path):
    pkg, cache0, _, _ = warm
    code = """
    import resource
    from fastconv import _validation
    call()
    if _validation._physical_memory() < 4 * 2**30:
        report(skipped="needs 4 GiB of physical memory (the requests must pass the up-front refusal)")
        raise SystemExit
    vm = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmSize"))
    resource.setrlimit(resource.RLIMIT_AS, (vm + (512 << 20), resource.RLIM_INFINITY))
    before = (fastconv.get_num_threads(), fastconv.get_workspace_limit())
    gy = np.ones((1, 1, 1, 1), np.float32)
    messages = []
    for fn, run in [("avg_pool2d_backward", lambda: fastconv.avg_pool2d_backward(gy, (1, 1, 20000, 20000), 20000)),
                    ("max_pool2d", lambda: fastconv.max_pool2d(np.broadcast_to(np.float32(1), (1, 1, 20000, 20000)), 2))]:
        try:
            run()
        except MemoryError as e:
            messages.append(str(e))
    assert gy.sum() == 1 and (fastconv.get_num_threads(), fastconv.get_workspace_limit()) == before
    call()
    try:  # still refused up front: more than the machine has
        fastconv.avg_pool2d_backward(gy, (1, 1, 10**6, 10**6), 10**6)
    except ValueError as e:
        messages.append("refused: " + str(e))
    report(messages=messages)
    """
    r = _run(pkg, code, cache0, tmp_path)
    if "skipped" in r:
        pytest.skip(r["skipped"])
    m = r["messages"]
    assert len(m) == 3, m
    assert m[0].startswith("avg_pool2d_backward: out of memory") and "1600000000 bytes" in m[0]
    assert m[1].startswith("max_pool2d: out of memory") and re.search(r"allocating \d+ bytes", m[1])
    assert m[2].startswith("refused: avg_pool2d_backward:") and "more than this machine" in m[2]


def test_doctor_reports_and_fixes_a_damaged_cache(warm, tmp_path):
    pkg, cache0, _, _ = warm
    cache = tmp_path / "cache"
    shutil.copytree(cache0, cache)
    bad = _cache_files(cache, ".nbc")[0]
    bad.write_bytes(b"\x80\x05garbage")
    code = """
    import contextlib, io
    from fastconv.__main__ import main
    runs = []
    for argv in (["doctor", "--json"], ["doctor", "--json", "--fix"], ["doctor", "--json"], ["doctor"]):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            rc = main(argv)
        runs.append((rc, out.getvalue()))
    report(runs=runs)
    """
    r = _run(pkg, code, cache, tmp_path)
    (rc0, first), (rc1, fixed), (rc2, after), (rc3, text) = r["runs"]
    first, fixed, after = json.loads(first), json.loads(fixed), json.loads(after)
    assert rc0 == 1 and any(str(bad) in p for p in first["problems"])
    dirs = first["jit_cache"]["directories"]
    assert all(d["writable"] for d in dirs) and sum(d["index_files"] for d in dirs) == 1
    assert [x["file"] for d in dirs for x in d["damaged"]] == [str(bad)]
    assert rc1 == 0 and not bad.exists()
    assert rc2 == 0 and after["problems"] == [] and not any(d["damaged"] for d in after["jit_cache"]["directories"])
    assert after["jit_cache"]["kernels"] == after["jit_cache"]["kernels_cached_on_disk"] > 0
    for key in ("python", "numpy", "numba", "llvmlite", "scipy", "fastconv"):
        assert after["versions"][key]
    assert after["threads"]["threading_layer"] and after["threads"]["numba_num_threads"] >= 1
    assert isinstance(after["cpu"]["isa"], list) and any(lib.get("user_api") == "blas" for lib in after["blas"])
    assert rc3 == 0 and "jit_cache:" in text and "problems: none found" in text


# ------------------------------------------------------------------ in-process, nothing compiled
@pytest.fixture
def fresh_warnings(monkeypatch):
    from fastconv import _cache
    monkeypatch.setattr(_cache, "_warned", set())
    return _cache


@pytest.mark.parametrize("which,damage", [(w, d) for w in ("index", "data") for d in ("empty", "truncated", "garbage")]
                         + [("index", "wrong type")])  # a data file of the wrong type fails later, in rebuild
def test_cache_file_treats_any_damage_as_a_miss(fresh_warnings, tmp_path, which, damage):
    _cache = fresh_warnings
    cf = _cache._CacheFile(str(tmp_path), "mod.f-1.py311", "stamp")
    cf.save("key", ("payload", 1))
    assert cf.load("key") == ("payload", 1)
    path = Path(cf._index_path) if which == "index" else tmp_path / cf._data_name(1)
    data = path.read_bytes()
    if damage == "wrong type":  # valid pickles of the wrong thing
        import numba
        data = pickle.dumps(numba.__version__) + pickle.dumps(("stamp", ["not", "a", "dict"]))
    path.write_bytes({"empty": b"", "truncated": data[: len(data) // 2], "garbage": os.urandom(64),
                      "wrong type": data}[damage])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert cf.load("key") is None
        assert cf.load("key") is None  # warned once per file
    msgs = [str(w.message) for w in caught if issubclass(w.category, _cache.CacheWarning)]
    assert len(msgs) == 1 and str(path) in msgs[0], msgs
    cf.save("key", ("payload", 2))  # and the entry is written again
    assert cf.load("key") == ("payload", 2)


def test_every_kernel_uses_the_hardened_cache():
    from fastconv import _cache, _jit
    if _jit.BOUNDSCHECK:
        pytest.skip("NUMBA_BOUNDSCHECK=1 builds kernels uncached")
    import importlib
    import pkgutil

    import fastconv._algorithms as algorithms
    for info in pkgutil.walk_packages(algorithms.__path__, "fastconv._algorithms."):
        importlib.import_module(info.name)
    modules = {k.py_func.__module__ for k in _cache.KERNELS}
    for family in ("common", "direct", "fft", "im2col", "pooling"):  # a module, its _NAME_kernels, or a package
        assert any(m in (f"fastconv._algorithms.{family}", f"fastconv._algorithms._{family}_kernels")
                   or m.startswith(f"fastconv._algorithms.{family}.") for m in modules), (family, sorted(modules))
    for k in _cache.KERNELS:
        assert isinstance(k._cache, (_cache._FunctionCache, _cache.caching.NullCache))


def _plain(a):  # a function for a numba cache object to locate; never compiled
    return a


def test_data_that_does_not_rebuild_is_a_miss(fresh_warnings, tmp_path, monkeypatch):
    from numba.core import config, registry
    _cache = fresh_warnings
    monkeypatch.setattr(config, "CACHE_DIR", str(tmp_path))
    cache = _cache._FunctionCache(_plain)
    ctx, sig = registry.cpu_target.target_context, ("int64",)
    key = cache._index_key(sig, ctx.codegen())
    cache._cache_file.save(key, ("unpickles", "but is no compiled function"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert cache.load_overload(sig, ctx) is None
    data = Path(cache._cache_file._data_path(cache._cache_file._data_name(1)))
    msgs = [str(w.message) for w in caught if issubclass(w.category, _cache.CacheWarning)]
    assert len(msgs) == 1 and str(data) in msgs[0] and not data.exists(), msgs
