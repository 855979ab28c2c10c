"""A transformers model on disk as the start of a run: a ``save_pretrained`` directory or a
model name in the local Hugging Face cache, read offline (nothing is ever downloaded).

    path = resolve_model_dir("runs/tiny-llama")       # a directory holding config.json
    path = resolve_model_dir("org/tiny-llama")        # HF cache: models--org--tiny-llama/snapshots/<rev>
    ckpt = load_pretrained_model(path)                # a Checkpoint: cfg, params, tokenizer_dir, step 0

The result is an :class:`aam_func.checkpoint.Checkpoint` (step 0, no optimizer state) whose
``tokenizer_dir`` is the model's own directory, so ``aam-func train --init-from`` treats it like
one of its own checkpoints. Every problem is a :class:`PretrainedError` (a ``ValueError``) with one
line that names the path or name and what was expected.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
from typing import Optional

import torch

__all__ = ["PretrainedError", "is_init_source", "is_transformers_dir", "looks_like_model_name", "hub_cache_dir", "cached_models",
           "resolve_model_dir", "load_pretrained_model"]

CONFIG = "config.json"
# one of these holds a tokenizer's vocabulary (transformers reads others from them)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt")
# an aam_func checkpoint holds these beside its config.json; a transformers directory does not
_AAM_FILES = ("trainer_state.json", "params.safetensors")


class PretrainedError(ValueError):
    """A transformers model directory or cached name that cannot start a run."""


def is_transformers_dir(path: str) -> bool:
    """A directory with a transformers ``config.json`` (one naming a ``model_type``), not an
    aam_func checkpoint or run directory."""
    if not os.path.isdir(path) or any(os.path.exists(os.path.join(path, f)) for f in _AAM_FILES):
        return False
    cfg = os.path.join(path, CONFIG)
    if not os.path.isfile(cfg):
        return False
    try:
        with open(cfg, encoding="utf-8") as f:
            return "model_type" in json.load(f)
    except (OSError, ValueError):
        return False


def is_init_source(path: str) -> bool:
    """Whether ``--init-from path`` means a transformers model: a transformers directory, a
    directory that is neither a checkpoint nor a run directory, or a model name (``org/name``)
    that is no path on disk (an absolute path that does not exist is a missing checkpoint)."""
    if os.path.isdir(path):
        inner = os.path.join(path, "checkpoint")
        return is_transformers_dir(path) or not (os.path.exists(os.path.join(path, CONFIG)) or os.path.isdir(inner)
                                                  or glob.glob(glob.escape(inner) + ".old-*"))
    return looks_like_model_name(path) and not glob.glob(glob.escape(path) + ".old-*")


def looks_like_model_name(name: str) -> bool:
    """``name`` or ``org/name``: no leading ``.``, ``/`` or ``~`` and at most one slash."""
    return bool(name) and not name.startswith((".", "/", "~")) and name.count("/") <= 1 and os.sep == "/"


def hub_cache_dir() -> str:
    """The Hugging Face hub cache: ``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else
    ``~/.cache/huggingface/hub`` (read from the environment at each call)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    home = os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface")
    return os.path.join(home, "hub")


def cached_models(cache: Optional[str] = None) -> list[str]:
    """The model names in the hub cache (``models--org--name`` -> ``org/name``), sorted."""
    cache = cache or hub_cache_dir()
    try:
        entries = os.listdir(cache)
    except OSError:
        return []
    return sorted(e[len("models--"):].replace("--", "/", 1) for e in entries
                  if e.startswith("models--") and os.path.isdir(os.path.join(cache, e)))


def _snapshot(repo: str) -> Optional[str]:
    """The snapshot directory of a cached repo: the one ``refs/main`` names, else the newest."""
    snaps = os.path.join(repo, "snapshots")
    ref = os.path.join(repo, "refs", "main")
    if os.path.isfile(ref):
        with open(ref, encoding="utf-8") as f:
            rev = f.read().strip()
        if rev and os.path.isdir(os.path.join(snaps, rev)):
            return os.path.join(snaps, rev)
    try:
        found = [os.path.join(snaps, s) for s in os.listdir(snaps) if os.path.isdir(os.path.join(snaps, s))]
    except OSError:
        return None
    return max(found, key=os.path.getmtime) if found else None


