"""The training loop of a prepared run: steps, periodic evaluation, progress (with
``progress=True`` a tqdm bar on a terminal, else a line through the run's ``log`` every tenth
of the run), ``metrics.jsonl``, checkpoints, Ctrl-C (save and stop), and at the end a held-out
evaluation, the final checkpoint and a sample. Nothing is shown unless the caller asks: the
lines go to the run's ``log`` (silent by default), the bar only with ``progress``."""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from typing import Optional

from tqdm import tqdm

from .. import optim
from ..data import eval_batches
from ..generate import generate
from ..train import dropout_generator
from ..train import evaluate as evaluate_batches
from .config import RunConfig, RunError
from .output import MetricsLog, peak_memory_mb
from .saving import save_run
from .signals import StopSignals
from .state import Run

__all__ = ["RunResult", "Diverged", "loop", "SAMPLE_PROMPT"]

SAMPLE_PROMPT = "The "  # what the sample printed at the end continues


@dataclass(frozen=True)
class RunResult:
    """How a run ended. ``interrupted``: stopped by a signal (Ctrl-C, SIGTERM, SIGHUP) after
    ``step`` steps, with the checkpoint saved there; ``signal``: which one (None for a
    KeyboardInterrupt raised otherwise); ``metrics``: the last loss, learning rate, grad norm,
    held-out loss/perplexity and the count of skipped (non-finite) steps; ``params``: the model's
    params (merged with LoRA)."""

    config: RunConfig
    step: int
    interrupted: bool
    metrics: dict
    params: dict
    checkpoint_dir: str
    adapter_dir: Optional[str]
    is_main: bool
    world_size: int
    signal: Optional[int] = None


class Diverged(RunError):
    """More than ``--max-skipped-steps`` steps in a row had an inf/NaN loss or gradient. The run
    stopped at ``step``; the checkpoint there holds the params of the last finite step."""

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step


