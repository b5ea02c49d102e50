"""The im2col + GEMM algorithm: every geometry against the reference and PyTorch, every tiling
(workspace budget) against the default one, its fast paths, its refusal of impossible budgets and
its handling of the BLAS thread pool."""
import numba
import numpy as np
import pytest

import fastconv
import reference as ref
from conftest import GEOMETRIES, DTYPES, TOL, assert_results, random_array
from fastconv._algorithms import _blas, _im2col_kernels, im2col
from fastconv._validation import conv_params

# (id, x shape, weight shape, keyword arguments).  N is large enough in places that small planes
# are batched several images per GEMM.
CASES = GEOMETRIES + [
    ("1x1-groups", (2, 4, 5, 5), (6, 2, 1, 1), {"groups": 2}),
    ("1x1-stride2", (2, 4, 7, 6), (3, 4, 1, 1), {"stride": 2}),
    ("1x1-padded", (2, 4, 4, 4), (3, 4, 1, 1), {"padding": 1}),
    ("1x1-tiny-planes", (9, 6, 3, 4), (4, 3, 1, 1), {"groups": 2}),  # forward gathers, batched
    ("batched-small-planes", (9, 3, 6, 5), (5, 3, 3, 3), {"padding": 1}),
    ("batched-groups-stride", (8, 4, 8, 8), (6, 2, 3, 3), {"stride": 2, "padding": 1, "groups": 2}),
    ("tall-rows", (1, 2, 40, 37), (10, 2, 3, 3), {"padding": 1}),
    # wide groups and planes: grad_input runs as a forward correlation with the flipped kernel
    ("transposed-gi", (2, 32, 33, 32), (8, 32, 3, 3), {"padding": 1}),
    ("transposed-gi-same-even", (1, 64, 32, 36), (4, 32, 4, 2), {"padding": "same", "groups": 2}),
    ("transposed-gi-dilated", (1, 32, 34, 32), (3, 32, 3, 3), {"dilation": 2, "padding": (1, 2)}),
]
CASE_IDS = [c[0] for c in CASES]


def make(case, dtype, seed=0):
    _, xs, ws, kw = case
    rng = np.random.default_rng(seed)
    x, w, b = random_array(rng, xs, dtype), random_array(rng, ws, dtype), random_array(rng, ws[0], dtype)
    gy = random_array(rng, ref.conv2d(np.zeros(xs), np.zeros(ws), **kw).shape, dtype)
    return x, w, b, gy, kw


def im2col_results(x, w, b, gy, kw, **extra):
    g = fastconv.conv2d_backward(gy, x, w, algorithm="im2col", **kw, **extra)
    return {"forward": fastconv.conv2d(x, w, b, algorithm="im2col", **kw, **extra),
            "grad_input": g.grad_input, "grad_weight": g.grad_weight, "grad_bias": g.grad_bias}


def params(x, w, kw, limit=None):
    return conv_params("test", x.shape, w.shape, x.dtype, kw.get("stride", 1), kw.get("padding", 0),
                       kw.get("dilation", 1), kw.get("groups", 1), limit)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_matches_reference(case, dtype):
    x, w, b, gy, kw = make(case, dtype)
    want = {"forward": ref.conv2d(x, w, b, **kw),
            "grad_input": ref.conv2d_grad_input(gy, x.shape, w, **kw),
            "grad_weight": ref.conv2d_grad_weight(gy, x, w.shape, **kw),
            "grad_bias": ref.conv2d_grad_bias(gy)}
    assert_results(im2col_results(x, w, b, gy, kw), want, dtype, scale=4.0)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_matches_torch(case, torch):
    x, w, b, gy, kw = make(case, np.float32, seed=1)
    tx, tw, tb = (torch.tensor(a, requires_grad=True) for a in (x, w, b))
    ty = torch.nn.functional.conv2d(tx, tw, tb, **kw)
    ty.backward(torch.tensor(gy))
    want = {"forward": ty.detach().numpy(), "grad_input": tx.grad.numpy(),
            "grad_weight": tw.grad.numpy(), "grad_bias": tb.grad.numpy()}
    assert_results(im2col_results(x, w, b, gy, kw), want, np.float32, scale=4.0)


