#!/usr/bin/env python3
"""Ratios to PyTorch from a pytest-benchmark JSON file, and a check for gross regressions.

    python benchmarks/perf_report.py .benchmarks/perf.json [--factor 2.0]

Reads the output of ``python -m pytest tests/perf -m perf -n 0 --benchmark-json=FILE``: one group per
shape and pass, with every algorithm, ``auto`` and ``torch`` (NCHW) and ``torch-cl`` (channels_last) in
it.  Prints, for each group, each contestant's median, GFLOP/s and speed relative to PyTorch's faster
layout in that group (above 1: faster than PyTorch at its best; a group with one of them uses it).

Exit status 1 only on a gross regression measured inside this one run: ``auto`` more than
``--factor`` times slower than the best explicit algorithm on a shape (or, with
``--torch-factor F``, any fastconv contestant more than F times slower than PyTorch).  Both sides of
each comparison ran in the same process minutes apart, so the check holds on a noisy shared machine
where a baseline stored from another run would not.  ``auto`` is judged by ``test_auto_choice``,
which times it interleaved with every algorithm round by round and records the ratio of the fastest
rounds (without those entries: by the groups' minimum times).  The printed figures are medians.
Exit status 2: unreadable input.
"""
import argparse
import json
import math
import sys

#: PyTorch's contestants: NCHW tensors and channels_last ones; ratios are against the faster.
TORCH = ("torch", "torch-cl")


def load(path):
    """``({group: {contestant: benchmark}}, [auto-choice benchmark], machine_info)`` from a
    pytest-benchmark JSON file; auto-choice entries are those whose extra_info has ``auto_over_best``."""
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    groups, choices = {}, []
    for bm in data.get("benchmarks", []):
        info = bm.get("extra_info", {})
        if "auto_over_best" in info:
            choices.append(bm)
            continue
        name = info.get("contestant") or bm.get("param") or bm["name"]
        groups.setdefault(bm.get("group") or bm["name"], {})[name] = bm
    return groups, choices, data.get("machine_info", {})


def report(groups, choices=(), factor=2.0, torch_factor=None):
    """Text lines of the report and the list of regressions found.

    ``auto`` is checked with the interleaved auto-choice measurements where the run has them (they
    are robust to load), else with the minimum times of the per-shape groups.
    """
    lines, problems, ratios = [], [], {}
    for group, members in groups.items():
        lines.append(group)
        # the faster PyTorch layout of this group (by median) is the reference
        ref_name = min((n for n in TORCH if n in members), key=lambda n: members[n]["stats"]["median"],
                       default=None)
        ref = members.get(ref_name)
        for name, bm in members.items():
            med = bm["stats"]["median"]
            gf = bm.get("extra_info", {}).get("gflops", float("nan"))
            vs = f"x{ref['stats']['median'] / med:5.2f} vs {ref_name}" if ref else ""
            lines.append(f"  {name:10} {1e3 * med:10.3f} ms {gf:8.1f} GFLOP/s  {vs}")
            if ref and name not in TORCH:
                ratios.setdefault(name, []).append(ref["stats"]["median"] / med)
        explicit = {n: bm["stats"]["min"] for n, bm in members.items() if n != "auto" and n not in TORCH}
        if "auto" in members and explicit and not choices:
            best = min(explicit, key=explicit.get)
            over = members["auto"]["stats"]["min"] / explicit[best]
            if over > factor:
                problems.append(f"{group}: auto is {over:.2f}x slower than {best} (limit {factor}x)")
        if torch_factor and ref:
            t_ref = min(members[n]["stats"]["min"] for n in TORCH if n in members)
            for n, bm in members.items():
                if n not in TORCH:
                    over = bm["stats"]["min"] / t_ref
                    if over > torch_factor:
                        problems.append(f"{group}: {n} is {over:.2f}x slower than torch (limit {torch_factor}x)")
    if choices:
        lines.append("auto over the best algorithm, timed interleaved (1.00 = auto chose the best)")
    for bm in choices:
        info = bm["extra_info"]
        lines.append(f"  {info.get('shape', bm['name']):20} {info.get('pass_', ''):9} "
                     f"x{info['auto_over_best']:5.2f} of {info.get('best', '?')}")
        if info["auto_over_best"] > factor:
            problems.append(f"{info.get('shape', bm['name'])} {info.get('pass_', '')}: auto is "
                            f"{info['auto_over_best']:.2f}x slower than {info.get('best', '?')} (limit {factor}x)")
    for name, v in ratios.items():
        gm = math.exp(sum(map(math.log, v)) / len(v))
        lines.append(f"{name}: geometric-mean speed vs torch x{gm:.2f} over {len(v)} groups "
                     "(each against the faster of torch and torch-cl)")
    return lines, problems


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("json", help="pytest-benchmark JSON (--benchmark-json=FILE)")
    p.add_argument("--factor", type=float, default=2.0,
                   help="fail when auto is more than this many times slower than the best algorithm (2.0)")
    p.add_argument("--torch-factor", type=float, default=None,
                   help="also fail when a fastconv contestant is this many times slower than torch (off)")
    a = p.parse_args(argv)
    try:
        groups, choices, machine = load(a.json)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        print(f"perf_report: json must be a pytest-benchmark JSON file, got {a.json!r} ({exc})", file=sys.stderr)
        return 2
    if not groups and not choices:
        print(f"perf_report: json must hold benchmarks, got none in {a.json!r}", file=sys.stderr)
        return 2
    lines, problems = report(groups, choices, a.factor, a.torch_factor)
    cpu = machine.get("cpu", {}).get("brand_raw", machine.get("machine", "?"))
    print(f"{len(groups)} groups, {len(choices)} auto-choice checks, on {cpu}")
    print("\n".join(lines))
    if problems:
        print("\nGROSS REGRESSIONS:\n  " + "\n  ".join(problems))
        return 1
    print(f"\nno gross regressions (auto within {a.factor}x of the best algorithm in every group)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
