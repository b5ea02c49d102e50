"""The direct algorithm's per-image kernels (many small images: each work item pads its own planes):
the same results as the padded-copy kernels and the NumPy reference, over every geometry."""
import numpy as np
import pytest

import reference as ref
from conftest import GEOMETRIES, assert_results, random_array, run_conv
from fastconv._algorithms import direct

# the shared geometries with a batch large enough for the per-image path, plus LeNet-sized layers
CASES = [(name, (16 + xs[0],) + xs[1:], ws, kw) for name, xs, ws, kw in GEOMETRIES if ws[1] * kw.get("groups", 1) != ws[0] or ws[1] != 1]
CASES += [("lenet5-c3-like", (20, 6, 14, 14), (16, 6, 5, 5), {}),
          ("odd-channels", (17, 5, 9, 7), (7, 5, 3, 2), {"padding": (1, 0)}),
          # rows too long for one stack accumulator block (direct._STACK_COLS): several row blocks
          ("wide-rows", (16, 2, 40, 40), (4, 2, 3, 3), {"padding": 1})]


def _paths(monkeypatch, per_image):
    monkeypatch.setattr(direct, "_ROWS_MAX_BYTES", -1)  # grad_weight by the per-image / padded kernels
    monkeypatch.setattr(direct, "_IMG_MIN_ITEMS", 1 if per_image else 10**9)
    # the per-image grad_input too wherever it fits, not only where it pays (_gi_img_pays)
    monkeypatch.setattr(direct, "_GI_IMG_MAX_TAPS", 10**9 if per_image else 160)
    monkeypatch.setattr(direct, "_GI_IMG_MAX_LANES", 10.0 if per_image else 0.85)


def _make(case, dtype, seed=0):
    _, xs, ws, kw = case
    rng = np.random.default_rng(seed)
    x, w, b = random_array(rng, xs, dtype), random_array(rng, ws, dtype), random_array(rng, ws[0], dtype)
    gy = random_array(rng, ref.conv2d(x, w, **kw).shape, dtype)
    return x, w, b, gy, kw


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_per_image_matches_reference_and_padded_path(case, dtype, monkeypatch):
    x, w, b, gy, kw = _make(case, dtype)
    _paths(monkeypatch, True)
    got = run_conv("direct", x, w, b, gy, **kw)
    want = {"forward": ref.conv2d(x, w, b, **kw), "grad_input": ref.conv2d_grad_input(gy, x.shape, w, **kw),
            "grad_weight": ref.conv2d_grad_weight(gy, x, w.shape, **kw), "grad_bias": ref.conv2d_grad_bias(gy)}
    assert_results(got, want, dtype, scale=np.sqrt(x.shape[0]))
    _paths(monkeypatch, False)
    other = run_conv("direct", x, w, b, gy, **kw)
    # the forward runs the same block kernel in the same order: the same bits (grad_input is W.T @ g
    # and col2im on this path, the correlation on the other: both checked against the reference)
    assert np.array_equal(got["forward"], other["forward"])
    assert_results(other, want, dtype, scale=np.sqrt(x.shape[0]))


def test_per_image_path_is_taken_for_lenet_sized_layers(monkeypatch):
    # the shape rule picks the per-image kernels for LeNet's layers and not for large planes
    assert direct._per_image(64, 1, 6, 14 * 14 + direct.SLACK, 4)
    assert not direct._per_image(8, 1, 256, 56 * 56 + direct.SLACK, 4)
    assert not direct._per_image(4, 1, 6, 14 * 14 + direct.SLACK, 4)
    calls = []
    for name in ("_forward_img", "_grad_input_img", "_grad_weight_img", "_forward", "_grad_weight",
                 "grad_weight_rows"):
        original = getattr(direct, name)
        monkeypatch.setattr(direct, name, lambda *a, _f=original, _n=name: calls.append(_n) or _f(*a))
    x = np.ones((64, 6, 14, 14), np.float32)
    w = np.ones((16, 6, 5, 5), np.float32)
    run_conv("direct", x, w, None, np.ones((64, 16, 10, 10), np.float32))
    assert calls == ["_forward_img", "_grad_input_img", "grad_weight_rows"]  # forward, grad_input, grad_weight
    # without the output-channel-lane grad_weight (tap_rows), the per-image one
    calls.clear()
    monkeypatch.setattr(direct, "_ROWS_MAX_BYTES", -1)
    run_conv("direct", x, w, None, np.ones((64, 16, 10, 10), np.float32))
    assert calls == ["_forward_img", "_grad_input_img", "_grad_weight_img"]
    # one image of many groups: the per-image forward is parallel over (image, group) items, the
    # per-image grad_weight only over images, so it keeps the padded-copy kernel
    calls.clear()
    run_conv("direct", np.ones((1, 32, 8, 8), np.float32), np.ones((32, 2, 3, 3), np.float32), None,
             np.ones((1, 32, 6, 6), np.float32), groups=16)
    assert calls == ["_forward_img", "_grad_input_img", "_grad_weight"]
    # 'same' padding saves no lanes: grad_input runs as the correlation (the forward's kernel)
    calls.clear()
    run_conv("direct", np.ones((32, 64, 7, 7), np.float32), np.ones((64, 64, 3, 3), np.float32), None,
             np.ones((32, 64, 7, 7), np.float32), padding=1)
    assert calls == ["_forward_img", "_forward_img", "_grad_weight"]


