"""Whole models on Dask: :func:`predict` over a chunked batch, data-parallel :func:`gradients` /
:func:`train_step` on a ``distributed.Client``, and the worker plugin that sizes fastconv's threads.
"""
from __future__ import annotations

import copy
import os
import uuid

import dask
import dask.array as da
import numpy as np
from dask.highlevelgraph import HighLevelGraph

from .._threads import max_threads, set_num_threads
from ._arrays import _as_dask, _meta
from ._tiles import predict_tiles

try:
    from distributed import WorkerPlugin as _WorkerPlugin
except ImportError:  # pragma: no cover - predict and the array ops need only dask.array
    _WorkerPlugin = object


# --------------------------------------------------------------------------- models
def _lean(model, sample_shape, dtype):
    """A copy of ``model`` that has run on one sample of zeros, and the output of that run.

    Layers keep what their backward needs from the last forward (inputs, indices): a model used on
    a batch on the client would carry that batch's activations into every graph or scatter.  After
    a one-sample forward the copy carries one sample's.
    """
    lean = copy.deepcopy(model)
    lean(np.zeros((1,) + tuple(sample_shape), dtype))  # recording, so it replaces what the last forward kept
    return lean, _infer(lean, np.zeros((1,) + tuple(sample_shape), dtype))


class _Predict:
    """Runs the model on one batch block, on a private copy: layers keep what their backward needs
    (an input, indices), which would race between tasks sharing one worker's model and keep each
    block's activations alive after the task."""

    def __call__(self, model, x):
        return _infer(copy.deepcopy(model), x)


def predict(model, x, *, batch_chunk=None, tiles=None):
    """Run a fastconv model (anything called as ``model(x)`` on a NumPy batch) over a dask array
    chunked along its first axis, one task per batch block; or, for a fully convolutional model
    over images chunked over ``H`` and ``W`` too, one task per output tile.

    Parameters
    ----------
    model : callable
        E.g. a :class:`fastconv.layers.Sequential`.  Stored once in the graph (one copy per worker,
        not one per task); each task runs a private copy of it.
    x : dask.array.Array or numpy.ndarray, shape (N, ...)
        Without tiles the other axes are rechunked to one chunk each.
    batch_chunk : int, optional
        Rechunk the batch axis to this many samples per block.
    tiles : bool, optional
        Tile by tile over ``H`` and ``W`` (``x`` of shape (N, C, H, W)): each task runs every layer
        on its input tile plus the halo the whole stack needs, read from the neighbouring blocks,
        and writes one output tile (chunked as chaining :func:`conv2d` and the pools would chunk
        it); a worker holds a tile's activations, not bands of every layer.  The model must be a
        ``Sequential`` of ``Conv2d``, ``MaxPool2d``, ``AvgPool2d``, ``ReLU``, ``ReLU6``,
        ``LeakyReLU``, and ``BatchNorm2d``/``Dropout`` in eval mode.  Default: tiles when ``x`` is
        chunked over ``H`` or ``W`` and the model is such a stack, else whole samples.  ``True``
        raises for a model that cannot run tile by tile.  The result equals the in-memory call
        bitwise with ``algorithm='direct'`` convolutions.

    Returns
    -------
    dask.array.Array, shape (N, ...), lazy; the shape and dtype of one sample's output are found by
    running the model once, on the client, on one sample of zeros.

    Examples
    --------
    >>> import numpy as np, fastconv.dask as fd
    >>> from fastconv.layers import Conv2d, ReLU, MaxPool2d, Flatten, Linear, Sequential
    >>> net = Sequential(Conv2d(1, 4, 3, padding=1, rng=0), ReLU(), MaxPool2d(2), Flatten(), Linear(64, 10, rng=1))
    >>> x = np.random.default_rng(0).standard_normal((10, 1, 8, 8)).astype(np.float32)
    >>> y = fd.predict(net, x, batch_chunk=4)
    >>> y.chunks, bool(np.allclose(y.compute(scheduler="sync"), np.asarray(net(x)), rtol=1e-6, atol=1e-6))
    (((4, 4, 2), (10,)), True)
    """
    fn = "fastconv.dask.predict"
    if not callable(model):
        raise TypeError(f"{fn}: model must be callable (a fastconv model), got {type(model).__name__}")
    x = _as_dask(fn, x, ndim=None)
    if x.ndim < 1:
        raise ValueError(f"{fn}: input must have a batch axis, got a 0-D array")
    if batch_chunk is not None:
        if isinstance(batch_chunk, bool) or not isinstance(batch_chunk, (int, np.integer)) or batch_chunk < 1:
            raise ValueError(f"{fn}: batch_chunk must be a positive int, got {batch_chunk!r}")
    if tiles not in (None, True, False):
        raise TypeError(f"{fn}: tiles must be None, True or False, got {tiles!r}")
    if batch_chunk:
        x = x.rechunk({0: int(batch_chunk)})
    if tiles or (tiles is None and x.ndim == 4 and (len(x.chunks[2]) > 1 or len(x.chunks[3]) > 1)):
        if x.ndim != 4:
            raise ValueError(f"{fn}: tiles=True needs an input of shape (N, C, H, W), got {x.ndim}-D")
        try:
            return predict_tiles(fn, model, x)
        except (TypeError, ValueError):
            if tiles:
                raise
    x = x.rechunk({i: -1 for i in range(1, x.ndim)})
    model, probe = _lean(model, x.shape[1:], x.dtype)
    name = f"fastconv-predict-{uuid.uuid4().hex}"  # a model has no cheap deterministic token
    mkey = f"fastconv-model-{uuid.uuid4().hex}"
    dsk = {mkey: model}
    tail = (0,) * (probe.ndim - 1)
    for i in range(len(x.chunks[0])):
        dsk[(name, i) + tail] = (_Predict(), mkey, (x.name, i) + (0,) * (x.ndim - 1))
    chunks = (x.chunks[0],) + tuple((d,) for d in probe.shape[1:])
    graph = HighLevelGraph.from_collections(name, dsk, dependencies=[x])
    return da.Array(graph, name, chunks, meta=_meta(probe.dtype, probe.ndim))


