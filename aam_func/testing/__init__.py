"""Public test tools: certify custom ops and functional models under every torch.func transform.

- :func:`check_op` (and :func:`op_tests`, one pytest test per check): an op against its
  reference under grad, gradcheck, gradgradcheck, jvp, vmap (in_dims, nested, of grad and jvp),
  non-contiguous and broadcast inputs, bf16 autocast and torch.compile.
- model properties (:mod:`aam_func.testing.models`): ``check_causal``,
  ``check_padding_invariance``, ``check_batch_invariance``, ``check_vmap_equals_loop``,
  ``check_init_determinism``; ``from_module`` for an ``nn.Module``.
- hypothesis strategies (:mod:`aam_func.testing.strategies`; needs ``pip install aam-func[testing]``,
  imported only when used).
"""

from ._report import CheckResult, OpCheckError, OpReport
from .models import (PropertyError, check_batch_invariance, check_causal, check_init_determinism,
                     check_padding_invariance, check_vmap_equals_loop, from_module)
from .ops import ALL_CHECKS, COMPILE_CHECKS, FORWARD_AD_CHECKS, check_op, op_tests

__all__ = ["check_op", "op_tests", "OpReport", "CheckResult", "OpCheckError", "ALL_CHECKS",
           "COMPILE_CHECKS", "FORWARD_AD_CHECKS", "PropertyError", "check_causal",
           "check_padding_invariance", "check_batch_invariance", "check_vmap_equals_loop",
           "check_init_determinism", "from_module", "strategies"]


def __getattr__(name):
    if name == "strategies":  # hypothesis is optional: imported on first use
        import importlib

        return importlib.import_module(f"{__name__}.strategies")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
