"""Fast tests of the benchmark harness: fastconv.cases, ``python -m fastconv bench`` on a tiny shape
file, benchmarks/perf_report.py on synthetic JSON, and the asv configuration."""
import importlib.util
import json
import os
import sys

import numpy as np
import pytest

import fastconv
from fastconv import bench, cases
from fastconv.__main__ import main as cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY = {
    "conv2d": [
        {"name": "tiny", "N": 2, "C": 4, "H": 9, "W": 8, "K": 6, "R": 3, "S": 3, "padding": 1},
        {"name": "tiny-dw-s2", "N": 1, "C": 4, "H": 9, "W": 9, "K": 8, "R": 3, "S": 2, "stride": 2,
         "groups": 4, "dilation": [1, 2]},
    ],
    "max_pool2d": [{"name": "tiny-pool", "N": 2, "C": 3, "H": 9, "W": 7, "kernel": 3, "stride": 2, "padding": 1}],
}


@pytest.fixture
def tiny_file(tmp_path):
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(TINY))
    return str(path)


def _load(name, relpath):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, relpath))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


# --------------------------------------------------------------------------- cases
def test_public_suite_loads_and_matches_the_shared_file():
    suite = cases.load_suite()
    assert len(suite.conv) == 13 and len(suite.pool) == 3
    with open(cases.SUITE_PATH) as f:
        data = json.load(f)
    assert [c["name"] for c in data["conv2d"]] == [c.name for c in suite.conv]
    shared = os.path.join(ROOT, "..", "shared", "shapes.json")
    if os.path.exists(shared):  # the copy shipped in the package is the team's suite
        with open(shared) as f:
            assert json.load(f) == data


@pytest.mark.parametrize("entry", TINY["conv2d"], ids=lambda e: e["name"])
def test_conv_case_shapes_and_kwargs_match_fastconv(entry, tmp_path):
    case = cases.load_suite(_write(tmp_path, {"conv2d": [entry]})).conv[0]
    x, w, b = case.arrays()
    assert x.shape == case.x_shape and w.shape == case.w_shape and b.shape == (case.k,)
    assert x.dtype == np.float32
    y = fastconv.conv2d(x, w, b, **case.kwargs)
    assert y.shape == case.y_shape == case.grad_output().shape
    assert case.flops("backward") == 2 * case.flops("forward") == 4 * case.macs


def _write(tmp_path, data, name="s.json"):
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return str(path)


def test_scaled_cases():
    c = cases.load_suite().conv_case("resnet50-3x3-64")
    s = c.scaled(batch=2, spatial=0.5)
    assert (s.name, s.x_shape, s.y_shape) == ("resnet50-3x3-64@n2x0.5", (2, 64, 28, 28), (2, 64, 28, 28))
    assert c.scaled().name == "resnet50-3x3-64@n8"
    big = cases.load_suite().conv_case("bigkernel-15x15").scaled(spatial=0.01)
    assert big.oh >= 1 and big.ow >= 1  # never smaller than the kernel's footprint
    p = cases.load_suite().pool_case("vgg16-pool").scaled(batch=1, spatial=0.25)
    assert p.x_shape == (1, 128, 28, 28) and p.y_shape == (1, 128, 14, 14)
    with pytest.raises(ValueError, match="ConvCase.scaled: batch and spatial must be positive"):
        c.scaled(batch=0)


def test_pool_case_matches_fastconv(tiny_file):
    case = cases.load_suite(tiny_file).pool[0]
    y = fastconv.max_pool2d(case.arrays(), **case.kwargs)
    assert y.shape == case.y_shape
    assert case.flops() == int(np.prod(case.y_shape)) * 9


def test_only_and_lookup(tiny_file):
    suite = cases.load_suite(tiny_file)
    assert suite.only("tiny, tiny-pool") == (suite.conv[:1], suite.pool)
    assert suite.only(["tiny-dw-s2"]).pool == ()
    with pytest.raises(ValueError, match="only: names must be cases of the suite .*got nope"):
        suite.only("tiny,nope")
    with pytest.raises(ValueError, match="conv_case: name must be one of tiny, tiny-dw-s2, got 'x'"):
        suite.conv_case("x")


