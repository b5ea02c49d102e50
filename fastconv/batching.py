"""Mini-batches of arrays for a training loop (PyTorch's ``DataLoader`` over in-memory arrays)."""
from __future__ import annotations

import numpy as np

__all__ = ["DataLoader"]


class DataLoader:
    """Iterate over mini-batches ``(x[idx], y[idx], ...)`` of equally long arrays, reshuffled on
    every pass when ``shuffle`` is set.

    Parameters
    ----------
    *arrays : ndarray
        Indexed together along their first axis (inputs, targets, ...).
    batch_size : int
        Samples per batch (the last one may be smaller unless ``drop_last``).
    shuffle : bool
        Draw a new order for every pass over the data.
    drop_last : bool
        Skip a last batch smaller than ``batch_size``.
    rng : None, int or numpy.random.Generator
        Source of the shuffling.

    Examples
    --------
    >>> import numpy as np
    >>> x, y = np.arange(10.0).reshape(5, 2), np.arange(5)
    >>> loader = DataLoader(x, y, batch_size=2, shuffle=True, rng=0)
    >>> len(loader), [len(yb) for _, yb in loader]
    (3, [2, 2, 1])
    >>> sorted(int(v) for _, yb in loader for v in yb)   # each sample once per pass
    [0, 1, 2, 3, 4]
    >>> len(DataLoader(x, y, batch_size=2, drop_last=True))
    2
    """

    def __init__(self, *arrays, batch_size=32, shuffle=False, drop_last=False, rng=None):
        fn = "DataLoader"
        if not arrays:
            raise ValueError(f"{fn}: give at least one array")
        for i, a in enumerate(arrays):
            if not hasattr(a, "shape") or len(a.shape) < 1:
                raise TypeError(f"{fn}: arrays must be numpy arrays with a sample axis, got "
                                f"{type(a).__name__} at position {i}")
        n = len(arrays[0])
        lengths = [len(a) for a in arrays]
        if any(m != n for m in lengths):
            raise ValueError(f"{fn}: arrays must have the same length, got {lengths}")
        if isinstance(batch_size, (bool, np.bool_)) or not isinstance(batch_size, (int, np.integer)):
            raise TypeError(f"{fn}: batch_size must be an int, got {batch_size!r}")
        if batch_size < 1:
            raise ValueError(f"{fn}: batch_size must be positive, got {batch_size}")
        self.arrays, self.batch_size = arrays, int(batch_size)
        self.shuffle, self.drop_last = bool(shuffle), bool(drop_last)
        self.rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)

    def __len__(self):
        n = len(self.arrays[0])
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self):
        n = len(self.arrays[0])
        order = self.rng.permutation(n) if self.shuffle else None
        for b in range(len(self)):
            sl = slice(b * self.batch_size, min((b + 1) * self.batch_size, n))
            # contiguous slices when not shuffling: views, no copies
            idx = sl if order is None else order[sl]
            yield tuple(a[idx] for a in self.arrays)
