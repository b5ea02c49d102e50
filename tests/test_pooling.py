"""max_pool2d, avg_pool2d and their backward functions against the NumPy reference, PyTorch and
finite differences."""
import numpy as np
import pytest

import fastconv
import reference as ref
from conftest import DTYPES, FD_RTOL, FD_STEP, assert_results, distinct_values, random_array

# (id, input shape, keyword arguments of max_pool2d)
MAX_CASES = [
    ("k2", (2, 3, 6, 6), {"kernel_size": 2}),
    ("n1-c1-overlap", (1, 1, 5, 5), {"kernel_size": 2, "stride": 1}),
    ("k1", (1, 2, 3, 4), {"kernel_size": 1}),
    ("k3-s2-p1", (2, 2, 7, 7), {"kernel_size": 3, "stride": 2, "padding": 1}),
    ("k3-s1-p1", (1, 2, 5, 6), {"kernel_size": 3, "stride": 1, "padding": 1}),
    ("asymmetric", (1, 3, 7, 5), {"kernel_size": (3, 2), "stride": (2, 1), "padding": (1, 0)}),
    ("kernel-eq-input", (2, 1, 4, 5), {"kernel_size": (4, 5)}),
    ("stride-gt-kernel", (1, 2, 9, 9), {"kernel_size": 2, "stride": 3}),
    ("dilation", (2, 2, 9, 8), {"kernel_size": 3, "stride": 1, "padding": 1, "dilation": 2}),
    ("dilation-asym", (1, 2, 9, 9), {"kernel_size": (2, 3), "stride": 2, "padding": 1, "dilation": (3, 2)}),
    ("ceil", (2, 2, 7, 6), {"kernel_size": 2, "ceil_mode": True}),
    ("ceil-pad", (1, 2, 6, 7), {"kernel_size": 3, "stride": 2, "padding": 1, "ceil_mode": True}),
    ("ceil-dilation", (1, 1, 8, 8), {"kernel_size": 2, "stride": 3, "dilation": 2, "ceil_mode": True}),
    ("ceil-stride-list", (1, 2, 5, 8), {"kernel_size": [3, 2], "stride": [2, 3], "ceil_mode": True}),
    # 16+ channels on short output rows: NCHW arrays through the channels_last kernels (pooling._via_cl)
    ("many-channels-k3-s1-p1", (2, 16, 5, 5), {"kernel_size": 3, "stride": 1, "padding": 1}),
    ("many-channels-k2", (1, 17, 8, 9), {"kernel_size": 2}),
    ("many-channels-ceil-dilation", (1, 16, 7, 7), {"kernel_size": 2, "stride": 2, "dilation": 2, "ceil_mode": True}),
]
MAX_IDS = [c[0] for c in MAX_CASES]

# (id, input shape, keyword arguments of avg_pool2d)
AVG_CASES = [
    ("k2", (2, 3, 6, 6), {"kernel_size": 2}),
    ("n1-c1-overlap", (1, 1, 5, 5), {"kernel_size": 2, "stride": 1}),
    ("k3-s2-p1", (2, 2, 7, 7), {"kernel_size": 3, "stride": 2, "padding": 1}),
    ("k3-s2-p1-exclude-pad", (2, 2, 7, 7), {"kernel_size": 3, "stride": 2, "padding": 1,
                                            "count_include_pad": False}),
    ("asymmetric", (1, 3, 7, 5), {"kernel_size": (3, 2), "stride": (2, 1), "padding": (1, 1)}),
    ("kernel-eq-input", (2, 1, 4, 5), {"kernel_size": (4, 5)}),
    ("stride-gt-kernel", (1, 2, 9, 9), {"kernel_size": 2, "stride": 3}),
    ("ceil", (2, 2, 7, 6), {"kernel_size": 2, "ceil_mode": True}),
    ("ceil-pad", (1, 2, 6, 7), {"kernel_size": 3, "stride": 2, "padding": 1, "ceil_mode": True}),
    ("ceil-pad-exclude-pad", (1, 2, 6, 7), {"kernel_size": 3, "stride": 2, "padding": 1,
                                            "ceil_mode": True, "count_include_pad": False}),
    ("ceil-k4-s3-p2", (1, 1, 8, 9), {"kernel_size": 4, "stride": 3, "padding": 2, "ceil_mode": True}),
    ("ceil-k4-s3-p2-exclude", (1, 1, 8, 9), {"kernel_size": 4, "stride": 3, "padding": 2,
                                             "ceil_mode": True, "count_include_pad": False}),
    # rows longer than a vector pair, through the separable kernels (column stride 1 and 2)
    ("wide-k5-s1-p2", (1, 1, 4, 37), {"kernel_size": 5, "stride": 1, "padding": 2}),
    ("wide-k4-s2-p2-exclude-ceil", (1, 1, 5, 38), {"kernel_size": 4, "stride": 2, "padding": 2,
                                                   "ceil_mode": True, "count_include_pad": False}),
    # 16+ channels on short output rows: NCHW arrays through the channels_last kernels (pooling._via_cl)
    ("many-channels-k3-s2-p1-exclude", (2, 16, 7, 7), {"kernel_size": 3, "stride": 2, "padding": 1,
                                                       "count_include_pad": False}),
    ("many-channels-ceil", (1, 20, 6, 7), {"kernel_size": 2, "ceil_mode": True}),
]
AVG_IDS = [c[0] for c in AVG_CASES]


