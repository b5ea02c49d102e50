"""fastconv.dask.conv2d_backward against fastconv.conv2d_backward: for many chunkings of the input and
of the output gradient (hypothesis under the project's derandomized profile, the synchronous
scheduler), the named geometries of conftest, explicit edge cases, other algorithms, laziness, the
tree reduction, errors, and one run on a threaded distributed cluster."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

da = pytest.importorskip("dask.array")

import fastconv  # noqa: E402
import fastconv.dask as fd  # noqa: E402
from conftest import ALGORITHMS, DTYPES, GEOMETRIES, TOL, float32_error  # noqa: E402
from dask_strategies import chunks_of, pairs, poisoned  # noqa: E402
from fastconv.dask import _backward  # noqa: E402

SYNC = {"scheduler": "sync"}
FEW = settings(max_examples=30)


def _check(x, w, gy, x_chunks, gy_chunks, algorithm="direct", split_every=None, bitwise=True, **kw):
    """The chunked gradients equal the in-memory ones: grad_input bitwise with 'direct' (unless
    ``bitwise=False``), the summed weight and bias gradients within rounding of a differently
    ordered sum."""
    want = fastconv.conv2d_backward(gy, x, w, algorithm=algorithm, **kw)
    xd, gyd = da.from_array(x, chunks=x_chunks), da.from_array(gy, chunks=gy_chunks)
    g = fd.conv2d_backward(gyd, xd, w, algorithm=algorithm, split_every=split_every, **kw)
    assert isinstance(g, fastconv.Conv2dGrads)
    assert g.grad_input.chunks == xd.chunks
    assert g.grad_weight.shape == w.shape and g.grad_weight.numblocks == (1, 1, 1, 1)
    assert g.grad_bias.shape == (w.shape[0],)
    gx, gw, gb = da.compute(*g, **SYNC)
    for got, ref in ((gx, want.grad_input), (gw, want.grad_weight), (gb, want.grad_bias)):
        assert type(got) is np.ndarray and got.shape == ref.shape and got.dtype == ref.dtype == x.dtype
    if algorithm == "direct" and bitwise:
        np.testing.assert_array_equal(gx, want.grad_input)
    factor = float32_error(algorithm) if x.dtype == np.float32 else 1.0
    rtol, atol = TOL[x.dtype]["grad"]
    # the sums run over n*oh*ow terms of order one: atol grows with their square root
    scale = max(1.0, float(np.sqrt(gy.shape[0] * gy.shape[2] * gy.shape[3])))
    np.testing.assert_allclose(gx, want.grad_input, rtol=rtol * factor, atol=atol * factor)
    np.testing.assert_allclose(gw, want.grad_weight, rtol=rtol * factor, atol=atol * scale * factor)
    np.testing.assert_allclose(gb, want.grad_bias, rtol=rtol * factor, atol=atol * scale * factor)


# --------------------------------------------------------------------------- equality
@FEW
@given(n=st.integers(1, 3), c=st.integers(1, 4), kg=st.integers(1, 2), hw=pairs(3, 13), ks=pairs(1, 4),
       stride=pairs(1, 3), dilation=pairs(1, 2), padding=st.one_of(pairs(0, 3), st.just("same"), st.just("valid")),
       dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**16), split_every=st.sampled_from([None, 2, 3]),
       data=st.data())
def test_direct_many_chunkings(n, c, kg, hw, ks, stride, dilation, padding, dtype, seed, split_every, data):
    groups = data.draw(st.sampled_from([g for g in (1, 2, c) if c % g == 0]))
    if padding == "same":
        stride = (1, 1)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, c) + hw).astype(dtype)
    w = rng.standard_normal((kg * groups, c // groups) + ks).astype(dtype)
    kw = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    try:
        y_shape = fastconv.conv2d(x, w, **kw).shape
    except ValueError:  # the kernel does not fit: the dask op must say the same
        with pytest.raises(ValueError, match="must fit"):
            fd.conv2d_backward(da.zeros((n, w.shape[0], 1, 1), dtype=dtype), x, w, **kw)
        return
    gy = rng.standard_normal(y_shape).astype(dtype)
    x_chunks = tuple(data.draw(chunks_of(d)) for d in x.shape)
    gy_chunks = tuple(data.draw(chunks_of(d)) for d in gy.shape)  # independent of x's, batch included
    _check(x, w, gy, x_chunks, gy_chunks, split_every=split_every, **kw)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name, x_shape, w_shape, kw", GEOMETRIES, ids=[g[0] for g in GEOMETRIES])
def test_named_geometries_chunks_of_two(name, x_shape, w_shape, kw, dtype):
    rng = np.random.default_rng(5)
    x = rng.standard_normal(x_shape).astype(dtype)
    w = rng.standard_normal(w_shape).astype(dtype)
    gy = rng.standard_normal(fastconv.conv2d(x, w, **kw).shape).astype(dtype)
    _check(x, w, gy, (1, -1, 2, 2), (1, -1, 2, 3), split_every=2, **kw)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name, x_shape, w_shape, kw, x_chunks, gy_chunks", [
    # every chunk one row/column: smaller than the 9-row dilated kernel and than the stride
    ("chunks-of-one", (1, 2, 19, 16), (3, 2, 5, 5), dict(stride=3, padding=4, dilation=2), 1, 1),
    # stride 3 over a 2x2 kernel: input rows no window reads get a zero gradient
    ("stride-gt-kernel", (2, 2, 14, 11), (2, 2, 2, 2), dict(stride=3), (1, 2, (5, 9), (4, 4, 3)), (2, 2, 2, 1)),
    ("uneven-stride2", (3, 4, 13, 11), (4, 4, 3, 3), dict(stride=2, padding=1), (2, 3, (6, 6, 1), 4), (1, 4, 5, 2)),
    # 'same' with an even kernel pads one more row at the bottom than at the top
    ("same-even", (2, 3, 10, 9), (2, 3, 4, 2), dict(padding="same", dilation=(1, 2)), (1, 1, 3, (2, 7)), (2, 2, 4, 4)),
    ("groups", (2, 4, 9, 9), (6, 2, 3, 3), dict(groups=2, padding=1, stride=2), (1, (1, 3), 4, 4), (2, 3, 2, 3)),
    ("depthwise", (2, 3, 9, 10), (3, 1, 3, 3), dict(groups=3, padding=2, dilation=2), (1, 1, 2, 3), (1, 3, 4, 4)),
    # windows wholly inside the padding (padding as wide as the kernel allows): blocks that read no row
    ("all-padding-blocks", (1, 1, 3, 3), (1, 1, 3, 3), dict(padding=1, dilation=2), 1, 1),
    ("one-output-row", (2, 2, 5, 7), (2, 2, 3, 3), dict(stride=4), ((1, 1), 2, 1, 2), (1, 2, 1, 1)),
    # one-row grad_output windows, stride above the kernel's extent (see test_dask_transpose)
    ("one-row-windows-stride2", (1, 1, 9, 4), (1, 1, 1, 3), dict(stride=(2, 1), padding=(2, 0)),
     (1, 1, (2, 4, 2, 1), 4), (1, 1, (5, 1, 1), 1)),
    ("one-row-windows-stride3", (2, 2, 13, 11), (2, 2, 1, 3), dict(stride=(3, 1), padding=(0, 1)),
     (1, 2, (2, 3, 8), (3, 5, 3)), (1, 2, 1, 4)),
])
def test_direct_edge_cases(name, x_shape, w_shape, kw, x_chunks, gy_chunks, dtype, monkeypatch):
    if name == "depthwise":  # the plane-wise kernels for blocks and whole alike (see below)
        from fastconv._algorithms import direct as D
        monkeypatch.setattr(D, "_CV", False)
    rng = np.random.default_rng(11)
    x = rng.standard_normal(x_shape).astype(dtype)
    w = rng.standard_normal(w_shape).astype(dtype)
    gy = rng.standard_normal(fastconv.conv2d(x, w, **kw).shape).astype(dtype)
    _check(x, w, gy, x_chunks, gy_chunks, split_every=2, **kw)


@pytest.mark.parametrize("dtype", DTYPES)
def test_direct_tiny_depthwise_blocks_within_rounding(dtype):
    """direct runs stride-1 depthwise layers of 16 channels or more and planes of at most 36 outputs
    on its channel-vectorised kernels (another summation order): blocks of 2 x 3 do, the whole
    9 x 10 plane does not, so the chunked result agrees within rounding only."""
    rng = np.random.default_rng(11)
    x = rng.standard_normal((2, 16, 9, 10)).astype(dtype)
    w = rng.standard_normal((16, 1, 3, 3)).astype(dtype)
    gy = rng.standard_normal((2, 16, 9, 10)).astype(dtype)
    _check(x, w, gy, (1, 16, 2, 3), (1, 16, 4, 4), bitwise=False, padding=2, dilation=2, groups=16)


@pytest.mark.parametrize("dtype", DTYPES)
def test_direct_per_image_grad_input_within_rounding(dtype):
    """direct's stride-1 grad_input runs image by image (another summation order) for 16 or more
    (image, group) items of small planes whose output is smaller than the input: the whole batch of
    32 x 3 groups does, its blocks of 4 x 3 do not, so grad_input agrees within rounding only -- as
    the in-memory call on the batch's halves."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((32, 3, 12, 12)).astype(dtype)
    w = rng.standard_normal((6, 1, 3, 3)).astype(dtype)
    gy = rng.standard_normal((32, 6, 10, 10)).astype(dtype)
    _check(x, w, gy, (4, 3, 6, 6), (8, 6, 10, 5), bitwise=False, groups=3)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("algorithm", ["auto"] + [a for a in ALGORITHMS if a != "direct"])
