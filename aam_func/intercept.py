"""One mechanism for acting at the uses of given tensors (parameters), found by identity.

    with Intercept({"blocks.0.attn.qkv.weight": w, ...}, client):
        loss_fn(params, batch)       # layers need no hooks; nothing is written into modules or params

Inside the context a ``TorchFunctionMode`` looks at every torch call. A *watched* tensor (one of
the given objects: ``is``, not equality) in the weight slot of

- ``F.linear(x, W, b)``          weight (out, in): nn.Linear, aam_func's Linear
- ``torch.addmm(b, x, W)``       weight (in, out): transformers' GPT-2 ``Conv1D`` (no beta/alpha/out)
- ``F.conv1d/conv2d(x, W, ...)`` weight (out, in/groups, *kernel): nn.Conv1d / nn.Conv2d
                                 (``Client.conv``; by default an other use of W)
- ``F.embedding(ids, W, ...)``   a table lookup (``use.padding_idx``; ``use.plain`` is False with
                                 max_norm / scale_grad_by_freq; ``sparse`` only changes the
                                 layout of the gradient, not its values)
- ``F.group_norm(x, G, W, b, eps)`` / ``F.layer_norm(x, shape, W, b, eps)``: a norm's affine
                                 weight (``Client.norm``; by default an other use of W)

A client whose ``bias_uses`` is True is also told of a watched tensor in the *bias* slot of a
recognised use (``F.linear`` / conv / norm ``bias``, ``torch.addmm``'s ``input``): ``use.bias_key``
names it and the op sees the tensor itself. Otherwise (the default) that bias is an other use.

is a *recognised use*: the client's :meth:`Client.linear` / :meth:`Client.embedding` /
:meth:`Client.conv` receives a
:class:`Use` and returns the op's result (``use.run()`` computes it as written). A watched tensor
anywhere else is an *other use*: another slot of those ops (``F.linear(W, V)``: W is an input
there) or any other function, method or property (``W.t()``, ``W @ x``, ``W[ids]``, ``W.T``).
The client's :meth:`Client.other` is told its key and returns the tensor the op sees in its
place. Metadata reads (:data:`HARMLESS_PROPERTIES`, :data:`HARMLESS_METHODS`: ``.shape``,
``.dtype``, ``.size()``, ...) are not uses: they pass through without asking the client.

``ops=`` (optional) replaces every call of ``F.embedding`` / ``F.batch_norm`` in the context,
watched or not, recognised uses' ``use.run()`` included: per-example work makes lookups exact
under vmap and refuses batch-mixing layers with it (``aam_func.per_sample.exact_ops``).

Clients (one object each, its state its own):

- LoRA's factored path (``peft.lora``): a recognised linear use of a target adds
  ``s·(x·Aᵀ)·Bᵀ``; any other use sees the merged weight ``W + s·B·A``.
- The batched per-example route (``per_sample.batched``, ``bias_uses``): a zero probe on every
  recognised use's output (norms and biases included); any other use of a parameter is refused.
- Ghost clipping (``per_sample.ghost``): discovery records each recognised use and marks the
  weights of other uses (and of non-plain embeddings) for the exact route; the ghost pass adds a
  zero probe to each recognised use's output and keeps its input.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

__all__ = ["Intercept", "Client", "Use", "HARMLESS_PROPERTIES", "HARMLESS_METHODS", "OP_ARGS", "NORM_KINDS"]

# Property reads that give no function of the tensor's values. Not ``.T``/``.mT``/``.data``/``.real``:
# those are values (a use of the weight).
HARMLESS_PROPERTIES = frozenset({
    "shape", "dtype", "device", "requires_grad", "is_leaf", "layout", "ndim", "names", "is_cuda", "is_sparse",
    "is_quantized", "is_meta", "grad_fn",
})
HARMLESS_METHODS = frozenset({
    Tensor.size, Tensor.dim, Tensor.ndimension, Tensor.numel, Tensor.is_floating_point, Tensor.is_complex,
    Tensor.element_size, Tensor.stride, Tensor.is_contiguous, Tensor.data_ptr, Tensor.__len__, Tensor.get_device,
})

_EMBEDDING_ARGS = ("input", "weight", "padding_idx", "max_norm", "norm_type", "scale_grad_by_freq", "sparse")
_LINEAR_ARGS = ("input", "weight", "bias")
_ADDMM_ARGS = ("input", "mat1", "mat2")
_ADDMM_ALL = _ADDMM_ARGS + ("beta", "alpha", "out")
_CONV_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_GROUP_NORM_ARGS = ("input", "num_groups", "weight", "bias", "eps")
_LAYER_NORM_ARGS = ("input", "normalized_shape", "weight", "bias", "eps")
_BATCH_NORM_ARGS = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")
# the functions ``Intercept(ops=...)`` can replace, with their parameter names
OP_ARGS = {F.embedding: _EMBEDDING_ARGS, F.batch_norm: _BATCH_NORM_ARGS}
_RECOGNISED = {  # func: (kind, its parameter names, the weight's slot)
    F.linear: ("linear", _LINEAR_ARGS, "weight"),
    torch.addmm: ("addmm", _ADDMM_ALL, "mat2"),
    F.embedding: ("embedding", _EMBEDDING_ARGS, "weight"),
    F.conv1d: ("conv", _CONV_ARGS, "weight"),
    F.conv2d: ("conv", _CONV_ARGS, "weight"),
    F.group_norm: ("group_norm", _GROUP_NORM_ARGS, "weight"),
    F.layer_norm: ("layer_norm", _LAYER_NORM_ARGS, "weight"),
}
NORM_KINDS = frozenset({"group_norm", "layer_norm"})


@dataclass(frozen=True)
class Use:
    """One recognised use of a watched weight. ``kind``: ``"linear"`` (``F.linear``, weight
    (out, in)), ``"addmm"`` (weight (in, out)), ``"embedding"`` or ``"conv"`` (``F.conv1d`` /
    ``F.conv2d``, weight (out, in/groups, *kernel); ``options`` holds its stride, padding,
    dilation and groups). ``input``: x for the linear kinds and conv, the ids for an embedding.
    ``padding_idx`` (embedding only): the row that receives no gradient, in [0, V), or None.
    ``plain`` is False for an embedding with max_norm / scale_grad_by_freq and a grouped conv.
    ``"group_norm"`` / ``"layer_norm"``: a norm's affine weight; ``options`` holds num_groups or
    normalized_shape, and eps. ``bias_key``: the watched bias's key (clients with ``bias_uses``)."""

    kind: str  # "linear", "addmm", "embedding", "conv", "group_norm" or "layer_norm"
    key: Hashable
    weight: Tensor
    input: Tensor
    bias: Optional[Tensor] = None
    padding_idx: Optional[int] = None
    plain: bool = True
    options: dict = field(default_factory=dict)
    bias_key: Optional[Hashable] = None
    _func: Any = field(default=None, repr=False)
    _args: dict = field(default_factory=dict, repr=False)
    _weight_slot: str = field(default="weight", repr=False)

    def run(self, weight: Optional[Tensor] = None, **changes) -> Tensor:
        """The op as written (other watched tensors already replaced by the client's choice),
        with ``weight`` in the weight slot when given and the keyword arguments in ``changes``
        (e.g. ``padding_idx=None``)."""
        args = dict(self._args, **changes)
        if weight is not None:
            args[self._weight_slot] = weight
        return self._func(**args)


