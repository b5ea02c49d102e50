"""Layers: :class:`Module` (the base class that finds parameters and sub-modules) and the layers
built on it.  Their arithmetic is in :mod:`fastconv.functional`, reached through the recorded ops
of :mod:`fastconv.autograd`; losses are in :mod:`fastconv.losses`, optimisers in :mod:`fastconv.optim`.

A layer's forward records its backward on the tensor it returns (a define-by-run tape), so
``loss.backward()`` differentiates exactly the forward that loss came from, however many forwards
ran since, and a model that branches (a residual add, a concat, a layer used twice) needs no
backward of its own.  Gradients *add* to each parameter's ``.grad`` (as PyTorch accumulates), so
call ``opt.zero_grad()`` between steps.

Writing a layer
---------------
Subclass :class:`Module`, assign :class:`Parameter` objects and sub-modules as attributes (plain
lists and dicts of them are found too), and write ``forward`` with the ops of
:mod:`fastconv.autograd` (``conv2d``, ``linear``, ``relu``, ``cat``, ``+``, ``*`` ...).  An op
that has none yet gets its backward from :func:`fastconv.autograd.record` (see that module's
docstring); ``self.training`` is False after ``eval()``.  ``output_shape`` (for
:func:`fastconv.summary`) defaults to running the forward on zeros under ``no_grad``.

Initialisation is PyTorch's default: weights and biases of :class:`Conv2d` and :class:`Linear`
drawn from ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))`` (``kaiming_uniform_(a=sqrt(5))``), with
``fan_in = in_channels/groups * kernel height * kernel width`` or ``in_features``.

>>> import numpy as np
>>> from fastconv.layers import Module, Conv2d, ReLU, MaxPool2d, Flatten, Linear, Sequential
>>> from fastconv.losses import CrossEntropyLoss
>>> from fastconv.optim import SGD
>>> class Net(Module):
...     def __init__(self):
...         self.conv = Conv2d(1, 4, 3, padding=1, rng=0)
...         self.block = Sequential(Conv2d(4, 4, 3, padding=1, rng=1), ReLU())
...         self.head = Sequential(MaxPool2d(2), Flatten(), Linear(4 * 4 * 4, 10, rng=2))
...     def forward(self, x):
...         h = self.conv(x)
...         return self.head(h + self.block(h))       # a residual block
>>> model = Net()
>>> [name for name, _ in model.named_parameters()][:3]
['conv.weight', 'conv.bias', 'block.0.weight']
>>> x = np.random.default_rng(2).standard_normal((5, 1, 8, 8)).astype(np.float32)
>>> loss_fn, opt = CrossEntropyLoss(), SGD(model.parameters(), lr=0.1, momentum=0.9)
>>> first = loss_fn(model(x), np.arange(5)).item()
>>> for _ in range(20):
...     loss = loss_fn(model(x), np.arange(5))
...     loss.backward(); opt.step(); opt.zero_grad()
>>> bool(loss.item() < first / 10)
True
"""
from __future__ import annotations

import math
import os

import numpy as np

from . import _validation as V
from . import autograd as A
from .autograd import Parameter, Tensor, is_grad_enabled, no_grad
from .autograd import _state as _grad_mode

_F32, _F64 = V.FLOAT_DTYPES

__all__ = [
    "Parameter", "Module", "ModuleList", "ModuleDict", "Sequential", "Conv2d", "MaxPool2d", "AvgPool2d",
    "ReLU", "Flatten", "Linear", "CrossEntropyLoss", "MSELoss", "SGD", "Adam",
]


# --------------------------------------------------------------------------- argument checks
def _positive_int(fn, name, v):
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
        raise TypeError(f"{fn}: {name} must be an int, got {v!r}")
    if v < 1:
        raise ValueError(f"{fn}: {name} must be positive, got {v}")
    return int(v)


def _conv_channels(fn, in_channels, out_channels, groups):
    """Validated ``(in_channels, out_channels, groups)`` of a convolution layer."""
    cin, cout, g = (_positive_int(fn, "in_channels", in_channels), _positive_int(fn, "out_channels", out_channels),
                    _positive_int(fn, "groups", groups))
    if cin % g or cout % g:
        raise ValueError(f"{fn}: in_channels and out_channels must be divisible by groups={g}, got {cin} and {cout}")
    return cin, cout, g


_float_dtype = V.float_dtype