def _max_out_shape(shape, kw):
    return ref.max_pool2d(np.zeros(shape), **kw)[0].shape


def _avg_out_shape(shape, kw):
    return ref.avg_pool2d(np.zeros(shape), **kw).shape


def _strided_copy(a):
    """A non-contiguous view (every other element along W of a wider array) with ``a``'s values."""
    big = np.zeros(a.shape[:3] + (2 * a.shape[3],), a.dtype)
    big[..., ::2] = a
    return big[..., ::2]


def _transposed_copy(a):
    """An F-ordered-planes view with ``a``'s values."""
    return np.ascontiguousarray(a.transpose(0, 1, 3, 2)).transpose(0, 1, 3, 2)


# --------------------------------------------------------------------------- max_pool2d
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", MAX_CASES, ids=MAX_IDS)
def test_max_pool_matches_reference(case, dtype):
    _, shape, kw = case
    x = random_array(np.random.default_rng(0), shape, dtype)
    y, idx = fastconv.max_pool2d(x, **kw, return_indices=True)
    y_ref, idx_ref = ref.max_pool2d(x, **kw)
    assert y.shape == y_ref.shape and y.dtype == dtype
    assert idx.shape == y_ref.shape and idx.dtype == np.int64
    np.testing.assert_array_equal(y, y_ref)  # a maximum is one of the inputs: exact
    np.testing.assert_array_equal(idx, idx_ref)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", MAX_CASES, ids=MAX_IDS)
def test_max_pool_matches_torch(torch, case, dtype):
    _, shape, kw = case
    x = random_array(np.random.default_rng(1), shape, dtype)
    y, idx = fastconv.max_pool2d(x, **kw, return_indices=True)
    ty, tidx = torch.nn.functional.max_pool2d(torch.tensor(x), **kw, return_indices=True)
    assert y.shape == tuple(ty.shape) and y.dtype == dtype
    np.testing.assert_array_equal(y, ty.numpy())
    np.testing.assert_array_equal(idx, tidx.numpy())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", MAX_CASES, ids=MAX_IDS)
def test_max_pool_backward_matches_reference_and_torch(case, dtype):
    _, shape, kw = case
    rng = np.random.default_rng(2)
    x = distinct_values(rng, shape, dtype)
    y, idx = fastconv.max_pool2d(x, **kw, return_indices=True)
    gy = random_array(rng, y.shape, dtype)
    gx = fastconv.max_pool2d_backward(gy, idx, x.shape)
    assert_results({"grad_input": gx}, {"grad_input": ref.max_pool2d_backward(gy, ref.max_pool2d(x, **kw)[1],
                                                                            x.shape)}, dtype)
    torch = pytest.importorskip("torch")
    tx = torch.tensor(x, requires_grad=True)
    torch.nn.functional.max_pool2d(tx, **kw).backward(torch.tensor(gy))
    assert_results({"grad_input": gx}, {"grad_input": tx.grad.numpy()}, dtype)


@pytest.mark.parametrize("case", MAX_CASES, ids=MAX_IDS)
def test_max_pool_backward_matches_finite_differences(case):
    # tie-free input with gaps of 1/size >> step: the argmax stays put, the function is linear
    _, shape, kw = case
    rng = np.random.default_rng(3)
    x = distinct_values(rng, shape)
    y, idx = fastconv.max_pool2d(x, **kw, return_indices=True)
    gy = rng.standard_normal(y.shape)
    v = rng.standard_normal(shape)

    def loss(a):
        return float(np.vdot(fastconv.max_pool2d(a, **kw), gy))

    numeric = (loss(x + FD_STEP * v) - loss(x - FD_STEP * v)) / (2 * FD_STEP)
    analytic = float(np.vdot(fastconv.max_pool2d_backward(gy, idx, shape), v))
    assert analytic == pytest.approx(numeric, rel=FD_RTOL, abs=FD_RTOL)


