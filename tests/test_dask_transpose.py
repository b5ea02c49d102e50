"""fastconv.dask.conv_transpose2d against fastconv.conv_transpose2d for many chunkings (hypothesis
under the project's derandomized profile, the synchronous scheduler), explicit edge cases, laziness,
meta, output chunks and errors."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

da = pytest.importorskip("dask.array")

import fastconv  # noqa: E402
import fastconv.dask as fd  # noqa: E402
from conftest import ALGORITHMS, DTYPES, float32_error  # noqa: E402
from dask_strategies import chunks_of, pairs, poisoned  # noqa: E402
from fastconv.dask import _transpose  # noqa: E402

SYNC = {"scheduler": "sync"}
FEW = settings(max_examples=30)


def same(got, want):
    assert got.shape == want.shape and got.dtype == want.dtype
    np.testing.assert_array_equal(got, want)


# --------------------------------------------------------------------------- equality
@FEW
@given(n=st.integers(1, 2), cin=st.integers(1, 4), cout_g=st.integers(1, 3), hw=pairs(1, 11), ks=pairs(1, 4),
       stride=pairs(1, 3), dilation=pairs(1, 3), padding=pairs(0, 3), bias=st.booleans(),
       dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**16), data=st.data())
def test_direct_bitwise(n, cin, cout_g, hw, ks, stride, dilation, padding, bias, dtype, seed, data):
    groups = data.draw(st.sampled_from([g for g in (1, 2, cin) if cin % g == 0]))
    output_padding = tuple(data.draw(st.integers(0, max(s, d) - 1)) for s, d in zip(stride, dilation))
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, cin) + hw).astype(dtype)
    w = rng.standard_normal((cin, cout_g) + ks).astype(dtype)
    b = rng.standard_normal(cout_g * groups).astype(dtype) if bias else None
    chunks = tuple(data.draw(chunks_of(d)) for d in x.shape)
    kw = dict(stride=stride, padding=padding, output_padding=output_padding, groups=groups, dilation=dilation,
              algorithm="direct")
    try:
        want = fastconv.conv_transpose2d(x, w, b, **kw)
    except ValueError:  # an output size below one: the dask op must refuse it too
        with pytest.raises(ValueError):
            fd.conv_transpose2d(da.from_array(x, chunks=chunks), w, b, **kw)
        return
    y = fd.conv_transpose2d(da.from_array(x, chunks=chunks), w, b, **kw)
    assert y.shape == want.shape and y.dtype == want.dtype and y.chunks[0] == chunks[0]
    same(y.compute(**SYNC), want)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name, x_shape, w_shape, kw, chunks", [
    # every chunk one row/column: smaller than the kernel's 9-row extent and than the stride
    ("chunks-of-one", (1, 2, 9, 7), (2, 3, 5, 5), dict(stride=3, padding=4, dilation=2, output_padding=1), 1),
    # stride beyond the kernel: output rows no input reaches are zeros (plus the bias)
    ("stride-gt-kernel", (2, 2, 6, 5), (2, 2, 2, 1), dict(stride=(4, 3), output_padding=(3, 2)), (1, 2, 4, 2)),
    # output_padding of a stride or more (allowed below the dilation): rows past the last input's reach
    ("output-padding-ge-stride", (1, 2, 7, 6), (2, 2, 2, 2), dict(stride=1, dilation=3, output_padding=2),
     (1, 1, (3, 4), (5, 1))),
    ("uneven-stride2", (3, 4, 13, 11), (4, 2, 3, 3), dict(stride=2, padding=1, output_padding=1), (2, 4, 5, 4)),
    ("groups", (2, 4, 8, 8), (4, 3, 3, 3), dict(groups=2, stride=2, padding=1), (1, 3, 3, (2, 6))),
    ("depthwise", (2, 3, 8, 9), (3, 1, 3, 3), dict(groups=3, stride=2, padding=1, dilation=2), (1, 2, 3, 4)),
    ("one-row-input", (2, 2, 1, 6), (2, 2, 3, 2), dict(stride=5), (1, 2, 1, 2)),
    # one-row windows of a stride above the kernel's extent: fastconv would clamp their stride and
    # sum the W taps in another order (4e-16 off in float64) unless the block keeps the stride
    ("one-row-windows-stride3", (2, 1, 5, 11), (1, 1, 1, 3), dict(stride=(3, 1), padding=1, output_padding=(1, 0)),
     (1, 1, (2, 3), (3, 5, 3))),
    ("padding-crops-all-but-one", (1, 1, 5, 5), (1, 1, 3, 3), dict(stride=3, padding=6), (1, 1, 2, 3)),
])
def test_direct_edge_cases(name, x_shape, w_shape, kw, chunks, dtype):
    rng = np.random.default_rng(7)
    x = rng.standard_normal(x_shape).astype(dtype)
    w = rng.standard_normal(w_shape).astype(dtype)
    b = rng.standard_normal(w_shape[1] * kw.get("groups", 1)).astype(dtype)
    want = fastconv.conv_transpose2d(x, w, b, algorithm="direct", **kw)
    got = fd.conv_transpose2d(da.from_array(x, chunks=chunks), w, b, algorithm="direct", **kw)
    same(got.compute(**SYNC), want)


@pytest.mark.parametrize("dtype", DTYPES)
def test_direct_per_image_path_within_rounding(dtype):
    """direct's stride-1 pass runs image by image (another summation order) for 16 or more (image,
    group) items of small planes (unpadded: the conv2d it transposes has a smaller output than
    input): the whole batch of 32 x 3 groups does, its blocks of 4 x 3 do not."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((32, 6, 12, 12)).astype(dtype)
    w = rng.standard_normal((6, 1, 3, 3)).astype(dtype)
    kw = dict(groups=3, algorithm="direct")
    want = fastconv.conv_transpose2d(x, w, **kw)
    got = fd.conv_transpose2d(da.from_array(x, chunks=(4, 6, 6, 5)), w, **kw).compute(**SYNC)
    tol = 2e-5 if dtype == np.float32 else 1e-12
    assert got.shape == want.shape and got.dtype == want.dtype
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("algorithm", ["auto"] + [a for a in ALGORITHMS if a != "direct"])
def test_other_algorithms_within_their_error(algorithm, dtype):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 4, 17, 15)).astype(dtype)
    w = rng.standard_normal((4, 3, 3, 3)).astype(dtype)
    kw = dict(stride=1, padding=1, algorithm=algorithm)
    try:
        want = fastconv.conv_transpose2d(x, w, **kw)
    except fastconv.AlgorithmUnavailable as exc:
        pytest.skip(str(exc))
    got = fd.conv_transpose2d(da.from_array(x, chunks=(1, 2, (2, 9, 6), (7, 1, 7))), w, **kw).compute(**SYNC)
    tol = (2e-5 * float32_error(algorithm)) if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol * np.abs(want).max())