# Budgets that force each tiling: the raw (bounds-checked) gather instead of a padded copy, one
# output row per tile, one input channel per backward tile, fewer workers.  Results are compared
# to the default budget to rounding, not bitwise: a different tile changes how the GEMM blocks
# its sums (OpenBLAS picks kernels and blocking from the matrix sizes) and, in grad_weight, how
# the sum over images and rows is grouped into GEMM calls.  One budget twice gives the same bits.
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", [c for c in CASES if c[0] in
                                  ("stride2-pad1", "dilation", "groups", "batched-small-planes",
                                   "tall-rows", "depthwise-multiplier-s2", "same-even-dilated",
                                   "transposed-gi-same-even")],
                         ids=lambda c: c[0])
def test_tiny_budgets_agree_with_default(case, dtype):
    x, w, b, gy, kw = make(case, dtype)
    base = im2col_results(x, w, b, gy, kw)
    p = params(x, w, kw)
    row = im2col._min_workspace(p, "forward")
    budgets = sorted({row, 2 * row, 3 * row + 8, im2col._planes_bytes(p, p.n, p.c) + row})
    rtol, atol = TOL[np.dtype(dtype)]["grad"]
    for limit in budgets:
        got = im2col_results(x, w, b, gy, kw, workspace_limit=int(limit))
        for name in base:
            np.testing.assert_allclose(got[name], base[name], rtol=rtol, atol=atol,
                                       err_msg=f"{name} at workspace_limit={limit}")
        again = im2col_results(x, w, b, gy, kw, workspace_limit=int(limit))
        for name in base:
            np.testing.assert_array_equal(again[name], got[name], err_msg=f"{name} not deterministic")


def test_budget_bounds_the_scratch_memory():
    x, w, b, gy, kw = make(CASES[CASE_IDS.index("tall-rows")], np.float32)
    for limit in (1 << 14, 1 << 16, 1 << 26):
        p = params(x, w, kw, limit)
        for pass_, col_rows in (("forward", p.cg * p.r * p.s), ("grad_input", p.r * p.s)):
            plan = im2col._Plan(p, col_rows, p.kg, p.g, p.n, im2col._planes_bytes(p, p.n, p.c), False)
            used = plan.nw * plan.words * p.itemsize
            if plan.padded:
                used += im2col._planes_bytes(p, p.n, p.c)
            assert used <= limit, (pass_, limit, used)


def test_budget_below_one_row_is_refused():
    x = np.ones((1, 8, 16, 16), np.float32)
    w = np.ones((4, 8, 3, 3), np.float32)
    need = 8 * 3 * 3 * 14 * 4  # all taps of one output row, float32
    msg = (rf"conv2d: algorithm='im2col' cannot compute the forward pass here: needs at least {need} "
           rf"bytes of workspace for one output row, workspace_limit is {need - 1}")
    with pytest.raises(ValueError, match=msg):
        fastconv.conv2d(x, w, algorithm="im2col", workspace_limit=need - 1)
    fastconv.conv2d(x, w, algorithm="im2col", workspace_limit=need)
    with pytest.raises(ValueError, match=r"conv2d_backward: algorithm='im2col' cannot compute the "
                                         r"grad_input pass here: needs at least 504 bytes"):
        fastconv.conv2d_backward(np.ones((1, 4, 14, 14), np.float32), x, w, algorithm="im2col",
                                 workspace_limit=503)
    # 'auto' skips im2col instead of failing
    y = fastconv.conv2d(x, w, workspace_limit=need - 1)
    np.testing.assert_allclose(y, ref.conv2d(x, w), rtol=1e-5)


def test_grad_input_paths():
    # which cases take the transposed-forward path, so the cases above cover both paths
    for name, expect in (("transposed-gi", True), ("transposed-gi-same-even", True),
                         ("transposed-gi-dilated", True), ("basic", False), ("stride2-pad1", False),
                         ("1x1-padded", False)):
        x, w, _, _, kw = make(CASES[CASE_IDS.index(name)], np.float32)
        assert (im2col._transposed(params(x, w, kw)) is not None) == expect, name
    x, w, _, _, kw = make(CASES[CASE_IDS.index("transposed-gi")], np.float32)
    assert im2col._transposed(params(x, w, kw, 1000)) is None  # too small a budget: col2im


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_non_finite_weight_reaches_only_what_the_scatter_reaches(value):
    # the transposed-forward path multiplies every weight by gy's zero padding too: with a
    # non-finite weight grad_input takes col2im, whose NaN/Inf pattern is PyTorch's
    x, w, _, gy, kw = make(CASES[CASE_IDS.index("transposed-gi")], np.float64)
    w[2, 5, 0, 0] = value
    got = fastconv.conv2d_backward(gy, x, w, algorithm="im2col", **kw).grad_input
    want = ref.conv2d_grad_input(gy, x.shape, w, **kw)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_array_equal(np.isinf(got), np.isinf(want))
    ok = np.isfinite(want)
    assert 0 < ok.sum() < ok.size
    np.testing.assert_allclose(got[ok], want[ok], rtol=1e-10, atol=1e-10)


