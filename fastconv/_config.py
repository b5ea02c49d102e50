"""Library-wide settings: the workspace budget of algorithms that need scratch memory.

Algorithms that build temporary buffers (im2col's column matrix, FFT spectra) tile their work so
the scratch memory of one call stays under this budget.  The budget can be set library-wide with
:func:`set_workspace_limit` or per call with ``workspace_limit=`` on :func:`fastconv.conv2d` and
:func:`fastconv.conv2d_backward`.

Large scratch buffers (the FFT path's tiles and spectra, the batch-wide Winograd passes' transformed
weights, tiles and NHWC copies) are kept per thread between calls
(:func:`scratch`) and released with :func:`free_workspace`.  Fresh memory is expensive here: glibc
hands blocks of several MiB back to the kernel when they are freed, and the next call faults every
page in again -- measured on the 2-core development VM, ~2.6 us per 4 KiB page (about 35 ms of
convnet-L2-9x9's ~105 ms FFT forward went to page faults).
"""
from __future__ import annotations

import functools
import threading

import numpy as np

DEFAULT_WORKSPACE_LIMIT = 64 * 1024 * 1024
_workspace_limit = DEFAULT_WORKSPACE_LIMIT


def check_workspace_limit(fn, value):
    """Validate a workspace budget in bytes (a positive int)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{fn}: workspace_limit must be an int number of bytes, got {value!r}")
    if value < 1:
        raise ValueError(f"{fn}: workspace_limit must be positive (bytes), got {value}")
    return int(value)


def set_workspace_limit(nbytes):
    """Set the library-wide scratch-memory budget of one convolution call, in bytes.

    Parameters
    ----------
    nbytes : int
        Positive number of bytes; the default is 64 MiB.  Results do not depend on it, only
        speed and peak memory do.

    Returns
    -------
    int
        The previous limit.

    Examples
    --------
    >>> import fastconv
    >>> old = fastconv.set_workspace_limit(16 * 2**20)
    >>> fastconv.get_workspace_limit()
    16777216
    >>> _ = fastconv.set_workspace_limit(old)
    """
    global _workspace_limit
    new = check_workspace_limit("set_workspace_limit", nbytes)
    old, _workspace_limit = _workspace_limit, new
    return old


def get_workspace_limit():
    """The library-wide scratch-memory budget of one convolution call, in bytes.

    Examples
    --------
    >>> import fastconv
    >>> fastconv.get_workspace_limit() > 0
    True
    """
    return _workspace_limit


def resolve_workspace_limit(fn, value):
    """The per-call budget: ``value`` if given, else the library-wide one."""
    return _workspace_limit if value is None else check_workspace_limit(fn, value)


_scratch_local = threading.local()


def scratch(role, shape, dtype):
    """An uninitialised C-contiguous array for temporary data, reused by later calls in this thread.

    One buffer is kept per ``role`` (grown when a call needs more); a caller must not use two
    arrays of the same role at once, nor return one to the user.  Held memory is at most the
    largest request per role, each of which the callers keep under the workspace limit.
    """
    dtype = np.dtype(dtype)
    n = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    pool = getattr(_scratch_local, "pool", None)
    if pool is None:
        pool = _scratch_local.pool = {}
    buf = pool.get(role)
    if buf is None or buf.nbytes < n:
        pool.pop(role, None)  # drop the old one first: peak memory stays at the new size
        buf = pool[role] = empty_aligned(max(n, 1), np.uint8)
    return buf[:n].view(dtype).reshape(shape)


#: bytes of alignment of :func:`empty_aligned`: one cache line
ALIGN = 64


def empty_aligned(shape, dtype):
    """``np.empty(shape, dtype)`` starting on a cache-line boundary.  NumPy aligns to 16 bytes only:
    large arrays came back 16 or 48 bytes past a 64-byte line, and every second 32-byte vector
    store of the kernels that write whole vectors then split across two lines (4x128x56x56's NCHW
    Winograd forward 9.5 ms with such an output, 6.5 with an aligned one)."""
    dtype = np.dtype(dtype)
    n = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    buf = np.empty(n + ALIGN, np.uint8)
    off = -buf.ctypes.data % ALIGN
    return buf[off:off + n].view(dtype).reshape(shape)


def free_workspace():
    """Release the scratch buffers that convolution calls in this thread keep for reuse.

    The FFT algorithm keeps its tile and spectrum buffers, and Winograd its transformed weights,
    workers' tile buffers and (batch-wide passes) layout copies (each under the workspace limit of
    the largest call) between calls, because faulting fresh memory in costs more than some of their
    transforms; call this to hand that memory back, e.g. after the last large convolution.

    Returns
    -------
    int
        The number of bytes released.

    Examples
    --------
    >>> import fastconv
    >>> fastconv.free_workspace() >= 0
    True
    """
    pool = getattr(_scratch_local, "pool", None) or {}
    freed = sum(b.nbytes for b in pool.values())
    pool.clear()
    return freed


class OutOfMemoryError(MemoryError):
    """A MemoryError that names the fastconv call and the bytes it asked for."""


def _out_of_memory(fn, error):
    shape, dtype = getattr(error, "shape", None), getattr(error, "dtype", None)
    if shape is not None and dtype is not None:  # numpy's allocation error carries the request
        nbytes = int(np.prod(shape, dtype=np.float64) * np.dtype(dtype).itemsize)
        asked = (f"allocating {nbytes} bytes ({nbytes / 2**30:.2f} GiB) for an array of shape "
                 f"{tuple(shape)} and dtype {np.dtype(dtype).name} failed")
    else:  # raised by a kernel (numba does not say how much) or by other code
        asked = f"an allocation failed ({error})"
    return OutOfMemoryError(
        f"{fn}: out of memory: {asked} (an output or a working buffer). Nothing was changed; free memory, "
        f"use a smaller batch, or lower the workspace with fastconv.set_workspace_limit()")


def reports_memory(op):
    """Decorator for a public op: a MemoryError from inside it (an output, a copy or a workspace that
    could not be allocated) is raised again as an :class:`OutOfMemoryError` naming the op and the bytes.

    Outputs that could never fit are refused before allocating (``_validation.check_memory``); this
    covers the ones that fit the machine but not the memory free at the moment.  Inputs and settings
    are not modified on the way (ops never modify inputs, and thread settings are per call).
    """
    @functools.wraps(op)
    def wrapper(*args, **kwargs):
        try:
            return op(*args, **kwargs)
        except OutOfMemoryError:
            raise
        except MemoryError as e:
            raise _out_of_memory(op.__name__, e) from e

    return wrapper
