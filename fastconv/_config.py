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
convnet-L2-9x9's ~105 ms FFT forward went to page faults).  Results of 1 MiB or more (outputs,
gradients, padded copies) come from kept memory too, reused once nothing references them
(:func:`result`).
"""
from __future__ import annotations

import functools
import math
import sys
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
    n = _count(shape) * dtype.itemsize
    pool = getattr(_scratch_local, "pool", None)
    if pool is None:
        pool = _scratch_local.pool = {}
    buf = pool.get(role)
    if buf is None or buf.nbytes < n:
        pool.pop(role, None)  # drop the old one first: peak memory stays at the new size
        buf = pool[role] = empty_aligned(max(n, 1), np.uint8)
    return buf[:n].view(dtype).reshape(shape)


def _count(shape):
    """Elements of ``shape`` (an int or a sequence of them) -- in Python ints: ``np.prod`` of a
    tuple costs ~4 us, and a small layer's forward and backward allocate a dozen arrays."""
    if isinstance(shape, (int, np.integer)):
        return int(shape)
    return math.prod(d if type(d) is int else int(d) for d in shape)


#: bytes of alignment of :func:`empty_aligned`: one cache line
ALIGN = 64


def _aligned_view(raw, shape, dtype, n):
    off = -raw.ctypes.data % ALIGN
    return raw[off:off + n].view(dtype).reshape(shape)


class _AllocationError(MemoryError):
    """A MemoryError naming the array that was asked for (as NumPy's own does): the aligned and
    kept buffers allocate a few bytes more, as bytes, and :func:`_out_of_memory` reports the
    request, not the raw buffer."""

    def __init__(self, shape, dtype):
        self.shape = (int(shape),) if isinstance(shape, (int, np.integer)) else tuple(int(d) for d in shape)
        self.dtype = np.dtype(dtype)
        super().__init__(f"Unable to allocate an array with shape {self.shape} and data type {self.dtype}")


def _raw(n, shape, dtype):
    """``n + ALIGN`` uninitialised bytes for an array of ``shape`` and ``dtype``."""
    try:
        return np.empty(n + ALIGN, np.uint8)
    except MemoryError:
        raise _AllocationError(shape, dtype) from None


def empty_aligned(shape, dtype):
    """``np.empty(shape, dtype)`` starting on a cache-line boundary.  NumPy aligns to 16 bytes only:
    large arrays came back 16 or 48 bytes past a 64-byte line, and every second 32-byte vector
    store of the kernels that write whole vectors then split across two lines (4x128x56x56's NCHW
    Winograd forward 9.5 ms with such an output, 6.5 with an aligned one)."""
    dtype = np.dtype(dtype)
    n = _count(shape) * dtype.itemsize
    return _aligned_view(_raw(n, shape, dtype), shape, dtype, n)


#: Results of at least this many bytes come from :func:`result`'s kept memory.
RESULT_MIN_BYTES = 1 << 20
#: Most bytes :func:`result` keeps (in use by live results or free for the next one).
RESULT_POOL_BYTES = 256 << 20
_results: list = []  # the raw buffers (each the base of the results made from it), oldest first
_results_lock = threading.Lock()


def result(shape, dtype):
    """An uninitialised, cache-line-aligned C-contiguous array for a result handed to the caller,
    on memory that an earlier result no longer referenced has used where there is one.

    Every page of fresh memory is faulted in on first touch, and glibc gives blocks of several MiB
    back to the kernel when they are freed: under a PyTorch training step (other tensors come and
    go between the calls) a 4x32x128x128 1x1 layer's backward faulted the 4 MB padded copy of its
    output gradient in afresh on each step -- ~1030 faults, 9-13 ms against 2.2-2.8 ms with kept
    memory (KVM guest, ~6 us a fault).  Results of RESULT_MIN_BYTES or more are made from kept raw buffers instead: a buffer
    is free again when nothing but this pool references it (every array made from it, and every
    view of those, holds a reference to it as its base), and one between the size and 1.5x of it
    is reused, the most recently used first.  At most RESULT_POOL_BYTES are kept;
    :func:`free_workspace` hands free ones back."""
    dtype = np.dtype(dtype)
    n = _count(shape) * dtype.itemsize
    if n < RESULT_MIN_BYTES:
        return empty_aligned(shape, dtype)
    with _results_lock:
        for i in range(len(_results) - 1, -1, -1):
            # 2: the list's reference and getrefcount's argument -- no result alive
            if n + ALIGN <= _results[i].nbytes <= n + n // 2 + ALIGN and sys.getrefcount(_results[i]) == 2:
                raw = _results.pop(i)
                _results.append(raw)
                return _aligned_view(raw, shape, dtype, n)
        kept = sum(b.nbytes for b in _results)
        i = 0
        while kept + n > RESULT_POOL_BYTES and i < len(_results):
            if sys.getrefcount(_results[i]) == 2:
                kept -= _results.pop(i).nbytes
            else:
                i += 1
        raw = _raw(n, shape, dtype)
        if kept + raw.nbytes <= RESULT_POOL_BYTES:
            _results.append(raw)
        return _aligned_view(raw, shape, dtype, n)


def result_zeros(shape, dtype):
    """:func:`result` filled with zeros -- by numba's pool from PARALLEL_ZERO_BYTES on (one thread's
    fill of 3.2 MB took 0.10 ms, two 0.03; 50 MB of fresh pages 6.1 ms against 0.9)."""
    out = result(shape, dtype)
    if out.nbytes >= PARALLEL_ZERO_BYTES:
        from ._jit import zero_fill

        zero_fill(out.reshape(-1))
    else:
        out.fill(0)
    return out


#: Bytes from which :func:`result_zeros` zeroes in parallel
PARALLEL_ZERO_BYTES = 256 * 1024


def _free_results():
    with _results_lock:
        free = [i for i in range(len(_results)) if sys.getrefcount(_results[i]) == 2]
        freed = sum(_results[i].nbytes for i in free)
        for i in reversed(free):
            del _results[i]
    return freed


def free_workspace():
    """Release the scratch buffers that convolution calls in this thread keep for reuse, and the
    kept memory of results no longer referenced.

    The FFT algorithm keeps its tile and spectrum buffers, and Winograd its transformed weights,
    workers' tile buffers and (batch-wide passes) layout copies (each under the workspace limit of
    the largest call) between calls, because faulting fresh memory in costs more than some of their
    transforms; results of 1 MiB or more (outputs, gradients, padded copies) are made on memory
    kept for the next ones once nothing references them (at most 256 MiB, see ``result``).  Call
    this to hand that memory back, e.g. after the last large convolution.

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
    return freed + _free_results()


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
