"""PEFT's LoRA adapter files, written and read without PEFT (LoRA itself: :mod:`aam_func.peft.lora`).

    save_pretrained(spec, adapters, "out/adapter", base_model=hf_model)    # or an aam_func Transformer / ModelConfig
    spec, adapters = load_pretrained("out/adapter", base_model=hf_model)   # refuses files for another model
    peft.PeftModel.from_pretrained(hf_model, "out/adapter")                # loads them too

Layout (what ``peft.LoraModel.save_pretrained`` writes): ``adapter_config.json`` (``peft_type``
"LORA", ``r``, ``lora_alpha``, ``target_modules``, ``fan_in_fan_out``, ``use_rslora``, …) and
``adapter_model.safetensors`` with keys ``base_model.model.<module path>.lora_A.weight`` (r, in)
and ``….lora_B.weight`` (out, r): raw A and B, never pre-scaled (the scale is rebuilt from
``lora_alpha`` and ``r``). ``target_modules`` lists the full module paths, so PEFT adapts
exactly the modules in the file.

aam_func models are written under transformers' names (GPT-2: ``blocks.i.attn.qkv`` ->
``transformer.h.i.attn.c_attn`` with ``fan_in_fan_out``; LLaMA: the fused ``qkv`` adapter is
written as ``q_proj``/``k_proj``/``v_proj`` adapters sharing A, with B split by rows — exact,
since rows of B·A are rows of B times A), so ``PeftModel.from_pretrained`` on the exported
transformers model reproduces our logits.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from typing import Any, Optional

import torch
from torch import Tensor, nn

from .. import tree
from ..checks import is_number
from ..config import ModelConfig
from ..layers.attention import qkv_sizes
from ..model import Transformer
from ..peft.lora import LoRA
from ..peft.targets import Target, module_candidates
from . import hf

__all__ = ["save_pretrained", "load_pretrained", "AdapterFileError", "CONFIG_FILE", "WEIGHTS_FILE"]

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."
_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<ab>[AB])\.weight$")


class AdapterFileError(ValueError):
    """An adapter directory is unreadable, unsupported, or does not fit the model."""


# --------------------------------------------------------------------------- name maps


def _aam_cfg(base_model: Any):
    if isinstance(base_model, Transformer):
        return base_model.cfg
    if isinstance(base_model, ModelConfig):
        return base_model
    return None


def _aam_maps(cfg) -> tuple[str, dict[str, tuple[str, bool]]]:
    """(model_type, {our module name: (transformers module name, fan_in_fan_out)}) for Linear-like
    weights; LLaMA's fused qkv is handled separately."""
    model_type = hf.config_to_transformers(cfg).model_type
    out = {}
    if model_type == "gpt2":
        for ours, theirs, transpose in hf.gpt2_map(cfg):
            if ours.endswith(".weight") and (transpose or ours == "lm_head.weight"):
                out[ours[:-7]] = (theirs[:-7], transpose)
    else:
        for ours, theirs in hf.llama_map(cfg):
            if ours.endswith(".weight") and (".attn." in ours or ".mlp." in ours or ours == "lm_head.weight"):
                out[ours[:-7]] = (theirs[:-7], False)
    return model_type, out


