"""The named shape suite and the helpers the asv benchmarks share.

``fastconv/cases.py`` of this working tree is loaded by file path, not imported from the installed
fastconv: asv runs these benchmarks against wheels built from older commits, which may predate it.
Everything else here touches fastconv only through its public API (``conv2d``, ``conv2d_backward``,
``algorithms``, the pooling functions), for the same reason.
"""
import importlib.util
import os
import sys
import time

import numpy as np

try:
    from asv_runner.benchmarks.mark import SkipNotImplemented
except ImportError:  # older asv: a NotImplementedError from setup skips the benchmark too
    SkipNotImplemented = NotImplementedError

_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fastconv", "cases.py")
_NAME = "_fastconv_working_tree_cases"
if _NAME not in sys.modules:
    _spec = importlib.util.spec_from_file_location(_NAME, _PATH)
    _mod = importlib.util.module_from_spec(_spec)
    sys.modules[_NAME] = _mod  # dataclasses look their module up while the class is built
    _spec.loader.exec_module(_mod)
_cases = sys.modules[_NAME]

ConvCase = _cases.ConvCase
PoolCase = _cases.PoolCase
load_suite = _cases.load_suite

SUITE = load_suite()
CONV = {c.name: c for c in SUITE.conv}
POOL = {c.name: c for c in SUITE.pool}
#: Cases whose float32 input + weight + output exceed 20 MB: the ones worth a peakmem_ figure.
LARGE = [c.name for c in SUITE.conv if c.nbytes > 20e6]
CONV_PASSES = ["forward", "backward"]


def algorithms():
    """``'auto'`` and the algorithms registered in the installed fastconv (read at discovery time)."""
    import fastconv
    return ["auto"] + list(getattr(fastconv, "algorithms", lambda: ("direct",))())


def _channels_last(a):
    """``a`` (N, C, H, W) with channels_last (NHWC) memory, as ``tensor.numpy()`` of a PyTorch
    channels_last tensor gives it."""
    return np.ascontiguousarray(a.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)


def conv_call(case, algorithm, pass_, layout="nchw"):
    """A warmed zero-argument function running one pass of ``case`` with ``algorithm``, on NCHW
    arrays or (``layout='cl'``) channels_last ones.

    The first call (JIT compile or cache load) happens here, so it lands in ``setup``, never in a
    ``time_`` figure.  An algorithm that is unknown to this commit's fastconv or cannot serve the
    case raises :class:`SkipNotImplemented`.
    """
    import fastconv
    x, w, b = case.arrays()
    if layout == "cl":
        x = _channels_last(x)
    kw = case.kwargs
    if pass_ == "forward":
        def fn():
            return fastconv.conv2d(x, w, b, **kw, algorithm=algorithm)
    else:
        gy = case.grad_output()
        if layout == "cl":
            gy = _channels_last(gy)

        def fn():
            return fastconv.conv2d_backward(gy, x, w, **kw, algorithm=algorithm)
    try:
        fn()
    except ValueError as exc:
        msg = str(exc)
        # AlgorithmUnavailable: this algorithm cannot serve the case; an unknown name: an older commit
        if isinstance(exc, getattr(fastconv, "AlgorithmUnavailable", ())) or "algorithm must be one of" in msg:
            raise SkipNotImplemented(msg) from None
        raise
    except TypeError as exc:  # a commit whose conv2d has no algorithm= argument
        if "algorithm" in str(exc):
            raise SkipNotImplemented(str(exc)) from None
        raise
    return fn


def median_seconds(fns, min_time=0.3, min_rounds=3, max_rounds=25, stat=np.median):
    """Seconds per call of each warmed function in ``fns`` (``stat`` of the rounds, the median by
    default), timed round-robin in this process so load spikes hit them alike."""
    t0 = time.perf_counter()
    for f in fns:
        f()
    once = time.perf_counter() - t0
    rounds = int(min(max_rounds, max(min_rounds, min_time / max(once, 1e-9))))
    times = [[] for _ in fns]
    for _ in range(rounds):
        for f, ts in zip(fns, times):
            t = time.perf_counter()
            f()
            ts.append(time.perf_counter() - t)
    return [float(stat(ts)) for ts in times]


#: PyTorch's two CPU memory layouts, as the asv ``layout`` parameter.
TORCH_LAYOUTS = ["nchw", "channels_last"]


def _torch_tensors(arrays, layout):
    """``(torch, tensors)``, the 4-D ones in channels_last memory format for ``layout='channels_last'``;
    PyTorch with as many threads as numba has (``NUMBA_NUM_THREADS`` of the asv matrix).  No torch in
    the environment: :class:`SkipNotImplemented`."""
    try:
        import torch
    except ImportError:
        raise SkipNotImplemented("PyTorch is not installed in this environment") from None
    import numba
    torch.set_num_threads(numba.get_num_threads())
    ts = [torch.from_numpy(a) for a in arrays]
    if layout == "channels_last":
        ts = [t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t for t in ts]
    return torch, ts


def torch_conv_call(case, layout, pass_):
    """A warmed zero-argument function running one pass of ``case`` with PyTorch's CPU conv2d on
    tensors in ``layout`` (``'nchw'`` or ``'channels_last'``): the yardstick next to fastconv's."""
    x, w, b = case.arrays()
    torch, (tx, tw, tb, tgy) = _torch_tensors((x, w, b, case.grad_output()), layout)
    if pass_ == "forward":
        def fn():
            with torch.no_grad():
                return torch.nn.functional.conv2d(tx, tw, tb, **case.kwargs)
    else:
        def fn():
            return torch.ops.aten.convolution_backward(
                tgy, tx, tw, [case.k], list(case.stride), list(case.padding), list(case.dilation),
                False, [0, 0], case.groups, [True, True, True])
    fn()
    return fn


def torch_max_pool_call(case, layout, pass_):
    """Like :func:`torch_conv_call` for max pooling with indices (forward) and its backward."""
    torch, (tx, tgy) = _torch_tensors((case.arrays(), case.grad_output()), layout)
    aten = torch.ops.aten
    k, s, p = list(case.kernel), list(case.stride), list(case.padding)
    _, tidx = aten.max_pool2d_with_indices(tx, k, s, p, [1, 1], False)
    if pass_ == "forward":
        fn = lambda: aten.max_pool2d_with_indices(tx, k, s, p, [1, 1], False)  # noqa: E731
    else:
        fn = lambda: aten.max_pool2d_with_indices_backward(tgy, tx, k, s, p, [1, 1], False, tidx)  # noqa: E731
    fn()
    return fn