@pytest.mark.parametrize("stride", [1, 2, 3])
@pytest.mark.parametrize("inf_weight", [False, True])
def test_nan_and_inf_spread_as_in_memory(stride, inf_weight):
    """A NaN or Inf input reaches the same outputs; an Inf weight takes the direct scatter, which sums
    only real terms, in both calls (the zero row a one-row block may add must not leak into the block)."""
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, 2, 11, 10))
    x[0, 1, 4, 5], x[1, 0, 0, 0] = np.nan, np.inf
    w = rng.standard_normal((2, 3, 3, 2))
    if inf_weight:
        w[1, 2, 0, 1] = np.inf
    kw = dict(stride=stride, padding=1, algorithm="direct")
    want = fastconv.conv_transpose2d(x, w, **kw)
    got = fd.conv_transpose2d(da.from_array(x, chunks=(1, 2, 3, 4)), w, **kw).compute(**SYNC)
    assert np.isnan(want).any()
    np.testing.assert_array_equal(got, want)  # NaN where want has NaN


# --------------------------------------------------------------------------- chunks, laziness, meta
def test_output_chunks_follow_input_chunks_times_stride():
    x = da.zeros((3, 2, 8, 10), dtype=np.float32, chunks=(2, 1, 4, (3, 7)))
    y = fd.conv_transpose2d(x, np.ones((2, 5, 3, 3), np.float32), stride=2, padding=1, output_padding=1)
    # output row o goes with the input block of row (o + 1) // 2: cuts at 4*2 - 1 and 3*2 - 1
    assert y.shape == (3, 5, 16, 20)
    assert y.chunks == ((2, 1), (5,), (7, 9), (5, 15))


@pytest.mark.parametrize("dtype", DTYPES)
def test_lazy_with_meta(dtype):
    x = poisoned((4, 3, 20, 18), dtype, (2, 3, 7, 5))
    y = fd.conv_transpose2d(x, np.ones((3, 2, 3, 3), dtype), np.ones(2, dtype), stride=2, padding=1,
                            output_padding=1)
    assert y.shape == (4, 2, 40, 36) and y.dtype == dtype
    assert type(y._meta) is np.ndarray and y._meta.ndim == 4 and y._meta.dtype == dtype
    assert sum(y.chunks[2]) == 40 and sum(y.chunks[3]) == 36
    with pytest.raises(AssertionError, match="computed while building"):
        y.compute(**SYNC)  # the poison is real: it fires once computed


