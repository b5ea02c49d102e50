"""fastconv.dask.predict tile by tile over H and W (fastconv/dask/_tiles.py): a fully convolutional
model over an image chunked over H and W equals the in-memory model bitwise ('direct'
convolutions) for any chunking, chunks smaller than the stack's halo included; models that cannot
run tile by tile are refused with tiles=True and run on whole samples otherwise."""
import copy

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

da = pytest.importorskip("dask.array")

import fastconv.dask as fd  # noqa: E402
from fastconv.layers import AvgPool2d, Conv2d, Flatten, Linear, MaxPool2d, ReLU, Sequential  # noqa: E402
from fastconv.layers_extra import BatchNorm2d, Dropout, LeakyReLU, ReLU6  # noqa: E402
from dask_strategies import chunks_of  # noqa: E402

SYNC = {"scheduler": "sync"}


def _model(kind, dtype=np.float32):
    d = dict(algorithm="direct", dtype=dtype)
    if kind == "unet-ish":  # 'same' 3x3 convs, a max pool, a dilated conv: strides 1 and 2
        return Sequential(Conv2d(3, 6, 3, padding=1, rng=0, **d), ReLU(), MaxPool2d(2),
                          Conv2d(6, 6, 3, padding="same", dilation=2, rng=1, **d), ReLU6(),
                          Conv2d(6, 4, 1, rng=2, **d))
    if kind == "resnet-stem":  # 7x7/s2 conv, batch norm in eval, 3x3/s2 max pool with padding
        bn = BatchNorm2d(5, dtype=dtype)
        rng = np.random.default_rng(3)
        bn.running_mean[...] = rng.standard_normal(5)
        bn.running_var[...] = rng.uniform(0.5, 2, 5)
        bn.weight.data[...] = rng.uniform(0.5, 1.5, 5)
        return Sequential(Conv2d(3, 5, 7, stride=2, padding=3, bias=False, rng=4, **d), bn, ReLU(),
                          MaxPool2d(3, 2, 1), Dropout(0.3, rng=0)).eval()
    # 'valid' and strided convs, ceil-mode average pools that drop padding from the count
    return Sequential(Conv2d(3, 4, 5, stride=2, rng=5, **d), LeakyReLU(0.2),
                      AvgPool2d(3, 2, 1, ceil_mode=True, count_include_pad=False),
                      Sequential(Conv2d(4, 4, 3, stride=(1, 2), padding=(2, 0), dilation=(2, 1), rng=6, **d)),
                      AvgPool2d(2, ceil_mode=True))


def _array(out):
    return np.asarray(getattr(out, "data", out))


@settings(max_examples=30, deadline=None)
@given(kind=st.sampled_from(["unet-ish", "resnet-stem", "strided"]), h=st.integers(17, 40),
       w=st.integers(17, 40), n=st.integers(1, 3), dtype=st.sampled_from([np.float32, np.float64]),
       data=st.data())
def test_tiles_equal_the_model_bitwise(kind, h, w, n, dtype, data):
    model = _model(kind, dtype)
    x = np.random.default_rng(data.draw(st.integers(0, 2**16))).standard_normal((n, 3, h, w)).astype(dtype)
    chunks = (data.draw(chunks_of(n)), (3,), data.draw(chunks_of(h)), data.draw(chunks_of(w)))
    want = _array(copy.deepcopy(model)(x))
    y = fd.predict(model, da.from_array(x, chunks=chunks), tiles=True)
    assert y.shape == want.shape and y.dtype == want.dtype and y.chunks[0] == chunks[0]
    got = y.compute(**SYNC)
    assert got.flags.c_contiguous
    np.testing.assert_array_equal(got, want)


def test_tiles_chunk_like_the_chained_ops():
    """Output tiles are the blocks chaining fastconv.dask's ops gives, and so are the values."""
    model = _model("unet-ish")
    x = np.random.default_rng(0).standard_normal((2, 3, 50, 37)).astype(np.float32)
    xd = da.from_array(x, chunks=(1, 3, 13, 10))
    c1, c2, c3 = (m for m in model.layers if isinstance(m, Conv2d))
    y = fd.relu(fd.conv2d(xd, c1.weight.data, c1.bias.data, padding=1, algorithm="direct"))
    y = fd.conv2d(fd.max_pool2d(y, 2), c2.weight.data, c2.bias.data, padding="same", dilation=2, algorithm="direct")
    y = fd.conv2d(np.minimum(fd.relu(y), 6), c3.weight.data, c3.bias.data, algorithm="direct")
    t = fd.predict(model, xd)  # tiles by default: chunked over H and W, a fully convolutional model
    assert t.chunks == y.chunks
    np.testing.assert_array_equal(t.compute(**SYNC), y.compute(**SYNC))


