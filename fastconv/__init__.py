"""fastconv: fast CPU convolution and pooling layers, forward and backward, in numba.

>>> import numpy as np, fastconv
>>> x = np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32)
>>> w = np.ones((4, 3, 3, 3), dtype=np.float32)
>>> fastconv.conv2d(x, w, padding=1).shape
(2, 4, 8, 8)
"""
from ._config import get_workspace_limit, set_workspace_limit
from ._dispatch import algorithms
from .functional import (
    Conv2dGrads,
    avg_pool2d,
    avg_pool2d_backward,
    conv2d,
    conv2d_backward,
    max_pool2d,
    max_pool2d_backward,
    relu,
    relu_backward,
)

__version__ = "0.1.0"

__all__ = [
    "Conv2dGrads",
    "algorithms",
    "avg_pool2d",
    "avg_pool2d_backward",
    "conv2d",
    "conv2d_backward",
    "get_workspace_limit",
    "max_pool2d",
    "max_pool2d_backward",
    "relu",
    "relu_backward",
    "set_workspace_limit",
]
