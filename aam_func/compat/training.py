"""The guide's losses, optimizer factory and training pipeline over :mod:`aam_func.losses`,
:mod:`aam_func.optim` and :func:`aam_func.train.make_train_step`."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Optional, Union

import torch
from torch import Tensor, nn

from .. import optim, tree
from ..config import ModelConfig
from ..losses import contrastive_loss, focal_loss, label_smoothing_loss, triplet_loss
from ..generate import generate
from ..train import (dropout_generator, make_eval_step, make_lm_loss, make_train_step, needs_dropout_generator,
                     resolve_precision)
from .model import AdvancedTransformerModel

__all__ = ["AdvancedLossFunctions", "AdvancedOptimizers", "AdvancedTrainingPipeline"]


# ----------------------------------------------------------------------------- losses


class AdvancedLossFunctions:
    """The guide's loss namespace: the functions of :mod:`aam_func.losses`."""

    focal_loss = staticmethod(focal_loss)
    label_smoothing_loss = staticmethod(label_smoothing_loss)
    contrastive_loss = staticmethod(contrastive_loss)
    triplet_loss = staticmethod(triplet_loss)


# ----------------------------------------------------------------------------- optimizers


def _named_trainable(model: Union[nn.Module, Mapping]) -> dict[str, Tensor]:
    if isinstance(model, nn.Module):
        return {n: p for n, p in model.named_parameters() if p.requires_grad}
    return tree.flatten(model)


def _decay_flags(named: Mapping[str, Tensor]) -> dict[str, bool]:
    return tree.flatten(optim.decay_mask(tree.unflatten(dict(named))))


