"""API edges of issue 15 (items 3 and 12): each test reproduces a defect of the earlier code
(silent wrong results, a crash deep in torch, or input accepted and ignored) and pins the error."""

import pytest
import torch

import aam_func as af
from aam_func import optim
from aam_func.generate import generate
from aam_func.peft import lora


def params():
    return {"w": torch.randn(4, 3, generator=torch.Generator().manual_seed(0)), "b": torch.zeros(3)}


def state_with(opt, mu_shape, p):
    s = opt.init(p)
    s = {**s, "mu": {**s["mu"], "w": torch.zeros(mu_shape)}}
    return s


@pytest.mark.parametrize("fused", [None, False])
def test_adam_state_larger_than_params_is_an_error_naming_the_leaf(fused):
    # earlier: the fused kernel read the first 12 of 20 elements and returned wrong updates silently
    p = params()
    opt = optim.adamw(1e-2, fused=fused)
    with pytest.raises(ValueError, match=r"adam state 'mu' leaf 'w' has shape \(4, 5\) but grads has \(4, 3\)"):
        opt.update(p, state_with(opt, (4, 5), p), p)


@pytest.mark.parametrize("fused", [None, False])
def test_adam_state_smaller_than_params_is_an_error_before_any_kernel(fused):
    # earlier: the fused kernel wrote past the buffer (segfault, hang or a huge allocation)
    p = params()
    opt = optim.adam(1e-2, fused=fused)
    with pytest.raises(ValueError, match=r"adam state 'mu' leaf 'w' has shape \(2,\) but grads has \(4, 3\)"):
        opt.update(p, state_with(opt, (2,), p), p)


def test_state_dtype_and_missing_entries_are_named():
    p = params()
    opt = optim.adamw(1e-2)
    s = opt.init(p)
    s["nu"] = {**s["nu"], "b": torch.zeros(3, dtype=torch.float64)}
    with pytest.raises(ValueError, match=r"adam state 'nu' leaf 'b' has dtype torch.float64 but grads has torch.float32"):
        opt.update(p, s, p)
    with pytest.raises(ValueError, match=r"adam state has no 'mu' entry"):
        opt.update(p, {"count": torch.zeros((), dtype=torch.int64)}, p)


def test_one_buffer_states_name_the_misshaped_leaf():
    p = params()
    for opt, key, what in ((optim.sgd(0.1, momentum=0.9), "trace", "trace state"),
                           (optim.lion(1e-3), "mu", "lion state 'mu'")):
        s = opt.init(p)
        inner = s["0"]  # the first link of the chain
        inner[key] = {**inner[key], "b": torch.zeros(1)}
        with pytest.raises(ValueError, match=rf"{what} leaf 'b' has shape \(1,\) but grads has \(3,\)"):
            opt.update(p, s, p)


def test_a_1_shaped_update_does_not_broadcast_onto_a_larger_param():
    # earlier: p + u broadcast the (1,) update over all 12 elements, silently
    p = params()
    with pytest.raises(ValueError, match=r"updates leaf 'w' has shape \(1,\) but params has \(4, 3\)"):
        optim.apply_updates(p, {"w": torch.ones(1), "b": torch.zeros(3)})
    g = {"w": torch.ones(1), "b": torch.zeros(3)}
    with pytest.raises(ValueError, match=r"params leaf 'w' has shape \(4, 3\) but grads has \(1,\)"):
        optim.sgd(0.1, weight_decay=0.1).update(g, optim.sgd(0.1, weight_decay=0.1).init(p), p)


def test_zero_length_schedules_and_zero_clipping_are_refused():
    with pytest.raises(ValueError, match=r"total_steps must be an int >= 1, got 0"):
        optim.warmup_cosine(1e-3, 0, 0)
    with pytest.raises(ValueError, match=r"total_steps must be an int >= 1, got 0"):
        optim.warmup_linear(1e-3, 0, 0)
    with pytest.raises(ValueError, match=r"max_norm must be a finite number > 0, got 0"):
        optim.clip_by_global_norm(0)
    with pytest.raises(ValueError, match=r"max_norm"):
        optim.clip_by_global_norm(-1.0)


def tiny():
    cfg = af.ModelConfig(vocab_size=31, d_model=16, n_layers=1, n_heads=2, max_seq_len=16)
    m = af.Transformer(cfg)
    return m, m.init(seed=0)


@pytest.mark.parametrize("targets", [",", " , ", ""])
def test_lora_targets_that_split_to_nothing_are_refused(targets):
    # earlier: "," split to [] and fell back to the default targets without a word
    _, p = tiny()
    with pytest.raises(ValueError, match="name no target"):
        lora.from_cli_args(p, rank=2, targets=targets)
    with pytest.raises((TypeError, ValueError)):
        lora.from_cli_args(p, rank=2, targets=[])


@pytest.mark.parametrize("bad", [2, 0.5, -1])
@pytest.mark.parametrize("mode", [{}, {"cache": "dynamic"}, {"use_cache": False}])
def test_generate_refuses_attention_mask_values_other_than_0_1(bad, mode):
    m, p = tiny()
    ids = torch.randint(0, 31, (2, 4), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 4, dtype=torch.float32 if isinstance(bad, float) else torch.int64)
    mask[0, 1] = bad
    with pytest.raises(ValueError, match="attention_mask must hold only 0 and 1"):
        generate(m, p, ids, attention_mask=mask, max_new_tokens=2, **mode)


def test_model_config_refuses_unknown_keywords():
    with pytest.raises(TypeError, match="extra"):
        af.ModelConfig(extra={"a": 1})