def test_numpy_input_and_weight_stored_once():
    x = np.random.default_rng(0).standard_normal((2, 2, 9, 9))
    w = np.ones((2, 2, 3, 3))
    y = fd.conv_transpose2d(x, w, algorithm="direct")
    assert y.npartitions == 1  # a NumPy input is one block, so is its output
    weights = [v for k, v in dict(y.__dask_graph__()).items() if str(k).startswith("fastconv-weight-")]
    assert len(weights) == 1 and weights[0] is w
    same(y.compute(**SYNC), fastconv.conv_transpose2d(x, w, algorithm="direct"))


def test_transpose_plan_reads_only_reaching_rows():
    """Output rows [o0, o1) read input rows i with o0 + p - (r-1)*d <= i*s <= o1 - 1 + p."""
    # 12 input rows in chunks of 4, stride 2, padding 1, 3 taps: output rows [7, 15) of input block 1
    plan = _transpose._transpose_plan((4, 4, 4), 12, 2, 1, 1, 3, [(7, 15)])
    (o0, o1, pieces, (q0, count)), = plan
    # i*2 in [7 + 1 - 2, 14 + 1] = [6, 15]: rows 3..7, from block 0 (row 3) and block 1 (rows 4..7)
    assert pieces == [(0, slice(3, 4)), (1, slice(0, 4))]
    assert (q0, count) == (7 - (3 * 2 - 1), 8)


# --------------------------------------------------------------------------- errors
@pytest.mark.parametrize("call, exc, match", [
    (lambda: fd.conv_transpose2d(np.zeros((1, 1, 4, 4), np.int32), np.ones((1, 1, 3, 3))), TypeError,
     "input must have dtype float32 or float64"),
    (lambda: fd.conv_transpose2d(da.zeros((1, 4, 4)), np.ones((1, 1, 3, 3))), ValueError, "input must be 4-D"),
    (lambda: fd.conv_transpose2d([1.0], np.ones((1, 1, 3, 3))), TypeError, "dask.array.Array or numpy.ndarray"),
    (lambda: fd.conv_transpose2d(da.zeros((1, 2, 4, 4)), np.ones((1, 1, 3, 3))), ValueError,
     r"weight.shape\[0\] must equal the input channels 2"),
    (lambda: fd.conv_transpose2d(da.zeros((1, 1, 4, 4)), np.ones((1, 1, 3, 3), np.float32)), TypeError,
     "weight must have the same dtype"),
    (lambda: fd.conv_transpose2d(da.zeros((1, 1, 4, 4)), np.ones((1, 1, 3)), ), ValueError, "weight must be 4-D"),
    (lambda: fd.conv_transpose2d(da.zeros((1, 1, 4, 4)), np.ones((1, 1, 3, 3)), stride=2, output_padding=2),
     ValueError, "output_padding must be smaller than stride or dilation"),
    (lambda: fd.conv_transpose2d(da.zeros((1, 1, 4, 4)), np.ones((1, 1, 3, 3)), padding="same"), ValueError,
     "padding must be an int or a pair"),
    (lambda: fd.conv_transpose2d(da.zeros((1, 1, 2, 2)), np.ones((1, 1, 1, 1)), padding=3), ValueError,
     "output size must be positive"),
    (lambda: fd.conv_transpose2d(da.zeros((1, 1, 4, 4)), np.ones((1, 2, 3, 3)), np.ones(3)), ValueError,
     r"bias must have shape \(2,\)"),
    (lambda: fd.conv_transpose2d(da.zeros((1, 1, 4, 4)), np.ones((1, 1, 3, 3)), stride=0), ValueError,
     "stride must be positive"),
    (lambda: fd.conv_transpose2d(da.zeros((1, 2, 4, 4)), np.ones((2, 1, 3, 3)), groups=3), ValueError,
     "divisible by groups=3"),
    (lambda: fd.conv_transpose2d(da.zeros((1, 1, 4, 4)), np.ones((1, 1, 3, 3)), algorithm="nope"), ValueError,
     "algorithm"),
    (lambda: fd.conv_transpose2d(da.zeros((1, 1, 4, 4)), np.ones((1, 1, 3, 3)), algorithm=1), TypeError,
     "algorithm must be a str"),
])
def test_errors(call, exc, match):
    with pytest.raises(exc, match=match) as info:
        call()
    assert "conv_transpose2d" in str(info.value)


def test_unknown_chunk_sizes_refused():
    x = da.zeros((1, 1, 8, 8), chunks=4)
    x = x[x[:, 0, 0, 0] >= 0]  # a boolean index leaves the batch chunks unknown
    with pytest.raises(ValueError, match="known chunk sizes"):
        fd.conv_transpose2d(x, np.ones((1, 1, 3, 3)))


def test_docstring_example():
    import doctest
    finder, runner = doctest.DocTestFinder(), doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    tests = [t for t in finder.find(_transpose) if t.examples]
    assert tests
    for t in tests:
        runner.run(t)
    assert runner.failures == 0
