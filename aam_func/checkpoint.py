"""Checkpoints: one directory, written atomically, that resumes a run bit-exactly on CPU.

    save_checkpoint("run/checkpoint", cfg=cfg, params=params, opt_state=opt_state, step=100,
                    rng={"torch": torch.get_rng_state()}, tokenizer=tok, train_state={...})
    ckpt = load_checkpoint("run/checkpoint", opt_template=opt.init(params))
    ckpt.cfg, ckpt.params, ckpt.opt_state, ckpt.step, ckpt.rng, ckpt.tokenizer_dir, ckpt.train_state

Layout::

    config.json                the ModelConfig
    params.safetensors         the model's parameters (state_dict names)
    optimizer.safetensors      the optimizer state tree (flattened with dots)
    rng.safetensors            RNG states (uint8 tensors from ``Generator.get_state()``)
    trainer_state.json         step, seed, training arguments, last metrics, format version
    tokenizer/                 an ordinary transformers tokenizer directory

Atomicity: everything is written into ``<dir>.tmp-<pid>`` and fsynced; then the old directory
(if any) is renamed to ``<dir>.old-<pid>``, the new one renamed into place, and the old one
removed. A process killed at any moment leaves either the previous or the new checkpoint
complete; if it dies between the two renames, :func:`load_checkpoint` finds the previous one
under its ``.old-*`` name, and the next save cleans up. A write that fails (a full disk, a
directory that is not writable) is a :class:`CheckpointError` and leaves no temporary behind.

``keep=k`` keeps the ``k - 1`` previous checkpoints beside the new one as ``<dir>-<step>``
(``checkpoint-300``), newest first, for a run that went wrong after them. A save refuses params
or optimizer state holding inf/NaN (a diverged run never replaces a good checkpoint), and a load
refuses non-floating, mixed-dtype or non-finite params and a ``trainer_state.json`` whose
fields have the wrong types, each with the file and the leaf named.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import Tensor

from . import tree
from .checks import check_int, is_int
from .config import ModelConfig

__all__ = ["CheckpointError", "Checkpoint", "save_checkpoint", "load_checkpoint", "resolve_checkpoint",
           "restore_like", "kept_checkpoints", "FORMAT_VERSION"]

FORMAT_VERSION = 1
PARAMS_FILE = "params.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
RNG_FILE = "rng.safetensors"
CONFIG_FILE = "config.json"
STATE_FILE = "trainer_state.json"
TOKENIZER_DIR = "tokenizer"


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete or corrupted (the CLI prints it without a traceback)."""


@dataclass
class Checkpoint:
    path: str
    cfg: ModelConfig
    params: dict
    step: int
    opt_state: Optional[dict] = None
    rng: dict = field(default_factory=dict)
    train_state: dict = field(default_factory=dict)
    tokenizer_dir: Optional[str] = None

    def require_tokenizer_dir(self) -> str:
        """``tokenizer_dir``, or a :class:`CheckpointError` when the checkpoint holds none (one
        written by ``save_checkpoint`` without ``tokenizer``)."""
        if self.tokenizer_dir is None:
            raise CheckpointError(f"checkpoint {self.path} holds no tokenizer/ directory")
        return self.tokenizer_dir

    def load_tokenizer(self):
        """The checkpoint's :class:`aam_func.tokenizer.Tokenizer` (a CheckpointError without one)."""
        from .tokenizer import Tokenizer

        return Tokenizer.load(self.require_tokenizer_dir())


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _save_tensors(flat: Mapping[str, Tensor], path: str, metadata: Optional[dict] = None) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous().cpu() for k, v in flat.items()}, path, metadata=metadata)
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _write_json(obj: Any, path: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())


