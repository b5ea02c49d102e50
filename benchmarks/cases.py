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


def conv_call(case, algorithm, pass_):
    """A warmed zero-argument function running one pass of ``case`` with ``algorithm``.

    The first call (JIT compile or cache load) happens here, so it lands in ``setup``, never in a
    ``time_`` figure.  An algorithm that is unknown to this commit's fastconv or cannot serve the
    case raises :class:`SkipNotImplemented`.
    """
    import fastconv
    x, w, b = case.arrays()
    kw = case.kwargs
    if pass_ == "forward":
        def fn():
            return fastconv.conv2d(x, w, b, **kw, algorithm=algorithm)
    else:
        gy = case.grad_output()

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
