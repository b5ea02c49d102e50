"""Every user-facing error, as a table of (function, args, kwargs, exception, message pattern).

Messages read ``<function>: <argument> <rule>, got <value>``; each pattern names both.
"""
import re

import numpy as np
import pytest

import fastconv
from fastconv import (avg_pool2d, avg_pool2d_backward, conv2d, conv2d_backward, max_pool2d,
                      max_pool2d_backward, relu, relu_backward)

F32, F64 = np.float32, np.float64
X = np.zeros((1, 2, 5, 5), F32)          # conv input
W = np.zeros((4, 2, 3, 3), F32)          # conv weight -> output (1, 4, 3, 3)
B = np.zeros(4, F32)
GY = np.zeros((1, 4, 3, 3), F32)
P = np.zeros((1, 2, 6, 6), F32)          # pooling input; kernel 2 -> output (1, 2, 3, 3)
PGY = np.zeros((1, 2, 3, 3), F32)
IDX = np.zeros((1, 2, 3, 3), np.int64)
HUGE = (10**6, 1024, 1024, 1024)         # ~4 PB in float32
SHARED = np.zeros(72, F32)               # views of it overlap: out= against weight and bias


def huge(shape=HUGE, dtype=F32):
    """A zero-stride view of an array far larger than any machine's memory."""
    return np.broadcast_to(np.zeros((1,) * len(shape), dtype), shape)


def row(id_, fn, args, kwargs, exc, pattern, marks=(), id_fn=None):
    if id_fn is not None:  # a wrapper (e.g. entering a context manager) stands in for a public function
        fn.__name__ = id_fn
    return pytest.param(fn, args, kwargs, exc, pattern, id=id_, marks=marks)


