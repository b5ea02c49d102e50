"""The BLAS that kernels call: a Fortran ``?gemm`` behind a function pointer, and its thread pool
held to one thread while they run.

Kernels (im2col's, Winograd's) take the pointer and a per-worker integer scratch row as arguments
(:meth:`_Blas.args`) and call :func:`_gemm` with row-major operands and their own leading
dimensions and ``beta``; numba types the pointer by its signature only, so ``cache=True`` stays
valid across processes.  Python wrappers run those kernels inside ``with serial_blas:`` so that the
library's own pool never competes with numba's (with both pools active, four 64x576x448 GEMMs in a
``prange`` took 112 ms instead of 1.2 ms here).
"""
import ctypes
import threading

import numpy as np

from .._jit import micro as _micro

# ---------------------------------------------------------------------------------------- the call
# Every argument of the Fortran interface is a pointer; the integers are written into a small
# per-worker array of the library's int width.
_GEMM_PROTO = ctypes.CFUNCTYPE(None, *([ctypes.c_void_p] * 13))
_N, _T = 0, 1  # indices into the per-worker ('N', 'T') character array


@_micro
def _gemm(fn, iv, tr, ta, tb, m, n, kk, alpha, a, lda, b, ldb, beta, c, ldc):
    # Row-major C (m x n, row pitch ldc) = alpha * op(A) . op(B) + beta * C, where a, b, c are 1-D
    # views starting at each matrix's first element.  A row-major matrix is the column-major
    # transpose, so this is the column-major C.T = op(B).T . op(A).T with the same trans flags.
    iv[0] = n
    iv[1] = m
    iv[2] = kk
    iv[3] = ldb
    iv[4] = lda
    iv[5] = ldc
    fn(tr[tb:].ctypes, tr[ta:].ctypes, iv[0:].ctypes, iv[1:].ctypes, iv[2:].ctypes, alpha.ctypes,
       b.ctypes, iv[3:].ctypes, a.ctypes, iv[4:].ctypes, beta.ctypes, c.ctypes, iv[5:].ctypes)


@_micro
def _chars():
    tr = np.empty(2, np.uint8)
    tr[0] = 78  # 'N'
    tr[1] = 84  # 'T'
    return tr


# ---------------------------------------------------------------------------------------- one pool
class _Blas:
    """The ?gemm kernels call, and its thread pool held to one thread while they run.

    Preferred: the OpenBLAS bundled with numpy (the library of the same-run sgemm baseline; its
    sgemm was 3-40% faster here than the OpenBLAS bundled with scipy on the tile shapes, e.g. 78 vs
    56 GFLOP/s for 64x256x3136).  Fallback: scipy's ``cython_blas`` (numba's ``np.dot`` BLAS).
    Found once, with threadpoolctl; as a context manager (re-entrant, thread-safe) the first
    entrant saves the library's thread count and sets 1, the last one out restores it, through
    OpenBLAS's own ``openblas_get/set_num_threads`` (found once: ~1 us for both, against ~15 us
    through threadpoolctl's handle, which looks the symbols up on every call, and ~1.8 ms to enter
    ``threadpool_limits``); threadpoolctl's handle where those are missing or OpenBLAS runs on
    OpenMP.  A numpy BLAS call made by another Python thread while a convolution runs therefore
    runs single-threaded.
    """

    # (symbol of sgemm, of dgemm, integer type): numpy wheels' scipy-openblas is ILP64
    _NUMPY_SYMBOLS = (("scipy_sgemm_64_", "scipy_dgemm_64_", np.int64),
                      ("sgemm_64_", "dgemm_64_", np.int64),
                      ("sgemm64_", "dgemm64_", np.int64))

    def __init__(self):
        self._lock = threading.Lock()
        self._depth = 0
        self._found = None
        self._calls = []
        self._saved = ()

    @staticmethod
    def _thread_calls(lib):
        """(get, set) of a threadpoolctl BLAS controller's thread count: OpenBLAS's own functions
        through a ctypes handle of our own, else the controller's methods."""
        if getattr(lib, "internal_api", "") == "openblas" and getattr(lib, "threading_layer", "") != "openmp":
            try:
                dll = ctypes.CDLL(lib.filepath)
            except OSError:  # pragma: no cover
                dll = None
            for pre in ("", "scipy_"):
                for suf in ("", "64_", "_64"):
                    get = getattr(dll, f"{pre}openblas_get_num_threads{suf}", None)
                    put = getattr(dll, f"{pre}openblas_set_num_threads{suf}", None)
                    if get is not None and put is not None:
                        get.restype, get.argtypes = ctypes.c_int, []
                        put.restype, put.argtypes = None, [ctypes.c_int]
                        return get, put
        return lib.get_num_threads, lib.set_num_threads

    def _find(self):
        from threadpoolctl import ThreadpoolController
        import scipy.linalg.cython_blas  # noqa: F401  (load it so threadpoolctl sees its library)
        blas = [lib for lib in ThreadpoolController().lib_controllers if lib.user_api == "blas"]
        for lib in blas:
            if "numpy" not in lib.filepath:
                continue
            try:
                cdll = ctypes.CDLL(lib.filepath)
            except OSError:  # pragma: no cover
                continue
            for sname, dname, itype in self._NUMPY_SYMBOLS:
                if hasattr(cdll, sname) and hasattr(cdll, dname):
                    fns = {np.dtype(np.float32): _GEMM_PROTO((sname, cdll)),
                           np.dtype(np.float64): _GEMM_PROTO((dname, cdll))}
                    return fns, itype, [lib]
        from numba.extending import get_cython_function_address
        fns = {np.dtype(dt): _GEMM_PROTO(get_cython_function_address("scipy.linalg.cython_blas", name))
               for dt, name in ((np.float32, "sgemm"), (np.float64, "dgemm"))}
        return fns, np.int32, [lib for lib in blas if "numpy" not in lib.filepath]

    def found(self):
        """(?gemm by dtype, BLAS integer type, threadpoolctl controllers of its thread pool)."""
        if self._found is None:
            with self._lock:
                if self._found is None:
                    found = self._find()
                    self._calls = [self._thread_calls(lib) for lib in found[2]]
                    self._found = found
        return self._found

    def args(self, dtype, nw):
        """Kernel arguments: the ?gemm for ``dtype`` and one integer scratch row per worker."""
        fns, itype, _ = self.found()
        return fns[np.dtype(dtype)], np.zeros((nw, 8), dtype=itype)

    def __enter__(self):
        self.found()
        calls = self._calls
        with self._lock:
            # the depth is counted before the library changes, and an interrupt while it changes
            # restores what was already set, so no interrupt can leave the pool at one thread
            self._depth += 1
            if self._depth == 1:
                saved = []
                try:
                    for get, put in calls:
                        saved.append((put, get()))
                    self._saved = saved
                    for put, nt in saved:
                        if nt != 1:
                            put(1)
                except BaseException:
                    for put, nt in saved:
                        put(nt)
                    self._depth -= 1
                    raise
        return self

    def __exit__(self, *exc):
        with self._lock:
            if self._depth == 1:  # restore first, then leave: an interrupt in between re-restores
                for put, nt in self._saved:
                    if nt != 1:
                        put(nt)
            self._depth -= 1
        return False


_BLAS = _Blas()
serial_blas = _BLAS
