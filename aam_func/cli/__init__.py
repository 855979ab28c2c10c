"""``aam-func train | generate | eval | plot`` (also ``python -m aam_func``): argument parsing and
printing; the training run itself is :mod:`aam_func.run`.

    aam-func train                                   # a small GPT on Python's reference text, ~1 min on 2 cores
    aam-func generate --checkpoint runs/default --prompt "The with statement" --max-new-tokens 64 --seed 0
    aam-func eval --checkpoint runs/default [--data notes/]
    aam-func plot runs/default runs/other --metric loss,val_loss --output curves.png
    aam-func train --init-from runs/default --data notes/ --lora-rank 8 --output-dir runs/notes-lora
    aam-func export --checkpoint runs/notes-lora --format transformers --output exported/notes

Bad input (a missing or empty corpus, a non-UTF-8 file, a sequence length above the model's
maximum, a tokenizer that is not available offline, a corrupted checkpoint) is one line
``error: ...`` on stderr and exit status 2, never a traceback. Ctrl-C, SIGTERM or SIGHUP during
training save a checkpoint and exit with the conventional status 128 + the signal's number (130,
143, 129). docs/reliability.md says what a run guarantees.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional

from . import eval as eval_command
from . import export as export_command
from . import generate as generate_command
from . import plot as plot_command
from . import prepare as prepare_command
from . import train as train_command
from .args import CLIError

__all__ = ["main", "build_parser", "CLIError"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="aam-func", description="Train, sample from and evaluate small GPTs with aam_func.")
    sub = p.add_subparsers(dest="command", required=True, metavar="{train,generate,eval,prepare,plot,export}")
    train_command.add_parser(sub)
    generate_command.add_parser(sub)
    eval_command.add_parser(sub)
    prepare_command.add_parser(sub)
    plot_command.add_parser(sub)
    export_command.add_parser(sub)
    return p


_COMMANDS = {"train": train_command.cmd_train, "generate": generate_command.cmd_generate,
             "eval": eval_command.cmd_eval, "prepare": prepare_command.cmd_prepare, "plot": plot_command.cmd_plot,
             "export": export_command.cmd_export}


def _user_errors() -> tuple:
    """The errors that are the user's input at fault: one ``error:`` line and exit status 2."""
    from ..checkpoint import CheckpointError
    from ..data import DataError
    from ..interop.export import ExportError
    from ..interop.peft import AdapterFileError
    from ..run import RunError
    from ..tokenizer import TokenizerError

    return (CLIError, RunError, DataError, TokenizerError, CheckpointError, ExportError, AdapterFileError)


def main(argv: Optional[list[str]] = None) -> int:
    from ..distributed import DistributedError
    from ..run import PeerFailed
    from ..run.signals import exit_status

    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    try:
        return _COMMANDS[args.command](args, argv)
    except _user_errors() as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the machine at fault (a full disk, a file that vanished): one line too
        where = f"{e.filename}: " if e.filename else ""
        print(f"error: {where}{e.strerror or e}", file=sys.stderr)
        return 2
    except PeerFailed as e:  # rank 0 said why
        return 130 if e.interrupted else 2
    except DistributedError as e:
        # a broken process group can abort the interpreter at exit (gloo's destructor calls
        # std::terminate on a dead peer's pair): report and leave now, with a plain status 1
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(1)
    except KeyboardInterrupt as e:  # a stop signal before the run could save anything
        print("interrupted", file=sys.stderr)
        return exit_status(getattr(e, "signum", None))
