"""``aam-func plot``: curves of one or more runs (:func:`aam_func.run.plotting.plot_runs`)."""

from __future__ import annotations

import argparse

from ..run.plotting import DEFAULT_METRICS

__all__ = ["add_parser", "cmd_plot"]


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("plot", help="plot the curves of one or more runs from their metrics.jsonl",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("runs", nargs="+", metavar="RUN", help="run directories (--output-dir of train)")
    p.add_argument("--metric", default=",".join(DEFAULT_METRICS),
                   help="comma-separated metrics: loss, val_loss, val_perplexity, learning_rate, grad_norm, "
                        "grad_norm_clipped, tokens_per_s, skipped_steps, memory_mb")
    p.add_argument("--x", choices=("step", "tokens"), default="step", help="align the runs by step or by tokens seen")
    p.add_argument("--output", default="curves.png", help="the figure: .png, .svg or .pdf")
    return p


def cmd_plot(args: argparse.Namespace, argv: list[str]) -> int:
    from ..run.plotting import plot_runs
    from .args import CLIError

    metrics = [m.strip() for m in args.metric.split(",") if m.strip()]
    if not metrics:
        raise CLIError(f"--metric {args.metric!r} names no metric")
    print(plot_runs(args.runs, metrics=metrics, x=args.x, output=args.output))
    return 0
