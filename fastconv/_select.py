"""``algorithm='auto'`` whole: the fitted cost table, the cost model's choice, measured choices and
the on-disk autotune cache.

Each registered algorithm exports its work model (``Algorithm.cost(p, pass_, threads)``, nominal
seconds); this module owns the one table that turns it into this machine's seconds
(``_calibration.json``, fitted by ``benchmarks/calibrate.py``), resolves ``algorithm=`` for a pass,
and, with autotuning on, measures instead.  Every choice -- modelled or measured -- is cached under
one key: the geometry (``ConvParams``), the pass and the thread count the call runs with, which the
caller passes in (it is what :func:`fastconv._threads.apply` just set).

With autotuning on (:func:`set_autotune` or ``FASTCONV_AUTOTUNE=1``), the first ``'auto'`` call for a
key times every eligible algorithm once on synthetic data of that shape (after one untimed warm-up
call, so JIT compilation is not counted) and remembers the fastest, in memory and in
``autotune.json`` in the cache directory (``$FASTCONV_CACHE_DIR``, else ``$XDG_CACHE_HOME/fastconv``,
else ``~/.cache/fastconv``; the file's keys add dtype, workspace limit, CPU model and fastconv
version).  Later processes reuse it.  Writes merge with the file's current content and land by
atomic rename, so concurrent processes never leave a torn file; a corrupt file or one from another
fastconv version is ignored with a warning.
"""
from __future__ import annotations

import functools
import json
import os
import tempfile
import threading
import time
import warnings

import numpy as np

from . import _dispatch, _threads
from . import _validation as V
from ._dispatch import PASSES, AlgorithmUnavailable

FORMAT = 1
_lock = threading.Lock()
_memory: dict[str, str] = {}
_enabled = os.environ.get("FASTCONV_AUTOTUNE", "").strip().lower() in ("1", "true", "yes", "on")
_loaded = False
_unwritable: set = set()  # cache paths already reported as unwritable
_CHOICES: dict = {}  # (params, pass, threads) -> the cost model's choice
_dispatch.on_change(_CHOICES.clear)
_CAL_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_calibration.json")


# Which fitted table serves a CPU: its own ISA's and maker's ("avx512-amd"), else its ISA's of any
# maker, else the nearest in vector width.  The same machine kind has been a Zen 3 (AVX2), a Xeon
# (AVX-512) and a Zen 4 (AVX-512) in successive sessions; one table fitted on one of them mis-ranked
# the others' algorithms (winograd's and gemm's rates follow the vector width; on the Zen 4 the
# Xeon's table took gemm for alexnet-c1's forward at 7.9 ms where direct took 7.3).
_ISA_ORDER = {"avx512": ("avx512", "avx2", "portable"), "avx2": ("avx2", "avx512", "portable"),
              "portable": ("portable", "avx2", "avx512")}


def table_for(data: dict, isa: str, vendor: str = "") -> dict:
    """The calibration table of ``data`` (the parsed ``_calibration.json``) that serves ``isa`` on a
    CPU of ``vendor`` ('amd', 'intel' or '').

    The file holds one table per ISA, or per ISA and maker (``"avx512-amd"``), under ``"by_isa"``;
    a file of the older format (one table at the top level) serves every ISA.

    Examples
    --------
    >>> from fastconv import _select
    >>> d = {"by_isa": {"avx512": {"coef": {"im2col/forward": [2.0, 0.0]}}}}
    >>> _select.table_for(d, "avx2")["coef"]
    {'im2col/forward': [2.0, 0.0]}
    >>> _select.table_for({"coef": {}}, "avx2")
    {'coef': {}}
    >>> d["by_isa"]["avx512-amd"] = {"coef": {}}
    >>> _select.table_for(d, "avx512", "amd"), _select.table_for(d, "avx512", "intel")["coef"]
    ({'coef': {}}, {'im2col/forward': [2.0, 0.0]})
    """
    tables = data.get("by_isa")
    if tables is None:
        return data
    if vendor and f"{isa}-{vendor}" in tables:
        return tables[f"{isa}-{vendor}"]
    for name in _ISA_ORDER.get(isa, (isa,)):
        if name in tables:
            return tables[name]
    return {}


