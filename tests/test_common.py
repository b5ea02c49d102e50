"""fastconv._algorithms.common: the shared work-item counter, stack arrays and the register-blocked multiply-accumulate."""
import numba
import numpy as np
import pytest
from numba import prange

import fastconv
from fastconv._algorithms.common import claim, copy_vector, mac_taps, stack_rows


@numba.njit(parallel=True, cache=True)
def _claim_all(items, nw, counter, hits, owner):
    for wid in prange(nw):
        for _ in range(items):
            it = claim(counter)
            if it >= items:
                break
            hits[it] += 1  # disjoint: each item is claimed by exactly one worker
            owner[it] = wid


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("items, nw", [(0, 2), (1, 2), (5, 2), (1000, 2), (7, 1)])
def test_claim_hands_out_every_item_exactly_once(threads, items, nw):
    counter = np.zeros(1, np.int64)
    hits = np.zeros(max(items, 1), np.int64)
    owner = np.full(max(items, 1), -1, np.int64)
    with fastconv.threads(threads):
        _claim_all(items, nw, counter, hits, owner)
    assert (hits[:items] == 1).all()
    assert set(owner[:items].tolist()) <= set(range(nw))
    # a worker stops at the claim that finds nothing left (or after claiming every item itself)
    assert items <= counter[0] <= items + (nw if items else 0)


def test_claim_rejects_a_counter_of_the_wrong_type():
    @numba.njit
    def f(c):
        return claim(c)

    with pytest.raises(numba.core.errors.TypingError):
        f(np.zeros(1, np.int32))


@numba.njit
def _fill_stack(v):
    a = stack_rows(3, 5, np.float32)
    for i in range(3):
        for j in range(5):
            a[i, j] = v + i * 5 + j
    return a.copy()


def test_stack_rows_is_a_writable_c_array_of_the_literal_shape():
    got = _fill_stack(1.0)
    assert got.shape == (3, 5) and got.dtype == np.float32 and got.flags.c_contiguous
    assert np.array_equal(got, 1.0 + np.arange(15, dtype=np.float32).reshape(3, 5))
    assert np.array_equal(_fill_stack(2.0), got + 1)  # a fresh frame per call


@numba.njit(cache=True)
def _mac_all(out, x, xbase, offs, wt, b, ntaps):
    # every (nq, nv) variant the kernels use, at row 1 / column 8 of out
    mac_taps(out, 1, 8, x, xbase, offs, wt, 2, b, ntaps, 4, 3)
    mac_taps(out, 6, 8, x, xbase, offs, wt, 2, b, ntaps, 1, 1)
    mac_taps(out, 8, 8, x, xbase, offs, wt, 2, b, ntaps, 2, 3)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("ntaps", [0, 1, 7])
def test_mac_taps_sums_every_tap_in_order(dtype, ntaps):
    rng = np.random.default_rng(ntaps)
    lanes = 32 // np.dtype(dtype).itemsize
    x = rng.standard_normal((3, 50)).astype(dtype)  # read through its flat data
    offs = rng.integers(0, 50, size=max(ntaps, 1)).astype(np.int64)[:ntaps]
    wt = rng.standard_normal((7, max(ntaps, 1))).astype(dtype)[:, :ntaps].copy()
    b = rng.standard_normal(7).astype(dtype)
    out = np.full((10, 8 + 3 * lanes + 5), -7, dtype)
    _mac_all(out, x, 40, offs, wt, b, ntaps)

    def want(k, width):
        acc = np.full(width, b[k], np.float64)
        for t in range(ntaps):  # one rounding per tap, in order: float64 sums match float32 to ~1e-6
            acc = acc + wt[k, t].astype(np.float64) * x.reshape(-1)[40 + offs[t]:40 + offs[t] + width]
        return acc

    tol = 1e-5 if dtype == np.float32 else 1e-12
    for q in range(4):
        np.testing.assert_allclose(out[1 + q, 8:8 + 3 * lanes], want(2 + q, 3 * lanes), rtol=tol, atol=tol)
    np.testing.assert_allclose(out[6, 8:8 + lanes], want(2, lanes), rtol=tol, atol=tol)
    for q in range(2):
        np.testing.assert_allclose(out[8 + q, 8:8 + 3 * lanes], want(2 + q, 3 * lanes), rtol=tol, atol=tol)
    # nothing outside the written blocks changes
    assert (out[:, :8] == -7).all() and (out[:, 8 + 3 * lanes:] == -7).all()
    assert (out[[0, 5, 7], :] == -7).all() and (out[6, 8 + lanes:] == -7).all()


def test_mac_taps_rejects_non_literal_block_sizes():
    @numba.njit
    def f(out, x, offs, wt, b, nq):
        mac_taps(out, 0, 0, x, 0, offs, wt, 0, b, 0, nq, 1)

    z = np.zeros((4, 8), np.float32)
    with pytest.raises(numba.core.errors.TypingError):
        f(z, z, np.zeros(0, np.int64), z, np.zeros(4, np.float32), 4)


@numba.njit(cache=True)
def _copy_at(d, doff, s, soff):
    copy_vector(d, doff, s, soff)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_copy_vector_copies_one_32_byte_vector(dtype):
    lanes = 32 // np.dtype(dtype).itemsize
    s = np.arange(3 * lanes, dtype=dtype) + 1
    d = np.zeros(3 * lanes, dtype)
    _copy_at(d, 3, s, 5)  # unaligned at both ends
    want = np.zeros(3 * lanes, dtype)
    want[3:3 + lanes] = s[5:5 + lanes]
    assert np.array_equal(d, want)


def test_copy_vector_rejects_mixed_dtypes():
    f = numba.njit(lambda d, s: copy_vector(d, 0, s, 0))
    with pytest.raises(numba.core.errors.TypingError):
        f(np.zeros(8, np.float32), np.zeros(8, np.float64))
