"""DP-SGD (Abadi et al. 2016) on the per-example machinery: clip, sum, add N(0, σ²C²), divide.

    step = dp_sgd(loss_fn, optimizer, max_norm=C, noise_multiplier=σ, expected_batch_size=q·N)
    t = dp_aggregate(C, σ)          # the same aggregation as an Optax-shaped transformation

Privacy accounting (steps, q, σ, δ → ε) is :mod:`aam_func.privacy`. Proofs: ``proofs/per_sample.md``
§3 (the clipped sum) and ``proofs/privacy.md`` (sampling and the accountant).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple, Optional

import torch
import torch.utils._pytree as pytree
from torch import Tensor

from ..checks import check_int, check_number
from ..optim import GradientTransformation, apply_updates
from ..tree import Params
from .batching import batch_size
from .clip import check_max_norm, clip_factors, global_norms, weighted_sum
from .clipping import Clipping
from .route import check_method, clipped_sum

__all__ = ["dp_aggregate", "dp_sgd", "DPInfo", "poisson_sample"]


def _check_sigma(noise_multiplier) -> float:
    return check_number("noise_multiplier", noise_multiplier, min=0)


def _check_expected(expected_batch_size) -> Optional[float]:
    return check_number("expected_batch_size", expected_batch_size, min=0, min_open=True, allow_none=True)


def _noisy_mean(total: Params, B: int, max_norm: float, sigma: float, expected: Optional[float], generator) -> Params:
    """(Σ_i clip(g_i) + N(0, σ²C²)) / n, n = expected batch size (Poisson) or the actual one."""
    if expected is None and B == 0:
        raise ValueError("an empty batch needs expected_batch_size (Poisson sampling divides by q·N)")
    denom = expected if expected is not None else float(B)
    std = sigma * max_norm

    def one(x):
        if std > 0:
            x = x + std * torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
        return x / denom

    return pytree.tree_map(one, total)


def dp_aggregate(
    max_norm, noise_multiplier: float, *, expected_batch_size: Optional[float] = None, seed: int = 0
):
    """DP-SGD's aggregation as a :class:`~aam_func.optim.GradientTransformation` (Optax's
    ``differentially_private_aggregate``): its input ``grads`` are *per-example* gradients
    (leaves (B, *shape), e.g. from :func:`grads`); its output is
    (Σ_i clip_C(g_i) + N(0, σ²C²·I)) / n, n = ``expected_batch_size`` or B. Chain an optimizer
    after it. The noise comes from a generator seeded by (``seed``, step count) held in the state,
    so the same state gives the same noise: the transform is pure.

    ``max_norm``: the clip norm C (flat clipping), or a clipping strategy of
    :mod:`aam_func.per_sample.clipping` (``flat``, ``per_layer``, ``adaptive``): C is then the
    strategy's sensitivity at each step and σ its ``gradient_noise(σ)``.
    """
    clipping = max_norm if isinstance(max_norm, Clipping) else None
    if clipping is None:
        max_norm = check_max_norm(max_norm)
    sigma = _check_sigma(noise_multiplier)
    expected = _check_expected(expected_batch_size)
    seed = check_int("seed", seed)
    grad_sigma = clipping.gradient_noise(sigma) if clipping is not None else sigma

    def init(params):
        state = {"count": torch.zeros((), dtype=torch.int64), "seed": torch.tensor(seed, dtype=torch.int64)}
        if clipping is not None:
            state["clipping"] = clipping.init(params)
        return state

    def update(grads, state, params=None):
        B = {x.shape[0] for x in pytree.tree_leaves(grads)}
        if len(B) != 1:
            raise ValueError(f"dp_aggregate needs per-example grads with one leading batch size, got sizes {sorted(B)}")
        B = B.pop()
        count = int(state["count"])
        leaves = pytree.tree_leaves(grads)
        device = leaves[0].device if leaves else torch.device("cpu")  # the noise is drawn where the grads live
        g = torch.Generator(device=device).manual_seed(hash((int(state["seed"]), count)) & ((1 << 63) - 1))
        new_state = {"count": state["count"] + 1, "seed": state["seed"]}
        if clipping is not None:
            bound = clipping.sensitivity(state["clipping"])
            clipped, new_state["clipping"] = clipping.update(grads, state["clipping"], params)
            total = pytree.tree_map(lambda x: x.sum(0), clipped)
        else:
            bound = max_norm
            total = weighted_sum(clip_factors(global_norms(grads), max_norm), grads) if B else pytree.tree_map(lambda x: x.sum(0), grads)
        out = _noisy_mean(total, B, bound, grad_sigma, expected, g)
        return out, new_state

    return GradientTransformation(init, update)


class DPInfo(NamedTuple):
    loss: Tensor  # mean per-example loss over the batch (nan for an empty batch)
    norms: Tensor  # (B,) per-example gradient norms before clipping
    batch_size: int


def dp_sgd(
    loss_fn: Callable,
    optimizer,
    *,
    max_norm: float,
    noise_multiplier: float,
    expected_batch_size: Optional[float] = None,
    method: str = "ghost",
    chunk_size: Optional[int] = None,
):
    """A DP-SGD train step (Abadi et al. 2016) around any optimizer:

        step(params, opt_state, batch, generator) -> (params, opt_state, DPInfo)

    g̃ = (Σ_i clip_C(∇loss_i) + N(0, σ²C²)) / n, then ``optimizer.update(g̃, ...)``. With Poisson
    sampling (:func:`poisson_sample`) pass ``expected_batch_size = q·N``: the batch size varies,
    may be 0, and the divisor must not depend on it. The per-example gradients are never
    materialised with ``method="ghost"``. Account the privacy with
    :func:`aam_func.privacy.epsilon` (steps, q, σ, δ).
    """
    max_norm = check_max_norm(max_norm)
    sigma = _check_sigma(noise_multiplier)
    expected = _check_expected(expected_batch_size)
    check_method(method)

    def step(params, opt_state, batch, generator: Optional[torch.Generator] = None):
        if sigma > 0 and generator is None:
            raise ValueError("dp_sgd's step needs an explicit torch.Generator for the noise (generator=...)")
        B = batch_size(batch)
        res = clipped_sum(loss_fn, params, batch, max_norm, chunk_size=chunk_size, method=method)
        noisy = _noisy_mean(res.sum, B, max_norm, sigma, expected, generator)
        updates, opt_state = optimizer.update(noisy, opt_state, params)
        params = apply_updates(params, updates)
        loss = res.losses.mean() if B else torch.tensor(float("nan"))
        return params, opt_state, DPInfo(loss, res.norms, B)

    return step


def poisson_sample(n: int, sample_rate: float, generator: Optional[torch.Generator] = None) -> Tensor:
    """Indices of a Poisson-sampled batch: each of ``n`` examples joins independently with
    probability ``sample_rate`` (the sampling the RDP accountant assumes). May be empty."""
    check_int("n", n, min=1)
    check_number("sample_rate", sample_rate, min=0, min_open=True, max=1)
    return (torch.rand(n, generator=generator) < sample_rate).nonzero().flatten()
