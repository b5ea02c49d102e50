"""fastconv: fast CPU convolution and pooling layers, forward and backward, in numba.

>>> import numpy as np, fastconv
>>> x = np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32)
>>> w = np.ones((4, 3, 3, 3), dtype=np.float32)
>>> fastconv.conv2d(x, w, padding=1).shape
(2, 4, 8, 8)
"""
from ._config import free_workspace, get_workspace_limit, set_workspace_limit
from ._dispatch import AlgorithmUnavailable, algorithms
from ._select import autotune_cache_path, choose_algorithm, clear_autotune_cache, get_autotune, set_autotune
from ._threads import get_num_threads, max_threads, set_num_threads, threads
from .functional import (
    Conv2dGrads,
    conv2d_grad_weight,
    avg_pool2d,
    avg_pool2d_backward,
    BatchNormGrads,
    adaptive_avg_pool2d,
    adaptive_avg_pool2d_backward,
    batch_norm,
    batch_norm_backward,
    conv1d,
    conv1d_backward,
    conv_transpose2d,
    conv_transpose2d_backward,
    dropout,
    dropout_backward,
    leaky_relu,
    leaky_relu_backward,
    relu6,
    relu6_backward,
    conv2d,
    conv2d_backward,
    max_pool2d,
    max_pool2d_backward,
    relu,
    relu_backward,
)
from . import autograd, layers, losses, optim
from .autograd import Parameter, Tensor, cat, enable_grad, is_grad_enabled, no_grad
from .batching import DataLoader
from .layers import (
    AvgPool2d,
    Conv2d,
    Flatten,
    Linear,
    MaxPool2d,
    Module,
    ModuleDict,
    ModuleList,
    ReLU,
    Sequential,
)
from . import layers_extra, models
from .layers_extra import AdaptiveAvgPool2d, BatchNorm2d, Conv1d, ConvTranspose2d, Dropout, LeakyReLU, ReLU6
from .losses import CrossEntropyLoss, MSELoss
from .optim import SGD, Adam
from .matrix import conv2d_as_matrix, summary

__version__ = "0.1.0"

__all__ = [
    "autotune_cache_path",
    "choose_algorithm",
    "clear_autotune_cache",
    "get_autotune",
    "get_num_threads",
    "max_threads",
    "set_autotune",
    "set_num_threads",
    "threads",
    "AlgorithmUnavailable",
    "Conv2dGrads",
    "algorithms",
    "avg_pool2d",
    "avg_pool2d_backward",
    "conv2d",
    "conv2d_backward",
    "free_workspace",
    "get_workspace_limit",
    "max_pool2d",
    "max_pool2d_backward",
    "relu",
    "relu_backward",
    "set_workspace_limit",
    "conv2d_grad_weight",
    "autograd",
    "layers",
    "losses",
    "optim",
    "Tensor",
    "cat",
    "enable_grad",
    "is_grad_enabled",
    "no_grad",
    "DataLoader",
    "Module",
    "ModuleDict",
    "ModuleList",
    "MSELoss",
    "Adam",
    "AvgPool2d",
    "Conv2d",
    "CrossEntropyLoss",
    "Flatten",
    "Linear",
    "MaxPool2d",
    "Parameter",
    "ReLU",
    "SGD",
    "Sequential",
    "conv2d_as_matrix",
    "summary",
    "BatchNormGrads",
    "adaptive_avg_pool2d",
    "adaptive_avg_pool2d_backward",
    "batch_norm",
    "batch_norm_backward",
    "conv1d",
    "conv1d_backward",
    "conv_transpose2d",
    "conv_transpose2d_backward",
    "dropout",
    "dropout_backward",
    "leaky_relu",
    "leaky_relu_backward",
    "relu6",
    "relu6_backward",
    "layers_extra",
    "models",
    "AdaptiveAvgPool2d",
    "BatchNorm2d",
    "Conv1d",
    "ConvTranspose2d",
    "Dropout",
    "LeakyReLU",
    "ReLU6",
]
