"""Trees to and from safetensors files, written atomically.

A file stores leaves by their dotted names (:func:`aam_func.tree.flatten`): ``state_dict``
names for dicts, and the same path naming for lists, tuples, namedtuples and dataclasses
(``"layers.0.weight"``, ``"mu.1"``). ``None`` leaves are not stored; :func:`load` with ``like``
puts them back, and gives the file's leaves ``like``'s structure and dtypes.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from .paths import check_structure, flatten, unflatten, unflatten_like

__all__ = ["save", "load", "tensors_of"]


def tensors_of(tree: Any, what: str = "tree") -> dict[str, Tensor]:
    """``{dotted name: tensor}`` of a tree's tensor leaves (``None`` leaves skipped); any other
    leaf, or a tree that is a bare tensor (no name to store it under), is an error naming it."""
    out = {}
    for name, leaf in flatten(tree).items():
        if leaf is None:
            continue
        if not isinstance(leaf, Tensor):
            raise TypeError(f"{what} leaf {name!r} must be a Tensor or None, got {type(leaf).__name__}")
        if name == "":
            raise ValueError(f"{what} is a bare tensor; put it in a dict, list or tuple to give it a name")
        out[name] = leaf
    return out


def save(tree: Any, path: str | os.PathLike, metadata: Mapping[str, str] | None = None) -> None:
    """Write a tree as a safetensors file, atomically: a temp file in the same folder, then rename.

    A crash mid-write leaves any previous file at ``path`` intact.
    """
    from safetensors.torch import save_file

    path = os.fspath(path)
    flat = {k: v.detach().contiguous().cpu() for k, v in tensors_of(tree).items()}
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".safetensors", dir=folder)
    os.close(fd)
    try:
        save_file(flat, tmp, metadata=dict(metadata) if metadata else None)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load(
    path: str | os.PathLike,
    like: Any = None,
    *,
    device: str | torch.device = "cpu",
    with_metadata: bool = False,
):
    """Read a safetensors file into a tree: nested dicts split at the dots, or, with ``like`` (a
    tree of tensors or shapes, any form), ``like``'s structure. With ``like`` the file is
    validated: every missing, unexpected and mis-shaped leaf is listed in one ``ValueError``, and
    dtypes follow ``like``'s tensors."""
    from safetensors import safe_open

    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no params file at {path!r}")
    try:
        with safe_open(path, framework="pt", device=str(device)) as f:
            flat = {k: f.get_tensor(k) for k in f.keys()}
            metadata = f.metadata() or {}
    except Exception as e:  # safetensors raises its own error types for truncated/corrupt files
        raise ValueError(f"cannot read params file {path!r}: {e}") from e
    if like is None:
        tree = unflatten(flat)
    else:
        expected = {k: v for k, v in flatten(like).items() if v is not None}
        check_structure(expected, flat, what=f"params in {path!r}")
        flat = {k: (flat[k].to(v.dtype) if isinstance(v, Tensor) else flat[k]) for k, v in expected.items()}
        tree = unflatten_like(like, flat)
    return (tree, metadata) if with_metadata else tree