def _nan_input(dtype):
    x = random_array(np.random.default_rng(4), (2, 2, 6, 7), dtype)
    x[0, 0, 0, 0] = np.nan              # NaN first in its window
    x[0, 1, 2, 3] = np.nan              # NaN in overlapping windows
    x[1, 0, 4, 4] = x[1, 0, 4, 6] = np.nan  # two NaNs in one window: the last one is indexed
    x[1, 1, 1, :] = np.inf
    x[1, 1, 2:4, 0:2] = -np.inf         # a 2x2 window of -inf only
    x[1, 1, 5, 5] = np.nan
    return x


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kw", [{"kernel_size": 2}, {"kernel_size": 3, "stride": 1, "padding": 1},
                                {"kernel_size": 3, "stride": 2, "ceil_mode": True}], ids=["k2", "k3-s1-p1", "k3-ceil"])
def test_max_pool_propagates_nan_like_torch(kw, dtype):
    x = _nan_input(dtype)
    y, idx = fastconv.max_pool2d(x, **kw, return_indices=True)
    y_ref, idx_ref = ref.max_pool2d(x, **kw)
    assert np.isnan(y).any()
    np.testing.assert_array_equal(y, y_ref)  # NaNs in the same places
    np.testing.assert_array_equal(idx, idx_ref)
    torch = pytest.importorskip("torch")
    ty, tidx = torch.nn.functional.max_pool2d(torch.tensor(x), **kw, return_indices=True)
    np.testing.assert_array_equal(y, ty.numpy())
    np.testing.assert_array_equal(idx, tidx.numpy())


@pytest.mark.parametrize("dtype", DTYPES)
def test_max_pool_ties_index_the_first_element(dtype):
    x = np.ones((1, 2, 5, 5), dtype)
    y, idx = fastconv.max_pool2d(x, 3, stride=2, padding=1, return_indices=True)
    y_ref, idx_ref = ref.max_pool2d(x, 3, stride=2, padding=1)
    np.testing.assert_array_equal(y, y_ref)
    np.testing.assert_array_equal(idx, idx_ref)
    assert idx[0, 0, 0, 0] == 0 and idx[0, 0, 1, 1] == 1 * 5 + 1


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kw", [
    {"kernel_size": 2}, {"kernel_size": 3, "stride": 2, "padding": 1}, {"kernel_size": 3, "stride": 1},
    {"kernel_size": (2, 4), "stride": (1, 3), "padding": (1, 2), "dilation": (2, 1), "ceil_mode": True},
    {"kernel_size": 3, "stride": 2, "dilation": 3, "padding": 1},
], ids=["k2", "k3-s2-p1", "k3-s1", "asym-dil-ceil", "dil3"])
def test_max_pool_wide_rows_with_ties_nan_and_inf(kw, dtype):
    # rows of 20-70 outputs take the vector runs (and their rounding-up); small integers make ties
    rng = np.random.default_rng(7)
    x = rng.integers(-3, 4, (2, 3, 41, 141)).astype(dtype)
    x[0, 0, rng.integers(0, 41, 30), rng.integers(0, 141, 30)] = np.nan
    x[1, 1, rng.integers(0, 41, 30), rng.integers(0, 141, 30)] = np.inf
    x[1, 2, rng.integers(0, 41, 30), rng.integers(0, 141, 30)] = -np.inf
    y, idx = fastconv.max_pool2d(x, **kw, return_indices=True)
    y_ref, idx_ref = ref.max_pool2d(x, **kw)
    np.testing.assert_array_equal(y, y_ref)
    np.testing.assert_array_equal(idx, idx_ref)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 2, 28, 28), (1, 2, 9, 11), (2, 1, 7, 130), (1, 1, 2, 2), (1, 3, 30, 17)],
                         ids=["lenet", "odd", "wide-odd", "one-window", "narrow-odd"])
