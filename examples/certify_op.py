"""Certify a custom op for torch.func with aam_func.testing.check_op, then break it on purpose.

    python examples/certify_op.py

The op is a softplus, ``log(1 + exp(x))``, written as a ``torch.autograd.Function`` with a
hand-written backward (``g * sigmoid(x)``) and forward-mode rule (``t * sigmoid(x)``), in the
functorch form (``setup_context``, ``generate_vmap_rule``) so that ``grad``, ``jvp`` and ``vmap``
compose over it. ``check_op`` compares it with ``torch.nn.functional.softplus`` under every
transform; the broken twin (its jvp uses ``sigmoid(-x)``) is caught by the jvp checks.
"""

import torch
import torch.nn.functional as F

from aam_func.testing import check_op


class Softplus(torch.autograd.Function):
    """softplus(x) = max(x, 0) + log1p(exp(-|x|)); d/dx = sigmoid(x)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return x.clamp(min=0) + torch.log1p(torch.exp(-x.abs()))

    @staticmethod
    def setup_context(ctx, inputs, output):
        (x,) = inputs
        ctx.save_for_backward(x)
        ctx.save_for_forward(x)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * torch.sigmoid(x)  # made of differentiable ops: double backward works too

    @staticmethod
    def jvp(ctx, t):
        (x,) = ctx.saved_tensors
        return t * torch.sigmoid(x)


def softplus(x):
    return Softplus.apply(x)


def reference(x):
    return F.softplus(x)


def samples():
    """Tiny float64 inputs, both signs and large magnitudes (where naive log(1+exp) overflows)."""
    g = torch.Generator().manual_seed(0)
    return [
        ((torch.randn(3, 4, generator=g, dtype=torch.float64).requires_grad_(),), {}),
        ((torch.tensor([-40.0, -3.0, 0.0, 2.5, 40.0], dtype=torch.float64).requires_grad_(),), {}),
    ]


class BrokenJvp(Softplus):
    """The same op with a wrong forward-mode rule: sigmoid(-x) instead of sigmoid(x)."""

    @staticmethod
    def jvp(ctx, t):
        (x,) = ctx.saved_tensors
        return t * torch.sigmoid(-x)


def main(compile_backend: str = "aot_eager"):
    report = check_op(Softplus, reference, samples, compile_backend=compile_backend)
    print(report)
    broken = check_op(BrokenJvp, reference, samples, compile_backend=compile_backend, raise_on_failure=False)
    print()
    print(broken)
    assert not broken.ok and "jvp" in [r.name for r in broken.failures]
    return report, broken


if __name__ == "__main__":
    main()