def test_one_tile_task_per_output_block_reading_halos_not_whole_neighbours():
    model = _model("unet-ish")
    x = da.zeros((2, 3, 64, 64), dtype=np.float32, chunks=(1, 3, 32, 32)).persist(**SYNC)
    import dask
    (y,) = dask.optimize(fd.predict(model, x))  # after dask's fusion
    graph = dict(y.__dask_graph__())
    tiles = [k for k in graph if isinstance(k, tuple) and k[0] == y.name]
    assert len(tiles) == 2 * len(y.chunks[2]) * len(y.chunks[3]) == 8
    for k in tiles:
        deps = [d for d in graph[k].dependencies if isinstance(d, tuple)]
        whole = [d for d in deps if d[0] == x.name]
        halos = [d for d in deps if str(d[0]).startswith("halo-")]
        assert len(whole) <= 1 and len(whole) + len(halos) == len(deps) and halos
        for h in halos:  # a slice cut from one block where it lives: rows and columns within 32
            (src,) = graph[h].dependencies
            assert src[0] == x.name and h[-4] >= 0 and h[-3] <= 32 and h[-2] >= 0 and h[-1] <= 32


def test_models_that_mix_positions_run_on_whole_samples_or_raise():
    lenet = Sequential(Conv2d(1, 2, 3, rng=0), ReLU(), Flatten(), Linear(2 * 6 * 6, 3, rng=1))
    x = np.random.default_rng(1).standard_normal((4, 1, 8, 8)).astype(np.float32)
    xd = da.from_array(x, chunks=(2, 1, 4, 4))
    y = fd.predict(lenet, xd)  # default: whole samples, as before tiles existed
    assert y.chunks == ((2, 2), (3,))
    np.testing.assert_allclose(y.compute(**SYNC), _array(copy.deepcopy(lenet)(x)), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match=r"fastconv.dask.predict: layer 2 \(Flatten\) cannot run tile by tile"):
        fd.predict(lenet, xd, tiles=True)
    bn = Sequential(Conv2d(1, 2, 3, rng=0), BatchNorm2d(2))  # training mode: batch statistics
    with pytest.raises(ValueError, match=r"layer 1 \(BatchNorm2d in training mode"):
        fd.predict(bn, xd, tiles=True)
    bn = Sequential(Conv2d(1, 2, 3, rng=0), BatchNorm2d(2, track_running_stats=False)).eval()
    with pytest.raises(ValueError, match=r"layer 1 \(BatchNorm2d without running statistics"):
        fd.predict(bn, xd, tiles=True)
    with pytest.raises(TypeError, match="must be a fastconv.layers.Sequential"):
        fd.predict(lambda a: a, xd, tiles=True)
    with pytest.raises(TypeError, match="tiles must be None, True or False"):
        fd.predict(lenet, xd, tiles="yes")
    with pytest.raises(ValueError, match=r"tiles=True needs an input of shape \(N, C, H, W\)"):
        fd.predict(lenet, da.zeros((4, 8), chunks=2), tiles=True)


def test_tiles_false_keeps_whole_samples():
    model = _model("unet-ish")
    x = np.random.default_rng(2).standard_normal((3, 3, 20, 20)).astype(np.float32)
    y = fd.predict(model, da.from_array(x, chunks=(1, 3, 5, 5)), tiles=False)
    assert y.chunks[2:] == ((10,), (10,))
    np.testing.assert_array_equal(y.compute(**SYNC), _array(copy.deepcopy(model)(x)))


def test_graph_holds_copies_of_the_weights():
    """The graph is built from copies of the layers' arrays: a model changed after predict (the next
    training step) does not change the lazy result, and activations a layer keeps from its last
    forward are not carried into the graph."""
    import pickle
    model = _model("resnet-stem")
    x = np.random.default_rng(4).standard_normal((2, 3, 30, 30)).astype(np.float32)
    want = _array(copy.deepcopy(model)(x))
    model(np.zeros((64, 3, 64, 64), np.float32))  # a forward whose activations the layers may keep
    y = fd.predict(model, da.from_array(x, chunks=(1, 3, 10, 10)))
    model.layers[0].weight.data[...] = 0
    model.layers[1].running_mean[...] = 5
    np.testing.assert_array_equal(y.compute(**SYNC), want)
    assert len(pickle.dumps(dict(y.__dask_graph__()))) < 200_000
