"""Private training runs (``aam-func train --dp-epsilon E``): the flags' rules, Poisson sampling,
the noise for the target ε, the DP-SGD step, and the privacy state a checkpoint keeps.

What is protected is one *training block* (``--seq-len`` tokens of the packed corpus): each step
takes every block independently with probability q = ``--batch-size``/N (N blocks), clips each
block's gradient to C (``--dp-clip``; with ``--dp-adaptive-clip Q`` C tracks the Q-quantile of the
norms privately), adds N(0, σ²C²) once to the sum and divides by the expected batch size. σ is the
smallest noise whose ε after ``--steps`` steps is at most ``--dp-epsilon`` at ``--dp-delta``
under ``--dp-accountant``. docs/privacy.md says what this means and how to choose the flags.

Under torchrun each process clips its share of the sampled blocks; the clipped sums are added
across processes first, and then every process adds the *same* noise draw (a generator seeded by
(seed, step)), so the released sum carries one noise, not one per process.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from .. import optim, tree
from .. import privacy as _privacy
from ..per_sample import clipped_sum, poisson_sample
from ..per_sample.clipping import DEFAULT_CLIP_LEARNING_RATE, adaptive_gradient_noise, count_below, quantile_step
from .config import RunError, default, flag

__all__ = ["DP_FIELDS", "check_dp_fields", "PoissonLoader", "DPState", "setup_dp", "make_dp_train_step"]

DP_FIELDS = ("dp_epsilon", "dp_delta", "dp_clip", "dp_accountant", "dp_adaptive_clip")
_NOISE_STREAM, _COUNT_STREAM, _SAMPLE_STREAM = 0x6E6F697365, 0x636F756E74, 0x706F6973  # independent (seed, step) streams


def _seed(*parts: int) -> int:
    return hash(tuple(int(p) for p in parts)) & ((1 << 63) - 1)


def check_dp_fields(cfg) -> None:
    """The DP flags' own values and the flags they cannot be combined with (ValueError)."""
    given = [flag(f) for f in DP_FIELDS[1:] if getattr(cfg, f) != default(f)]
    if cfg.dp_epsilon is None:
        if given:
            raise ValueError(f"{', '.join(given)} only apply with --dp-epsilon")
        return
    if cfg.dp_accountant not in _privacy.ACCOUNTANTS:
        raise ValueError(f"dp_accountant must be one of {', '.join(_privacy.ACCOUNTANTS)}, got {cfg.dp_accountant!r}")
    if cfg.dp_adaptive_clip is not None and not 0 < cfg.dp_adaptive_clip < 1:
        raise ValueError(f"dp_adaptive_clip must be a quantile in (0, 1), got {cfg.dp_adaptive_clip!r}")
    refused = []
    if cfg.accumulate != 1:
        refused.append("--accumulate (a DP step takes its whole Poisson batch; set --batch-size instead)")
    if cfg.compile:
        refused.append("--compile")
    if cfg.precision in ("bf16", "fp16"):
        refused.append(f"--precision {cfg.precision} (per-example norms and clipping run in fp32)")
    if cfg.dropout:
        refused.append("--dropout > 0")
    if cfg.lora_dropout:
        refused.append("--lora-dropout > 0")
    if refused:
        raise ValueError(f"--dp-epsilon cannot be combined with {'; '.join(refused)}")


class PoissonLoader:
    """Poisson-sampled batches of blocks, a pure function of (seed, step): every one of the N
    blocks joins step ``step``'s batch independently with probability q = ``expected``/N (the
    sampling the accountants assume); the batch may be empty. Process ``rank`` of ``world`` takes
    every world-th sampled block from its rank on (a resumed run, at any world size, sees the
    same global batches)."""

    def __init__(self, blocks, expected: int, *, seed: int, rank: int = 0, world_size: int = 1, device=None):
        self.blocks, self.seed, self.rank, self.world_size, self.device = blocks, seed, rank, world_size, device
        self.n_blocks = len(blocks)
        self.seq_len = blocks.shape[1] if isinstance(blocks, torch.Tensor) else blocks.seq_len
        self.expected = expected
        self.sample_rate = expected / self.n_blocks

    def indices(self, step: int) -> torch.Tensor:
        """The sampled block numbers of ``step`` (all processes')."""
        g = torch.Generator().manual_seed(_seed(self.seed, step, _SAMPLE_STREAM))
        return poisson_sample(self.n_blocks, self.sample_rate, generator=g)

    def batch(self, step: int) -> dict:
        idx = self.indices(step)[self.rank::self.world_size]
        x = self.blocks[idx] if idx.numel() else torch.zeros((0, self.seq_len), dtype=torch.int64)
        if self.device is not None:
            x = x.to(self.device)
        return {"input_ids": x, "labels": x}

    def __len__(self) -> int:
        """Steps per epoch in expectation (N / expected batch size)."""
        return max(1, round(self.n_blocks / self.expected))


