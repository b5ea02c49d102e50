"""One training epoch of the ``python -m fastconv train`` network in fastconv and in PyTorch (CPU):
same architecture, initial weights, batch size, batch order and optimiser (Adam), same thread count.

Data: 1,438 images of 1x8x8 in 10 classes, the size of the bundled digits' training split (random
pixel values: an epoch's time does not depend on them).  asv runs ``time_epoch`` per library and
thread count; ``python benchmarks/train_epoch_vs_torch.py [--threads N] [--rounds R] [--epochs E]``
runs each library in its own processes, alternated, and prints the per-epoch medians, the ratio and
where fastconv's time goes per layer.  Separate processes, because in one process the idle workers
of numba's OpenMP pool and PyTorch's compete for the cores (PyTorch ran 5-20x slower that way here).

Importing this module does no work (asv imports every module in benchmarks/).
"""
import argparse
import statistics
import time

import numpy as np

N_TRAIN, IMAGE, CLASSES, BATCH = 1438, (1, 8, 8), 10, 32


def make_data(n=N_TRAIN, image=IMAGE, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.random((n,) + tuple(image), dtype=np.float32)
    y = rng.integers(0, CLASSES, n).astype(np.int64)
    return x, y


def fastconv_setup(x, batch=BATCH, seed=0, lr=3e-3):
    from fastconv.layers import Adam, CrossEntropyLoss
    from fastconv.train import build_model

    model = build_model(x.shape[1:], CLASSES, rng=seed)
    return model, CrossEntropyLoss(), Adam(model.parameters(), lr=lr)


def torch_twin(model, lr=3e-3):
    """The same network in PyTorch, initialised with a copy of ``model``'s parameters."""
    import torch
    from torch import nn

    layers = []
    for layer in model:
        name = type(layer).__name__
        if name == "Conv2d":
            layers.append(nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride,
                                    layer.padding, layer.dilation, layer.groups, layer.bias is not None))
        elif name == "Linear":
            layers.append(nn.Linear(layer.in_features, layer.out_features, layer.bias is not None))
        elif name == "MaxPool2d":
            layers.append(nn.MaxPool2d(layer.kernel_size, layer.stride, layer.padding, layer.dilation))
        elif name == "ReLU":
            layers.append(nn.ReLU())
        elif name == "Flatten":
            layers.append(nn.Flatten())
        else:  # pragma: no cover
            raise NotImplementedError(name)
    net = nn.Sequential(*layers)
    with torch.no_grad():
        state = {k: torch.from_numpy(v.copy()) for k, v in model.state_dict().items()}
        net.load_state_dict(state)
    return net, nn.CrossEntropyLoss(), torch.optim.Adam(net.parameters(), lr=lr)


def fastconv_epoch(model, loss_fn, opt, x, y, order, batch=BATCH):
    for start in range(0, len(x), batch):
        idx = order[start:start + batch]
        opt.zero_grad()
        loss_fn(model(x[idx]), y[idx])
        model.backward(loss_fn.backward(), input_grad=False)
        opt.step()


def torch_epoch(net, loss_fn, opt, xt, yt, order_t, batch=BATCH):
    for start in range(0, len(xt), batch):
        idx = order_t[start:start + batch]
        opt.zero_grad()
        loss_fn(net(xt[idx]), yt[idx]).backward()
        opt.step()


class TrainEpochFastconv:
    """Seconds per training epoch in fastconv, at 1 and 2 threads.

    fastconv and PyTorch are timed in separate classes (so asv runs them in separate processes):
    measured in one process, the idle workers of numba's OpenMP pool and PyTorch's compete for the
    same cores and slowed PyTorch by 5-20x here.
    """

    params = ([1, 2],)
    param_names = ["threads"]
    timeout = 300
    number = 1
    repeat = 5

    def setup(self, threads):
        import fastconv

        if threads > fastconv.max_threads():
            raise NotImplementedError(f"only {fastconv.max_threads()} threads")
        self.x, self.y = make_data()
        self.order = np.random.default_rng(1).permutation(len(self.x))
        self.fc = fastconv_setup(self.x)
        self._ctx = fastconv.threads(threads)
        self._ctx.__enter__()
        fastconv_epoch(*self.fc, self.x, self.y, self.order)  # compile / load the numba cache

    def teardown(self, threads):
        self._ctx.__exit__(None, None, None)

    def time_epoch(self, threads):
        fastconv_epoch(*self.fc, self.x, self.y, self.order)