class _Progress:
    """The bar (asked for, rank 0, stdout and stderr terminals) and the throughput window between
    logged steps."""

    def __init__(self, run: Run, end: int, show_bar: bool):
        # the bar (on stderr) only when stdout is a terminal too: output redirected to a file
        # keeps the plain progress lines, grep-able
        self.use_bar = show_bar and sys.stdout.isatty() and sys.stderr.isatty() and run.is_main
        self.log_every = run.config.log_every or max(1, (end - run.start) // 10)
        self.bar = tqdm(total=end - run.start, initial=0, desc="train", unit="step", dynamic_ncols=True,
                        disable=not self.use_bar)
        self.tokens, self.since, self.tok_per_s = 0, time.perf_counter(), 0.0

    def rate(self) -> float:
        now = time.perf_counter()
        self.tok_per_s = self.tokens / max(now - self.since, 1e-9)
        self.tokens, self.since = 0, now
        return self.tok_per_s


def loop(run: Run, *, progress: bool = False, signals: Optional[StopSignals] = None) -> RunResult:
    """Train ``run`` from ``run.start`` to ``config.steps`` (or ``stop_after`` steps of it).
    ``progress``: a tqdm bar on stderr when it is a terminal (``aam-func train`` asks for it).
    ``signals``: the installed stop handlers (:func:`aam_func.run.signals.stop_on_signals`;
    :func:`aam_func.run.train` installs them): checkpoints are then written without being cut
    short by a signal. A step whose loss or gradients are not finite changes nothing and is
    counted; more than ``max_skipped_steps`` in a row save and raise :class:`Diverged`."""
    cfg = run.config
    trainable, opt_state, step = run.trainable, run.opt_state, run.start
    os.makedirs(run.output_dir, exist_ok=True)
    guard = signals if signals is not None else StopSignals()  # not installed: deferral only
    sink = MetricsLog(run.output_dir, log_to=cfg.log_to, writes=run.is_main, start=run.start,
                      config=cfg.saved_args(), log=run.log)
    try:
        return _loop(run, trainable, opt_state, step, progress, guard, sink)
    finally:
        sink.close()


def _loop(run: Run, trainable, opt_state, step: int, progress: bool, guard: StopSignals, sink: MetricsLog):
    """:func:`loop`'s steps, evaluations and saves, its records going to ``sink``."""
    cfg = run.config
    last: dict = {"baseline_perplexity": run.baseline, "skipped_steps": 0}
    announced = []  # the adapters' location is said once, at the first save
    if cfg.init_from is not None and run.start == 0:  # where fine-tuning starts from
        ev = _evaluate(run, sink, trainable, last, 0)
        run.log(f"step 0: val loss {ev['loss']:.4f}, perplexity {ev['perplexity']:.2f} (the --init-from weights)")
    end = cfg.steps if cfg.stop_after is None else min(cfg.steps, run.start + cfg.stop_after)
    progress = _Progress(run, end, show_bar=progress)

    def save(at: int, sync: bool = True) -> None:
        with guard.deferred():
            save_run(run, at, trainable, opt_state, last, sync=sync, announce_adapters=not announced)
        announced.append(True)

    streak = 0  # non-finite steps in a row
    try:
        while step < end:
            trainable, opt_state, m = _step(run, trainable, opt_state, step)
            step += 1
            streak = _count_skip(run, sink, m, step, streak, last)
            if streak > cfg.max_skipped_steps:
                progress.bar.close()
                save(step)
                raise Diverged(_divergence_message(run, m, step, streak), step)
            _report(run, sink, progress, m, step, end, last, skipped=streak > 0)
            if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
                ev = _evaluate(run, sink, optim.eval_params(opt_state, trainable), last, step)
                run.log(f"step {step}: val loss {ev['loss']:.4f}, perplexity {ev['perplexity']:.2f} "
                        f"(unigram baseline {run.baseline:.1f})")
            if cfg.save_every and step % cfg.save_every == 0 and step < end:
                save(step)
        progress.bar.close()
        _finish(run, sink, optim.eval_params(opt_state, trainable), step, last, save)
    except KeyboardInterrupt as e:
        progress.bar.close()
        if run.dist is not None:
            run.dist.stopping = True
        # rank 0 alone saves (its params are the replicated state after `step` steps); no
        # collective here: the other ranks are stopping too, or are gone
        save(step, sync=False)
        return _result(run, step, True, last, optim.eval_params(opt_state, trainable), signum=getattr(e, "signum", None))
    return _result(run, step, False, last, optim.eval_params(opt_state, trainable))


def _count_skip(run: Run, sink: MetricsLog, m: dict, step: int, streak: int, last: dict) -> int:
    """The new count of non-finite steps in a row after ``step`` (0 when it was finite); a skipped
    step is said in the log and ``metrics.jsonl``."""
    if not bool(m["skipped"]):
        return 0
    streak += 1
    last["skipped_steps"] += 1
    budget = run.config.max_skipped_steps
    run.log(f"step {step}: the loss ({float(m['loss']):.4g}) or a gradient is not finite; step skipped, params "
            f"unchanged ({streak} in a row, at most {budget} allowed)")
    sink.record({"step": step, "skipped": True, "skipped_in_a_row": streak, "skipped_steps": last["skipped_steps"]})
    return streak


def _divergence_message(run: Run, m: dict, step: int, streak: int) -> str:
    """Why the run stopped, with the advice that fits its precision."""
    cfg = run.config
    advice = {
        "fp32": f"lower --lr (now {cfg.lr:g}) or --max-grad-norm, or raise --warmup-steps",
        "bf16": f"lower --lr (now {cfg.lr:g}) or --max-grad-norm, or raise --warmup-steps; bf16 has float32's "
                "range, so --precision fp32 helps only where rounding is at fault",
        "fp16": f"the fp16 loss scale fell to {float(m.get('loss_scale', float('nan'))):g}: use --precision bf16 or "
                f"fp32 (float16 overflows above 65504), or lower --lr (now {cfg.lr:g})",
    }[cfg.precision]
    return (f"the loss or gradients were not finite for {streak} steps in a row (up to step {step}; "
            f"--max-skipped-steps {cfg.max_skipped_steps}); the checkpoint in {run.checkpoint_dir} holds the "
            f"params of the last finite step. To go on from it: {advice}, with --resume")


def _step(run: Run, trainable, opt_state, step: int):
    """One optimizer step on the loader's batch for ``step``; dropout masks from a generator per
    step (resumable) and per rank (independent masks)."""
    batch = run.loader.batch(step)
    if run.needs_dropout_generator:
        gen = dropout_generator(run.config.seed, step, run.device, run.rank)
        return run.train_step(trainable, opt_state, batch, gen)
    return run.train_step(trainable, opt_state, batch)


def _report(run: Run, sink: MetricsLog, progress: _Progress, m: dict, step: int, end: int, last: dict,
            skipped: bool) -> None:
    """Loss, learning rate and throughput into ``last``, the bar and ``metrics.jsonl`` every 10
    steps (and at the first and last; a skipped step's record is :func:`_count_skip`'s), a
    progress line every ``log_every`` steps off a terminal."""
    progress.tokens += int(m["tokens"])
    log_now = not progress.use_bar and (step % progress.log_every == 0 or step == end)
    if not skipped and (step % 10 == 0 or step == end or step - run.start <= 1 or log_now):
        loss = float(m["loss"])  # the global loss: the same on every rank
        tok_per_s = progress.rate()
        last.update(step=step, loss=loss, learning_rate=float(m["learning_rate"]), grad_norm=float(m["grad_norm"]))
        progress.bar.set_postfix(loss=f"{loss:.3f}", lr=f"{last['learning_rate']:.2e}", tok_s=f"{tok_per_s:,.0f}")
        record = {"step": step, "loss": loss, "learning_rate": last["learning_rate"],
                  "grad_norm": last["grad_norm"], "grad_norm_clipped": min(last["grad_norm"], run.config.max_grad_norm),
                  "tokens_per_s": tok_per_s, "skipped_steps": last["skipped_steps"],
                  "memory_mb": peak_memory_mb(run.device)}
        if run.dp is not None and (step % progress.log_every == 0 or step == end):  # ε at every log line
            last.update(epsilon=run.dp.epsilon(step), dp_clip=float(m["clip"]))
            record.update(epsilon=last["epsilon"], dp_clip=last["dp_clip"])
        sink.record(record)
    progress.bar.update(1)
    if log_now and not skipped:
        run.log(f"step {step}/{run.config.steps}  loss {last.get('loss', float('nan')):.4f}  "
                f"lr {last.get('learning_rate', 0):.2e}  {progress.tok_per_s:,.0f} tok/s"
                + (f"  epsilon {last['epsilon']:.3f}" if run.dp is not None and "epsilon" in last else ""))


def evaluate(run: Run, trainable) -> dict:
    """Held-out loss and perplexity of ``trainable`` (over all ranks under data parallelism)."""
    batches = eval_batches(run.val_blocks, run.config.batch_size, run.config.eval_batches)
    if run.dist is None:
        return evaluate_batches(run.eval_step, trainable, batches)
    return run.dist.evaluate(run.eval_step, trainable, batches)


def _evaluate(run: Run, sink: MetricsLog, trainable, last: dict, step: int) -> dict:
    """:func:`evaluate`, recorded in ``last`` and (rank 0) ``metrics.jsonl``."""
    ev = evaluate(run, trainable)
    last.update(val_loss=ev["loss"], val_perplexity=ev["perplexity"])
    sink.record({"step": step, "val_loss": ev["loss"], "val_perplexity": ev["perplexity"]})
    return ev


def _finish(run: Run, sink: MetricsLog, trainable, step: int, last: dict, save) -> None:
    """The final evaluation and checkpoint, their lines, and a sample once the run is complete."""
    cfg = run.config
    last["step"] = step
    if run.dp is not None:  # the checkpoint's metrics keep the ε spent
        last["epsilon"] = run.dp.epsilon(step)
    ev = _evaluate(run, sink, trainable, last, step)
    save(step)
    elapsed = time.perf_counter() - run.t_start
    run.log(f"step {step}: held-out loss {ev['loss']:.4f}, perplexity {ev['perplexity']:.2f} "
            f"(unigram baseline {run.baseline:.1f}); {elapsed:.0f}s in all")
    if run.dp is not None:
        run.log(f"privacy: epsilon {run.dp.epsilon(step):.4f} at delta {run.dp.delta:.3g} after {step} steps "
                f"(target {run.dp.target:g}, {run.dp.accountant.name} accountant)")
    run.log(f"checkpoint: {run.checkpoint_dir}" + (" (merged LoRA weights)" if run.lora is not None else ""))
    if run.is_main and cfg.sample_tokens and step >= cfg.steps:
        n = min(cfg.sample_tokens, run.model_config.max_seq_len - 2)
        prompt = run.tokenizer(SAMPLE_PROMPT)
        ids = generate(run.model, run.weights(trainable), prompt["input_ids"].to(run.device), max_new_tokens=n,
                       do_sample=True, temperature=0.8, top_k=50, top_p=0.95, seed=cfg.seed,
                       eos_token_id=run.tokenizer.eos_token_id)
        run.log("sample:\n" + run.tokenizer.decode(ids[0]))


def _result(run: Run, step: int, interrupted: bool, last: dict, trainable, signum: Optional[int] = None) -> RunResult:
    return RunResult(config=run.config, step=step, interrupted=interrupted, metrics=dict(last),
                     params=run.weights(trainable), checkpoint_dir=run.checkpoint_dir, adapter_dir=run.adapter_dir,
                     is_main=run.is_main, world_size=run.world_size, signal=signum)
