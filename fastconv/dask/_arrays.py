"""fastconv's array ops on dask arrays chunked over the batch and over ``H`` and ``W``: each output
block from the input blocks its windows' halo reaches (see :mod:`fastconv.dask` for the notation).
"""
from __future__ import annotations

import math
import operator
import threading

import dask.array as da
import numpy as np
from dask.base import tokenize
from dask.highlevelgraph import HighLevelGraph

from .. import _validation as V
from .. import functional as F


# --------------------------------------------------------------------------- inputs
def _as_dask(fn, x, ndim=4, name="input"):
    """A float32/float64 dask array of ``ndim`` dims (a NumPy array becomes one chunk)."""
    if isinstance(x, np.ndarray):
        x = da.from_array(x, chunks=x.shape)
    if not isinstance(x, da.Array):
        raise TypeError(f"{fn}: {name} must be a dask.array.Array or numpy.ndarray, got {type(x).__name__}")
    if x.dtype not in V.FLOAT_DTYPES:
        raise TypeError(f"{fn}: {name} must have dtype float32 or float64, got {x.dtype}")
    if ndim is not None and x.ndim != ndim:
        raise ValueError(f"{fn}: {name} must be {ndim}-D, got {x.ndim}-D array of shape {x.shape}")
    if any(math.isnan(d) for c in x.chunks for d in c):
        raise ValueError(f"{fn}: {name} must have known chunk sizes, got {x.chunks} "
                         f"(call compute_chunk_sizes() first)")
    return x


def _meta(dtype, ndim=4):
    return np.empty((0,) * ndim, dtype=dtype)


# --------------------------------------------------------------------------- halo plans
def _bounds(chunks):
    b = [0]
    for c in chunks:
        b.append(b[-1] + c)
    return b


def _pieces(bounds, start, stop):
    """``[(block, slice within the block), ...]`` covering input rows ``[start, stop)``."""
    out = []
    for j in range(len(bounds) - 1):
        lo, hi = max(start, bounds[j]), min(stop, bounds[j + 1])
        if lo < hi:
            out.append((j, slice(lo - bounds[j], hi - bounds[j])))
    if not out:  # windows wholly inside a convolution's padding: an empty slice of the nearest block
        at = min(max(start, 0), bounds[-1] - 1)
        j = next(j for j in range(len(bounds) - 1) if bounds[j] <= at < bounds[j + 1])
        out.append((j, slice(0, 0)))
    return out


def _output_blocks(bounds, size, s, p0, out):
    """Output blocks ``[(o0, o1), ...]``: output ``i`` goes with the input block holding the first row
    of its window (clipped to the input), so an output block is about an input block over the stride;
    input blocks that hold no window start (halo only, or chunks smaller than the stride) get none."""
    owner = []
    j = 0
    for i in range(out):
        a = min(max(i * s - p0, 0), size - 1)
        while a >= bounds[j + 1]:
            j += 1
        owner.append(j)
    blocks, o0 = [], 0
    for i in range(1, out + 1):
        if i == out or owner[i] != owner[o0]:
            blocks.append((o0, i))
            o0 = i
    return blocks