def save_checkpoint(
    directory: str | os.PathLike,
    *,
    cfg: ModelConfig,
    params: Mapping,
    step: int,
    opt_state: Optional[Mapping] = None,
    rng: Optional[Mapping[str, Tensor]] = None,
    tokenizer=None,
    train_state: Optional[Mapping[str, Any]] = None,
    keep: int = 1,
) -> str:
    """Write a checkpoint directory atomically (see the module docstring); returns its path.
    ``keep``: how many checkpoints to leave, this one included (the older as ``<dir>-<step>``)."""
    check_int("keep", keep, min=1)
    directory = os.path.abspath(os.fspath(directory))
    _check_finite(params, "params", directory)
    if opt_state is not None:
        _check_finite(opt_state, "optimizer state", directory)
    from safetensors import SafetensorError

    try:
        _write_atomically(directory, cfg, params, step, opt_state, rng, tokenizer, train_state, keep)
    except (OSError, SafetensorError) as e:  # a full disk, a read-only or vanished directory
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise CheckpointError(f"could not write the checkpoint {directory!r}: {reason}; the previous checkpoint, "
                              "if any, is unchanged") from None
    return directory


def _check_finite(tree_: Mapping, what: str, directory: str) -> None:
    """A CheckpointError naming the first leaf of ``tree_`` that holds inf or NaN."""
    for name, leaf in tree.flatten(tree_).items():
        if isinstance(leaf, Tensor) and leaf.is_floating_point() and not bool(torch.isfinite(leaf).all()):
            raise CheckpointError(f"refusing to save the checkpoint {directory!r}: inf/NaN in its {what} "
                                  f"(at {name!r}); the previous checkpoint, if any, is unchanged")


def _write_atomically(directory, cfg, params, step, opt_state, rng, tokenizer, train_state, keep) -> None:
    parent = os.path.dirname(directory)
    os.makedirs(parent, exist_ok=True)
    _cleanup_stale(directory)
    tmp = f"{directory}.tmp-{os.getpid()}"
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    os.makedirs(tmp)
    try:
        _write_json(cfg.to_dict(), os.path.join(tmp, CONFIG_FILE))
        _save_tensors(tree.tensors_of(params, "params"), os.path.join(tmp, PARAMS_FILE), {"format": "aam_func.params"})
        if opt_state is not None:
            _save_tensors(tree.tensors_of(opt_state, "optimizer state"), os.path.join(tmp, OPTIMIZER_FILE),
                          {"format": "aam_func.optimizer"})
        if rng:
            _save_tensors({k: v for k, v in rng.items()}, os.path.join(tmp, RNG_FILE))
        if tokenizer is not None:
            tokenizer.save(os.path.join(tmp, TOKENIZER_DIR))
        state = {"format_version": FORMAT_VERSION, "step": int(step), **dict(train_state or {})}
        _write_json(state, os.path.join(tmp, STATE_FILE))  # written last: its presence marks completeness
        _fsync_dir(tmp)
        old = None
        if os.path.exists(directory):
            old = f"{directory}.old-{os.getpid()}"
            os.rename(directory, old)
        os.rename(tmp, directory)
        _fsync_dir(parent)
        if old is not None:
            _retire(old, directory, keep)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _retire(old: str, directory: str, keep: int) -> None:
    """The replaced checkpoint ``old``: removed, or (``keep`` > 1) kept as ``<directory>-<step>``
    with at most ``keep - 1`` such copies, the oldest steps removed first."""
    if keep > 1:
        step = _step_of(old)
        if step is not None:
            kept = f"{directory}-{step}"
            if os.path.exists(kept):
                shutil.rmtree(kept, ignore_errors=True)
            os.rename(old, kept)
            old = None
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    for stale in kept_checkpoints(directory)[keep - 1:]:
        shutil.rmtree(stale, ignore_errors=True)


def _step_of(path: str) -> Optional[int]:
    try:
        with open(os.path.join(path, STATE_FILE), encoding="utf-8") as f:
            step = json.load(f).get("step")
    except (OSError, ValueError, AttributeError):
        return None
    return step if is_int(step) and step >= 0 else None


