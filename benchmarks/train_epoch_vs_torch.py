"""One training epoch of the ``python -m fastconv train`` network in fastconv and in PyTorch (CPU):
same architecture, initial weights, batch size, batch order and optimiser (Adam), same thread count.

Data: 1,438 images of 1x8x8 in 10 classes, the size of the bundled digits' training split (random
pixel values: an epoch's time does not depend on them).  asv runs ``time_*`` per thread count;
``python benchmarks/train_epoch_vs_torch.py [--threads N] [--rounds R] [--batch B]`` measures both
libraries interleaved in one process and prints the per-epoch medians and the ratio, plus where
fastconv's time goes per layer.

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


class TrainEpoch:
    """Seconds per training epoch, fastconv and PyTorch, at 1 and 2 threads."""

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
        self._fc_threads = fastconv.threads(threads)
        self._fc_threads.__enter__()
        fastconv_epoch(*self.fc, self.x, self.y, self.order)  # compile / load the numba cache
        try:
            import torch
        except ImportError:
            self.tc = None
            return
        torch.set_num_threads(threads)
        self.tc = torch_twin(self.fc[0])
        self.xt, self.yt = torch.from_numpy(self.x), torch.from_numpy(self.y)
        self.order_t = torch.from_numpy(self.order)
        torch_epoch(*self.tc, self.xt, self.yt, self.order_t)

    def teardown(self, threads):
        self._fc_threads.__exit__(None, None, None)

    def time_fastconv_epoch(self, threads):
        fastconv_epoch(*self.fc, self.x, self.y, self.order)

    def time_torch_epoch(self, threads):
        if self.tc is None:
            raise NotImplementedError("torch is not installed")
        torch_epoch(*self.tc, self.xt, self.yt, self.order_t)


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


def main(argv=None):
    import torch

    import fastconv

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=fastconv.max_threads())
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--batch", type=int, default=BATCH)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    x, y = make_data()
    order = np.random.default_rng(1).permutation(len(x))
    fc = fastconv_setup(x, args.batch)
    tc = torch_twin(fc[0])
    xt, yt, order_t = torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(order)
    t_fc, t_tc = [], []
    with fastconv.threads(args.threads):
        fastconv_epoch(*fc, x, y, order, args.batch)
        torch_epoch(*tc, xt, yt, order_t, args.batch)
        for _ in range(args.rounds):
            t0 = time.perf_counter()
            fastconv_epoch(*fc, x, y, order, args.batch)
            t_fc.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            torch_epoch(*tc, xt, yt, order_t, args.batch)
            t_tc.append(time.perf_counter() - t0)
        prof = layer_profile(*fc, x, y, order, args.batch)
    m_fc, m_tc = statistics.median(t_fc), statistics.median(t_tc)
    print(f"one epoch, {len(x)} images 1x8x8, batch {args.batch}, Adam, {args.threads} thread(s), "
          f"median of {args.rounds} interleaved rounds")
    print(f"  fastconv {1e3 * m_fc:8.1f} ms   (min {1e3 * min(t_fc):.1f})")
    print(f"  pytorch  {1e3 * m_tc:8.1f} ms   (min {1e3 * min(t_tc):.1f})")
    print(f"  fastconv / pytorch time: {m_fc / m_tc:.2f}x")
    print("fastconv time per epoch by part (one profiled epoch):")
    for key, t in sorted(prof.items(), key=lambda kv: -kv[1]):
        print(f"  {key:28} {1e3 * t:8.2f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