class TrainEpochTorch:
    """Seconds per training epoch in PyTorch (CPU), same network, initial weights and batches."""

    params = ([1, 2],)
    param_names = ["threads"]
    timeout = 300
    number = 1
    repeat = 5

    def setup(self, threads):
        try:
            import torch
        except ImportError:
            raise NotImplementedError("torch is not installed") from None
        torch.set_num_threads(threads)
        x, y = make_data()
        order = np.random.default_rng(1).permutation(len(x))
        self.tc = torch_twin(fastconv_setup(x)[0])  # builds fastconv's model only to copy its weights
        self.data = torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(order)
        torch_epoch(*self.tc, *self.data)

    def time_epoch(self, threads):
        torch_epoch(*self.tc, *self.data)


def layer_profile(model, loss_fn, opt, x, y, order, batch=BATCH):
    """Seconds per epoch spent in each layer's forward and backward, the loss and the optimiser."""
    times = {}

    def add(key, t0):
        times[key] = times.get(key, 0.0) + time.perf_counter() - t0

    for start in range(0, len(x), batch):
        idx = order[start:start + batch]
        opt.zero_grad()
        h = x[idx]
        for i, layer in enumerate(model):
            t0 = time.perf_counter()
            h = layer(h)
            add(f"{i} {type(layer).__name__} forward", t0)
        t0 = time.perf_counter()
        loss_fn(h, y[idx])
        g = loss_fn.backward()
        add("loss", t0)
        for i in reversed(range(len(model))):
            t0 = time.perf_counter()
            g = model[i].backward(g, input_grad=False) if i == 0 else model[i].backward(g)
            add(f"{i} {type(model[i]).__name__} backward", t0)
        t0 = time.perf_counter()
        opt.step()
        add("optimizer", t0)
    return times


def _worker(kind, threads, epochs, batch):
    """Time ``epochs`` epochs of one library in this process (after one warm-up epoch)."""
    x, y = make_data()
    order = np.random.default_rng(1).permutation(len(x))
    fc = fastconv_setup(x, batch)
    if kind == "torch":
        import torch

        torch.set_num_threads(threads)
        tc = torch_twin(fc[0])
        args = tc + (torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(order), batch)

        def run():
            torch_epoch(*args)
    else:
        import fastconv

        fastconv.set_num_threads(threads)

        def run():
            fastconv_epoch(*fc, x, y, order, batch)
    run()
    times = []
    for _ in range(epochs):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    if kind == "profile":
        return {"times": times, "profile": layer_profile(*fc, x, y, order, batch)}
    return {"times": times}


def main(argv=None):
    import json
    import subprocess
    import sys

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3, help="processes per library, alternated")
    ap.add_argument("--epochs", type=int, default=5, help="timed epochs per process")
    ap.add_argument("--batch", type=int, default=BATCH)
    ap.add_argument("--worker", choices=("fastconv", "torch", "profile"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(_worker(args.worker, args.threads, args.epochs, args.batch)))
        return 0

    def spawn(kind):
        cmd = [sys.executable, __file__, "--worker", kind, "--threads", str(args.threads),
               "--epochs", str(args.epochs), "--batch", str(args.batch)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        return json.loads(out.strip().splitlines()[-1])

    t_fc, t_tc = [], []
    for r in range(args.rounds):  # alternate which library goes first
        for kind in (("fastconv", "torch") if r % 2 == 0 else ("torch", "fastconv")):
            (t_fc if kind == "fastconv" else t_tc).extend(spawn(kind)["times"])
    prof = spawn("profile")["profile"]
    m_fc, m_tc = statistics.median(t_fc), statistics.median(t_tc)
    print(f"one epoch, {N_TRAIN} images 1x8x8, batch {args.batch}, Adam, {args.threads} thread(s); "
          f"{args.rounds} alternated processes per library x {args.epochs} epochs")
    print(f"  fastconv {1e3 * m_fc:8.1f} ms   (min {1e3 * min(t_fc):.1f})")
    print(f"  pytorch  {1e3 * m_tc:8.1f} ms   (min {1e3 * min(t_tc):.1f})")
    print(f"  fastconv / pytorch time: {m_fc / m_tc:.2f}x (median), {min(t_fc) / min(t_tc):.2f}x (min)")
    print("fastconv time per epoch by part (one profiled epoch):")
    for key, t in sorted(prof.items(), key=lambda kv: -kv[1]):
        print(f"  {key:28} {1e3 * t:8.2f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
