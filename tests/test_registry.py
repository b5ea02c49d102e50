"""A new algorithm is one module and one registry line: a throwaway one, registered at run time,
reaches the public API, ``'auto'``, ``measure=True``, autotuning, the test parametrisation and
``fastconv bench --algorithms`` with no other file touched; and the registry's metadata is what the
tests read instead of names."""
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import fastconv
import reference as ref
from fastconv import _dispatch, _select

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# the whole "module" of the throwaway algorithm: the NumPy reference behind the registry's interface
PLUGIN = textwrap.dedent('''
    import sys
    sys.path.insert(0, {tests!r})
    import reference as ref
    from fastconv import _dispatch


    def _kw(p):
        return dict(stride=(p.sh, p.sw), padding=(p.ph0, p.pw0), dilation=(p.dh, p.dw), groups=p.g)


    def forward(x, w, b, p):
        return ref.conv2d(x, w, b, **_kw(p)).astype(p.dtype)


    def grad_input(gy, w, p):
        return ref.conv2d_grad_input(gy, p.x_shape, w, **_kw(p)).astype(p.dtype)


    def grad_weight(gy, x, p):
        return ref.conv2d_grad_weight(gy, x, p.w_shape, **_kw(p)).astype(p.dtype)


    def supports(p, pass_):
        if (p.ph0, p.pw0) != (p.ph1, p.pw1):
            return "the reference pads both sides alike"
        return None


    COST = [1e-12]  # nominal seconds: cheaper than anything, so 'auto' picks it where it is eligible


    def cost(p, pass_, threads):
        return COST[0]


    ALG = _dispatch.Algorithm("numpyref", forward, grad_input, grad_weight, supports, cost)
''').format(tests=HERE)


@pytest.fixture
def numpyref(tmp_path):
    """The throwaway algorithm, registered for one test and removed after it."""
    (tmp_path / "numpyref_plugin.py").write_text(PLUGIN + "\n_dispatch.register(ALG)\n")
    sys.path.insert(0, str(tmp_path))
    try:
        import numpyref_plugin
        yield numpyref_plugin
    finally:
        _dispatch.unregister("numpyref")
        sys.modules.pop("numpyref_plugin", None)
        sys.path.remove(str(tmp_path))


X_SHAPE, W_SHAPE = (2, 4, 9, 8), (6, 2, 3, 3)
KW = dict(padding=1, groups=2)


def _arrays(dtype=np.float64):
    rng = np.random.default_rng(0)
    return (rng.standard_normal(X_SHAPE).astype(dtype), rng.standard_normal(W_SHAPE).astype(dtype),
            rng.standard_normal(W_SHAPE[0]).astype(dtype))


def test_public_api_and_auto_pick_it_up(numpyref):
    assert "numpyref" in fastconv.algorithms()
    x, w, b = _arrays()
    y = fastconv.conv2d(x, w, b, **KW, algorithm="numpyref")
    np.testing.assert_allclose(y, ref.conv2d(x, w, b, **KW), rtol=1e-12, atol=1e-12)
    gy = np.ones_like(y)
    g = fastconv.conv2d_backward(gy, x, w, **KW, algorithm="numpyref")
    np.testing.assert_allclose(g.grad_weight, ref.conv2d_grad_weight(gy, x, w.shape, **KW), rtol=1e-12)
    # 'auto', given the lowest cost, picks it for every pass; given a high one, never
    for pass_ in _dispatch.PASSES:
        assert fastconv.choose_algorithm(X_SHAPE, W_SHAPE, **KW, dtype="float64", pass_=pass_) == "numpyref"
    numpyref.COST[0] = 1e3
    _select._CHOICES.clear()  # the cost changed behind the registry's back
    assert fastconv.choose_algorithm(X_SHAPE, W_SHAPE, **KW, dtype="float64") != "numpyref"


def test_refusal_is_algorithm_unavailable(numpyref):
    x, w, _ = _arrays()
    with pytest.raises(fastconv.AlgorithmUnavailable, match="conv2d: algorithm='numpyref' cannot compute the "
                                                          "forward pass here: the reference pads both sides alike"):
        fastconv.conv2d(x, w[:, :, :2, :2], padding="same", groups=2, algorithm="numpyref")
    # 'auto' goes elsewhere for the case it refuses
    y = fastconv.conv2d(x, w[:, :, :2, :2], padding="same", groups=2)
    assert y.shape == (2, 6, 9, 8)


def test_measure_and_autotune_pick_it_up(numpyref, tmp_path, monkeypatch):
    name, times = fastconv.choose_algorithm(X_SHAPE, W_SHAPE, **KW, dtype="float64", measure=True)
    assert "numpyref" in times and name == min(times, key=times.get)
    monkeypatch.setenv("FASTCONV_CACHE_DIR", str(tmp_path / "cache"))
    fastconv.clear_autotune_cache()
    monkeypatch.setattr(_select, "measure_all", lambda p, pass_: {"direct": 2.0, "numpyref": 1.0})
    old = fastconv.set_autotune(True)
    try:
        x, w, b = _arrays()
        y = fastconv.conv2d(x, w, b, **KW)
    finally:
        fastconv.set_autotune(old)
        fastconv.clear_autotune_cache()
    np.testing.assert_allclose(y, ref.conv2d(x, w, b, **KW), rtol=1e-12, atol=1e-12)


def test_conv_test_parametrisation_picks_it_up(tmp_path):
    # collection only (no kernel runs): the registry is read when the tests are parametrised
    (tmp_path / "numpyref_plugin.py").write_text(PLUGIN + "\n_dispatch.register(ALG)\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), ROOT, os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "numpyref_plugin",
                          "-p", "no:cacheprovider", os.path.join(HERE, "test_conv.py")],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    ids = [ln for ln in out.stdout.splitlines() if "numpyref" in ln]
    assert len(ids) >= 10, out.stdout[-2000:]


def test_bench_algorithms_picks_it_up(numpyref, tmp_path, capsys):
    from fastconv import bench
    shapes = tmp_path / "s.json"
    shapes.write_text(json.dumps({"conv2d": [{"name": "tiny", "N": 2, "C": 4, "H": 9, "W": 8, "K": 6, "R": 3,
                                              "S": 3, "padding": 1, "groups": 2}]}))
    out_json = tmp_path / "b.json"
    rc = bench.main(["--shapes", str(shapes), "--only", "tiny", "--passes", "fwd", "--algorithms", "numpyref",
                     "--threads", "1", "--reference", "numpy", "--same-process", "--quick", "--no-progress",
                     "--json", str(out_json)])
    assert rc == 0
    algs = {r["algorithm"] for r in json.load(open(out_json))["rows"]}
    assert "numpyref" in algs


def test_metadata_is_checked():
    reg = _dispatch.registry()
    assert all(a.nan_spread in _dispatch.NAN_SPREADS for a in reg.values())
    assert all(a.thread_invariant <= set(_dispatch.PASSES) for a in reg.values())
    with pytest.raises(ValueError, match="nan_spread"):
        _dispatch.Algorithm("x", None, None, None, None, None, nan_spread="everywhere")
    with pytest.raises(ValueError, match="reserved"):
        _dispatch.register(_dispatch.Algorithm("auto", None, None, None, None, None))
