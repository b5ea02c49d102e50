"""Define-by-run gradients: each differentiable op records, on the tensor it returns, what its
backward pass needs, and ``loss.backward()`` walks exactly the graph that loss was computed from.

Why a tape
----------
Two forward passes build two independent graphs, so evaluating another batch between a forward
and its backward cannot change the gradients; a tensor used twice (a residual shortcut, a layer
applied twice, a concat) receives the sum of its gradients because the walk adds every path.
Nothing is cached on layers, and under :class:`no_grad` nothing is recorded at all.

Writing a new differentiable op (or a layer with its own backward)
------------------------------------------------------------------
Compute the output with NumPy or :mod:`fastconv.functional`, then hand :func:`record` the output
array, the inputs (tensors, arrays or ``None``) and a ``backward(grad_output, needs)`` function
that returns one gradient per input (``None`` where ``needs[i]`` is False or the input is not a
tensor).  ``backward`` must not modify ``grad_output``; it runs at most once, so it may reuse the
arrays it closed over.  Check :func:`is_recording` first to skip saving state when nothing will
differentiate it::

    def scale(x, factor):                      # y = factor * x
        xd = np.asarray(x)
        y = xd * factor
        if not is_recording(x):
            return Tensor(y)
        return record("ScaleBackward", y, (x,), lambda g, needs: (g * factor,))

A layer is then a :class:`fastconv.layers.Module` whose ``forward`` calls such ops; its parameters
are :class:`Parameter` attributes and ``self.training`` tells training from evaluation.

>>> import numpy as np
>>> from fastconv.autograd import Parameter, Tensor
>>> w = Parameter(np.array([1.0, 2.0]))
>>> x = Tensor(np.array([3.0, 4.0]))
>>> y = (w * x + w).sum()       # w is used twice: its gradient is x + 1
>>> y.backward()
>>> w.grad
array([4., 5.])
"""
from __future__ import annotations

import threading

import numpy as np

from . import _validation as V

__all__ = ["Tensor", "Parameter", "no_grad", "enable_grad", "is_grad_enabled", "is_recording", "record",
           "conv2d", "max_pool2d", "avg_pool2d", "relu", "linear", "reshape", "flatten", "cat", "add",
           "mul", "cross_entropy", "mse_loss"]

class _GradMode(threading.local):
    """Grad mode is per thread, as PyTorch's; the class attribute is every thread's default (a
    plain attribute read, where ``getattr(local, name, default)`` costs twice as much on every op)."""

    enabled = True


_state = _GradMode()


def is_grad_enabled():
    """Whether ops record their backward (False inside :class:`no_grad`).

    >>> is_grad_enabled()
    True
    """
    return _state.enabled


class no_grad:
    """Context manager (and decorator) in which ops record nothing: no graph, no saved arrays.

    Use it for evaluation: outputs are plain :class:`Tensor` values that cannot be differentiated,
    and layers keep no forward state, so memory is only the activations still referenced.

    >>> import numpy as np, fastconv
    >>> conv = fastconv.Conv2d(1, 2, 3, rng=0)
    >>> with fastconv.no_grad():
    ...     y = conv(np.zeros((1, 1, 5, 5), np.float32))
    >>> y.requires_grad, y.shape
    (False, (1, 2, 3, 3))
    """

    _mode = False

    def __enter__(self):
        self._prev = is_grad_enabled()
        _state.enabled = self._mode

    def __exit__(self, *exc):
        _state.enabled = self._prev
        return False

    def __call__(self, func):
        import functools

        @functools.wraps(func)
        def wrapper(*args, **kwargs):
            with type(self)():
                return func(*args, **kwargs)
        return wrapper


class enable_grad(no_grad):
    """Context manager that turns recording back on inside :class:`no_grad`.

    >>> import numpy as np
    >>> with no_grad():
    ...     with enable_grad():
    ...         print(is_grad_enabled())
    True
    """

    _mode = True


def _data(a):
    return a.data if isinstance(a, Tensor) else a


def is_recording(*inputs):
    """True when grad mode is on and an input is a tensor that requires grad: the op must record.

    >>> is_recording(Parameter(np.zeros(2))), is_recording(np.zeros(2))
    (True, False)
    """
    if not _state.enabled:
        return False
    for t in inputs:
        if isinstance(t, Tensor) and t.requires_grad:
            return True
    return False


class _Node:
    """The backward of one op: its inputs and the function that maps the output's gradient to
    theirs.  ``backward`` is None once the graph has been differentiated (its arrays released)."""

    __slots__ = ("name", "inputs", "backward")

    def __init__(self, name, inputs, backward):
        self.name, self.inputs, self.backward = name, inputs, backward