def _to_file(spec: LoRA, adapters: Mapping, base_model: Any) -> tuple[dict[str, Tensor], list[str], bool]:
    """({module path: (A, B)} in the base model's names, target module list, fan_in_fan_out)."""
    ab = spec.check(adapters)
    cfg = _aam_cfg(base_model)
    modules: dict[str, tuple[Tensor, Tensor]] = {}
    fif = []
    if cfg is not None:
        shapes = tree.flatten(Transformer(cfg).param_shapes())
        model_type, names = _aam_maps(cfg)
        problems = []
        for t in spec.targets:
            key = t.name + ".weight"
            if key not in shapes or tuple(shapes[key]) != t.weight_shape or t.fan_in_fan_out:
                problems.append(f"{t.name} (not a {t.weight_shape} weight of this model)")
                continue
            a, b = ab[t.name]
            m = re.fullmatch(r"blocks\.(\d+)\.attn\.qkv", t.name)
            if m and model_type != "gpt2":
                p = f"model.layers.{m.group(1)}.self_attn."
                for proj, bb in zip(("q_proj", "k_proj", "v_proj"), b.split(qkv_sizes(cfg.n_heads, cfg.n_kv_heads, cfg.head_dim), 0)):
                    modules[p + proj] = (a, bb)
                    fif.append(False)
            elif t.name in names:
                theirs, transpose = names[t.name]
                modules[theirs] = (a, b)
                fif.append(transpose)
            else:
                problems.append(f"{t.name} (PEFT's LoRA files hold linear layers only)")
        if problems:
            raise AdapterFileError("cannot write these adapters as PEFT files for this model: " + ", ".join(problems))
    elif isinstance(base_model, nn.Module):
        cands = {c.name: c for c in module_candidates(base_model)}
        problems = [t.name for t in spec.targets if cands.get(t.name) != t]
        if problems:
            raise AdapterFileError(
                f"the adapters do not fit {type(base_model).__name__}: no matching nn.Linear/Conv1D for "
                + ", ".join(problems)
            )
        for t in spec.targets:
            modules[t.name] = ab[t.name]
            fif.append(t.fan_in_fan_out)
    else:
        raise TypeError(
            "base_model must be the torch.nn.Module the adapters belong to, or an aam_func Transformer/ModelConfig, "
            f"got {type(base_model).__name__}"
        )
    # PEFT's fan_in_fan_out is one flag; it corrects it per layer type (with a warning) when mixed
    return modules, list(modules), any(fif)


# --------------------------------------------------------------------------- save


