"""The direct algorithm's grad_weight with output channels as vector lanes (``direct/tap_rows.py``):
the NumPy reference over every one-group geometry, merged runs and row by row, non-finite inputs,
the same bits for any thread count, and the rule that picks it."""
import numba
import numpy as np
import pytest

import reference as ref
from conftest import GEOMETRIES, random_array
from fastconv import _validation as V
from fastconv._algorithms import direct
from fastconv._algorithms.direct import tap_rows

CASES = [(name, xs, ws, kw) for name, xs, ws, kw in GEOMETRIES if kw.get("groups", 1) == 1]
CASES += [("lenet5-c3", (9, 6, 14, 14), (16, 6, 5, 5), {}),
          ("lenet5-c1-same", (5, 1, 28, 28), (6, 1, 5, 5), {"padding": 2}),
          ("one-output", (3, 4, 8, 9), (1, 4, 3, 3), {"padding": 1}),
          ("odd-channels-dilated", (4, 3, 12, 11), (17, 3, 3, 2), {"dilation": (2, 3), "padding": (2, 1)}),
          ("wide-strided", (2, 2, 13, 30), (40, 2, 3, 3), {"stride": (2, 3), "padding": 1}),
          ("most-channels", (2, 3, 6, 7), (64, 3, 2, 2), {}),
          ("many-images", (19, 2, 5, 6), (5, 2, 3, 3), {"padding": 1})]


def _params(xs, ws, kw, dtype):
    return V.conv_params("test", xs, ws, np.dtype(dtype), kw.get("stride", 1), kw.get("padding", 0),
                         kw.get("dilation", 1), 1, None)


def _make(xs, ws, kw, dtype, seed=0):
    rng = np.random.default_rng(seed)
    x, w = random_array(rng, xs, dtype), random_array(rng, ws, dtype)
    gy = random_array(rng, ref.conv2d(x, w, **kw).shape, dtype)
    return x, gy


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_rows_grad_weight_matches_reference(case, dtype):
    _, xs, ws, kw = case
    p = _params(xs, ws, kw, dtype)
    assert direct._gw_by_rows(p) == (2 * ws[0] >= direct.VBYTES // np.dtype(dtype).itemsize)
    x, gy = _make(xs, ws, kw, dtype)
    got = direct._gw_rows(gy, x, p)
    want = ref.conv2d_grad_weight(gy.astype(np.float64), x.astype(np.float64), ws, **kw)
    assert got.shape == ws and got.dtype == dtype
    tol = 1e-11 if dtype == np.float64 else 2e-5
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol * np.abs(want).max())


@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
def test_rows_grad_weight_with_nonfinite_input(bad):
    # a stride-1 run over a whole image multiplies the columns between its rows by the gradient's
    # zeros: an input holding Inf must run row by row, or a finite weight gradient turns NaN
    xs, ws, kw = (6, 3, 9, 8), (4, 3, 3, 3), {"padding": 1}
    x, gy = _make(xs, ws, kw, np.float64, seed=2)
    x[4, 1, 2, 7] = bad
    got = direct._gw_rows(gy, x, _params(xs, ws, kw, np.float64))
    want = ref.conv2d_grad_weight(gy, x, ws, **kw)
    assert np.array_equal(np.isnan(got), np.isnan(want)) and np.array_equal(np.isinf(got), np.isinf(want))
    fin = np.isfinite(want)
    assert fin.any() and not fin.all()
    np.testing.assert_allclose(got[fin], want[fin], rtol=1e-12, atol=1e-12)


def test_rows_grad_weight_merged_and_row_by_row_agree(monkeypatch):
    # the same sums by both loops (a NaN in the gradient spreads the same way in both)
    xs, ws, kw = (7, 4, 10, 9), (12, 4, 3, 3), {"padding": 1}
    x, gy = _make(xs, ws, kw, np.float64, seed=5)
    gy[3, 2, 4, 4] = np.nan
    p = _params(xs, ws, kw, np.float64)
    merged = direct._gw_rows(gy, x, p)
    calls = []
    original = direct.grad_weight_rows
    monkeypatch.setattr(direct, "grad_weight_rows",
                        lambda *a: calls.append(a[8]) or original(*(a[:8] + (False,) + a[9:])))
    rows = direct._gw_rows(gy, x, p)
    assert calls == [True]  # the call asked for the merged run and got the row loop instead
    assert np.array_equal(np.isnan(merged), np.isnan(rows)) and np.isnan(merged).any()
    fin = np.isfinite(merged)
    np.testing.assert_allclose(merged[fin], rows[fin], rtol=1e-12, atol=1e-12)


@pytest.mark.boundscheck
def test_rows_grad_weight_bits_do_not_depend_on_threads():
    xs, ws, kw = (21, 3, 11, 10), (24, 3, 3, 3), {"padding": 1, "stride": (1, 2)}
    x, gy = _make(xs, ws, kw, np.float32, seed=7)
    p = _params(xs, ws, kw, np.float32)
    prev = numba.get_num_threads()
    try:
        out = []
        for t in sorted({1, numba.config.NUMBA_NUM_THREADS}):
            numba.set_num_threads(t)
            out.append(direct._gw_rows(gy, x, p))
    finally:
        numba.set_num_threads(prev)
    assert all(np.array_equal(out[0], o) for o in out[1:])


def test_rows_rule():
    lanes = tap_rows.MAX_VECTORS * direct.VBYTES // 4
    assert direct._gw_by_rows(_params((8, 6, 14, 14), (16, 6, 5, 5), {}, np.float32))  # lenet5-c3
    assert direct._gw_by_rows(_params((8, 64, 56, 56), (64, 64, 3, 3), {"padding": 1}, np.float32))
    assert direct._gw_by_rows(_params((2, 3, 8, 8), (lanes, 3, 3, 3), {}, np.float32))
    # more output channels than the loop keeps in registers, groups, depthwise, planes past L2
    assert not direct._gw_by_rows(_params((2, 3, 8, 8), (lanes + 1, 3, 3, 3), {}, np.float32))
    assert not direct._gw_by_rows(_params((2, 3, 8, 8), (lanes, 3, 3, 3), {}, np.float64))
    assert not direct._gw_by_rows(V.conv_params("t", (2, 4, 6, 6), (6, 2, 3, 3), np.dtype(np.float32), 1, 1, 1, 2,
                                                None))
    assert not direct._gw_by_rows(V.conv_params("t", (2, 4, 6, 6), (4, 1, 3, 3), np.dtype(np.float32), 1, 1, 1, 4,
                                                None))
    assert not direct._gw_by_rows(_params((8, 3, 224, 224), (64, 3, 7, 7), {"stride": 2, "padding": 3},
                                          np.float32))
    half = direct.VBYTES // 4 // 2  # fewer output channels than half a vector: the dot kernels
    assert direct._gw_by_rows(_params((8, 1, 28, 28), (half, 1, 5, 5), {"padding": 2}, np.float32))
    assert not direct._gw_by_rows(_params((8, 1, 28, 28), (half - 1, 1, 5, 5), {"padding": 2}, np.float32))