@pytest.mark.parametrize("data, pattern", [
    ({}, "at least one case"),
    ([1, 2], "JSON object"),
    ({"conv2d": [{"N": 1}]}, "string 'name'"),
    ({"conv2d": [{"name": "a", "N": 1, "C": 2, "H": 4, "W": 4, "K": 2, "R": 3}]}, "S of case 'a' must be a positive int"),
    ({"conv2d": [{"name": "a", "N": 1, "C": 3, "H": 4, "W": 4, "K": 2, "R": 3, "S": 3, "groups": 2}]},
     "divisible by groups=2"),
    ({"conv2d": [{"name": "a", "N": 1, "C": 1, "H": 2, "W": 2, "K": 1, "R": 3, "S": 3}]}, "has no output"),
    ({"conv2d": [{"name": "a", "N": 1, "C": 1, "H": 4, "W": 4, "K": 1, "R": 3, "S": 3, "stride": "2"}]},
     "stride of case 'a' must be an int or a pair"),
    ({"max_pool2d": [{"name": "p", "N": 1, "C": 1, "H": 4, "W": 4, "kernel": 2}] * 2}, "duplicates p"),
])
def test_load_suite_errors(tmp_path, data, pattern):
    with pytest.raises(ValueError, match="load_suite: .*" + pattern):
        cases.load_suite(_write(tmp_path, data))


def test_load_suite_rejects_non_json(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match="load_suite: path must be a JSON shape file"):
        cases.load_suite(str(path))


# --------------------------------------------------------------------------- NumPy baselines
@pytest.mark.parametrize("entry", TINY["conv2d"], ids=lambda e: e["name"])
def test_numpy_baseline_matches_fastconv(entry, tmp_path):
    case = cases.load_suite(_write(tmp_path, {"conv2d": [entry]})).conv[0]
    x, w, b = (a.astype(np.float64) for a in case.arrays())
    gy = case.grad_output(np.float64)
    np.testing.assert_allclose(bench.numpy_conv2d(x, w, b, case), fastconv.conv2d(x, w, b, **case.kwargs),
                               rtol=1e-10, atol=1e-10)
    got = bench.numpy_conv2d_backward(gy, x, w, case)
    want = fastconv.conv2d_backward(gy, x, w, **case.kwargs)
    for g, e in zip(got, want):
        np.testing.assert_allclose(g, e, rtol=1e-10, atol=1e-10)


def test_numpy_pool_baseline_matches_fastconv(tiny_file):
    case = cases.load_suite(tiny_file).pool[0]
    x, gy = case.arrays(np.float64), case.grad_output(np.float64)
    y, idx = bench.numpy_max_pool2d(x, case)
    fy, fidx = fastconv.max_pool2d(x, **case.kwargs, return_indices=True)
    np.testing.assert_array_equal(y, fy)
    np.testing.assert_array_equal(idx, fidx)
    np.testing.assert_allclose(bench.numpy_max_pool2d_backward(gy, idx, x.shape),
                               fastconv.max_pool2d_backward(gy, fidx, x.shape))


# --------------------------------------------------------------------------- python -m fastconv bench
FAST = ["--quick", "--no-progress", "--budget", "0.001"]


def test_cli_runs_the_tiny_suite(tiny_file, tmp_path, capsys):
    out_json = str(tmp_path / "r.json")
    assert cli(["bench", "--shapes", tiny_file, *FAST, "--only", "tiny,tiny-pool", "--reference", "numpy",
                "--json", out_json]) == 0
    text = capsys.readouterr().out
    head = text.splitlines()[1].split()
    assert head == ["shape", "pass", "algorithm", "ms", "GFLOP/s", "vs", "numpy", "%", "sgemm"]
    doc = json.load(open(out_json))
    assert doc["meta"]["reference"] == "numpy" and doc["meta"]["threads"] >= 1
    rows = doc["rows"]
    algs = {r["algorithm"] for r in rows if r["op"] == "conv2d"}
    assert {"auto", "numpy"} <= algs and algs <= {"auto", "numpy", *fastconv.algorithms()}
    assert {(r["shape"], r["pass_"]) for r in rows} == {(s, p) for s in ("tiny", "tiny-pool")
                                                       for p in ("forward", "backward")}
    for r in rows:
        assert r["ms"] > 0 and r["gflops"] > 0
        if r["algorithm"] == "numpy":
            assert r["vs_ref"] == 1.0