def kept_checkpoints(directory: str | os.PathLike) -> list[str]:
    """The previous checkpoints kept beside ``directory`` (``<directory>-<step>``), newest step first."""
    directory = os.path.abspath(os.fspath(directory))
    found = []
    for path in glob.glob(glob.escape(directory) + "-*"):
        suffix = path[len(directory) + 1:]
        if suffix.isdigit() and os.path.isdir(path):
            found.append((int(suffix), path))
    return [p for _, p in sorted(found, reverse=True)]


def _cleanup_stale(directory: str) -> None:
    """Remove leftovers of interrupted saves: temp dirs always; ``.old-*`` dirs once the
    checkpoint itself is in place (otherwise the newest ``.old`` is restored first)."""
    for t in glob.glob(glob.escape(directory) + ".tmp-*"):
        shutil.rmtree(t, ignore_errors=True)
    olds = sorted(glob.glob(glob.escape(directory) + ".old-*"), key=os.path.getmtime)
    if olds and not os.path.exists(directory):
        os.rename(olds.pop(), directory)
    for o in olds:
        shutil.rmtree(o, ignore_errors=True)


def resolve_checkpoint(path: str | os.PathLike) -> str:
    """The checkpoint directory for ``path``: the directory itself, ``<path>/checkpoint`` (a run
    directory), or the previous checkpoint left as ``<path>.old-*`` by a save that was killed."""
    path = os.path.abspath(os.fspath(path))
    if os.path.isdir(path) and not os.path.exists(os.path.join(path, CONFIG_FILE)):
        inner = os.path.join(path, "checkpoint")
        if os.path.isdir(inner) or glob.glob(glob.escape(inner) + ".old-*"):
            path = inner
    if not os.path.isdir(path):
        olds = sorted(glob.glob(glob.escape(path) + ".old-*"), key=os.path.getmtime)
        if olds:
            return olds[-1]
        raise CheckpointError(f"no checkpoint at {path!r} (expected a directory with {CONFIG_FILE} and {PARAMS_FILE})")
    return path


def _read_json(path: str, what: str) -> dict:
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint is incomplete: {what} {path!r} is missing")
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"checkpoint {what} {path!r} is corrupted: {e}") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint {what} {path!r} is corrupted: expected a JSON object")
    return obj


def _load_tensors(path: str, what: str) -> dict[str, Tensor]:
    from safetensors import safe_open

    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint is incomplete: {what} {path!r} is missing")
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own types for truncated/corrupted files
        raise CheckpointError(f"checkpoint {what} {path!r} is truncated or corrupted: {e}") from None


def restore_like(template: Mapping, flat: Mapping[str, Tensor], *, what: str = "optimizer state") -> dict:
    """Rebuild ``template``'s nested structure (empty sub-dicts included) from flat saved leaves,
    checking names and shapes; dtypes follow the saved tensors."""
    expected = tree.flatten(template)
    missing = [k for k in expected if k not in flat]
    unexpected = [k for k in flat if k not in expected]
    bad = [f"{k} (expected {tuple(expected[k].shape)}, got {tuple(flat[k].shape)})"
           for k in expected if k in flat and isinstance(expected[k], Tensor) and expected[k].shape != flat[k].shape]
    if missing or unexpected or bad:
        parts = []
        if missing:
            parts.append("missing: " + ", ".join(missing[:8]) + (" ..." if len(missing) > 8 else ""))
        if unexpected:
            parts.append("unexpected: " + ", ".join(unexpected[:8]) + (" ..." if len(unexpected) > 8 else ""))
        if bad:
            parts.append("mis-shaped: " + ", ".join(bad[:8]))
        raise CheckpointError(f"the checkpoint's {what} does not match this optimizer; " + "; ".join(parts))

    return tree.unflatten_like(template, flat)


_STATE_TYPES = {"args": dict, "metrics": dict, "lora": dict, "init_from": str}