@pytest.mark.parametrize("ceil_mode", [False, True])
def test_max_pool_2x2_path_matches_generic_kernel(shape, ceil_mode, dtype, monkeypatch):
    # the 2x2/stride-2 kernel (narrow rows through scratch, wide rows direct) against the generic
    # kernel and the reference: same values and indices with ties, NaN and +-Inf
    from fastconv._algorithms import pooling
    rng = np.random.default_rng(11)
    x = rng.integers(-3, 4, shape).astype(dtype)
    flat = x.reshape(-1)
    for v in (np.nan, np.inf, -np.inf):
        flat[rng.integers(0, flat.size, max(1, flat.size // 50))] = v
    p = fastconv._validation.pool_params("t", x.shape, 2, 2, 0, 1, ceil_mode)
    assert pooling._is_2x2(p) == (2 * p.oh <= shape[2] and 2 * p.ow <= shape[3])
    y, idx = fastconv.max_pool2d(x, 2, ceil_mode=ceil_mode, return_indices=True)
    monkeypatch.setattr(pooling, "_is_2x2", lambda p: False)
    y2, idx2 = fastconv.max_pool2d(x, 2, ceil_mode=ceil_mode, return_indices=True)
    np.testing.assert_array_equal(y, y2)
    np.testing.assert_array_equal(idx, idx2)
    y_ref, idx_ref = ref.max_pool2d(x, 2, ceil_mode=ceil_mode)
    np.testing.assert_array_equal(y, y_ref)
    np.testing.assert_array_equal(idx, idx_ref)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,kh,kw,sh,sw,ph,pw", [
    ((2, 3, 112, 112), 3, 3, 2, 2, 1, 1),   # ResNet's stem pool, shrunk in batch
    ((1, 2, 9, 11), 3, 3, 2, 2, 1, 0),      # odd sizes, no column padding
    ((1, 1, 5, 4), 2, 3, 1, 2, 0, 1),       # 2-row windows, row stride 1, even width
    ((2, 1, 3, 3), 3, 3, 3, 2, 1, 1),       # one window per column and row, clipped on every side
    ((1, 2, 17, 70), 4, 3, 3, 2, 2, 1),     # wider than a vector pair, row stride 3
    ((1, 1, 1, 1), 1, 3, 1, 2, 0, 1),       # a single element
    ((2, 2, 20, 37), 5, 5, 1, 1, 2, 2),     # YOLO's SPPF pool (5x5/s1/p2)
    ((1, 3, 9, 40), 3, 3, 1, 1, 1, 1),      # 3x3/s1/p1
    ((1, 2, 8, 6), 2, 4, 2, 1, 1, 2),       # even width at stride 1, padding half the window
    ((1, 1, 4, 3), 1, 3, 1, 1, 0, 1),       # narrower than a vector
], ids=["resnet", "odd", "kh2", "clipped", "wide", "single", "sppf", "s1", "even-s1", "narrow-s1"])
@pytest.mark.parametrize("ceil_mode", [False, True])
def test_max_pool_separable_path_matches_generic_kernel(shape, kh, kw, sh, sw, ph, pw, ceil_mode, dtype,
                                                        monkeypatch):
    # the separable kernel (stride-1 rows, or 3-wide windows at column stride 2) against the
    # generic kernel and the reference
    from fastconv._algorithms import pooling
    monkeypatch.setattr(pooling, "_is_3x3", lambda p: False)  # 3x3 windows have a kernel of their own
    _check_fast_max_pool(shape, (kh, kw), (sh, sw), (ph, pw), ceil_mode, dtype, 12, "_is_separable", monkeypatch)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,sh,sw,ph,pw", [
    ((2, 3, 112, 112), 2, 2, 1, 1),   # ResNet's stem pool, shrunk in batch
    ((1, 2, 9, 11), 2, 2, 1, 0),      # odd sizes, no column padding
    ((2, 1, 3, 3), 3, 2, 1, 1),       # one window per column and row, clipped on every side
    ((1, 3, 9, 40), 1, 1, 1, 1),      # 3x3/s1/p1
    ((1, 2, 17, 70), 3, 3, 0, 1),     # stride 3: a run-time column stride
    ((1, 1, 2, 2), 1, 1, 1, 1),       # smaller than the window: no interior output
    ((1, 2, 5, 33), 1, 2, 0, 1),      # column stride only
    ((1, 2, 12, 71), 2, 2, 1, 0),     # odd width, runs past a vector with a remainder
    ((2, 1, 10, 40), 1, 2, 1, 0),     # row stride 1 at column stride 2: each split row used three times
], ids=["resnet", "odd", "clipped", "s1", "s3", "tiny", "col-stride", "wide", "s1-rows"])
@pytest.mark.parametrize("ceil_mode", [False, True])
def test_max_pool_3x3_kernel_matches_generic_kernel(shape, sh, sw, ph, pw, ceil_mode, dtype, monkeypatch):
    # 3x3 windows (interior rows unrolled, clipped windows scanned) against the generic kernel and
    # the reference
    from fastconv._algorithms import pooling
    monkeypatch.setattr(pooling, "_is_separable", lambda p: False)  # the fallback: the generic kernel
    _check_fast_max_pool(shape, (3, 3), (sh, sw), (ph, pw), ceil_mode, dtype, 13, "_is_3x3", monkeypatch)


