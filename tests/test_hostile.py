"""Hostile inputs beyond the error table of ``test_validation.py``: each gives a clear error or the
right answer, never a crash, an out-of-memory kill or a modified input.

| input | every op gives |
|---|---|
| N = 0 (empty batch) | empty results of PyTorch's shapes and dtype (every algorithm and 'auto') |
| float16, bool, int8/32/64, uint8, complex, object, longdouble, byte-swapped arrays, in any array argument | ``TypeError`` "<fn>: <argument> must have dtype ..." |
| read-only, broadcast (zero-stride) and unaligned arrays | the same result as on fresh contiguous copies |
| any input | left unmodified; results never share memory with an input |
| NaN / Inf in input, weight or grad_output | NaN, +Inf and -Inf exactly where PyTorch (float64) has them, for every algorithm whose registry entry says `nan_spread='window'` (fft's tile-wide spread is documented in tests/test_fft.py) and for pooling |
| stride, padding, kernel or dilation beyond 2**62 | ``ValueError`` "<fn>: <argument> must be below 2**62 ..." |
| a stride or dilation that cannot matter (2**61 with one output position / a 1-wide kernel) | the right answer, no buffer sized by it |
| a weight, or a non-contiguous input (broadcast view), whose copy would not fit in memory | ``ValueError`` naming the size in GiB, raised before allocating (checked in a child process with a capped address space, so a regression fails instead of killing the machine) |
"""
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import fastconv
import reference as ref
from conftest import ALGORITHMS

pytestmark = pytest.mark.boundscheck

ALGOS = ALGORITHMS + ("auto",)
# algorithms whose NaN reaches exactly PyTorch's outputs; the others spread it over a tile or plane
NAN_LOCAL = tuple(a for a in ALGORITHMS if fastconv._dispatch.registry()[a].nan_spread == "window")


def _conv_arrays(n=2, dtype=np.float64, seed=0, kw=None):
    kw = {"padding": 1} if kw is None else kw
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 4, 7, 6)).astype(dtype)
    w = rng.standard_normal((6, 2, 3, 3)).astype(dtype)
    b = rng.standard_normal(6).astype(dtype)
    y_shape = ref.conv2d(np.zeros((1,) + x.shape[1:]), w, groups=2, **kw).shape
    gy = rng.standard_normal((n,) + y_shape[1:]).astype(dtype)
    return x, w, b, gy, dict(kw, groups=2)


def _pool_arrays(n=2, dtype=np.float64, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 3, 7, 6)).astype(dtype)
    y, idx = fastconv.max_pool2d(x, 3, stride=2, padding=1, return_indices=True)
    gy = rng.standard_normal(y.shape).astype(dtype)
    return x, idx, gy


# Every op as (name, callable of a dict of arrays, the dict's array names in order).
POOL = {"kernel_size": 3, "stride": 2, "padding": 1}


def ops(algorithm="auto"):
    return {
        "conv2d": (lambda a: fastconv.conv2d(a["x"], a["w"], a["b"], **a["kw"], algorithm=algorithm), "xwb"),
        "conv2d_backward": (lambda a: tuple(fastconv.conv2d_backward(a["gy"], a["x"], a["w"], **a["kw"],
                                                                     algorithm=algorithm)), ("gy", "x", "w")),
        "max_pool2d": (lambda a: fastconv.max_pool2d(a["px"], **POOL, return_indices=True), ("px",)),
        "max_pool2d_backward": (lambda a: fastconv.max_pool2d_backward(a["pgy"], a["idx"], a["px"].shape),
                                ("pgy", "idx")),
        "avg_pool2d": (lambda a: fastconv.avg_pool2d(a["px"], **POOL, count_include_pad=False), ("px",)),
        "avg_pool2d_backward": (lambda a: fastconv.avg_pool2d_backward(a["pgy"], a["px"].shape, **POOL), ("pgy",)),
        "relu": (lambda a: fastconv.relu(a["x"]), ("x",)),
        "relu_backward": (lambda a: fastconv.relu_backward(a["x"], a["x"]), ("x",)),
    }


