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


#: Spin iterations of numba's idle OpenMP workers before they sleep (GNU OpenMP's own default is
#: 300,000: several ms).  ~22 ns each on the 2-core Xeon VM: ~0.1 ms, the gap between the kernels of
#: one call and between the calls of a training step, while a PyTorch pool or another process gets
#: the core back soon after.
SPIN_COUNT = 5000


def _start_pool():
    """Start numba's pool now, with OpenMP workers that spin briefly (SPIN_COUNT), then sleep.

    GNU OpenMP's idle workers spin for several ms after each parallel region.  Another OpenMP pool
    in the process (PyTorch's, numpy's BLAS) or another busy process then loses its cores to them:
    measured here, a small convolution took 16 ms instead of 0.6 ms next to PyTorch in one process,
    and 56 ms instead of 1.7 ms on a loaded machine.  Sleeping at once (``OMP_WAIT_POLICY=passive``,
    the setting before) costs a wake-up per parallel region instead, ~70 us on the 2-core Xeon VM
    whenever the main thread did not sleep in between (a trivial kernel: 66-90 us passive, 1.5 us
    with this spin when the regions come within ~0.1 ms, 41 us after longer gaps); a layer's forward
    and backward run 5-12 regions, so the mini-ResNet's training step took 18.5-19.3 ms passive and
    15.5-15.8 ms with the spin.  The policy is read once, when the OpenMP library starts, so it is
    set only while numba's pool starts and then removed again: other libraries keep their defaults.
    A user's own ``OMP_WAIT_POLICY`` / ``GOMP_SPINCOUNT`` win (an empty value counts as set).
    """
    if "OMP_WAIT_POLICY" in os.environ or "GOMP_SPINCOUNT" in os.environ:
        return
    from numba.np.ufunc import parallel
    os.environ["GOMP_SPINCOUNT"] = str(SPIN_COUNT)
    try:
        parallel._launch_threads()
    except Exception:  # pragma: no cover - the pool then starts lazily with the defaults
        pass
    finally:
        del os.environ["GOMP_SPINCOUNT"]


_start_pool()

# NUMBA_BOUNDSCHECK=1 (a CI job) is silently ignored inside prange bodies (numba issues 4600, 9380),
# where all our indexing is: under it kernels compile serial and uncached, so every index is checked
# and no serial build can land in the cache that normal runs read.
BOUNDSCHECK = bool(numba.config.BOUNDSCHECK)
# cache: numba's cache=True, hardened against damaged and unwritable cache files (_cache.py).
kernel = cached(numba.njit(parallel=not BOUNDSCHECK, fastmath=FASTMATH, nogil=True), enabled=not BOUNDSCHECK)
# Serial helpers inlined into the calling kernel and compiled (and cached) with it, never cached on
# their own (a cached serial function calling a cached parallel one is the crash above).  numba does
# not see an edit to a helper in another file: delete the calling kernel's __pycache__/*.nbi then.
micro = numba.njit(fastmath=FASTMATH, nogil=True, inline="always")
# serial: a helper compiled on its own and called (LLVM may still inline it): for big helpers that
# numba's own inlining would copy into a parallel kernel many times (its compile time grows with it)
serial = numba.njit(fastmath=FASTMATH, nogil=True)
# entry: a serial kernel, cached, called from Python only (never from jitted code: the crash above),
# for work too small for a parallel region (a small layer's 64x32x3x3 weights: packed in 6.7 us
# serial, 11.3 us by the parallel kernel held to one thread, its region and thread setting included)
entry = cached(numba.njit(fastmath=FASTMATH, nogil=True), enabled=not BOUNDSCHECK)

# --------------------------------------------------------------------------- vectors and runs
#: Bytes per vector in the IR micro-kernels (``common.mac_taps``, ``copy_vector``): 256 bits, which
#: every x86-64 CPU fastconv targets executes (an AVX-512 core too; ``_cpu.isa()`` tells what else
#: it has, and the GEMM micro-kernel chooses its own width from that).
VECTOR_BYTES = 32
#: Zero elements after every padded plane (``common.pad_planes``).  Kernels round a run of elements
#: up to a whole number of vectors and read (or write into scratch) up to that far past its end, so
#: a round-up unit must never exceed it.
SLACK = 32
#: Round-up units, in elements: one float32 vector (the forward blocks, per-image runs, pooling
#: rows) and two (depthwise runs and grad_weight's merged rows, whose loops take two at a time).
RUN_VECTOR = VECTOR_BYTES // 4
RUN_PAIR = 2 * RUN_VECTOR
if RUN_PAIR > SLACK:  # pragma: no cover - a wider vector needs a wider SLACK first
    raise ImportError(f"fastconv._jit: run round-up {RUN_PAIR} exceeds the plane slack {SLACK}")


@numba.njit(inline="always", nogil=True)
def round_run(n, unit):
    """``n`` rounded up to a multiple of ``unit`` (``RUN_VECTOR`` or ``RUN_PAIR``, both within
    ``SLACK``): the length a kernel processes for a run of ``n`` elements."""
    return n + (-n) % unit


@kernel
def zero_fill(a):
    """``a[:] = 0`` for a 1-D array, in 64 chunks over numba's pool (``_config.result_zeros``)."""
    n = a.size
    for ch in numba.prange(64):
        for i in range(ch * n // 64, (ch + 1) * n // 64):
            a[i] = 0