class Client:
    """What a watcher does at the uses of its tensors; the defaults change nothing."""

    bias_uses = False  # True: a watched bias of a recognised use is passed as use.bias_key

    def linear(self, use: Use) -> Tensor:
        """A recognised ``F.linear`` / ``torch.addmm`` use (``use.kind``): return its result."""
        return use.run()

    def embedding(self, use: Use) -> Tensor:
        """A recognised plain ``F.embedding`` use: return its result."""
        return use.run()

    def conv(self, use: Use) -> Tensor:
        """A recognised ``F.conv1d`` / ``F.conv2d`` use; by default an other use of its weight
        (a client that knows nothing of convolutions sees the weight as it sees any op)."""
        return use.run(self.other(use.key, use.weight))

    def norm(self, use: Use) -> Tensor:
        """A recognised ``F.group_norm`` / ``F.layer_norm`` use of its affine weight; by default an
        other use of it."""
        return use.run(self.other(use.key, use.weight))

    def other(self, key: Hashable, tensor: Tensor) -> Tensor:
        """Any other use of the watched ``tensor`` named ``key``: the tensor the op sees instead."""
        return tensor


def _bind(names: tuple, args: tuple, kwargs: Mapping) -> Optional[dict]:
    """args/kwargs by parameter name; None when they do not fit ``names``."""
    if len(args) > len(names):
        return None
    bound = dict(zip(names, args))
    for k in kwargs:  # (a loop, not any(...): this runs for every recognised call)
        if k not in names or k in bound:
            return None
    bound.update(kwargs)
    return bound


def _is_harmless(func) -> bool:
    if func in HARMLESS_METHODS:
        return True
    if getattr(func, "__name__", None) == "__get__":
        return getattr(getattr(func, "__self__", None), "__name__", None) in HARMLESS_PROPERTIES
    return False


