"""numba's on-disk cache for fastconv's kernels, hardened against what users' disks do to it.

``numba.njit(cache=True)`` stores each compiled kernel as an index file (``*.nbi``) and data files
(``*.nbc``) next to the module (``__pycache__``), in ``$NUMBA_CACHE_DIR``, or in the user's cache
directory.  numba itself trusts those files: a truncated or garbage file (a full disk, a process
killed while copying a cache, a damaged volume) makes every later call of the kernel fail with
``UnpicklingError`` in every process until the user deletes the file by hand, and a package with no
writable cache location fails at import ("cannot cache function ...: no locator available").

:func:`cached` wraps a ``numba.njit`` decorator so that the kernel's cache

* discards an unreadable index or data file (one :class:`CacheWarning` naming it), recompiles and
  writes a good file again, so the next process loads from cache as before;
* falls back to compiling in memory, with one warning that says how to fix it, when no cache
  location is writable or a save fails;
* is otherwise numba's own cache (same locations, file format and atomic write-then-rename), so
  caches written before or by plain numba are read as before, and processes that start together
  on an empty cache each compile and save without harm (a reader never sees a half-written file).

Only ``Exception`` is caught: ``KeyboardInterrupt`` and ``SystemExit`` pass through.
"""
from __future__ import annotations

import os
import threading
import warnings

from numba.core import caching, config


class CacheWarning(RuntimeWarning):
    """numba's cache for fastconv's kernels was unusable: damaged files or no writable location.

    fastconv keeps working (it recompiles, in memory if need be); filter this category to silence it.
    """


#: Every kernel made with :func:`cached` (module import order), for ``python -m fastconv doctor``.
KERNELS: list = []

_warned: set = set()
_warned_lock = threading.Lock()


def _warn_once(key, message):
    with _warned_lock:
        if key in _warned:
            return
        _warned.add(key)
    warnings.warn(message, CacheWarning, stacklevel=2)


_FIX = ("set NUMBA_CACHE_DIR to a writable directory (export NUMBA_CACHE_DIR=/path/to/writable/dir) so "
        "kernels compile once instead of in every process")


def _discard(path, error):
    """Warn once about a damaged cache file and remove it (the caller then recompiles)."""
    _warn_once(("corrupt", path),
               f"fastconv: discarded the damaged numba cache file {path} ({type(error).__name__}: {error}); "
               f"the kernel is recompiled and the file written again")
    try:
        os.unlink(path)
    except OSError:  # already gone (another process), or a read-only location: the load failed anyway
        pass


class _CacheFile(caching.IndexDataCacheFile):
    """numba's index + data files, where an unreadable file is a cache miss, not an error."""

    def _load_index(self):
        try:
            overloads = super()._load_index()
        except OSError as e:  # unreadable (EIO, EACCES): leave it, compile in memory
            _warn_once(("unreadable", self._index_path),
                       f"fastconv: cannot read the numba cache file {self._index_path} ({e}); compiling instead")
            return {}
        except Exception as e:  # truncated / garbage pickle, or a pickle of something else
            _discard(self._index_path, e)
            return {}
        if not isinstance(overloads, dict):
            _discard(self._index_path, TypeError(f"index holds a {type(overloads).__name__}, not a dict"))
            return {}
        return overloads

    def _load_data(self, name):
        try:
            return super()._load_data(name)
        except FileNotFoundError:  # numba's load() treats a missing data file as a miss
            raise
        except OSError as e:
            _warn_once(("unreadable", name),
                       f"fastconv: cannot read the numba cache file {self._data_path(name)} ({e}); compiling instead")
            return None
        except Exception as e:
            _discard(self._data_path(name), e)
            return None  # the index keeps the entry; the save after compiling rewrites this file


class _FunctionCache(caching.FunctionCache):
    """numba's per-function cache with :class:`_CacheFile` and failures turned into misses."""

    def __init__(self, py_func):
        super().__init__(py_func)
        old = self._cache_file
        self._cache_file = _CacheFile(self._cache_path, self._impl.filename_base, old._source_stamp)

    def load_overload(self, sig, target_context):
        try:
            return super().load_overload(sig, target_context)
        except Exception as e:  # a data file that unpickles but does not rebuild into a function
            cache_file = self._cache_file
            try:
                name = cache_file._load_index().get(self._index_key(sig, target_context.codegen()))
            except Exception:
                name = None
            _discard(cache_file._data_path(name) if name else cache_file._index_path, e)
            return None

    def save_overload(self, sig, data):
        try:
            super().save_overload(sig, data)
        except Exception as e:  # disk full, directory removed or made read-only since import
            _warn_once(("save", self._cache_path),
                       f"fastconv: could not save a compiled kernel to numba's cache in {self._cache_path} "
                       f"({type(e).__name__}: {e}); it is compiled in memory for this process only. Fix: "
                       f"free space or make that directory writable, or {_FIX}")


def _locations(py_func):
    """Where numba looks for a writable cache directory, in its order."""
    from numba.misc.appdirs import AppDirs
    found = [f"NUMBA_CACHE_DIR={config.CACHE_DIR}"] if config.CACHE_DIR else []
    found.append(os.path.join(os.path.dirname(os.path.abspath(py_func.__code__.co_filename)), "__pycache__"))
    found.append(AppDirs(appname="numba", appauthor=False).user_cache_dir)
    return found


def _make_cache(py_func):
    """The cache for ``py_func``: hardened, or numba's no-op cache when no location is writable."""
    try:
        cache = _FunctionCache(py_func)
    except Exception as e:  # RuntimeError "cannot cache function ...: no locator available"
        _warn_once("nolocation",
                   f"fastconv: no writable location for numba's cache of fastconv's kernels (tried "
                   f"{', '.join(_locations(py_func))}; numba: {e}); every process compiles each kernel it "
                   f"uses, in memory (seconds each). Fix: {_FIX}")
        return caching.NullCache()
    user_dir = config.CACHE_DIR
    if user_dir and os.path.commonpath([os.path.abspath(cache.cache_path), os.path.abspath(user_dir)]) \
            != os.path.abspath(user_dir):
        _warn_once("user_dir",
                   f"fastconv: NUMBA_CACHE_DIR={user_dir} is not a writable directory; numba caches "
                   f"fastconv's kernels in {cache.cache_path} instead")
    return cache


def cached(jit, enabled=True):
    """Decorator: ``jit`` (a ``numba.njit(...)`` decorator made without ``cache``) with the cache above.

    ``enabled=False`` returns ``jit`` itself (an uncached kernel).
    """
    if not enabled:
        return jit

    def decorate(py_func):
        dispatcher = jit(py_func)
        # What Dispatcher.enable_caching() does, with our cache class instead of numba's.
        dispatcher._cache = _make_cache(py_func)
        KERNELS.append(dispatcher)
        return dispatcher

    return decorate


def cache_dirs():
    """The directories holding the on-disk caches of the kernels decorated so far."""
    dirs = []
    for dispatcher in KERNELS:
        path = dispatcher._cache.cache_path
        if path and path not in dirs:
            dirs.append(path)
    return dirs