ERRORS = [
    # ---- conv2d: arrays
    row("input-list", conv2d, (X.tolist(), W), {}, TypeError, r"conv2d: input must be a numpy.ndarray, got list"),
    row("input-masked", conv2d, (np.ma.masked_array(X, mask=X > 0), W), {}, TypeError,
        r"conv2d: input must be a plain numpy.ndarray .*got a masked array"),
    row("weight-list", conv2d, (X, W.tolist()), {}, TypeError, r"conv2d: weight must be a numpy.ndarray, got list"),
    row("input-0d", conv2d, (np.array(1.0, F32), W), {}, ValueError,
        r"conv2d: input must be 3-D \(unbatched\) or 4-D \(batched\), got 0-D"),
    row("input-2d", conv2d, (X[0, 0], W), {}, ValueError,
        r"conv2d: input must be 3-D \(unbatched\) or 4-D \(batched\), got 2-D"),
    row("input-3d-channels", conv2d, (X[0, :1], W), {}, ValueError,
        r"conv2d: input channels must equal weight.shape\[1\] \* groups \(2 \* 1 = 2\), got 1"),
    # ---- conv2d: out=
    row("out-list", conv2d, (X, W), {"out": GY.tolist()}, TypeError, r"conv2d: out must be a numpy.ndarray, got list"),
    row("out-dtype", conv2d, (X, W), {"out": GY.astype(F64)}, TypeError,
        r"conv2d: out must have the result's dtype float32, got float64"),
    row("out-shape", conv2d, (X, W), {"out": GY[0]}, ValueError,
        r"conv2d: out must have the result's shape \(1, 4, 3, 3\), got \(4, 3, 3\)"),
    row("out-shape-unbatched", conv2d, (X[0], W), {"out": GY}, ValueError,
        r"conv2d: out must have the result's shape \(4, 3, 3\), got \(1, 4, 3, 3\)"),
    row("out-strided", conv2d, (X, W), {"out": np.zeros((1, 4, 3, 6), F32)[..., ::2]}, ValueError,
        r"conv2d: out must be C-contiguous and writeable, got strides"),
    row("out-read-only", conv2d, (X, W), {"out": np.broadcast_to(GY, GY.shape)}, ValueError,
        r"conv2d: out must be C-contiguous and writeable, .*\(read-only\)"),
    row("out-is-input", conv2d, (GY, np.zeros((4, 4, 1, 1), F32)), {"out": GY}, ValueError,
        r"conv2d: out must not overlap the input \(the kernels read it while writing out\)"),
    row("out-in-weight", conv2d, (X, SHARED[:72].reshape(W.shape)), {"out": SHARED[36:72].reshape(GY.shape)},
        ValueError, r"conv2d: out must not overlap the weight"),
    row("out-in-bias", conv2d, (X, W, SHARED[:4]), {"out": SHARED[:36].reshape(GY.shape)}, ValueError,
        r"conv2d: out must not overlap the bias"),
    row("weight-5d", conv2d, (X, W[None]), {}, ValueError, r"conv2d: weight must be 4-D, got 5-D"),
    row("bias-2d", conv2d, (X, W, B[None]), {}, ValueError, r"conv2d: bias must be 1-D, got 2-D"),
    row("bias-shape", conv2d, (X, W, B[:3]), {}, ValueError, r"conv2d: bias must have shape \(4,\) .*got \(3,\)"),
    row("input-int", conv2d, (X.astype(np.int64), W), {}, TypeError,
        r"conv2d: input must have dtype float32 or float64, got int64"),
    row("input-bool", conv2d, (X.astype(bool), W), {}, TypeError, r"conv2d: input must have dtype .*got bool"),
    row("input-complex", conv2d, (X.astype(np.complex128), W), {}, TypeError,
        r"conv2d: input must have dtype .*got complex128"),
    row("input-object", conv2d, (X.astype(object), W), {}, TypeError, r"conv2d: input must have dtype .*got object"),
    row("input-float16", conv2d, (X.astype(np.float16), W.astype(np.float16)), {}, TypeError,
        r"conv2d: input must have dtype .*got float16"),
    row("weight-float16", conv2d, (X, W.astype(np.float16)), {}, TypeError, r"conv2d: weight must have dtype .*got float16"),
    row("weight-mixed-dtype", conv2d, (X, W.astype(F64)), {}, TypeError,
        r"conv2d: weight must have the same dtype as the input \(float32\), got float64"),
    row("bias-mixed-dtype", conv2d, (X, W, B.astype(F64)), {}, TypeError,
        r"conv2d: bias must have the same dtype as the input \(float32\), got float64"),
    # ---- conv2d: geometry
    row("channel-mismatch", conv2d, (X, np.zeros((4, 3, 3, 3), F32)), {}, ValueError,
        r"conv2d: input channels must equal weight.shape\[1\] \* groups \(3 \* 1 = 3\), got 2"),
    row("group-mismatch", conv2d, (X, W), {"groups": 2}, ValueError,
        r"conv2d: input channels must equal weight.shape\[1\] \* groups \(2 \* 2 = 4\), got 2"),
    row("k-not-divisible-by-groups", conv2d, (np.zeros((1, 4, 5, 5), F32), np.zeros((3, 2, 3, 3), F32)),
        {"groups": 2}, ValueError, r"conv2d: weight.shape\[0\] \(out channels\) must be divisible by groups=2, got 3"),
    row("groups-zero", conv2d, (X, W), {"groups": 0}, ValueError, r"conv2d: groups must be positive, got 0"),
    row("groups-float", conv2d, (X, W), {"groups": 1.0}, TypeError, r"conv2d: groups must be an int, got 1.0"),
    row("groups-bool", conv2d, (X, W), {"groups": True}, TypeError, r"conv2d: groups must be an int, got True"),
    row("stride-zero", conv2d, (X, W), {"stride": 0}, ValueError, r"conv2d: stride must be positive, got \(0, 0\)"),
    row("stride-negative", conv2d, (X, W), {"stride": (1, -1)}, ValueError,
        r"conv2d: stride must be positive, got \(1, -1\)"),
    row("stride-float", conv2d, (X, W), {"stride": 1.0}, TypeError, r"conv2d: stride must be an int or a pair of ints, got 1.0"),
    row("stride-bool", conv2d, (X, W), {"stride": True}, TypeError, r"conv2d: stride must be an int .*got True"),
    row("stride-bool-in-pair", conv2d, (X, W), {"stride": (1, False)}, TypeError, r"conv2d: stride must be an int .*got False"),
    row("stride-triple", conv2d, (X, W), {"stride": (1, 1, 1)}, ValueError, r"conv2d: stride must be an int or a pair"),
    row("stride-str", conv2d, (X, W), {"stride": "1"}, TypeError, r"conv2d: stride must be an int or a pair"),
    row("dilation-zero", conv2d, (X, W), {"dilation": 0}, ValueError, r"conv2d: dilation must be positive, got \(0, 0\)"),
    row("dilation-bool", conv2d, (X, W), {"dilation": True}, TypeError, r"conv2d: dilation must be an int"),
    row("padding-negative", conv2d, (X, W), {"padding": -1}, ValueError,
        r"conv2d: padding must be non-negative, got \(-1, -1\)"),
    row("padding-negative-pair", conv2d, (X, W), {"padding": (0, -2)}, ValueError,
        r"conv2d: padding must be non-negative, got \(0, -2\)"),
    row("padding-bad-string", conv2d, (X, W), {"padding": "full"}, ValueError,
        r"conv2d: padding must be an int, a pair, 'same' or 'valid', got 'full'"),
    row("padding-float", conv2d, (X, W), {"padding": 0.5}, TypeError, r"conv2d: padding must be an int"),
    row("same-with-stride", conv2d, (X, W), {"padding": "same", "stride": 2}, ValueError,
        r"conv2d: padding='same' requires stride 1, got stride=\(2, 2\)"),
    row("kernel-larger-than-input", conv2d, (X, np.zeros((4, 2, 6, 3), F32)), {}, ValueError,
        r"conv2d: dilated kernel must fit in the padded input.*input 5x5, kernel 6x3"),
    row("dilated-kernel-larger-than-input", conv2d, (X, W), {"dilation": 3}, ValueError,
        r"conv2d: dilated kernel must fit in the padded input: kernel \(7 x 7\)"),
    row("algorithm-unknown", conv2d, (X, W), {"algorithm": "toom-cook"}, ValueError,
        r"conv2d: algorithm must be one of 'auto', 'direct'.*, got 'toom-cook'"),
    row("algorithm-not-str", conv2d, (X, W), {"algorithm": 1}, TypeError, r"conv2d: algorithm must be a str, got int"),
    row("algorithm-none", conv2d, (X, W), {"algorithm": None}, TypeError, r"conv2d: algorithm must be a str, got NoneType"),
    row("output-too-large", conv2d, (huge(), np.zeros((1, 1024, 1, 1), F32)), {}, ValueError,
        r"conv2d: output of shape \(1000000, 1, 1024, 1024\).* would need [\d.]+ GiB, more than"),
    # ---- conv2d_backward
    row("bwd-grad-output-shape", conv2d_backward, (GY[:, :3], X, W), {}, ValueError,
        r"conv2d_backward: grad_output must have the output's shape \(1, 4, 3, 3\), got \(1, 3, 3, 3\)"),
    row("bwd-grad-output-shape-stride", conv2d_backward, (GY, X, W), {"stride": 2}, ValueError,
        r"conv2d_backward: grad_output must have the output's shape \(1, 4, 2, 2\)"),
    row("bwd-grad-output-3d", conv2d_backward, (GY[0], X, W), {}, ValueError, r"conv2d_backward: grad_output must be 4-D"),
    row("bwd-bias-int", conv2d_backward, (GY, X, W), {"bias": 1}, TypeError, r"conv2d_backward: bias must be a bool, got 1"),
    row("gw-bias-array", fastconv.conv2d_grad_weight, (GY, X, W), {"bias": np.zeros(4)}, TypeError,
        r"conv2d_grad_weight: bias must be a bool, got array"),
    row("bwd-grad-output-dtype", conv2d_backward, (GY.astype(F64), X, W), {}, TypeError,
        r"conv2d_backward: grad_output must have the same dtype as the input \(float32\), got float64"),
    row("bwd-grad-output-list", conv2d_backward, (GY.tolist(), X, W), {}, TypeError,
        r"conv2d_backward: grad_output must be a numpy.ndarray, got list"),
    row("bwd-input-int", conv2d_backward, (GY, X.astype(np.int32), W), {}, TypeError,
        r"conv2d_backward: input must have dtype float32 or float64, got int32"),
    row("bwd-weight-mixed", conv2d_backward, (GY, X, W.astype(F64)), {}, TypeError,
        r"conv2d_backward: weight must have the same dtype"),
    row("bwd-group-mismatch", conv2d_backward, (GY, X, W), {"groups": 2}, ValueError,
        r"conv2d_backward: input channels must equal weight.shape\[1\] \* groups"),
    row("bwd-stride-zero", conv2d_backward, (GY, X, W), {"stride": (0, 1)}, ValueError,
        r"conv2d_backward: stride must be positive, got \(0, 1\)"),
    row("bwd-same-with-stride", conv2d_backward, (GY, X, W), {"padding": "same", "stride": (1, 2)}, ValueError,
        r"conv2d_backward: padding='same' requires stride 1"),
    row("bwd-algorithm-unknown", conv2d_backward, (GY, X, W), {"algorithm": "fast"}, ValueError,
        r"conv2d_backward: algorithm must be one of 'auto'.*got 'fast'"),
    row("gw-stride-zero", fastconv.conv2d_grad_weight, (GY, X, W), {"stride": 0}, ValueError,
        r"conv2d_grad_weight: stride must be positive, got \(0, 0\)"),
    row("loader-batch-size", fastconv.DataLoader, (X, np.zeros(len(X))), {"batch_size": 0}, ValueError,
        r"DataLoader: batch_size must be positive, got 0"),
    row("mse-reduction", fastconv.MSELoss, (), {"reduction": "bogus"}, ValueError,
        r"MSELoss: reduction must be 'mean' or 'sum', got 'bogus'"),
    row("modulelist-item", fastconv.ModuleList, ([1],), {}, TypeError,
        r"ModuleList: items must be fastconv modules, got int"),
    row("moduledict-value", fastconv.ModuleDict, ({"a": 1},), {}, TypeError,
        r"ModuleDict: values must be fastconv modules, got int"),
    row("cat-empty", fastconv.cat, ([],), {}, ValueError, r"cat: tensors must hold at least one tensor, got none"),
    row("bwd-algorithm-not-str", conv2d_backward, (GY, X, W), {"algorithm": b"direct"}, TypeError,
        r"conv2d_backward: algorithm must be a str, got bytes"),
    row("bwd-output-too-large", conv2d_backward,
        (huge((10**6, 1, 1024, 1024)), huge(), np.zeros((1, 1024, 1, 1), F32)), {}, ValueError,
        r"conv2d_backward: output of shape .* would need [\d.]+ GiB"),
    row("bwd-workspace-limit-zero", conv2d_backward, (GY, X, W), {"workspace_limit": 0}, ValueError,
        r"conv2d_backward: workspace_limit must be positive \(bytes\), got 0"),
    row("fwd-workspace-limit-float", conv2d, (X, W), {"workspace_limit": 1e6}, TypeError,
        r"conv2d: workspace_limit must be an int number of bytes, got 1000000.0"),
    # ---- settings
    row("set-workspace-limit-negative", fastconv.set_workspace_limit, (-1,), {}, ValueError,
        r"set_workspace_limit: workspace_limit must be positive \(bytes\), got -1"),
    row("set-workspace-limit-str", fastconv.set_workspace_limit, ("64M",), {}, TypeError,
        r"set_workspace_limit: workspace_limit must be an int number of bytes, got '64M'"),
    row("set-num-threads-zero", fastconv.set_num_threads, (0,), {}, ValueError,
        r"set_num_threads: n must be between 1 and \d+ \(NUMBA_NUM_THREADS\), got 0"),
    row("set-num-threads-too-many", fastconv.set_num_threads, (10**6,), {}, ValueError,
        r"set_num_threads: n must be between 1 and \d+ .*got 1000000"),
    row("set-num-threads-float", fastconv.set_num_threads, (1.0,), {}, TypeError, r"set_num_threads: n must be an int, got 1.0"),
    row("threads-zero", lambda n: fastconv.threads(n).__enter__(), (0,), {}, ValueError,
        r"threads: n must be between 1 and", id_fn="threads"),
    row("set-autotune-str", fastconv.set_autotune, ("yes",), {}, TypeError, r"set_autotune: enabled must be a bool, got 'yes'"),
    row("choose-pass-unknown", fastconv.choose_algorithm, ((1, 2, 5, 5), (4, 2, 3, 3)), {"pass_": "backward"}, ValueError,
        r"choose_algorithm: pass_ must be one of 'forward', 'grad_input', 'grad_weight', got 'backward'"),
    row("choose-dtype-int", fastconv.choose_algorithm, ((1, 2, 5, 5), (4, 2, 3, 3)), {"dtype": "int32"}, TypeError,
        r"choose_algorithm: dtype must be float32 or float64, got int32"),
    row("choose-x-shape-3", fastconv.choose_algorithm, ((2, 5, 5), (4, 2, 3, 3)), {}, ValueError,
        r"choose_algorithm: x_shape must be a shape \(N, C, H, W\), got \(2, 5, 5\)"),
    row("choose-weight-shape-str", fastconv.choose_algorithm, ((1, 2, 5, 5), "4,2,3,3"), {}, ValueError,
        r"choose_algorithm: weight_shape must be a shape \(K, C/groups, R, S\)"),
    row("choose-x-shape-float", fastconv.choose_algorithm, ((1, 2, 5.0, 5), (4, 2, 3, 3)), {}, TypeError,
        r"choose_algorithm: x_shape must be a tuple of 4 ints \(N, C, H, W\), got 5.0"),
    row("choose-weight-shape-float", fastconv.choose_algorithm, ((1, 2, 5, 5), (4, 2, 3.0, 3)), {}, TypeError,
        r"choose_algorithm: weight_shape must be a tuple of 4 ints \(K, C/groups, R, S\), got 3.0"),
    row("choose-group-mismatch", fastconv.choose_algorithm, ((1, 3, 5, 5), (4, 2, 3, 3)), {}, ValueError,
        r"choose_algorithm: input channels must equal weight.shape\[1\] \* groups"),
    row("choose-measure-int", fastconv.choose_algorithm, ((1, 2, 5, 5), (4, 2, 3, 3)), {"measure": 1}, TypeError,
        r"choose_algorithm: measure must be a bool, got 1"),
    # ---- max_pool2d
    row("max-input-list", max_pool2d, (P.tolist(), 2), {}, TypeError, r"max_pool2d: input must be a numpy.ndarray, got list"),
    row("max-input-0d", max_pool2d, (np.array(1.0), 2), {}, ValueError,
        r"max_pool2d: input must be 3-D \(unbatched\) or 4-D \(batched\), got 0-D"),
    row("max-input-2d", max_pool2d, (P[0, 0], 2), {}, ValueError,
        r"max_pool2d: input must be 3-D \(unbatched\) or 4-D \(batched\), got 2-D"),
    row("max-input-int", max_pool2d, (P.astype(np.int16), 2), {}, TypeError, r"max_pool2d: input must have dtype .*got int16"),
    row("max-input-float16", max_pool2d, (P.astype(np.float16), 2), {}, TypeError,
        r"max_pool2d: input must have dtype .*got float16"),
    row("max-kernel-zero", max_pool2d, (P, 0), {}, ValueError, r"max_pool2d: kernel_size must be positive, got \(0, 0\)"),
    row("max-kernel-float", max_pool2d, (P, 2.0), {}, TypeError, r"max_pool2d: kernel_size must be an int"),
    row("max-kernel-bool", max_pool2d, (P, True), {}, TypeError, r"max_pool2d: kernel_size must be an int"),
    row("max-stride-zero", max_pool2d, (P, 2), {"stride": 0}, ValueError, r"max_pool2d: stride must be positive"),
    row("max-padding-negative", max_pool2d, (P, 2), {"padding": -1}, ValueError,
        r"max_pool2d: padding must be non-negative, got \(-1, -1\)"),
    row("max-padding-over-half-kernel", max_pool2d, (P, 3), {"padding": (1, 2)}, ValueError,
        r"max_pool2d: padding must be at most half of kernel_size \(3, 3\), got \(1, 2\)"),
    row("max-dilation-zero", max_pool2d, (P, 2), {"dilation": 0}, ValueError, r"max_pool2d: dilation must be positive"),
    row("max-output-too-small", max_pool2d, (P, 7), {}, ValueError,
        r"max_pool2d: output size must be positive: input 6x6 with kernel_size \(7, 7\).* gives 0x0"),
    row("max-dilated-output-too-small", max_pool2d, (P, 3), {"dilation": 3}, ValueError,
        r"max_pool2d: output size must be positive"),
    row("max-ceil-mode-int", max_pool2d, (P, 2), {"ceil_mode": 1}, TypeError, r"max_pool2d: ceil_mode must be a bool, got 1"),
    row("max-return-indices-str", max_pool2d, (P, 2), {"return_indices": "yes"}, TypeError,
        r"max_pool2d: return_indices must be a bool, got 'yes'"),
    row("max-output-too-large", max_pool2d, (huge(), 1), {}, ValueError,
        r"max_pool2d: output of shape \(1000000, 1024, 1024, 1024\) would need [\d.]+ GiB"),
    # ---- max_pool2d_backward
    row("maxb-input-shape-length", max_pool2d_backward, (PGY, IDX, (2, 6, 6)), {}, ValueError,
        r"max_pool2d_backward: input_shape must be a shape \(N, C, H, W\), got \(2, 6, 6\)"),
    row("maxb-input-shape-array", max_pool2d_backward, (PGY, IDX, np.array([1, 2, 6, 6])), {}, ValueError,
        r"max_pool2d_backward: input_shape must be a shape"),
    row("maxb-input-shape-float", max_pool2d_backward, (PGY, IDX, (1, 2, 6.0, 6)), {}, TypeError,
        r"max_pool2d_backward: input_shape must be a tuple of 4 ints \(N, C, H, W\), got 6.0"),
    row("maxb-input-shape-zero-h", max_pool2d_backward, (PGY, IDX, (1, 2, 0, 6)), {}, ValueError,
        r"max_pool2d_backward: input_shape must have N >= 0 and positive C, H, W, got \(1, 2, 0, 6\)"),
    row("maxb-grad-output-nc", max_pool2d_backward, (PGY, IDX, (1, 3, 6, 6)), {}, ValueError,
        r"max_pool2d_backward: grad_output must have input_shape's N and C \(1, 3\), got shape \(1, 2, 3, 3\)"),
    row("maxb-grad-output-int", max_pool2d_backward, (IDX, IDX, P.shape), {}, TypeError,
        r"max_pool2d_backward: grad_output must have dtype .*got int64"),
    row("maxb-grad-output-3d", max_pool2d_backward, (PGY[0], IDX, P.shape), {}, ValueError,
        r"max_pool2d_backward: grad_output must be 4-D"),
    row("maxb-indices-list", max_pool2d_backward, (PGY, IDX.tolist(), P.shape), {}, TypeError,
        r"max_pool2d_backward: indices must be a numpy.ndarray, got list"),
    row("maxb-indices-float", max_pool2d_backward, (PGY, IDX.astype(F64), P.shape), {}, TypeError,
        r"max_pool2d_backward: indices must have an integer dtype, got float64"),
    row("maxb-indices-bool", max_pool2d_backward, (PGY, IDX.astype(bool), P.shape), {}, TypeError,
        r"max_pool2d_backward: indices must have an integer dtype, got bool"),
    row("maxb-indices-shape", max_pool2d_backward, (PGY, IDX[..., :2], P.shape), {}, ValueError,
        r"max_pool2d_backward: indices must have grad_output's shape \(1, 2, 3, 3\), got \(1, 2, 3, 2\)"),
    row("maxb-indices-negative", max_pool2d_backward, (PGY, IDX - 1, P.shape), {}, ValueError,
        r"max_pool2d_backward: indices must lie in \[0, H\*W\) = \[0, 36\), got values from -1 to -1"),
    row("maxb-indices-too-large", max_pool2d_backward, (PGY, IDX + 36, P.shape), {}, ValueError,
        r"max_pool2d_backward: indices must lie in \[0, H\*W\) = \[0, 36\), got values from 36 to 36"),
    row("maxb-grad-input-too-large", max_pool2d_backward,
        (huge((10**6, 1024, 1, 1)), huge((10**6, 1024, 1, 1), np.int64), HUGE), {}, ValueError,
        r"max_pool2d_backward: grad_input of shape \(1000000, 1024, 1024, 1024\) would need [\d.]+ GiB"),
    # ---- avg_pool2d
    row("avg-input-list", avg_pool2d, (P.tolist(), 2), {}, TypeError, r"avg_pool2d: input must be a numpy.ndarray"),
    row("avg-input-5d", avg_pool2d, (P[None], 2), {}, ValueError,
        r"avg_pool2d: input must be 3-D \(unbatched\) or 4-D \(batched\), got 5-D"),
    row("avg-input-complex", avg_pool2d, (P.astype(np.complex64), 2), {}, TypeError,
        r"avg_pool2d: input must have dtype .*got complex64"),
    row("avg-kernel-negative", avg_pool2d, (P, (2, -1)), {}, ValueError, r"avg_pool2d: kernel_size must be positive"),
    row("avg-stride-float", avg_pool2d, (P, 2), {"stride": 1.5}, TypeError, r"avg_pool2d: stride must be an int"),
    row("avg-padding-over-half-kernel", avg_pool2d, (P, 2), {"padding": 2}, ValueError,
        r"avg_pool2d: padding must be at most half of kernel_size"),
    row("avg-output-too-small", avg_pool2d, (P, (2, 8)), {}, ValueError, r"avg_pool2d: output size must be positive"),
    row("avg-ceil-mode-none", avg_pool2d, (P, 2), {"ceil_mode": None}, TypeError, r"avg_pool2d: ceil_mode must be a bool"),
    row("avg-count-include-pad-int", avg_pool2d, (P, 2), {"count_include_pad": 0}, TypeError,
        r"avg_pool2d: count_include_pad must be a bool, got 0"),
    row("avg-output-too-large", avg_pool2d, (huge(), 1), {}, ValueError, r"avg_pool2d: output of shape .* GiB"),
    # ---- avg_pool2d_backward
    row("avgb-grad-output-shape", avg_pool2d_backward, (PGY, P.shape, 3), {}, ValueError,
        r"avg_pool2d_backward: grad_output must have the output's shape \(1, 2, 2, 2\), got \(1, 2, 3, 3\)"),
    row("avgb-grad-output-int", avg_pool2d_backward, (IDX, P.shape, 2), {}, TypeError,
        r"avg_pool2d_backward: grad_output must have dtype .*got int64"),
    row("avgb-grad-output-list", avg_pool2d_backward, (PGY.tolist(), P.shape, 2), {}, TypeError,
        r"avg_pool2d_backward: grad_output must be a numpy.ndarray"),
    row("avgb-input-shape", avg_pool2d_backward, (PGY, "shape", 2), {}, ValueError,
        r"avg_pool2d_backward: input_shape must be a shape"),
    row("avgb-input-shape-bool", avg_pool2d_backward, (PGY, (1, 2, True, 6), 2), {}, TypeError,
        r"avg_pool2d_backward: input_shape must be a tuple of 4 ints \(N, C, H, W\), got True"),
    row("avgb-padding-over-half-kernel", avg_pool2d_backward, (PGY, P.shape, 2), {"padding": 2}, ValueError,
        r"avg_pool2d_backward: padding must be at most half"),
    row("avgb-count-include-pad-none", avg_pool2d_backward, (PGY, P.shape, 2), {"count_include_pad": None},
        TypeError, r"avg_pool2d_backward: count_include_pad must be a bool"),
    row("avgb-output-too-large", avg_pool2d_backward, (huge(), HUGE, 1), {}, ValueError,
        r"avg_pool2d_backward: output of shape .* GiB"),
    row("avgb-grad-input-too-large", avg_pool2d_backward, (np.zeros((1, 1, 1, 1)), (1, 1, 10**7, 10**7), 10**7),
        {}, ValueError, r"avg_pool2d_backward: .*would need [\d.]+ GiB"),
    # ---- relu
    row("relu-list", relu, ([1.0, -1.0],), {}, TypeError, r"relu: input must be a numpy.ndarray, got list"),
    row("relu-int", relu, (np.arange(3),), {}, TypeError, r"relu: input must have dtype float32 or float64, got int64"),
    row("relu-float16", relu, (np.zeros(3, np.float16),), {}, TypeError, r"relu: input must have dtype .*got float16"),
    row("relub-shape", relu_backward, (np.zeros(3), np.zeros(4)), {}, ValueError,
        r"relu_backward: grad_output must have the input's shape \(4,\), got \(3,\)"),
    row("relub-ndim", relu_backward, (np.zeros((2, 2)), np.zeros(4)), {}, ValueError,
        r"relu_backward: grad_output must be 1-D, got 2-D"),
    row("relub-dtype", relu_backward, (np.zeros(4, F32), np.zeros(4)), {}, TypeError,
        r"relu_backward: grad_output must have the same dtype as the input \(float64\), got float32"),
    row("relub-input-list", relu_backward, (np.zeros(2), [1.0, 2.0]), {}, TypeError,
        r"relu_backward: input must be a numpy.ndarray, got list"),
    row("relub-grad-list", relu_backward, ([1.0, 2.0], np.zeros(2)), {}, TypeError,
        r"relu_backward: grad_output must be a numpy.ndarray, got list"),
    # ---- conv2d_as_matrix and summary
    row("matrix-input-shape-4d", fastconv.conv2d_as_matrix, (W, X.shape), {}, ValueError,
        r"conv2d_as_matrix: input_shape must be one image's shape \(C, H, W\), got \(1, 2, 5, 5\)"),
    row("matrix-input-shape-zero", fastconv.conv2d_as_matrix, (W, (2, 0, 5)), {}, ValueError,
        r"conv2d_as_matrix: input_shape must have positive C, H, W, got \(2, 0, 5\)"),
    row("matrix-weight-int", fastconv.conv2d_as_matrix, (W.astype(int), (2, 5, 5)), {}, TypeError,
        r"conv2d_as_matrix: weight must have dtype float32 or float64"),
    row("matrix-channels", fastconv.conv2d_as_matrix, (W, (3, 5, 5)), {}, ValueError,
        r"conv2d_as_matrix: input channels must equal weight.shape\[1\] \* groups"),
    row("matrix-sparse-str", fastconv.conv2d_as_matrix, (W, (2, 5, 5)), {"sparse": "yes"}, TypeError,
        r"conv2d_as_matrix: sparse must be a bool, got 'yes'"),
    row("summary-model", fastconv.summary, ([], (1, 8, 8)), {}, TypeError,
        r"summary: model must be a fastconv layer or Sequential, got list"),
    row("summary-input-shape", fastconv.summary, (fastconv.ReLU(), 5), {}, ValueError,
        r"summary: input_shape must be one sample's shape"),
    # ---- layer constructors (errors raised at construction, not at the first forward)
    row("Conv2d-in-channels-zero", fastconv.Conv2d, (0, 4, 3), {}, ValueError,
        r"Conv2d: in_channels must be positive, got 0"),
    row("Conv2d-out-channels-float", fastconv.Conv2d, (2, 4.0, 3), {}, TypeError,
        r"Conv2d: out_channels must be an int, got 4.0"),
    row("Conv2d-groups", fastconv.Conv2d, (3, 4, 3), {"groups": 2}, ValueError,
        r"Conv2d: in_channels and out_channels must be divisible by groups=2, got 3 and 4"),
    row("Conv2d-kernel-zero", fastconv.Conv2d, (2, 4, 0), {}, ValueError, r"Conv2d: kernel_size must be positive"),
    row("Conv2d-padding-same-stride", fastconv.Conv2d, (2, 4, 3), {"stride": 2, "padding": "same"}, ValueError,
        r"Conv2d: padding='same' requires stride 1"),
    row("Conv2d-padding-negative", fastconv.Conv2d, (2, 4, 3), {"padding": -1}, ValueError,
        r"Conv2d: padding must be non-negative"),
    row("Conv2d-bias-int", fastconv.Conv2d, (2, 4, 3), {"bias": 1}, TypeError, r"Conv2d: bias must be a bool, got 1"),
    row("Conv2d-algorithm", fastconv.Conv2d, (2, 4, 3), {"algorithm": "fast"}, ValueError,
        r"Conv2d: algorithm must be one of 'auto'.*got 'fast'"),
    row("Conv2d-dtype", fastconv.Conv2d, (2, 4, 3), {"dtype": np.float16}, TypeError,
        r"Conv2d: dtype must be float32 or float64, got float16"),
    row("Conv2d-rng", fastconv.Conv2d, (2, 4, 3), {"rng": "seed"}, TypeError,
        r"Conv2d: rng must be None, an int seed or a numpy.random.Generator, got 'seed'"),
    row("MaxPool2d-kernel-zero", fastconv.MaxPool2d, (0,), {}, ValueError, r"MaxPool2d: kernel_size must be positive"),
    row("MaxPool2d-padding", fastconv.MaxPool2d, (2,), {"padding": 2}, ValueError,
        r"MaxPool2d: padding must be at most half of kernel_size \(2, 2\), got \(2, 2\)"),
    row("AvgPool2d-stride-float", fastconv.AvgPool2d, (2,), {"stride": 1.5}, TypeError,
        r"AvgPool2d: stride must be an int"),
    row("AvgPool2d-count-include-pad", fastconv.AvgPool2d, (2,), {"count_include_pad": 1}, TypeError,
        r"AvgPool2d: count_include_pad must be a bool"),
    row("Linear-in-features", fastconv.Linear, (-1, 3), {}, ValueError, r"Linear: in_features must be positive, got -1"),
    row("Linear-dtype", fastconv.Linear, (2, 3), {"dtype": np.int32}, TypeError,
        r"Linear: dtype must be float32 or float64, got int32"),
    row("Sequential-not-a-layer", fastconv.Sequential, (fastconv.ReLU(), len), {}, TypeError,
        r"Sequential: layers must be fastconv layers, got builtin_function_or_method at position 1"),
    row("Parameter-list", fastconv.Parameter, ([1.0],), {}, TypeError,
        r"Parameter: data must be a numpy.ndarray, got list"),
    row("CrossEntropyLoss-reduction", fastconv.CrossEntropyLoss, ("none",), {}, ValueError,
        r"CrossEntropyLoss: reduction must be 'mean' or 'sum', got 'none'"),
    row("SGD-empty", fastconv.SGD, ([], 0.1), {}, ValueError, r"SGD: params must contain at least one Parameter"),
    row("SGD-arrays", fastconv.SGD, ([np.zeros(2)], 0.1), {}, TypeError,
        r"SGD: params must be Parameter objects \(model.parameters\(\)\), got ndarray"),
    row("SGD-lr-negative", fastconv.SGD, ([fastconv.Parameter(np.zeros(2))], -0.1), {}, ValueError,
        r"SGD: lr must be a finite number >= 0, got -0.1"),
    row("SGD-nesterov", fastconv.SGD, ([fastconv.Parameter(np.zeros(2))], 0.1), {"nesterov": True}, ValueError,
        r"SGD: nesterov requires momentum > 0 and dampening = 0"),
    row("Adam-betas", fastconv.Adam, ([fastconv.Parameter(np.zeros(2))],), {"betas": (0.9, 1.0)}, ValueError,
        r"Adam: betas must be a pair of numbers in \[0, 1\), got \(0.9, 1.0\)"),
    row("Adam-eps-str", fastconv.Adam, ([fastconv.Parameter(np.zeros(2))],), {"eps": "1e-8"}, TypeError,
        r"Adam: eps must be a number, got '1e-8'"),
]