class Intercept(TorchFunctionMode):
    """The mode: ``watched`` maps the client's keys to tensors; see the module docstring.
    Two keys for one tensor object are an error (a use could not be told apart).

    ``ops`` (optional) maps a torch function to ``impl(func, kwargs) -> result`` that replaces
    *every* call of it inside the context, watched or not, recognised uses' ``use.run()``
    included (kwargs: the call's arguments by parameter name, for the functions of
    :data:`OP_ARGS`). Per-example work uses it to make lookups exact under vmap and to refuse
    batch-mixing layers (``aam_func.per_sample.exact_ops``)."""

    def __init__(self, watched: Mapping[Hashable, Tensor], client: Client, ops: Optional[Mapping] = None):
        super().__init__()
        for f in ops or {}:
            if f not in OP_ARGS:
                raise ValueError(f"ops: {f!r} is not one of the functions Intercept can replace ({list(OP_ARGS)})")
        self._ops = dict(ops or {})
        table: dict[int, tuple[Hashable, Tensor]] = {}
        for key, t in watched.items():
            if id(t) in table:
                raise ValueError(f"{table[id(t)][0]!r} and {key!r} are the same tensor object: "
                                 "its uses could not be told apart")
            table[id(t)] = (key, t)  # holding t keeps its id from being reused while watched
        self._table, self._client = table, client

    # Identity by id(): the table holds every watched tensor, so while it is alive no other live
    # object has its id, and id(v) in the table means v IS that tensor (no isinstance needed).
    def _key(self, v) -> Optional[Hashable]:
        entry = self._table.get(id(v))
        return None if entry is None else entry[0]

    def _any_watched(self, obj) -> bool:
        """Whether ``obj`` (a tensor, or lists / tuples / dicts of them) holds a watched tensor."""
        table = self._table
        if id(obj) in table:
            return True
        if isinstance(obj, dict):
            obj = tuple(obj.values())
        elif not isinstance(obj, (list, tuple)):
            return False
        for v in obj:  # one level inline: this runs for every torch call in the context
            if id(v) in table:
                return True
            if isinstance(v, (list, tuple, dict)) and self._any_watched(v):
                return True
        return False

    def _others(self, obj):
        """``obj`` with each watched tensor replaced by the client's ``other`` answer."""
        entry = self._table.get(id(obj))
        if entry is not None:
            return self._client.other(entry[0], obj)
        if not isinstance(obj, (list, tuple, dict)) or not self._any_watched(obj):
            return obj
        if isinstance(obj, dict):
            return {k: self._others(v) for k, v in obj.items()}
        out = [self._others(v) for v in obj]
        return type(obj)(*out) if hasattr(obj, "_fields") else type(obj)(out)  # a NamedTuple takes fields

    def _recognise(self, func, args, kwargs) -> Optional[Use]:
        """The :class:`Use` when this call is a recognised use of a watched weight, else None."""
        kind, names, slot = _RECOGNISED[func]
        bound = _bind(names, args, kwargs)
        if bound is None or slot not in bound:
            return None
        weight = bound[slot]
        key = self._key(weight)
        if key is None:
            return None
        padding_idx, plain = None, True
        if kind == "embedding":
            # renormalised or frequency-scaled: the weight gradient is not a plain row scatter
            plain = not (bound.get("max_norm") is not None or bound.get("scale_grad_by_freq", False))
            padding_idx = bound.get("padding_idx")
            if padding_idx is not None and padding_idx < 0:
                padding_idx += weight.shape[0]
        elif kind == "addmm" and set(bound) != set(_ADDMM_ARGS):
            return None  # beta / alpha / out change what addmm computes
        options = {}
        if kind == "conv":
            options = {k: bound.get(k, d) for k, d in (("stride", 1), ("padding", 0), ("dilation", 1), ("groups", 1))}
            plain = options["groups"] == 1
        elif kind == "group_norm":
            options = {"num_groups": bound.get("num_groups"), "eps": bound.get("eps", 1e-5)}
        elif kind == "layer_norm":
            options = {"normalized_shape": bound.get("normalized_shape"), "eps": bound.get("eps", 1e-5)}
        bias_slot = "input" if kind == "addmm" else "bias"
        bias_key = self._key(bound.get(bias_slot)) if self._client.bias_uses and kind != "embedding" else None
        table, rest = self._table, {}
        for k, v in bound.items():  # the other arguments, watched tensors among them answered by ``other``
            if k != slot:
                watched = id(v) in table or (isinstance(v, (list, tuple, dict)) and self._any_watched(v))
                rest[k] = self._others(v) if watched and not (k == bias_slot and bias_key is not None) else v
        x = rest.get("mat1" if kind == "addmm" else "input")
        run = func if func not in self._ops else (lambda **kw: self._run(func, (), kw))
        return Use(kind, key, weight, x, rest.get(bias_slot), padding_idx, plain, options, bias_key, run,
                   {**rest, slot: weight}, slot)

    def _run(self, func, args, kwargs):
        """The call as the context runs it: through ``ops`` when ``func`` has a replacement."""
        impl = self._ops.get(func)
        if impl is not None:
            bound = _bind(OP_ARGS[func], args, kwargs)
            if bound is not None:
                return impl(func, bound)
        return func(*args, **kwargs)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _RECOGNISED:
            use = self._recognise(func, args, kwargs)
            if use is not None:
                if use.kind == "embedding":
                    return self._client.embedding(use)
                if use.kind in NORM_KINDS:
                    return self._client.norm(use)
                return self._client.conv(use) if use.kind == "conv" else self._client.linear(use)
        elif _is_harmless(func):
            return func(*args, **kwargs)
        if self._any_watched(args) or self._any_watched(kwargs):
            args, kwargs = self._others(args), self._others(kwargs)
        return self._run(func, args, kwargs)