def test_1x1_reads_the_input_in_place():
    # 1x1 / stride 1 / no padding needs no workspace at all, so even a 1-byte budget works
    x, w, b, gy, kw = make(CASES[CASE_IDS.index("1x1-groups")], np.float64)
    p = params(x, w, kw, 1)
    assert im2col._direct(p) and all(im2col.supports(p, s) is None for s in
                                     ("forward", "grad_input", "grad_weight"))
    got = im2col_results(x, w, b, gy, kw, workspace_limit=1)
    assert_results(got, {"forward": ref.conv2d(x, w, b, **kw),
                         "grad_input": ref.conv2d_grad_input(gy, x.shape, w, **kw),
                         "grad_weight": ref.conv2d_grad_weight(gy, x, w.shape, **kw)}, np.float64)
    assert not im2col._direct(params(x, w, {"groups": 2, "stride": 2}))
    assert not im2col._direct(params(x, w, {"groups": 2, "padding": 1}))


def test_1x1_tiny_planes_forward_is_gathered_and_batched():
    # planes under _IN_PLACE_MIN positions: the forward gathers several images per GEMM; a budget
    # too small for one row of the gather falls back to reading in place
    x, w, b, gy, kw = make(CASES[CASE_IDS.index("1x1-tiny-planes")], np.float64)
    p = params(x, w, kw)
    assert im2col._direct(p) and not im2col._forward_in_place(p)
    plan = im2col._plan(p, p.cg, p.kg, p.g, p.n, im2col._copy_bytes(x, p), False)
    assert plan.nb > 1
    assert im2col._forward_in_place(params(x, w, kw, 1))
    for limit in (None, 1):
        got = fastconv.conv2d(x, w, b, algorithm="im2col", workspace_limit=limit, **kw)
        assert_results({"forward": got}, {"forward": ref.conv2d(x, w, b, **kw)}, np.float64)


@pytest.mark.parametrize("kw", [{}, {"stride": (2, 1)}, {"dilation": 2}], ids=["plain", "row-stride", "dilated"])
def test_unpadded_column_stride_1_gathers_from_the_input(kw):
    # no padding and column stride 1: the gather reads x's planes in place (no padded copy); a
    # read-only x takes the copy instead (another numba specialisation is not worth compiling)
    rng = np.random.default_rng(5)
    x, w = random_array(rng, (5, 3, 13, 11), np.float64), random_array(rng, (4, 3, 3, 2), np.float64)
    gy = random_array(rng, ref.conv2d(x, w, **kw).shape, np.float64)
    p = params(x, w, kw)
    assert im2col._in_place(x, p) and im2col._copy_bytes(x, p) == 0
    frozen = x.copy()
    frozen.flags.writeable = False
    assert not im2col._in_place(frozen, p) and im2col._copy_bytes(frozen, p) > 0
    assert not im2col._in_place(x, params(x, w, {**kw, "padding": 1}))
    assert not im2col._in_place(x, params(x, w, {**kw, "stride": (1, 2)}))
    want = {"forward": ref.conv2d(x, w, **kw), "grad_weight": ref.conv2d_grad_weight(gy, x, w.shape, **kw)}
    for arr in (x, frozen):
        got = {"forward": fastconv.conv2d(arr, w, algorithm="im2col", **kw),
               "grad_weight": fastconv.conv2d_backward(gy, arr, w, algorithm="im2col", **kw).grad_weight}
        assert_results(got, want, np.float64)
    np.testing.assert_array_equal(x, frozen)  # not written to