def _check_state(state: dict, file: str) -> None:
    """``trainer_state.json``'s format version and the types of the fields a run reads back."""
    if state.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint trainer state {file!r} has format_version "
                              f"{state.get('format_version')!r}; this version of aam_func reads {FORMAT_VERSION}")
    step = state.get("step")
    if not is_int(step) or step < 0:
        raise CheckpointError(f"checkpoint trainer state {file!r}: step must be an int >= 0, got {step!r}")
    if "seed" in state and not is_int(state["seed"]):
        raise CheckpointError(f"checkpoint trainer state {file!r}: seed must be an int, got {state['seed']!r}")
    for key, kind in _STATE_TYPES.items():
        if state.get(key) is not None and not isinstance(state[key], kind):
            raise CheckpointError(f"checkpoint trainer state {file!r}: {key} must be a JSON "
                                  f"{'object' if kind is dict else 'string'}, got {state[key]!r}")


def _check_loaded_params(flat: Mapping[str, Tensor], file: str) -> None:
    """Params are floating point, of one dtype, and finite (a diverged run's NaN weights, or an
    int/half tensor in a float32 model, would otherwise fail late or evaluate to ``nan``)."""
    dtypes = {}
    for name, t in flat.items():
        if not t.is_floating_point():
            raise CheckpointError(f"checkpoint params {file!r}: {name!r} is {t.dtype}, expected a floating-point tensor")
        dtypes.setdefault(t.dtype, name)
    if len(dtypes) > 1:
        found = ", ".join(f"{d} ({n!r})" for d, n in dtypes.items())
        raise CheckpointError(f"checkpoint params {file!r} mix dtypes: {found}; expected one floating dtype")
    for name, t in flat.items():
        if not bool(torch.isfinite(t).all()):
            raise CheckpointError(f"checkpoint params {file!r}: {name!r} holds inf/NaN (saved from a diverged run?)")


def load_checkpoint(path: str | os.PathLike, *, opt_template: Optional[Mapping] = None,
                    load_optimizer: bool = True) -> Checkpoint:
    """Read and validate a checkpoint. Every problem (missing file, truncated tensors, invalid
    config, params that do not fit the config) is a :class:`CheckpointError` naming the file."""
    from .model import Transformer

    path = resolve_checkpoint(path)
    state = _read_json(os.path.join(path, STATE_FILE), "trainer state")
    _check_state(state, os.path.join(path, STATE_FILE))
    try:
        cfg = ModelConfig.from_dict(_read_json(os.path.join(path, CONFIG_FILE), "config"))
    except (TypeError, ValueError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"checkpoint config {os.path.join(path, CONFIG_FILE)!r} is invalid: {e}") from None
    flat_params = _load_tensors(os.path.join(path, PARAMS_FILE), "params file")
    _check_loaded_params(flat_params, os.path.join(path, PARAMS_FILE))
    try:
        model = Transformer(cfg)
        model.check_params(tree.unflatten(flat_params))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"checkpoint params {os.path.join(path, PARAMS_FILE)!r} do not fit its config: {e}") from None
    # the model's own leaf order (safetensors sorts names): reductions over leaves then sum in
    # the same order as in the run that saved, which bitwise resume needs
    params = restore_like(model.param_shapes(), flat_params, what="params")
    opt_state = None
    opt_file = os.path.join(path, OPTIMIZER_FILE)
    if load_optimizer and os.path.exists(opt_file):
        flat = _load_tensors(opt_file, "optimizer state")
        opt_state = restore_like(opt_template, flat) if opt_template is not None else tree.unflatten(flat)
    elif load_optimizer and opt_template is not None:
        raise CheckpointError(f"checkpoint is incomplete: optimizer state {opt_file!r} is missing")
    rng_file = os.path.join(path, RNG_FILE)
    rng = _load_tensors(rng_file, "RNG state") if os.path.exists(rng_file) else {}
    tok_dir = os.path.join(path, TOKENIZER_DIR)
    return Checkpoint(
        path=path, cfg=cfg, params=params, step=state["step"], opt_state=opt_state, rng=rng,
        train_state=state, tokenizer_dir=tok_dir if os.path.isdir(tok_dir) else None,
    )
