"""fastconv._config: aligned arrays and the kept memory of results."""
import threading

import numpy as np
import pytest

import fastconv
from fastconv import _config as C

BIG = (4, 16, 64, 64)  # 1 MiB of float32: at RESULT_MIN_BYTES


@pytest.fixture(autouse=True)
def _empty_pool():
    fastconv.free_workspace()
    yield
    fastconv.free_workspace()


@pytest.mark.parametrize("shape", [(3, 5), BIG, (2, 3, 128, 129)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int64])
def test_results_are_aligned_c_contiguous_arrays_of_the_shape(shape, dtype):
    for make in (C.result, C.empty_aligned):
        a = make(shape, dtype)
        assert a.shape == shape and a.dtype == dtype and a.flags.c_contiguous and a.flags.writeable
        assert a.ctypes.data % C.ALIGN == 0
    assert not C.result_zeros(shape, dtype).any()


def test_a_freed_result_is_reused_and_a_live_one_never():
    a = C.result(BIG, np.float32)
    where = a.ctypes.data
    b = C.result(BIG, np.float32)
    assert b.ctypes.data != where  # a is alive
    view = a[1:]
    del a
    c = C.result(BIG, np.float32)
    assert c.ctypes.data != where  # a view of it is alive
    del view
    d = C.result(BIG, np.float32)
    assert d.ctypes.data == where  # nothing references it any more
    assert len({b.ctypes.data, c.ctypes.data, d.ctypes.data}) == 3
    e = C.result((4, 16, 64, 80), np.float32)  # 1.25x the size: fits a freed buffer
    del e
    f = C.result((2, 4, 16, 64, 64), np.float32)  # 2x: too big for any of them
    assert f.nbytes == 2 * d.nbytes


def test_a_result_handed_to_torch_stays_its_own():
    torch = pytest.importorskip("torch")
    t = torch.from_numpy(C.result(BIG, np.float32))
    t.fill_(1.0)
    other = C.result(BIG, np.float32)
    other.fill(2.0)
    assert bool((t == 1.0).all())
    where = t.data_ptr()
    del t
    assert C.result(BIG, np.float32).ctypes.data == where


def test_free_workspace_hands_back_the_free_results_only():
    keep = C.result(BIG, np.float32)
    C.result(BIG, np.float32)  # dropped at once
    freed = fastconv.free_workspace()
    assert freed >= keep.nbytes
    keep[...] = 3.0  # still valid memory
    assert fastconv.free_workspace() == 0
    del keep
    assert fastconv.free_workspace() >= BIG[0] * BIG[1] * BIG[2] * BIG[3] * 4


def test_the_kept_bytes_stay_under_the_cap(monkeypatch):
    monkeypatch.setattr(C, "RESULT_POOL_BYTES", 3 * (1 << 20) + 3 * C.ALIGN)
    live = [C.result(BIG, np.float32) for _ in range(5)]  # past the cap: the rest are not kept
    assert sum(b.nbytes for b in C._results) <= C.RESULT_POOL_BYTES
    del live
    for _ in range(5):
        C.result((8, 16, 64, 64), np.float32)  # other sizes evict free buffers
        assert sum(b.nbytes for b in C._results) <= C.RESULT_POOL_BYTES


def test_threads_never_share_a_live_result():
    errors = []

    def work(value):
        for _ in range(50):
            a = C.result(BIG, np.float32)
            a.fill(value)
            if not (a == value).all():
                errors.append(value)

    threads = [threading.Thread(target=work, args=(float(v),)) for v in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_outputs_of_repeated_calls_reuse_memory_and_stay_correct():
    # a layer's output, dropped, is where the next call's output goes; a kept one is not touched
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 16, 64, 64)).astype(np.float32)
    w = rng.standard_normal((16, 16, 3, 3)).astype(np.float32)
    first = fastconv.conv2d(x, w, padding=1)
    keep = first.copy()
    addr = fastconv.conv2d(x * 2, w, padding=1).ctypes.data
    assert fastconv.conv2d(x * 3, w, padding=1).ctypes.data == addr
    np.testing.assert_array_equal(first, keep)
