"""fastconv._algorithms.common: the shared work-item counter."""
import numba
import numpy as np
import pytest
from numba import prange

import fastconv
from fastconv._algorithms.common import claim, stack_rows


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