@pytest.mark.parametrize("fn, args, kwargs, exc, pattern", ERRORS)
def test_error(fn, args, kwargs, exc, pattern):
    with pytest.raises(exc, match=pattern) as info:
        fn(*args, **kwargs)
    assert str(info.value).startswith(fn.__name__ + ": ")  # the function is named first


def test_error_table_covers_every_public_function():
    from test_nn_ops import ERRORS as NN_ERRORS  # the issue-21 ops keep their table beside their tests
    covered = {p.values[0].__name__ for p in ERRORS + NN_ERRORS}
    public = {name for name in fastconv.__all__ if callable(getattr(fastconv, name))}
    # functions without arguments cannot be called wrongly; ReLU() and Flatten() take no arguments
    # (their forward errors are relu's and Flatten's, tested in test_layers.py)
    # exception types, the autograd switches and the bare Tensor/Module bases take no checked arguments
    assert public - covered <= {"AlgorithmUnavailable", "Module", "Tensor", "no_grad", "enable_grad",
                                "is_grad_enabled", "Conv2dGrads", "BatchNormGrads", "algorithms", "get_workspace_limit", "free_workspace", "get_num_threads", "max_threads",
                                "get_autotune", "autotune_cache_path", "clear_autotune_cache", "ReLU", "Flatten",
                                "ReLU6"}


