"""Parameter-efficient fine-tuning as pure transforms: LoRA over weights, P-tuning over inputs.

    from aam_func.peft import lora, ptuning
"""

from . import lora
from .lora import LoRA

__all__ = ["lora", "LoRA"]
