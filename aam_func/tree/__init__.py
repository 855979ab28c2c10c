"""Trees of tensors: any pytree (nested dicts, flat ``named_parameters()`` dicts, lists,
tuples, namedtuples, registered dataclasses, ``None`` leaves), named by dotted paths.

aam_func's own models use nested ``dict[str, Tensor | Params]``; flattened with dots such a
tree is exactly a ``state_dict`` (``"blocks.0.attn.qkv.weight"``), so the same names serve
``torch.func.functional_call``, safetensors files and weight import. Any other form works the
same way and comes back in its own form: a flat ``named_parameters()`` dict keeps its dotted
keys, a list's leaves are named ``"0"``, ``"1"``, ..., a namedtuple's or dataclass's by field.
The registry is ``torch.utils._pytree``, the one ``torch.func`` (``vmap``, ``grad``,
``functional_call``) flattens with, so a tree that works there works here, with no second
registry to keep in step (register a dataclass with ``torch.utils._pytree.register_dataclass``).

Every function here is pure: it returns new containers and never writes into a tensor.
"""

from typing import Union

from torch import Tensor

from .io import load, save, tensors_of
from .ops import cast, map, merge, partition, select, selector, subset, to, zeros_like
from .paths import (SEP, DictSpec, Flat, check_structure, count, flatten, is_leaf, leaves, names, paths, rebuild,
                    structure_diff, unflatten, unflatten_like)

Params = dict[str, Union[Tensor, "Params"]]

__all__ = [
    "Params", "SEP", "Flat", "DictSpec", "rebuild", "is_leaf", "paths", "flatten", "unflatten", "unflatten_like", "map", "leaves", "names",
    "count", "partition", "merge", "select", "selector", "subset", "cast", "to", "zeros_like", "check_structure",
    "structure_diff", "save", "load", "tensors_of",
]
