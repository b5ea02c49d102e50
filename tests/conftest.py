"""Shared test configuration: tolerances, the optional-torch fixture, comparison helpers and the
hypothesis profiles."""
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

import fastconv
from fastconv import _dispatch

# --------------------------------------------------------------------------- hypothesis
# "ci" (default) stays bounded and derandomized, so a CI run is repeatable; "long" (random, 1000
# examples) with --hypothesis-profile=long or FASTCONV_HYPOTHESIS_PROFILE=long, for hand runs.
settings.register_profile("ci", max_examples=40, deadline=None, derandomize=True, database=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("long", max_examples=1000, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("FASTCONV_HYPOTHESIS_PROFILE", "ci"))

# --------------------------------------------------------------------------- tolerances
# (rtol, atol) per dtype, for results of order one computed from inputs of order one.  Gradients
# reduce over more terms (the batch and output positions) than the forward pass, hence looser.
TOL = {
    np.dtype(np.float32): {"forward": (2e-5, 2e-5), "grad": (1e-4, 1e-4)},
    np.dtype(np.float64): {"forward": (1e-12, 1e-12), "grad": (1e-11, 1e-11)},
}
# Central-difference checks in float64: conv and pooling are (piecewise) linear, so the only error is
# rounding, about eps * |f| / step.
FD_STEP = 1e-6
FD_RTOL = 1e-6

DTYPES = [np.float32, np.float64]
ALGORITHMS = fastconv.algorithms()

# Geometries every algorithm's own test module runs (id, x shape, weight shape, keyword arguments);
# each module adds the cases its own code paths need.
GEOMETRIES = [
    ("basic", (2, 3, 7, 6), (4, 3, 3, 3), {}),
    ("stride2-pad1", (3, 3, 9, 8), (4, 3, 3, 3), {"stride": 2, "padding": 1}),
    ("stride3-asym", (2, 2, 11, 9), (3, 2, 3, 2), {"stride": (3, 2), "padding": (2, 1)}),
    ("stride-gt-kernel", (2, 2, 9, 8), (2, 2, 2, 2), {"stride": 3}),
    ("same-odd", (2, 2, 6, 5), (3, 2, 3, 3), {"padding": "same"}),
    ("same-even-dilated", (1, 2, 7, 8), (2, 2, 2, 4), {"padding": "same", "dilation": 2}),
    ("valid", (2, 2, 6, 6), (2, 2, 3, 3), {"padding": "valid"}),
    ("dilation", (2, 2, 9, 9), (3, 2, 3, 3), {"dilation": 2, "padding": 2}),
    ("dilation-stride", (1, 2, 10, 8), (2, 2, 2, 3), {"dilation": (3, 1), "stride": (1, 2)}),
    ("groups", (2, 4, 6, 6), (6, 2, 3, 3), {"groups": 2, "padding": 1}),
    ("depthwise", (2, 3, 6, 6), (3, 1, 3, 3), {"groups": 3, "padding": 1}),
    ("depthwise-multiplier-s2", (2, 3, 7, 7), (6, 1, 3, 3), {"groups": 3, "stride": 2, "padding": 1}),
    ("1x1", (2, 5, 5, 4), (3, 5, 1, 1), {}),
    ("kernel-eq-input", (2, 2, 4, 5), (3, 2, 4, 5), {}),
]


@pytest.fixture
def torch():
    """The torch module, or a skip when it is not installed."""
    return pytest.importorskip("torch")


def skip_if_unsupported(exc):
    """Turn an explicit algorithm's refusal of a pass into a skip; re-raise any other ValueError."""
    if isinstance(exc, fastconv.AlgorithmUnavailable):
        pytest.skip(str(exc))
    raise exc


def run_conv(algorithm, x, w, b=None, grad_output=None, **kw):
    """Forward (and, with ``grad_output``, backward) of one algorithm as a dict of named results.

    An :class:`fastconv.AlgorithmUnavailable` (the algorithm cannot serve a pass) becomes a skip.
    """
    try:
        out = {"forward": fastconv.conv2d(x, w, b, algorithm=algorithm, **kw)}
        if grad_output is not None:
            g = fastconv.conv2d_backward(grad_output, x, w, algorithm=algorithm, **kw)
            out.update(grad_input=g.grad_input, grad_weight=g.grad_weight, grad_bias=g.grad_bias)
    except ValueError as exc:
        skip_if_unsupported(exc)
    return out


def float32_error(algorithm):
    """The registry's ``float32_error`` of ``algorithm`` (for ``'auto'``: the largest, as it may pick
    any of them)."""
    reg = _dispatch.registry()
    if algorithm == "auto":
        return max(a.float32_error for a in reg.values())
    return reg[algorithm].float32_error if algorithm in reg else 1.0


def assert_results(got, want, dtype, scale=1.0, algorithm=None):
    """Compare named results (``'forward'`` and gradients) with separate tolerances.

    Checks type, shape and dtype of every result before any value; ``want`` may be float64.
    ``scale`` widens atol for results whose magnitude grows with the problem size; in float32 the
    tolerances also grow by the ``algorithm``'s stated ``float32_error`` (registry metadata).
    """
    dtype = np.dtype(dtype)
    factor = float32_error(algorithm) if algorithm is not None and dtype == np.float32 else 1.0
    assert set(got) >= set(want), f"missing results {set(want) - set(got)}"
    for name, expected in want.items():
        actual = got[name]
        assert isinstance(actual, np.ndarray), f"{name}: got {type(actual).__name__}"
        assert actual.shape == np.shape(expected), f"{name}: shape {actual.shape} != {np.shape(expected)}"
        assert actual.dtype == dtype, f"{name}: dtype {actual.dtype} != {dtype}"
    for name, expected in want.items():
        rtol, atol = TOL[dtype]["forward" if name == "forward" else "grad"]
        np.testing.assert_allclose(got[name], expected, rtol=rtol * factor, atol=atol * scale * factor, err_msg=name)


def random_array(rng, shape, dtype):
    return rng.standard_normal(shape).astype(dtype)


def distinct_values(rng, shape, dtype=np.float64):
    """A random permutation of well-separated values: no ties, so max-pool is differentiable."""
    n = int(np.prod(shape))
    return (rng.permutation(n).reshape(shape) / max(n, 1) - 0.5).astype(dtype)
