"""Differential fuzzing: fastconv against PyTorch (float64) over the whole argument space.

Every registered algorithm and ``'auto'``, forward and every gradient; max and average pooling,
forward and backward.  The oracle is PyTorch computing in float64 when it is installed, else the
NumPy reference (``tests/reference.py``); fastconv runs in the drawn dtype and is compared with the
per-dtype tolerances of ``conftest.TOL``, atol widened by the square root of the number of terms
each result sums (the size a sum of order-one random terms grows to).

Drawn: N (0 included), C, K, groups, H, W (odd and prime sizes up to 31), R, S, stride, padding
(ints, pairs, 'same', 'valid'), dilation, dtype, bias or none, and for every array its memory
layout: contiguous, channels-last (transposed), Fortran order, a sliced view of a larger buffer,
or reversed strides.  An explicit algorithm may refuse a case only through the documented
``fastconv.AlgorithmUnavailable`` (a ValueError) (counted as a hypothesis event); ``'auto'`` may not refuse.

Example counts: ``python -m pytest tests/test_fuzz.py --hypothesis-show-statistics`` (CI profile),
``--hypothesis-profile=long`` for the long run by hand.  Tests marked ``boundscheck`` form the
reduced set that CI runs with ``NUMBA_BOUNDSCHECK=1`` (see ``fastconv/_jit.py``).
"""
import contextlib
import math
import re

import numpy as np
import pytest
from hypothesis import assume, event, given, note
from hypothesis import strategies as st

import fastconv
import fastconv._threads as fc_threads
import reference as ref
from conftest import ALGORITHMS, TOL

try:
    import torch
    import torch.nn.functional as F
except ImportError:  # pragma: no cover - the reference stands in
    torch = None

