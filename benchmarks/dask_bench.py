"""fastconv on Dask: in-memory vs a LocalCluster of 1 and of 2 worker processes.

Three workloads:

* a large image batch chunked spatially through a 3-layer conv stack (3->16->16->8 channels, 3x3,
  'same', ReLU between), reduced to per-channel means so only a small result comes back: once as
  chained ops (``fastconv.dask.conv2d``/``relu``, a task per layer and block) and once as a model run
  tile by tile (``fastconv.dask.predict``, a task per tile running every layer);
* a big batch through the LeNet of ``fastconv train`` (``fastconv.dask.predict``).

Three clusters of worker processes, one worker thread each: 1 worker with all the cores as fastconv
threads, 1 worker with 1 thread, and one worker per core with 1 thread each; "scaling" is the last
against the second (the same per-worker resources, more workers).  For each: wall time (median of
``--repeat`` runs; the input is persisted on the workers first, so the time is the computation), peak
resident memory per worker process above its level before that workload's runs (the persisted
input excluded: what the computation holds), and the scheduling overhead of
the 1-worker 1-thread cluster: its wall time minus the compute time its tasks report (the task
stream), as a share of that compute time, over all the runs.

Usage::

    python benchmarks/dask_bench.py                      # 2 x 3 x 4096^2 in chunks of 1024^2
    python benchmarks/dask_bench.py --size 4096 --batch 8 --chunk 1024   # the issue's image

The in-memory call uses all cores.
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import time

import numpy as np


def _peak_rss_mb():
    """This process's peak RSS (the client's: it was not forked from a bigger process)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _worker_rss_mb(dask_worker, since=None):
    """A worker's largest RSS sampled by its system monitor (every 0.5 s) since ``since``, or now.

    Not ru_maxrss: a worker process is started from a fork of the client and inherits its peak.
    """
    mon = dask_worker.monitor
    if since is None:
        return mon.proc.memory_info().rss / 2**20
    samples = [m for t, m in zip(mon.quantities["time"], mon.quantities["memory"]) if t >= since]
    return max(samples + [mon.proc.memory_info().rss]) / 2**20


def _stack(rng, dtype=np.float32):
    ws = []
    for cin, cout in ((3, 16), (16, 16), (16, 8)):
        bound = 1 / np.sqrt(cin * 9)
        ws.append((rng.uniform(-bound, bound, (cout, cin, 3, 3)).astype(dtype),
                   rng.uniform(-bound, bound, cout).astype(dtype)))
    return ws


def stack_numpy(x, ws):
    import fastconv
    for i, (w, b) in enumerate(ws):
        x = fastconv.conv2d(x, w, b, padding="same")
        if i < len(ws) - 1:
            x = fastconv.relu(x)
    return x.mean(axis=(2, 3))


def stack_dask(x, ws):
    import fastconv.dask as fd
    for i, (w, b) in enumerate(ws):
        x = fd.conv2d(x, w, b, padding="same")
        if i < len(ws) - 1:
            x = fd.relu(x)
    return x.mean(axis=(2, 3))


def stack_model(ws):
    """The conv stack as a fastconv Sequential (for ``fastconv.dask.predict``)."""
    from fastconv.layers import Conv2d, ReLU, Sequential
    layers = []
    for i, (w, b) in enumerate(ws):
        conv = Conv2d(w.shape[1], w.shape[0], w.shape[2:], padding="same")
        conv.weight.data[...], conv.bias.data[...] = w, b
        layers += [conv] + ([ReLU()] if i < len(ws) - 1 else [])
    return Sequential(*layers)


def _median_time(f, repeat, times=None):
    """Median wall time of ``repeat`` calls and the last result; each call's time is appended to
    ``times`` if given."""
    times = [] if times is None else times
    out = None
    for _ in range(repeat):
        t = time.perf_counter()
        out = f()
        times.append(time.perf_counter() - t)
    return statistics.median(times[-repeat:]), out


def run_cluster(workers, threads, args, x_np, ws, lenet, xl_np):
    from distributed import Client, LocalCluster, wait

    import fastconv.dask as fd

    t0 = time.perf_counter()
    with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster, \
            Client(cluster) as client:
        startup = time.perf_counter() - t0
        threads = fd.setup_workers(client, threads=threads)
        idle = client.run(_worker_rss_mb)  # imports done, no data yet
        x = client.persist(x_np)  # generated on the workers, chunk by chunk
        xl = client.persist(xl_np)
        wait([x, xl])
        # warm-up on blocks of the timed shapes: every worker loads the kernels it will use from
        # numba's cache (or compiles them) outside the timings
        c2 = min(2 * args.chunk, args.size)
        stack_dask(x[:1, :, :c2, :c2], ws).compute()
        fd.predict(lenet, xl[: args.lenet_chunk * workers]).compute()
        fd.predict(stack_model(ws), x[:1, :, :c2, :c2]).mean(axis=(2, 3)).compute()
        res = {"startup": startup, "threads": threads, "peak_mb": {}}
        from distributed import get_task_stream
        for key, graph in (("stack", stack_dask(x, ws)),
                           ("tiles", fd.predict(stack_model(ws), x).mean(axis=(2, 3))),
                           ("lenet", fd.predict(lenet, xl))):
            res["tasks_" + key] = len(graph.__dask_graph__())
            level, since = client.run(_worker_rss_mb), time.time()
            walls = []
            with get_task_stream(client) as ts:
                res[key], res[key + "_out"] = _median_time(lambda: graph.compute(), args.repeat, walls)
            # totals over the runs, both: a slow first run moves a mean but not the median
            res[key + "_wall_total"], res[key + "_compute"] = sum(walls), _compute_seconds(ts.data)
            time.sleep(0.6)  # one more sample of the workers' monitors
            peak = client.run(_worker_rss_mb, since=since)
            res["peak_mb"][key] = max(peak[w] - level[w] for w in peak)
        res["idle_mb"] = idle
    return res


