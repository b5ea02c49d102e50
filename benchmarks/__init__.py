"""asv benchmarks of fastconv (``asv run``, see asv.conf.json and the README's "Benchmarks" section)."""
