"""One SGD training step (forward, loss, backward, update) and one inference pass of four networks:
PyTorch eager (NCHW), PyTorch channels_last, ``torch.compile`` and the model converted by
``fastconv.torch.convert`` -- same initial weights, same batch, same threads, one process.

    python benchmarks/torch_train_step.py [--nets lenet,resnet18,mobilenet,unet] [--rounds 7]
        [--threads N] [--compile] [--batch-norm] [--autotune] [--profile] [--oversubscription] [--quick]
    python -m fastconv bench --torch-step [--quick] [--threads N]     # the same, via the CLI

Networks: LeNet-5 on 28x28 (batch 64); ResNet-18 for 32x32 inputs (CIFAR stem: 3x3 conv, no
max-pool; batch 32); a MobileNet-v1-style depthwise-separable net (width 0.5) on 96x96 (batch 16); a
U-Net-style encoder-decoder (4 levels, 16-128 channels, nearest upsampling + conv, skip
concatenation) on 128x128 (batch 4).

Rounds are interleaved (every round times each configuration once, in a shuffled order, after one
untimed warm-up step each) and each figure is the median over rounds.  ``--compile`` adds
``torch.compile`` (inductor, NCHW) for PyTorch and for the converted model; compiling takes minutes
on a small machine.  ``--profile`` prints where the converted model's step spends its time, timed
from inside the bridge (torch.profiler's hooks inflated this step 10x): fastconv's calls by shape
and pass with the algorithm ``'auto'`` chose, the bridge's own cost (tensor <-> array, layout
copies, thread setting) and the rest (PyTorch's operators, autograd, Python).  ``--oversubscription``
reruns the eager and converted configurations in child processes with PyTorch's OpenMP pool set to
sleep when idle (``OMP_WAIT_POLICY=passive``) to show what its spinning workers cost fastconv.
``--batch-norm`` adds the model converted with ``batch_norm=True`` (BatchNorm2d on fastconv too).
``--autotune`` adds the converted model with measured algorithm choices (``fastconv.set_autotune``,
measured in its untimed warm-up step): what a better-fitted cost model would give on this machine.

Importing this module does no work (asv imports every module in benchmarks/).
"""
import argparse
import copy
import json
import os
import random
import statistics
import subprocess
import sys
import time

NETS = {  # name: (input shape, batch, classes or None for a dense target)
    "lenet": ((1, 28, 28), 64, 10),
    "resnet18": ((3, 32, 32), 32, 10),
    "mobilenet": ((3, 96, 96), 16, 10),
    "unet": ((3, 128, 128), 4, None),
}


def build(name):
    import torch
    from torch import nn
    import torch.nn.functional as F

    if name == "lenet":
        return nn.Sequential(
            nn.Conv2d(1, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
            nn.Linear(400, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, 10))

    if name == "resnet18":
        class Block(nn.Module):
            def __init__(self, cin, cout, stride):
                super().__init__()
                self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
                self.bn1 = nn.BatchNorm2d(cout)
                self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
                self.bn2 = nn.BatchNorm2d(cout)
                self.down = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                             if stride != 1 or cin != cout else nn.Identity())

            def forward(self, x):
                return F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))) + self.down(x))

        layers, cin = [], 64
        for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            layers += [Block(cin, cout, stride), Block(cout, cout, 1)]
            cin = cout
        return nn.Sequential(nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU(), *layers,
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, 10))

    if name == "mobilenet":
        def sep(cin, cout, stride):
            return [nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False), nn.BatchNorm2d(cin), nn.ReLU6(),
                    nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU6()]
        cfg = [(16, 32, 1), (32, 64, 2), (64, 64, 1), (64, 128, 2), (128, 128, 1), (128, 256, 2)] + \
            [(256, 256, 1)] * 5 + [(256, 512, 2), (512, 512, 1)]
        body = [m for c in cfg for m in sep(*c)]
        return nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU6(), *body,
                             nn.AvgPool2d(3), nn.Flatten(), nn.Linear(512, 10))

    if name == "unet":
        def double(cin, cout):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU(),
                                 nn.Conv2d(cout, cout, 3, padding=1), nn.ReLU())

        class UNet(nn.Module):
            def __init__(self, widths=(16, 32, 64, 128)):
                super().__init__()
                self.down = nn.ModuleList()
                cin = 3
                for w in widths:
                    self.down.append(double(cin, w))
                    cin = w
                self.pool = nn.MaxPool2d(2)
                self.up = nn.ModuleList()
                self.reduce = nn.ModuleList()
                for w in reversed(widths[:-1]):
                    self.reduce.append(nn.Conv2d(cin, w, 1))
                    self.up.append(double(2 * w, w))
                    cin = w
                self.head = nn.Conv2d(cin, 1, 1)

            def forward(self, x):
                skips = []
                for i, block in enumerate(self.down):
                    x = block(x)
                    if i < len(self.down) - 1:
                        skips.append(x)
                        x = self.pool(x)
                for reduce, block in zip(self.reduce, self.up):
                    x = reduce(F.interpolate(x, scale_factor=2, mode="nearest"))
                    x = block(torch.cat([x, skips.pop()], 1))
                return self.head(x)

        return UNet()
    raise ValueError(f"torch_train_step: unknown network {name!r}, expected one of {sorted(NETS)}")


