"""set_num_threads / get_num_threads / threads govern numba's pool and numpy's BLAS together."""
import threading

import numba
import numpy as np
import pytest
from threadpoolctl import threadpool_info

import fastconv


def numpy_blas_threads():
    return [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas" and "numpy" in i["filepath"]]


@pytest.fixture
def restore():
    old = fastconv.get_num_threads()
    yield
    fastconv.set_num_threads(old)


def test_set_num_threads_sets_numba_and_numpy_blas(restore):
    fastconv.set_num_threads(1)
    assert fastconv.get_num_threads() == 1 and numba.get_num_threads() == 1
    assert numpy_blas_threads() and set(numpy_blas_threads()) == {1}
    top = fastconv.max_threads()
    assert fastconv.set_num_threads(top) == 1
    assert numba.get_num_threads() == top


def test_set_num_threads_applies_even_after_another_library_changed_the_pool(restore):
    from threadpoolctl import ThreadpoolController
    fastconv.set_num_threads(1)
    for ctl in ThreadpoolController().select(user_api="blas").lib_controllers:
        if "numpy" in ctl.filepath:
            ctl.set_num_threads(2)  # e.g. a Dask worker's threadpool_limits, behind fastconv's back
    fastconv.set_num_threads(1)
    assert set(numpy_blas_threads()) == {1}


def test_switching_the_count_scans_the_libraries_once(restore, monkeypatch):
    # fastconv.torch switches the count on every operator call where PyTorch's differs: building a
    # ThreadpoolController (a scan of every loaded library) each time made that call 3x slower
    import threadpoolctl
    from fastconv import _threads
    built = []

    class Counting(threadpoolctl.ThreadpoolController):
        def __init__(self, *a, **k):
            built.append(1)
            super().__init__(*a, **k)

    monkeypatch.setattr(threadpoolctl, "ThreadpoolController", Counting)
    monkeypatch.setattr(_threads, "_numpy_ctls", None)
    top = fastconv.max_threads()
    fastconv.set_num_threads(top)
    assert len(built) == 1
    seen = []
    for _ in range(3):
        with fastconv.threads(1):
            seen.append(len(built))
        seen.append(len(built))
    assert seen == [1] * 6  # no scan while switching (threadpool_info below scans on its own)
    with fastconv.threads(1):
        assert set(numpy_blas_threads()) == {1}
    assert set(numpy_blas_threads()) == {top}


def test_setting_holds_in_other_python_threads(restore):
    """numba's own setting is per thread; fastconv re-applies its own at every call."""
    fastconv.set_num_threads(1)
    seen = []

    def work():
        numba.set_num_threads(fastconv.max_threads())  # someone else changed this thread's numba setting
        fastconv.conv2d(np.ones((1, 1, 5, 5)), np.ones((1, 1, 3, 3)))
        seen.append(numba.get_num_threads())

    t = threading.Thread(target=work)
    t.start()
    t.join()
    assert seen == [1]


def test_threads_context_restores(restore):
    fastconv.set_num_threads(fastconv.max_threads())
    with fastconv.threads(1) as n:
        assert n == 1 and fastconv.get_num_threads() == 1 and numba.get_num_threads() == 1
        y1 = fastconv.conv2d(np.ones((2, 3, 8, 8)), np.ones((4, 3, 3, 3)))
    assert fastconv.get_num_threads() == fastconv.max_threads()
    np.testing.assert_array_equal(y1, 27.0)


def test_tiny_calls_run_on_one_thread_and_large_ones_on_the_setting(restore):
    from fastconv._threads import SERIAL_WORK
    fastconv.set_num_threads(fastconv.max_threads())
    fastconv.conv2d(np.ones((1, 1, 5, 5)), np.ones((1, 1, 3, 3)))        # 81 MACs
    assert numba.get_num_threads() == 1
    x = np.ones((1, 16, 64, 64), np.float32)
    w = np.ones((16, 16, 3, 3), np.float32)
    assert 16 * 16 * 9 * 62 * 62 > SERIAL_WORK
    fastconv.conv2d(x, w)
    assert numba.get_num_threads() == fastconv.max_threads()
    assert fastconv.get_num_threads() == fastconv.max_threads()


def test_small_linear_products_run_on_one_blas_thread(restore, monkeypatch):
    """Linear's numpy products below SERIAL_BLAS_WORK run on one BLAS thread, the setting restored
    after; larger ones run on fastconv's setting."""
    from fastconv import _threads
    from fastconv.autograd import Parameter, Tensor
    from fastconv._autograd_ops import linear

    top = fastconv.max_threads()
    if top < 2:
        pytest.skip("one core: nothing to switch")
    fastconv.set_num_threads(top)
    seen = []
    real = np.ndarray.__matmul__

    class Probe(np.ndarray):
        def __matmul__(self, other):
            seen.append(set(numpy_blas_threads()))
            return real(np.asarray(self), np.asarray(other))

    x = np.ones((4, 8)).view(Probe)
    w = Parameter(np.ones((3, 8)))
    y = linear(Tensor(x, True), w)
    assert seen == [{1}] and set(numpy_blas_threads()) == {top}
    y.sum().backward()
    assert set(numpy_blas_threads()) == {top}
    monkeypatch.setattr(_threads, "SERIAL_BLAS_WORK", 0)  # every product "large": the setting stays
    seen.clear()
    linear(Tensor(x, True), w)
    assert seen == [{top}]