def _plan(chunks, size, s, p0, e, out, own_padding, blocks=None):
    """Per output block along one axis: ``(o0, o1, pieces, local)``; the output blocks are
    :func:`_output_blocks`' unless given as ``blocks = [(o0, o1), ...]``.

    ``own_padding=False`` (convolution): the block reads rows ``[o0*s - p0, (o1-1)*s - p0 + e)``,
    the part outside the input is padded with explicit zeros (``local = (lead, trail)``) and the
    block is convolved without padding -- the same zeros the whole-array call pads with.

    ``own_padding=True`` (pooling, whose padding is -inf or changes the divisor): blocks whose windows
    stay inside the input read exactly those rows with no padding; a block whose windows reach past
    an edge reads from that edge and is pooled with the operation's own padding ``p0``, aligned so
    that its local outputs are whole-array outputs: from row 0 (local output ``j`` = output ``j``),
    or, at the far edge only, from row ``i0*s`` with ``i0 = o0 - ceil(p0/s)`` (local output ``j`` =
    output ``i0 + j``, the windows of the first ``o0 - i0`` touching the false leading padding are
    dropped).  ``local = (padding, first kept local output)``.
    """
    bounds = _bounds(chunks)
    plan = []
    for o0, o1 in blocks or _output_blocks(bounds, size, s, p0, out):
        lo, hi = o0 * s - p0, (o1 - 1) * s - p0 + e
        if not own_padding:  # (a block of windows wholly in the padding reads no row)
            start = min(max(lo, 0), size)
            stop = start + max(0, min(hi, size) - max(lo, 0))
            local = (max(0, min(hi, 0) - lo), max(0, hi - max(lo, size)))
        elif lo >= 0 and hi <= size:
            start, stop, local = lo, hi, (0, 0)
        else:
            stop = size if hi > size else hi
            i0 = o0 - -(-p0 // s)
            if lo < 0 or i0 < 0:
                start, skip = 0, o0
            else:
                start, skip = i0 * s, o0 - i0
            local = (p0, skip)
        plan.append((o0, o1, _pieces(bounds, start, stop), local))
    return plan


_scratch = threading.local()


def _scratch_array(shape, dtype):
    """An uninitialised array in this thread's assembly buffer, grown to the largest block seen.

    A block with its halo is a temporary of a block's size: fresh, it is page-faulted on every task
    (malloc maps anything over 32 MiB afresh), 5 of the 8.5 ms of assembling a 16 x 1026 x 1026
    float32 block here.  The caller must not return it or keep it past the task (each op's result
    is a new array, never a view of its input); the buffer stays with the thread, one block's worth.
    """
    n = math.prod(shape) * np.dtype(dtype).itemsize
    buf = getattr(_scratch, "buf", None)
    if buf is None or buf.nbytes < n:
        buf = _scratch.buf = None  # free the old buffer before the bigger one is mapped
        buf = _scratch.buf = np.empty(n, np.uint8)
    return buf[:n].view(dtype).reshape(shape)


def _assemble(parts, hpad=(0, 0), wpad=(0, 0)):
    """One contiguous array from a 2-D list of blocks (rows of H pieces, each a list of W pieces),
    with ``hpad``/``wpad`` rows/columns of zeros around it: one copy of each piece (concatenating
    rows, then columns, then padding copied a block three times; measured here, 1.2 s of copying
    against 2.2 s of convolution for 32 blocks of 16 x 258 x 258), into this thread's scratch
    buffer (:func:`_scratch_array`): the result is valid until the thread's next ``_assemble``.
    """
    if len(parts) == 1 and len(parts[0]) == 1 and not any(hpad) and not any(wpad):
        return parts[0][0]
    first = parts[0][0]
    hs = [r[0].shape[2] for r in parts]
    ws = [b.shape[3] for b in parts[0]]
    out = _scratch_array(first.shape[:2] + (hpad[0] + sum(hs) + hpad[1], wpad[0] + sum(ws) + wpad[1]),
                         first.dtype)
    if any(hpad) or any(wpad):
        out[:, :, :hpad[0]] = 0
        out[:, :, out.shape[2] - hpad[1]:] = 0
        out[:, :, :, :wpad[0]] = 0
        out[:, :, :, out.shape[3] - wpad[1]:] = 0
    i = hpad[0]
    for row, dh in zip(parts, hs):
        j = wpad[0]
        for b, dw in zip(row, ws):
            out[:, :, i:i + dh, j:j + dw] = b
            j += dw
        i += dh
    return out


def _piece(x, key, sh, sw, dsk, name):
    """The key of rows ``sh`` and columns ``sw`` of block ``key`` of ``x``: the block's own key if
    all of it, else a task of its own added to ``dsk`` (named halo-``name``), so that the slice is
    cut where the block lives and only the halo travels to another worker (inside the consuming
    task, dask moved whole neighbouring blocks: 64 MB each for a 1024 x 1024 x 16 block)."""
    if sh.stop - sh.start == x.chunks[2][key[3]] and sw.stop - sw.start == x.chunks[3][key[4]]:
        return key
    k = (f"halo-{name}",) + tuple(key[1:]) + (sh.start, sh.stop, sw.start, sw.stop)
    dsk[k] = (operator.getitem, key, (slice(None), slice(None), sh, sw))
    return k


def _windowed(fn, x, op, plan_h, plan_w, c_blocks, c_chunks, extra_keys, extra_dsk, token):
    """Graph of one task per output block (batch block x channel block x H block x W block): the
    pieces of the input blocks its halo reaches, assembled and passed to ``op``."""
    name = f"{fn}-{token}"
    dsk = dict(extra_dsk)
    for bn in range(len(x.chunks[0])):
        for bo, bc in enumerate(c_blocks):
            for i, (_, _, hpieces, hlocal) in enumerate(plan_h):
                for j, (_, _, wpieces, wlocal) in enumerate(plan_w):
                    parts = [[_piece(x, (x.name, bn, bc, ih, iw), sh, sw, dsk, name) for iw, sw in wpieces]
                             for ih, sh in hpieces]
                    dsk[(name, bn, bo, i, j)] = (op, parts, hlocal, wlocal) + tuple(extra_keys)
    chunks = (x.chunks[0], c_chunks, tuple(b[1] - b[0] for b in plan_h), tuple(b[1] - b[0] for b in plan_w))
    graph = HighLevelGraph.from_collections(name, dsk, dependencies=[x])
    return da.Array(graph, name, chunks, meta=_meta(x.dtype))


class _ConvBlock:
    """Convolution of one output block (a class, not a tuple of arguments: dask would run a tuple
    that starts with a function as a task)."""

    def __init__(self, stride, dilation, groups, algorithm):
        self.stride, self.dilation, self.groups, self.algorithm = stride, dilation, groups, algorithm

    def __call__(self, parts, hlocal, wlocal, weight, bias=None):
        x = _assemble(parts, hlocal, wlocal)
        return F.conv2d(x, weight, bias, self.stride, 0, self.dilation, self.groups, algorithm=self.algorithm)


class _PoolBlock:
    """Max or average pooling of one output block; per axis ``(padding, first kept local output,
    output count)`` (see :func:`_plan`, ``own_padding=True``)."""

    def __init__(self, kind, kernel_size, stride, dilation, ceil_mode, count_include_pad):
        self.kind, self.kernel_size, self.stride, self.dilation = kind, kernel_size, stride, dilation
        self.ceil_mode, self.count_include_pad = ceil_mode, count_include_pad

    def __call__(self, parts, hlocal, wlocal):
        return self.pool(_assemble(parts), hlocal, wlocal)

    def pool(self, x, hlocal, wlocal):
        """The block's outputs from its assembled input ``x`` (also a layer of a tile's model)."""
        (ph, h0, nh), (pw, w0, nw) = hlocal, wlocal
        if self.kind == "max":
            y = F.max_pool2d(x, self.kernel_size, self.stride, (ph, pw), self.dilation, self.ceil_mode)
        else:
            y = F.avg_pool2d(x, self.kernel_size, self.stride, (ph, pw), self.ceil_mode, self.count_include_pad)
        if (h0, w0, nh, nw) == (0, 0) + y.shape[2:]:
            return y
        return np.ascontiguousarray(y[:, :, h0:h0 + nh, w0:w0 + nw])


# --------------------------------------------------------------------------- ops
def conv2d(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, *, algorithm="auto"):
    """2-D convolution of a dask array, chunked over the batch and over ``H`` and ``W``.

    Same arguments and result as :func:`fastconv.conv2d`; ``weight`` and ``bias`` are NumPy arrays
    (stored once in the graph).  The channel axis is rechunked to one chunk; the output has the
    input's batch chunks, one channel chunk, and spatial chunks of about (input chunk / stride).

    Parameters
    ----------
    x : dask.array.Array or numpy.ndarray, shape (N, C, H, W), float32 or float64
    weight, bias, stride, padding, dilation, groups, algorithm
        As :func:`fastconv.conv2d`.

    Returns
    -------
    y : dask.array.Array, shape (N, K, OH, OW), lazy

    Notes
    -----
    Each output block reads its own input rows plus a halo of ``dilation*(R-1)`` rows (``S``
    likewise) from as many neighbouring blocks as that takes, pads with zeros only where the
    whole-array call pads, and is convolved with ``padding=0``.  With ``algorithm='direct'`` the
    result is bitwise the in-memory result; other algorithms agree within their stated error.

    Examples
    --------
    >>> import numpy as np, dask.array as da, fastconv, fastconv.dask as fd
    >>> x = np.random.default_rng(0).standard_normal((2, 3, 20, 20)).astype(np.float32)
    >>> w = np.ones((4, 3, 3, 3), np.float32)
    >>> y = fd.conv2d(da.from_array(x, chunks=(1, 3, 7, 6)), w, padding=1, algorithm="direct")
    >>> y.shape, y.dtype
    ((2, 4, 20, 20), dtype('float32'))
    >>> bool((y.compute(scheduler="sync") == fastconv.conv2d(x, w, padding=1, algorithm="direct")).all())
    True
    """
    fn = "fastconv.dask.conv2d"
    x = _as_dask(fn, x)
    weight = V.as_float_array(fn, "weight", weight, 4, x.dtype)
    if bias is not None:
        bias = V.as_float_array(fn, "bias", bias, 1, x.dtype)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"{fn}: bias must have shape ({weight.shape[0]},) (out channels), got {bias.shape}")
    # validated as fastconv.conv2d validates, for an empty batch: no memory check for the whole image
    p = V.conv_params(fn, (0,) + x.shape[1:], weight.shape, x.dtype, stride, padding, dilation, groups)
    if not isinstance(algorithm, str):
        raise TypeError(f"{fn}: algorithm must be a str, got {type(algorithm).__name__}")
    F.conv2d(np.zeros((0,) + x.shape[1:], x.dtype), weight, bias, stride, padding, dilation, groups,
             algorithm=algorithm)  # an unknown algorithm, or one that cannot serve the case, raises here
    x = x.rechunk({1: -1})
    plan_h = _plan(x.chunks[2], p.h, p.sh, p.ph0, p.dh * (p.r - 1) + 1, p.oh, False)
    plan_w = _plan(x.chunks[3], p.w, p.sw, p.pw0, p.dw * (p.s - 1) + 1, p.ow, False)
    token = tokenize(x.name, weight, bias, p, algorithm)
    wkey = f"fastconv-weight-{tokenize(weight)}"
    extra = {wkey: weight}
    keys = [wkey]
    if bias is not None:
        bkey = f"fastconv-bias-{tokenize(bias)}"
        extra[bkey] = bias
        keys.append(bkey)
    op = _ConvBlock((p.sh, p.sw), (p.dh, p.dw), p.g, algorithm)
    return _windowed("fastconv-conv2d", x, op, plan_h, plan_w, [0], (p.k,), keys, extra, token)