# --------------------------------------------------------------------------- data-parallel training
# The three functions below are the only code that knows how fastconv's layers run a backward pass
# and where gradients live.  Today: ``model.backward(loss_fn.backward())`` and ``Parameter.grad``;
# with a ``loss.backward()`` Module API only their bodies change.
def _loss_and_backward(model, loss_fn, x, y):
    """Forward, loss and backward of one shard; adds the gradients into the parameters, returns the loss.

    A loss that has its own ``backward`` (a tensor of an autograd Module API) is differentiated with
    ``loss.backward()``; a plain float with the layers' ``model.backward(loss_fn.backward())``.
    """
    loss = loss_fn(model(x), y)
    if hasattr(loss, "backward"):
        loss.backward()
        return float(loss.item())
    model.backward(loss_fn.backward(), input_grad=False)
    return float(loss)


def _infer(model, x):
    """``model(x)`` as a NumPy array, without recording a backward where the API records one."""
    try:
        from .autograd import no_grad
    except ImportError:
        out = model(x)
    else:
        with no_grad():
            out = model(x)
    return out if isinstance(out, np.ndarray) else np.asarray(getattr(out, "data", out))


def _zero_grads(model):
    for p in model.parameters():
        p.grad[...] = 0


def _grads(model):
    return [p.grad for p in model.parameters()]


def _shard_gradients(model, loss_fn, x, y, scale):
    """One shard on a worker: a private copy of the scattered model (tasks on one worker share it),
    forward, loss, backward; gradients and loss scaled by the shard's share of the batch."""
    model, loss_fn = copy.deepcopy(model), copy.deepcopy(loss_fn)
    _zero_grads(model)
    loss = _loss_and_backward(model, loss_fn, x, y)
    return [g * g.dtype.type(scale) for g in _grads(model)], loss * scale


def _sum_shards(*results):
    """Tree-reduction node: gradients added in the listed order (a fixed tree, so a fixed sum)."""
    grads = [g.copy() for g in results[0][0]]
    loss = results[0][1]
    for gs, lo in results[1:]:
        for a, b in zip(grads, gs):
            a += b
        loss += lo
    return grads, loss


def _get_client(fn, client):
    from distributed import Client, default_client
    if client is None:
        try:
            return default_client()
        except ValueError:
            raise ValueError(f"{fn}: client must be a distributed.Client (none given and no default "
                             f"client running)") from None
    if not isinstance(client, Client):
        raise TypeError(f"{fn}: client must be a distributed.Client, got {type(client).__name__}")
    return client


def _total_threads(client):
    return sum(w["nthreads"] for w in client.scheduler_info(n_workers=-1)["workers"].values()) or 1