def _rng(fn, rng):
    if rng is None or isinstance(rng, (int, np.integer)) and not isinstance(rng, (bool, np.bool_)):
        return np.random.default_rng(rng)
    if isinstance(rng, np.random.Generator):
        return rng
    raise TypeError(f"{fn}: rng must be None, an int seed or a numpy.random.Generator, got {rng!r}")


def _uniform(rng, shape, fan_in, dtype):
    bound = 1.0 / math.sqrt(fan_in)
    return rng.uniform(-bound, bound, size=shape).astype(dtype)


# --------------------------------------------------------------------------- modules
class Module:
    """Base class of layers and models, as PyTorch's ``nn.Module``.

    Parameters and sub-modules are found among the attributes (also inside plain lists, tuples
    and dicts), in the order they were first assigned, and named as PyTorch names them
    (``'conv1.weight'``, ``'blocks.0.bias'``).  Subclasses define ``forward``; calling the module
    runs it.  ``__init__`` of a subclass need not call ``super().__init__()``.

    Compatibility: ``module.backward(grad_output)`` differentiates the module's *last* forward
    with respect to its input (returned) and parameters (added to ``.grad``).  It refuses, with a
    ``RuntimeError``, a ``grad_output`` that a loss computed from another forward of this module,
    and a second backward of one forward; prefer ``loss.backward()``.

    >>> class TwoHeads(Module):
    ...     def __init__(self):
    ...         self.body = Linear(4, 8, rng=0)
    ...         self.heads = {"a": Linear(8, 2, rng=1), "b": Linear(8, 3, rng=2)}
    ...     def forward(self, x):
    ...         h = A.relu(self.body(x))
    ...         return A.cat([self.heads["a"](h), self.heads["b"](h)], axis=1)
    >>> net = TwoHeads()
    >>> [name for name, _ in net.named_parameters()][2:4]
    ['heads.a.weight', 'heads.a.bias']
    >>> y = net(np.ones((3, 4), np.float32)); y.shape
    (3, 5)
    >>> y.sum().backward(); net.body.weight.grad.shape     # both heads' gradients reach the body
    (8, 4)
    """

    training = True
    _last_in = ()
    _last_out = None

    def forward(self, *args, **kwargs):
        raise NotImplementedError(f"{type(self).__name__}: a Module subclass must define forward")

    def __getstate__(self):
        # the last forward's graph (kept for the compatibility backward) holds closures and the
        # batch's activations: a pickled or copied module leaves it behind
        state = self.__dict__.copy()
        state.pop("_last_in", None)
        state.pop("_last_out", None)
        return state

    def __call__(self, *args, **kwargs):
        if not _grad_mode.enabled:
            return self.forward(*args, **kwargs)
        # A float array argument becomes a tensor that records (but is not differentiated unless
        # backward(..., input_grad=True) asks for it), so the compatibility backward can return
        # the input's gradient; loss.backward() never computes it.
        if len(args) == 1 and not kwargs:  # a layer's usual call: the general path costs ~1 us more
            a = args[0]
            if type(a) is np.ndarray and (a.dtype == _F32 or a.dtype == _F64):
                a = Tensor(a, True)
                a._implicit = True
            out = self.forward(a)
            if isinstance(out, Tensor) and out._node is not None:
                self._last_in = (a,) if isinstance(a, Tensor) else ()
                self._last_out = out
            return out
        if not kwargs:
            for a in args:
                if type(a) is np.ndarray and (a.dtype == _F32 or a.dtype == _F64):
                    break
            else:  # nothing to wrap (a loss: logits and integer targets)
                out = self.forward(*args)
                if isinstance(out, Tensor) and out._node is not None:
                    self._last_in = tuple([a for a in args if isinstance(a, Tensor)])
                    self._last_out = out
                return out
        args = list(args)
        inputs = []
        for i, a in enumerate(args):
            if type(a) is np.ndarray and a.dtype in V.FLOAT_DTYPES:
                t = args[i] = Tensor(a, requires_grad=True)
                t._implicit = True
            if isinstance(args[i], Tensor):
                inputs.append(args[i])
        out = self.forward(*args, **kwargs)
        if isinstance(out, Tensor) and out._node is not None:
            self._last_in, self._last_out = tuple(inputs), out
        return out

    def backward(self, grad_output, input_grad=True):
        """Compatibility backward of the last forward (see the class docstring): add the parameter
        gradients to ``.grad`` and return the input's gradient (``None`` with ``input_grad=False``)."""
        fn = f"{type(self).__name__}.backward"
        out = self._last_out
        if out is None or out._node is None or out._node.backward is None:
            raise RuntimeError(f"{fn}: call forward first (one backward per forward)")
        origin = _origin_of(grad_output)
        if origin is not None and origin is not out:
            raise RuntimeError(
                f"{fn}: grad_output is the gradient of a loss computed from another forward of this "
                f"module than its last one (a forward ran in between, e.g. an evaluation), so it does not "
                f"belong to the forward this backward would differentiate; call loss.backward() instead, "
                f"which differentiates the forward the loss was computed from")
        if isinstance(grad_output, Tensor):
            grad_output = grad_output.data
        if not isinstance(grad_output, np.ndarray) or grad_output.shape != out.shape:
            got = grad_output.shape if isinstance(grad_output, np.ndarray) else type(grad_output).__name__
            raise ValueError(f"{fn}: grad_output must be an array of the output's shape {out.shape}, got {got}")
        targets = self._last_in if input_grad else ()
        grads = A.run_backward(out, grad_output, targets, stop_at_inputs=True)
        self._last_in, self._last_out = (), None
        if not input_grad:
            return None
        return grads[0] if len(grads) == 1 else tuple(grads)

    # ------------------------------------------------------------ traversal
    def named_children(self):
        """Yield ``(name, module)`` for the direct sub-modules (attributes, and lists/dicts of them)."""
        for name, v in vars(self).items():
            if isinstance(v, Module):
                yield name, v
            elif isinstance(v, (list, tuple)):
                for i, m in enumerate(v):
                    if isinstance(m, Module):
                        yield f"{name}.{i}", m
            elif isinstance(v, dict):
                for k, m in v.items():
                    if isinstance(m, Module):
                        yield f"{name}.{k}", m

    def _own_parameters(self):
        for name, v in vars(self).items():
            if isinstance(v, Parameter):
                yield name, v
            elif isinstance(v, (list, tuple)):
                for i, p in enumerate(v):
                    if isinstance(p, Parameter):
                        yield f"{name}.{i}", p
            elif isinstance(v, dict):
                for k, p in v.items():
                    if isinstance(p, Parameter):
                        yield f"{name}.{k}", p

    def named_modules(self, prefix=""):
        """Yield ``(name, module)`` for this module (name ``prefix``) and every sub-module, each once."""
        seen = set()
        stack = [(prefix, self)]
        while stack:
            name, m = stack.pop()
            if id(m) in seen:
                continue
            seen.add(id(m))
            yield name, m
            children = [(f"{name}.{c}" if name else c, child) for c, child in m.named_children()]
            stack.extend(reversed(children))

    def modules(self):
        for _, m in self.named_modules():
            yield m

    def children(self):
        for _, m in self.named_children():
            yield m

    def named_parameters(self, prefix=""):
        """Yield ``(name, Parameter)`` pairs named as PyTorch names them (``'0.weight'``,
        ``'conv1.bias'``); a parameter shared by two modules is yielded once."""
        seen = set()
        for mname, m in self.named_modules(prefix):
            for pname, p in m._own_parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    yield (f"{mname}.{pname}" if mname else pname), p

    def parameters(self):
        """Yield the :class:`Parameter` objects of this module and its sub-modules."""
        for _, p in self.named_parameters():
            yield p

    def register_buffer(self, name, array):
        """Keep ``array`` as attribute ``name`` and in :meth:`state_dict` (running statistics,
        a normalisation): state that is saved but not trained."""
        if not isinstance(name, str) or not name.isidentifier():
            raise ValueError(f"{type(self).__name__}.register_buffer: name must be an identifier, got {name!r}")
        names = self.__dict__.setdefault("_buffer_names", [])
        if name not in names:
            names.append(name)
        setattr(self, name, np.asarray(array))

    def named_buffers(self):
        for mname, m in self.named_modules():
            for b in m.__dict__.get("_buffer_names", ()):
                yield (f"{mname}.{b}" if mname else b), m, b

    def zero_grad(self):
        """Set every parameter's gradient to zero."""
        for p in self.parameters():
            p.grad[...] = 0

    def num_parameters(self):
        return sum(p.data.size for p in self.parameters())

    def train(self, mode=True):
        """Set training mode (``self.training``) on this module and every sub-module; returns self."""
        mode = V._bool(f"{type(self).__name__}.train", "mode", mode)
        for m in self.modules():
            m.training = mode
        return self

    def eval(self):
        """Evaluation mode: ``train(False)``."""
        return self.train(False)

    def to(self, *, memory_format):
        """The memory layout of the activations, as PyTorch's ``model.to(memory_format=...)``; returns self.

        With ``'channels_last'`` every :class:`Conv2d` in the module computes in (N, H, W, C) memory:
        a channels-first input is converted first (recorded: its gradient goes back in its layout)
        and the output is channels_last; batch norm, the activations, pooling and additions keep
        that layout, so the network's activations stay channels_last from the first convolution
        on and its 1x1 layers are plain matrix products.  ``'contiguous_format'`` (NCHW, the
        default) undoes it.  Values are the same up to rounding in either layout.

        >>> from fastconv.models import resnet
        >>> net = resnet(rng=0).to(memory_format="channels_last")
        >>> net(np.zeros((2, 1, 28, 28), np.float32)).shape
        (2, 10)
        """
        from ._autograd_ops import MEMORY_FORMATS
        from ._layers_basic import Conv2d

        if memory_format not in MEMORY_FORMATS:
            raise ValueError(f"{type(self).__name__}.to: memory_format must be one of {MEMORY_FORMATS}, got "
                             f"{memory_format!r}")
        for m in self.modules():
            if isinstance(m, Conv2d):
                m.memory_format = memory_format
        return self

    # ------------------------------------------------------------ state
    def state_dict(self):
        """Copies of all parameter and buffer arrays by name."""
        state = {name: p.data.copy() for name, p in self.named_parameters()}
        for name, m, attr in self.named_buffers():
            state[name] = np.array(getattr(m, attr), copy=True)
        return state

    def load_state_dict(self, state):
        """Copy arrays (a dict or an ``.npz`` archive) into the parameters and buffers; names and
        shapes must match."""
        fn = f"{type(self).__name__}.load_state_dict"
        own = {name: p.data for name, p in self.named_parameters()}
        buffers = {name: (m, attr) for name, m, attr in self.named_buffers()}
        for name, (m, attr) in buffers.items():
            own[name] = getattr(m, attr)
        keys = set(state.keys()) if hasattr(state, "keys") else None
        if keys is None:
            raise TypeError(f"{fn}: state must be a mapping of names to arrays, got {type(state).__name__}")
        if keys != set(own):
            raise ValueError(f"{fn}: state must have the parameters {sorted(own)}, got {sorted(keys)} "
                             f"(missing {sorted(set(own) - keys)}, unexpected {sorted(keys - set(own))})")
        for name, target in own.items():
            a = np.asarray(state[name])
            if a.shape != target.shape:
                raise ValueError(f"{fn}: {name} must have shape {target.shape}, got {a.shape}")
        for name, target in own.items():  # all checked first: a failed load changes nothing
            if name in buffers:
                m, attr = buffers[name]
                setattr(m, attr, np.array(state[name], dtype=target.dtype, copy=True))
            else:
                target[...] = np.asarray(state[name])
        return self

    def save(self, file):
        """Save :meth:`state_dict` to ``file`` (an ``.npz`` archive written to exactly that path)."""
        if isinstance(file, (str, os.PathLike)):
            with open(file, "wb") as f:  # numpy.savez would append '.npz' to a path without it
                np.savez(f, **self.state_dict())
        else:
            np.savez(file, **self.state_dict())

    def load(self, file):
        """Load what :meth:`save` wrote into this model (same architecture); returns self."""
        fn = f"{type(self).__name__}.load"
        if isinstance(file, (str, os.PathLike)) and not os.path.exists(file):
            if os.path.exists(os.fspath(file) + ".npz"):  # written by an older save, through numpy.savez
                file = os.fspath(file) + ".npz"
            else:
                raise FileNotFoundError(f"{fn}: no such file {os.fspath(file)!r}")
        with np.load(file, allow_pickle=False) as data:
            return self.load_state_dict({k: data[k] for k in data.files})

    # ------------------------------------------------------------ description
    def output_shape(self, input_shape):
        """Per-sample output shape for a per-sample ``input_shape``: by default, found by running
        the forward on one zero sample under ``no_grad`` (layers with cheaper rules override it)."""
        params = list(self.parameters())
        dtype = params[0].dtype if params else np.float32
        with no_grad():
            y = self.forward(np.zeros((1,) + tuple(input_shape), dtype))
        return tuple(np.shape(y))[1:]

    def extra_repr(self):
        return ""

    def __repr__(self):
        children = list(self.named_children())
        if not children:
            return f"{type(self).__name__}({self.extra_repr()})"
        inner = "".join(f"\n  ({name}): " + repr(m).replace("\n", "\n  ") for name, m in children)
        return f"{type(self).__name__}({inner}\n)"