def arrays(n=2, dtype=np.float64, seed=0):
    x, w, b, gy, kw = _conv_arrays(n, dtype, seed)
    px, idx, pgy = _pool_arrays(n, dtype, seed)
    return {"x": x, "w": w, "b": b, "gy": gy, "kw": kw, "px": px, "idx": idx, "pgy": pgy}


def _as_tuple(r):
    return r if isinstance(r, tuple) else (r,)


def _call(algorithm, op, a):
    try:
        return _as_tuple(ops(algorithm)[op][0](a))
    except ValueError as exc:
        if isinstance(exc, fastconv.AlgorithmUnavailable):
            pytest.skip(str(exc))
        raise


OP_NAMES = list(ops())
CONV_OPS = ("conv2d", "conv2d_backward")


def _op_algorithms():
    for op in OP_NAMES:
        for algorithm in (ALGOS if op in CONV_OPS else ("auto",)):
            yield pytest.param(op, algorithm, id=f"{op}-{algorithm}" if op in CONV_OPS else op)


# --------------------------------------------------------------------------- empty batches
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("op, algorithm", list(_op_algorithms()))
def test_empty_batch_like_torch(op, algorithm, dtype):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    a = arrays(n=0, dtype=dtype)
    got = _call(algorithm, op, a)
    t = {k: torch.tensor(v, requires_grad=v.dtype.kind == "f") for k, v in a.items() if isinstance(v, np.ndarray)}
    if op == "conv2d":
        want = (F.conv2d(t["x"], t["w"], t["b"], **a["kw"]),)
    elif op == "conv2d_backward":
        y = F.conv2d(t["x"], t["w"], t["b"], **a["kw"])
        y.backward(t["gy"])
        want = (t["x"].grad, t["w"].grad, t["b"].grad)
    elif op in ("max_pool2d", "max_pool2d_backward"):
        y, i = F.max_pool2d(t["px"], **POOL, return_indices=True)
        y.backward(t["pgy"])
        want = (y, i) if op == "max_pool2d" else (t["px"].grad,)
    elif op in ("avg_pool2d", "avg_pool2d_backward"):
        y = F.avg_pool2d(t["px"], **POOL, count_include_pad=op == "avg_pool2d_backward")
        y.backward(t["pgy"])
        want = (y,) if op == "avg_pool2d" else (t["px"].grad,)
    else:
        want = (F.relu(t["x"]),) if op == "relu" else (t["x"],)
    assert len(got) == len(want)
    for g, wt in zip(got, want):
        wt = wt.detach().numpy()
        assert isinstance(g, np.ndarray) and g.shape == wt.shape and g.dtype == wt.dtype
        np.testing.assert_array_equal(g, wt)  # all zeros (grad_weight, grad_bias) or empty


# --------------------------------------------------------------------------- dtypes
BAD_DTYPES = [np.float16, np.bool_, np.int8, np.int32, np.int64, np.uint8, np.complex64, np.complex128,
              np.object_, np.longdouble, np.dtype(">f8") if sys.byteorder == "little" else np.dtype("<f8")]
ARG_NAMES = {"x": "input", "w": "weight", "b": "bias", "gy": "grad_output", "px": "input", "pgy": "grad_output",
             "idx": "indices"}


def _dtype_cases():
    for op in OP_NAMES:
        for name in ops()[op][1]:
            for dt in BAD_DTYPES:
                if name == "idx" and np.dtype(dt).kind in "iu":
                    continue  # any integer dtype is a valid index array
                yield pytest.param(op, name, dt, id=f"{op}-{ARG_NAMES[name]}-{np.dtype(dt).str}")


@pytest.mark.parametrize("op, name, dtype", list(_dtype_cases()))
def test_unsupported_dtype_in_any_argument_is_a_type_error(op, name, dtype):
    a = arrays()
    a[name] = a[name].astype(dtype)
    with pytest.raises(TypeError, match=rf"^{op}: {ARG_NAMES[name]} must "):
        ops()[op][0](a)


# --------------------------------------------------------------------------- memory layouts
def _broadcast(a):
    """The values of ``a`` as a read-only view with a zero stride (the first axis broadcast)."""
    return np.broadcast_to(a[:1], a.shape) if a.ndim and a.shape[0] > 1 else np.broadcast_to(a, a.shape)


