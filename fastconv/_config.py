"""Library-wide settings: the workspace budget of algorithms that need scratch memory.

Algorithms that build temporary buffers (im2col's column matrix, FFT spectra) tile their work so
the scratch memory of one call stays under this budget.  The budget can be set library-wide with
:func:`set_workspace_limit` or per call with ``workspace_limit=`` on :func:`fastconv.conv2d` and
:func:`fastconv.conv2d_backward`.
"""
from __future__ import annotations

import numpy as np

DEFAULT_WORKSPACE_LIMIT = 64 * 1024 * 1024
_workspace_limit = DEFAULT_WORKSPACE_LIMIT


def check_workspace_limit(fn, value):
    """Validate a workspace budget in bytes (a positive int)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{fn}: workspace_limit must be an int number of bytes, got {value!r}")
    if value < 1:
        raise ValueError(f"{fn}: workspace_limit must be positive (bytes), got {value}")
    return int(value)


def set_workspace_limit(nbytes):
    """Set the library-wide scratch-memory budget of one convolution call, in bytes.

    Parameters
    ----------
    nbytes : int
        Positive number of bytes; the default is 64 MiB.  Results do not depend on it, only
        speed and peak memory do.

    Returns
    -------
    int
        The previous limit.

    Examples
    --------
    >>> import fastconv
    >>> old = fastconv.set_workspace_limit(16 * 2**20)
    >>> fastconv.get_workspace_limit()
    16777216
    >>> _ = fastconv.set_workspace_limit(old)
    """
    global _workspace_limit
    new = check_workspace_limit("set_workspace_limit", nbytes)
    old, _workspace_limit = _workspace_limit, new
    return old


def get_workspace_limit():
    """The library-wide scratch-memory budget of one convolution call, in bytes.

    Examples
    --------
    >>> import fastconv
    >>> fastconv.get_workspace_limit() > 0
    True
    """
    return _workspace_limit


def resolve_workspace_limit(fn, value):
    """The per-call budget: ``value`` if given, else the library-wide one."""
    return _workspace_limit if value is None else check_workspace_limit(fn, value)