def record(name, out, inputs, backward):
    """Wrap the array ``out`` as a :class:`Tensor` that remembers how to differentiate it.

    Parameters
    ----------
    name : str
        Shown in the tensor's repr (``grad_fn=<name>``) and in errors.
    out : ndarray
        The op's output.
    inputs : sequence
        The op's inputs; tensors among them receive gradients, anything else is a constant.
    backward : callable ``(grad_output, needs) -> tuple``
        One entry per input: its gradient (same shape as the input) or None.

    Returns
    -------
    Tensor
        With a recorded backward when :func:`is_recording` holds for ``inputs``, else a constant.

    Examples
    --------
    >>> x = Parameter(np.array([1.0, -2.0]))
    >>> y = record("SquareBackward", x.data ** 2, (x,), lambda g, needs: (2 * x.data * g,))
    >>> y.sum().backward(); x.grad
    array([ 2., -4.])
    """
    if is_recording(*inputs):
        return _recorded(name, out, tuple(inputs), backward)
    return Tensor(out)


def _recorded(name, out, inputs, backward):
    """:func:`record` for an op that has just checked :func:`is_recording` itself (``inputs`` a
    tuple): the check, run again, was a tenth of the tape's cost per op on LeNet-sized layers."""
    t = Tensor(out, True)
    t._node = _Node(name, inputs, backward)
    return t


class Tensor:
    """An array and, when it was computed with gradients on, the graph that produced it.

    ``data`` is the ndarray (no copy); ``np.asarray(t)``, ``t.numpy()`` and ``t.detach()`` give the
    values without a graph.  Arithmetic (``+ - * /``, unary ``-``), ``sum``, ``mean``, ``reshape``,
    indexing and :func:`cat` are recorded; other NumPy functions on a tensor that requires grad
    raise a ``TypeError`` instead of silently dropping its gradient (take ``np.asarray(t)`` first,
    or work under :class:`no_grad`).

    >>> t = Tensor(np.array([[1.0, 2.0]]), requires_grad=True)
    >>> (t * 3).sum().backward(); t.grad
    array([[3., 3.]])
    >>> np.asarray(t), t.shape, t.dtype
    (array([[1., 2.]]), (1, 2), dtype('float64'))
    """

    __slots__ = ("data", "grad", "requires_grad", "_node", "_implicit", "__weakref__")
    __array_priority__ = 1000  # ndarray <op> Tensor defers to the Tensor's reflected op

    def __init__(self, data, requires_grad=False):
        self.data = data if isinstance(data, np.ndarray) else np.asarray(data)
        self.grad = None
        self.requires_grad = bool(requires_grad)
        self._node = None
        self._implicit = False  # an array a Module wrapped: differentiated only when asked for

    # ------------------------------------------------------------ array protocol
    def __array__(self, dtype=None, copy=None):
        if copy:
            return np.array(self.data, dtype=dtype, copy=True)
        return self.data if dtype is None else self.data.astype(dtype, copy=False)

    shape = property(lambda self: self.data.shape)
    dtype = property(lambda self: self.data.dtype)
    ndim = property(lambda self: self.data.ndim)
    size = property(lambda self: self.data.size)
    grad_fn = property(lambda self: None if self._node is None else self._node.name)
    is_leaf = property(lambda self: self._node is None)

    def __len__(self):
        return len(self.data)

    def numpy(self):
        """The values (the array itself, no copy; no graph)."""
        return self.data

    def detach(self):
        """A tensor of the same values with no graph."""
        return Tensor(self.data)

    def item(self):
        """The value of a one-element tensor as a Python number."""
        if self.data.size != 1:
            raise ValueError(f"Tensor.item: only a one-element tensor has an item, got shape {self.data.shape}")
        return self.data.item()

    def __float__(self):
        return float(self.item())

    def __int__(self):
        return int(self.item())

    def __bool__(self):
        return bool(self.data)

    def __format__(self, spec):
        return format(self.item(), spec) if self.data.size == 1 else format(str(self), spec)

    def __round__(self, ndigits=None):
        return round(self.item(), ndigits)

    def argmax(self, axis=None):
        return self.data.argmax(axis=axis)

    def __lt__(self, other):
        return self.data < _data(other)

    def __le__(self, other):
        return self.data <= _data(other)

    def __gt__(self, other):
        return self.data > _data(other)

    def __ge__(self, other):
        return self.data >= _data(other)

    __hash__ = object.__hash__  # identity; == is not element-wise (the graph walk keys on identity)

    def __repr__(self):
        body = np.array2string(self.data, separator=", ", prefix="Tensor(")
        extra = f", grad_fn=<{self._node.name}>" if self._node is not None else (
            ", requires_grad=True" if self.requires_grad else "")
        return f"Tensor({body}{extra})"

    # ------------------------------------------------------------ recorded arithmetic
    def __add__(self, other):
        return add(self, other)

    def __radd__(self, other):
        return add(other, self)

    def __sub__(self, other):
        return add(self, mul(other, -1))

    def __rsub__(self, other):
        return add(other, mul(self, -1))

    def __mul__(self, other):
        return mul(self, other)

    def __rmul__(self, other):
        return mul(other, self)

    def __truediv__(self, other):
        return _div(self, other)

    def __rtruediv__(self, other):
        return _div(other, self)

    def __neg__(self):
        return mul(self, -1)

    def __getitem__(self, index):
        return _getitem(self, index)

    def sum(self, axis=None, keepdims=False):
        return _sum(self, axis, keepdims)

    def mean(self, axis=None, keepdims=False):
        n = self.data.size if axis is None else int(np.prod([self.data.shape[a] for a in np.atleast_1d(axis)]))
        return mul(_sum(self, axis, keepdims), 1.0 / max(n, 1))

    def reshape(self, *shape):
        return reshape(self, shape[0] if len(shape) == 1 and isinstance(shape[0], (tuple, list)) else shape)

    def flatten(self, start_dim=1):
        return flatten(self, start_dim)

    # ------------------------------------------------------------ NumPy interoperability
    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        if method == "__call__" and not kwargs:
            op = _UFUNC_OPS.get(ufunc)
            if op is not None:
                return op(*inputs)
        if ufunc not in _NONDIFFERENTIABLE_UFUNCS:
            _refuse(f"numpy.{ufunc.__name__}", inputs + tuple(kwargs.get("out", ())))
        inputs = tuple(_data(a) for a in inputs)
        if "out" in kwargs:
            kwargs["out"] = tuple(_data(a) for a in kwargs["out"])
        return getattr(ufunc, method)(*inputs, **kwargs)

    def __array_function__(self, func, types, args, kwargs):
        op = _FUNCTION_OPS.get(func)
        if op is not None:
            return op(*args, **kwargs)
        _refuse(f"numpy.{func.__name__}", _flat(args) + _flat(tuple(kwargs.values())))
        return func(*_unwrap(args), **_unwrap(kwargs))

    # ------------------------------------------------------------ differentiation
    def backward(self, gradient=None):
        """Add the gradient of this tensor with respect to every parameter (every leaf tensor with
        ``requires_grad``) it depends on to their ``.grad``, walking the graph recorded by the
        forward pass that computed it; the graph is released afterwards (one backward per forward).

        ``gradient`` (the gradient of some scalar with respect to this tensor) defaults to 1 for a
        one-element tensor such as a loss.
        """
        fn = "Tensor.backward"
        if not self.requires_grad:
            raise RuntimeError(f"{fn}: this tensor does not require grad (computed under no_grad, or from "
                               f"inputs none of which requires grad), so there is nothing to differentiate")
        if gradient is None:
            if self.data.size != 1:
                raise RuntimeError(f"{fn}: gradient can be omitted only for a one-element tensor (a loss), "
                                   f"got shape {self.data.shape}")
            gradient = np.ones(self.data.shape, self.data.dtype)
        else:
            gradient = _check_grad(fn, "gradient", gradient, self)
        run_backward(self, gradient)


