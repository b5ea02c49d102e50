"""The direct algorithm's strided grad_input: the transposed convolution split by input phase
(one stride-1 correlation per phase with the taps of that phase), against the NumPy reference, and
the scatter it replaces, which still serves non-finite weights."""
import numpy as np
import pytest

import reference as ref
from conftest import random_array
from fastconv._algorithms import direct
from fastconv._validation import conv_params

CASES = [  # (id, x shape, weight shape, keyword arguments)
    ("s2-3x3-pad1", (2, 4, 11, 12), (6, 4, 3, 3), {"stride": 2, "padding": 1}),
    ("s3x1-5x2", (1, 3, 13, 9), (5, 3, 5, 2), {"stride": (3, 1), "padding": (2, 0)}),
    ("s1x2-dilated", (2, 2, 10, 14), (3, 2, 3, 3), {"stride": (1, 2), "dilation": 2, "padding": 1}),
    ("s2-dilated-3", (1, 2, 17, 16), (4, 2, 3, 2), {"stride": 2, "dilation": 3}),
    ("stride-beyond-kernel", (2, 3, 13, 11), (4, 3, 2, 1), {"stride": (4, 3), "padding": (1, 0)}),
    ("s2-groups", (2, 6, 9, 9), (4, 3, 3, 3), {"stride": 2, "groups": 2, "padding": (0, 2)}),
    ("alexnet-like", (1, 3, 35, 35), (8, 3, 11, 11), {"stride": 4, "padding": 2}),
]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_phases_match_reference_and_scatter(case, dtype):
    _, xs, ws, kw = case
    rng = np.random.default_rng(1)
    x, w = random_array(rng, xs, dtype), random_array(rng, ws, dtype)
    gy = random_array(rng, ref.conv2d(x, w, **kw).shape, dtype)
    p = conv_params("test", x.shape, w.shape, x.dtype, kw.get("stride", 1), kw.get("padding", 0),
                    kw.get("dilation", 1), kw.get("groups", 1))
    got = direct._grad_input_by_phases(gy, w, p)
    tol = 1e-4 if dtype == np.float32 else 1e-11
    want = ref.conv2d_grad_input(gy, x.shape, w, **kw)
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol)
    # direct.grad_input takes this path for finite weights, the scatter for others
    np.testing.assert_array_equal(direct.grad_input(gy, w, p), got)
    w_nan = w.copy()
    w_nan[0, 0, 0, 0] = np.nan
    scatter = direct.grad_input(gy, w_nan, p)
    finite = ~np.isnan(scatter)
    assert finite.any() and not finite.all()
    w_nan[0, 0, 0, 0] = w[0, 0, 0, 0]
    np.testing.assert_allclose(scatter[finite], got[finite], rtol=tol, atol=tol)


@pytest.mark.parametrize("st, d, r", [(2, 1, 3), (3, 2, 5), (4, 1, 2), (2, 2, 3), (4, 6, 4), (1, 1, 3)])
def test_phase_taps_partition_the_kernel(st, d, r):
    # every tap belongs to exactly one phase: the phase of its offset r*d
    n_out, n_pad = 7, (7 - 1) * st + (r - 1) * d + 1
    seen = []
    for a in range(st):
        taps, count, before, after, de = direct._phase_taps(a, st, d, r, n_out, n_pad)
        seen += taps
        assert all((t * d) % st == a for t in taps)
        assert count == len(range(a, n_pad, st))
        if len(taps) > 1:  # evenly spaced offsets: one dilation per phase
            assert all((taps[j + 1] - taps[j]) * d == de * st for j in range(len(taps) - 1))
    assert sorted(seen) == list(range(r))