def test_other_algorithms_within_their_error(algorithm, dtype):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 17, 15)).astype(dtype)
    w = rng.standard_normal((4, 3, 3, 3)).astype(dtype)
    gy = rng.standard_normal((2, 4, 17, 15)).astype(dtype)
    try:
        fastconv.conv2d_backward(gy, x, w, padding=1, algorithm=algorithm)
    except fastconv.AlgorithmUnavailable as exc:
        pytest.skip(str(exc))
    _check(x, w, gy, (1, 3, (2, 9, 6), (7, 1, 7)), (2, 4, 6, 5), algorithm=algorithm, padding=1)


@pytest.mark.parametrize("stride", [1, 2, 3])
@pytest.mark.parametrize("inf_weight", [False, True])
def test_nan_and_inf_spread_as_in_memory(stride, inf_weight):
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, 2, 11, 10))
    x[0, 1, 4, 5], x[1, 0, 0, 0] = np.nan, np.inf
    w = np.ones((3, 2, 3, 2))
    w[0, 0, 0, 0] = np.inf if inf_weight else 2.0
    kw = dict(stride=stride, padding=1, algorithm="direct")
    gy = rng.standard_normal(fastconv.conv2d(x, w, **kw).shape)
    gy[0, 0, 1, 1] = np.nan
    want = fastconv.conv2d_backward(gy, x, w, **kw)
    g = da.compute(*fd.conv2d_backward(da.from_array(gy, chunks=(1, 3, 2, 3)), da.from_array(x, chunks=(1, 2, 3, 4)),
                                       w, **kw), **SYNC)
    assert np.isnan(want.grad_input).any() and np.isnan(want.grad_weight).any()
    np.testing.assert_array_equal(g[0], want.grad_input)
    for got, ref in zip(g[1:], want[1:]):  # the same entries not finite; the finite ones within rounding
        np.testing.assert_array_equal(np.isfinite(got), np.isfinite(ref))
        np.testing.assert_allclose(got[np.isfinite(ref)], ref[np.isfinite(ref)], rtol=1e-11, atol=1e-11)


