"""Curves of one or more runs from their ``metrics.jsonl`` (what ``aam-func plot`` draws).

    curves = read_curves("runs/default")        # {"loss": [(step, value), ...], ...}, tokens per step, baseline
    plot_runs(["runs/a", "runs/b"], metrics=("loss", "val_loss"), x="tokens", output="curves.png")

One panel per metric, one line per run; ``x="tokens"`` aligns runs of different batch shapes by
the tokens they have trained on (steps × batch rows × sequence length, from the checkpoint's
saved arguments). Loss panels carry the unigram baseline's loss, perplexity panels its
perplexity, where the run recorded it. matplotlib is an optional extra (``aam-func[plot]``).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Optional, Sequence

from .config import RunError

__all__ = ["Curves", "read_curves", "plot_runs", "PLOT_FORMATS", "DEFAULT_METRICS"]

PLOT_FORMATS = (".png", ".svg", ".pdf")
DEFAULT_METRICS = ("loss", "val_loss")
_LOSSES = ("loss", "val_loss")


@dataclass(frozen=True)
class Curves:
    """A run's recorded series: ``series[metric]`` is a list of ``(step, value)``;
    ``tokens_per_step`` (None when the run holds no checkpoint to say) and the unigram
    ``baseline`` perplexity (None when not recorded)."""

    name: str
    series: dict = field(default_factory=dict)
    tokens_per_step: Optional[int] = None
    baseline: Optional[float] = None


def read_curves(run_dir: str) -> Curves:
    """The :class:`Curves` of the run in ``run_dir``; a RunError when it is not a run directory."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise RunError(f"{run_dir} is not a run directory of aam-func train (it has no metrics.jsonl)")
    series: dict = {}
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            try:
                record = json.loads(line)
            except ValueError:
                raise RunError(f"{path} line {number} is not JSON") from None
            step = record.get("step") if isinstance(record, dict) else None
            if not isinstance(step, int):
                continue
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    series.setdefault(key, []).append((step, float(value)))
    tokens, baseline = _run_facts(run_dir)
    return Curves(name=os.path.basename(os.path.normpath(run_dir)), series=series, tokens_per_step=tokens,
                  baseline=baseline)


def _run_facts(run_dir: str) -> tuple[Optional[int], Optional[float]]:
    """Tokens per step and the baseline perplexity, from the checkpoint's trainer_state.json."""
    try:
        with open(os.path.join(run_dir, "checkpoint", "trainer_state.json"), encoding="utf-8") as f:
            state = json.load(f)
        args = state.get("args", {})
        tokens = int(args["batch_size"]) * int(args.get("accumulate", 1)) * int(args["seq_len"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None, None
    baseline = state.get("metrics", {}).get("baseline_perplexity")
    ok = isinstance(baseline, (int, float)) and math.isfinite(baseline) and baseline > 0
    return tokens, (float(baseline) if ok else None)


def plot_runs(run_dirs: Sequence[str], *, metrics: Sequence[str] = DEFAULT_METRICS, x: str = "step",
              output: str = "curves.png") -> str:
    """Draw ``metrics`` of the runs in ``run_dirs`` into ``output`` (.png, .svg or .pdf) and
    return its path; every argument is checked before anything is drawn."""
    if not run_dirs:
        raise RunError("plot needs at least one run directory")
    if x not in ("step", "tokens"):
        raise RunError(f"--x must be 'step' or 'tokens', got {x!r}")
    ext = os.path.splitext(output)[1].lower()
    if ext not in PLOT_FORMATS:
        raise RunError(f"--output {output} must end in one of {', '.join(PLOT_FORMATS)}")
    runs = [read_curves(d) for d in run_dirs]
    for name in metrics:
        if not any(name in c.series for c in runs):
            known = sorted({k for c in runs for k in c.series})
            raise RunError(f"no run has the metric {name!r}; recorded: {', '.join(known)}")
    if x == "tokens":
        lacking = [d for d, c in zip(run_dirs, runs) if c.tokens_per_step is None]
        if lacking:
            raise RunError(f"--x tokens needs each run's checkpoint (batch and sequence length); "
                           f"none in {', '.join(lacking)}")
    figure = _figure(runs, list(metrics), x)
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    figure.savefig(output, dpi=120, bbox_inches="tight")
    return output


def _figure(runs: list, metrics: list, x: str):
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise RunError("aam-func plot needs matplotlib: pip install 'aam-func[plot]'") from None
    figure = Figure(figsize=(6.0, 3.2 * len(metrics)))
    axes = figure.subplots(len(metrics), 1, squeeze=False)[:, 0]
    for ax, name in zip(axes, metrics):
        for c in runs:
            points = c.series.get(name, [])
            scale = c.tokens_per_step if x == "tokens" else 1
            ax.plot([s * scale for s, _ in points], [v for _, v in points], label=c.name,
                    marker="o" if name.startswith("val_") else None, markersize=3)
        baselines = {c.baseline for c in runs if c.baseline is not None}
        if baselines and (name in _LOSSES or name.endswith("perplexity")):
            value = min(baselines)
            ax.axhline(math.log(value) if name in _LOSSES else value, color="grey", linestyle="--", linewidth=1,
                       label="unigram baseline")
        ax.set_ylabel(name)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    axes[-1].set_xlabel("tokens seen" if x == "tokens" else "step")
    return figure