def test_non_contiguous_inputs():
    rng = np.random.default_rng(3)
    x = random_array(rng, (3, 2, 11, 18), np.float32)[:, :, 1:, ::2]       # strided view
    w = np.asfortranarray(random_array(rng, (4, 2, 3, 3), np.float32))   # Fortran order
    gy = random_array(rng, (3, 4, 9, 11), np.float32).transpose(0, 1, 3, 2)[:, :, 1:, :]
    kw = {"padding": 1}
    assert not (x.flags.c_contiguous or w.flags.c_contiguous or gy.flags.c_contiguous)
    got = im2col_results(x, w, None, gy, kw)
    want = {"forward": ref.conv2d(x, w, **kw), "grad_input": ref.conv2d_grad_input(gy, x.shape, w, **kw),
            "grad_weight": ref.conv2d_grad_weight(gy, x, w.shape, **kw)}
    assert_results({k: got[k] for k in want}, want, np.float32, scale=4.0)


def test_single_thread_agrees(monkeypatch):
    # the thread count changes the tiling (rows split for idle workers, batch split in grad_weight)
    x, w, b, gy, kw = make(CASES[CASE_IDS.index("batched-small-planes")], np.float64)
    base = im2col_results(x, w, b, gy, kw)
    with fastconv.threads(1):
        one = im2col_results(x, w, b, gy, kw)
    for name in base:
        np.testing.assert_allclose(one[name], base[name], rtol=1e-12, atol=1e-12, err_msg=name)


def test_blas_threads_restored():
    threadpoolctl = pytest.importorskip("threadpoolctl")
    x, w, b, gy, kw = make(CASES[0], np.float32)
    libs = _blas.serial_blas.found()[2]
    assert libs, "the BLAS that kernels call was not found by threadpoolctl"
    before = [lib.get_num_threads() for lib in libs]
    with _blas.serial_blas:
        assert all(lib.get_num_threads() == 1 for lib in libs)
        with _blas.serial_blas:  # re-entrant
            pass
        assert all(lib.get_num_threads() == 1 for lib in libs)
    im2col_results(x, w, b, gy, kw)
    assert [lib.get_num_threads() for lib in libs] == before
    assert threadpoolctl.threadpool_info()  # still readable


@numba.njit
def _gemm_call(fn, iv, ta, tb, m, n, kk, alpha, a, lda, b, ldb, beta, c, ldc):
    _blas._gemm(fn, iv, _blas._chars(), ta, tb, m, n, kk, alpha, a, lda, b, ldb, beta, c, ldc)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("source", ["numpy", "scipy"])
def test_gemm_call_every_transpose_and_pitch(monkeypatch, source, dtype):
    # the call convention the kernels use (row-major operands, own leading dimensions, beta), through
    # numpy's bundled OpenBLAS (64-bit ints) and without it through scipy's cython_blas (32-bit)
    lib = _blas._Blas()
    if source == "scipy":
        monkeypatch.setattr(lib, "_NUMPY_SYMBOLS", ())
    fn, iv = lib.args(dtype, 1)
    if source == "scipy":
        assert iv.dtype == np.int32
    rng = np.random.default_rng(3)
    m, n, kk = 7, 5, 11
    for ta in (_blas._N, _blas._T):
        for tb in (_blas._N, _blas._T):
            for beta in (0.0, 1.0):
                opa = random_array(rng, (m, kk), dtype)
                opb = random_array(rng, (kk, n), dtype)
                # stored with row pitches larger than their rows: the kernels pass sub-matrices
                a = np.zeros((kk, m + 3) if ta else (m, kk + 3), dtype)
                b = np.zeros((n, kk + 2) if tb else (kk, n + 2), dtype)
                if ta:
                    a[:, :m] = opa.T
                else:
                    a[:, :kk] = opa
                if tb:
                    b[:, :kk] = opb.T
                else:
                    b[:, :n] = opb
                c = random_array(rng, (m, n + 4), dtype)
                want = c.copy()
                want[:, :n] = opa.astype(np.float64) @ opb + beta * c[:, :n]
                with lib:
                    _gemm_call(fn, iv[0], ta, tb, m, n, kk, np.ones(1, dtype), a.ravel(), a.shape[1],
                               b.ravel(), b.shape[1], np.full(1, beta, dtype), c.ravel(), c.shape[1])
                rtol, atol = TOL[np.dtype(dtype)]["forward"]
                np.testing.assert_allclose(c, want, rtol=rtol, atol=atol * 10)