def _shards(fn, client, x, y, shards):
    """Futures of ``(x_i, y_i)`` shards and their sizes.  NumPy inputs are split into ``shards``
    nearly equal parts (default: one per worker thread) and scattered; a dask ``x`` is split along its
    batch chunks (``y`` rechunked to match) and computed on the workers."""
    if isinstance(x, da.Array):
        y = da.asarray(y)
        x = x.rechunk({i: -1 for i in range(1, x.ndim)})
        y = y.rechunk((x.chunks[0],) + tuple((d,) for d in y.shape[1:]))
        xs, ys = x.to_delayed().ravel(), y.to_delayed().ravel()
        sizes = list(x.chunks[0])
        futs = client.compute([dask.delayed(tuple)([a, b]) for a, b in zip(xs, ys)])
        return [(f, s) for f, s in zip(futs, sizes) if s]
    if not isinstance(x, np.ndarray) or not isinstance(y, np.ndarray):
        raise TypeError(f"{fn}: x and y must both be numpy arrays, or x a dask array, got "
                        f"{type(x).__name__} and {type(y).__name__}")
    if x.shape[:1] != y.shape[:1] or x.shape[0] == 0:
        raise ValueError(f"{fn}: x and y must have the same positive batch size, got {x.shape} and {y.shape}")
    if shards is None:
        shards = _total_threads(client)
    if isinstance(shards, bool) or not isinstance(shards, (int, np.integer)) or shards < 1:
        raise ValueError(f"{fn}: shards must be a positive int, got {shards!r}")
    cuts = np.array_split(np.arange(x.shape[0]), min(int(shards), x.shape[0]))
    parts = [(x[c[0]:c[-1] + 1], y[c[0]:c[-1] + 1]) for c in cuts]
    futs = client.scatter(parts, hash=False)
    return list(zip(futs, [len(c) for c in cuts]))


def _infrastructure_errors():
    """Errors that say a worker or a connection went away, not that the step itself is wrong."""
    from distributed import KilledWorker
    from distributed.client import FutureCancelledError
    from distributed.comm.core import CommClosedError
    import asyncio
    return (KilledWorker, FutureCancelledError, CommClosedError, asyncio.CancelledError, OSError, TimeoutError)


def gradients(model, loss_fn, x, y, *, client=None, shards=None, split_every=2, retries=1):
    """A batch's loss and parameter gradients, computed shard by shard on a Dask cluster.

    The model (its weights) is scattered once, to every worker (``broadcast=True``); each shard is
    a task -- forward, loss and backward on a private copy of the model -- whose gradients, scaled by
    the shard's share of the batch, are summed by a tree reduction on the workers.  Only the sum
    comes back.  The result equals the single-process gradients of the whole batch up to rounding.

    Parameters
    ----------
    model : fastconv model
        E.g. a :class:`fastconv.layers.Sequential`; only ``model(x)``, ``model.parameters()`` and the
        backward call in ``_loss_and_backward`` are used.
    loss_fn : fastconv loss, e.g. :class:`fastconv.layers.CrossEntropyLoss`
        Its ``reduction`` ('mean', the default, or 'sum') says how shards are weighted.
    x, y : numpy.ndarray, or x a dask array chunked along the batch
        The batch and its targets.
    client : distributed.Client, optional
        Default: the current client.  ``Client("tcp://scheduler:8786")`` runs on a real cluster.
    shards : int, optional
        Shards of a NumPy batch (default: the number of worker threads).
    split_every : int
        Fan-in of the tree reduction (>= 2).
    retries : int
        Times the whole step is run again after a worker or connection is lost (the step has no
        side effect until it returns, so a rerun neither loses nor double-counts a shard).

    Returns
    -------
    loss : float
    grads : list of ndarray
        In ``model.parameters()`` order.

    Raises
    ------
    RuntimeError
        The step failed on every attempt because workers or connections were lost; the last
        error is chained.
    """
    fn = "fastconv.dask.gradients"
    client = _get_client(fn, client)
    if isinstance(split_every, bool) or not isinstance(split_every, (int, np.integer)) or split_every < 2:
        raise ValueError(f"{fn}: split_every must be an int >= 2, got {split_every!r}")
    if isinstance(retries, bool) or not isinstance(retries, (int, np.integer)) or retries < 0:
        raise ValueError(f"{fn}: retries must be an int >= 0, got {retries!r}")
    reduction = getattr(loss_fn, "reduction", "mean")
    errors = _infrastructure_errors()
    last = None
    for attempt in range(int(retries) + 1):
        try:
            return _gradients_once(fn, client, model, loss_fn, x, y, shards, int(split_every), reduction)
        except errors as exc:
            last = exc
    raise RuntimeError(f"{fn}: the step failed on all {int(retries) + 1} attempts because workers or "
                       f"connections were lost; last error: {type(last).__name__}: {last}") from last