class Parameter(Tensor):
    """A trainable array: a leaf :class:`Tensor` with ``requires_grad`` whose ``.grad`` (same shape
    and dtype, zeros at first) accumulates gradients until ``zero_grad()``.

    It stands in for its array: ``np.asarray(p)``, ``p.shape``, ``p.dtype``, ``len(p)`` and
    indexing work; arithmetic gives a :class:`Tensor` that carries the gradient back to ``p`` (use
    ``p.data`` or ``np.asarray(p)`` for a plain array).

    >>> p = Parameter(np.ones(3, np.float32))
    >>> p.grad
    array([0., 0., 0.], dtype=float32)
    >>> np.asarray(p + 1)
    array([2., 2., 2.], dtype=float32)
    """

    __slots__ = ()

    def __init__(self, data, requires_grad=True):
        if isinstance(data, Tensor):
            data = data.data
        data = V.as_float_array("Parameter", "data", data, data.ndim if isinstance(data, np.ndarray) else 0)
        super().__init__(data, requires_grad)
        self.grad = np.zeros_like(data)

    def __repr__(self):
        return f"Parameter(shape={self.data.shape}, dtype={self.data.dtype})"


# --------------------------------------------------------------------------- NumPy dispatch helpers
def _flat(seq):
    out = []
    for a in seq:
        if isinstance(a, (list, tuple)):
            out.extend(_flat(a))
        else:
            out.append(a)
    return tuple(out)


def _unwrap(a):
    if isinstance(a, Tensor):
        return a.data
    if isinstance(a, (list, tuple)):
        return type(a)(_unwrap(x) for x in a)
    if isinstance(a, dict):
        return {k: _unwrap(v) for k, v in a.items()}
    return a