def _pool(fn, kind, x, kernel_size, stride, padding, dilation, ceil_mode, count_include_pad):
    x = _as_dask(fn, x)
    p = V.pool_params(fn, (0,) + x.shape[1:], kernel_size, stride, padding, dilation, ceil_mode)
    count_include_pad = V._bool(fn, "count_include_pad", count_include_pad)
    plan_h = _plan(x.chunks[2], p.h, p.sh, p.ph, p.dh * (p.kh - 1) + 1, p.oh, True)
    plan_w = _plan(x.chunks[3], p.w, p.sw, p.pw, p.dw * (p.kw - 1) + 1, p.ow, True)
    op = _PoolBlock(kind, (p.kh, p.kw), (p.sh, p.sw), (p.dh, p.dw), V._bool(fn, "ceil_mode", ceil_mode),
                    count_include_pad)
    # each task also carries its block's output count per axis
    plan_h = [(o0, o1, pieces, local + (o1 - o0,)) for o0, o1, pieces, local in plan_h]
    plan_w = [(o0, o1, pieces, local + (o1 - o0,)) for o0, o1, pieces, local in plan_w]
    token = tokenize(x.name, kind, p, ceil_mode, count_include_pad)
    return _windowed(f"fastconv-{kind}-pool2d", x, op, plan_h, plan_w, range(len(x.chunks[1])), x.chunks[1],
                     [], {}, token)


