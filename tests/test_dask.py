"""fastconv.dask: the chunked ops against the in-memory ops for many chunkings (hypothesis, the
synchronous scheduler), laziness and meta, predict, and the data-parallel training step on a threaded
and on a two-process LocalCluster (one cluster each, module-scoped: process clusters are slow to
start), including a worker killed in the middle of a step."""
import copy
import os
import sys

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

da = pytest.importorskip("dask.array")

import fastconv  # noqa: E402
import fastconv.dask as fd  # noqa: E402
from fastconv.dask import _arrays, _training  # noqa: E402
from fastconv.layers import SGD, CrossEntropyLoss  # noqa: E402
from fastconv.train import build_model  # noqa: E402
from dask_strategies import chunks_of, pairs  # noqa: E402

SYNC = {"scheduler": "sync"}
FEW = settings(max_examples=25)


# --------------------------------------------------------------------------- strategies
@st.composite
def chunked(draw, c_max=3, hw=(3, 13)):
    n, c = draw(st.integers(1, 2)), draw(st.integers(1, c_max))
    h, w = draw(st.integers(*hw)), draw(st.integers(*hw))
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    x = np.random.default_rng(draw(st.integers(0, 2**16))).standard_normal((n, c, h, w)).astype(dtype)
    chunks = (draw(chunks_of(n)), draw(chunks_of(c)), draw(chunks_of(h)), draw(chunks_of(w)))
    return x, da.from_array(x, chunks=chunks)


def same(got, want):
    assert got.shape == want.shape and got.dtype == want.dtype
    np.testing.assert_array_equal(got, want)


# --------------------------------------------------------------------------- ops: equality
@FEW
@given(xs=chunked(), k=st.integers(1, 3), ks=pairs(1, 4), stride=pairs(1, 3), dilation=pairs(1, 2),
       padding=st.one_of(pairs(0, 3), st.just("same"), st.just("valid")), bias=st.booleans(), data=st.data())
def test_conv2d_direct_bitwise(xs, k, ks, stride, dilation, padding, bias, data):
    x, xd = xs
    c = x.shape[1]
    groups = data.draw(st.sampled_from([g for g in (1, c) if k % g == 0]))
    if padding == "same":
        stride = (1, 1)
    rng = np.random.default_rng(1)
    w = rng.standard_normal((k, c // groups) + ks).astype(x.dtype)
    b = rng.standard_normal(k).astype(x.dtype) if bias else None
    kw = dict(stride=stride, padding=padding, dilation=dilation, groups=groups, algorithm="direct")
    try:
        want = fastconv.conv2d(x, w, b, **kw)
    except ValueError:  # the kernel does not fit: the dask op must say the same
        with pytest.raises(ValueError):
            fd.conv2d(xd, w, b, **kw)
        return
    y = fd.conv2d(xd, w, b, **kw)
    assert y.shape == want.shape and y.dtype == want.dtype and y.chunks[0] == xd.chunks[0]
    same(y.compute(**SYNC), want)


@pytest.mark.parametrize("algorithm", ["auto"] + [a for a in fastconv.algorithms() if a != "direct"])
def test_conv2d_other_algorithms_within_tolerance(algorithm):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 17, 15)).astype(np.float32)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    try:
        want = fastconv.conv2d(x, w, padding=1, algorithm=algorithm)
    except ValueError as exc:
        pytest.skip(str(exc))
    got = fd.conv2d(da.from_array(x, chunks=(1, 2, (2, 9, 6), (7, 1, 7))), w, padding=1,
                    algorithm=algorithm).compute(**SYNC)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@FEW
@given(xs=chunked(), ks=pairs(1, 4), stride=pairs(1, 3), dilation=pairs(1, 2), ceil_mode=st.booleans(),
       data=st.data())
