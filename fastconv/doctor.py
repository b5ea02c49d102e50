"""``python -m fastconv doctor``: what a bug report needs to know about this machine and install.

Reports the JIT cache (where, how many files, writable, damaged entries), the threading layer and
thread counts, the CPU and its vector instructions, the BLAS libraries in use and the versions of
everything fastconv runs on.  Compiles nothing and changes nothing, except that ``--fix`` deletes
damaged cache files (numba then recompiles those kernels once).  Exit status 1 when it found a
problem (listed at the end), else 0.

Examples
--------
``python -m fastconv doctor`` prints the report; ``--json`` prints it as one JSON object.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import json
import os
import pickle
import platform
import sys
import tempfile

_ISA = ("avx512f", "avx512bw", "avx512vl", "avx512_bf16", "avx512_fp16", "avx2", "fma", "avx", "sse4_2",
        "neon", "asimd", "sve")
_PACKAGES = ("numpy", "numba", "llvmlite", "scipy", "threadpoolctl", "rocket-fft", "torch")
_ENV = ("NUMBA_CACHE_DIR", "NUMBA_NUM_THREADS", "NUMBA_THREADING_LAYER", "NUMBA_BOUNDSCHECK", "OMP_NUM_THREADS",
        "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY", "FASTCONV_CACHE_DIR")


def _writable(path):
    """Whether a file can be created in directory ``path`` (tried, as numba does)."""
    try:
        tempfile.TemporaryFile(dir=path).close()
        return True
    except OSError:
        return False


def _check_file(path, numba_version):
    """None if the cache file reads, else why not (what numba would have failed on)."""
    try:
        with open(path, "rb") as f:
            if path.endswith(".nbi"):
                version = pickle.load(f)
                if version != numba_version:
                    return None  # another numba's index: numba ignores it, not damage
                stamp, overloads = pickle.loads(f.read())
                if not isinstance(overloads, dict):
                    return f"index holds a {type(overloads).__name__}"
            else:
                pickle.loads(f.read())
    except Exception as e:  # truncated, garbage, unreadable
        return f"{type(e).__name__}: {e}"
    return None


def _cache_report(fix):
    import numba

    from . import _cache
    kernels = len(_cache.KERNELS)
    cached = sum(isinstance(k._cache, _cache._FunctionCache) for k in _cache.KERNELS)
    dirs = []
    for d in _cache.cache_dirs():
        entry = {"path": d, "exists": os.path.isdir(d), "writable": os.path.isdir(d) and _writable(d),
                 "index_files": 0, "data_files": 0, "bytes": 0, "damaged": []}
        names = sorted(os.listdir(d)) if entry["exists"] else []
        for fname in names:
            if not fname.endswith((".nbi", ".nbc")):
                continue
            path = os.path.join(d, fname)
            entry["index_files" if fname.endswith(".nbi") else "data_files"] += 1
            try:
                entry["bytes"] += os.path.getsize(path)
            except OSError:
                pass
            why = _check_file(path, numba.__version__)
            if why is not None:
                if fix:
                    try:
                        os.unlink(path)
                        why += " (deleted)"
                    except OSError as e:
                        why += f" (could not delete: {e})"
                entry["damaged"].append({"file": path, "error": why})
        dirs.append(entry)
    return {"kernels": kernels, "kernels_cached_on_disk": cached, "numba_cache_dir": os.environ.get("NUMBA_CACHE_DIR"),
            "directories": dirs}


def _cpu():
    info = {"machine": platform.machine(), "model": None, "isa": []}
    flags = set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key in ("model name", "Model", "cpu model") and info["model"] is None:
                    info["model"] = value.strip()
                elif key in ("flags", "Features") and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    try:  # what LLVM (and so numba) compiles for
        import llvmlite.binding as llvm
        info["llvm_cpu"] = llvm.get_host_cpu_name()
        features = llvm.get_host_cpu_features()
        if not flags:
            flags = {k.replace("avx512bf16", "avx512_bf16") for k, v in features.items() if v}
    except Exception as e:  # pragma: no cover - llvmlite is a numba dependency
        info["llvm_cpu"] = f"unknown ({e})"
    info["isa"] = [f for f in _ISA if f in flags]
    import numba
    if numba.config.CPU_NAME or numba.config.CPU_FEATURES:
        info["numba_target_override"] = f"{numba.config.CPU_NAME} {numba.config.CPU_FEATURES or ''}".strip()
    return info


def _threads():
    import numba

    import fastconv
    try:
        layer = numba.threading_layer()
    except ValueError:  # numba's pool not started yet
        layer = "not started"
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        usable = os.cpu_count()
    return {"threading_layer_requested": numba.config.THREADING_LAYER, "threading_layer": layer,
            "numba_num_threads": numba.config.NUMBA_NUM_THREADS, "fastconv_threads": fastconv.get_num_threads(),
            "cpu_count": os.cpu_count(), "cpus_usable": usable}


def _blas():
    try:
        import threadpoolctl
    except ImportError:
        return [{"error": "threadpoolctl is not installed"}]
    try:
        import scipy.linalg.cython_blas  # noqa: F401  (loads scipy's BLAS, which fastconv's kernels call)
    except ImportError:
        pass
    keys = ("user_api", "internal_api", "version", "num_threads", "threading_layer", "architecture", "filepath")
    return [{k: lib.get(k) for k in keys} for lib in threadpoolctl.threadpool_info()]


def _versions():
    import fastconv
    out = {"python": sys.version.split()[0], "platform": platform.platform(),
           "fastconv": f"{fastconv.__version__} ({os.path.dirname(fastconv.__file__)})"}
    for name in _PACKAGES:  # metadata only: importing torch would cost seconds
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def _memory():
    from . import _config
    out = {"workspace_limit": _config.get_workspace_limit()}
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("MemTotal", "MemAvailable"):
                    out[key] = int(value.split()[0]) * 1024
    except OSError:
        pass
    return out


def _autotune():
    import fastconv
    out = {}
    for key, name in (("enabled", "get_autotune"), ("file", "autotune_cache_path")):
        f = getattr(fastconv, name, None)
        try:
            out[key] = f() if f is not None else None
        except Exception as e:
            out[key] = f"error: {e}"
    path = out.get("file")
    if isinstance(path, str):
        d = os.path.dirname(path)
        while d and not os.path.isdir(d):  # the directory is created on first write
            d = os.path.dirname(d)
        out["exists"] = os.path.isfile(path)
        out["writable"] = bool(d) and _writable(d) and (not os.path.exists(path) or os.access(path, os.W_OK))
    return out


def collect(fix=False):
    """The report as a dict (what ``--json`` prints)."""
    import fastconv  # noqa: F401  (starts numba's pool, as a user's first import does)
    for mod in ("common", "direct", "im2col", "fft", "pooling"):  # every kernel module, compiled or not
        try:
            importlib.import_module(f"fastconv._algorithms.{mod}")
        except ImportError:  # a module renamed or removed later
            pass
    report = {"versions": _versions(), "cpu": _cpu(), "threads": _threads(), "blas": _blas(),
              "memory": _memory(), "jit_cache": _cache_report(fix), "autotune": _autotune(),
              "environment": {k: os.environ[k] for k in _ENV if k in os.environ}}
    report["problems"] = _problems(report)
    return report


def _problems(report):
    out = []
    cache = report["jit_cache"]
    if cache["kernels"] and not cache["kernels_cached_on_disk"]:
        out.append("numba's cache has no writable location: kernels compile in every process "
                   "(set NUMBA_CACHE_DIR to a writable directory)")
    for d in cache["directories"]:
        if d["exists"] and not d["writable"]:
            out.append(f"cache directory {d['path']} is not writable (set NUMBA_CACHE_DIR to a writable directory)")
        for bad in d["damaged"]:
            if not bad["error"].endswith("(deleted)"):
                out.append(f"damaged cache file {bad['file']} ({bad['error']}); fastconv recompiles it, "
                           f"or run `python -m fastconv doctor --fix`")
    auto = report["autotune"]
    if auto.get("writable") is False:
        out.append(f"autotune cache {auto.get('file')} is not writable (set FASTCONV_CACHE_DIR)")
    if report["threads"]["threading_layer"] == "workqueue":
        out.append("numba's threading layer is 'workqueue': calls from several Python threads abort the process")
    return out


def _print(report):
    def line(key, value, indent=2):
        print(f"{' ' * indent}{key + ':':28} {value}")

    print("fastconv doctor")
    for section in ("versions", "cpu", "threads", "memory", "autotune", "environment"):
        print(f"{section}:")
        for k, v in report[section].items():
            line(k, " ".join(v) if isinstance(v, list) else v)
    print("blas:")
    for lib in report["blas"]:
        print("  " + ", ".join(f"{k}={v}" for k, v in lib.items() if v is not None))
    cache = report["jit_cache"]
    print("jit_cache:")
    line("kernels", f"{cache['kernels']} ({cache['kernels_cached_on_disk']} cached on disk)")
    line("NUMBA_CACHE_DIR", cache["numba_cache_dir"])
    for d in cache["directories"]:
        line("directory", d["path"])
        line("state", f"{'writable' if d['writable'] else 'NOT writable'}, {d['index_files']} index and "
                      f"{d['data_files']} data files, {d['bytes'] / 2**20:.1f} MiB, {len(d['damaged'])} damaged", 4)
        for bad in d["damaged"]:
            line("damaged", f"{bad['file']}: {bad['error']}", 4)
    print("problems:" if report["problems"] else "problems: none found")
    for p in report["problems"]:
        print(f"  - {p}")


def main(argv=None):
    """Entry point of ``python -m fastconv doctor``; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m fastconv doctor", description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print the report as one JSON object")
    parser.add_argument("--fix", action="store_true", help="delete damaged JIT cache files")
    args = parser.parse_args(argv)
    report = collect(fix=args.fix)
    if args.json:
        print(json.dumps(report, indent=1, default=str))
    else:
        _print(report)
    return 1 if report["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
