"""conv2d forward and backward per registered algorithm: the public suite, input sizes, GFLOP/s,
peak memory, first-call compile time and how close ``'auto'`` comes to the best algorithm.

Every ``setup`` makes the first call, so JIT compilation (or loading the numba cache) never lands
in a ``time_`` figure; compile time has its own ``track_`` benchmark in a fresh process.
"""
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

from .cases import (CONV, CONV_PASSES, LARGE, TORCH_LAYOUTS, SkipNotImplemented, algorithms, conv_call,
                    median_seconds, torch_conv_call)

ALGORITHMS = algorithms()


class ConvSuite:
    """Each case of the public suite, each algorithm (``auto`` included), forward and backward."""

    params = (list(CONV), ALGORITHMS, CONV_PASSES)
    param_names = ["shape", "algorithm", "pass"]
    timeout = 600

    def setup(self, shape, algorithm, pass_):
        self.case = CONV[shape]
        self.fn = conv_call(self.case, algorithm, pass_)

    def time_conv2d(self, shape, algorithm, pass_):
        self.fn()

    def track_gflops(self, shape, algorithm, pass_):
        (t,) = median_seconds([self.fn])
        return self.case.flops(pass_) / t / 1e9

    track_gflops.unit = "GFLOP/s"


class ConvChannelsLast:
    """``'auto'`` on channels_last arrays (PyTorch's recommended CPU layout, handed over by
    ``fastconv.torch``): the native NHWC passes where they serve, converted copies elsewhere; compare
    with :class:`TorchConv`'s ``cl`` rows."""

    params = (list(CONV), CONV_PASSES)
    param_names = ["shape", "pass"]
    timeout = 600

    def setup(self, shape, pass_):
        self.case = CONV[shape]
        self.fn = conv_call(self.case, "auto", pass_, layout="cl")

    def time_conv2d(self, shape, pass_):
        self.fn()

    def track_gflops(self, shape, pass_):
        (t,) = median_seconds([self.fn])
        return self.case.flops(pass_) / t / 1e9

    track_gflops.unit = "GFLOP/s"


class TorchConv:
    """PyTorch's CPU conv2d on the same cases, the reference next to :class:`ConvSuite`: NCHW
    tensors and channels_last ones (PyTorch's recommended CPU layout, often the faster); compare
    fastconv against the faster of the two.  Skipped where torch is not installed."""

    params = (list(CONV), TORCH_LAYOUTS, CONV_PASSES)
    param_names = ["shape", "layout", "pass"]
    timeout = 600

    def setup(self, shape, layout, pass_):
        self.case = CONV[shape]
        self.fn = torch_conv_call(self.case, layout, pass_)

    def time_conv2d(self, shape, layout, pass_):
        self.fn()

    def track_gflops(self, shape, layout, pass_):
        (t,) = median_seconds([self.fn])
        return self.case.flops(pass_) / t / 1e9

    track_gflops.unit = "GFLOP/s"


class ConvSizes:
    """Two layers scaled over batch size and image size (``spatial`` multiplies H and W)."""

    params = (["lenet5-c3", "resnet50-3x3-64"], ALGORITHMS, CONV_PASSES, [1, 4, 16], [0.5, 1.0, 2.0])
    param_names = ["shape", "algorithm", "pass", "batch", "spatial"]
    timeout = 600

    def setup(self, shape, algorithm, pass_, batch, spatial):
        self.fn = conv_call(CONV[shape].scaled(batch=batch, spatial=spatial), algorithm, pass_)

    def time_conv2d(self, shape, algorithm, pass_, batch, spatial):
        self.fn()


class ConvPeakMemory:
    """Peak resident memory of the process (inputs, outputs and any workspace) on the large cases."""

    params = (LARGE, ALGORITHMS, CONV_PASSES)
    param_names = ["shape", "algorithm", "pass"]
    timeout = 600

    def setup(self, shape, algorithm, pass_):
        self.fn = conv_call(CONV[shape], algorithm, pass_)

    def peakmem_conv2d(self, shape, algorithm, pass_):
        self.fn()


class AutoChoice:
    """``'auto'``'s time over the best explicit algorithm's on each case (1.0 = auto chose the best).

    The ratio is of the fastest rounds, timed interleaved: the least load-sensitive estimate.
    """

    params = (list(CONV), CONV_PASSES)
    param_names = ["shape", "pass"]
    timeout = 600

    def setup(self, shape, pass_):
        case = CONV[shape]
        self.auto = conv_call(case, "auto", pass_)
        self.explicit = []
        for alg in ALGORITHMS[1:]:
            try:
                self.explicit.append(conv_call(case, alg, pass_))
            except SkipNotImplemented:
                pass
        if not self.explicit:
            raise SkipNotImplemented("no explicit algorithm serves this case")

    def track_auto_over_best(self, shape, pass_):
        times = median_seconds([self.auto] + self.explicit, stat=np.min)
        return times[0] / min(times[1:])

    track_auto_over_best.unit = "ratio"


# A small layer that still exercises padding, bias and every pass.
_FIRST_CALL = r"""
import json, sys, time
t0 = time.perf_counter()
import numpy as np, fastconv
t1 = time.perf_counter()
alg, pass_ = sys.argv[1], sys.argv[2]
rng = np.random.default_rng(0)
x = rng.standard_normal((2, 8, 16, 16)).astype(np.float32)
w = rng.standard_normal((8, 8, 3, 3)).astype(np.float32)
b = np.zeros(8, np.float32)
try:
    if pass_ == "forward":
        fastconv.conv2d(x, w, b, padding=1, algorithm=alg)
    else:
        fastconv.conv2d_backward(np.ones((2, 8, 16, 16), np.float32), x, w, padding=1, algorithm=alg)
except ValueError as exc:
    print(json.dumps({"skip": str(exc)}))
    sys.exit(0)
t2 = time.perf_counter()
print(json.dumps({"import": t1 - t0, "first_call": t2 - t1}))
"""


def _fresh_process(*args):
    """Run ``_FIRST_CALL`` in a new interpreter whose numba cache (and fastconv cache) start empty."""
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, NUMBA_CACHE_DIR=tmp, FASTCONV_CACHE_DIR=tmp)
        out = subprocess.run([sys.executable, "-c", _FIRST_CALL, *args], env=env, check=True,
                             capture_output=True, text=True, timeout=600)
    return json.loads(out.stdout.strip().splitlines()[-1])


class FirstCall:
    """Seconds of the first call in a fresh process with an empty numba cache: the JIT compile."""

    params = (ALGORITHMS, CONV_PASSES)
    param_names = ["algorithm", "pass"]
    timeout = 600
    repeat = 1
    number = 1

    def track_compile_seconds(self, algorithm, pass_):
        res = _fresh_process(algorithm, pass_)
        if "skip" in res:
            raise SkipNotImplemented(res["skip"])
        return res["first_call"]

    track_compile_seconds.unit = "seconds"


def track_import_seconds():
    """Seconds to import numpy and fastconv in a fresh process (numba included)."""
    return _fresh_process("auto", "forward")["import"]


track_import_seconds.unit = "seconds"
track_import_seconds.timeout = 600