@functools.lru_cache(maxsize=1)
def _load_calibration() -> dict:
    from . import _cpu as cpu

    try:
        with open(_CAL_PATH, encoding="utf-8") as f:
            return table_for(json.load(f), cpu.isa(), cpu.vendor())
    except (OSError, ValueError, AttributeError):
        return {}


def calibration() -> dict:
    """``{"algorithm/pass": [a, b]}``: auto's cost for that pass is ``a * alg.cost(p, pass, threads) + b``
    seconds.

    Fitted by ``benchmarks/calibrate.py --write`` (see ``_calibration.json`` for the machine, date and
    the accuracy of the resulting choice), one table per vector ISA (:func:`table_for` picks this
    CPU's); an algorithm without an entry gets ``(1, 0)``.
    """
    return dict(_load_calibration().get("coef", {}))


def calibrated_cost(alg, p, pass_, threads) -> float:
    """The cost model's estimate in seconds on this machine: the fitted table applied to ``alg.cost``."""
    a, b = _load_calibration().get("coef", {}).get(f"{alg.name}/{pass_}", (1.0, 0.0))
    return a * alg.cost(p, pass_, threads) + b


def select(fn, algorithm, p, pass_, threads):
    """Resolve ``algorithm`` (a registered name or ``'auto'``) for one pass of one geometry, for a call
    running on ``threads`` threads.

    An explicit name that cannot serve the case raises :class:`AlgorithmUnavailable`; it never falls
    back to another algorithm.
    """
    if not isinstance(algorithm, str):
        raise TypeError(f"{fn}: algorithm must be a str, got {type(algorithm).__name__}")
    reg = _dispatch.registry()
    if algorithm == "auto":
        if _enabled:
            return tuned(p, pass_, threads)
        key = (p, pass_, threads)
        best = _CHOICES.get(key)
        if best is None:
            best_cost = float("inf")
            for alg in reg.values():
                if alg.supports(p, pass_) is None:
                    c = calibrated_cost(alg, p, pass_, threads)
                    if best is None or c < best_cost:
                        best, best_cost = alg, c
            if best is None:
                raise AlgorithmUnavailable(f"{fn}: no registered algorithm can compute the {pass_} pass here")
            if len(_CHOICES) > 4096:
                _CHOICES.clear()
            _CHOICES[key] = best
        return best
    alg = reg.get(algorithm)
    if alg is None:
        names = ", ".join(repr(n) for n in ("auto",) + tuple(reg))
        raise ValueError(f"{fn}: algorithm must be one of {names}, got {algorithm!r}")
    reason = alg.supports(p, pass_)
    if reason is not None:
        raise AlgorithmUnavailable(f"{fn}: algorithm={algorithm!r} cannot compute the {pass_} pass here: {reason}")
    return alg


def _version():
    from . import __version__
    return __version__


@functools.lru_cache(maxsize=1)
def _cpu() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform
    return platform.processor() or platform.machine()


def cache_path() -> str:
    """Path of the autotune cache file."""
    base = os.environ.get("FASTCONV_CACHE_DIR")
    if not base:
        xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        base = os.path.join(xdg, "fastconv")
    return os.path.join(base, "autotune.json")


def _key(p, pass_, threads) -> str:
    geo = (p.n, p.c, p.h, p.w, p.k, p.r, p.s, p.sh, p.sw, p.ph0, p.ph1, p.pw0, p.pw1, p.dh, p.dw, p.g)
    return "|".join([",".join(map(str, geo)), p.dtype.name, pass_, f"ws={p.workspace_limit}",
                     f"threads={threads}", _cpu(), _version()])