@pytest.mark.parametrize("where", ["own process", "same process"])
def test_cli_options(tiny_file, tmp_path, capsys, where):
    pytest.importorskip("torch")
    extra = ["--same-process"] if where == "same process" else []
    out_json = str(tmp_path / "r.json")
    assert cli(["bench", "--shapes", tiny_file, *FAST, "--only", "tiny", "--passes", "fwd",
                "--algorithms", "direct", "--threads", "1", "--stat", "min", "--json", out_json, *extra]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "1 threads" in lines[0] and "reference: torch" in lines[0] and "min of" in lines[0]
    assert f"({where})" in lines[0] and "channels_last (torch-cl)" in lines[0]
    body = [ln.split() for ln in lines[3:] if ln.startswith("tiny")]
    # PyTorch in both layouts: NCHW (torch) and channels_last (torch-cl)
    assert [(b[0], b[1], b[2]) for b in body] == [("tiny", "forward", "direct"), ("tiny", "forward", "torch"),
                                                  ("tiny", "forward", "torch-cl")]
    doc = json.load(open(out_json))
    assert doc["meta"]["reference_rows"] == ["torch", "torch-cl"]
    rows = {r["algorithm"]: r for r in doc["rows"]}
    faster = min(("torch", "torch-cl"), key=lambda n: rows[n]["ms"])
    for r in rows.values():  # every ratio is against the faster layout
        assert r["ref_algorithm"] == faster and set(r["vs_each"]) == {"torch", "torch-cl"}
        assert r["vs_ref"] == pytest.approx(rows[faster]["ms"] / r["ms"]) == min(r["vs_each"].values())
    assert rows[faster]["vs_ref"] == 1.0 and rows["direct"]["vs_ref"] > 0


def test_summary_and_plot_skip_both_torch_rows():
    rows = [bench.Row("conv2d", "a", "forward", "direct", 1.0, 1.0, 2.0, 1.0),
            bench.Row("conv2d", "a", "forward", "torch", 3.0, 1.0, 2 / 3, 1.0),
            bench.Row("conv2d", "a", "forward", "torch-cl", 2.0, 1.0, 1.0, 1.0)]
    assert bench.summary(rows, "torch") == [
        "conv2d direct   forward : x2.00 vs torch's faster layout (geometric mean over 1 shapes)"]


def test_cli_plot(tiny_file, tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "b.png"
    assert bench.main(["--shapes", tiny_file, *FAST, "--only", "tiny,tiny-pool", "--passes", "forward",
                       "--reference", "numpy", "--plot", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_plot_without_matplotlib(tiny_file, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert bench.main(["--shapes", tiny_file, "--plot", "x.png"]) == 2
    assert "--plot needs matplotlib" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--only", "nope"], "only: names must be cases of the suite"),
    (["--passes", "sideways"], "--passes must name forward/backward"),
    (["--algorithms", "magic"], "--algorithms must name some of auto, direct"),
    (["--threads", "0"], "--threads must be between 1 and NUMBA_NUM_THREADS"),
    (["--shapes", "/nonexistent/shapes.json"], "No such file"),
])
def test_cli_errors(tiny_file, args, message, capsys):
    argv = ["--shapes", tiny_file] + args if args[0] != "--shapes" else args
    assert bench.main(argv) == 2
    assert message in capsys.readouterr().err


def test_cli_help(capsys):
    assert cli(["bench", "--help"]) == 0
    assert "--shapes" in capsys.readouterr().out


# --------------------------------------------------------------------------- perf_report.py
def _bm(group, contestant, median, minimum=None, **extra):
    return {"group": group, "name": f"test[{contestant}]",
            "stats": {"median": median, "min": median if minimum is None else minimum},
            "extra_info": {"contestant": contestant, "gflops": 1.0, **extra}}


@pytest.fixture
def report_mod():
    return _load("perf_report", os.path.join("benchmarks", "perf_report.py"))


def _report(report_mod, tmp_path, benchmarks, *args):
    path = _write(tmp_path, {"machine_info": {"cpu": {"brand_raw": "test cpu"}}, "benchmarks": benchmarks}, "p.json")
    return report_mod.main([path, *args])


def test_perf_report_ok(report_mod, tmp_path, capsys):
    g = "conv2d a forward"
    rc = _report(report_mod, tmp_path, [_bm(g, "auto", 1.0), _bm(g, "direct", 0.9), _bm(g, "torch", 2.0)])
    out = capsys.readouterr().out
    assert rc == 0
    assert "x 2.00 vs torch" in out and "no gross regressions" in out
    assert "auto: geometric-mean speed vs torch x2.00 over 1 groups" in out


def test_perf_report_gross_regression_in_group(report_mod, tmp_path, capsys):
    g = "conv2d a forward"
    rc = _report(report_mod, tmp_path, [_bm(g, "auto", 3.0), _bm(g, "direct", 1.0), _bm(g, "im2col", 2.0)])
    assert rc == 1
    assert "auto is 3.00x slower than direct (limit 2.0x)" in capsys.readouterr().out
    assert _report(report_mod, tmp_path, [_bm(g, "auto", 3.0), _bm(g, "direct", 1.0)], "--factor", "4") == 0


def test_perf_report_uses_interleaved_auto_choice(report_mod, tmp_path, capsys):
    g = "conv2d a forward"
    # the per-group medians look bad (load), but the interleaved measurement says auto is fine
    ok = [_bm(g, "auto", 9.0), _bm(g, "direct", 1.0),
          _bm("auto-choice forward", "auto", 1.0, shape="a", pass_="forward", best="direct", auto_over_best=1.1)]
    assert _report(report_mod, tmp_path, ok) == 0
    bad = ok[:2] + [_bm("auto-choice forward", "auto", 1.0, shape="a", pass_="forward", best="direct",
                        auto_over_best=2.5)]
    assert _report(report_mod, tmp_path, bad) == 1
    assert "a forward: auto is 2.50x slower than direct" in capsys.readouterr().out


def test_perf_report_against_the_faster_torch_layout(report_mod, tmp_path, capsys):
    g = "conv2d a forward"
    bms = [_bm(g, "auto", 1.0), _bm(g, "torch", 4.0), _bm(g, "torch-cl", 2.0)]
    assert _report(report_mod, tmp_path, bms) == 0
    out = capsys.readouterr().out
    assert "x 2.00 vs torch-cl" in out and "auto: geometric-mean speed vs torch x2.00 over 1 groups" in out
    assert _report(report_mod, tmp_path, bms, "--torch-factor", "1.5") == 0
    bms[0] = _bm(g, "auto", 3.5)  # faster than NCHW torch, 1.75x slower than channels_last torch
    assert _report(report_mod, tmp_path, bms, "--torch-factor", "1.5") == 1


def test_perf_report_torch_factor(report_mod, tmp_path, capsys):
    g = "max_pool2d p forward"
    bms = [_bm(g, "fastconv", 5.0), _bm(g, "torch", 1.0)]
    assert _report(report_mod, tmp_path, bms) == 0
    assert _report(report_mod, tmp_path, bms, "--torch-factor", "3") == 1
    assert "fastconv is 5.00x slower than torch" in capsys.readouterr().out


def test_perf_report_bad_input(report_mod, tmp_path, capsys):
    assert report_mod.main([str(tmp_path / "missing.json")]) == 2
    assert _report(report_mod, tmp_path, []) == 2
    assert "perf_report: json must" in capsys.readouterr().err


# --------------------------------------------------------------------------- asv
def test_asv_conf_is_valid():
    with open(os.path.join(ROOT, "asv.conf.json")) as f:
        conf = json.load(f)
    assert conf["version"] == 1 and conf["environment_type"] == "virtualenv"
    assert all(conf[k].startswith(".asv/") for k in ("env_dir", "results_dir", "html_dir"))
    assert "{wheel_file}" in conf["install_command"][0]
    assert conf["matrix"]["env_nobuild"]["NUMBA_NUM_THREADS"]
    assert os.path.isdir(os.path.join(ROOT, conf["benchmark_dir"]))
    with open(os.path.join(ROOT, ".gitignore")) as f:
        assert ".asv/" in f.read().split()


def test_asv_benchmarks_import_and_use_the_registry():
    sys.path.insert(0, ROOT)
    try:
        import benchmarks.bench_conv as bc
        import benchmarks.bench_pool as bp
        from benchmarks import cases as bcases
    finally:
        sys.path.remove(ROOT)
    assert bc.ConvSuite.params[1] == ["auto", *fastconv.algorithms()]
    assert bc.ConvSuite.params[0] == [c.name for c in cases.load_suite().conv]
    assert set(bcases.LARGE) <= set(bcases.CONV) and bcases.LARGE
    assert bp.MaxPool.params[0] == [c.name for c in cases.load_suite().pool]
    # a combination the registry does not know is skipped, not failed
    with pytest.raises(bcases.SkipNotImplemented):
        bcases.conv_call(bcases.CONV["lenet5-c1"].scaled(batch=1, spatial=0.5), "no-such-algorithm", "forward")
    fn = bcases.conv_call(bcases.CONV["lenet5-c1"].scaled(batch=1, spatial=0.5), "auto", "backward")
    assert len(bcases.median_seconds([fn], min_time=0, min_rounds=1)) == 1


@pytest.mark.parametrize("name", ["lenet5-c3", "mobilenet-dw-3x3", "resnet50-3x3-s2", "dilated-3x3-d2"])
def test_gemm_yardstick_does_the_layers_arithmetic(name):
    # the "% gemm" column compares with matrix products of exactly the layer's multiply-adds
    case = cases.load_suite().conv_case(name)
    for pass_ in ("forward", "backward"):
        shapes = bench.gemm_shapes(case, pass_)
        assert sum(2 * g * m * n * k for g, m, n, k in shapes) == case.flops(pass_)
    small = case.scaled(batch=1, spatial=0.25)
    assert 0 < bench.gemm_seconds(small, "forward", rounds=1) < 5