def data(name, seed=0):
    import torch
    shape, batch, classes = NETS[name]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((batch,) + shape, generator=g)
    if classes is None:
        y = torch.rand((batch, 1) + shape[1:], generator=g)
    else:
        y = torch.randint(0, classes, (batch,), generator=g)
    return x, y


def contestants(name, configs):
    """{config: (model, input transform)} -- all start from the same weights."""
    import torch
    import fastconv.torch as ft

    torch.manual_seed(0)
    base = build(name)
    out, reports = {}, {}
    for c in configs:
        m = copy.deepcopy(base)
        prep = None
        if c == "eager":
            pass
        elif c == "channels_last":
            m = m.to(memory_format=torch.channels_last)
            prep = lambda x: x.contiguous(memory_format=torch.channels_last)  # noqa: E731
        elif c == "compile":
            m = torch.compile(m)
        elif c in ("fastconv", "fastconv+autotune"):
            m, reports[c] = ft.convert(m)
        elif c == "fastconv+cl":  # the converted model on channels_last tensors (computed natively)
            m, reports[c] = ft.convert(m)
            m = m.to(memory_format=torch.channels_last)
            prep = lambda x: x.contiguous(memory_format=torch.channels_last)  # noqa: E731
        elif c == "fastconv+bn":
            m, reports[c] = ft.convert(m, batch_norm=True)
        elif c == "fastconv+compile":
            m, reports[c] = ft.convert(m)
            m = torch.compile(m)
        else:
            raise ValueError(f"torch_train_step: unknown configuration {c!r}")
        out[c] = (m, prep)
    return out, reports


def make_step(model, prep, x, y, dense, autotune=False):
    import torch
    import torch.nn.functional as F
    import fastconv
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    xin = prep(x) if prep else x

    def train():
        opt.zero_grad(set_to_none=True)
        out = model(xin)
        loss = F.mse_loss(out, y) if dense else F.cross_entropy(out, y)
        loss.backward()
        opt.step()

    def infer():
        with torch.no_grad():
            model(xin)

    if not autotune:
        return train, infer

    def tuned(fn):  # measured algorithm choices for this configuration only (the flag is global)
        def run():
            old = fastconv.set_autotune(True)
            try:
                fn()
            finally:
                fastconv.set_autotune(old)
        return run
    return tuned(train), tuned(infer)


