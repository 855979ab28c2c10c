"""Pure train and eval steps: gradients by ``torch.func``, updates by ``aam_func.optim``.

    loss_fn = make_lm_loss(model)                              # (params, batch, generator=None) -> scalar
    opt = optim.inject_hyperparams(optim.adamw)(learning_rate=optim.warmup_cosine(1e-3, 50, 1000))
    step = make_train_step(loss_fn, opt, precision="bf16")
    opt_state = step.init(params)
    params, opt_state, metrics = step(params, opt_state, batch)   # metrics: loss, learning_rate, grad_norm, tokens

``step`` writes into nothing: it returns new params and a new optimizer state. Precision:

- ``fp32``: everything in float32.
- ``bf16``: the forward runs under ``torch.autocast(device, bfloat16)`` inside the differentiated
  function (matmuls in bf16, norms, softmax and the loss in fp32); params, grads and optimizer
  state stay float32 (master weights). On CPUs with AMX this is where the speed is.
- ``fp16``: autocast to float16 plus the functional loss scaler: the optimizer is wrapped in
  :func:`aam_func.optim.dynamic_loss_scale` (so build the state with ``step.init``), the loss is
  multiplied by the state's scale before differentiation, and steps with inf/NaN gradients are
  skipped while the scale backs off.

Non-finite steps: with ``skip_nonfinite=True`` (the default) a step whose loss or gradient norm
is inf/NaN returns ``params`` and ``opt_state`` unchanged (``metrics["skipped"]``) instead of
spreading NaN into every parameter (fp16's loss scaler always skips such steps, and backs off).

``accumulate=k`` splits each batch into ``k`` equal micro-batches along dim 0 and averages
their gradients before one optimizer update (equal to the full batch for a mean loss over
equal-sized micro-batches). ``compile=True`` wraps the whole step (grads, clipping, optimizer)
in ``torch.compile``.

``grad_reduce`` (data parallelism, see :mod:`aam_func.distributed`) is called between the
gradient and the optimizer update with ``{"grads", "loss", "weight", "tokens"}`` of this
process's shard (``weight``: its predicted tokens, from ``loss_weight(batch)``) and returns the
same keys for the global batch; the update, ``grad_norm`` and the logged loss use the result.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Optional

import torch
from torch import Tensor

from . import optim, tree
from .optim.base import cond
from .checks import check_bool, check_choice, check_int
from .losses import count_targets

__all__ = ["make_lm_loss", "make_train_step", "make_eval_step", "evaluate", "PRECISIONS", "PRECISION_CHOICES",
           "autocast", "fast_bf16", "resolve_precision", "dropout_generator", "needs_dropout_generator", "batch_targets",
           "weighted_mean_loss"]

PRECISIONS = ("fp32", "bf16", "fp16")
# what a user may ask for: a precision, "auto" (bf16 where it is fast, else fp32) or "mixed"
# (low precision wherever the device has it: bf16, else fp16 with loss scaling)
PRECISION_CHOICES = ("auto", "mixed") + PRECISIONS
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def fast_bf16(device) -> bool:
    """Whether bf16 matmuls are native here: CUDA with bf16 support, or a CPU with AMX or
    AVX512-BF16 (read from /proc/cpuinfo on Linux)."""
    if torch.device(device).type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = f.read()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def resolve_precision(choice: str, device) -> str:
    """One of :data:`PRECISIONS` for a user's ``choice`` (:data:`PRECISION_CHOICES`) on ``device``:
    ``auto`` is bf16 where bf16 matmuls are native (:func:`fast_bf16`), else fp32 (the CLI's
    default); ``mixed`` is bf16, or fp16 on a CUDA GPU without bf16 (``ModelConfig.mixed_precision``)."""
    check_choice("precision", choice, PRECISION_CHOICES)
    device = torch.device(device)
    if choice == "auto":
        return "bf16" if fast_bf16(device) else "fp32"
    if choice == "mixed":
        return "fp16" if device.type == "cuda" and not torch.cuda.is_bf16_supported() else "bf16"
    return choice


_M64 = (1 << 64) - 1


def _mix64(x: int) -> int:
    """SplitMix64's finalizer (Steele, Lea & Flood 2014): a bijection on 64-bit ints whose output
    bits each depend on every input bit."""
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9 & _M64
    x = (x ^ (x >> 27)) * 0x94D049BB133111EB & _M64
    return x ^ (x >> 31)


def dropout_generator(seed: int, step: int, device, rank: int = 0) -> torch.Generator:
    """The dropout generator of one training step, a function of ``(seed, step, rank)`` only: a
    resumed run draws the same masks as an uninterrupted one, and data-parallel ranks draw
    independent ones. The three are hashed (SplitMix64) and folded to 32 bits, because a CPU
    generator (mt19937) reads only the low 32 bits of its seed: ``seed + (rank << 40)`` would give
    every rank the same masks there."""
    check_int("seed", seed)
    check_int("step", step, min=0)
    check_int("rank", rank, min=0)
    h = _mix64(_mix64(_mix64(seed & _M64) ^ step) ^ rank)
    return torch.Generator(device=device).manual_seed((h ^ (h >> 32)) & 0xFFFFFFFF)


def needs_dropout_generator(model_config, lora_dropout: float = 0.0) -> bool:
    """Whether a training step draws dropout masks, and so needs :func:`dropout_generator`'s
    generator: the model's dropout or attention dropout, or LoRA's dropout, is above 0. Without
    one the masks would come from torch's process-wide RNG, which every data-parallel rank seeds
    alike (the same masks on every rank) and which a resumed run does not replay step by step."""
    return model_config.dropout > 0 or model_config.attention_dropout > 0 or lora_dropout > 0


def batch_targets(batch: Mapping[str, Tensor]) -> Tensor:
    """Predicted tokens of an LM batch (:func:`aam_func.losses.count_targets` of its labels, default
    its ``input_ids``, and ``attention_mask``); its rows for a batch without (batch, seq) ids or labels."""
    labels = batch.get("labels", batch.get("input_ids"))
    if not isinstance(labels, Tensor) or labels.dim() < 2:
        first = next(v for v in batch.values() if isinstance(v, Tensor))
        return torch.tensor(first.shape[0], dtype=torch.int64, device=first.device)
    return count_targets(labels, batch.get("attention_mask"))


def make_lm_loss(model, *, train: bool = True) -> Callable:
    """``loss_fn(params, batch, generator=None)`` for a :class:`aam_func.Transformer`:
    the mean next-token cross-entropy of ``batch["labels"]`` (default: ``batch["input_ids"]``),
    with dropout when ``train`` and the model's config asks for it.

    The (batch, seq, vocab) logits are never built: the loss comes from the fused LM-head
    cross-entropy (``ops.cross_entropy``; ``Transformer.apply(..., return_logits=False)``), which
    walks the tokens in cache-sized chunks. Its value and gradients equal the logits path's (the
    config's ``fused_cross_entropy=False`` or a focal loss selects that path instead); under
    bf16 autocast every LM-head matmul runs in bf16 with float32 log-sum-exp.
    """

    def loss_fn(params, batch: Mapping[str, Tensor], generator: Optional[torch.Generator] = None) -> Tensor:
        ids = batch["input_ids"]
        out = model.apply(
            params,
            ids,
            attention_mask=batch.get("attention_mask"),
            labels=batch.get("labels", ids),
            train=train,
            generator=generator,
            return_logits=False,
            document_ids=batch.get("document_ids"),
        )
        return out["loss"]

    return loss_fn


def autocast(precision: str, device_type: str):
    """The autocast context for a precision (``nullcontext`` for fp32)."""
    check_choice("precision", precision, PRECISIONS)
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=_DTYPES[precision])


def _count_tokens(batch: Mapping[str, Tensor]) -> Tensor:
    mask = batch.get("attention_mask")
    if mask is not None:
        return mask.sum().to(torch.int64)
    ids = batch.get("input_ids")
    if ids is None:  # not an LM batch (a module's own inputs): its rows
        return batch_targets(batch)
    return torch.tensor(ids.numel(), dtype=torch.int64, device=ids.device)


def _device_type(batch: Mapping[str, Any]) -> str:
    ids = batch.get("input_ids")
    if not isinstance(ids, Tensor):
        ids = next((v for v in batch.values() if isinstance(v, Tensor)), None)
    if ids is None:
        raise ValueError(f"batch holds no tensor (keys: {sorted(batch)})")
    return ids.device.type


def _split(batch: Mapping[str, Any], k: int) -> list[dict]:
    """``k`` equal micro-batches along dim 0 of every tensor in ``batch``."""
    sizes = {v.shape[0] for v in batch.values() if isinstance(v, Tensor)}
    if len(sizes) != 1:
        raise ValueError(f"batch tensors must share their first dim, got sizes {sorted(sizes)}")
    (n,) = sizes
    if n % k:
        raise ValueError(f"batch of {n} rows cannot be split into accumulate={k} equal micro-batches")
    parts = [{} for _ in range(k)]
    for key, v in batch.items():
        chunks = v.chunk(k, dim=0) if isinstance(v, Tensor) else [v] * k
        for p, c in zip(parts, chunks):
            p[key] = c
    return parts


def _state_has(state: Mapping, suffix: str) -> bool:
    return any(n == suffix or n.endswith("." + suffix) for n in tree.flatten(state))


def _accumulated_grads(grad_fn, params, batch, scale, generator, accumulate: int, buffers=None):
    """Mean gradient and mean loss over ``accumulate`` equal micro-batches of ``batch`` (and the
    buffers after the last one, threaded through them in order, when ``buffers`` is given)."""
    micro = [batch] if accumulate == 1 else _split(batch, accumulate)
    grads, losses = None, []
    for mb in micro:
        if buffers is None:
            g, loss = grad_fn(params, mb, scale, generator)
        else:
            g, (loss, buffers) = grad_fn(params, mb, scale, generator, buffers)
        grads = g if grads is None else tree.map(torch.add, grads, g)
        losses.append(loss)
    if accumulate == 1:
        return grads, losses[0], buffers
    return tree.map(lambda x: x / accumulate, grads), torch.stack(losses).mean(), buffers


def _logged(info: Mapping[str, bool], state, norm: Tensor, scale, learning_rate) -> dict:
    """``learning_rate`` and ``grad_norm`` of a step: read from the optimizer state where it
    holds them (``info``), else the constant rate (NaN if none) and the unscaled gradients' norm
    (``norm``: that of the possibly loss-scaled gradients)."""
    if info["lr"]:
        lr = optim.current_learning_rate(state).float()
    else:
        lr = torch.tensor(float("nan") if learning_rate is None else float(learning_rate))
    if info["norm"]:
        norm = optim.last_global_norm(state).float()
    else:
        norm = (norm / scale if scale is not None else norm).float()
    return {"learning_rate": lr, "grad_norm": norm}


def _grad_fn(loss_fn: Callable, precision: str, with_buffers: bool) -> Callable:
    """``(params, batch, scale, generator, *buffers) -> (grads, loss)`` (``(grads, (loss,
    new_buffers))`` with buffers): the gradient of the loss computed under ``precision``'s
    autocast, times the fp16 loss ``scale`` (None: unscaled)."""

    def differentiated(params, batch, scale, generator, *buffers):
        extra = (generator,) if generator is not None else ()
        with autocast(precision, _device_type(batch)):
            if with_buffers:
                loss, new_buffers = loss_fn(params, *buffers, batch, *extra)
            else:
                loss = loss_fn(params, batch, *extra)
        loss = loss.float()
        scaled = loss * scale if scale is not None else loss
        return scaled, ((loss.detach(), new_buffers) if with_buffers else loss.detach())

    return torch.func.grad(differentiated, has_aux=True)


def _update(update_fn, apply_fn, grads, loss, opt_state, params, guard: bool):
    """``(new_params, new_state, grad_norm, finite)``: the optimizer's step, or with ``guard`` and
    an inf/NaN loss or gradient norm, ``params`` and ``opt_state`` unchanged. A norm that overflows
    float32 counts as non-finite: clipping (and Adam's moments) would be meaningless after it."""
    norm = optim.global_norm(grads)
    finite = torch.isfinite(loss) & torch.isfinite(norm)

    def step():
        updates, new_state = update_fn(grads, opt_state, params)
        return apply_fn(params, updates), new_state

    new_params, new_state = cond(finite, step, lambda: (params, opt_state)) if guard else step()
    return new_params, new_state, norm, finite


def _with_loss_scale(optimizer, precision: str, loss_scale: Optional[dict]):
    """``optimizer`` wrapped in the dynamic loss scaler for fp16; unchanged otherwise."""
    if not isinstance(optimizer, optim.GradientTransformation):
        raise TypeError(f"optimizer must be an optim.GradientTransformation, got {type(optimizer).__name__}")
    if precision == "fp16":
        return optim.dynamic_loss_scale(optimizer, **(loss_scale or {}))
    if loss_scale:
        raise ValueError("loss_scale options only apply to precision='fp16'")
    return optimizer


def make_train_step(
    loss_fn: Callable,
    optimizer: optim.GradientTransformation,
    *,
    accumulate: int = 1,
    precision: str = "fp32",
    compile: bool = False,
    learning_rate: Optional[float] = None,
    loss_scale: Optional[dict] = None,
    grad_reduce: Optional[Callable] = None,
    loss_weight: Optional[Callable] = None,
    compile_optimizer: bool = True,
    skip_nonfinite: bool = True,
    with_buffers: bool = False,
):
    """A pure ``step(params, opt_state, batch, generator=None) -> (params, opt_state, metrics)``.

    ``params`` may be any tree (nested dicts, a flat ``named_parameters()`` dict, a list ...); the
    new params come back in its form. ``batch`` is a dict of tensors (an LM batch has
    ``input_ids``; any other dict counts its rows as tokens). ``with_buffers`` trains a module with
    buffers (:func:`aam_func.nn.functionalize`): ``loss_fn(params, buffers, batch[, generator]) ->
    (loss, new_buffers)`` and ``step(params, buffers, opt_state, batch, generator=None) ->
    (params, buffers, opt_state, metrics)``.

    ``loss_fn(params, batch)`` returns a scalar mean loss; a step called with a ``generator``
    (dropout) calls ``loss_fn(params, batch, generator)``. ``metrics`` holds 0-d
    tensors (no host sync): ``loss`` (mean over micro-batches, unscaled), ``learning_rate`` (from
    an :func:`optim.inject_hyperparams` state, else the constant ``learning_rate`` given here, else
    NaN), ``grad_norm`` (global L2 norm of the averaged, unscaled gradients before clipping),
    ``tokens`` (non-padding input tokens in the batch), ``skipped`` (inf/NaN loss or gradients:
    with ``skip_nonfinite`` the step returned ``params`` and ``opt_state`` unchanged, see the
    module docstring); with fp16 also ``loss_scale``.
    ``step.init(params)`` builds the matching optimizer state. ``loss_scale`` passes keyword
    arguments to :func:`optim.dynamic_loss_scale` (fp16 only). ``grad_reduce`` combines the
    gradients of data-parallel processes (module docstring); ``loss_weight(batch)`` is the weight
    of this shard's mean loss in that combination (default: its predicted tokens,
    :func:`batch_targets`). With ``compile=True``, ``compile_optimizer=False`` is the escape hatch
    for an optimizer that does not trace: it then runs eagerly behind a graph break while forward
    and backward, where the FLOPs are, stay compiled.
    """
    check_choice("precision", precision, PRECISIONS)
    check_int("accumulate", accumulate, min=1)
    check_bool("skip_nonfinite", skip_nonfinite)
    check_bool("with_buffers", with_buffers)
    optimizer = _with_loss_scale(optimizer, precision, loss_scale)
    info: dict[str, bool] = {}
    step = _step_fn(_grad_fn(loss_fn, precision, with_buffers), optimizer, info, precision=precision,
                    accumulate=accumulate, compile=compile, compile_optimizer=compile_optimizer,
                    grad_reduce=grad_reduce, weight_fn=loss_weight or batch_targets, learning_rate=learning_rate,
                    guard=skip_nonfinite and precision != "fp16")  # fp16: the loss scaler skips (and backs off) itself
    return _entry(torch.compile(step) if compile else step, optimizer, info, precision, with_buffers)


def _step_fn(grad_fn, optimizer, info, *, precision, accumulate, compile, compile_optimizer, grad_reduce, weight_fn,
             learning_rate, guard) -> Callable:
    """:func:`make_train_step`'s pure step ``(params, opt_state, batch, generator=None,
    buffers=None)``, before compilation."""
    # compile=True traces the whole step, optimizer included, unless compile_optimizer=False
    eager_optimizer = compile and not compile_optimizer
    apply_fn = torch.compiler.disable(optim.apply_updates) if eager_optimizer else optim.apply_updates
    update_fn = torch.compiler.disable(optimizer.update) if eager_optimizer else optimizer.update
    # collectives run eagerly behind a graph break: forward, backward and optimizer stay compiled
    reduce_fn = torch.compiler.disable(grad_reduce) if (compile and grad_reduce is not None) else grad_reduce

    def step(params, opt_state, batch, generator: Optional[torch.Generator] = None, buffers=None):
        scale = opt_state["loss_scale"] if precision == "fp16" else None
        old_buffers = buffers
        grads, loss, buffers = _accumulated_grads(grad_fn, params, batch, scale, generator, accumulate, buffers)
        tokens = _count_tokens(batch)
        if reduce_fn is not None:
            red = reduce_fn({"grads": grads, "loss": loss, "weight": weight_fn(batch), "tokens": tokens})
            grads, loss, tokens = red["grads"], red["loss"], red["tokens"]
        new_params, new_state, norm, finite = _update(update_fn, apply_fn, grads, loss, opt_state, params, guard)
        if guard and buffers is not None:  # a skipped step leaves the running statistics alone too
            buffers = cond(finite, lambda: (buffers, {}), lambda: (old_buffers, {}))[0]
        metrics = {"loss": loss, **_logged(info, new_state, norm, scale, learning_rate), "tokens": tokens,
                   "skipped": ~finite}
        if precision == "fp16":
            metrics["loss_scale"] = opt_state["loss_scale"]
        return (new_params, new_state, metrics) if buffers is None else (new_params, new_state, metrics, buffers)

    return step


def _entry(run, optimizer, info, precision: str, with_buffers: bool) -> Callable:
    """The step users call: ``train_step(params, opt_state, batch, generator=None)``, or with
    buffers ``train_step(params, buffers, opt_state, batch, generator=None)``; checks the state
    once and carries ``init``, ``optimizer`` and ``precision``."""

    def call(params, opt_state, batch, generator, buffers=None):
        if not info:  # once, eagerly (before any tracing): which logged values the state holds
            info["lr"] = _state_has(opt_state, "hyperparams.learning_rate")
            info["norm"] = _state_has(opt_state, "global_norm")
        if precision == "fp16" and "loss_scale" not in opt_state:
            raise ValueError("precision='fp16' needs the optimizer state from step.init(params) "
                             "(it holds the dynamic loss scale)")
        if buffers is not None:
            return run(params, opt_state, batch, generator, buffers)
        return run(params, opt_state, batch, generator) if generator is not None else run(params, opt_state, batch)

    def train_step(params, opt_state, batch, generator: Optional[torch.Generator] = None):
        return call(params, opt_state, batch, generator)

    def train_step_with_buffers(params, buffers, opt_state, batch, generator: Optional[torch.Generator] = None):
        if buffers is None:
            raise ValueError("with_buffers=True: pass the module's buffers (functionalize's third value; {} if none)")
        new_params, new_state, metrics, new_buffers = call(params, opt_state, batch, generator, buffers)
        return new_params, new_buffers, new_state, metrics

    out = train_step_with_buffers if with_buffers else train_step
    out.init = optimizer.init
    out.optimizer = optimizer
    out.precision = precision
    return out


def make_eval_step(loss_fn: Callable, *, precision: str = "fp32", compile: bool = False):
    """A pure ``eval_step(params, batch) -> {"loss", "perplexity", "tokens"}`` without gradients.

    ``loss_fn`` should be built with ``train=False`` (no dropout). ``tokens`` counts the predicted
    targets (:func:`batch_targets`: -100 labels and padding excluded, as the loss's mean does), the
    weight :func:`evaluate` averages with.
    """
    check_choice("precision", precision, PRECISIONS)

    def step(params, batch):
        with torch.no_grad(), autocast(precision, batch["input_ids"].device.type):
            loss = loss_fn(params, batch).float()
        return {"loss": loss, "perplexity": torch.exp(loss), "tokens": batch_targets(batch)}

    return torch.compile(step) if compile else step


def evaluate(eval_step: Callable, params, batches: Iterable[Mapping[str, Tensor]]) -> dict[str, float]:
    """Token-weighted mean loss over ``batches`` and its perplexity ``exp(loss)``."""
    total, count = 0.0, 0
    for batch in batches:
        m = eval_step(params, batch)
        n = int(m["tokens"])
        total += float(m["loss"]) * n
        count += n
    return weighted_mean_loss(total, count)


def weighted_mean_loss(loss_sum: float, tokens: float) -> dict[str, float]:
    """``{"loss", "perplexity", "tokens"}`` of an evaluation from its sums: the token-weighted mean
    ``loss = Σ_b loss_b·n_b / Σ_b n_b`` (``loss_sum`` over ``tokens`` = Σ n_b) and ``perplexity =
    exp(loss)``, its argument capped at 700 so that an untrained model gives a huge number rather
    than an overflow. No tokens is a ValueError. Shared by :func:`evaluate` and the data-parallel
    :meth:`aam_func.distributed.DistContext.evaluate`, which sums over ranks first."""
    if tokens == 0:
        raise ValueError("evaluate: no tokens to evaluate on")
    loss = loss_sum / tokens
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": int(tokens)}