def _unaligned(a):
    buf = np.empty(a.nbytes + 1, np.uint8)
    u = np.frombuffer(buf.data, a.dtype, a.size, offset=1).reshape(a.shape)
    u[...] = a
    assert not u.flags.aligned or a.itemsize == 1
    return u


def _read_only(a):
    a = a.copy()
    a.setflags(write=False)
    return a


@pytest.mark.parametrize("make", [_broadcast, _unaligned, _read_only], ids=["broadcast", "unaligned", "read-only"])
@pytest.mark.parametrize("op, algorithm", list(_op_algorithms()))
def test_read_only_broadcast_and_unaligned_inputs(op, algorithm, make):
    a = arrays()
    if make is _broadcast:  # the values the view holds, as fresh arrays
        a.update({k: np.ascontiguousarray(_broadcast(v)) for k, v in a.items() if isinstance(v, np.ndarray)})
        a["idx"] = fastconv.max_pool2d(a["px"], **POOL, return_indices=True)[1]
    want = _call(algorithm, op, a)
    hostile = {k: (make(v) if isinstance(v, np.ndarray) else v) for k, v in a.items()}
    got = _call(algorithm, op, hostile)
    for g, wt in zip(got, want):
        assert g.flags.writeable
        np.testing.assert_array_equal(g, wt)


@pytest.mark.parametrize("op, algorithm", list(_op_algorithms()))
def test_inputs_never_modified_and_results_never_alias_them(op, algorithm):
    a = arrays(seed=3)
    a["x"][0, 0, 0, :3] = [-0.0, np.nan, np.inf]  # values a kernel might be tempted to normalise
    copies = {k: v.copy() for k, v in a.items() if isinstance(v, np.ndarray)}
    got = _call(algorithm, op, a)
    for k, v in copies.items():
        np.testing.assert_array_equal(a[k], v, err_msg=k)
        assert a[k].tobytes() == v.tobytes(), k  # -0.0 and NaN payloads too
    for g in got:
        for k in copies:
            assert not np.shares_memory(g, a[k]), f"result shares memory with {k}"


# --------------------------------------------------------------------------- NaN and Inf
def _masks(a):
    return np.isnan(a), np.isposinf(a), np.isneginf(a)


def _assert_same_nonfinite(got, want, name):
    for m_got, m_want, kind in zip(_masks(got), _masks(want), ("NaN", "+Inf", "-Inf")):
        assert (m_got == m_want).all(), f"{name}: {kind} at {np.argwhere(m_got != m_want)[:5].tolist()}"
    fin = np.isfinite(want)
    np.testing.assert_allclose(got[fin], want[fin], rtol=1e-4, atol=1e-4, err_msg=name)


NONFINITE = [pytest.param(arg, v, id=f"{arg}-{v}") for arg in ("x", "w", "gy") for v in ("nan", "inf", "-inf")]
GEOMETRIES = [{"padding": 1}, {"stride": 2, "padding": 1}, {}, {"padding": "same", "dilation": 2}]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("kw", GEOMETRIES, ids=["pad1", "stride2", "valid", "same-dilated"])
@pytest.mark.parametrize("arg, value", NONFINITE)
@pytest.mark.parametrize("algorithm", NAN_LOCAL)
def test_conv_nan_and_inf_propagate_like_torch(algorithm, arg, value, kw, dtype):
    # PyTorch float64 (zero padding multiplied like any input) is the oracle; its float32 path
    # (oneDNN) skips padding taps, so a NaN weight next to the border gives NaN in float64 only.
    torch = pytest.importorskip("torch")
    x, w, b, gy, kw = _conv_arrays(dtype=dtype, seed=5, kw=kw)
    {"x": x, "w": w, "gy": gy}[arg][1, 1, 1, 1] = float(value)
    try:
        got = (fastconv.conv2d(x, w, b, **kw, algorithm=algorithm),
               *fastconv.conv2d_backward(gy, x, w, **kw, algorithm=algorithm)[:2])
    except ValueError as exc:
        if isinstance(exc, fastconv.AlgorithmUnavailable):
            pytest.skip(str(exc))
        raise
    tx, tw, tb = (torch.tensor(v.astype(np.float64), requires_grad=True) for v in (x, w, b))
    ty = torch.nn.functional.conv2d(tx, tw, tb, **kw)
    ty.backward(torch.tensor(gy.astype(np.float64)))
    for g, wt, name in zip(got, (ty.detach().numpy(), tx.grad.numpy(), tw.grad.numpy()),
                           ("forward", "grad_input", "grad_weight")):
        _assert_same_nonfinite(g, wt, name)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("arg, value", [pytest.param(a, v, id=f"{a}-{v}") for a in ("x", "gy")
                                        for v in ("nan", "inf", "-inf")])