def _time_net(name, configs, rounds, seed=0):
    """{(config, 'train'|'infer'): [seconds per round]} with interleaved rounds."""
    x, y = data(name, seed)
    models, reports = contestants(name, configs)
    dense = NETS[name][2] is None
    fns = {}
    for c, (m, prep) in models.items():
        m.train()
        train, infer = make_step(m, prep, x, y, dense, autotune=c.endswith("+autotune"))
        t0 = time.perf_counter()
        train()  # warm-up: JIT / compile / allocator
        infer()
        fns[(c, "train")], fns[(c, "infer")] = train, infer
        print(f"  [{name}] {c}: first step + inference {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    times = {k: [] for k in fns}
    rng = random.Random(seed)
    for _ in range(rounds):
        order = list(fns)
        rng.shuffle(order)
        for k in order:
            t0 = time.perf_counter()
            fns[k]()
            times[k].append(time.perf_counter() - t0)
    return times, reports


def format_table(results, configs):
    best_torch = [c for c in configs if not c.startswith("fastconv")]
    ours = [c for c in configs if c.startswith("fastconv")]
    lines = []
    for mode, title in (("train", "training step (ms, median)"), ("infer", "inference, no_grad (ms, median)")):
        head = f"{title:34}" + "".join(f"{c:>19}" for c in configs)
        if best_torch:
            head += "".join(f"{c + ' vs best':>28}" for c in ours)
        lines += [head, "-" * len(head)]
        for name, times in results.items():
            med = {c: statistics.median(times[(c, mode)]) * 1e3 for c in configs}
            row = f"{name:34}" + "".join(f"{med[c]:19.1f}" for c in configs)
            if best_torch:
                best = min(best_torch, key=lambda c: med[c])
                row += "".join(f"{med[best] / med[c]:>12.2f}x ({best})".rjust(28) for c in ours)
            lines.append(row)
        lines.append("")
    return "\n".join(lines)


class _Timed:
    """Stands in for ``fastconv.functional`` inside ``fastconv.torch`` while profiling: every call is
    timed and keyed by function, shapes and geometry; ``own`` is the time this logging took."""

    def __init__(self, functional, log):
        self._f, self._log, self.own = functional, log, 0.0

    def __getattr__(self, name):
        fn = getattr(self._f, name)

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            t1 = time.perf_counter()
            shapes = tuple(tuple(a.shape) for a in args if hasattr(a, "shape"))
            geo = tuple(a for a in args if not hasattr(a, "shape") and a is not None)
            self._log.append((name, shapes, geo, t1 - t0))
            self.own += time.perf_counter() - t1
            return out
        setattr(self, name, timed)  # looked up once
        return timed


def _conv_choices(name, shapes, geo):
    """'auto''s algorithm for each pass of a logged convolution call."""
    import fastconv
    if name == "conv2d":
        (xs, ws), passes = shapes[:2], ("forward",)
    elif name == "conv2d_backward":
        (xs, ws), passes = shapes[1:3], ("grad_input", "grad_weight")
    elif name == "conv2d_grad_weight":
        (xs, ws), passes = shapes[1:3], ("grad_weight",)
    else:
        return ""
    stride, padding, dilation, groups = geo[:4]
    return "/".join(fastconv.choose_algorithm(xs, ws, stride, padding, dilation, groups, pass_=q) for q in passes)


def profile_step(name, top=12, steps=5, config="fastconv"):
    """Where the converted model's training step goes, timed from inside (no profiler hooks):
    fastconv's calls keyed by shape and pass (with the algorithm 'auto' chose), the bridge's own
    cost (tensor <-> array, layout copies, thread setting: time in the bridge's computations
    outside fastconv), and the rest (PyTorch's operators, autograd, Python).  ``config``:
    ``fastconv`` (NCHW) or ``fastconv+cl`` (the converted model on channels_last tensors)."""
    import fastconv._torch_ops as ops
    import fastconv.torch as ft

    x, y = data(name)
    models, _ = contestants(name, [config])
    model, prep = models[config]
    train, _ = make_step(model, prep, x, y, NETS[name][2] is None)
    train()
    log, impl_time, copies = [], [0.0], [0, 0]
    # the computations live in _torch_ops; fastconv.torch's public functions also call the *_impl by name
    saved = {(m, k): getattr(m, k) for m in (ops, ft) for k in dir(m)
             if k.endswith("_impl") or (m is ops and k in ("_fc", "_array"))}

    def timed_impl(fn):
        def run(*args):
            t0 = time.perf_counter()
            out = fn(*args)
            impl_time[0] += time.perf_counter() - t0
            return out
        return run

    def counted_array(t):
        if not t.is_contiguous():
            copies[0] += 1
            copies[1] += t.numel() * t.element_size()
        return saved[ops, "_array"](t)

    walls = []
    timed_fc = _Timed(saved[ops, "_fc"], log)
    try:
        ops._fc = timed_fc
        ops._array = counted_array
        for (m, k), fn in saved.items():
            if k.endswith("_impl"):
                setattr(m, k, timed_impl(fn))
        for _ in range(steps):
            t0 = time.perf_counter()
            train()
            walls.append(time.perf_counter() - t0)
    finally:
        for (m, k), fn in saved.items():
            setattr(m, k, fn)
    wall = statistics.median(walls) * 1e3
    per_step = lambda t: t / steps * 1e3  # noqa: E731
    fc = per_step(sum(r[3] for r in log))
    bridge = per_step(impl_time[0] - timed_fc.own) - fc
    rest = sum(walls) / steps * 1e3 - fc - bridge
    groups = {}
    for fname, shapes, geo, dt in log:
        entry = groups.setdefault((fname, shapes, geo), [0, 0.0])
        entry[0] += 1
        entry[1] += dt
    lines = [f"where a training step of the converted {name} ({config}) goes (median wall {wall:.1f} ms over {steps} steps; "
             f"per-step means):",
             f"  fastconv calls   {fc:8.2f} ms  {len(log) // steps} calls",
             f"  bridge           {bridge:8.2f} ms  (tensor<->array, {copies[0] // steps} layout copies = "
             f"{copies[1] / steps / 1e6:.1f} MB, thread setting)",
             f"  PyTorch + rest   {rest:8.2f} ms  (its operators, autograd, Python)",
             f"  top fastconv calls (ms per step; 'auto' choice per pass):"]
    for (fname, shapes, geo), (n, t) in sorted(groups.items(), key=lambda kv: -kv[1][1])[:top]:
        shape_text = " ".join("x".join(map(str, sh)) for sh in shapes)
        geo_text = ",".join(str(g) for g in geo[:5])
        lines.append(f"    {per_step(t):7.2f}  {fname:20} x{n // steps:<2} {shape_text:40} {geo_text:34} "
                     f"{_conv_choices(fname, shapes, geo)}")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(prog="torch_train_step", description=__doc__.split("\n\n")[0])
    p.add_argument("--nets", default=",".join(NETS), help=f"comma-separated, from {','.join(NETS)}")
    p.add_argument("--rounds", type=int, default=7, help="interleaved rounds (default 7; --quick 3)")
    p.add_argument("--threads", type=int, help="threads for both libraries (default: all)")
    p.add_argument("--compile", action="store_true", help="also torch.compile (PyTorch and the converted model)")
    p.add_argument("--configs", help="explicit comma-separated configurations (eager, channels_last, compile, fastconv+cl, "
                                     "fastconv, fastconv+bn, fastconv+autotune, fastconv+compile)")
    p.add_argument("--batch-norm", action="store_true",
                   help="also the model converted with convert(..., batch_norm=True) (BatchNorm2d on fastconv)")
    p.add_argument("--autotune", action="store_true",
                   help="also the converted model with measured algorithm choices (fastconv.set_autotune; "
                        "the cache goes to a fresh FASTCONV_CACHE_DIR unless that is set)")
    p.add_argument("--profile", action="store_true", help="print where the converted model's step goes")
    p.add_argument("--oversubscription", action="store_true",
                   help="compare eager/fastconv in child processes with PyTorch's OpenMP pool spinning (default) "
                        "and passive (OMP_WAIT_POLICY=passive)")
    p.add_argument("--quick", action="store_true", help="3 rounds")
    p.add_argument("--json", metavar="FILE", help="write the per-round times as JSON")
    a = p.parse_args(argv)
    nets = [n.strip() for n in a.nets.split(",") if n.strip()]
    bad = [n for n in nets if n not in NETS]
    if bad:
        p.error(f"--nets must name some of {','.join(NETS)}, got {','.join(bad)}")
    rounds = 3 if a.quick and a.rounds == 7 else a.rounds
    configs = (a.configs.split(",") if a.configs else
               ["eager", "channels_last"] + (["compile"] if a.compile else []) + ["fastconv"] +
               (["fastconv+bn"] if a.batch_norm else []) + (["fastconv+autotune"] if a.autotune else []) +
               (["fastconv+compile"] if a.compile else []))
    if any(c.endswith("+autotune") for c in configs) and not os.environ.get("FASTCONV_CACHE_DIR"):
        import tempfile
        os.environ["FASTCONV_CACHE_DIR"] = tempfile.mkdtemp(prefix="fastconv_autotune_")  # measured afresh

    if a.oversubscription:
        return _oversubscription(nets, rounds, a.threads)

    import torch
    import fastconv
    import fastconv.torch as ft
    import platform
    threads = a.threads or fastconv.max_threads()
    ft.set_num_threads(threads)
    print(f"torch {torch.__version__} | fastconv {fastconv.__version__} | {threads} threads (both pools) | "
          f"{platform.processor() or platform.machine()} {os.cpu_count()} cpus | median of {rounds} interleaved rounds")
    results = {}
    for name in nets:
        shape, batch, _ = NETS[name]
        label = f"{name} {shape[1]}x{shape[2]} b{batch}"
        results[label], reports = _time_net(name, configs, rounds)
        if name == nets[0] and "fastconv" in reports:
            print(str(reports["fastconv"]).splitlines()[0], f"({name})")
    print(format_table(results, configs))
    if a.profile:
        for name in nets:
            for c in [c for c in configs if c in ("fastconv", "fastconv+cl")] or ["fastconv"]:
                print(profile_step(name, config=c))
    if a.json:
        with open(a.json, "w", encoding="utf-8") as f:
            json.dump({k: {f"{c}/{m}": v for (c, m), v in t.items()} for k, t in results.items()}, f, indent=1)
    return 0


def _oversubscription(nets, rounds, threads):
    """Eager vs converted in child processes: PyTorch's pool spinning (default) or passive."""
    for label, extra in (("default (PyTorch's OpenMP workers spin after each region)", {}),
                         ("OMP_WAIT_POLICY=passive for the whole process", {"OMP_WAIT_POLICY": "passive"})):
        env = dict(os.environ, **extra)
        if not extra:
            env.pop("OMP_WAIT_POLICY", None)
        cmd = [sys.executable, os.path.abspath(__file__), "--nets", ",".join(nets), "--rounds", str(rounds),
               "--configs", "eager,fastconv"] + (["--threads", str(threads)] if threads else [])
        print(f"== {label}", flush=True)
        out = subprocess.run(cmd, env=env, capture_output=True, text=True)
        print(out.stdout, out.stderr[-2000:] if out.returncode else "", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