def _compute_seconds(stream):
    return sum(s["stop"] - s["start"] for t in stream for s in t["startstops"] if s["action"] == "compute")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", type=int, default=4096, help="image height and width (default 4096)")
    p.add_argument("--batch", type=int, default=2, help="images in the batch (default 2)")
    p.add_argument("--chunk", type=int, default=1024, help="spatial chunk (default 1024)")
    p.add_argument("--lenet-batch", type=int, default=16384, help="28x28 images through LeNet (default 16384)")
    p.add_argument("--lenet-chunk", type=int, default=1024, help="images per LeNet task (default 1024)")
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args(argv)

    import fastconv
    from fastconv.train import build_model

    import dask.array as da

    rng = np.random.default_rng(0)
    ws = _stack(rng)
    lenet = build_model((1, 28, 28), rng=0)
    # lazy inputs, generated where they are used: the same values in memory and on the workers
    x_d = da.random.RandomState(1).standard_normal((args.batch, 3, args.size, args.size),
                                                   chunks=(1, 3, args.chunk, args.chunk)).astype(np.float32)
    xl_d = da.random.RandomState(2).standard_normal((args.lenet_batch, 1, 28, 28),
                                                    chunks=(args.lenet_chunk, 1, 28, 28)).astype(np.float32)
    x_np, xl_np = x_d.compute(scheduler="sync"), xl_d.compute(scheduler="sync")
    print(f"image batch {x_np.shape} ({x_np.nbytes / 2**20:.0f} MiB), chunks of {args.chunk}x{args.chunk}; "
          f"LeNet batch {xl_np.shape}, {args.lenet_chunk} per task; fastconv threads in memory: "
          f"{fastconv.get_num_threads()}", flush=True)

    stack_numpy(x_np[:, :, :64, :64], ws)  # warm-up (kernels from numba's cache)
    lenet(xl_np[:8])
    mem = {}
    before = _peak_rss_mb()
    mem["stack"], ref_stack = _median_time(lambda: stack_numpy(x_np, ws), args.repeat)
    mem["tiles"] = mem["stack"]
    mem["lenet"], ref_lenet = _median_time(lambda: lenet(xl_np), args.repeat)
    mem["peak_mb"] = _peak_rss_mb() - before
    cores = len(os.sched_getaffinity(0))
    configs = {"1w x all": (1, cores), "1w x 1": (1, 1), f"{cores}w x 1": (cores, 1)}
    results = {}
    for label, (workers, threads) in configs.items():
        results[label] = r = run_cluster(workers, threads, args, x_d, ws, lenet, xl_d)
        np.testing.assert_allclose(r["stack_out"], ref_stack, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(r["tiles_out"], ref_stack, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(r["lenet_out"], ref_lenet, rtol=1e-4, atol=1e-4)
        print(f"  {label}: {workers} worker(s) up in {r['startup']:.1f}s, fastconv threads "
              f"{sorted(r['threads'].values())}", flush=True)
    # the in-memory figures once more, after the clusters: the machine's load drifts
    t2, _ = _median_time(lambda: stack_numpy(x_np, ws), args.repeat)
    l2, _ = _median_time(lambda: lenet(xl_np), args.repeat)

    many = f"{cores}w x 1"
    print(f"\n{'wall time (s)':24s}{'in memory':>12s}" + "".join(f"{k:>11s}" for k in configs)
          + f"{'scaling':>9s}")
    rows = (("stack", "conv stack, ops"), ("tiles", "conv stack, tiles"), ("lenet", "LeNet predict"))
    for key, label in rows:
        mem_t = f"{mem[key]:.2f}/{(t2 if key != 'lenet' else l2):.2f}"
        print(f"{label:24s}{mem_t:>12s}" + "".join(f"{results[k][key]:11.2f}" for k in configs)
              + f"{results['1w x 1'][key] / results[many][key]:8.2f}x")
    print(f"\npeak MiB above the level before the runs, per process (in memory: peak RSS {mem['peak_mb'] + before:.0f},"
          f" {before:.0f} before the runs; an idle worker after imports: "
          f"{max(results[many]['idle_mb'].values()):.0f})")
    for key, label in rows:
        print(f"{label:36s}" + "".join(f"{results[k]['peak_mb'][key]:11.0f}" for k in configs))
    for key, _ in rows:
        r = results["1w x 1"]
        wall, comp = r[key + "_wall_total"], r[key + "_compute"]
        print(f"scheduling overhead, 1 worker x 1 thread, {key}: {r['tasks_' + key]} tasks, wall {wall:.2f}s "
              f"({args.repeat} runs), task compute {comp:.2f}s -> {100 * (wall - comp) / comp:.0f}% of compute")


if __name__ == "__main__":
    main()
