"""One training epoch of each network of ``python -m fastconv train --model`` (LeNet-5, ResNet-style,
MobileNet-style) in fastconv and in the identical PyTorch network (CPU), trained the same way.

Same for both libraries: architecture and parameter names (fastconv's initial weights are loaded
into the PyTorch twin), data (the 4,000 training digits of ``--data mnist5k``, 1x28x28,
standardised once here -- the models get no standardisation layer of their own), batch size and
shuffled order, Adam with the same learning rate, loss ``cross_entropy``, thread count.  PyTorch runs
both in NCHW and in channels_last (model and each batch converted) and the faster counts; fastconv
too (``model.to(memory_format="channels_last")``), and the table gives the ratio to fastconv NCHW
and to its faster layout.

    python benchmarks/train_epoch_vs_torch.py [--models lenet5 resnet mobilenet] [--threads 1]
                                              [--rounds 5] [--images 4000] [--batch 32]

One process; the rounds interleave fastconv NCHW and channels_last, PyTorch NCHW and PyTorch
channels_last epochs (A, B, C, D, A, B, ...) after one warm-up epoch each (JIT compilation, allocator), and the
medians are reported: on a shared machine only ratios inside one run mean anything.
Both libraries run their parallel loops on the one GNU OpenMP runtime of the process (PyTorch's CPU
wheel and numba's 'omp' layer load the same libgomp), whose spin count is read once when it
starts.  fastconv shortens it to ``fastconv._jit.SPIN_COUNT`` (~0.1 ms) when it starts the pool
unless ``GOMP_SPINCOUNT``/``OMP_WAIT_POLICY`` are set -- which would impose it on PyTorch's epochs
too (they ran 20-28% slower that way on the 2-core VM, fastconv's 10-15%).  So this script sets
``GOMP_SPINCOUNT=300000``, GNU OpenMP's own default, before either library starts (unless the
environment sets a policy): both libraries run as they would alone.  ``--fastconv-spin`` keeps
fastconv's short spin for both instead.

Importing this module does no work (asv imports every module in benchmarks/); asv times
``TrainEpoch.time_epoch`` per library, model and thread count.
"""
import argparse
import os
import statistics
import time

import numpy as np

MODEL_NAMES = ("lenet5", "resnet", "mobilenet")
BATCH, LR = 32, 3e-3


def make_data(n=None):
    """The mnist5k training split, standardised with its own mean and standard deviation."""
    from fastconv import _data

    x, y, _, _ = _data.load_mnist5k(0.2, 0)
    x = ((x - x.mean()) / x.std()).astype(np.float32)
    return (x, y) if n is None else (x[:n], y[:n])