class AdvancedOptimizers:
    """The guide's optimizer factory: ``torch.optim.AdamW`` with :func:`aam_func.optim.decay_mask`
    groups and a ``LambdaLR`` over :func:`aam_func.optim.warmup_cosine`; :meth:`functional`
    is the same recipe in ``aam_func.optim`` (what :class:`AdvancedTrainingPipeline` runs)."""

    @staticmethod
    def create_optimizer(model: nn.Module, config: ModelConfig) -> torch.optim.AdamW:
        """AdamW(lr=config.learning_rate): ``weight_decay=config.weight_decay`` on linear and
        embedding weights, none on biases and norm parameters. Frozen parameters are left out."""
        named = _named_trainable(model)
        if not named:
            raise ValueError(f"{type(model).__name__} has no trainable parameters (requires_grad=True)")
        flags = _decay_flags(named)
        decay = [p for n, p in named.items() if flags[n]]
        no_decay = [p for n, p in named.items() if not flags[n]]
        groups = [g for g in ({"params": decay, "weight_decay": config.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
        return torch.optim.AdamW(groups, lr=config.learning_rate)

    @staticmethod
    def create_scheduler(optimizer: torch.optim.Optimizer, config: ModelConfig,
                         num_training_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
        """Linear warmup over ``config.warmup_steps`` then cosine to 0 at ``num_training_steps``:
        the factor of :func:`aam_func.optim.warmup_cosine` (transformers' cosine-with-warmup)."""
        factor = optim.warmup_cosine(1.0, config.warmup_steps, num_training_steps)
        return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)

    @staticmethod
    def functional(config: ModelConfig, params, num_training_steps: int) -> optim.GradientTransformation:
        """The same recipe for the functional core: global-norm clipping at ``config.max_grad_norm``
        (0: none), then AdamW with the scheduled learning rate and the decay mask of ``params``."""
        return optim.adamw_warmup_cosine(params, learning_rate=config.learning_rate, total_steps=num_training_steps,
                                         warmup_steps=config.warmup_steps, weight_decay=config.weight_decay,
                                         max_grad_norm=config.max_grad_norm)


# ----------------------------------------------------------------------------- the pipeline


def _tokenizer_size(tokenizer) -> int:
    return len(tokenizer) if hasattr(tokenizer, "__len__") else int(tokenizer.vocab_size)


def _check_ids_fit(ids: Tensor, vocab_size: int, tokenizer, what: str) -> None:
    if ids.numel() == 0:
        return
    hi = int(ids.max())
    if hi < vocab_size:
        return
    msg = f"{what} contains token id {hi}, outside the model's vocab_size={vocab_size}"
    if tokenizer is not None:
        n = _tokenizer_size(tokenizer)
        msg += (f"; the tokenizer has {n} tokens (len(tokenizer)). Build the model with "
                f"ModelConfig(vocab_size=len(tokenizer)) (= {n}) or use a tokenizer of at most {vocab_size} tokens")
    raise ValueError(msg)


class AdvancedTrainingPipeline:
    """The guide's pipeline: :func:`aam_func.train.make_train_step` over the model's own tensors.

    Each :meth:`train_step` reads the module's parameters as a Params tree, runs the functional
    step (AdamW + warmup-cosine + clipping from :meth:`AdvancedOptimizers.functional`, dropout
    from a generator seeded by ``seed`` and the step), and writes the new values back into the
    same Parameters, so ``model`` is always current. Returns floats: ``loss``,
    ``learning_rate`` (the rate this step used), ``grad_norm`` (before clipping), ``tokens``,
    ``step``. ``config.mixed_precision`` trains under bf16 autocast (fp16 with loss scaling on a
    GPU without bf16), params staying float32.
    """

    def __init__(self, model: AdvancedTransformerModel, config: Optional[ModelConfig] = None, tokenizer=None,
                 *, num_training_steps: int = 10000, seed: int = 0, precision: Optional[str] = None):
        if not isinstance(model, AdvancedTransformerModel):
            raise TypeError(
                f"AdvancedTrainingPipeline drives an AdvancedTransformerModel, got {type(model).__name__}; "
                "for other modules use AdvancedOptimizers.create_optimizer with an ordinary torch loop"
            )
        self.model = model
        self.config = model.config if config is None else config
        if not isinstance(self.config, ModelConfig):
            raise TypeError(f"config must be a ModelConfig, got {type(self.config).__name__}")
        self.tokenizer = tokenizer
        vocab = model.config.vocab_size
        if tokenizer is not None and _tokenizer_size(tokenizer) > vocab:
            # not an error: the guide's own integration test pairs gpt2 with a 100-token model and
            # feeds it ids < 100; ids the model cannot embed are refused when they come
            warnings.warn(
                f"the tokenizer has {_tokenizer_size(tokenizer)} tokens (len(tokenizer)) but the model's "
                f"vocab_size is {vocab}: batches and prompts with token ids >= {vocab} will be refused. "
                "Build the model with ModelConfig(vocab_size=len(tokenizer))", UserWarning, stacklevel=2)
        self.num_training_steps = num_training_steps
        self.seed = int(seed)
        self.precision = precision or self._precision()
        self.optimizer = AdvancedOptimizers.functional(self.config, self._params(), num_training_steps)
        self._step_fn = make_train_step(self._loss, self.optimizer, precision=self.precision)
        self._eval_fn = make_eval_step(self._eval_loss, precision=self.precision)
        self.opt_state = self._step_fn.init(self._params())
        self.step = 0
        self._gen_generator: Optional[torch.Generator] = None

    # the loss is read from the model at call time, so gradient_checkpointing_enable() applies
    def _loss(self, params, batch, generator=None):
        return make_lm_loss(self.model.spec, train=True)(params, batch, generator)

    def _eval_loss(self, params, batch):
        return make_lm_loss(self.model.spec, train=False)(params, batch)

    def _precision(self) -> str:
        return resolve_precision("mixed" if self.config.mixed_precision else "fp32", next(self.model.parameters()).device)

    def _params(self):
        return tree.map(lambda t: t.detach(), self.model.params())

    def _batch(self, batch: Mapping[str, Tensor]) -> dict:
        if "input_ids" not in batch:
            raise KeyError("batch needs 'input_ids' (and optionally 'attention_mask', 'labels')")
        out = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "labels") and v is not None}
        vocab = self.model.config.vocab_size
        _check_ids_fit(out["input_ids"], vocab, self.tokenizer, "input_ids")
        if "labels" in out:
            _check_ids_fit(out["labels"], vocab, self.tokenizer, "labels")
        return out

    def _generator(self) -> Optional[torch.Generator]:
        if not needs_dropout_generator(self.model.config):
            return None
        return dropout_generator(self.seed, self.step, next(self.model.parameters()).device)

    def train_step(self, batch: Mapping[str, Tensor]) -> dict:
        batch = self._batch(batch)
        gen = self._generator()
        args = (self._params(), self.opt_state, batch) + ((gen,) if gen is not None else ())
        new_params, self.opt_state, m = self._step_fn(*args)
        with torch.no_grad():
            for name, new in tree.flatten(new_params).items():
                self.model.get_parameter(name).copy_(new)
        self.step += 1
        out = {k: float(v) for k, v in m.items() if k != "tokens"}
        out["tokens"] = int(m["tokens"])
        out["step"] = self.step
        return out

    def evaluate_step(self, batch: Mapping[str, Tensor]) -> dict:
        m = self._eval_fn(self._params(), self._batch(batch))
        return {"loss": float(m["loss"]), "perplexity": float(m["perplexity"]), "tokens": int(m["tokens"])}

    def generate_text(self, prompt: str, max_length: int = 100, temperature: float = 1.0, top_k: int = 50,
                      top_p: float = 1.0, *, do_sample: bool = True, seed: Optional[int] = None) -> str:
        """Prompt + continuation as text; ``max_length`` counts prompt and new tokens (transformers').
        Sampling with temperature, top-k, top-p (``do_sample=False``: greedy) by
        :func:`aam_func.generate.generate`; ``seed`` fixes the draw, else a pipeline generator."""
        if self.tokenizer is None:
            raise ValueError("generate_text needs a tokenizer: AdvancedTrainingPipeline(model, config, tokenizer)")
        ids = self.tokenizer.tokenize_text([prompt], padding=False, truncation=False)["input_ids"]
        if ids.shape[1] == 0:
            raise ValueError("the prompt encodes to no tokens")
        vocab = self.model.config.vocab_size
        _check_ids_fit(ids, vocab, self.tokenizer, "the encoded prompt")
        new = max_length - ids.shape[1]
        if new < 1:
            raise ValueError(f"max_length={max_length} leaves no room after the prompt's {ids.shape[1]} tokens "
                             "(max_length counts the prompt)")
        dev = next(self.model.parameters()).device
        if seed is not None:
            gen = torch.Generator(device=dev).manual_seed(int(seed))
        else:
            if self._gen_generator is None:
                self._gen_generator = torch.Generator(device=dev).manual_seed(self.seed)
            gen = self._gen_generator
        out = generate(self.model.spec, self._params(), ids.to(dev), max_new_tokens=new, do_sample=do_sample,
                       temperature=temperature, top_k=top_k, top_p=top_p,
                       eos_token_id=self.tokenizer.eos_token_id, generator=gen if do_sample else None)
        return self.tokenizer.decode_tokens(out[0])