class ModuleList(Module):
    """A list of modules, registered as ``'0'``, ``'1'``, ... (a plain list attribute is found too).

    >>> blocks = ModuleList([Linear(2, 2, rng=0), Linear(2, 2, rng=1)])
    >>> _ = blocks.append(ReLU()); len(blocks), [n for n, _ in blocks.named_parameters()]
    (3, ['0.weight', '0.bias', '1.weight', '1.bias'])
    """

    def __init__(self, modules=()):
        self._list = []
        for m in modules:
            self.append(m)

    def append(self, module):
        if not isinstance(module, Module):
            raise TypeError(f"{type(self).__name__}: items must be fastconv modules, got {type(module).__name__}")
        self._list.append(module)
        return self

    def named_children(self):
        for i, m in enumerate(self._list):
            yield str(i), m

    def __len__(self):
        return len(self._list)

    def __getitem__(self, i):
        return self._list[i]

    def __iter__(self):
        return iter(self._list)


class ModuleDict(Module):
    """A dict of modules, registered under their keys (a plain dict attribute is found too).

    >>> heads = ModuleDict({"digit": Linear(4, 10, rng=0), "parity": Linear(4, 2, rng=1)})
    >>> [n for n, _ in heads.named_parameters()][::2]
    ['digit.weight', 'parity.weight']
    """

    def __init__(self, modules=None):
        self._dict = {}
        for k, m in (modules or {}).items():
            self[k] = m

    def __setitem__(self, key, module):
        if not isinstance(module, Module):
            raise TypeError(f"{type(self).__name__}: values must be fastconv modules, got {type(module).__name__}")
        self._dict[str(key)] = module

    def named_children(self):
        yield from self._dict.items()

    def __getitem__(self, key):
        return self._dict[key]

    def __len__(self):
        return len(self._dict)

    def __iter__(self):
        return iter(self._dict)

    def keys(self):
        return self._dict.keys()

    def items(self):
        return self._dict.items()

    def values(self):
        return self._dict.values()