def _check_fast_max_pool(shape, k, st, pad, ceil_mode, dtype, seed, rule, monkeypatch):
    # the kernel that pooling.<rule> selects against the generic kernel (rule patched off) and the
    # reference: same values and indices with ties, NaN and +-Inf, and a row of -Inf only (its index
    # must be its first in-bounds element, not a padded one)
    from fastconv._algorithms import pooling
    rng = np.random.default_rng(seed)
    x = rng.integers(-3, 4, shape).astype(dtype)
    flat = x.reshape(-1)
    for v in (np.nan, np.inf, -np.inf):
        flat[rng.integers(0, flat.size, max(1, flat.size // 50))] = v
    x[0, 0, 0] = -np.inf
    kw_ = dict(kernel_size=k, stride=st, padding=pad, ceil_mode=ceil_mode)
    assert getattr(pooling, rule)(fastconv._validation.pool_params("t", x.shape, k, st, pad, 1, ceil_mode))
    y, idx = fastconv.max_pool2d(x, **kw_, return_indices=True)
    monkeypatch.setattr(pooling, rule, lambda p: False)
    y2, idx2 = fastconv.max_pool2d(x, **kw_, return_indices=True)
    np.testing.assert_array_equal(y, y2)
    np.testing.assert_array_equal(idx, idx2)
    y_ref, idx_ref = ref.max_pool2d(x, **kw_)
    np.testing.assert_array_equal(y, y_ref)
    np.testing.assert_array_equal(idx, idx_ref)


def test_max_pool_window_entirely_outside_the_input_like_torch(torch):
    # dilation 3 with padding 1 puts both taps of the only window outside a 2x2 input
    x = np.arange(4.0).reshape(1, 1, 2, 2)
    y, idx = fastconv.max_pool2d(x, 2, stride=1, padding=1, dilation=3, return_indices=True)
    ty, tidx = torch.nn.functional.max_pool2d(torch.tensor(x), 2, stride=1, padding=1, dilation=3,
                                              return_indices=True)
    np.testing.assert_array_equal(y, ty.numpy())
    np.testing.assert_array_equal(idx, tidx.numpy())


def test_max_pool_without_indices_returns_only_values():
    x = random_array(np.random.default_rng(5), (1, 2, 4, 4), np.float32)
    y = fastconv.max_pool2d(x, 2)
    assert isinstance(y, np.ndarray)
    np.testing.assert_array_equal(y, fastconv.max_pool2d(x, 2, return_indices=True)[0])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("view", [_strided_copy, _transposed_copy], ids=["strided", "transposed"])
def test_max_pool_non_contiguous_and_read_only(view, dtype):
    kw = {"kernel_size": 3, "stride": 2, "padding": 1}
    rng = np.random.default_rng(6)
    x = distinct_values(rng, (2, 2, 7, 6), dtype)
    y_ref, idx_ref = ref.max_pool2d(x, **kw)
    gy = random_array(rng, y_ref.shape, dtype)
    gx_ref = ref.max_pool2d_backward(gy, idx_ref, x.shape)
    xv, gyv, idxv = view(x), view(gy), view(idx_ref)
    assert not (xv.flags.c_contiguous or gyv.flags.c_contiguous or idxv.flags.c_contiguous)
    for read_only in (False, True):
        for a in (xv, gyv, idxv):
            a.setflags(write=not read_only)
        y, idx = fastconv.max_pool2d(xv, **kw, return_indices=True)
        np.testing.assert_array_equal(y, y_ref)
        np.testing.assert_array_equal(idx, idx_ref)
        assert_results({"grad_input": fastconv.max_pool2d_backward(gyv, idxv, x.shape)},
                       {"grad_input": gx_ref}, dtype)


def test_max_pool_does_not_modify_inputs():
    rng = np.random.default_rng(7)
    x = distinct_values(rng, (2, 2, 6, 6), np.float32)
    xv = _transposed_copy(x)
    y, idx = fastconv.max_pool2d(xv, 3, stride=1, padding=1, return_indices=True)
    gy = random_array(rng, y.shape, np.float32)
    copies = [a.copy() for a in (x, xv, gy, idx)]
    fastconv.max_pool2d(x, 3, stride=1, padding=1, return_indices=True)
    fastconv.max_pool2d_backward(gy, idx, x.shape)
    for a, a0 in zip((x, xv, gy, idx), copies):
        np.testing.assert_array_equal(a, a0)


@pytest.mark.parametrize("idx_dtype", [np.int32, np.int64, np.uint16])
def test_max_pool_backward_accepts_integer_index_dtypes(idx_dtype):
    rng = np.random.default_rng(8)
    x = distinct_values(rng, (1, 2, 4, 4))
    _, idx = fastconv.max_pool2d(x, 2, return_indices=True)
    gy = rng.standard_normal((1, 2, 2, 2))
    gx = fastconv.max_pool2d_backward(gy, idx.astype(idx_dtype), x.shape)
    np.testing.assert_array_equal(gx, ref.max_pool2d_backward(gy, idx, x.shape))


@pytest.mark.parametrize("bad", [-1, 16, 10**6])
def test_max_pool_backward_rejects_out_of_range_indices(bad):
    gy = np.ones((1, 2, 2, 2))
    idx = np.zeros((1, 2, 2, 2), np.int64)
    idx[0, 1, 1, 0] = bad
    with pytest.raises(ValueError, match=r"max_pool2d_backward: indices must lie in \[0, H\*W\) = \[0, 16\)"):
        fastconv.max_pool2d_backward(gy, idx, (1, 2, 4, 4))


@pytest.mark.parametrize("dtype", DTYPES)
def test_max_pool_empty_batch(dtype):
    x = np.zeros((0, 3, 6, 5), dtype)
    y, idx = fastconv.max_pool2d(x, 3, stride=2, padding=1, return_indices=True)
    assert y.shape == idx.shape == (0, 3, 3, 3) and y.dtype == dtype
    gx = fastconv.max_pool2d_backward(y, idx, x.shape)
    assert gx.shape == x.shape and gx.dtype == dtype


# --------------------------------------------------------------------------- avg_pool2d
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", AVG_CASES, ids=AVG_IDS)
def test_avg_pool_matches_reference(case, dtype):
    _, shape, kw = case
    rng = np.random.default_rng(10)
    x = random_array(rng, shape, dtype)
    gy = random_array(rng, _avg_out_shape(shape, kw), dtype)
    got = {"forward": fastconv.avg_pool2d(x, **kw),
           "grad_input": fastconv.avg_pool2d_backward(gy, x.shape, **kw)}
    want = {"forward": ref.avg_pool2d(x, **kw), "grad_input": ref.avg_pool2d_backward(gy, x.shape, **kw)}
    assert_results(got, want, dtype)


@pytest.mark.parametrize("shape,k,s,p,ceil,include_pad,override", [
    ((2, 3, 9, 70), (3, 3), (2, 2), (1, 1), False, True, 0),
    ((1, 2, 8, 33), (5, 5), (1, 1), (2, 2), True, False, 0),
    ((1, 2, 7, 20), (2, 4), (3, 2), (1, 2), True, True, 3),
    ((2, 1, 5, 1), (3, 1), (1, 2), (1, 0), True, False, 0),
    ((1, 1, 3, 4), (3, 4), (2, 1), (1, 2), True, False, 0),
], ids=["resnet-like", "sppf-ceil", "override", "one-column", "windows-in-padding"])
def test_avg_pool_separable_kernels_match_the_per_window_kernels(shape, k, s, p, ceil, include_pad, override):
    # column stride 1 and 2 run the separable kernels (row sums, then sums of rows): the same
    # values as the per-window kernels to rounding, windows clipped or in the padding included
    from fastconv._algorithms import _pooling_kernels as K
    rng = np.random.default_rng(21)
    x = rng.standard_normal(shape)
    prm = fastconv._validation.pool_params("t", shape, k, s, p, 1, ceil)
    y1, y2 = (np.full((shape[0] * shape[1], prm.oh, prm.ow), np.nan) for _ in range(2))
    args = (prm.kh, prm.kw, prm.sh, prm.sw, prm.ph, prm.pw, include_pad, override)
    K._avg_forward_sep(x.reshape(-1, *shape[2:]), y1, *args, 0.0)
    K._avg_forward(x.reshape(-1, *shape[2:]), y2, *args, 0.0)
    np.testing.assert_allclose(y1, y2, rtol=1e-13, atol=1e-13)
    gy = rng.standard_normal(y1.shape)
    g1 = np.full((shape[0] * shape[1], *shape[2:]), np.nan)  # every element written
    g2 = np.zeros_like(g1)
    K._avg_backward_sep(gy, g1, *args)
    K._avg_backward(gy, g2, *args)
    np.testing.assert_allclose(g1, g2, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", AVG_CASES, ids=AVG_IDS)
def test_avg_pool_matches_torch(torch, case, dtype):
    _, shape, kw = case
    rng = np.random.default_rng(11)
    x = random_array(rng, shape, dtype)
    gy = random_array(rng, _avg_out_shape(shape, kw), dtype)
    tx = torch.tensor(x, requires_grad=True)
    ty = torch.nn.functional.avg_pool2d(tx, **kw)
    ty.backward(torch.tensor(gy))
    got = {"forward": fastconv.avg_pool2d(x, **kw),
           "grad_input": fastconv.avg_pool2d_backward(gy, x.shape, **kw)}
    assert_results(got, {"forward": ty.detach().numpy(), "grad_input": tx.grad.numpy()}, dtype)


@pytest.mark.parametrize("case", AVG_CASES, ids=AVG_IDS)
def test_avg_pool_backward_matches_finite_differences(case):
    _, shape, kw = case
    rng = np.random.default_rng(12)
    x = rng.standard_normal(shape)
    gy = rng.standard_normal(_avg_out_shape(shape, kw))
    v = rng.standard_normal(shape)

    def loss(a):
        return float(np.vdot(fastconv.avg_pool2d(a, **kw), gy))

    numeric = (loss(x + FD_STEP * v) - loss(x - FD_STEP * v)) / (2 * FD_STEP)
    analytic = float(np.vdot(fastconv.avg_pool2d_backward(gy, shape, **kw), v))
    assert analytic == pytest.approx(numeric, rel=FD_RTOL, abs=FD_RTOL)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("view", [_strided_copy, _transposed_copy], ids=["strided", "transposed"])
def test_avg_pool_non_contiguous_and_read_only(view, dtype):
    kw = {"kernel_size": 3, "stride": 2, "padding": 1, "count_include_pad": False}
    rng = np.random.default_rng(13)
    x = random_array(rng, (2, 2, 7, 6), dtype)
    gy = random_array(rng, _avg_out_shape(x.shape, kw), dtype)
    want = {"forward": ref.avg_pool2d(x, **kw), "grad_input": ref.avg_pool2d_backward(gy, x.shape, **kw)}
    xv, gyv = view(x), view(gy)
    assert not (xv.flags.c_contiguous or gyv.flags.c_contiguous)
    for read_only in (False, True):
        for a in (xv, gyv):
            a.setflags(write=not read_only)
        got = {"forward": fastconv.avg_pool2d(xv, **kw),
               "grad_input": fastconv.avg_pool2d_backward(gyv, x.shape, **kw)}
        assert_results(got, want, dtype)


def test_avg_pool_does_not_modify_inputs():
    rng = np.random.default_rng(14)
    x = random_array(rng, (2, 2, 6, 6), np.float64)
    gy = random_array(rng, (2, 2, 6, 6), np.float64)
    copies = [x.copy(), gy.copy()]
    fastconv.avg_pool2d(x, 3, stride=1, padding=1)
    fastconv.avg_pool2d_backward(gy, x.shape, 3, stride=1, padding=1)
    np.testing.assert_array_equal(x, copies[0])
    np.testing.assert_array_equal(gy, copies[1])


@pytest.mark.parametrize("dtype", DTYPES)
def test_avg_pool_propagates_nan(dtype):
    x = np.zeros((1, 1, 4, 4), dtype)
    x[0, 0, 0, 0] = np.nan
    y = fastconv.avg_pool2d(x, 2)
    assert np.isnan(y[0, 0, 0, 0]) and not np.isnan(y[0, 0, 1:, :]).any() and not np.isnan(y[0, 0, :, 1:]).any()


@pytest.mark.parametrize("dtype", DTYPES)
def test_avg_pool_empty_batch(dtype):
    x = np.zeros((0, 3, 6, 5), dtype)
    y = fastconv.avg_pool2d(x, 2)
    assert y.shape == (0, 3, 3, 2) and y.dtype == dtype
    gx = fastconv.avg_pool2d_backward(y, x.shape, 2)
    assert gx.shape == x.shape and gx.dtype == dtype


@pytest.mark.parametrize("dtype", DTYPES)
def test_pool_results_are_deterministic(dtype):
    rng = np.random.default_rng(15)
    x = random_array(rng, (3, 4, 9, 9), dtype)
    y1, i1 = fastconv.max_pool2d(x, 3, stride=2, padding=1, return_indices=True)
    y2, i2 = fastconv.max_pool2d(x, 3, stride=2, padding=1, return_indices=True)
    assert y1.tobytes() == y2.tobytes() and i1.tobytes() == i2.tobytes()
    a1 = fastconv.avg_pool2d_backward(y1, x.shape, 3, stride=2, padding=1)
    a2 = fastconv.avg_pool2d_backward(y1, x.shape, 3, stride=2, padding=1)
    assert a1.tobytes() == a2.tobytes()


@pytest.mark.parametrize("layout", ["nchw", "cl"])
def test_large_pool_results_use_kept_memory_without_clobbering_live_ones(layout):
    # results of >= 1 MiB come from _config.result's kept buffers (a fresh 51 MB grad_input was
    # faulted in on every call: vgg16-pool's backward 14.5 ms against 4.9): a freed result's
    # buffer is reused, a live one never is
    from fastconv import _config

    rng = np.random.default_rng(16)
    x = random_array(rng, (2, 16, 128, 96), np.float32)  # grad_input 1.5 MiB
    if layout == "cl":
        x = np.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    y, idx = fastconv.max_pool2d(x, 2, return_indices=True)
    gy1 = random_array(rng, y.shape, np.float32)
    gy2 = gy1 + 1
    g1 = fastconv.max_pool2d_backward(gy1, idx, x.shape)
    keep = g1.copy()
    g2 = fastconv.max_pool2d_backward(gy2, idx, x.shape)
    assert not np.shares_memory(g1, g2)
    np.testing.assert_array_equal(g1, keep)  # the live result was not written over
    assert g2.sum() == pytest.approx(float(keep.sum()) + gy1.size, rel=1e-4)
    raw = [b.ctypes.data for b in _config._results if np.shares_memory(b, g1)]
    assert len(raw) == 1  # made from a kept buffer
    del g1, keep
    g3 = fastconv.max_pool2d_backward(gy1, idx, x.shape)
    assert [b.ctypes.data for b in _config._results if np.shares_memory(b, g3)] == raw  # reused once freed


@pytest.mark.parametrize("dtype", DTYPES)
def test_nchw_small_planes_via_channels_last_match_the_nchw_kernels(dtype, monkeypatch):
    # 16+ channels on short output rows run the channels_last kernels on a transposed copy: the same
    # values and indices as the NCHW kernels, returned C-contiguous in NCHW; the rule's edges
    from fastconv._algorithms import pooling
    rng = np.random.default_rng(5)
    x = random_array(rng, (3, 24, 9, 10), dtype)
    monkeypatch.setattr(pooling, "NCHW_VIA_CL_2X2_MIN", 0)  # the 2x2 kernel's route too, on a small tensor
    calls = []
    real = pooling._max_forward_cl
    monkeypatch.setattr(pooling, "_max_forward_cl", lambda *a: calls.append(1) or real(*a))
    runs = [lambda: fastconv.max_pool2d(x, 3, 2, 1, return_indices=True),
            lambda: fastconv.max_pool2d(x, 2, return_indices=True),
            lambda: (fastconv.avg_pool2d(x, 3, 1, 1, count_include_pad=False),),
            lambda: (fastconv.avg_pool2d(x, 2, 2, 0, divisor_override=3),)]
    via = [f() for f in runs]
    gy = random_array(rng, via[2][0].shape, dtype)
    gx_via = fastconv.avg_pool2d_backward(gy, x.shape, 3, 1, 1, count_include_pad=False)
    assert len(calls) == 2
    for out in via:
        assert all(a.flags.c_contiguous for a in out)
    monkeypatch.setattr(pooling, "NCHW_VIA_CL_MAX_COLS", {"max2x2": 0, "max": 0, "avg": 0})
    nchw = [f() for f in runs]
    assert len(calls) == 2
    for a, b in zip(via, nchw):
        for u, v in zip(a, b):
            if u.dtype.kind == "i":
                np.testing.assert_array_equal(u, v)
            else:
                np.testing.assert_allclose(u, v, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(gx_via, fastconv.avg_pool2d_backward(gy, x.shape, 3, 1, 1, count_include_pad=False),
                               rtol=1e-6, atol=1e-6)
    monkeypatch.undo()
    p = fastconv._validation.pool_params("t", (2, 16, 16, 16), (2, 2), (2, 2), (0, 0), 1, False)
    assert not pooling._via_cl(np.zeros((2, 16, 16, 16)), p, "max")  # 8 output columns: the 2x2 kernel
    p6 = fastconv._validation.pool_params("t", (32, 16, 12, 12), (2, 2), (2, 2), (0, 0), 1, False)
    assert not pooling._via_cl(np.zeros((32, 16, 12, 12)), p6, "max")  # 6 columns, but a small tensor
    p6 = fastconv._validation.pool_params("t", (32, 64, 12, 12), (2, 2), (2, 2), (0, 0), 1, False)
    assert pooling._via_cl(np.zeros((32, 64, 12, 12)), p6, "max")
    assert pooling._via_cl(np.zeros((2, 16, 16, 16)), p, "avg")
    p15 = fastconv._validation.pool_params("t", (2, 15, 16, 16), (2, 2), (2, 2), (0, 0), 1, False)
    assert not pooling._via_cl(np.zeros((2, 15, 16, 16)), p15, "avg")  # 15 channels
