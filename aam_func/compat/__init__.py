"""The guide's class API, thin, over the functional core.

Code written against the guide runs with one changed import::

    from aam_func.compat import ModelConfig, AdvancedTransformerModel, AdvancedTrainingPipeline, ...

Every class here is a ``torch.nn.Module`` (or a plain object) made with :func:`aam_func.nn.bind`
over the functional specs, or a forwarding wrapper around ``aam_func.losses``, ``aam_func.optim``,
``aam_func.peft``, ``aam_func.tokenizer``, ``aam_func.train`` and ``aam_func.generate``. There is
no second implementation of any math: a compat module's ``named_parameters()`` are the spec's
Params names, its ``forward`` is the spec's ``apply``, and :class:`AdvancedTrainingPipeline`
runs :func:`aam_func.train.make_train_step` on those very tensors, so a compat run and a
functional run from the same seed end with the same params (tested).

Where the guide's own code is wrong (an integer tensor with ``requires_grad``, ``setattr`` with a
dotted name, GPT-2's ``Conv1D``, a GPT-2 tokenizer feeding a 1000-token model,
``torch.jit.script``), this module gives the intended behaviour or an error naming the right
call; ``docs/compat.md`` lists each case.
"""

from ..config import ModelConfig
from ..tokenizer import TokenizerError
from .layers import AdvancedMultiHeadAttention, AdvancedPositionalEncoding, P_TuningLayer
from .lora import LoRALayer, LoRALinear, apply_lora
from .model import AdvancedTokenizer, AdvancedTransformerModel
from .training import AdvancedLossFunctions, AdvancedOptimizers, AdvancedTrainingPipeline

__all__ = [
    "ModelConfig",
    "AdvancedPositionalEncoding",
    "AdvancedMultiHeadAttention",
    "LoRALayer",
    "LoRALinear",
    "apply_lora",
    "P_TuningLayer",
    "AdvancedLossFunctions",
    "AdvancedOptimizers",
    "AdvancedTokenizer",
    "TokenizerError",
    "AdvancedTransformerModel",
    "AdvancedTrainingPipeline",
]
