"""A trained checkpoint written for other tools: what ``aam-func export`` does, as library calls.

    export_checkpoint("runs/x", "out/model", "transformers")   # config + weights + tokenizer: from_pretrained loads it
    export_checkpoint("runs/lora", "out/adapter", "peft")      # a LoRA run's adapters: PeftModel.from_pretrained
    export_checkpoint("runs/x", "out/model.safetensors", "safetensors")  # our names, ModelConfig in the metadata

- ``transformers``: a ``save_pretrained`` directory (``config.json``, ``generation_config.json``,
  ``model.safetensors``) plus the run's tokenizer, its bos/eos/pad ids written into both configs,
  so that ``AutoModelForCausalLM`` + ``AutoTokenizer`` + ``pipeline("text-generation")`` decode
  as ``aam-func generate`` does. GPT-2- and LLaMA-shaped models (:mod:`aam_func.interop.hf`).
- ``peft``: the adapters of a LoRA run (``--lora-rank``) in PEFT's files, under the transformers
  names of the model the run started from (``base_model_name_or_path`` is its ``--init-from``),
  plus the tokenizer.
- ``safetensors``: one file of the params under aam_func's names; its metadata holds the
  ModelConfig (``"config"``, JSON) and ``"format": "aam_func.params"``; any architecture.

The output is written into a temporary sibling and renamed into place; an existing output is
refused unless ``overwrite``. Problems are :class:`ExportError` (a ``ValueError``), one line each.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Optional

__all__ = ["ExportError", "FORMATS", "export_checkpoint", "export_transformers", "export_peft", "export_safetensors"]

FORMATS = ("transformers", "peft", "safetensors")


class ExportError(ValueError):
    """A checkpoint that cannot be exported as asked."""


def export_checkpoint(checkpoint: str, output: str, format: str, *, overwrite: bool = False) -> str:
    """Write ``checkpoint`` (a checkpoint or run directory) to ``output`` in ``format`` (one of
    :data:`FORMATS`); returns the output path."""
    from ..checkpoint import load_checkpoint

    if format not in FORMATS:
        raise ExportError(f"format must be one of {', '.join(FORMATS)}, got {format!r}")
    output = os.path.abspath(output)
    if os.path.lexists(output) and not overwrite:
        raise ExportError(f"--output {output} already exists; pass --overwrite to replace it")
    ckpt = load_checkpoint(checkpoint, load_optimizer=False)
    write = {"transformers": export_transformers, "peft": export_peft, "safetensors": export_safetensors}[format]
    tmp = f"{output}.tmp-{os.getpid()}"
    _remove(tmp)
    os.makedirs(os.path.dirname(output), exist_ok=True)
    try:
        write(ckpt, tmp)
        _remove(output)
        os.rename(tmp, output)
    finally:
        _remove(tmp)
    return output


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.remove(path)


def _special_ids(tok) -> dict:
    hf = tok.hf
    return {"bos_token_id": hf.bos_token_id, "eos_token_id": hf.eos_token_id, "pad_token_id": hf.pad_token_id}


def export_transformers(ckpt, directory: str) -> None:
    """``ckpt`` as a transformers model directory with its tokenizer (see the module docstring)."""
    from .hf import to_transformers
    from .pretrained import quiet_transformers

    tok = ckpt.load_tokenizer()
    try:
        model = to_transformers(ckpt.cfg, ckpt.params)
    except ValueError as e:
        raise ExportError(f"checkpoint {ckpt.path} has no transformers equivalent: {e}; "
                          "--format safetensors writes any model") from None
    ids = _special_ids(tok)
    for k, v in ids.items():
        setattr(model.config, k, v)
        setattr(model.generation_config, k, v)
    with quiet_transformers():
        model.save_pretrained(directory)
    tok.hf.save_pretrained(directory)


def export_peft(ckpt, directory: str) -> None:
    """A LoRA run's adapters as PEFT files for the model it started from (see the module docstring)."""
    from .peft import load_pretrained, save_pretrained

    lora = ckpt.train_state.get("lora")
    if not lora:
        raise ExportError(f"checkpoint {ckpt.path} is not from a LoRA run (--lora-rank): it has no adapters; "
                          "export its weights with --format transformers or safetensors")
    adapter_dir = lora.get("adapter_dir") or os.path.join(os.path.dirname(ckpt.path), "adapter")
    if not os.path.isfile(os.path.join(adapter_dir, "adapter_config.json")):
        raise ExportError(f"the LoRA run's adapters are not in PEFT files at {adapter_dir} (only GPT-2- and "
                          "LLaMA-shaped models have them); nothing to export as --format peft")
    spec, adapters = load_pretrained(adapter_dir, base_model=ckpt.cfg)
    save_pretrained(spec, adapters, directory, base_model=ckpt.cfg,
                    base_model_name_or_path=ckpt.train_state.get("init_from"))
    ckpt.load_tokenizer().hf.save_pretrained(directory)


def export_safetensors(ckpt, path: str) -> None:
    """The params under aam_func's names in one safetensors file, the ModelConfig in its metadata."""
    from .. import tree

    tree.save(ckpt.params, path, {"format": "aam_func.params", "config": json.dumps(ckpt.cfg.to_dict(), sort_keys=True)})


def read_safetensors(path: str) -> tuple:
    """``(ModelConfig, params)`` of a file written by :func:`export_safetensors`."""
    from safetensors import safe_open

    from .. import tree
    from ..config import ModelConfig

    with safe_open(path, framework="pt") as f:
        meta: Optional[dict] = f.metadata()
    if not meta or meta.get("format") != "aam_func.params" or "config" not in meta:
        raise ExportError(f"{path} is not an aam_func params file (no aam_func.params metadata)")
    return ModelConfig.from_dict(json.loads(meta["config"])), tree.load(path)
