"""RunConfig: every setting of a training run (one field per ``aam-func train`` flag), validated
once when it is built and never changed afterwards (``dataclasses.replace`` gives a new one).

    cfg = RunConfig(data="notes/", steps=200, output_dir="runs/notes")       # a fresh run
    cfg = RunConfig.from_flags(vars(namespace), given={"steps", "data"})     # what the CLI does
    cfg = cfg.for_resume(checkpoint)          # the run's identity from the checkpoint being resumed
    cfg = cfg.for_init_from(checkpoint)       # --init-from: the checkpoint's training length

Three fields may be ``None`` with ``init_from`` to mean "the --init-from checkpoint's value":
``seq_len`` (its training length), ``dropout`` and ``gradient_checkpointing`` (its model
config's); ``attention_backend=None`` means the checkpoint's there and otherwise "auto" (or
"math" under bf16 on a CPU, :func:`attention_backend`). Errors are :class:`RunError` and name
the field, or the flag where a combination of flags is at fault.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any, Optional

from ..checks import check_choice, check_int, check_number
from ..config import ATTENTION_BACKENDS, ATTENTION_TYPES, POSITION_ENCODINGS
from ..optim.recipes import RUN_OPTIMIZERS
from ..train import PRECISION_CHOICES
from .output import LOG_TO_CHOICES

__all__ = ["RunConfig", "RunError", "RESUMED_FIELDS", "RESUME_FREE", "RESUME_ADJUSTABLE", "SHAPE_FIELDS", "INT_MINIMUM", "NUMBER_RANGE",
           "PRECISION_FLAG_CHOICES", "attention_backend", "document_mask_on", "flag", "default"]

# the CLI offers every choice of train.PRECISION_CHOICES except "mixed" (the guide's config flag)
PRECISION_FLAG_CHOICES = tuple(c for c in PRECISION_CHOICES if c != "mixed")

# the lower bound of each integer field (None allowed where the default is None)
INT_MINIMUM = {
    "vocab_size": 1, "d_model": 1, "n_layers": 1, "n_heads": 1, "d_ff": 1, "max_seq_len": 1, "steps": 1,
    "batch_size": 1, "seq_len": 1, "accumulate": 1, "warmup_steps": 0, "eval_every": 0, "eval_batches": 1,
    "save_every": 0, "stop_after": 1, "sample_tokens": 0, "log_every": 1, "lora_rank": 1, "keep_checkpoints": 1,
    "max_skipped_steps": 0,
}
# torch.manual_seed takes any int of 64 bits; the run's dropout streams hash the seed as one
SEED_RANGE = (-(2**63), 2**64 - 1)
# (min, max, min open, finite) of each real-valued field; max None: no upper bound. Every one is
# finite: infinity means nothing for a rate, a decay, a norm bound, a fraction or a LoRA alpha, and
# dist_timeout's datetime.timedelta cannot hold it (an unbounded wait is not offered either)
NUMBER_RANGE = {
    "val_fraction": (0.0, 0.9, True, True), "dropout": (0.0, 0.99, False, True), "lr": (0.0, None, True, True),
    "weight_decay": (0.0, None, False, True), "max_grad_norm": (0.0, None, True, True),
    "dist_timeout": (0.0, None, True, True), "lora_alpha": (0.0, None, True, True),
    "lora_dropout": (0.0, 0.99, False, True),
    "dp_epsilon": (0.0, None, True, True), "dp_delta": (0.0, 1.0, True, True), "dp_clip": (0.0, None, True, True),
    "dp_adaptive_clip": (0.0, 1.0, True, True),
    "ema": (0.0, 1.0, False, True), "muon_lr": (0.0, None, True, True), "muon_momentum": (0.0, 0.9999, False, True),
}
# what --resume takes from the checkpoint's saved arguments (the run's identity and, unless given
# again, its optimisation settings); every other field (steps, eval/log/save cadence, stop_after,
# sample length, device ...) comes from the flags
RESUMED_FIELDS = ("data", "text_field", "val_fraction", "seq_len", "batch_size", "accumulate", "lr", "warmup_steps",
                  "weight_decay", "max_grad_norm", "seed", "precision",
                  "dp_epsilon", "dp_delta", "dp_clip", "dp_accountant", "dp_adaptive_clip",
                  "optimizer", "ema", "muon_lr", "muon_momentum")
# settings that shape the params or the vocabulary: --init-from takes them from its checkpoint
SHAPE_FIELDS = ("d_model", "n_layers", "n_heads", "d_ff", "max_seq_len", "attention_type", "position_encoding",
                "tokenizer", "vocab_size")
# what --resume takes from the flags: how long and how the run goes on, never what it is
RESUME_FREE = ("steps", "eval_every", "eval_batches", "save_every", "keep_checkpoints", "max_skipped_steps",
               "output_dir", "resume", "stop_after", "sample_tokens", "log_every", "device", "dist_timeout", "compile",
               "log_to")
# resumed from the checkpoint unless given explicitly: the knobs a diverged run is resumed with
# (the optimizer is rebuilt from them; the run is no longer the uninterrupted one's)
RESUME_ADJUSTABLE = ("lr", "warmup_steps", "weight_decay", "max_grad_norm", "precision")
_LORA_OPTIONS = ("lora_alpha", "lora_targets", "lora_dropout")
_NONE_FROM_CHECKPOINT = ("seq_len", "dropout", "gradient_checkpointing")


class RunError(ValueError):
    """A training run that cannot start or go on as configured (a bad setting or combination of
    settings, a checkpoint that does not fit, a loss that became NaN)."""


def flag(field: str) -> str:
    """The command-line flag of a field: ``lora_rank`` -> ``--lora-rank``."""
    return "--" + field.replace("_", "-")


def document_mask_on(cfg: "RunConfig", backend: Optional[str]) -> bool:
    """Whether a new run masks documents: ``cfg.document_mask`` when the flag was given; by
    default (on) unless the run's attention ``backend`` runs no mask_mod (sdpa, xformers,
    triton), where the default yields rather than fail. (--init-from keeps its checkpoint's
    setting unless the flag is given; --resume always keeps it.)"""
    from ..ops.attention.backends import MOD_BACKENDS  # noqa: PLC0415 - the attention package stays lazy here
    if "document_mask" in cfg.explicit_fields():
        return cfg.document_mask
    return cfg.document_mask and (backend is None or backend in MOD_BACKENDS)


def attention_backend(choice: Optional[str], precision: str, device_type: str) -> str:
    """The attention backend: the user's choice, else "auto" except under bf16 on CPU, where the
    composite ("math") attention trains faster than SDPA's flash kernel (its backward is slow in bf16)."""
    if choice is not None:
        return choice
    return "math" if (precision == "bf16" and device_type == "cpu") else "auto"