# --------------------------------------------------------------------------- the tree, laziness, meta
def test_weight_gradient_is_a_tree_of_per_block_partials():
    """16 blocks of grad_output: one partial task each, then sums of ``split_every`` partials."""
    x = da.zeros((4, 2, 8, 8), chunks=(1, 2, 4, 4))
    gy = da.zeros((4, 3, 8, 8), chunks=(1, 3, 4, 4))
    w = np.ones((3, 2, 3, 3))

    def sums(split_every):
        """The weight gradient's tasks above the partials: (its number, the most inputs one adds)."""
        g = fd.conv2d_backward(gy, x, w, padding=1, split_every=split_every)
        graph = g.grad_weight.__dask_graph__()
        parts = [k for k in graph if isinstance(k, tuple) and k[0].startswith("fastconv-conv2d-grad-block-")]
        assert len(parts) == 16
        # dask's tree: a sum per leaf, then levels of "sum-partial" and a final "sum-aggregate"
        layers = [name for name in graph.layers if name.startswith(("sum-partial-", "sum-aggregate-"))]
        keys = [k for name in layers for k in graph.layers[name]]
        deps = graph.get_all_dependencies()
        return len(keys), max(len(deps[k]) for k in keys)

    assert sums(2) == (15, 2)  # a binary tree over 16 leaves: 8 + 4 + 2 + 1 sums of two
    assert sums(4) == (5, 4)
    assert sums(16) == (1, 16)