@dataclass
class DPState:
    """The privacy side of a run: the accountant's history up to ``start``, σ for the steps from
    there, the current clip norm (adaptive clipping moves it) and the step the next batch is."""

    accountant: Any  # aam_func.privacy.Accountant, the history before this invocation's first step
    noise_multiplier: float
    sample_rate: float
    delta: float
    target: float
    n_blocks: int
    expected: int
    clip: float
    quantile: Optional[float]
    start: int
    planned_steps: int
    step: int = 0
    count_noise: float = 0.0
    _eps: dict = field(default_factory=dict)

    @property
    def gradient_noise(self) -> float:
        if self.quantile is None:
            return self.noise_multiplier
        return adaptive_gradient_noise(self.noise_multiplier, self.count_noise)

    def epsilon(self, step: int) -> float:
        """ε spent after ``step`` steps in all (memoised)."""
        if step not in self._eps:
            self._eps[step] = self.accountant.step(self.noise_multiplier, self.sample_rate, step - self.start).epsilon(self.delta)
        return self._eps[step]

    def saved(self, step: int) -> dict:
        """What the checkpoint keeps (``train_state["dp"]``)."""
        hist = self.accountant.step(self.noise_multiplier, self.sample_rate, step - self.start).history
        return {"accountant": self.accountant.name, "history": [list(h) for h in hist], "epsilon": self.epsilon(step),
                "delta": self.delta, "target_epsilon": self.target, "noise_multiplier": self.noise_multiplier,
                "sample_rate": self.sample_rate, "planned_steps": self.planned_steps, "clip": self.clip,
                "n_blocks": self.n_blocks}

    def describe(self) -> str:
        clip = (f"adaptive clip norm from {self.clip:g} tracking the {self.quantile:g} quantile (count noise "
                f"{self.count_noise:g}, gradient noise multiplier {self.gradient_noise:.4g})"
                if self.quantile is not None else f"clip norm {self.clip:g}")
        return (f"privacy: ({self.target:g}, {self.delta:.3g})-DP over {self.n_blocks:,} training blocks "
                f"({self.accountant.name} accountant): Poisson rate {self.sample_rate:.4g} (expected batch "
                f"{self.expected}), noise multiplier {self.noise_multiplier:.4g} for {self.planned_steps} steps; {clip}")


def setup_dp(cfg, loader, resumed, say, dctx=None, model_config=None) -> tuple[Optional[DPState], Any]:
    """(DPState, Poisson loader) for a DP run (``(None, loader)`` otherwise): δ checked against the
    number of blocks, σ from the target ε (or the checkpoint's, resuming the same plan); a budget
    the checkpoint already spent is a :class:`RunError`."""
    if cfg.dp_epsilon is None:
        return None, loader
    if model_config is not None and (model_config.dropout > 0 or model_config.attention_dropout > 0):
        raise RunError(f"the model has dropout {model_config.dropout:g} (attention dropout "
                       f"{model_config.attention_dropout:g}), which a DP step does not draw; with --init-from, "
                       "pass --dropout 0 alongside --dp-epsilon")
    n = loader.n_blocks
    delta = cfg.dp_delta if cfg.dp_delta is not None else 1.0 / (10 * n)
    if delta >= 1.0 / n:
        raise RunError(f"--dp-delta {delta:g} must be below 1/N = {1 / n:.3g} (N = {n:,} training blocks, the "
                       f"protected examples): a delta of 1/N allows releasing one block outright")
    pl = PoissonLoader(loader.blocks, cfg.batch_size, seed=cfg.seed, rank=loader.rank,
                       world_size=loader.world_size, device=loader.device)
    q, acc, start, clip = pl.sample_rate, _privacy.accountant(cfg.dp_accountant), 0, cfg.dp_clip
    saved = resumed.train_state.get("dp") if resumed is not None else None
    if dctx is not None:  # the checkpoint is rank 0's: every process continues the same history
        saved = dctx.broadcast_object(saved)
    if saved is not None:
        acc = _privacy.accountant(saved["accountant"], [tuple(h) for h in saved["history"]])
        start, clip = acc.steps, saved["clip"]
        spent = acc.epsilon(delta)
        if spent >= cfg.dp_epsilon or start >= saved["planned_steps"]:  # the noise was sized to spend it all
            raise RunError(f"the privacy budget is spent: epsilon {spent:.4g} of --dp-epsilon {cfg.dp_epsilon:g} "
                           f"after {start} steps (the run's planned --steps {saved['planned_steps']}); a private run "
                           "cannot go on past its budget")
    remaining = cfg.steps - start
    if saved is not None and saved["planned_steps"] == cfg.steps:
        sigma = saved["noise_multiplier"]  # the same plan: the uninterrupted run's noise
    else:
        try:
            sigma = acc.noise_for(cfg.dp_epsilon, q, remaining, delta)
        except ValueError as e:
            raise RunError(f"--dp-epsilon {cfg.dp_epsilon:g}: {e}") from None
    state = DPState(accountant=acc, noise_multiplier=sigma, sample_rate=q, delta=delta, target=cfg.dp_epsilon,
                    n_blocks=n, expected=cfg.batch_size, clip=clip, quantile=cfg.dp_adaptive_clip, start=start,
                    planned_steps=cfg.steps, step=start, count_noise=cfg.batch_size / 20.0)
    if state.quantile is not None:
        try:
            state.gradient_noise
        except ValueError as e:
            raise RunError(f"--dp-adaptive-clip: {e}; the count noise is --batch-size/20, so raise --batch-size "
                           f"(now {cfg.batch_size}) or --dp-epsilon") from None
    say(state.describe())
    return state, pl


