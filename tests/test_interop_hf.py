"""GPT-2 and LLaMA weights in and out of transformers: logits, loss and gradient parity."""

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import aam_func as af
from aam_func import tree
from aam_func.interop.hf import config_to_transformers, from_transformers, to_transformers


def gpt2(**kw):
    c = dict(vocab_size=97, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=None, eos_token_id=None)
    c.update(kw)
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(**c)).eval()


def llama(**kw):
    c = dict(
        vocab_size=97, hidden_size=32, intermediate_size=72, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )
    c.update(kw)
    torch.manual_seed(0)
    m = LlamaForCausalLM(LlamaConfig(**c)).eval()
    with torch.no_grad():  # RMSNorm weights start at 1: perturb them so the import is really checked
        for n, p in m.named_parameters():
            if "norm" in n:
                p.add_(0.1 * torch.randn_like(p))
    return m


MODELS = {
    "gpt2": gpt2,
    "gpt2_untied": lambda: gpt2(tie_word_embeddings=False),
    "llama_gqa": llama,
    "llama_mha_tied": lambda: llama(num_key_value_heads=4, tie_word_embeddings=True),
    "llama_bias": lambda: llama(attention_bias=True, mlp_bias=True, rope_theta=500.0),
}


@pytest.fixture(params=sorted(MODELS))
def loaded(request, tmp_path):
    """A transformers model saved and reloaded through save_pretrained/from_pretrained."""
    m = MODELS[request.param]()
    m.save_pretrained(tmp_path)
    return type(m).from_pretrained(tmp_path).eval()


def test_logits_loss_and_gradients_match(loaded):
    cfg, params = from_transformers(loaded)
    model = af.Transformer(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 17), generator=torch.Generator().manual_seed(0))
    ours = model.apply(params, ids, labels=ids)
    theirs = loaded(ids, labels=ids)
    assert (ours["logits"] - theirs.logits).abs().max() <= 1e-5
    assert torch.allclose(ours["loss"], theirs.loss, atol=1e-6)

    g = torch.func.grad(lambda p: model.apply(p, ids, labels=ids)["loss"])(params)
    loaded.zero_grad()
    loaded(ids, labels=ids).loss.backward()
    # express their gradients in our names by exporting a gradient "model"
    hf_grads = {n: p.grad for n, p in loaded.named_parameters()}
    as_model = type(loaded)(loaded.config)
    with torch.no_grad():
        for n, p in as_model.named_parameters():
            p.copy_(hf_grads[n])
    _, g_ref = from_transformers(as_model)
    for n, t in tree.flatten(g).items():
        assert torch.allclose(t, tree.flatten(g_ref)[n], atol=1e-6, rtol=1e-4), n


def test_roundtrip_reproduces_state_dict_exactly(loaded):
    cfg, params = from_transformers(loaded)
    back = to_transformers(cfg, params)
    a, b = loaded.state_dict(), back.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_export_of_native_params_matches_our_logits():
    for cfg in (
        af.ModelConfig(vocab_size=50, d_model=32, n_layers=2, n_heads=4, max_seq_len=32, dropout=0.0,
                       position_encoding="learnable", activation="gelu_tanh"),
        af.ModelConfig(vocab_size=50, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=32, dropout=0.0,
                       use_rope=True, norm="rmsnorm", activation="swiglu", bias=False, tie_embeddings=False),
    ):
        m = af.Transformer(cfg)
        p = m.init(seed=0)
        hf = to_transformers(cfg, p).eval()
        ids = torch.randint(0, 50, (2, 9))
        assert (hf(ids).logits - m.apply(p, ids)["logits"]).abs().max() <= 1e-5


def test_unsupported_configs_are_clear_errors():
    with pytest.raises(ValueError, match="no transformers equivalent"):
        config_to_transformers(af.ModelConfig(vocab_size=10, d_model=16, n_heads=2))
    with pytest.raises(ValueError, match="attention_type='standard'"):
        config_to_transformers(af.ModelConfig(vocab_size=10, d_model=16, n_heads=2, attention_type="local"))
    with pytest.raises(ValueError, match="only GPT-2 and LLaMA"):
        from_transformers(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="missing"):
        cfg, p = from_transformers(gpt2())
        del p["ln_f"]["bias"]
        to_transformers(cfg, p)
