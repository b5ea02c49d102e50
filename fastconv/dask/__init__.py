"""fastconv on Dask: images larger than memory, big batches, data-parallel training.

An optional extra (``pip install "fastconv[dask]"``); ``import fastconv`` never imports Dask.

* :func:`conv2d`, :func:`max_pool2d`, :func:`avg_pool2d`, :func:`relu` take dask arrays chunked over
  the batch **and** over ``H`` and ``W``.  Each output block is computed from the input rows and
  columns its windows read (the block's own rows plus a halo of ``dilation*(kernel-1)`` beyond them,
  gathered from as many neighbouring input blocks as needed, so chunks smaller than the kernel work),
  and output blocks start at window positions, so any stride is aligned.  Results equal the
  in-memory call: bitwise with ``algorithm='direct'`` and for the pools, within the algorithm's
  error otherwise (``'auto'`` may pick different algorithms for different block shapes).
* :func:`conv_transpose2d` likewise: each output block from the input rows that reach it.
* :func:`conv2d_backward`: the input gradient chunked like the input (block by block, as a
  transposed convolution), the weight and bias gradients summed from per-block partials by a tree.
* :func:`predict` runs a whole fastconv model over a batch chunked along its first axis.
* :func:`gradients` / :func:`train_step`: data-parallel training on a ``distributed.Client``.
* :class:`FastconvThreads` / :func:`setup_workers`: numba's pool per worker sized so that workers x
  threads x numba threads <= cores.

Notation: ``s`` stride, ``p0`` the padding before the first row (column), ``e = dilation*(k-1)+1``
the window's extent; output ``i`` reads input rows ``[i*s - p0, i*s - p0 + e)``.
"""
from ._arrays import avg_pool2d, conv2d, max_pool2d, relu
from ._backward import conv2d_backward
from ._training import FastconvThreads, gradients, predict, setup_workers, train_step
from ._transpose import conv_transpose2d

__all__ = ["conv2d", "conv_transpose2d", "conv2d_backward", "max_pool2d", "avg_pool2d", "relu", "predict",
           "gradients", "train_step", "FastconvThreads", "setup_workers"]
