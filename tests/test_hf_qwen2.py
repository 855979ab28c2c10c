"""Qwen2-shaped transformers models (biases on q/k/v only): logits, loss and gradients match, the
export gives back the same state_dict, PEFT adapter files fit, and an effective sliding window is
refused."""

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

import aam_func as af
from aam_func import tree
from aam_func.interop.hf import config_to_transformers, from_transformers, to_transformers


def qwen2(**kw):
    c = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, rope_theta=5000.0, bos_token_id=None,
             eos_token_id=None, pad_token_id=None)
    c.update(kw)
    torch.manual_seed(0)
    m = Qwen2ForCausalLM(Qwen2Config(**c)).eval()
    with torch.no_grad():  # biases start at 0 and norms at 1: perturb them so their mapping is checked
        for n, p in m.named_parameters():
            if "norm" in n or n.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return m


@pytest.mark.parametrize("tied", [False, True])
def test_qwen2_logits_loss_gradients_and_state_dict(tied):
    m = qwen2(tie_word_embeddings=tied)
    cfg, params = from_transformers(m)
    assert cfg.qkv_bias is True and cfg.bias is False and "bias" in params["blocks"]["0"]["attn"]["qkv"]
    assert "bias" not in params["blocks"]["0"]["attn"]["out"]
    ids = torch.randint(0, 97, (2, 33), generator=torch.Generator().manual_seed(1))
    model = af.Transformer(cfg)
    ours = model.apply(params, ids, labels=ids)
    theirs = m(ids, labels=ids)
    assert (ours["logits"] - theirs.logits).abs().max() <= 1e-5
    assert abs(ours["loss"].item() - theirs.loss.item()) <= 1e-6
    g = torch.func.grad(lambda p: model.apply(p, ids, labels=ids)["loss"])(params)
    theirs.loss.backward()
    qkv_b = torch.cat([m.model.layers[0].self_attn.__getattr__(f"{x}_proj").bias.grad for x in "qkv"])
    assert torch.allclose(g["blocks"]["0"]["attn"]["qkv"]["bias"], qkv_b, atol=1e-6, rtol=1e-4)
    back = to_transformers(cfg, params)
    assert type(back).__name__ == "Qwen2ForCausalLM"
    a, b = m.state_dict(), back.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_qwen2_lora_adapters_load_in_peft(tmp_path):
    from peft import PeftModel

    from aam_func.interop.peft import save_pretrained
    from aam_func.peft import lora

    m = qwen2()
    cfg, params = from_transformers(m)
    spec, adapters, _ = lora.from_cli_args(params, 4, 8.0, "*.attn.qkv,*.mlp.up", seed=0)
    adapters = tree.map(lambda t: t + 0.05 * torch.randn_like(t), adapters)  # B starts at zero
    save_pretrained(spec, adapters, tmp_path, base_model=cfg)
    ids = torch.randint(0, 97, (2, 20), generator=torch.Generator().manual_seed(2))
    ours = af.Transformer(cfg).apply(spec.merged(params, adapters), ids)["logits"]
    with torch.no_grad():
        theirs = PeftModel.from_pretrained(m, str(tmp_path)).eval()(ids).logits
    assert (ours - theirs).abs().max() <= 1e-5


def test_qwen2_sliding_window_and_unmappable_biases_are_refused():
    with pytest.raises(ValueError, match="Qwen2 sliding_window=16 < max_position_embeddings=64"):
        from_transformers(qwen2(use_sliding_window=True, sliding_window=16, max_window_layers=0))
    cfg, _ = from_transformers(qwen2(use_sliding_window=False, sliding_window=16))  # not used: exact
    assert cfg.qkv_bias
    with pytest.raises(ValueError, match="has no transformers equivalent"):
        config_to_transformers(cfg.replace(position_encoding="learnable", norm="layernorm", activation="gelu"))
