"""Run the docstring examples of the public modules (pyproject's testpaths keep pytest's own
doctest collection to tests/, so they are run from here)."""
import doctest
import importlib

import pytest

MODULES = ["fastconv", "fastconv.functional", "fastconv._nn_functional", "fastconv._results",
           "fastconv._dispatch", "fastconv._config", "fastconv._threads", "fastconv._select",
           "fastconv.layers", "fastconv._layers_basic", "fastconv.layers_extra", "fastconv.matrix",
           "fastconv.cases", "fastconv.bench",
           "fastconv._bench_measure",
           "fastconv.autograd", "fastconv._autograd_ops", "fastconv.losses", "fastconv.optim", "fastconv.batching",
           "fastconv.models"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0, f"no examples found in {name}"
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed in {name}"


def test_public_functions_have_examples():
    import fastconv
    for name in fastconv.__all__:
        obj = getattr(fastconv, name)
        if callable(obj):  # functions and classes (layers, Conv2dGrads, ...)
            assert ">>>" in (obj.__doc__ or ""), f"{name} has no runnable example"