@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
def test_per_image_grad_weight_with_nonfinite_input(bad, monkeypatch):
    # a garbage column times a zero gradient must not turn a finite weight gradient into NaN
    x, w, b, gy, kw = _make(("nf", (18, 3, 9, 8), (4, 3, 3, 3), {"padding": 1}), np.float64, seed=2)
    x[4, 1, 2, 7] = bad
    _paths(monkeypatch, True)
    got = run_conv("direct", x, w, b, gy, padding=1)
    want = ref.conv2d_grad_weight(gy, x, w.shape, padding=1)
    assert np.array_equal(np.isnan(got["grad_weight"]), np.isnan(want))
    assert np.array_equal(np.isinf(got["grad_weight"]), np.isinf(want))
    fin = np.isfinite(want)
    assert fin.any() and not fin.all()
    np.testing.assert_allclose(got["grad_weight"][fin], want[fin], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("bad", [np.inf, np.nan])
def test_per_image_grad_input_with_nonfinite_weight_sums_only_real_terms(bad, monkeypatch):
    # W.T @ g multiplies every weight by the zeros between gradient rows: a non-finite weight takes
    # the scatter instead, which (like PyTorch) only forms real products
    x, w, b, gy, kw = _make(("nfw", (18, 3, 9, 8), (4, 3, 3, 3), {"padding": 1}), np.float64, seed=3)
    w[1, 2, 0, 1] = bad
    calls = []
    original = direct._grad_input_img
    monkeypatch.setattr(direct, "_grad_input_img", lambda *a: calls.append(1) or original(*a))
    got = run_conv("direct", x, w, b, gy, padding=1)["grad_input"]
    want = ref.conv2d_grad_input(gy, x.shape, w, padding=1)
    assert calls == []
    assert np.array_equal(np.isnan(got), np.isnan(want)) and np.array_equal(np.isinf(got), np.isinf(want))
    fin = np.isfinite(want)
    assert fin.any() and not fin.all()
    np.testing.assert_allclose(got[fin], want[fin], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("pads, dil", [((1, 2, 0, 3), (1, 1)), ((-1, 0, -2, 1), (1, 1)), ((2, 2, 2, 2), (2, 3)),
                                       ((0, 0, -1, -1), (2, 1)), ((0, 0, 0, 0), (1, 1)), ((0, -2, 0, 0), (1, 2))])
def test_column_shifted_layout_gives_the_padded_paths_bits(pads, dil, dtype, monkeypatch):
    # stride-1 per-image forwards read s column-shifted copies of each plane (_fill_shifted);
    # padding, crops (grad_input's correlation pads by negative amounts) and dilation included;
    # rows with no zeros beside them are copied as whole vectors running past the row ('valid'
    # layers such as lenet5-c3, and a cropped bottom)
    rng = np.random.default_rng(3)
    x = random_array(rng, (18, 3, 9, 11), dtype)
    w = random_array(rng, (5, 3, 3, 4), dtype)
    top, bottom, left, right = pads
    oh = 9 + top + bottom - dil[0] * 2
    ow = 11 + left + right - dil[1] * 3
    calls = []
    original = direct._forward_img
    monkeypatch.setattr(direct, "_forward_img", lambda *a: calls.append(a[-2]) or original(*a))
    got = direct._conv(x, top, bottom, left, right, w, None, 1, 1, dil[0], dil[1], 1, oh, ow)
    assert calls == [4]  # the shifted layout, one copy per kernel column
    _paths(monkeypatch, False)
    want = direct._conv(x, top, bottom, left, right, w, None, 1, 1, dil[0], dil[1], 1, oh, ow)
    assert np.array_equal(got, want)
    xp = np.pad(x, ((0, 0), (0, 0), (max(top, 0), max(bottom, 0)), (max(left, 0), max(right, 0))))
    xp = xp[:, :, max(-top, 0):xp.shape[2] - max(-bottom, 0), max(-left, 0):xp.shape[3] - max(-right, 0)]
    tol = 1e-12 if dtype == np.float64 else 1e-5
    np.testing.assert_allclose(got, ref.conv2d(xp, w, dilation=dil), rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("pads", [(0, 2, 0, 0), (1, 3, 0, 0), (0, 0, 0, 0)])
def test_shifted_rows_copied_as_vectors_leave_the_zero_rows_zero(pads, dtype, monkeypatch):
    # output rows narrower than a vector (3 columns): a row's whole-vector copy runs over the next
    # rows, which must all be copied after it -- never into the zero rows of the bottom padding
    rng = np.random.default_rng(4)
    x = random_array(rng, (17, 2, 9, 5), dtype)
    w = random_array(rng, (3, 2, 3, 3), dtype)
    top, bottom, left, right = pads
    oh, ow = 9 + top + bottom - 2, 3
    calls = []
    original = direct._forward_img
    monkeypatch.setattr(direct, "_forward_img", lambda *a: calls.append(a[-2]) or original(*a))
    got = direct._conv(x, top, bottom, left, right, w, None, 1, 1, 1, 1, 1, oh, ow)
    assert calls == [3]
    xp = np.pad(x, ((0, 0), (0, 0), (top, bottom), (0, 0)))
    tol = 1e-12 if dtype == np.float64 else 1e-5
    np.testing.assert_allclose(got, ref.conv2d(xp, w), rtol=tol, atol=tol)