def _gradients_once(fn, client, model, loss_fn, x, y, shards, split_every, reduction):
    parts = _shards(fn, client, x, y, shards)
    total = sum(n for _, n in parts)
    # hash=False: a new key every step (a content hash of a model may fall back on its id, and
    # would then hand the workers last step's weights)
    lean, _ = _lean(model, x.shape[1:], x.dtype)  # without the activations of a client-side forward
    model_f = client.scatter(lean, broadcast=True, hash=False)
    level = [client.submit(_shard_task, model_f, loss_fn, f, n / total if reduction == "mean" else 1.0,
                           pure=False) for f, n in parts]
    while len(level) > 1:
        level = [client.submit(_sum_shards, *level[i:i + split_every], pure=False)
                 for i in range(0, len(level), split_every)]
    grads, loss = level[0].result()
    return loss, grads


def _shard_task(model, loss_fn, xy, scale):
    return _shard_gradients(model, loss_fn, xy[0], xy[1], scale)


def train_step(model, loss_fn, optimizer, x, y, *, client=None, shards=None, split_every=2, retries=1):
    """One data-parallel training step: :func:`gradients` on the cluster, then one optimiser step on
    the client (``optimizer.zero_grad()``, gradients added to ``.grad``, ``optimizer.step()``), as the
    single-process step ``zero_grad(); loss_fn(model(x), y); backward; step()``.

    Returns
    -------
    float
        The batch's loss (before the step).

    Examples
    --------
    >>> import numpy as np
    >>> from distributed import Client, LocalCluster
    >>> from fastconv.layers import Conv2d, ReLU, Flatten, Linear, Sequential, CrossEntropyLoss, SGD
    >>> import fastconv.dask as fd
    >>> net = Sequential(Conv2d(1, 4, 3, rng=0), ReLU(), Flatten(), Linear(4 * 6 * 6, 3, rng=1))
    >>> opt, loss_fn = SGD(net.parameters(), lr=0.1), CrossEntropyLoss()
    >>> x = np.random.default_rng(0).standard_normal((16, 1, 8, 8)).astype(np.float32)
    >>> y = np.arange(16) % 3
    >>> with LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=":0") as cluster, \\
    ...         Client(cluster) as client:
    ...     losses = [fd.train_step(net, loss_fn, opt, x, y, client=client) for _ in range(10)]
    >>> losses[-1] < losses[0]
    True
    """
    loss, grads = gradients(model, loss_fn, x, y, client=client, shards=shards, split_every=split_every,
                            retries=retries)
    optimizer.zero_grad()
    for p, g in zip(model.parameters(), grads):
        p.grad += g
    optimizer.step()
    return loss


# --------------------------------------------------------------------------- threads on workers
# glibc's mallopt parameter numbers, and the largest mmap threshold it accepts on 64-bit (4 MiB * 8)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MMAP_THRESHOLD_MAX = 32 * 2**20


def _keep_freed_blocks(threshold=_MMAP_THRESHOLD_MAX):
    """Serve allocations below ``threshold`` bytes from malloc's heap, and keep up to twice that
    freed at the heap's top, instead of mapping and unmapping fresh pages for each temporary.

    Dask's nanny starts workers with ``MALLOC_TRIM_THRESHOLD_=65536``: any malloc tunable switches
    off glibc's adaptive thresholds, so every temporary over 128 KiB (a block's output, a padded
    copy, a column panel) is fresh memory whose pages fault on first touch: one 16-channel 256 x 256
    convolution took 4.0 ms in a worker against 2.0 ms in memory.  These are the values glibc's own
    adaptive thresholds reach for a ``threshold``-sized block (mmap threshold = block, trim = twice
    it); so a worker returns memory to the system above that, as a process without dask's setting
    does.  Returns True where it was applied (glibc), else False.
    """
    import ctypes
    import ctypes.util
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (macOS, Windows, musl without mallopt)
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, int(threshold))) and bool(mallopt(_M_TRIM_THRESHOLD, 2 * int(threshold)))


def _cores():
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return os.cpu_count() or 1