def test_max_pool2d_bitwise(xs, ks, stride, dilation, ceil_mode, data):
    x, xd = xs
    padding = data.draw(st.tuples(st.integers(0, ks[0] // 2), st.integers(0, ks[1] // 2)))
    args = (ks, stride, padding, dilation, ceil_mode)
    try:
        want = fastconv.max_pool2d(x, *args)
    except ValueError:
        with pytest.raises(ValueError):
            fd.max_pool2d(xd, *args)
        return
    y = fd.max_pool2d(xd, *args)
    assert y.chunks[:2] == xd.chunks[:2]
    same(y.compute(**SYNC), want)


@FEW
@given(xs=chunked(), ks=pairs(1, 4), stride=pairs(1, 3), ceil_mode=st.booleans(), count_include_pad=st.booleans(),
       data=st.data())
def test_avg_pool2d_bitwise(xs, ks, stride, ceil_mode, count_include_pad, data):
    x, xd = xs
    padding = data.draw(st.tuples(st.integers(0, ks[0] // 2), st.integers(0, ks[1] // 2)))
    args = (ks, stride, padding, ceil_mode, count_include_pad)
    try:
        want = fastconv.avg_pool2d(x, *args)
    except ValueError:
        with pytest.raises(ValueError):
            fd.avg_pool2d(xd, *args)
        return
    same(fd.avg_pool2d(xd, *args).compute(**SYNC), want)


def test_relu_any_shape_and_chunks():
    x = np.random.default_rng(0).standard_normal((3, 5, 7))
    x[0, 0, 0] = np.nan
    y = fd.relu(da.from_array(x, chunks=(2, 3, 4)))
    assert y.chunks == ((2, 1), (3, 2), (4, 3)) and y.dtype == x.dtype
    same(y.compute(**SYNC), fastconv.relu(x))


def test_chunks_smaller_than_kernel_and_stride():
    """Every chunk of one row/column, a 5x5 kernel dilated by 2 (extent 9), stride 3."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((1, 2, 19, 16)).astype(np.float32)
    w = rng.standard_normal((3, 2, 5, 5)).astype(np.float32)
    kw = dict(stride=3, padding=4, dilation=2, algorithm="direct")
    y = fd.conv2d(da.from_array(x, chunks=1), w, **kw)
    same(y.compute(**SYNC), fastconv.conv2d(x, w, **kw))
    same(fd.max_pool2d(da.from_array(x, chunks=1), 5, 3, 2, 2, True).compute(**SYNC),
         fastconv.max_pool2d(x, 5, 3, 2, 2, True))


def test_halo_is_cut_where_its_block_lives():
    """A block's halo from a neighbour is a task of its own (a slice of that block), so only the
    halo travels between workers; after dask's optimisation no output task reads a neighbour's
    whole block (it did: the slice sat inside the consuming task)."""
    import dask
    x = da.from_array(np.arange(2 * 20 * 20, dtype=np.float32).reshape(1, 2, 20, 20), chunks=(1, 2, 10, 10))
    x = x.persist(**SYNC)
    y = fd.conv2d(x, np.ones((3, 2, 3, 3), np.float32), padding=1, algorithm="direct")
    (yo,) = dask.optimize(y)
    graph = dict(yo.__dask_graph__())
    deps = {k: v.dependencies for k, v in graph.items()}

    def blocks_read(key):  # x blocks a task reads, through tasks fused into it
        return {d for d in deps[key] if isinstance(d, tuple) and d[0] == x.name}

    outs = [k for k in graph if isinstance(k, tuple) and k[0] == y.name]
    assert len(outs) == 4
    for k in outs:
        assert blocks_read(k) == {(x.name, 0, 0) + k[3:]}  # its own block only
        halos = [d for d in deps[k] if str(d[0]).startswith("halo-")]
        # output i goes with the block holding its window's first row (i - 1): block 0 holds
        # outputs 0-10 and reads row 10 from block 1 (and the same for columns)
        assert len(halos) == {(0, 0): 3, (0, 1): 1, (1, 0): 1, (1, 1): 0}[k[3:]]
        for h in halos:
            assert len(blocks_read(h)) == 1
    same(y.compute(**SYNC), fastconv.conv2d(x.compute(), np.ones((3, 2, 3, 3), np.float32), padding=1,
                                            algorithm="direct"))


def test_assembly_buffer_reused_and_results_independent():
    """Blocks are assembled in one buffer per thread: two blocks' results computed one after the
    other in one thread are both intact (no result is a view of the buffer)."""
    rng = np.random.default_rng(5)
    a, b = (rng.standard_normal((1, 2, 9, 9)).astype(np.float32) for _ in range(2))
    x1 = _arrays._assemble([[a, a[:, :, :, :2]]], (1, 1), (0, 0))
    x2 = _arrays._assemble([[b], [b[:, :, :1]]], (0, 0), (1, 1))
    assert np.shares_memory(x1, x2)  # the same buffer: x1 is gone
    np.testing.assert_array_equal(x2[:, :, :9, 1:10], b)
    assert (x2[:, :, :, 0] == 0).all() and (x2[:, :, :, -1] == 0).all()
    w = np.ones((1, 2, 3, 3), np.float32)
    da_x = da.from_array(np.concatenate([a, b], axis=2), chunks=(1, 2, 5, 4))
    ys = [fd.conv2d(da_x, w, padding=p, algorithm="direct") for p in (1, 2)]
    got = da.compute(*ys, **SYNC)
    for y, p in zip(got, (1, 2)):
        same(y, fastconv.conv2d(np.concatenate([a, b], axis=2), w, padding=p, algorithm="direct"))


# --------------------------------------------------------------------------- laziness, meta, errors
def _poisoned(shape, dtype, chunks):
    """A dask array whose blocks raise when computed: building on it must not compute it."""
    def boom(block):
        raise AssertionError("computed while building the graph")
    return da.zeros(shape, dtype=dtype, chunks=chunks).map_blocks(boom, dtype=dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_lazy_with_meta(dtype):
    x = _poisoned((4, 3, 32, 30), dtype, (2, 3, 10, 8))
    w = np.ones((5, 3, 3, 3), dtype)
    for y, shape in [(fd.conv2d(x, w, stride=2, padding=1), (4, 5, 16, 15)),
                     (fd.max_pool2d(x, 2), (4, 3, 16, 15)),
                     (fd.avg_pool2d(x, 3, 2, 1), (4, 3, 16, 15)),
                     (fd.relu(x), (4, 3, 32, 30))]:
        assert y.shape == shape and y.dtype == dtype
        assert type(y._meta) is np.ndarray and y._meta.ndim == 4 and y._meta.dtype == dtype
        assert sum(y.chunks[2]) == shape[2] and sum(y.chunks[3]) == shape[3]


def test_output_chunks_follow_input_chunks_over_stride():
    x = da.zeros((2, 3, 64, 64), dtype=np.float32, chunks=(1, 3, 16, 32))
    y = fd.conv2d(x, np.ones((4, 3, 3, 3), np.float32), stride=2)  # output i reads rows from 2*i
    assert y.chunks == ((1, 1), (4,), (8, 8, 8, 7), (16, 15))


@pytest.mark.parametrize("call, exc, match", [
    (lambda: fd.conv2d(np.zeros((1, 1, 4, 4), np.int32), np.ones((1, 1, 3, 3))), TypeError, "float32 or float64"),
    (lambda: fd.conv2d(da.zeros((1, 4, 4)), np.ones((1, 1, 3, 3))), ValueError, "must be 4-D"),
    (lambda: fd.conv2d([1.0], np.ones((1, 1, 3, 3))), TypeError, "dask.array.Array or numpy.ndarray"),
    (lambda: fd.conv2d(da.zeros((1, 1, 4, 4)), np.ones((1, 1, 3, 3)), stride=0), ValueError, "stride must be positive"),
    (lambda: fd.conv2d(da.zeros((1, 1, 4, 4)), np.ones((1, 1, 5, 5))), ValueError, "must fit"),
    (lambda: fd.conv2d(da.zeros((1, 1, 4, 4)), np.ones((1, 1, 3, 3)), algorithm="nope"), ValueError, "algorithm"),
    (lambda: fd.max_pool2d(da.zeros((1, 1, 4, 4)), 2, padding=2), ValueError, "at most half"),
    (lambda: fd.predict(None, da.zeros((1, 1, 4, 4))), TypeError, "callable"),
])
def test_errors(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


# --------------------------------------------------------------------------- predict
def test_predict_equals_model():
    model = build_model((1, 8, 8), rng=0)
    x = np.random.default_rng(1).standard_normal((11, 1, 8, 8)).astype(np.float32)
    y = fd.predict(model, da.from_array(x, chunks=(3, 1, 4, 8)))
    assert y.shape == (11, 10) and y.chunks == ((3, 3, 3, 2), (10,)) and y.dtype == np.float32
    np.testing.assert_allclose(y.compute(**SYNC), copy.deepcopy(model)(x), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- clusters
def _batch(n=24, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, 1, 8, 8)).astype(np.float32), rng.integers(0, 10, n)


def _reference_steps(model, x, y, steps):
    model = copy.deepcopy(model)
    opt, loss_fn = SGD(model.parameters(), lr=0.1, momentum=0.9), CrossEntropyLoss()
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        losses.append(loss_fn(model(x), y))
        model.backward(loss_fn.backward(), input_grad=False)
        opt.step()
    return model, losses


def _check_steps(client, loss_fn=None, steps=2, **kw):
    x, y = _batch()
    model = build_model((1, 8, 8), rng=0)
    want, want_losses = _reference_steps(model, x, y, steps)
    opt, loss_fn = SGD(model.parameters(), lr=0.1, momentum=0.9), loss_fn or CrossEntropyLoss()
    losses = [fd.train_step(model, loss_fn, opt, x, y, client=client, **kw) for _ in range(steps)]
    np.testing.assert_allclose(losses, want_losses, rtol=1e-5)
    # each shard counted exactly once: a lost or duplicated shard would move these by far more
    for p, q in zip(model.parameters(), want.parameters()):
        np.testing.assert_allclose(p.data, q.data, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def thread_client():
    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(n_workers=2, threads_per_worker=2, processes=False, dashboard_address=":0") as c, \
            distributed.Client(c) as client:
        yield client


@pytest.fixture(scope="module")
def process_client():
    distributed = pytest.importorskip("distributed")
    import cloudpickle
    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import this file
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as c, \
            distributed.Client(c) as client:
        yield client


def test_threaded_cluster_train_step_and_ops(thread_client):
    """Two workers of two threads in this process: four fastconv calls at once (the threading layer
    must allow it), numba's pool sized to cores // 4 threads."""
    chosen = fd.setup_workers(thread_client)
    assert set(chosen.values()) == {max(1, _training._cores() // 4)}
    _check_steps(thread_client, shards=5, split_every=2)
    x = np.random.default_rng(0).standard_normal((2, 3, 20, 18)).astype(np.float32)
    w = np.ones((4, 3, 3, 3), np.float32)
    got = fd.conv2d(da.from_array(x, chunks=(1, 3, 6, 7)), w, padding=1, algorithm="direct").compute()
    same(got, fastconv.conv2d(x, w, padding=1, algorithm="direct"))
    from fastconv.layers import Conv2d, MaxPool2d, ReLU, Sequential
    net = Sequential(Conv2d(3, 4, 3, padding=1, algorithm="direct", rng=0), ReLU(), MaxPool2d(2),
                     Conv2d(4, 2, 3, algorithm="direct", rng=1))
    tiles = fd.predict(net, da.from_array(x, chunks=(1, 3, 6, 7)), tiles=True).compute()
    same(tiles, np.asarray(net(x).data))


def test_dask_input_shards(thread_client):
    x, y = _batch(12)
    model = build_model((1, 8, 8), rng=0)
    want, want_losses = _reference_steps(model, x, y, 1)
    loss, grads = fd.gradients(model, CrossEntropyLoss(), da.from_array(x, chunks=(5, 1, 8, 8)), y,
                               client=thread_client, split_every=3)
    ref = copy.deepcopy(model)
    lf = CrossEntropyLoss()
    lf(ref(x), y)
    ref.backward(lf.backward(), input_grad=False)
    assert loss == pytest.approx(want_losses[0], rel=1e-5)
    for g, p in zip(grads, ref.parameters()):
        np.testing.assert_allclose(g, p.grad, rtol=1e-5, atol=1e-6)


def test_process_cluster_train_step(process_client):
    chosen = fd.setup_workers(process_client)
    assert len(chosen) == 2 and set(chosen.values()) == {max(1, _training._cores() // 2)}
    _check_steps(process_client, shards=4)


def test_client_by_scheduler_address(process_client):
    """The same calls through a Client made from the scheduler's address, as a user reaches a real
    cluster (``Client("tcp://host:8786")``)."""
    distributed = pytest.importorskip("distributed")
    address = process_client.scheduler.address
    assert address.startswith("tcp://")
    with distributed.Client(address, set_as_default=False) as remote:
        assert len(fd.setup_workers(remote)) == 2
        _check_steps(remote, steps=1, shards=3)
        x = np.random.default_rng(4).standard_normal((2, 3, 16, 12)).astype(np.float32)
        w = np.ones((2, 3, 3, 3), np.float32)
        got = remote.compute(fd.conv2d(da.from_array(x, chunks=(1, 3, 5, 5)), w, padding=1,
                                       algorithm="direct")).result()
        same(got, fastconv.conv2d(x, w, padding=1, algorithm="direct"))


def _faults_of_a_reused_4mb_buffer(dask_worker=None):
    """Minor page faults of allocating and filling a 4 MiB array after one was freed (this thread)."""
    import resource
    np.ones(2**20, np.float32)
    before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
    np.ones(2**20, np.float32)
    return resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before


GLIBC = sys.platform.startswith("linux") and os.confstr("CS_GNU_LIBC_VERSION") is not None


@pytest.mark.skipif(not GLIBC, reason="mallopt is glibc's")
def test_keep_freed_blocks_under_dasks_malloc_setting():
    """With dask's MALLOC_TRIM_THRESHOLD_ a 4 MiB temporary is fresh memory every time (1024 page
    faults); after _keep_freed_blocks the freed one is reused."""
    import subprocess
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import test_dask as t; "
            "from fastconv.dask._training import _keep_freed_blocks as k; "
            "print(t._faults_of_a_reused_4mb_buffer(), k(), t._faults_of_a_reused_4mb_buffer())")
    env = dict(os.environ, MALLOC_TRIM_THRESHOLD_="65536")
    out = subprocess.run([sys.executable, "-c", code, os.path.dirname(__file__)], env=env, check=True,
                         capture_output=True, text=True, timeout=300).stdout.split()
    before, applied, after = int(out[0]), out[1], int(out[2])
    assert before >= 256 and applied == "True" and after < 64, out


@pytest.mark.skipif(not GLIBC, reason="mallopt is glibc's")
def test_workers_malloc_reuses_freed_blocks(process_client):
    fd.setup_workers(process_client)
    assert all(process_client.run(lambda dask_worker: dask_worker.plugins[fd.FastconvThreads.name].malloc_set)
               .values())
    assert max(process_client.run(_faults_of_a_reused_4mb_buffer).values()) < 64


class KillOnce(CrossEntropyLoss):
    """A loss that kills the worker process computing it, the first time any worker computes it."""

    def __init__(self, marker):
        super().__init__()
        self.marker = marker

    def __call__(self, logits, target):
        try:
            fd_ = os.open(self.marker, os.O_CREAT | os.O_EXCL)
        except FileExistsError:
            return super().__call__(logits, target)
        os.close(fd_)
        os._exit(1)


def test_worker_killed_mid_step(process_client, tmp_path):
    """The step is rerun after the lost worker and gives the single-process result; with no retry
    left it says what happened."""
    _check_steps(process_client, loss_fn=KillOnce(str(tmp_path / "killed-1")), steps=1, shards=4)
    assert (tmp_path / "killed-1").exists()
    process_client.wait_for_workers(2, timeout=120)
    x, y = _batch()
    model = build_model((1, 8, 8), rng=0)
    with pytest.raises(RuntimeError, match="workers or connections were lost"):
        fd.gradients(model, KillOnce(str(tmp_path / "killed-2")), x, y, client=process_client, shards=4,
                     retries=0)


# --------------------------------------------------------------------------- packaging, docs
def test_import_fastconv_does_not_import_dask():
    """Dask is an optional extra: no module of the package but fastconv.dask's imports it (read from
    the sources: a fresh interpreter importing numba took 5-19 s on the shared test machine)."""
    import ast
    import pathlib
    root = pathlib.Path(fastconv.__file__).parent
    for path in root.rglob("*.py"):
        if path.parent == root / "dask":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [("." * node.level) + (node.module or "")] + [a.name for a in node.names]
            else:
                continue
            for name in names:
                assert name.split(".")[0] not in ("dask", "distributed") and name not in (".dask", "dask"), \
                    f"{path.name} imports {name}"


def test_docstring_examples():
    """The examples of fastconv.dask, but those that start a cluster (the two fixtures above are the
    file's only clusters)."""
    import doctest
    finder, runner = doctest.DocTestFinder(), doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    tests = [t for m in (fd, _arrays, _training) for t in finder.find(m)
             if t.examples and not t.name.endswith(("train_step", "setup_workers"))]
    assert len(tests) >= 5
    for t in tests:
        runner.run(t)
    assert runner.failures == 0


def test_predict_graph_does_not_carry_client_activations():
    """A model used on a big batch on the client holds that batch's activations for its backward;
    the graph gets a copy that has seen one sample."""
    import pickle
    model = build_model((1, 8, 8), rng=0)
    x = np.zeros((2000, 1, 8, 8), np.float32)
    model(x)  # records a graph holding about 2000 * 16 * 64 floats per layer
    y = fd.predict(model, da.from_array(x, chunks=500))
    shipped = [v for k, v in dict(y.__dask_graph__()).items() if str(k).startswith("fastconv-model-")]
    assert len(shipped) == 1 and shipped[0] is not model
    # the copy holds weights and grads (0.3 MB) and one sample's activations; a pickled module leaves
    # its last forward's graph behind, so the client's model pickles small too
    assert len(pickle.dumps(shipped[0])) < 1_000_000
    assert model._last_out is not None and len(pickle.dumps(model)) < 1_000_000


def test_threads_plugin_refuses_workqueue_with_threaded_workers(monkeypatch):
    """numba's workqueue layer aborts when several worker threads call parallel kernels at once."""
    import asyncio
    import types

    import numba
    monkeypatch.setattr(numba, "threading_layer", lambda: "workqueue")
    worker = types.SimpleNamespace(state=types.SimpleNamespace(nthreads=2), address="tcp://127.0.0.1:1")
    with pytest.raises(RuntimeError, match="workqueue"):
        asyncio.run(fd.FastconvThreads().setup(worker))
    with pytest.raises(ValueError, match="threads must be a positive int"):
        fd.FastconvThreads(0)
    for bad in (0, -1, 2**25 + 1, 1.5, True):
        with pytest.raises(ValueError, match=r"FastconvThreads: mmap_threshold must be None or an int in"):
            fd.FastconvThreads(mmap_threshold=bad)