@pytest.mark.parametrize("algorithm", fastconv.algorithms() + ("auto",))
def test_accepted_argument_spellings(algorithm):
    # numpy ints, lists as pairs, numpy bools and stride=None / [] are all valid
    x = np.random.default_rng(0).standard_normal((1, 2, 6, 6))
    w = np.random.default_rng(1).standard_normal((2, 2, 3, 3))
    y = fastconv.conv2d(x, w, stride=np.int64(1), padding=[1, np.int32(1)], dilation=(1, 1),
                        groups=np.int8(1), algorithm=algorithm)
    np.testing.assert_array_equal(y, fastconv.conv2d(x, w, padding=1, algorithm=algorithm))
    for stride in (None, [], 2, (2, 2)):
        np.testing.assert_array_equal(fastconv.max_pool2d(x, 2, stride=stride), fastconv.max_pool2d(x, 2))
    np.testing.assert_array_equal(fastconv.avg_pool2d(x, 2, ceil_mode=np.bool_(False)), fastconv.avg_pool2d(x, 2))


def test_explicit_algorithm_never_falls_back():
    # an unknown name is refused even where 'auto' would succeed
    with pytest.raises(ValueError, match=re.escape("'auto'")):
        fastconv.conv2d(X, W, algorithm="AUTO")
    # a named algorithm whose workspace does not fit the budget raises; auto uses another one
    x, w = np.ones((2, 4, 16, 16), np.float32), np.ones((4, 4, 5, 5), np.float32)
    refused = 0
    for name in fastconv.algorithms():  # those that need a workspace refuse; the others compute
        try:
            fastconv.conv2d(x, w, algorithm=name, workspace_limit=64)
        except fastconv.AlgorithmUnavailable as exc:
            refused += 1
            assert re.match(rf"conv2d: algorithm='{name}' cannot compute the forward pass", str(exc))
            with pytest.raises(fastconv.AlgorithmUnavailable,
                               match=rf"conv2d_backward: algorithm='{name}' cannot compute the grad_input"):
                fastconv.conv2d_backward(np.ones((2, 4, 12, 12), np.float32), x, w, algorithm=name,
                                         workspace_limit=64)
    assert refused >= 1
    np.testing.assert_array_equal(fastconv.conv2d(x, w, workspace_limit=64),
                                  fastconv.conv2d(x, w, algorithm="direct"))


