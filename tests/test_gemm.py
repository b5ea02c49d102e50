"""fastconv's own GEMM against numpy's matmul: both dtypes, every transpose, beta 0 and 1, odd,
prime, tiny, tall-skinny and block-crossing sizes (with small blocks); the serial entry as numba's
workers run it, one block of C each; another ISA's micro-kernel tile on this CPU; what _cpu reports."""
import numba
import numpy as np
import pytest

from fastconv import _cpu
from fastconv._algorithms import gemm as G

DTYPES = [np.float32, np.float64]
# (m, n, k): tiny, odd, prime, tall-skinny both ways, one edge tile in each direction
SHAPES = [(1, 1, 1), (2, 3, 4), (7, 13, 5), (31, 37, 41), (97, 3, 19), (3, 101, 23), (1, 64, 300),
          (64, 1, 7)]


def small_blocks(dtype):
    """kc, mc, nc just above one micro-tile: small matrices cross every block boundary."""
    mr, nr = G.tile(np.dtype(dtype).itemsize)
    return np.array([5, 2 * mr, 2 * nr], dtype=np.int64)


def operands(rng, m, n, k, dtype, ta, tb):
    a = rng.standard_normal((k, m) if ta else (m, k)).astype(dtype)
    b = rng.standard_normal((n, k) if tb else (k, n)).astype(dtype)
    return (a.T if ta else a), (b.T if tb else b)


def check(c, a, b, c0=None):
    """|c - (c0 +) a.b| within the float error bound 2 k eps |a|.|b| (computed in float64)."""
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    want = a64 @ b64 + (0 if c0 is None else c0.astype(np.float64))
    eps = np.finfo(c.dtype).eps
    k = a.shape[1]
    bound = 2 * (k + 2) * eps * (np.abs(a64) @ np.abs(b64) + (0 if c0 is None else np.abs(c0))) + 1e-30
    assert c.shape == want.shape and c.dtype == a.dtype
    err = np.abs(c.astype(np.float64) - want)
    assert (err <= bound).all(), f"max error {err.max()} over bound {bound[err > bound].min()}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ta,tb", [(False, False), (True, False), (False, True), (True, True)])