pytestmark = [pytest.mark.boundscheck,
              pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel:UserWarning")]

ALGOS = ALGORITHMS + ("auto",)
LAYOUTS = ("contiguous", "channels_last", "fortran", "sliced", "reversed")
PRIMES = (13, 17, 19, 23, 29, 31)

sizes = st.one_of(st.integers(1, 12), st.sampled_from(PRIMES))  # small, odd and prime image sizes
pair_or_int = lambda s: st.one_of(s, st.tuples(s, s))  # noqa: E731
# a stride far beyond the image (one output position) must not size any buffer
strides = st.one_of(st.integers(1, 4), st.just(10**6))


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def layout(a, kind):
    """The values of ``a`` in a given memory layout (a view whenever the layout is not C order)."""
    if kind == "contiguous":
        return a
    if kind == "fortran":
        return np.asfortranarray(a)
    if kind == "reversed":
        return np.ascontiguousarray(a[..., ::-1])[..., ::-1]
    if kind == "sliced":
        fill = np.nan if a.dtype.kind == "f" else -(2**40)  # garbage between the elements: must not leak
        big = np.full(a.shape[:-1] + (2 * a.shape[-1] + 1,), fill, a.dtype)
        big[..., 1::2] = a
        return big[..., 1::2]
    if kind == "channels_last" and a.ndim == 4:
        return np.ascontiguousarray(a.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    return a[::-1].copy()[::-1] if a.ndim == 1 else a


def check(got, want, dtype, terms):
    """Shape and dtype first, then values within ``TOL`` with atol scaled by sqrt(terms)."""
    dtype = np.dtype(dtype)
    for name, expected in want.items():
        assert isinstance(got[name], np.ndarray), name
        assert got[name].shape == expected.shape, f"{name}: shape {got[name].shape} != {expected.shape}"
        assert got[name].dtype == dtype, f"{name}: dtype {got[name].dtype} != {dtype}"
    for name, expected in want.items():
        rtol, atol = TOL[dtype]["forward" if name == "forward" else "grad"]
        scale = math.sqrt(max(terms[name], 1))
        np.testing.assert_allclose(got[name], expected, rtol=rtol, atol=atol * scale, err_msg=name)


# --------------------------------------------------------------------------- convolution
@st.composite
def conv_cases(draw):
    groups = draw(st.sampled_from([1, 1, 1, 2, 3]))
    cg, kg = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    r, s = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    dilation = draw(pair_or_int(st.integers(1, 3)))
    padding = draw(st.one_of(pair_or_int(st.integers(0, 3)), st.sampled_from(["same", "valid"])))
    stride = 1 if padding == "same" else draw(pair_or_int(strides))
    n, h, w = draw(st.integers(0, 3)), draw(sizes), draw(sizes)
    (pt, pb), (pl, pr) = ref.conv_pads(padding, (r, s), stride, dilation)
    dh, dw = _pair(dilation)
    assume(h + pt + pb >= dh * (r - 1) + 1 and w + pl + pr >= dw * (s - 1) + 1)
    return {
        "x_shape": (n, cg * groups, h, w), "w_shape": (kg * groups, cg, r, s),
        "kw": {"stride": stride, "padding": padding, "dilation": dilation, "groups": groups},
        "dtype": draw(st.sampled_from([np.float32, np.float64])),
        "bias": draw(st.booleans()),
        # small scratch budgets force the tiled paths of algorithms with a workspace (or a refusal)
        "workspace_limit": draw(st.sampled_from([None, None, 2**10, 2**13, 2**16])),
        # small calls run on one thread; half the examples lift that so every thread's tiles run
        "all_threads": draw(st.booleans()),
        "layouts": draw(st.tuples(*[st.sampled_from(LAYOUTS)] * 4)),
        "seed": draw(st.integers(0, 2**32 - 1)),
    }


def conv_oracle(x, w, b, gy, kw):
    """Forward and all gradients in float64, by PyTorch or else the reference."""
    if torch is None:
        return {"forward": ref.conv2d(x, w, b, **kw), "grad_input": ref.conv2d_grad_input(gy, x.shape, w, **kw),
                "grad_weight": ref.conv2d_grad_weight(gy, x, w.shape, **kw), "grad_bias": ref.conv2d_grad_bias(gy)}
    tx, tw = (torch.tensor(np.asarray(a, np.float64), requires_grad=True) for a in (x, w))
    tb = torch.tensor(np.zeros(w.shape[0]) if b is None else np.asarray(b, np.float64), requires_grad=True)
    ty = F.conv2d(tx, tw, tb, **kw)
    ty.backward(torch.tensor(np.asarray(gy, np.float64)))
    return {"forward": ty.detach().numpy(), "grad_input": tx.grad.numpy(),
            "grad_weight": tw.grad.numpy(), "grad_bias": tb.grad.numpy()}


def _refusal(algorithm, exc):
    """An explicit algorithm's documented refusal of a pass; anything else is a failure."""
    if algorithm != "auto" and isinstance(exc, fastconv.AlgorithmUnavailable):
        event(f"{algorithm} refused: {re.sub(r'[0-9]+', 'N', str(exc).split(' here: ')[-1])}")
        return True
    return False


@pytest.mark.parametrize("algorithm", ALGOS)
@given(case=conv_cases())
def test_conv_matches_torch(algorithm, case):
    rng = np.random.default_rng(case["seed"])
    dtype, kw, limit = case["dtype"], case["kw"], case["workspace_limit"]
    x = rng.standard_normal(case["x_shape"]).astype(dtype)
    w = rng.standard_normal(case["w_shape"]).astype(dtype)
    b = rng.standard_normal(case["w_shape"][0]).astype(dtype) if case["bias"] else None
    y_shape = ref.conv2d(np.zeros((1,) + case["x_shape"][1:]), np.zeros(case["w_shape"]), **kw).shape
    gy = rng.standard_normal((case["x_shape"][0],) + y_shape[1:]).astype(dtype)
    lx, lw, lb, lg = case["layouts"]
    xv, wv, gyv = layout(x, lx), layout(w, lw), layout(gy, lg)
    bv = None if b is None else layout(b, lb)
    copies = [a.copy() for a in (xv, wv, gyv) + (() if bv is None else (bv,))]
    note(f"x {x.shape} {lx}, w {w.shape} {lw}, gy {gy.shape} {lg}, {kw}, {np.dtype(dtype)}, workspace {limit}")

    want = conv_oracle(x, w, b, gy, kw)
    with _all_threads(case["all_threads"]):
        got = _conv_results(algorithm, xv, wv, bv, gyv, kw, limit, want)
    n, _, oh, ow = gy.shape
    k, cg, r, s = w.shape
    terms = {"forward": cg * r * s, "grad_input": (k // kw["groups"]) * r * s,
             "grad_weight": n * oh * ow, "grad_bias": n * oh * ow}
    check(got, want, dtype, terms)
    for a, a0 in zip((xv, wv, gyv) + (() if bv is None else (bv,)), copies):
        np.testing.assert_array_equal(a, a0)  # inputs never modified


@contextlib.contextmanager
def _all_threads(on):
    """Lift fastconv's one-thread rule for small calls (tests run one at a time in this process)."""
    old = getattr(fc_threads, "SERIAL_WORK", None)
    if on and old is not None:
        fc_threads.SERIAL_WORK = 0
    try:
        yield
    finally:
        if old is not None:
            fc_threads.SERIAL_WORK = old


def _conv_results(algorithm, xv, wv, bv, gyv, kw, limit, want):
    """fastconv's results; a pass the algorithm refuses is dropped from ``want`` too."""
    got = {}
    try:
        got["forward"] = fastconv.conv2d(xv, wv, bv, **kw, algorithm=algorithm, workspace_limit=limit)
    except ValueError as exc:
        if not _refusal(algorithm, exc):
            raise
        del want["forward"]
    try:
        got.update(fastconv.conv2d_backward(gyv, xv, wv, **kw, algorithm=algorithm, workspace_limit=limit)._asdict())
    except ValueError as exc:
        if not _refusal(algorithm, exc):
            raise
        for name in ("grad_input", "grad_weight", "grad_bias"):
            del want[name]
    return got


# --------------------------------------------------------------------------- pooling
@st.composite
def pool_cases(draw, op):
    kh, kw = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    ph, pw = draw(st.integers(0, kh // 2)), draw(st.integers(0, kw // 2))
    stride = draw(st.one_of(st.none(), pair_or_int(strides)))
    dilation = draw(pair_or_int(st.integers(1, 3))) if op == "max" else 1
    ceil_mode = draw(st.booleans())
    n, c, h, w = draw(st.integers(0, 3)), draw(st.integers(1, 4)), draw(sizes), draw(sizes)
    sh, sw = (kh, kw) if stride is None else _pair(stride)
    dh, dw = _pair(dilation)
    assume(ref.pool_out_size(h, ph, kh, sh, dh, ceil_mode) >= 1)
    assume(ref.pool_out_size(w, pw, kw, sw, dw, ceil_mode) >= 1)
    args = {"kernel_size": draw(st.sampled_from([(kh, kw)] + ([kh] if kh == kw else []))),
            "stride": stride, "padding": draw(st.sampled_from([(ph, pw)] + ([ph] if ph == pw else []))),
            "ceil_mode": ceil_mode}
    if op == "max":
        args["dilation"] = dilation
    else:
        args["count_include_pad"] = draw(st.booleans())
    return {"shape": (n, c, h, w), "kw": args, "dtype": draw(st.sampled_from([np.float32, np.float64])),
            "layouts": draw(st.tuples(st.sampled_from(LAYOUTS), st.sampled_from(LAYOUTS))),
            "seed": draw(st.integers(0, 2**32 - 1))}


def _pool_inputs(case, out_shape):
    rng = np.random.default_rng(case["seed"])
    x = rng.standard_normal(case["shape"]).astype(case["dtype"])
    gy = rng.standard_normal(out_shape).astype(case["dtype"])
    return x, gy, layout(x, case["layouts"][0]), layout(gy, case["layouts"][1])


@given(case=pool_cases("max"))
def test_max_pool_matches_torch(case):
    kw, dtype = case["kw"], case["dtype"]
    y_ref, idx_ref = ref.max_pool2d(np.zeros(case["shape"]), **kw)  # shapes only
    x, gy, xv, gyv = _pool_inputs(case, y_ref.shape)
    note(f"x {x.shape} {case['layouts']}, {kw}, {np.dtype(dtype)}")
    y, idx = fastconv.max_pool2d(xv, **kw, return_indices=True)
    if torch is None:
        y_ref, idx_ref = ref.max_pool2d(x, **kw)
    else:
        tx = torch.tensor(x.astype(np.float64), requires_grad=True)
        ty, ti = F.max_pool2d(tx, **kw, return_indices=True)
        y_ref, idx_ref = ty.detach().numpy(), ti.numpy()
    assert y.dtype == dtype and idx.dtype == np.int64 and y.shape == y_ref.shape
    np.testing.assert_array_equal(y, y_ref)  # a maximum is exact
    np.testing.assert_array_equal(idx, idx_ref)
    if idx.size and (idx.min() < 0 or idx.max() >= x.shape[2] * x.shape[3]):
        event("max backward skipped: a window lies wholly in the padding (no valid index)")
        return
    idxv = layout(idx, case["layouts"][1])
    gx = fastconv.max_pool2d_backward(gyv, idxv, x.shape)
    if torch is None:
        gx_ref = ref.max_pool2d_backward(gy, idx_ref, x.shape)
    else:
        ty.backward(torch.tensor(gy.astype(np.float64)))
        gx_ref = tx.grad.numpy()
    kh, kw_ = _pair(kw["kernel_size"])
    check({"grad_input": gx}, {"grad_input": gx_ref}, dtype, {"grad_input": kh * kw_})
    np.testing.assert_array_equal(xv, x)
    np.testing.assert_array_equal(gyv, gy)


@given(case=pool_cases("avg"))
def test_avg_pool_matches_torch(case):
    kw, dtype = case["kw"], case["dtype"]
    out_shape = ref.avg_pool2d(np.zeros(case["shape"]), **kw).shape
    x, gy, xv, gyv = _pool_inputs(case, out_shape)
    note(f"x {x.shape} {case['layouts']}, {kw}, {np.dtype(dtype)}")
    got = {"forward": fastconv.avg_pool2d(xv, **kw), "grad_input": fastconv.avg_pool2d_backward(gyv, x.shape, **kw)}
    if torch is None:
        want = {"forward": ref.avg_pool2d(x, **kw), "grad_input": ref.avg_pool2d_backward(gy, x.shape, **kw)}
    else:
        tx = torch.tensor(x.astype(np.float64), requires_grad=True)
        ty = F.avg_pool2d(tx, **kw)
        ty.backward(torch.tensor(gy.astype(np.float64)))
        want = {"forward": ty.detach().numpy(), "grad_input": tx.grad.numpy()}
    kh, kw_ = _pair(kw["kernel_size"])
    check(got, want, dtype, {"forward": kh * kw_, "grad_input": kh * kw_})
    np.testing.assert_array_equal(xv, x)
    np.testing.assert_array_equal(gyv, gy)


def test_boundscheck_run_checks_kernel_indexing():
    # the NUMBA_BOUNDSCHECK=1 job is only worth running if kernels really check (numba ignores the
    # flag inside prange bodies, hence serial kernels under it)
    import numba
    from numba import prange

    from fastconv._jit import kernel

    if not numba.config.BOUNDSCHECK:
        pytest.skip("only under NUMBA_BOUNDSCHECK=1")

    def shifted_copy(a, out):
        for i in prange(out.shape[0]):
            out[i] = a[i + 1]

    with pytest.raises(IndexError):
        kernel(shifted_copy)(np.arange(4.0), np.empty(4))
