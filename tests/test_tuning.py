"""choose_algorithm, per-pass auto, and the autotune cache (memory, disk, corruption, concurrency)."""
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import fastconv
from fastconv import _cpu, _dispatch, _select

GEOM = dict(x_shape=(2, 4, 9, 9), weight_shape=(6, 4, 3, 3), padding=1)


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    """An empty autotune cache directory, autotuning on, restored afterwards."""
    monkeypatch.setenv("FASTCONV_CACHE_DIR", str(tmp_path))
    fastconv.clear_autotune_cache()
    old = fastconv.set_autotune(True)
    yield tmp_path
    fastconv.set_autotune(old)
    fastconv.clear_autotune_cache()


@pytest.mark.parametrize("pass_", _dispatch.PASSES)
def test_choose_matches_cost_model_and_is_eligible(pass_):
    name = fastconv.choose_algorithm(**GEOM, pass_=pass_)
    assert name in fastconv.algorithms()
    p = fastconv._validation.conv_params("t", GEOM["x_shape"], GEOM["weight_shape"], np.float32, 1, 1, 1, 1)
    threads = fastconv._threads.apply(p.macs if pass_ == "forward" else 2 * p.macs)  # as choose_algorithm
    costs = {a.name: _select.calibrated_cost(a, p, pass_, threads) for a in _dispatch.eligible(p, pass_)}
    assert name == min(costs, key=costs.get)


@pytest.mark.parametrize("pass_", _dispatch.PASSES)
def test_choose_measure_returns_every_eligible_algorithm(pass_):
    name, times = fastconv.choose_algorithm(**GEOM, dtype="float64", pass_=pass_, measure=True)
    p = fastconv._validation.conv_params("t", GEOM["x_shape"], GEOM["weight_shape"], np.float64, 1, 1, 1, 1)
    assert set(times) == {a.name for a in _dispatch.eligible(p, pass_)}
    assert all(t > 0 for t in times.values())
    assert name == min(times, key=times.get)


def test_backward_auto_chooses_each_pass(monkeypatch):
    """conv2d_backward(auto) asks the dispatcher once per gradient pass."""
    seen = []
    real = _select.select

    def spy(fn, algorithm, p, pass_, threads):
        seen.append(pass_)
        return real(fn, algorithm, p, pass_, threads)

    monkeypatch.setattr(fastconv.functional, "select", spy)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 2, 6, 6)).astype(np.float32)
    w = rng.standard_normal((3, 2, 3, 3)).astype(np.float32)
    fastconv.conv2d_backward(np.ones((1, 3, 4, 4), np.float32), x, w)
    assert seen == ["grad_input", "grad_weight"]


def test_autotune_writes_and_reuses(cache_dir, monkeypatch):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 4, 9, 9)).astype(np.float32)
    w = rng.standard_normal((6, 4, 3, 3)).astype(np.float32)
    y = fastconv.conv2d(x, w, padding=1)
    path = cache_dir / "autotune.json"
    data = json.loads(path.read_text())
    assert data["version"] == fastconv.__version__
    (key, name), = data["entries"].items()
    assert name in fastconv.algorithms() and "|forward|" in key and "threads=" in key
    # a second call (and a fresh in-memory state reading the file) does not measure again
    calls = []
    monkeypatch.setattr(_select, "measure_all", lambda *a: calls.append(a) or {"direct": 1.0})
    np.testing.assert_array_equal(fastconv.conv2d(x, w, padding=1), y)
    _select._memory.clear()
    _select._loaded = False
    np.testing.assert_array_equal(fastconv.conv2d(x, w, padding=1), y)
    assert calls == []
    # another geometry is measured
    fastconv.conv2d(x[:1], w, padding=1)
    assert len(calls) == 1


@pytest.mark.parametrize("content", ["{not json", json.dumps({"format": 1, "version": "0.0.0-other", "entries": {}}),
                                     json.dumps([1, 2, 3])])
def test_corrupt_or_foreign_cache_is_ignored_with_warning(cache_dir, content):
    (cache_dir / "autotune.json").write_text(content)
    x = np.ones((1, 2, 5, 5), np.float32)
    w = np.ones((2, 2, 3, 3), np.float32)
    with pytest.warns(RuntimeWarning, match="ignoring"):
        y = fastconv.conv2d(x, w)
    np.testing.assert_allclose(y, 18.0)
    # the file was rewritten in the current format
    assert json.loads((cache_dir / "autotune.json").read_text())["version"] == fastconv.__version__


def test_clear_autotune_cache(cache_dir):
    fastconv.conv2d(np.ones((1, 2, 5, 5)), np.ones((2, 2, 3, 3)))
    assert (cache_dir / "autotune.json").exists()
    fastconv.clear_autotune_cache()
    assert not (cache_dir / "autotune.json").exists() and _select._memory == {}