def resolve_model_dir(name_or_path: str) -> str:
    """The local directory of ``name_or_path``: itself when it is a directory holding a
    transformers ``config.json``, else the cached snapshot of that model name. A directory
    without config.json, a path that does not exist and a name that is not cached are errors
    (the last lists the cached names)."""
    if os.path.isdir(name_or_path):
        if not os.path.isfile(os.path.join(name_or_path, CONFIG)):
            raise PretrainedError(f"{name_or_path!r} holds no {CONFIG}: expected a transformers save_pretrained "
                                  "directory or an aam-func checkpoint")
        return os.path.abspath(name_or_path)
    if not looks_like_model_name(name_or_path):
        raise PretrainedError(f"{name_or_path!r} does not exist (expected a checkpoint, a transformers model "
                              "directory or a model name in the local Hugging Face cache)")
    cache = hub_cache_dir()
    repo = os.path.join(cache, "models--" + name_or_path.replace("/", "--"))
    snap = _snapshot(repo) if os.path.isdir(repo) else None
    if snap is None:
        names = cached_models(cache)
        listed = ", ".join(names) if names else "none"
        raise PretrainedError(f"{name_or_path!r} is not a directory and not in the local Hugging Face cache "
                              f"{cache} (nothing is downloaded); cached models: {listed}")
    if not os.path.isfile(os.path.join(snap, CONFIG)):
        raise PretrainedError(f"the cached {name_or_path!r} ({snap}) holds no {CONFIG}: only part of the model "
                              "is in the cache")
    return snap


def _read_config(path: str):
    from transformers import AutoConfig

    from .hf import SUPPORTED, SUPPORTED_NAMES

    try:
        with open(os.path.join(path, CONFIG), encoding="utf-8") as f:
            model_type = json.load(f).get("model_type")
    except (OSError, ValueError, AttributeError) as e:
        raise PretrainedError(f"{os.path.join(path, CONFIG)}: not a readable transformers config ({e})") from None
    if model_type not in SUPPORTED:
        raise PretrainedError(f"{path}: unsupported architecture model_type={model_type!r}; supported: "
                              f"{SUPPORTED_NAMES}")
    try:
        return AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    except Exception as e:  # transformers raises many kinds for a malformed config
        raise PretrainedError(f"{os.path.join(path, CONFIG)}: transformers cannot read it: {_first_line(e)}") from None


def load_pretrained_model(name_or_path: str):
    """A :class:`aam_func.checkpoint.Checkpoint` (step 0, float32 params, no optimizer state)
    holding the transformers model at ``name_or_path`` (:func:`resolve_model_dir`), its
    ``tokenizer_dir`` the model's directory. The architecture is checked before any weight is
    read; the model's tokenizer must be there, with no more ids than the model embeds."""
    from transformers import AutoModelForCausalLM

    from ..checkpoint import Checkpoint
    from ..tokenizer import Tokenizer, TokenizerError
    from .hf import config_from_transformers, from_transformers

    path = resolve_model_dir(name_or_path)
    hf_config = _read_config(path)
    try:
        config_from_transformers(hf_config)  # an unmappable variant is refused before the weights load
    except ValueError as e:
        raise PretrainedError(f"{path}: {e}") from None
    if not any(os.path.isfile(os.path.join(path, f)) for f in TOKENIZER_FILES):
        raise PretrainedError(f"{path}: the model's tokenizer is missing (none of {', '.join(TOKENIZER_FILES)}); "
                              "save it beside the model with tokenizer.save_pretrained(directory)")
    try:
        tok = Tokenizer.load(path)
    except TokenizerError as e:
        raise PretrainedError(f"{path}: the model's tokenizer: {e}") from None
    try:
        with quiet_transformers():
            model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, trust_remote_code=False,
                                                         dtype=torch.float32)
    except Exception as e:
        raise PretrainedError(f"{path}: transformers cannot load the weights: {_first_line(e)}") from None
    cfg, params = from_transformers(model.eval())
    if tok.vocab_size > cfg.vocab_size:
        raise PretrainedError(f"{path}: the tokenizer has {tok.vocab_size} tokens but the model embeds only "
                              f"{cfg.vocab_size} (vocab_size in {CONFIG})")
    return Checkpoint(path=path, cfg=cfg, params=params, step=0, train_state={"source": "transformers",
                      "model_type": hf_config.model_type}, tokenizer_dir=path)


@contextlib.contextmanager
def quiet_transformers():
    """transformers' progress bars off (they would interleave with the command's own lines)."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__
