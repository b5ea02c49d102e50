"""Command line: ``python -m fastconv {bench,train} ...`` (also the ``fastconv`` console script).

Each subcommand lives in its own module with a ``main(argv)`` function; this file only routes.
"""
import importlib
import sys

COMMANDS = {
    "bench": ("fastconv.bench", "benchmark the public shape suite against PyTorch / NumPy"),
    "train": ("fastconv.train", "train a small CNN on the bundled digits (or MNIST IDX files)"),
    "doctor": ("fastconv.doctor", "report the JIT cache, threads, CPU, BLAS and versions (for bug reports)"),
}


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        lines = [f"  {name:6} {doc}" for name, (_, doc) in COMMANDS.items()]
        print("usage: python -m fastconv {" + ",".join(COMMANDS) + "} [options]\n\n" + "\n".join(lines))
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    module = importlib.import_module(COMMANDS[argv[0]][0])
    return module.main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
