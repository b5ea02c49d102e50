"""The one place numba options live.

Every kernel in fastconv is compiled with ``kernel``: parallel, cached, GIL released.  Options are fixed here, never toggled through environment variables: numba's on-disk cache
key ignores compile options (shared/NUMBA_NOTES.md).

* ``fastmath`` is the flag set without ``nnan``/``ninf``: it lets LLVM vectorise float reductions
  (``reassoc``) and fuse multiply-adds (``contract``) while NaN and Inf still propagate as in PyTorch.
* ``cache=True`` keeps JIT cost out of every process after the first.
* Kernels are called from Python wrappers only, never from another jitted function: a cached serial
  function calling a cached parallel one segfaults when both load from cache (numba issue 8578).
"""
import os

import numba

from ._cache import cached

FASTMATH = {"contract", "reassoc", "nsz", "arcp", "afn"}

# numba's 'workqueue' layer aborts the process when parallel kernels run from several Python threads;
# 'threadsafe' picks TBB or OpenMP, both of which allow it.  A user's explicit choice wins.
if "NUMBA_THREADING_LAYER" not in os.environ:
    numba.config.THREADING_LAYER = "threadsafe"


def _start_pool():
    """Start numba's pool now, with OpenMP workers that sleep instead of spinning when idle.

    GNU OpenMP's idle workers spin for a while after each parallel region.  Another OpenMP pool in
    the process (PyTorch's, numpy's BLAS) or another busy process then loses its cores to them:
    measured here, a small convolution took 16 ms instead of 0.6 ms next to PyTorch in one process,
    and 56 ms instead of 1.7 ms on a loaded machine.  The policy is read once, when the OpenMP
    library starts, so it is set only while numba's pool starts and then removed again: other
    libraries keep their defaults.  A user's own ``OMP_WAIT_POLICY`` / ``GOMP_SPINCOUNT`` win.
    """
    if "OMP_WAIT_POLICY" in os.environ or "GOMP_SPINCOUNT" in os.environ:
        return
    from numba.np.ufunc import parallel
    os.environ["OMP_WAIT_POLICY"] = "passive"
    try:
        parallel._launch_threads()
    except Exception:  # pragma: no cover - the pool then starts lazily with the defaults
        pass
    finally:
        del os.environ["OMP_WAIT_POLICY"]


_start_pool()

# NUMBA_BOUNDSCHECK=1 (a CI job) is silently ignored inside prange bodies (numba issues 4600, 9380),
# where all our indexing is: under it kernels compile serial and uncached, so every index is checked
# and no serial build can land in the cache that normal runs read.
BOUNDSCHECK = bool(numba.config.BOUNDSCHECK)
# cache: numba's cache=True, hardened against damaged and unwritable cache files (_cache.py).
kernel = cached(numba.njit(parallel=not BOUNDSCHECK, fastmath=FASTMATH, nogil=True), enabled=not BOUNDSCHECK)