def test_concurrent_processes_never_corrupt_the_file(cache_dir):
    """Three processes tuning different shapes at once: the file stays valid JSON of the right format."""
    script = textwrap.dedent("""
        import sys, numpy as np, fastconv
        fastconv.set_autotune(True)
        i = int(sys.argv[1])
        for h in range(5, 5 + 3):
            fastconv.conv2d(np.ones((1, 1, h + i * 10, 7), np.float32), np.ones((1, 1, 3, 3), np.float32))
    """)
    env = dict(os.environ, FASTCONV_CACHE_DIR=str(cache_dir))
    procs = [subprocess.Popen([sys.executable, "-c", script, str(i)], env=env) for i in range(3)]
    assert [p.wait(timeout=900) for p in procs] == [0] * 3
    data = json.loads((cache_dir / "autotune.json").read_text())
    assert data["format"] == _select.FORMAT and data["version"] == fastconv.__version__
    assert 1 <= len(data["entries"]) <= 9
    assert not [f for f in os.listdir(cache_dir) if f.startswith(".autotune-")]  # no temp files left


def test_env_variable_enables_autotune(tmp_path):
    env = dict(os.environ, FASTCONV_AUTOTUNE="1", FASTCONV_CACHE_DIR=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", "import fastconv; print(fastconv.get_autotune())"],
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "True"


def test_calibration_correction_changes_the_choice(monkeypatch):
    """auto ranks algorithms by a * cost + b with the fitted (a, b) of each algorithm and pass."""
    p = fastconv._validation.conv_params("t", (1, 2, 8, 8), (2, 2, 3, 3), np.float32, 1, 0, 1, 1)
    direct = _dispatch.registry()["direct"]
    base = _select.calibrated_cost(direct, p, "forward", 1)
    monkeypatch.setattr(_select, "_load_calibration", lambda: {"coef": {"direct/forward": [2.0, 1.0]}})
    assert _select.calibrated_cost(direct, p, "forward", 1) == pytest.approx(2.0 * direct.cost(p, "forward", 1) + 1.0)
    assert _select.calibration() == {"direct/forward": [2.0, 1.0]}
    assert base != _select.calibrated_cost(direct, p, "forward", 1)
    # and the choice follows it: a large penalty on the uncorrected choice for lenet5-c1 moves it
    shape = dict(x_shape=(64, 1, 32, 32), weight_shape=(6, 1, 5, 5))
    monkeypatch.setattr(_select, "_CHOICES", {})
    monkeypatch.setattr(_select, "_load_calibration", lambda: {"coef": {}})
    first = fastconv.choose_algorithm(**shape)
    monkeypatch.setattr(_select, "_CHOICES", {})
    monkeypatch.setattr(_select, "_load_calibration", lambda: {"coef": {f"{first}/forward": [1e6, 0.0]}})
    assert fastconv.choose_algorithm(**shape) not in (first, None)


def test_calibration_table_follows_the_cpu_isa():
    """One fitted table per vector ISA; a CPU without its own gets the nearest one, an old
    single-table file serves every CPU, and the shipped file has a table this CPU can use."""
    tables = {"avx512": {"coef": {"gemm/forward": [2.0, 0.0]}}, "avx2": {"coef": {"gemm/forward": [3.0, 0.0]}}}
    data = {"by_isa": tables}
    assert _select.table_for(data, "avx512") is tables["avx512"]
    assert _select.table_for(data, "avx2") is tables["avx2"]
    assert _select.table_for(data, "portable") is tables["avx2"]
    assert _select.table_for({"by_isa": {"avx2": tables["avx2"]}}, "avx512") is tables["avx2"]
    assert _select.table_for({"by_isa": {}}, "avx2") == {}
    assert _select.table_for(tables["avx2"], "avx512") is tables["avx2"]
    with open(_select._CAL_PATH, encoding="utf-8") as f:
        shipped = json.load(f)
    assert set(shipped["by_isa"]) <= {f"{isa}{maker}" for isa in ("avx512", "avx2", "portable")
                                      for maker in ("", "-amd", "-intel")}
    assert _select.table_for(shipped, _cpu.isa())["coef"]
    assert _select.table_for(shipped, _cpu.isa(), _cpu.vendor())["coef"]


def test_a_makers_own_table_comes_first():
    own, isa_wide = {"coef": {"direct/forward": [1.0, 0.0]}}, {"coef": {}}
    data = {"by_isa": {"avx512-amd": own, "avx512": isa_wide}}
    assert _select.table_for(data, "avx512", "amd") is own
    assert _select.table_for(data, "avx512", "intel") is isa_wide
    assert _select.table_for(data, "avx512") is isa_wide
    assert _select.table_for({"by_isa": {"avx512-amd": own}}, "avx512", "intel") == {}
    assert _cpu.vendor() in ("amd", "intel", "")
    assert _cpu.calibration_key().startswith(_cpu.isa())