def _refuse(what, operands):
    if is_recording(*operands):
        raise TypeError(f"{what}: an operand is a fastconv Tensor that requires grad, and NumPy would drop "
                        f"its gradient silently; use Tensor arithmetic and fastconv.autograd ops (cat, "
                        f"reshape, sum, ...), or take the values with np.asarray(t) / t.detach() or "
                        f"under fastconv.no_grad()")


# --------------------------------------------------------------------------- the graph walk
def _check_grad(fn, name, g, like):
    g = _data(g)
    if not isinstance(g, np.ndarray) or g.dtype not in V.FLOAT_DTYPES or g.shape != like.shape:
        got = (g.shape, g.dtype) if isinstance(g, np.ndarray) else type(g).__name__
        raise ValueError(f"{fn}: {name} must be a float array of the output's shape {like.shape}, got {got}")
    return g


_FREED = ("the graph of this forward was already differentiated and its saved arrays released "
          "(one backward per forward; to differentiate two losses of one forward, add them and call "
          "backward once)")


def run_backward(root, grad, inputs=(), stop_at_inputs=False):
    """Propagate ``grad`` (d something / d ``root``) through the graph that produced ``root``.

    Leaf tensors that require grad (parameters) get the result added to ``.grad`` -- only after
    the whole walk succeeded, so a backward that raises leaves every ``.grad`` as it was and the
    graph intact.  ``inputs`` are extra tensors whose gradients are returned (a list in their
    order, None for one the root does not depend on); with ``stop_at_inputs`` the walk treats them
    as leaves and does not go past them (a single layer's backward).  Afterwards the walked part
    of the graph is released.
    """
    want = {id(t): i for i, t in enumerate(inputs)}
    need = {}     # id(tensor) -> bool: on a path to something that wants a gradient
    order = []    # tensors with a recorded backward, inputs before the ops that use them
    leaves = []   # leaf tensors that accumulate
    stack = [root]
    push, pop = stack.append, stack.pop
    # An iterative depth-first walk; a tensor is pushed once more, after its inputs, as the pair
    # (tensor,) that says "inputs done" (one-tuples: a third cheaper per node than (t, flag) pairs).
    while stack:
        t = pop()
        if type(t) is tuple:
            t = t[0]
            n = False
            for i in t._node.inputs:
                if isinstance(i, Tensor) and need[id(i)]:
                    n = True
                    break
            need[id(t)] = n or id(t) in want
            order.append(t)
            continue
        k = id(t)
        if k in need:
            continue
        node = t._node
        if node is None or (stop_at_inputs and k in want):
            n = need[k] = k in want or (t.requires_grad and not t._implicit)
            if n and k not in want:
                leaves.append(t)
            continue
        if node.backward is None:
            raise RuntimeError(f"backward: {_FREED}")
        need[k] = False  # visiting; set for real once its inputs are done
        push((t,))
        for i in node.inputs:
            if isinstance(i, Tensor):
                ki = id(i)
                if ki in need:
                    continue
                if i._node is None and ki not in want:  # a leaf (a parameter): settled here, not pushed
                    if i.requires_grad and not i._implicit:
                        need[ki] = True
                        leaves.append(i)
                    else:
                        need[ki] = False
                else:
                    push(i)
    if not need.get(id(root)):
        return [None] * len(inputs)
    grads = {id(root): grad}
    for t in reversed(order):
        k = id(t)
        g = grads[k] if k in want else grads.pop(k, None)  # popped: released as soon as used
        if g is None or not need[k]:
            continue
        node = t._node
        inputs_ = node.inputs
        needs = tuple([isinstance(i, Tensor) and need[id(i)] for i in inputs_])
        result = node.backward(g, needs)
        for j, gi in enumerate(result):
            if gi is not None and needs[j]:
                ki = id(inputs_[j])
                prev = grads.get(ki)
                grads[ki] = gi if prev is None else prev + gi  # a new array: gi may be shared
    for t in leaves:
        g = grads.get(id(t))
        if g is None:
            continue
        if t.grad is None:
            t.grad = np.array(g, dtype=t.data.dtype, copy=True)
        else:
            t.grad += g  # in place: optimisers hold views of .grad
    for t in order:  # release the saved arrays of everything walked
        t._node.backward = None
        t._node.inputs = ()
    return [grads.get(id(t)) for t in inputs]

# The recorded ops live in _autograd_ops; they import Tensor and record from here, so this import
# comes last.  Tensor's operators and NumPy dispatch call them through these names.
from ._autograd_ops import (  # noqa: E402,F401
    _FUNCTION_OPS, _NONDIFFERENTIABLE_UFUNCS, _UFUNC_OPS, _div, _getitem, _sum, add,
    avg_pool2d, cat, contiguous, conv2d, cross_entropy, flatten, linear, max_pool2d, mse_loss, mul, relu, reshape)