def test_scipy_blas_fallback(monkeypatch):
    # without numpy's bundled OpenBLAS symbols the kernels call scipy's cython_blas (32-bit ints);
    # one pass end to end (each im2col kernel compiles again for the other integer type: ~50 s for
    # all three passes in both dtypes, so the transposes are checked above on the call itself)
    fallback = _blas._Blas()
    monkeypatch.setattr(fallback, "_NUMPY_SYMBOLS", ())
    assert fallback.found()[1] is np.int32
    monkeypatch.setattr(im2col, "_BLAS", fallback)
    monkeypatch.setattr(im2col, "serial_blas", fallback)
    x, w, b, gy, kw = make(CASES[CASE_IDS.index("batched-groups-stride")], np.float32)
    got = fastconv.conv2d(x, w, b, algorithm="im2col", **kw)
    assert_results({"forward": got}, {"forward": ref.conv2d(x, w, b, **kw)}, np.float32, scale=4.0)


def test_zero_batch():
    x = np.ones((0, 2, 5, 5), np.float32)
    w = np.ones((3, 2, 3, 3), np.float32)
    assert fastconv.conv2d(x, w, algorithm="im2col").shape == (0, 3, 3, 3)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("run, pitch", [(1, 1), (1, 9), (7, 9), (8, 8), (10, 14), (10, 10), (17, 40), (33, 35)])
@pytest.mark.parametrize("nruns", [0, 1, 5])
def test_copy_runs_writes_exactly_its_runs(dtype, run, pitch, nruns):
    # the gather's row copier rounds runs up to whole vectors; only the runs may change, even
    # when the source ends right after the last run (the in-place gather reads the input itself)
    rng = np.random.default_rng(run * 100 + pitch)
    soff, doff = 3, 5
    src = rng.standard_normal(soff + max(0, nruns - 1) * pitch + run).astype(dtype)
    d = np.full(doff + nruns * run + 40, -9, dtype)
    _im2col_kernels._copy_runs(d, doff, src, soff, pitch, nruns, run)
    want = np.full_like(d, -9)
    for i in range(nruns):
        want[doff + i * run:doff + (i + 1) * run] = src[soff + i * pitch:soff + i * pitch + run]
    np.testing.assert_array_equal(d, want)


def test_weight_tiling_balances_the_workers():
    # 3 channels on 2 workers: a channel split (2 + 1) idles one worker a third of the time, so
    # the batch is split instead; 64 channels split evenly and need no partial sums
    def tiling(xs, ws, threads, limit=None):
        x, w = np.zeros(xs, np.float32), np.zeros(ws, np.float32)
        return im2col._weight_tiling(params(x, w, {"padding": 1}, limit), threads)

    assert tiling((8, 3, 20, 20), (8, 3, 5, 5), 2) == (3, 2)
    assert tiling((8, 64, 12, 12), (8, 64, 3, 3), 2) == (32, 1)
    assert tiling((8, 64, 12, 12), (8, 64, 3, 3), 1) == (64, 1)
    assert tiling((1, 3, 20, 20), (8, 3, 5, 5), 2) == (2, 1)  # one image: only channels can split
    # room for a 3-channel row per worker (2 x 6000 bytes) but not for a second partial sum of gw
    # (2400 bytes) beside them: the channel split stays
    assert tiling((8, 3, 20, 20), (8, 3, 5, 5), 2, limit=13000) == (2, 1)
    assert tiling((8, 3, 20, 20), (8, 3, 5, 5), 2, limit=14400) == (3, 2)


@pytest.mark.parametrize("threads", [1, 2])
def test_grad_weight_any_split_matches_reference(threads):
    rng = np.random.default_rng(11)
    x, w = random_array(rng, (5, 3, 12, 11), np.float64), random_array(rng, (4, 3, 3, 3), np.float64)
    kw = {"padding": 1, "stride": 2}
    gy = random_array(rng, ref.conv2d(x, w, **kw).shape, np.float64)
    with fastconv.threads(threads):
        got = fastconv.conv2d_backward(gy, x, w, algorithm="im2col", **kw).grad_weight
    np.testing.assert_allclose(got, ref.conv2d_grad_weight(gy, x, w.shape, **kw), rtol=1e-12, atol=1e-12)