@pytest.mark.parametrize("include_pad", [True, False])
def test_pooling_nan_and_inf_propagate_like_torch(arg, value, include_pad, dtype):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    x, _, gy = _pool_arrays(dtype=dtype, seed=6)
    x[0, 1, 2:4, 3] = 5.0
    {"x": x, "gy": gy}[arg][1, 2, 1, 1] = float(value)
    x[0, 1, 3, 3] = float(value)  # a non-finite value in windows that overlap
    y, idx = fastconv.max_pool2d(x, **POOL, return_indices=True)
    got = {"max": y, "max_grad": fastconv.max_pool2d_backward(gy, idx, x.shape),
           "avg": fastconv.avg_pool2d(x, **POOL, count_include_pad=include_pad),
           "avg_grad": fastconv.avg_pool2d_backward(gy, x.shape, **POOL, count_include_pad=include_pad)}
    tm, ta = (torch.tensor(x.astype(np.float64), requires_grad=True) for _ in range(2))
    ty, ti = F.max_pool2d(tm, **POOL, return_indices=True)
    ty.backward(torch.tensor(gy.astype(np.float64)))
    tya = F.avg_pool2d(ta, **POOL, count_include_pad=include_pad)
    tya.backward(torch.tensor(gy.astype(np.float64)))
    want = {"max": ty.detach().numpy(), "max_grad": tm.grad.numpy(), "avg": tya.detach().numpy(),
            "avg_grad": ta.grad.numpy()}
    np.testing.assert_array_equal(idx, ti.numpy())
    for name in want:
        _assert_same_nonfinite(got[name], want[name], name)


# --------------------------------------------------------------------------- extreme integers
@pytest.mark.parametrize("call", [
    lambda x, w: fastconv.conv2d(x, w, stride=2**62),
    lambda x, w: fastconv.conv2d(x, w, padding=(0, -(2**62))),
    lambda x, w: fastconv.conv2d(x, w, dilation=2**70),
    lambda x, w: fastconv.max_pool2d(x, 2**62),
    lambda x, w: fastconv.avg_pool2d(x, 2, stride=np.uint64(2**63)),
    lambda x, w: fastconv.max_pool2d_backward(x, np.zeros(x.shape, np.int64), (1, 2, 5, 2**62)),
], ids=["conv-stride", "conv-padding", "conv-dilation", "max-kernel", "avg-stride-uint64", "maxb-shape"])
def test_integers_beyond_int64_arithmetic_are_refused(call):
    x, w = np.ones((1, 2, 5, 5)), np.ones((3, 2, 3, 3))
    with pytest.raises(ValueError, match=r"^\w+: \w+ must be below 2\*\*62 in magnitude, got"):
        call(x, w)


