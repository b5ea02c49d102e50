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

FASTMATH = {"contract", "reassoc", "nsz", "arcp", "afn"}

# numba's 'workqueue' layer aborts the process when parallel kernels run from several Python threads;
# 'threadsafe' picks TBB or OpenMP, both of which allow it.  A user's explicit choice wins.
if "NUMBA_THREADING_LAYER" not in os.environ:
    numba.config.THREADING_LAYER = "threadsafe"

# NUMBA_BOUNDSCHECK=1 (a CI job) is silently ignored inside prange bodies (numba issues 4600, 9380),
# where all our indexing is: under it kernels compile serial and uncached, so every index is checked
# and no serial build can land in the cache that normal runs read.
BOUNDSCHECK = bool(numba.config.BOUNDSCHECK)
kernel = numba.njit(parallel=not BOUNDSCHECK, cache=not BOUNDSCHECK, fastmath=FASTMATH, nogil=True)
