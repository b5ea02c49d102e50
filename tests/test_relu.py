"""relu and relu_backward against NumPy and PyTorch, NaN and infinities included."""
import numpy as np
import pytest

import fastconv
import reference as ref
from conftest import DTYPES

SPECIAL = [np.nan, -1.5, 0.0, -0.0, 2.5, np.inf, -np.inf, 1e-30, -1e-30]


def _input(dtype, shape):
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape).astype(dtype)
    flat = x.reshape(-1)
    flat[: min(len(SPECIAL), flat.size)] = SPECIAL[: flat.size]
    return x


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(9,), (3, 5), (2, 3, 4, 5)])
def test_relu_matches_numpy(shape, dtype):
    x = _input(dtype, shape)
    before = x.copy()
    y = fastconv.relu(x)
    assert isinstance(y, np.ndarray) and y.shape == x.shape and y.dtype == dtype
    np.testing.assert_array_equal(y, ref.relu(x))  # NaN where x is NaN
    np.testing.assert_array_equal(x, before)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(9,), (2, 3, 4, 5)])
def test_relu_backward_matches_numpy(shape, dtype):
    x = _input(dtype, shape)
    g = np.random.default_rng(1).standard_normal(shape).astype(dtype)
    gx = fastconv.relu_backward(g, x)
    assert isinstance(gx, np.ndarray) and gx.shape == x.shape and gx.dtype == dtype
    np.testing.assert_array_equal(gx, ref.relu_backward(g, x))


@pytest.mark.parametrize("dtype", DTYPES)
def test_relu_matches_torch(torch, dtype):
    x = _input(dtype, (2, 3, 4, 5))
    np.testing.assert_array_equal(fastconv.relu(x), torch.relu(torch.tensor(x)).numpy())


@pytest.mark.parametrize("dtype", DTYPES)
def test_relu_backward_matches_torch(torch, dtype):
    x = _input(dtype, (2, 3, 4, 5))  # NaN, infinities and signed zeros included
    g = np.random.default_rng(2).standard_normal(x.shape).astype(dtype)
    tx = torch.tensor(x, requires_grad=True)
    torch.relu(tx).backward(torch.tensor(g))
    np.testing.assert_array_equal(fastconv.relu_backward(g, x), tx.grad.numpy())


def test_relu_backward_at_nan_matches_torch(torch):
    x = np.array([np.nan, -1.0, 2.0])
    tx = torch.tensor(x, requires_grad=True)
    torch.relu(tx).backward(torch.ones(3, dtype=torch.float64))
    np.testing.assert_array_equal(fastconv.relu_backward(np.ones(3), x), tx.grad.numpy())


def test_relu_non_contiguous_and_read_only():
    x = _input(np.float32, (4, 6)).T
    x.setflags(write=False)
    g = np.ones((8, 6), np.float32)[::2].T
    assert not x.flags.c_contiguous and not g.flags.c_contiguous
    np.testing.assert_array_equal(fastconv.relu(x), ref.relu(x))
    np.testing.assert_array_equal(fastconv.relu_backward(g, x), ref.relu_backward(g, x))


def test_relu_of_0d_array_returns_0d_array():
    y = fastconv.relu(np.array(-2.0))
    assert isinstance(y, np.ndarray) and y.shape == () and y == 0.0


def test_relu_backward_of_0d_arrays():
    gx = fastconv.relu_backward(np.array(3.0), np.array(1.0))
    assert gx.shape == () and gx == 3.0