# --------------------------------------------------------------------------- the PyTorch twins
def torch_model(torch, name):
    """The PyTorch network identical to ``fastconv.models.MODELS[name]()``: same layers, same
    parameter and buffer names (its own random weights: load fastconv's ``state_dict``)."""
    import inspect

    from fastconv import models

    nn = torch.nn
    widths = {k: inspect.signature(getattr(models, k)).parameters["widths"].default for k in ("resnet", "mobilenet")}

    def conv_bn(cin, cout, k, stride=1, groups=1):
        return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout))

    class BasicBlock(nn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.shortcut = conv_bn(cin, cout, 1, stride) if stride != 1 or cin != cout else None

        def forward(self, x):
            h = torch.relu(self.bn1(self.conv1(x)))
            h = self.bn2(self.conv2(h))
            return torch.relu(h + (x if self.shortcut is None else self.shortcut(x)))

    class ResNet(nn.Module):
        def __init__(self, widths):
            super().__init__()
            self.stem = conv_bn(1, widths[0], 3)
            self.stages = nn.ModuleList([nn.Sequential(BasicBlock(a, b, 2)) for a, b in zip(widths[:-1], widths[1:])])
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(widths[-1], 10)

        def forward(self, x):
            h = torch.relu(self.stem(x))
            for stage in self.stages:
                h = stage(h)
            return self.fc(torch.flatten(self.pool(h), 1))

    class DepthwiseSeparable(nn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.depthwise = conv_bn(cin, cin, 3, stride, cin)
            self.pointwise = conv_bn(cin, cout, 1)
            self.act = nn.ReLU6()

        def forward(self, x):
            return self.act(self.pointwise(self.act(self.depthwise(x))))

    if name == "lenet5":
        return nn.Sequential(nn.Conv2d(1, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(6, 16, 5),
                             nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(400, 120), nn.ReLU(),
                             nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, 10))
    if name == "resnet":
        return ResNet(widths["resnet"])
    if name == "mobilenet":
        w = widths["mobilenet"]
        blocks = [DepthwiseSeparable(a, b, 2 if i < 2 else 1) for i, (a, b) in enumerate(zip(w[:-1], w[1:]))]
        return nn.Sequential(conv_bn(1, w[0], 3), nn.ReLU6(), *blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                             nn.Linear(w[-1], 10))
    raise ValueError(f"torch_model: name must be one of {MODEL_NAMES}, got {name!r}")


# --------------------------------------------------------------------------- one epoch each
def fastconv_setup(name, seed=0, channels_last=False):
    import fastconv
    from fastconv.models import MODELS

    model = MODELS[name](rng=seed)
    if channels_last:  # activations in (N, H, W, C) memory from the first convolution on
        model.to(memory_format="channels_last")
    return model, fastconv.CrossEntropyLoss(), fastconv.Adam(model.parameters(), lr=LR)


def torch_setup(torch, model, name, channels_last):
    """The twin of fastconv ``model`` with a copy of its current weights, its loss and optimiser."""
    net = torch_model(torch, name)
    net.load_state_dict({k: torch.from_numpy(v) for k, v in model.state_dict().items()})
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    return net, torch.nn.CrossEntropyLoss(), torch.optim.Adam(net.parameters(), lr=LR)


def fastconv_epoch(model, loss_fn, opt, x, y, order, batch=BATCH):
    model.train()
    for start in range(0, len(x), batch):
        idx = order[start:start + batch]
        loss_fn(model(x[idx]), y[idx]).backward()
        opt.step()
        opt.zero_grad()


def torch_epoch(torch, net, loss_fn, opt, xt, yt, order_t, channels_last, batch=BATCH):
    net.train()
    for start in range(0, len(xt), batch):
        idx = order_t[start:start + batch]
        xb = xt[idx]
        if channels_last:
            xb = xb.contiguous(memory_format=torch.channels_last)
        loss_fn(net(xb), yt[idx]).backward()
        opt.step()
        opt.zero_grad()


def runners(name, threads, x, y, order, batch=BATCH):
    """``{'fastconv': run, 'fastconv-cl': run, 'torch': run, 'torch-cl': run}``: each call trains one
    epoch (``-cl``: the model in channels_last memory)."""
    import torch

    import fastconv

    fastconv.set_num_threads(threads)
    torch.set_num_threads(threads)
    fc = fastconv_setup(name)
    fcl = fastconv_setup(name, channels_last=True)
    xt, yt, ot = torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(order)
    tc = torch_setup(torch, fc[0], name, False)
    tcl = torch_setup(torch, fc[0], name, True)
    return {"fastconv": lambda: fastconv_epoch(*fc, x, y, order, batch),
            "fastconv-cl": lambda: fastconv_epoch(*fcl, x, y, order, batch),
            "torch": lambda: torch_epoch(torch, *tc, xt, yt, ot, False, batch),
            "torch-cl": lambda: torch_epoch(torch, *tcl, xt, yt, ot, True, batch)}


def measure(name, threads, rounds, x, y, batch=BATCH, seed=1):
    order = np.random.default_rng(seed).permutation(len(x))
    runs = runners(name, threads, x, y, order, batch)
    for run in runs.values():  # warm-up: compilation, caches, allocator
        run()
    times = {k: [] for k in runs}
    for _ in range(rounds):
        for k, run in runs.items():
            t0 = time.perf_counter()
            run()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


class TrainEpoch:
    """Seconds per training epoch (1,000 digits) of each model, per library, at 1 and 2 threads."""

    params = (list(MODEL_NAMES), ["fastconv", "fastconv-cl", "torch", "torch-cl"], [1, 2])
    param_names = ["model", "library", "threads"]
    timeout = 600
    number = 1
    repeat = 3

    def setup(self, model, library, threads):
        try:
            import torch  # noqa: F401
        except ImportError:
            raise NotImplementedError("torch is not installed") from None
        import fastconv

        if threads > fastconv.max_threads():
            raise NotImplementedError(f"only {fastconv.max_threads()} threads")
        x, y = make_data(1000)
        self.run = runners(model, threads, x, y, np.random.default_rng(1).permutation(len(x)))[library]
        self.run()

    def time_epoch(self, model, library, threads):
        self.run()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", choices=MODEL_NAMES, default=list(MODEL_NAMES))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=5, help="timed epochs per configuration, interleaved")
    ap.add_argument("--images", type=int, default=None, help="train on the first N digits (default all 4,000)")
    ap.add_argument("--batch", type=int, default=BATCH)
    ap.add_argument("--fastconv-spin", action="store_true",
                    help="keep fastconv's short OpenMP spin (imposed on PyTorch's loops too: one runtime)")
    args = ap.parse_args(argv)
    if not args.fastconv_spin and not any(os.environ.get(k) for k in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")):
        os.environ["GOMP_SPINCOUNT"] = "300000"  # GNU OpenMP's default, before the runtime starts
    import fastconv  # numba's pool starts here, with the spin above (or fastconv's own)
    import torch

    x, y = make_data(args.images)
    print(f"one training epoch: {len(x)} MNIST digits 1x28x28, batch {args.batch}, Adam lr {LR}, {args.threads} "
          f"thread(s); median of {args.rounds} interleaved rounds; fastconv {fastconv.__version__}, torch "
          f"{torch.__version__}, GOMP_SPINCOUNT={os.environ.get('GOMP_SPINCOUNT', 'fastconv')}, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(default)')}")
    print("| model | fastconv NCHW ms | fastconv channels_last ms | PyTorch NCHW ms | PyTorch channels_last ms "
          "| best PyTorch / fastconv NCHW | best PyTorch / best fastconv |")
    print("|---|---|---|---|---|---|---|")
    for name in args.models:
        m = measure(name, args.threads, args.rounds, x, y, args.batch)
        best = min(m["torch"], m["torch-cl"])
        print(f"| {name} | {1e3 * m['fastconv']:.0f} | {1e3 * m['fastconv-cl']:.0f} | {1e3 * m['torch']:.0f} | "
              f"{1e3 * m['torch-cl']:.0f} | {best / m['fastconv']:.2f}x | "
              f"{best / min(m['fastconv'], m['fastconv-cl']):.2f}x |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