def test_remembered_geometry_never_hides_an_error():
    """conv_params caches valid geometries; an equal-hashing invalid argument must still raise."""
    conv2d(X, W, stride=1, dilation=1)
    with pytest.raises(TypeError, match="conv2d: stride must be an int"):
        conv2d(X, W, stride=True)
    with pytest.raises(TypeError, match="conv2d: dilation must be an int"):
        conv2d(X, W, dilation=1.0)
    with pytest.raises(TypeError, match="conv2d: groups must be an int"):
        conv2d(X, W, groups=True)


def test_read_only_inputs_reach_the_kernels_as_writeable_copies_in_their_layout():
    # numba compiles every kernel again for read-only arrays (a minute for im2col's passes), so the
    # boundary hands the kernels a writeable copy -- of inputs only, and not of broadcast arrays
    from fastconv import _validation as V
    x = np.arange(2 * 3 * 4 * 5, dtype=F32).reshape(2, 4, 5, 3).transpose(0, 3, 1, 2)  # channels_last
    x.setflags(write=False)
    got = V.as_input("f", "input", x, 4)
    assert got is not x and got.flags.writeable and not np.shares_memory(got, x)
    assert got.strides == x.strides and np.array_equal(got, x) and not x.flags.writeable
    w = np.ones((2, 3, 3, 3), F32)
    assert V.as_input("f", "weight", w, 4) is w  # writeable: no copy
    b = np.broadcast_to(np.ones((), F32), (2, 3, 40, 40))
    assert V.as_input("f", "input", b, 4) is b  # broadcast: the kernels copy it after the memory checks
    i = np.zeros((1, 2, 3, 3), np.int64)
    i.setflags(write=False)
    assert V.check_indices("f", i, i.shape).flags.writeable
    # a running statistic a call writes into is never swapped for a copy: read-only is refused
    stats = np.zeros(3, F32)
    stats.setflags(write=False)
    with pytest.raises(ValueError, match="running_mean must be writeable"):
        fastconv.batch_norm(np.ones((2, 3, 4, 4), F32), stats, np.ones(3, F32), training=True)