def max_pool2d(x, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False):
    """2-D max pooling of a dask array chunked over the batch, channels, ``H`` and ``W``.

    Same arguments and (bitwise) result as :func:`fastconv.max_pool2d` (``return_indices`` is not
    offered: indices into a chunked plane would need a global offset per block).

    Examples
    --------
    >>> import numpy as np, dask.array as da, fastconv, fastconv.dask as fd
    >>> x = np.random.default_rng(0).standard_normal((2, 3, 11, 9))
    >>> y = fd.max_pool2d(da.from_array(x, chunks=(1, 2, 4, 5)), 3, stride=2, padding=1, ceil_mode=True)
    >>> bool((y.compute(scheduler="sync") == fastconv.max_pool2d(x, 3, 2, 1, ceil_mode=True)).all())
    True
    """
    return _pool("fastconv.dask.max_pool2d", "max", x, kernel_size, stride, padding, dilation, ceil_mode, True)


def avg_pool2d(x, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True):
    """2-D average pooling of a dask array chunked over the batch, channels, ``H`` and ``W``.

    Same arguments and (bitwise) result as :func:`fastconv.avg_pool2d`.

    Examples
    --------
    >>> import numpy as np, dask.array as da, fastconv, fastconv.dask as fd
    >>> x = np.random.default_rng(0).standard_normal((1, 2, 10, 10))
    >>> y = fd.avg_pool2d(da.from_array(x, chunks=(1, 1, 3, 4)), 3, 2, 1, count_include_pad=False)
    >>> bool((y.compute(scheduler="sync") == fastconv.avg_pool2d(x, 3, 2, 1, count_include_pad=False)).all())
    True
    """
    return _pool("fastconv.dask.avg_pool2d", "avg", x, kernel_size, stride, padding, 1, ceil_mode,
                 count_include_pad)


def relu(x):
    """:func:`fastconv.relu` block by block on a dask array of any shape and chunking.

    Examples
    --------
    >>> import numpy as np, dask.array as da, fastconv.dask as fd
    >>> fd.relu(da.from_array(np.array([-1.0, 0.0, 2.0]), chunks=2)).compute(scheduler="sync")
    array([0., 0., 2.])
    """
    x = _as_dask("fastconv.dask.relu", x, ndim=None)
    return x.map_blocks(F.relu, dtype=x.dtype, meta=_meta(x.dtype, x.ndim))

