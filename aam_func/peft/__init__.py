"""Parameter-efficient fine-tuning as pure transforms: LoRA over weights, P-tuning over inputs.

    from aam_func.peft import lora, ptuning
    spec, adapters = lora.init(params_or_module, targets=["*.attn.qkv"], rank=8, alpha=16)
    prompt = ptuning.init(d_model, num_virtual_tokens=10, encoder="mlp")

PEFT's adapter files: :func:`save_pretrained` / :func:`load_pretrained`, re-exported from
:mod:`aam_func.interop.peft` (the file format's owner, which builds on ``lora``).
"""

from . import lora, ptuning
from .lora import LoRA, Target
from ..interop.peft import AdapterFileError, load_pretrained, save_pretrained

__all__ = ["lora", "ptuning", "LoRA", "Target", "save_pretrained", "load_pretrained", "AdapterFileError"]
