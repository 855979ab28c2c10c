"""Mistral-shaped transformers models read as the LLaMA they equal (a sliding window that covers the
whole context): logits and loss parity, and the refusal of a window that does not."""

import pytest
import torch
from transformers import MistralConfig, MistralForCausalLM

import aam_func as af
from aam_func.interop.hf import from_transformers


def mistral(**kw):
    c = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, head_dim=8, rope_theta=5000.0, bos_token_id=None,
             eos_token_id=None, pad_token_id=None)
    c.update(kw)
    torch.manual_seed(0)
    m = MistralForCausalLM(MistralConfig(**c)).eval()
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "norm" in n:
                p.add_(0.1 * torch.randn_like(p))
    return m


@pytest.mark.parametrize("window", [None, 64, 4096])
def test_mistral_logits_and_loss_match(window):
    m = mistral(sliding_window=window)
    cfg, params = from_transformers(m)
    assert cfg.n_kv_heads == 2 and cfg.rope_base == 5000.0
    ids = torch.randint(0, 97, (2, 40), generator=torch.Generator().manual_seed(1))
    ours = af.Transformer(cfg).apply(params, ids, labels=ids)
    with torch.no_grad():
        theirs = m(ids, labels=ids)
    assert (ours["logits"] - theirs.logits).abs().max() <= 1e-5
    assert abs(ours["loss"].item() - theirs.loss.item()) <= 1e-6


def test_a_window_shorter_than_the_context_is_refused():
    with pytest.raises(ValueError, match="sliding_window=16 < max_position_embeddings=64"):
        from_transformers(mistral(sliding_window=16))


def test_unsupported_architecture_lists_the_supported():
    from transformers import BertConfig

    with pytest.raises(ValueError, match="unsupported architecture model_type='bert': only GPT-2 and LLaMA-family models are supported: GPT-2"):
        from_transformers(type("M", (), {"config": BertConfig()})())