@pytest.mark.parametrize("algorithm", ALGOS)
def test_strides_and_dilations_that_cannot_matter(algorithm):
    # one output position along an axis: the stride has no effect; a kernel 1 wide: nor has dilation
    x, w, b, _, _ = _conv_arrays(seed=7, kw={})
    huge = 2**61
    for kw, same in [({"stride": (huge, 1)}, {"stride": (10, 1)}),
                     ({"stride": huge, "padding": (1, 2)}, {"stride": 9, "padding": (1, 2)}),
                     ({"dilation": (1, huge)}, None)]:
        wk = w[:, :, :, :1] if same is None else w
        same = {"dilation": 1} if same is None else same
        want = fastconv.conv2d(x, wk, b, groups=2, **same, algorithm="direct")
        gy = np.ones_like(want)
        want_g = fastconv.conv2d_backward(gy, x, wk, groups=2, **same, algorithm="direct")
        try:
            got = fastconv.conv2d(x, wk, b, groups=2, **kw, algorithm=algorithm)
            got_g = fastconv.conv2d_backward(gy, x, wk, groups=2, **kw, algorithm=algorithm)
        except ValueError as exc:
            if isinstance(exc, fastconv.AlgorithmUnavailable):
                continue
            raise
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
        for g, wt in zip(got_g, want_g):
            np.testing.assert_allclose(g, wt, rtol=1e-12, atol=1e-12)
    p = np.arange(30.0).reshape(1, 1, 5, 6)
    np.testing.assert_array_equal(fastconv.max_pool2d(p, (5, 2), stride=huge), fastconv.max_pool2d(p, (5, 2), stride=(1, 6)))
    np.testing.assert_array_equal(fastconv.avg_pool2d(p, 3, stride=huge, padding=1), fastconv.avg_pool2d(p, 3, stride=7, padding=1))
    np.testing.assert_array_equal(fastconv.max_pool2d(p, 1, dilation=huge), p)


# --------------------------------------------------------------------------- memory
_HUGE_SCRIPT = textwrap.dedent(r"""
    import json, resource, sys
    cap = 3 * 2**30
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))  # a regression fails here, never OOM-kills
    import numpy as np, fastconv
    B = lambda shape, dt=np.float32: np.broadcast_to(np.zeros((), dt), shape)
    cases = {
        # weight copy and its tap tables (a 24 GiB allocation was an OOM kill before)
        "conv-huge-weight": lambda: fastconv.conv2d(B((1, 1024, 1024, 1024)), B((10**5, 1024, 1024, 1024))),
        "conv-huge-kernel": lambda: fastconv.conv2d(B((1, 1024, 1024, 1024)), B((1, 1024, 1024, 1024))),
        "convb-huge-kernel": lambda: fastconv.conv2d_backward(B((1, 1, 1, 1)), B((1, 1024, 1024, 1024)),
                                                              B((1, 1024, 1024, 1024))),
        # a broadcast input whose contiguous copy cannot fit, the output being small
        "max-broadcast-input": lambda: fastconv.max_pool2d(B((1, 1, 10**6, 10**6)), 1, stride=10**6),
        "avg-broadcast-input": lambda: fastconv.avg_pool2d(B((1, 1, 10**6, 10**6)), 1, stride=10**6),
        "maxb-broadcast-grad": lambda: fastconv.max_pool2d_backward(B((1, 1, 10**6, 10**6)),
                                                                    B((1, 1, 10**6, 10**6), np.int64), (1, 1, 1, 1)),
        "relu-broadcast": lambda: fastconv.relu(B((10**6, 10**6))),
        "relub-broadcast": lambda: fastconv.relu_backward(B((10**6, 10**6)), B((10**6, 10**6))),
    }
    out = {}
    for name, call in cases.items():
        try:
            call()
            out[name] = ["no error", ""]
        except Exception as exc:
            out[name] = [type(exc).__name__, str(exc)]
    print(json.dumps(out))
""")


@pytest.fixture(scope="module")
def huge_results():
    proc = subprocess.run([sys.executable, "-c", _HUGE_SCRIPT], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case, fn", [
    ("conv-huge-weight", "conv2d"), ("conv-huge-kernel", "conv2d"), ("convb-huge-kernel", "conv2d_backward"),
    ("max-broadcast-input", "max_pool2d"), ("avg-broadcast-input", "avg_pool2d"),
    ("maxb-broadcast-grad", "max_pool2d_backward"), ("relu-broadcast", "relu"), ("relub-broadcast", "relu_backward"),
])
def test_too_large_for_memory_is_refused_before_allocating(huge_results, case, fn):
    kind, message = huge_results[case]
    assert kind == "ValueError", f"{kind}: {message}"
    assert message.startswith(fn + ": ") and " would need " in message and " GiB" in message, message
