"""max_pool2d and avg_pool2d, forward and backward, on the pooling cases of the public suite."""
from .cases import POOL, TORCH_LAYOUTS, torch_max_pool_call

PASSES = ["forward", "backward"]


class MaxPool:
    params = (list(POOL), PASSES)
    param_names = ["shape", "pass"]

    def setup(self, shape, pass_):
        import fastconv
        case = POOL[shape]
        x, gy, kw = case.arrays(), case.grad_output(), case.kwargs
        _, idx = fastconv.max_pool2d(x, **kw, return_indices=True)
        if pass_ == "forward":
            self.fn = lambda: fastconv.max_pool2d(x, **kw, return_indices=True)
        else:
            self.fn = lambda: fastconv.max_pool2d_backward(gy, idx, x.shape)
        self.fn()  # compile or load the cache outside the timing

    def time_max_pool2d(self, shape, pass_):
        self.fn()


class TorchMaxPool:
    """PyTorch's max pooling on the same cases, NCHW and channels_last tensors (compare
    :class:`MaxPool` against the faster); skipped where torch is not installed."""

    params = (list(POOL), TORCH_LAYOUTS, PASSES)
    param_names = ["shape", "layout", "pass"]

    def setup(self, shape, layout, pass_):
        self.fn = torch_max_pool_call(POOL[shape], layout, pass_)

    def time_max_pool2d(self, shape, layout, pass_):
        self.fn()


class AvgPool:
    params = (list(POOL), PASSES)
    param_names = ["shape", "pass"]

    def setup(self, shape, pass_):
        import fastconv
        case = POOL[shape]
        x, gy, kw = case.arrays(), case.grad_output(), case.kwargs
        if pass_ == "forward":
            self.fn = lambda: fastconv.avg_pool2d(x, **kw)
        else:
            self.fn = lambda: fastconv.avg_pool2d_backward(gy, x.shape, **kw)
        self.fn()

    def time_avg_pool2d(self, shape, pass_):
        self.fn()