# the compatibility backward's check that grad_output belongs to the forward it differentiates:
# a loss's backward() tags the array it returns with (a weak reference to) the logits tensor
_ORIGINS = {}


def _tag_origin(array, tensor):
    import weakref

    key = id(array)
    _ORIGINS[key] = (weakref.ref(array, lambda _, k=key: _ORIGINS.pop(k, None)), weakref.ref(tensor))


_DEAD = object()


def _origin_of(array):
    entry = _ORIGINS.get(id(array))
    if entry is None or entry[0]() is not array:
        return None
    t = entry[1]()
    return _DEAD if t is None else t

class Sequential(Module):
    """Layers applied in order, registered as ``'0'``, ``'1'``, ...

    >>> net = Sequential(Linear(4, 3, rng=0), ReLU(), Linear(3, 2, rng=1))
    >>> len(net), [name for name, _ in net.named_parameters()]
    (3, ['0.weight', '0.bias', '2.weight', '2.bias'])
    """

    def __init__(self, *layers):
        for i, layer in enumerate(layers):
            if not isinstance(layer, Module):
                raise TypeError(f"Sequential: layers must be fastconv layers, got {type(layer).__name__} "
                                f"at position {i}")
        self.layers = list(layers)

    def named_children(self):
        for i, layer in enumerate(self.layers):
            yield str(i), layer

    def __len__(self):
        return len(self.layers)

    def __getitem__(self, i):
        return self.layers[i]

    def __iter__(self):
        return iter(self.layers)

    def append(self, layer):
        if not isinstance(layer, Module):
            raise TypeError(f"Sequential.append: layer must be a fastconv layer, got {type(layer).__name__}")
        self.layers.append(layer)
        return self

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x

    def output_shape(self, input_shape):
        for layer in self.layers:
            input_shape = layer.output_shape(input_shape)
        return input_shape


def __getattr__(name):
    """Losses and optimisers live in ``fastconv.losses`` / ``fastconv.optim`` (which import this
    module); ``from fastconv.layers import SGD`` keeps working, resolved on first use so that no
    import runs in a circle."""
    if name in ("CrossEntropyLoss", "MSELoss"):
        from . import losses
        return getattr(losses, name)
    if name in ("SGD", "Adam"):
        from . import optim
        return getattr(optim, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# The layers live in _layers_basic; they subclass Module from here, so this import comes last.
from ._layers_basic import AvgPool2d, Conv2d, Flatten, Linear, MaxPool2d, ReLU  # noqa: E402,F401