@pytest.mark.parametrize("dtype", DTYPES)
def test_lazy_with_meta(dtype):
    x = poisoned((4, 3, 20, 18), dtype, (2, 3, 7, 5))
    gy = poisoned((4, 5, 10, 9), dtype, (4, 5, 3, 9))
    g = fd.conv2d_backward(gy, x, np.ones((5, 3, 3, 3), dtype), stride=2, padding=1)
    for a, shape in zip(g, [(4, 3, 20, 18), (5, 3, 3, 3), (5,)]):
        assert isinstance(a, da.Array) and a.shape == shape and a.dtype == dtype
        assert type(a._meta) is np.ndarray and a._meta.ndim == len(shape) and a._meta.dtype == dtype
    assert g.grad_input.chunks == x.chunks
    for a in g:  # the poison is real: each result fires it once computed
        with pytest.raises(AssertionError, match="computed while building"):
            a.compute(**SYNC)


def test_grad_input_keeps_x_channel_chunks_and_never_reads_x():
    x = poisoned((2, 4, 6, 6), np.float64, (1, 2, 3, 3))  # computing any block of x raises
    gy = np.random.default_rng(0).standard_normal((2, 2, 6, 6))
    w = np.ones((2, 4, 3, 3))
    g = fd.conv2d_backward(da.from_array(gy, chunks=(2, 2, 4, 4)), x, w, padding=1, algorithm="direct")
    assert g.grad_input.chunks == x.chunks
    want = fastconv.conv2d_backward(gy, np.zeros(x.shape), w, padding=1, algorithm="direct").grad_input
    np.testing.assert_array_equal(g.grad_input.compute(**SYNC), want)


