"""How many cores fastconv uses: numba's pool and the BLAS pool together.

fastconv's kernels run on numba's thread pool.  BLAS is used in two places: inside numba kernels
(scipy's OpenBLAS, which the im2col algorithm holds to one thread per worker so the two pools never
compete) and outside them (numpy's OpenBLAS, e.g. in :class:`fastconv.layers.Linear`).  The setting
here governs numba's pool and numpy's BLAS together; by default both use every core numba was
started with (``NUMBA_NUM_THREADS``), and they never run at the same time, so the machine is never
oversubscribed.

numba's thread count is a per-Python-thread setting; fastconv applies its own setting at the start
of every call (so a call also leaves it set for the calling thread), so :func:`set_num_threads`
holds for calls from any thread, and the :func:`threads` context manager overrides it for the
calling thread only.  Calls with very little work (:data:`SERIAL_WORK`) run on one thread.
"""
from __future__ import annotations

import contextlib
import threading

import numba
import numpy as np

_global: int | None = None        # set_num_threads(); None = numba's default
_local = threading.local()        # threads() overrides, per Python thread
_blas_lock = threading.Lock()
_blas_threads: int | None = None


def max_threads() -> int:
    """The most threads fastconv can use: numba's pool size (``NUMBA_NUM_THREADS``).

    Examples
    --------
    >>> import fastconv
    >>> fastconv.max_threads() >= 1
    True
    """
    return int(numba.config.NUMBA_NUM_THREADS)


def _check(fn, n):
    if isinstance(n, (bool, np.bool_)) or not isinstance(n, (int, np.integer)):
        raise TypeError(f"{fn}: n must be an int, got {n!r}")
    top = max_threads()
    if not 1 <= n <= top:
        raise ValueError(f"{fn}: n must be between 1 and {top} (NUMBA_NUM_THREADS), got {n}")
    return int(n)


def _numpy_blas(n, force=False):
    """Limit numpy's BLAS pool to ``n`` threads (scipy's, used inside kernels, is left alone).  The
    last value set is remembered and not set again unless ``force`` (an explicit
    :func:`set_num_threads`: another library, e.g. a ``threadpool_limits`` block of a Dask worker, may
    have changed the pool since, and the remembered value left it at 2 after ``set_num_threads(1)``)."""
    global _blas_threads
    with _blas_lock:
        if _blas_threads == n and not force:
            return
        try:
            from threadpoolctl import ThreadpoolController
        except ImportError:  # pragma: no cover - threadpoolctl is a dependency
            return
        _blas_threads = None  # unknown until every library is set (an interrupt may stop the loop)
        for ctl in _numpy_controllers(ThreadpoolController):
            ctl.set_num_threads(n)
        _blas_threads = n


_numpy_ctls = None


def _numpy_controllers(controller):
    """threadpoolctl's controllers of numpy's BLAS, found once: building a ThreadpoolController
    scans every loaded library (~0.5 ms with PyTorch loaded), and the bridge switches the count
    on every operator call where PyTorch's differs from fastconv's (a converted MobileNet's step
    took 154 ms at torch.set_num_threads(1), 56 at 2)."""
    global _numpy_ctls
    if _numpy_ctls is None:
        _numpy_ctls = [ctl for ctl in controller().select(user_api="blas").lib_controllers
                       if "numpy" in ctl.filepath]
    return _numpy_ctls


def current() -> int:
    """Threads the next fastconv call from this Python thread will use."""
    n = getattr(_local, "n", None)
    if n is None:
        n = _global
    return max_threads() if n is None else n


#: Calls with less work than this (multiply-accumulates, or compared elements for pooling) run on one
#: thread: waking a second thread costs more than it saves there, and on a busy machine a parallel
#: region waits for every worker's time slice (milliseconds where the work is microseconds).  It was
#: 1 << 18, from a VM where waking the second thread cost ~0.1 ms; on the Zen 4 VM LeNet's pools
#: (75K windows) took 0.154 ms on one thread and 0.079 on two, and a converted LeNet's training step
#: 5.8-5.9 ms at 1 << 18, 5.0-5.3 at 1 << 14, 4.9-5.1 at 1 << 12 (interleaved, PyTorch's
#: channels_last 5.4-5.6; a MobileNet step, whose calls are larger, even).
SERIAL_WORK = 1 << 12


def apply(work=None) -> int:
    """Set numba's pool in this Python thread for the next kernel call (called by every op).

    ``work`` below :data:`SERIAL_WORK` runs on one thread; otherwise fastconv's setting (all of
    numba's threads by default).  Returns the thread count set, which is what ``'auto'`` chooses for.
    """
    if work is not None and work < SERIAL_WORK:
        n = 1
    else:
        n = getattr(_local, "n", None)
        if n is None:
            n = _global
            if n is None:
                n = max_threads()
    if numba.get_num_threads() != n:
        numba.set_num_threads(n)
    return n


def set_num_threads(n):
    """Set how many threads fastconv uses (numba's pool and numpy's BLAS), for calls from any thread.

    Parameters
    ----------
    n : int
        ``1 <= n <= NUMBA_NUM_THREADS`` (the size numba's pool was started with; by default the
        number of cores).

    Returns
    -------
    int
        The previous setting.

    See Also
    --------
    threads : the same, for a ``with`` block in the calling thread.

    Examples
    --------
    >>> import fastconv
    >>> old = fastconv.set_num_threads(1)
    >>> fastconv.get_num_threads()
    1
    >>> _ = fastconv.set_num_threads(old)
    """
    global _global
    n = _check("set_num_threads", n)
    old = current()
    _global = n
    numba.set_num_threads(n)
    _numpy_blas(n, force=True)
    return old


def get_num_threads():
    """Threads fastconv uses for calls from this Python thread.

    Examples
    --------
    >>> import fastconv
    >>> 1 <= fastconv.get_num_threads() <= fastconv.max_threads()
    True
    """
    return current()


@contextlib.contextmanager
def threads(n):
    """Context manager: run the enclosed fastconv calls of this Python thread on ``n`` threads.

    Examples
    --------
    >>> import numpy as np, fastconv
    >>> with fastconv.threads(1):
    ...     fastconv.get_num_threads()
    1
    """
    n = _check("threads", n)
    prev = getattr(_local, "n", None)
    prev_numba = numba.get_num_threads()
    try:  # the settings too: an interrupt (KeyboardInterrupt from a signal) between them is restored
        _local.n = n
        numba.set_num_threads(n)
        _numpy_blas(n)
        yield n
    finally:
        _local.n = prev
        numba.set_num_threads(prev_numba)
        _numpy_blas(current())


#: numpy products (the Linear layers') of fewer multiply-adds than this run on one BLAS thread
#: (:func:`blas_for`): LeNet-5's 32x400 . 400x120 forward took 0.43 ms on OpenBLAS's two threads,
#: 0.09 on one (its second thread woken for microseconds of work, 2-core Xeon VM).
SERIAL_BLAS_WORK = 1 << 23


@contextlib.contextmanager
def blas_for(work):
    """Run the enclosed numpy products of ``work`` multiply-adds on one BLAS thread where that is
    below SERIAL_BLAS_WORK, restoring the setting after; otherwise leave it (fastconv's)."""
    if work >= SERIAL_BLAS_WORK or current() == 1:
        yield
        return
    prev = _blas_threads
    _numpy_blas(1)
    try:
        yield
    finally:
        _numpy_blas(current() if prev is None else prev)
