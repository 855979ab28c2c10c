"""Parameter-efficient fine-tuning as pure transforms: LoRA over weights, P-tuning over inputs.

    from aam_func.peft import lora, ptuning
    spec, adapters = lora.init(params_or_module, targets=["*.attn.qkv"], rank=8, alpha=16)
    prompt = ptuning.init(d_model, num_virtual_tokens=10, encoder="mlp")

PEFT's adapter files: :func:`save_pretrained` / :func:`load_pretrained`, re-exported from
:mod:`aam_func.interop.peft` (the file format's owner, which builds on ``lora``). The re-export
is lazy (PEP 562 ``__getattr__``): ``interop.peft`` imports ``peft.lora``, so importing it here
eagerly would make the two packages a cycle that only works in one import order.
"""

from importlib import import_module

from . import lora, ptuning
from .lora import LoRA, Target

_FROM_INTEROP = ("save_pretrained", "load_pretrained", "AdapterFileError")

__all__ = ["lora", "ptuning", "LoRA", "Target", "save_pretrained", "load_pretrained", "AdapterFileError"]


def __getattr__(name: str):
    """``save_pretrained`` / ``load_pretrained`` / ``AdapterFileError`` from their owner,
    :mod:`aam_func.interop.peft`, imported on first use."""
    if name in _FROM_INTEROP:
        value = getattr(import_module("..interop.peft", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_FROM_INTEROP))