class FastconvThreads(_WorkerPlugin):
    """Worker plugin: size numba's pool (and numpy's BLAS) in each worker so that the worker threads
    of one host times fastconv's threads stay within its cores.

    Register with :func:`setup_workers` (or ``client.register_plugin(FastconvThreads())``); workers
    that join later (a restarted one) get it too.

    Parameters
    ----------
    threads : int, optional
        fastconv threads per worker thread.  Default: ``max(1, cores // threads_on_this_host)``,
        where ``threads_on_this_host`` is the sum of ``nthreads`` of the workers the scheduler knows
        on the worker's host when it starts (itself included).
    mmap_threshold : int or None, optional
        Bytes below which the worker's malloc (glibc) serves allocations from its heap rather than
        from fresh memory mappings, keeping up to twice that freed for reuse; at most 32 MiB
        (glibc's limit), default 32 MiB; ``None`` leaves malloc as dask set it.  Dask's nanny sets
        ``MALLOC_TRIM_THRESHOLD_``, which switches glibc's adaptive thresholds off, so without this
        every temporary over 128 KiB page-faults afresh: a 16-channel 256 x 256 convolution ran at
        half speed in a worker (4.0 against 2.0 ms).

    Notes
    -----
    Several worker threads call fastconv's parallel kernels at once, which numba's ``workqueue``
    threading layer does not allow (it aborts the process); fastconv selects the ``'threadsafe'``
    layer (OpenMP or TBB) unless ``NUMBA_THREADING_LAYER`` is set, and this plugin refuses to set up
    a multi-threaded worker whose layer is ``workqueue``.
    """

    name = "fastconv-threads"
    idempotent = False

    def __init__(self, threads=None, mmap_threshold=_MMAP_THRESHOLD_MAX):
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, (int, np.integer))
                                    or threads < 1):
            raise ValueError(f"FastconvThreads: threads must be a positive int, got {threads!r}")
        if mmap_threshold is not None and (
                isinstance(mmap_threshold, bool) or not isinstance(mmap_threshold, (int, np.integer))
                or not 0 < mmap_threshold <= _MMAP_THRESHOLD_MAX):
            raise ValueError(f"FastconvThreads: mmap_threshold must be None or an int in "
                             f"(0, {_MMAP_THRESHOLD_MAX}] bytes, got {mmap_threshold!r}")
        self.threads = threads
        self.mmap_threshold = None if mmap_threshold is None else int(mmap_threshold)
        self.chosen = None
        self.malloc_set = False

    async def setup(self, worker):
        import numba
        nthreads = worker.state.nthreads
        if nthreads > 1 and numba.threading_layer() == "workqueue":
            raise RuntimeError(
                f"FastconvThreads: worker {worker.address} runs {nthreads} threads but numba's threading "
                f"layer is 'workqueue', which aborts on concurrent parallel calls; unset "
                f"NUMBA_THREADING_LAYER (fastconv then picks 'threadsafe') or use threads_per_worker=1")
        n = self.threads
        if n is None:
            host = worker.address.rsplit(":", 1)[0]
            here = nthreads
            try:
                info = await worker.scheduler.identity()
                here = sum(w["nthreads"] for a, w in info["workers"].items()
                           if a.rsplit(":", 1)[0] == host and a != worker.address) + nthreads
            except Exception:  # the scheduler may be busy; then count this worker only
                pass
            n = max(1, _cores() // max(here, 1))
        n = min(int(n), max_threads())
        set_num_threads(n)
        self.chosen = n
        if self.mmap_threshold is not None:
            self.malloc_set = _keep_freed_blocks(self.mmap_threshold)


def setup_workers(client=None, threads=None, mmap_threshold=_MMAP_THRESHOLD_MAX):
    """Register :class:`FastconvThreads` on every worker of ``client``; returns ``{worker: threads}``.

    ``threads`` and ``mmap_threshold`` are :class:`FastconvThreads`'s: fastconv threads per worker
    thread (default: the host's cores shared out), and the allocation size below which the worker's
    malloc reuses freed memory (default 32 MiB; ``None`` keeps dask's setting).

    Examples
    --------
    >>> from distributed import Client, LocalCluster
    >>> import fastconv.dask as fd
    >>> with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=":0") as c, \\
    ...         Client(c) as client:
    ...     sorted(fd.setup_workers(client, threads=1).values())
    [1]
    """
    client = _get_client("fastconv.dask.setup_workers", client)
    client.register_plugin(FastconvThreads(threads, mmap_threshold))

    def _report(dask_worker):
        return dask_worker.plugins[FastconvThreads.name].chosen

    return client.run(_report)