def test_matches_the_chunked_forward_pass():
    """The gradient of sum(fd.conv2d(x) * gy) by central differences along one direction (float64)."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((1, 2, 9, 8))
    w = rng.standard_normal((3, 2, 3, 3))
    gy = rng.standard_normal((1, 3, 5, 4))
    xd = da.from_array(x, chunks=(1, 2, 4, 3))
    kw = dict(stride=2, padding=1, algorithm="direct")
    g = fd.conv2d_backward(da.from_array(gy, chunks=(1, 3, 2, 2)), xd, w, **kw)
    gx, gw = g.grad_input.compute(**SYNC), g.grad_weight.compute(**SYNC)
    v, u, eps = rng.standard_normal(x.shape), rng.standard_normal(w.shape), 1e-6

    def f(xx, ww):
        return float((fd.conv2d(da.from_array(xx, chunks=(1, 2, 4, 3)), ww, **kw).compute(**SYNC) * gy).sum())
    assert (f(x + eps * v, w) - f(x - eps * v, w)) / (2 * eps) == pytest.approx(float((gx * v).sum()), rel=1e-6)
    assert (f(x, w + eps * u) - f(x, w - eps * u)) / (2 * eps) == pytest.approx(float((gw * u).sum()), rel=1e-6)


# --------------------------------------------------------------------------- errors
X = da.zeros((2, 1, 6, 6))
W = np.ones((2, 1, 3, 3))
GY = da.zeros((2, 2, 4, 4))


@pytest.mark.parametrize("call, exc, match", [
    (lambda: fd.conv2d_backward(GY, np.zeros((2, 1, 6, 6), np.int64), W), TypeError,
     "input must have dtype float32 or float64"),
    (lambda: fd.conv2d_backward(GY, X[0], W), ValueError, "input must be 4-D"),
    (lambda: fd.conv2d_backward(GY[0], X, W), ValueError, "grad_output must be 4-D"),
    (lambda: fd.conv2d_backward([0.0], X, W), TypeError, "grad_output must be a dask.array.Array or numpy.ndarray"),
    (lambda: fd.conv2d_backward(GY.astype(np.float32), X, W), TypeError,
     r"grad_output must have the same dtype as the input \(float64\), got float32"),
    (lambda: fd.conv2d_backward(GY, X, W.astype(np.float32)), TypeError, "weight must have the same dtype"),
    (lambda: fd.conv2d_backward(GY, X, W[0]), ValueError, "weight must be 4-D"),
    (lambda: fd.conv2d_backward(GY, X, list(W)), TypeError, "weight must be a numpy.ndarray"),
    (lambda: fd.conv2d_backward(GY, X, np.ones((2, 2, 3, 3))), ValueError, "input channels must equal"),
    (lambda: fd.conv2d_backward(GY[:, :, :3], X, W), ValueError,
     r"grad_output must have the output's shape \(2, 2, 4, 4\), got \(2, 2, 3, 4\)"),
    (lambda: fd.conv2d_backward(GY[:1], X, W), ValueError, r"output's shape \(2, 2, 4, 4\), got \(1, 2, 4, 4\)"),
    (lambda: fd.conv2d_backward(GY, X, W, stride=0), ValueError, "stride must be positive"),
    (lambda: fd.conv2d_backward(GY, X, np.ones((2, 1, 7, 7))), ValueError, "must fit"),
    (lambda: fd.conv2d_backward(GY, X, W, algorithm="nope"), ValueError, "algorithm"),
    (lambda: fd.conv2d_backward(GY, X, W, algorithm=None), TypeError, "algorithm must be a str"),
    (lambda: fd.conv2d_backward(GY, X, W, split_every=1), ValueError, "split_every must be None or an int >= 2"),
    (lambda: fd.conv2d_backward(GY, X, W, split_every=2.5), ValueError, "split_every"),
])
def test_errors(call, exc, match):
    with pytest.raises(exc, match=match) as info:
        call()
    assert "fastconv.dask.conv2d_backward" in str(info.value)


def test_docstring_example():
    import doctest
    finder, runner = doctest.DocTestFinder(), doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    tests = [t for t in finder.find(_backward) if t.examples]
    assert tests
    for t in tests:
        runner.run(t)
    assert runner.failures == 0


# --------------------------------------------------------------------------- a cluster
def test_on_a_threaded_local_cluster():
    distributed = pytest.importorskip("distributed")
    rng = np.random.default_rng(2)
    x = rng.standard_normal((4, 3, 16, 14)).astype(np.float32)
    w = rng.standard_normal((5, 3, 3, 3)).astype(np.float32)
    gy = rng.standard_normal((4, 5, 8, 7)).astype(np.float32)
    kw = dict(stride=2, padding=1, algorithm="direct")
    want = fastconv.conv2d_backward(gy, x, w, **kw)
    with distributed.LocalCluster(n_workers=1, threads_per_worker=2, processes=False,
                                  dashboard_address=":0") as cluster, distributed.Client(cluster) as client:
        g = fd.conv2d_backward(da.from_array(gy, chunks=(2, 5, 3, 4)), da.from_array(x, chunks=(1, 3, 5, 5)), w,
                               split_every=2, **kw)
        gx, gw, gb = client.compute(list(g), sync=True)
    np.testing.assert_array_equal(gx, want.grad_input)
    np.testing.assert_allclose(gw, want.grad_weight, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(gb, want.grad_bias, rtol=1e-4, atol=1e-4)