def test_gemm_against_numpy(dtype, ta, tb):
    rng = np.random.default_rng(1)
    for m, n, k in SHAPES:
        for blk in (None, small_blocks(dtype)):
            a, b = operands(rng, m, n, k, dtype, ta, tb)
            check(G.gemm(a, b, blk=blk), a, b)
            c0 = rng.standard_normal((m, n)).astype(dtype)
            c = c0.copy()
            out = G.gemm(a, b, c, beta=1, blk=blk)
            assert out is c
            check(c, a, b, c0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_gemm_crosses_real_blocks(dtype):
    """Sizes past this machine's kc, mc and nc (one of them at a time)."""
    rng = np.random.default_rng(2)
    kc, mc, nc = (int(v) for v in G.blocking(dtype))
    for m, n, k in [(mc + 5, 19, kc + 3), (9, nc + 7, 11)]:
        a, b = operands(rng, m, n, k, dtype, False, False)
        check(G.gemm(a, b), a, b)


@pytest.mark.parametrize("dtype", DTYPES)
def test_gemm_output_views_and_nan_free_beta0(dtype):
    """beta 0 never reads C (NaN garbage stays out); C may be a row-strided view; k = 0 gives 0."""
    rng = np.random.default_rng(3)
    a, b = operands(rng, 11, 21, 9, dtype, False, True)
    big = np.full((11, 40), np.nan, dtype=dtype)
    G.gemm(a, b, big[:, 3:24], blk=small_blocks(dtype))
    check(big[:, 3:24], a, b)
    assert np.isnan(big[:, :3]).all() and np.isnan(big[:, 24:]).all()
    z = G.gemm(np.ones((3, 0), dtype), np.ones((0, 4), dtype))
    assert (z == 0).all() and z.shape == (3, 4)


@pytest.mark.parametrize("dtype", DTYPES)
def test_gemm_same_bits_for_every_cut(dtype):
    """One block on one thread, many blocks (gemm_serial per block inside the workers) otherwise:
    the same bits, since every element is summed in the same order."""
    rng = np.random.default_rng(4)
    a, b = operands(rng, 37, 83, 29, dtype, True, False)
    blk = small_blocks(dtype)
    one = G.gemm(a, b, threads=1, blk=blk)
    mr, nr = G.tile(np.dtype(dtype).itemsize)
    assert G._split(37, 83, 29, mr, nr, int(blk[1]), 1) == (-(-37 // mr) * mr, -(-83 // nr) * nr)
    for t in (2, 3, 8):
        bm, bn = G._split(37, 83, 29, mr, nr, int(blk[1]), t)
        assert bm % mr == 0 and bn % nr == 0 and -(-37 // bm) * -(-83 // bn) >= 2 * min(t, 2)
        assert np.array_equal(one, G.gemm(a, b, threads=min(t, numba.config.NUMBA_NUM_THREADS), blk=blk))


def test_packed_a_shared_by_products():
    """pack_a_all once, gemm_serial_packed for several B: the same bits as gemm_serial."""
    for dtype in DTYPES:
        rng = np.random.default_rng(7)
        for blk in (None, small_blocks(dtype)):
            blk = G.blocking(dtype) if blk is None else blk
            m, k = 13, 17
            a = rng.standard_normal((k, m)).astype(dtype).T  # transposed A
            pa = np.empty(G.packed_a_size(dtype, m, k), dtype)
            ws = np.empty(G.workspace_size(dtype, blk), dtype)
            _pack_all(m, k, a, pa, blk)
            for n in (1, 7, 40):
                b = rng.standard_normal((k, n)).astype(dtype)
                c = np.empty((m, n), dtype)
                _packed_gemm(m, n, k, pa, b.reshape(-1), c.reshape(-1), ws, blk)
                assert np.array_equal(c, G.gemm(a, b, blk=blk))


def _pack_all(m, k, a, pa, blk):
    flat, rs, cs = G._flat(a)
    _pack_all_jit(m, k, flat, rs, cs, pa, blk)


@numba.njit(cache=True)
def _pack_all_jit(m, k, a, rs, cs, pa, blk):
    G.pack_a_all(m, k, a, 0, rs, cs, pa, blk)


@numba.njit(cache=True)
def _packed_gemm(m, n, k, pa, b, c, ws, blk):
    G.gemm_serial_packed(m, n, k, pa, b, 0, n, 1, 0, c, 0, n, ws, blk)


def test_gemm_rejects_bad_arguments():
    a = np.ones((2, 3), np.float32)
    with pytest.raises(ValueError, match="gemm: a and b must be"):
        G.gemm(a, a)
    with pytest.raises(TypeError, match="float32 or float64"):
        G.gemm(a, np.ones((3, 2), np.float64))
    with pytest.raises(ValueError, match="beta must be 0 or 1"):
        G.gemm(a, a.T, beta=2)
    with pytest.raises(ValueError, match="c must be"):
        G.gemm(a, a.T, np.ones((2, 2), np.float32)[:, ::2])
    with pytest.raises(ValueError, match="blk must"):
        G.gemm(a, a.T, blk=[4, 5, 7])


@numba.njit(cache=True)
def _spec_tile(kc, pa, pb, c, ldc, acc):
    # AVX-512's float32 tile (14 rows x 2 vectors of 64 bytes) and the portable one (6 x 2 x 16)
    ukernel_spec = G.ukernel_spec
    ukernel_spec(kc, pa, 0, pb, 0, c, 0, ldc, acc, 14, 2, 64)
    ukernel_spec(kc, pa, 0, pb, 0, c, 14 * ldc, ldc, acc, 6, 2, 16)


def test_other_isa_tiles_on_this_cpu():
    """The emitter with another vector width: the AVX-512 build is the same code, wider."""
    rng = np.random.default_rng(6)
    kc = 9
    pa = rng.standard_normal(kc * 14).astype(np.float32)    # pa[p*14 + i]
    pb = rng.standard_normal(kc * 32).astype(np.float32)    # pb[p*32 + j]
    c = np.zeros((20, 32), np.float32)
    _spec_tile(kc, pa, pb, c.reshape(-1), 32, 0)
    a14 = pa.reshape(kc, 14).T
    np.testing.assert_allclose(c[:14], a14 @ pb.reshape(kc, 32), rtol=1e-5, atol=1e-5)
    a6 = pa.reshape(kc * 14)[:kc * 6].reshape(kc, 6).T
    np.testing.assert_allclose(c[14:, :8], a6 @ pb[:kc * 8].reshape(kc, 8), rtol=1e-5, atol=1e-5)
    assert (c[14:, 8:] == 0).all()


def test_cpu_report(tmp_path):
    assert _cpu.isa() in ("avx512", "avx2", "portable")
    assert _cpu.vector_bytes() == _cpu.VECTOR_BYTES[_cpu.isa()]
    assert _cpu.isa_of({"avx2", "fma", "avx512f"}) == "avx512"
    assert _cpu.isa_of({"avx2", "fma"}) == "avx2"
    assert _cpu.isa_of({"avx2"}) == "portable"
    sizes = _cpu.cache_sizes()
    assert 0 < sizes["l1d"] < sizes["l2"] < sizes["l3"]
    # a fake sysfs tree: sizes parsed, instruction cache ignored, missing levels defaulted
    for i, (level, kind, size) in enumerate([(1, "Data", "48K"), (1, "Instruction", "32K"), (2, "Unified", "2048K")]):
        d = tmp_path / f"index{i}"
        d.mkdir()
        (d / "level").write_text(f"{level}\n")
        (d / "type").write_text(kind + "\n")
        (d / "size").write_text(size + "\n")
    got = _cpu.cache_sizes.__wrapped__(str(tmp_path))
    assert got == {"l1d": 48 << 10, "l2": 2 << 20, "l3": 8 << 20}
    kc, mc, nc = G.blocking(np.float32, caches=got, isa="avx512")
    assert (int(kc), int(mc) % 14, int(nc) % 32) == (192, 0, 0)


@numba.njit
def _run_segments(nseg, segs, soff, pa, lda, pb, ldb, c, coff, ldc, acc, rows):
    G.ukernel_segments(nseg, segs, soff, pa, lda, pb, ldb, c, coff, ldc, acc, rows)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("acc", [0, 1])
def test_ukernel_segments_against_numpy(dtype, acc):
    """Every row count, segments of one and many k steps at any strides, and no segment at all
    (the tile is then zero, or C unchanged with acc)."""
    mr, nr = G.tile(np.dtype(dtype).itemsize)
    rng = np.random.default_rng(0)
    pa, pb = rng.standard_normal(4000).astype(dtype), rng.standard_normal(6000).astype(dtype)
    lda, ldb, ldc, coff = 37, 45, nr + 3, 5
    segs = np.array([9, 9, 9, 0, 0, 1, 5, 7, 3, 100, 200, 17, 700, 900, 2], np.int64)  # the first: skipped
    for rows in range(1, mr + 1):
        for nseg in (0, 4):
            c = rng.standard_normal(coff + mr * ldc).astype(dtype)
            want = c.copy()
            tile = np.zeros((rows, nr))
            for ao, bo, n in segs.reshape(-1, 3)[1:1 + nseg]:
                for p in range(n):
                    tile += np.outer(pa[ao + p * lda:ao + p * lda + rows], pb[bo + p * ldb:bo + p * ldb + nr])
            for i in range(rows):
                row = slice(coff + i * ldc, coff + i * ldc + nr)
                want[row] = (want[row] if acc else 0) + tile[i]
            _run_segments(nseg, segs, 3, pa, lda, pb, ldb, c, coff, ldc, acc, rows)
            np.testing.assert_allclose(c, want, rtol=1e-5 if dtype == np.float32 else 1e-12, atol=1e-5)