@dataclass(frozen=True)
class RunConfig:
    """A training run's settings; the fields and defaults are those of ``aam-func train``'s flags
    (docs/cli.md says what each does). ``precision`` is a choice (auto, fp32, bf16, fp16) until
    :func:`aam_func.run.prepare` resolves it for the device; the prepared run's config holds the
    resolved one."""

    # data
    data: Optional[str] = None
    text_field: str = "text"
    val_fraction: float = 0.1
    tokenizer: Optional[str] = None
    vocab_size: int = 4096
    # model
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 8
    d_ff: Optional[int] = None
    max_seq_len: Optional[int] = None
    dropout: Optional[float] = 0.0
    attention_type: str = "standard"
    attention_backend: Optional[str] = None
    position_encoding: str = "learnable"
    gradient_checkpointing: Optional[bool] = False
    # attend within each packed document only (docs/attention.md): on by default for new runs
    # (:func:`document_mask_on`), --resume keeps the run's own setting
    document_mask: bool = True
    # optimisation
    steps: int = 400
    batch_size: int = 16
    seq_len: Optional[int] = 128
    accumulate: int = 1
    lr: float = 2e-3
    warmup_steps: Optional[int] = None
    weight_decay: float = 0.1
    max_grad_norm: float = 1.0
    precision: str = "auto"
    compile: bool = False
    seed: int = 0
    # the optimizer (optim.run_optimizer) and its own knobs; ema: a decay, None: no averaging
    optimizer: str = "adamw"
    ema: Optional[float] = None
    muon_lr: float = 1e-3  # torch.optim.Muon's default (and optim.muon's)
    muon_momentum: float = 0.95
    # run
    eval_every: int = 200
    eval_batches: Optional[int] = None
    save_every: int = 0
    keep_checkpoints: int = 2
    max_skipped_steps: int = 10
    output_dir: str = "runs/default"
    resume: Optional[str] = None
    overwrite: bool = False
    log_to: str = "jsonl"
    stop_after: Optional[int] = None
    sample_tokens: int = 64
    log_every: Optional[int] = None
    device: str = "cpu"
    dist_timeout: float = 300.0
    # fine-tuning
    init_from: Optional[str] = None
    lora_rank: Optional[int] = None
    lora_alpha: Optional[float] = None
    lora_targets: Optional[str] = None
    lora_dropout: float = 0.0
    # differential privacy (aam_func/run/privacy.py, docs/privacy.md): off unless dp_epsilon is set
    dp_epsilon: Optional[float] = None
    dp_delta: Optional[float] = None
    dp_clip: float = 1.0
    dp_accountant: str = "prv"
    dp_adaptive_clip: Optional[float] = None
    # prepared data (docs/data.md): where --data is prepared (default <output_dir>/data), and the
    # checksum the prepared data must have (recorded by preparation, checked on resume and eval)
    prepared: Optional[str] = None
    data_checksum: Optional[str] = None
    # the fields the user set (the CLI's flags given); None: those that differ from their
    # default. --resume refuses a set field that would change the resumed run (for_resume)
    explicit: Optional[frozenset] = dataclasses.field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        try:
            self._check_fields()
        except ValueError as e:
            raise RunError(str(e)) from None
        self._check_fine_tuning()

    def _check_fine_tuning(self) -> None:
        """Combinations of init_from / lora_* / resume / stop_after that cannot work (each field's
        own type and range are :meth:`_check_fields`', checked first)."""
        if self.lora_rank is not None:  # a positive int: INT_MINIMUM, checked before
            if self.init_from is None:
                raise RunError("--lora-rank needs --init-from CHECKPOINT: LoRA adapts the weights of a trained model")
            if self.resume is not None:
                raise RunError("a LoRA run (--lora-rank) cannot be resumed; start it again, or continue from its "
                               "merged weights with --init-from")
            if self.stop_after is not None:
                raise RunError("--stop-after splits a run into resumable pieces, and a LoRA run (--lora-rank) cannot "
                               "be resumed")
        if self.init_from is not None and self.resume is not None:
            raise RunError("--init-from starts a new run from a checkpoint's weights and --resume continues a run; "
                           "give one of them")
        if self.init_from is None:
            unset = [f for f in _NONE_FROM_CHECKPOINT if getattr(self, f) is None]
            if unset:
                raise RunError(f"{', '.join(unset)} may be None (the checkpoint's) only with init_from")

    def _check_fields(self) -> None:
        for name, lo in INT_MINIMUM.items():
            check_int(name, getattr(self, name), min=lo, allow_none=default(name) is None or name == "seq_len")
        check_int("seed", self.seed, min=SEED_RANGE[0], max=SEED_RANGE[1])
        for name, (lo, hi, lo_open, finite) in NUMBER_RANGE.items():
            check_number(name, getattr(self, name), min=lo, max=hi, min_open=lo_open, finite=finite,
                         allow_none=default(name) is None or name == "dropout")
        check_choice("attention_type", self.attention_type, ATTENTION_TYPES)
        check_choice("position_encoding", self.position_encoding, POSITION_ENCODINGS)
        if self.attention_backend is not None:
            check_choice("attention_backend", self.attention_backend, ATTENTION_BACKENDS)
        check_choice("precision", self.precision, PRECISION_FLAG_CHOICES)
        check_choice("log_to", self.log_to, LOG_TO_CHOICES)
        from .privacy import check_dp_fields  # here: run.privacy imports this module
        check_dp_fields(self)
        check_choice("optimizer", self.optimizer, RUN_OPTIMIZERS)
        for name in ("compile", "gradient_checkpointing", "overwrite"):
            value = getattr(self, name)
            if not isinstance(value, bool) and not (value is None and name == "gradient_checkpointing"):
                raise ValueError(f"{name} must be a bool, got {value!r}")
        if not isinstance(self.document_mask, bool):
            raise ValueError(f"document_mask must be a bool, got {self.document_mask!r}")
        for name in ("text_field", "output_dir", "device"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"{name} must be a str, got {getattr(self, name)!r}")
        for name in ("data", "tokenizer", "resume", "init_from", "lora_targets", "prepared", "data_checksum"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise ValueError(f"{name} must be a str or None, got {getattr(self, name)!r}")

    # ------------------------------------------------------------------ constructors

    @classmethod
    def from_flags(cls, values: Mapping[str, Any], given: Collection[str] = ()) -> "RunConfig":
        """The config of ``aam-func train`` flags: ``values`` maps every field to its flag's value
        (defaults included; other keys are ignored), ``given`` names the fields set explicitly.
        With ``init_from``, fields not given that the checkpoint supplies are None (see the module
        docstring), and giving a flag that shapes the model is an error."""
        given = set(given)
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in values.items() if k in fields}
        if kwargs.get("lora_rank") is None:
            lora_flags = [flag(k) for k in _LORA_OPTIONS if k in given]
            if lora_flags:
                raise RunError(f"{', '.join(lora_flags)} only apply with --lora-rank")
        if kwargs.get("init_from") is not None:
            kwargs.update({k: None for k in (*_NONE_FROM_CHECKPOINT, "attention_backend") if k not in given})
        cfg = cls(**kwargs, explicit=frozenset(given & fields))
        if cfg.init_from is not None:
            shape = [flag(k) for k in SHAPE_FIELDS if k in given]
            if shape:
                raise RunError(f"{', '.join(shape)} cannot be combined with --init-from: the model's configuration "
                               "and tokenizer come from the checkpoint")
        return cfg

    def for_resume(self, checkpoint) -> "RunConfig":
        """This config continuing ``checkpoint`` (an :class:`aam_func.checkpoint.Checkpoint`): the
        :data:`RESUMED_FIELDS` from its saved arguments, the rest (steps, cadences, stop_after,
        device ...) as they are here. A LoRA run's checkpoint, or one already at ``steps``, is an error."""
        if checkpoint.train_state.get("lora"):
            raise RunError(f"checkpoint {checkpoint.path} was written by a LoRA fine-tune (--lora-rank), which cannot "
                           "be resumed; its params are the merged weights: start a new run from it with --init-from")
        saved = checkpoint.train_state.get("args", {})
        self._check_resume_flags(saved, checkpoint.path)
        adjusted = self.explicit_fields() & set(RESUME_ADJUSTABLE)
        try:
            resumed = dataclasses.replace(self, **{k: saved[k] for k in RESUMED_FIELDS if k in saved and k not in adjusted})
        except RunError as e:
            raise RunError(f"checkpoint {checkpoint.path}: its saved training arguments are invalid: {e}") from None
        resumed = resumed._resumed_document_mask(checkpoint)
        if resumed.steps <= checkpoint.step:
            raise RunError(f"the checkpoint is already at step {checkpoint.step}; ask for more --steps than that")
        return resumed

    def _resumed_document_mask(self, checkpoint) -> "RunConfig":
        """A resumed run masks documents as its checkpoint's model does (runs from before the
        default was on keep it off): an explicit --document-mask / --no-document-mask that
        differs is refused, by name."""
        model_cfg = getattr(checkpoint, "cfg", None)
        if model_cfg is None:  # no model config to read (a stand-in checkpoint): the flag stands
            return self
        recorded = bool(getattr(model_cfg, "document_mask", False))
        if "document_mask" in self.explicit_fields() and self.document_mask != recorded:
            raise RunError(f"--resume continues the run in {checkpoint.path} with its own settings; "
                           f"{flag('document_mask') if self.document_mask else '--no-document-mask'} would change it "
                           f"(the run has document_mask={recorded}). Drop it, or start a new run")
        return dataclasses.replace(self, document_mask=recorded)

    def explicit_fields(self) -> frozenset:
        """The fields the user set: ``explicit`` when given (the CLI's flags), else those whose
        value differs from their default."""
        if self.explicit is not None:
            return self.explicit
        return frozenset(f.name for f in dataclasses.fields(self)
                         if f.name != "explicit" and getattr(self, f.name) != f.default)

    def _check_resume_flags(self, saved: Mapping[str, Any], path: str) -> None:
        """A field set explicitly with --resume: those of :data:`RESUME_FREE` and
        :data:`RESUME_ADJUSTABLE` are honoured; any other whose value differs from the one the
        checkpoint was trained with is refused, by name (nothing is ignored silently)."""
        changed = []
        for name in sorted(self.explicit_fields() - set(RESUME_FREE) - set(RESUME_ADJUSTABLE)):
            if name in saved and not _same_setting(name, getattr(self, name), saved[name]):
                changed.append(f"{flag(name)} {getattr(self, name)!r} (the run has {saved[name]!r})")
        if changed:
            raise RunError(f"--resume continues the run in {path} with its own settings; these flags would change "
                           f"it: {'; '.join(changed)}. Drop them, or start a new run (--init-from {path} for its "
                           f"weights). With --resume you may change: {', '.join(flag(n) for n in RESUME_FREE + RESUME_ADJUSTABLE)}")

    def for_init_from(self, checkpoint) -> "RunConfig":
        """This config starting from ``checkpoint`` (``init_from``): ``seq_len`` None becomes the
        checkpoint's training length (at most its model's maximum)."""
        if self.seq_len is not None:
            return self
        saved = checkpoint.train_state.get("args", {}).get("seq_len", default("seq_len"))
        return dataclasses.replace(self, seq_len=min(saved, checkpoint.cfg.max_seq_len))

    def check_world_size(self, world: int, *, from_checkpoint: bool = False) -> None:
        """``batch_size`` is the global batch: with ``world`` processes it must divide evenly.
        :func:`aam_func.run.train` asks before the process group starts (the flags' batch size);
        preparation asks again once ``--resume`` has taken the checkpoint's (``from_checkpoint``)."""
        if self.batch_size % world:
            source = " (from the checkpoint)" if from_checkpoint else ""
            raise RunError(f"--batch-size {self.batch_size}{source} is the global batch and must be divisible by "
                           f"the number of processes ({world}); use a multiple of {world}")

    # ------------------------------------------------------------------ derived

    @property
    def warmup(self) -> int:
        """Warmup steps: ``warmup_steps``, by default 10% of ``steps`` (at least 1), at most ``steps``."""
        warmup = self.warmup_steps if self.warmup_steps is not None else max(1, self.steps // 10)
        return min(warmup, self.steps)

    def saved_args(self) -> dict:
        """What a checkpoint stores as ``train_state["args"]``: every field but ``resume``,
        ``overwrite`` and ``explicit``."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name not in ("resume", "explicit", "overwrite")}


def _same_setting(name: str, value: Any, saved: Any) -> bool:
    if name in ("data", "tokenizer", "prepared") and isinstance(value, str) and isinstance(saved, str):
        return os.path.abspath(value) == os.path.abspath(saved)
    return value == saved


def default(name: str) -> Any:
    """The default of RunConfig field ``name`` (that of its ``aam-func train`` flag)."""
    return RunConfig.__dataclass_fields__[name].default
