"""The named results of the backward functions (shared by ``functional`` and ``_nn_functional``)."""
from __future__ import annotations

from typing import NamedTuple

import numpy as np


class Conv2dGrads(NamedTuple):
    """Gradients of a convolution with respect to its input, weight and bias (a NamedTuple).

    Examples
    --------
    >>> import numpy as np, fastconv
    >>> g = fastconv.conv2d_backward(np.ones((1, 2, 3, 3)), np.ones((1, 1, 5, 5)), np.ones((2, 1, 3, 3)))
    >>> g.grad_input.shape, g.grad_weight.shape, g.grad_bias
    ((1, 1, 5, 5), (2, 1, 3, 3), array([9., 9.]))
    >>> gi, gw, gb = g  # unpacks like a tuple
    """

    grad_input: np.ndarray
    grad_weight: np.ndarray
    grad_bias: np.ndarray


class BatchNormGrads(NamedTuple):
    """Gradients of :func:`batch_norm` with respect to its input, weight and bias (a NamedTuple).

    Examples
    --------
    >>> import numpy as np, fastconv
    >>> gx, gw, gb = fastconv.batch_norm_backward(np.ones((2, 1)), np.array([[1.0], [3.0]]), None, None,
    ...                                           training=True)
    >>> gx[:, 0], gb
    (array([0., 0.]), array([2.]))
    """

    grad_input: np.ndarray
    grad_weight: np.ndarray
    grad_bias: np.ndarray
