"""One sample of an op under test: its differentiated inputs bound, and the comparisons."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

__all__ = ["Case", "Mismatch", "tensors", "make_cases", "compare"]


class Mismatch(AssertionError):
    """A numerical disagreement; the check records its worst error and fails."""


def tensors(out) -> tuple:
    """The tensor outputs of an op (a tensor, or the tensors of a tuple/list)."""
    if isinstance(out, Tensor):
        return (out,)
    if isinstance(out, (tuple, list)):
        return tuple(o for o in out if isinstance(o, Tensor))
    raise TypeError(f"an op must return a tensor or a tuple of tensors, got {type(out).__name__}")


@dataclass
class Case:
    """Sample ``index``: ``args``/``kwargs`` as given; ``diff`` the positions in ``args`` of the
    floating tensors that require grad (the differentiated inputs); everything else is fixed."""

    index: int
    op: Callable
    reference: Callable
    args: tuple
    kwargs: dict
    diff: list

    @property
    def xs(self) -> tuple:
        return tuple(self.args[i] for i in self.diff)

    def bind(self, fn: Callable, args: Sequence = None, kwargs: dict = None) -> Callable:
        """``fn`` as a function of the differentiated inputs only."""
        base, kw = list(self.args if args is None else args), self.kwargs if kwargs is None else kwargs

        def call(*xs):
            full = list(base)
            for i, x in zip(self.diff, xs):
                full[i] = x
            return fn(*full, **kw)

        return call

    def loss(self, fn: Callable, cotangents: Sequence[Tensor]) -> Callable:
        """``<fn(xs), cotangents>``: a scalar whose gradient is the vector-Jacobian product."""
        bound = self.bind(fn)
        return lambda *xs: sum((o * c).sum() for o, c in zip(tensors(bound(*xs)), cotangents))

    def perturbed(self, x: Tensor, shape: tuple, gen: torch.Generator) -> Tensor:
        """Copies of ``x`` stacked in front: ``shape + x.shape``; copy 0 is ``x`` itself."""
        n = 1
        for s in shape:
            n *= s
        noise = torch.randn((n,) + tuple(x.shape), generator=gen, dtype=x.dtype).to(x.device)
        noise[0] = 0
        return (x.detach()[None] + 0.01 * noise).reshape(tuple(shape) + tuple(x.shape))


def make_cases(op: Callable, reference: Callable, samples: Any) -> list:
    """Validate ``samples`` (a list, or a callable returning one, of ``(args, kwargs)``)."""
    got = samples() if callable(samples) else samples
    if not isinstance(got, (list, tuple)) or not got:
        raise ValueError(f"samples must be a non-empty list of (args, kwargs) (or a callable returning one), got {got!r:.200}")
    cases = []
    for i, s in enumerate(got):
        if not (isinstance(s, (tuple, list)) and len(s) == 2 and isinstance(s[0], (tuple, list)) and isinstance(s[1], dict)):
            raise ValueError(f"samples[{i}] must be a pair (args: tuple, kwargs: dict), got {s!r:.200}")
        args, kwargs = tuple(s[0]), dict(s[1])
        diff = [j for j, a in enumerate(args) if isinstance(a, Tensor) and a.is_floating_point() and a.requires_grad]
        if not diff:
            raise ValueError(f"samples[{i}] has no floating tensor in args with requires_grad=True: nothing to differentiate")
        cases.append(Case(i, op, reference, args, kwargs, diff))
    return cases


def compare(result, got, want, rtol: float, atol: float, what: str) -> None:
    """Record ``max |got - want|`` in ``result``; raise :class:`Mismatch` when not close
    (``|got - want| <= atol + rtol |want|`` elementwise, NaNs equal where both are NaN)."""
    got, want = tuple(got), tuple(want)
    if len(got) != len(want):
        raise Mismatch(f"{what}: op gave {len(got)} tensors, reference {len(want)}")
    for k, (a, b) in enumerate(zip(got, want)):
        if a is None or b is None:
            other = b if a is None else a
            if other is not None and other.abs().max() != 0:
                raise Mismatch(f"{what}[{k}]: one side has no gradient, the other a non-zero one")
            continue
        if a.shape != b.shape:
            raise Mismatch(f"{what}[{k}]: shape {tuple(a.shape)} != reference {tuple(b.shape)}")
        a64, b64 = a.detach().double(), b.detach().double()
        both_nan = a64.isnan() & b64.isnan()
        diff = (a64 - b64).abs().masked_fill(both_nan, 0)
        worst = float(diff.max()) if diff.numel() else 0.0
        if diff.isnan().any():
            worst = float("nan")
        result.error(worst)
        bad = ~(diff <= atol + rtol * b64.abs().masked_fill(both_nan, 0))
        if bad.any():
            where = tuple(int(i) for i in bad.nonzero()[0])
            raise Mismatch(
                f"{what}[{k}]: {int(bad.sum())} of {bad.numel()} elements differ (worst {worst:.3g}, "
                f"rtol={rtol:g}, atol={atol:g}); first at {where}: op {float(a64[where]):.6g} vs reference {float(b64[where]):.6g}"
            )