def _read_file(path):
    """Entries of the cache file, or {} (with a warning) when it is unreadable or foreign."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (FileNotFoundError, NotADirectoryError):  # nothing cached yet, or no cache folder at all
        return {}
    except (OSError, ValueError) as e:
        warnings.warn(f"fastconv: ignoring unreadable autotune cache {path}: {e}", RuntimeWarning, stacklevel=3)
        return {}
    if not (isinstance(data, dict) and data.get("format") == FORMAT and data.get("version") == _version()
            and isinstance(data.get("entries"), dict)):
        warnings.warn(f"fastconv: ignoring autotune cache {path} written by another fastconv version or format",
                      RuntimeWarning, stacklevel=3)
        return {}
    return {k: v for k, v in data["entries"].items() if isinstance(k, str) and isinstance(v, str)}


def _write_file(path, key, name):
    """Merge one entry into the file by write-to-temp + atomic rename (best effort: never raises)."""
    try:
        d = os.path.dirname(path)
        os.makedirs(d, exist_ok=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            entries = _read_file(path)
        entries[key] = name
        fd, tmp = tempfile.mkstemp(prefix=".autotune-", suffix=".json", dir=d)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump({"format": FORMAT, "version": _version(), "entries": entries}, f, indent=0)
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
    except OSError as e:
        if path not in _unwritable:  # once per path: choices stay in memory for this process
            _unwritable.add(path)
            warnings.warn(f"fastconv: could not write autotune cache {path}: {e}; the measured choices are "
                          f"kept in memory for this process (set FASTCONV_CACHE_DIR to a writable directory "
                          f"to keep them)", RuntimeWarning, stacklevel=3)


def set_autotune(enabled):
    """Turn measured algorithm selection for ``algorithm='auto'`` on or off.

    When on, the first ``'auto'`` call for a shape times each eligible algorithm once and caches the
    winner in memory and on disk (see :func:`autotune_cache_path`).  Also enabled by the
    environment variable ``FASTCONV_AUTOTUNE=1``.

    Parameters
    ----------
    enabled : bool

    Returns
    -------
    bool
        The previous setting.

    Examples
    --------
    >>> import fastconv
    >>> old = fastconv.set_autotune(False)
    >>> fastconv.get_autotune()
    False
    >>> _ = fastconv.set_autotune(old)
    """
    global _enabled
    if not isinstance(enabled, (bool, np.bool_)):
        raise TypeError(f"set_autotune: enabled must be a bool, got {enabled!r}")
    old, _enabled = _enabled, bool(enabled)
    return old


def get_autotune():
    """Whether ``algorithm='auto'`` measures (True) or uses the cost model (False).

    Examples
    --------
    >>> import fastconv
    >>> isinstance(fastconv.get_autotune(), bool)
    True
    """
    return _enabled


def autotune_cache_path():
    """Path of the on-disk autotune cache (it may not exist yet).

    Examples
    --------
    >>> import fastconv
    >>> fastconv.autotune_cache_path().endswith("autotune.json")
    True
    """
    return cache_path()


def clear_autotune_cache():
    """Forget every measured choice, in memory and on disk.

    Examples
    --------
    >>> import fastconv
    >>> fastconv.clear_autotune_cache()
    """
    global _loaded
    with _lock:
        _memory.clear()
        _loaded = False
        try:
            os.remove(cache_path())
        except (FileNotFoundError, NotADirectoryError):
            pass


def _synthetic(p, pass_, rng):
    """Random operands of the right shapes for one pass."""
    def a(shape):
        return rng.standard_normal(shape).astype(p.dtype)
    if pass_ == "forward":
        return a(p.x_shape), a(p.w_shape), a((p.k,))
    if pass_ == "grad_input":
        return a(p.y_shape), a(p.w_shape)
    return a(p.y_shape), a(p.x_shape)


def measure_all(p, pass_, repeats=1):
    """Seconds of each eligible algorithm for one pass (best of ``repeats`` after one warm-up call)."""
    rng = np.random.default_rng(0)
    args = _synthetic(p, pass_, rng)
    times = {}
    for alg in _dispatch.eligible(p, pass_):
        f = getattr(alg, pass_)
        f(*args, p)  # warm-up: compiles on first use
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            f(*args, p)
            best = min(best, time.perf_counter() - t0)
        times[alg.name] = best
    return times


def tuned(p, pass_, threads):
    """The autotuned algorithm for this key (measured now on a miss), as an ``Algorithm``."""
    global _loaded
    key = _key(p, pass_, threads)
    with _lock:
        if not _loaded:
            disk = _read_file(cache_path())
            for k, v in disk.items():
                _memory.setdefault(k, v)
            _loaded = True
        name = _memory.get(key)
    reg = _dispatch.registry()
    if name is not None and name in reg and reg[name].supports(p, pass_) is None:
        return reg[name]
    times = measure_all(p, pass_)
    name = min(times, key=times.get)
    with _lock:
        _memory[key] = name
        _write_file(cache_path(), key, name)
    return reg[name]


def choose_algorithm(x_shape, weight_shape, stride=1, padding=0, dilation=1, groups=1, *, dtype="float32",
                     pass_="forward", measure=False, workspace_limit=None):
    """The algorithm ``algorithm='auto'`` would use for one pass of a convolution.

    Parameters
    ----------
    x_shape, weight_shape : tuple of 4 ints
        ``(N, C, H, W)`` and ``(K, C/groups, R, S)``.
    stride, padding, dilation, groups
        As for :func:`fastconv.conv2d`.
    dtype : str or dtype
        ``'float32'`` or ``'float64'``.
    pass_ : {'forward', 'grad_input', 'grad_weight'}
        Each pass chooses on its own.
    measure : bool
        If True, time every eligible algorithm once on random data of this shape (after an
        untimed warm-up) and return ``(fastest name, {name: seconds})``.
    workspace_limit : int, optional
        Per-call scratch budget in bytes (default :func:`fastconv.get_workspace_limit`).

    Returns
    -------
    str or (str, dict)
        The cost model's choice (or, with autotuning on, the cached measured one); with
        ``measure=True`` the measured winner and every eligible algorithm's time.

    Notes
    -----
    Without autotuning the choice is each algorithm's cost model times a per-pass scale factor
    fitted by ``benchmarks/calibrate.py`` (stored in ``fastconv/_calibration.json``).  The shipped
    fit was made on a 2-core AMD EPYC (AVX2 vectors) with 2 threads, numba 0.68.1, float32, from the
    median of 5 timed calls of every eligible algorithm on the 13 conv shapes of the public suite
    and on batch-1 copies of them (78 shape x pass cases; refitted on 2026-11-26 after direct's
    per-image kernels and the FFT buffer reuse, which had made the old fit pick im2col for LeNet's
    gradients at 1.9-3.9x the best time).  On those cases (in-sample) the choice is within 10% of
    the measured best in 100% of forward, 96% of grad_input and 92% of grad_weight cases -- all 39
    suite shape x pass cases.  The misses are batch-1 copies: lenet5-c1/c3's gradients (direct
    picked, im2col 1.1-1.3x faster) and dilated-3x3-d2's grad_input (im2col picked, direct 1.35x
    faster): small layers where direct and im2col are close and the model does
    not rank them reliably.  For exact choices on your machine, turn on :func:`set_autotune`.

    Examples
    --------
    >>> import fastconv
    >>> fastconv.choose_algorithm((1, 8, 16, 16), (8, 1, 3, 3), padding=1, groups=8) in fastconv.algorithms()
    True
    >>> name, times = fastconv.choose_algorithm((1, 2, 8, 8), (2, 2, 3, 3), measure=True)
    >>> name == min(times, key=times.get)
    True
    """
    fn = "choose_algorithm"
    dt = V.float_dtype(fn, dtype)
    if pass_ not in PASSES:
        raise ValueError(f"{fn}: pass_ must be one of {', '.join(map(repr, PASSES))}, got {pass_!r}")
    if not isinstance(measure, (bool, np.bool_)):
        raise TypeError(f"{fn}: measure must be a bool, got {measure!r}")
    xs = V.shape4(fn, "x_shape", x_shape)
    if not isinstance(weight_shape, (tuple, list)) or len(weight_shape) != 4:
        raise ValueError(f"{fn}: weight_shape must be a shape (K, C/groups, R, S), got {weight_shape!r}")
    ws = tuple(V._int(fn, "weight_shape", d, "a tuple of 4 ints (K, C/groups, R, S)") for d in weight_shape)
    p = V.conv_params(fn, xs, ws, dt, stride, padding, dilation, groups, workspace_limit)
    # the pool size conv2d / conv2d_backward would run this pass with, so that the choice is theirs
    threads = _threads.apply(p.macs if pass_ == "forward" else 2 * p.macs)
    if measure:
        times = measure_all(p, pass_)
        return min(times, key=times.get), times
    return select(fn, "auto", p, pass_, threads).name