def make_dp_train_step(cfg, loss_fn: Callable, trainable, dctx, dp: DPState, opt) -> Callable:
    """The DP-SGD step ``(trainable, opt_state, batch) -> (trainable, opt_state, metrics)`` around
    ``opt``: per-block clipped sum (ghost clipping), summed over processes, one noise draw of
    std σ_Δ·C, divided by the expected batch size; a non-finite update is skipped (its privacy is
    still spent). Adaptive clipping moves ``dp.clip`` after each step. ``.init`` is ``opt.init``."""

    def step(params, opt_state, batch):
        x = batch["input_ids"]
        B, c = x.shape[0], dp.clip
        if B:
            res = clipped_sum(loss_fn, params, batch, c, method="ghost")
            total, loss_sum, below = res.sum, res.losses.detach().double().sum(), count_below(res.norms, c)
        else:  # an empty Poisson batch: nothing but noise
            total, loss_sum, below = tree.map(torch.zeros_like, params), torch.zeros((), dtype=torch.float64), 0.0
        stats = torch.tensor([float(loss_sum), float(B), float(below), float(x.numel())], dtype=torch.float64)
        if dctx is not None:
            names = list(tree.flatten(total))
            summed = dctx.all_sum([*tree.leaves(total), stats.to(dctx.device)], what="all_reduce of clipped sums")
            total = tree.unflatten_like(total, dict(zip(names, summed[:-1])))
            stats = summed[-1].cpu()
        g = torch.Generator(device=x.device).manual_seed(_seed(cfg.seed, dp.step, _NOISE_STREAM))
        std = dp.gradient_noise * c
        noisy = tree.map(lambda s: (s + std * torch.randn(s.shape, generator=g, dtype=s.dtype, device=s.device))
                         / dp.expected, total)
        norm = optim.global_norm(noisy)
        finite = bool(torch.isfinite(norm))
        if finite:
            updates, new_state = opt.update(noisy, opt_state, params)
            params, opt_state = optim.apply_updates(params, updates), new_state
        if dp.quantile is not None:
            gc = torch.Generator().manual_seed(_seed(cfg.seed, dp.step, _COUNT_STREAM))
            dp.clip = quantile_step(c, float(stats[2]), dp.quantile, DEFAULT_CLIP_LEARNING_RATE, dp.count_noise,
                                    dp.expected, gc)
        dp.step += 1
        n = float(stats[1])
        metrics = {"loss": torch.tensor(float(stats[0]) / n if n else math.nan),
                   "learning_rate": optim.current_learning_rate(opt_state).float(), "grad_norm": norm.float(),
                   "tokens": torch.tensor(int(stats[3])), "skipped": torch.tensor(not finite), "clip": c}
        return params, opt_state, metrics

    step.init = opt.init
    return step