def save_pretrained(
    spec: LoRA,
    adapters: Mapping,
    directory: str | os.PathLike,
    *,
    base_model: Any,
    base_model_name_or_path: Optional[str] = None,
    task_type: Optional[str] = "CAUSAL_LM",
) -> str:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` (PEFT's format) for the
    model ``base_model`` (the nn.Module the adapters were made for, or an aam_func Transformer /
    ModelConfig whose transformers export will carry them). Returns the directory."""
    modules, target_modules, fif = _to_file(spec, adapters, base_model)
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    flat = {}
    for name, (a, b) in modules.items():
        flat[f"{PREFIX}{name}.lora_A.weight"] = a.detach()
        flat[f"{PREFIX}{name}.lora_B.weight"] = b.detach()
    from safetensors.torch import save_file

    save_file({k: v.contiguous().cpu().clone() for k, v in flat.items()}, os.path.join(directory, WEIGHTS_FILE),
              metadata={"format": "pt"})
    config = {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "r": spec.rank,
        "lora_alpha": spec.alpha,
        "lora_dropout": spec.dropout,
        "use_rslora": spec.use_rslora,
        "target_modules": target_modules,
        "fan_in_fan_out": fif,
        "bias": "none",
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "use_dora": False,
        "lora_bias": False,
        "revision": None,
    }
    with open(os.path.join(directory, CONFIG_FILE), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    return directory


# --------------------------------------------------------------------------- load


def _read(directory: str) -> tuple[dict, dict[str, Tensor]]:
    cfg_path, w_path = os.path.join(directory, CONFIG_FILE), os.path.join(directory, WEIGHTS_FILE)
    for p in (cfg_path, w_path):
        if not os.path.exists(p):
            raise AdapterFileError(f"not a PEFT LoRA adapter directory: {p!r} is missing")
    try:
        with open(cfg_path) as f:
            config = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise AdapterFileError(f"cannot read {cfg_path!r}: {e}") from None
    try:
        from safetensors.torch import load_file

        flat = load_file(w_path)
    except Exception as e:
        raise AdapterFileError(f"cannot read {w_path!r}: {e}") from None
    return config, flat


def _check_config(config: dict, path: str) -> None:
    if config.get("peft_type") != "LORA":
        raise AdapterFileError(f"{path}: peft_type is {config.get('peft_type')!r}, expected 'LORA'")
    unsupported = [k for k in ("use_dora", "lora_bias") if config.get(k)]
    unsupported += [k for k in ("rank_pattern", "alpha_pattern") if config.get(k)]
    if config.get("bias", "none") != "none":
        unsupported.append(f"bias={config['bias']!r}")
    if config.get("modules_to_save"):
        unsupported.append("modules_to_save")
    if unsupported:
        raise AdapterFileError(f"{path}: unsupported LoRA options: {', '.join(unsupported)}")
    for k in ("r", "lora_alpha"):
        if not is_number(config.get(k)):
            raise AdapterFileError(f"{path}: {k} is missing or not a number")


def load_pretrained(directory: str | os.PathLike, *, base_model: Any = None) -> tuple[LoRA, dict]:
    """``(spec, adapters)`` from a PEFT LoRA directory (ours or PEFT's).

    With ``base_model`` (an nn.Module, or an aam_func Transformer/ModelConfig) every key must name
    an nn.Linear/Conv1D of that model with matching shapes, and every module the file's
    ``target_modules`` selects must have its A and B: anything else is an
    :class:`AdapterFileError` listing the problems (PEFT itself only warns). Adapter names are
    the base model's (aam_func names for aam_func models). Without ``base_model`` the file's
    module paths are kept and orientation follows ``fan_in_fan_out``."""
    directory = os.fspath(directory)
    config, flat = _read(directory)
    _check_config(config, directory)
    r, alpha = int(config["r"]), float(config["lora_alpha"])
    pairs: dict[str, dict[str, Tensor]] = {}
    bad_keys = []
    for key, t in flat.items():
        m = _KEY.match(key)
        if not m:
            bad_keys.append(key)
            continue
        pairs.setdefault(m.group("module"), {})[m.group("ab")] = t
    if bad_keys:
        raise AdapterFileError(f"{directory}: keys that are not PEFT LoRA A/B weights: {', '.join(bad_keys[:10])}")
    problems = [f"{n} lacks lora_{x}" for n, ab in pairs.items() for x in "AB" if x not in ab]
    for n, ab in pairs.items():
        if "A" in ab and "B" in ab and (ab["A"].dim() != 2 or ab["B"].dim() != 2 or ab["A"].shape[0] != r
                                        or ab["B"].shape[1] != r):
            problems.append(f"{n}: A {tuple(ab['A'].shape)} / B {tuple(ab['B'].shape)} are not (r={r}, in) / (out, r)")
    if problems:
        raise AdapterFileError(f"{directory}: " + "; ".join(problems))
    fif = bool(config.get("fan_in_fan_out", False))
    common = dict(rank=r, alpha=alpha, dropout=float(config.get("lora_dropout", 0.0) or 0.0),
                  use_rslora=bool(config.get("use_rslora", False)))

    cfg = _aam_cfg(base_model)
    if cfg is not None:
        return _load_aam(cfg, pairs, config, directory, common)
    if isinstance(base_model, nn.Module):
        cands = {c.name: c for c in module_candidates(base_model)}
        targets, problems = [], []
        for n, ab in pairs.items():
            c = cands.get(n)
            if c is None:
                problems.append(f"{n} is not an nn.Linear/Conv1D of the model")
            elif (ab["A"].shape[1], ab["B"].shape[0]) != (c.in_features, c.out_features):
                problems.append(f"{n}: adapter is {ab['A'].shape[1]} -> {ab['B'].shape[0]}, "
                                f"the model's layer is {c.in_features} -> {c.out_features}")
            else:
                targets.append(c)
        problems += _uncovered(cands, pairs, config.get("target_modules"))
        if problems:
            raise AdapterFileError(
                f"adapter files in {directory!r} do not match {type(base_model).__name__}: " + "; ".join(problems)
            )
    elif base_model is None:
        targets = [Target(n, ab["A"].shape[1], ab["B"].shape[0], fif) for n, ab in pairs.items()]
    else:
        raise TypeError(f"base_model must be an nn.Module, an aam_func Transformer/ModelConfig or None, "
                        f"got {type(base_model).__name__}")
    order = list(cands) if isinstance(base_model, nn.Module) else list(pairs)
    targets.sort(key=lambda t: order.index(t.name))  # the model's order, not the file's (sorted) one
    spec = LoRA(tuple(targets), **common)
    adapters = tree.unflatten({f"{t.name}.lora_{x}": pairs[t.name][x] for t in targets for x in "AB"})
    return spec, adapters


def _uncovered(cands: Mapping[str, Target], pairs: Mapping, target_modules) -> list[str]:
    """Modules the config's target_modules select (PEFT's rule) that the file has no weights for."""
    if not target_modules:
        return []
    if isinstance(target_modules, str):
        sel = [n for n in cands if re.fullmatch(target_modules, n)]
    else:
        sel = [n for n in cands if any(n == p or n.endswith("." + p) for p in target_modules)]
    missing = [n for n in sel if n not in pairs]
    return [f"target_modules selects {', '.join(missing)} but the file has no adapters for them"] if missing else []


def _load_aam(cfg, pairs: dict, config: dict, directory: str, common: dict) -> tuple[LoRA, dict]:
    shapes = tree.flatten(Transformer(cfg).param_shapes())
    model_type, names = _aam_maps(cfg)
    inverse = {theirs: ours for ours, (theirs, _) in names.items()}
    flat, targets, problems, seen = {}, [], [], set()
    for n in pairs:
        if n in seen:
            continue
        m = re.fullmatch(r"model\.layers\.(\d+)\.self_attn\.([qkv])_proj", n)
        if m and model_type != "gpt2":
            p = f"model.layers.{m.group(1)}.self_attn."
            trio = [p + x for x in ("q_proj", "k_proj", "v_proj")]
            seen.update(trio)
            if not all(t in pairs for t in trio):
                problems.append(f"{p}q/k/v_proj: our fused qkv needs adapters on all three")
                continue
            a = pairs[trio[0]]["A"]
            if not all(torch.equal(pairs[t]["A"], a) for t in trio[1:]):
                problems.append(f"{p}q/k/v_proj: A differs between q, k and v, which a fused qkv adapter of rank "
                                f"{common['rank']} cannot represent")
                continue
            ours, b = f"blocks.{m.group(1)}.attn.qkv", torch.cat([pairs[t]["B"] for t in trio], 0)
        elif n in inverse:
            seen.add(n)
            ours, a, b = inverse[n], pairs[n]["A"], pairs[n]["B"]
        else:
            problems.append(f"{n} is not a linear layer of this {model_type} model")
            continue
        want = tuple(shapes[ours + ".weight"])  # (out, in)
        if (b.shape[0], a.shape[1]) != want:
            problems.append(f"{n}: adapter is {a.shape[1]} -> {b.shape[0]}, the model's layer is {want[1]} -> {want[0]}")
            continue
        targets.append(Target(ours, want[1], want[0], False))
        flat[ours + ".lora_A"], flat[ours + ".lora_B"] = a, b
    hf_cands = {theirs: None for theirs in inverse}
    if model_type != "gpt2":
        for i in range(cfg.n_layers):
            hf_cands.update({f"model.layers.{i}.self_attn.{x}_proj": None for x in "qkv"})
    problems += _uncovered(hf_cands, pairs, config.get("target_modules"))
    if problems:
        raise AdapterFileError(f"adapter files in {directory!r} do not match this aam_func model: " + "; ".join(problems))
    order = list(shapes)
    targets.sort(key=lambda t: order.index(t.name + ".weight"))  # the model's order, not the file's
    flat = {f"{t.name}.lora_{x}": flat[f"{t.name}.lora_{x}"] for t in targets for x in "AB"}
    return LoRA(tuple(targets), **common), tree.unflatten(flat)
