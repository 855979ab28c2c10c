"""P-tuning: PEFT PromptEncoder parity, mask/labels semantics, gradients reach only the prompt,
generation (aam_func and transformers through inputs_embeds), per-sample grads, bad input."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, strategies as st
from torch.func import grad, vmap

import aam_func as af
from aam_func import tree
from aam_func.peft import ptuning


def tiny(**kw):
    base = dict(vocab_size=41, d_model=16, n_layers=2, n_heads=2, d_ff=32, max_seq_len=32, dropout=0.0,
                position_encoding="learnable", activation="gelu_tanh")
    base.update(kw)
    return af.ModelConfig(**base)


def maxdiff(a, b):
    if isinstance(a, dict):
        fa, fb = tree.flatten(a), tree.flatten(b)
        assert fa.keys() == fb.keys()
        return max(maxdiff(fa[k], fb[k]) for k in fa)
    return (a - b).abs().max().item()


@pytest.mark.parametrize("encoder,peft_name", [("mlp", "MLP"), ("lstm", "LSTM")])
def test_prompt_encoder_equals_peft(encoder, peft_name):
    pytest.importorskip("peft", reason="PromptEncoder parity needs `pip install peft` (the peft extra)")
    from peft import PromptEncoderConfig
    from peft.tuners.p_tuning.model import PromptEncoder

    prompt = ptuning.init(16, 5, encoder, encoder_hidden_size=12, seed=3)
    ref = PromptEncoder(PromptEncoderConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=5, token_dim=16, encoder_hidden_size=12,
        encoder_reparameterization_type=peft_name, num_transformer_submodules=1))
    ref.load_state_dict(tree.flatten(prompt), strict=True)  # same names, same shapes
    assert maxdiff(ptuning.prompts(prompt), ref(torch.arange(5)[None])[0]) <= 1e-6


def test_no_encoder_is_the_table():
    prompt = ptuning.init(8, 3, None, seed=0)
    assert tree.names(prompt) == ["embedding.weight"] and ptuning.encoder_kind(prompt) is None
    assert torch.equal(ptuning.prompts(prompt), prompt["embedding"]["weight"])


@given(st.integers(1, 3), st.integers(1, 8), st.integers(1, 6), st.sampled_from(["mlp", "lstm", None]),
       st.integers(0, 2**16))
def test_shapes_mask_labels(batch, seq, n, encoder, seed):
    g = torch.Generator().manual_seed(seed)
    prompt = ptuning.init(8, n, encoder, encoder_hidden_size=4, seed=seed)
    emb = torch.randn(batch, seq, 8, generator=g)
    mask = (torch.rand(batch, seq, generator=g) > 0.3).long()
    labels = torch.randint(0, 9, (batch, seq), generator=g)
    out = ptuning.apply(prompt, emb, mask, labels)
    assert out["inputs_embeds"].shape == (batch, n + seq, 8)
    assert torch.equal(out["inputs_embeds"][:, n:], emb)
    assert torch.equal(out["inputs_embeds"][0, :n], ptuning.prompts(prompt))
    assert torch.equal(out["inputs_embeds"][:, :n], out["inputs_embeds"][-1:, :n].expand(batch, n, 8))
    assert out["attention_mask"].dtype == mask.dtype and torch.equal(out["attention_mask"][:, :n], torch.ones(batch, n).long())
    assert torch.equal(out["attention_mask"][:, n:], mask)
    assert torch.equal(out["labels"][:, :n], torch.full((batch, n), -100)) and torch.equal(out["labels"][:, n:], labels)
    none = ptuning.apply(prompt, emb)
    assert none["attention_mask"] is None and none["labels"] is None


def test_real_token_logits_loss_and_frozen_base():
    cfg = tiny()
    model = af.Transformer(cfg)
    params = model.init(seed=0)
    prompt = ptuning.init(cfg.d_model, 4, "mlp", seed=1)
    ids = torch.randint(0, cfg.vocab_size, (3, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(3, 7, dtype=torch.long)
    out = model.apply(params, **ptuning.apply(prompt, model.embed(params, ids), mask, ids))
    real = out["logits"][:, 4:]
    assert real.shape == (3, 7, cfg.vocab_size)
    # the loss: the last virtual position predicts ids[:, 0], real position t predicts ids[:, t+1]
    pred = out["logits"][:, 3:-1]
    assert abs(out["loss"].item() - F.cross_entropy(pred.reshape(-1, cfg.vocab_size), ids.reshape(-1)).item()) <= 1e-5
    # gradients wrt the prompt reach every prompt param and nothing else is differentiated
    loss = lambda pr: model.apply(params, **ptuning.apply(pr, model.embed(params, ids), mask, ids))["loss"]
    g = grad(loss)(prompt)
    assert tree.names(g) == tree.names(prompt) and all(t.abs().sum() > 0 for t in tree.leaves(g))
    # eager autograd with a frozen bound base: only the prompt gets .grad
    module = af.bind(model, params)
    module.requires_grad_(False)
    leaves = {k: v.clone().requires_grad_() for k, v in tree.flatten(prompt).items()}
    pr = tree.unflatten(leaves)
    module(**ptuning.apply(pr, model.embed(params, ids), mask, ids))["loss"].backward()
    assert all(p.grad is None for p in module.parameters())
    assert all(v.grad is not None and v.grad.abs().sum() > 0 for v in leaves.values())


def test_padding_is_invisible_to_real_tokens():
    cfg = tiny()
    model = af.Transformer(cfg)
    params = model.init(seed=0)
    prompt = ptuning.init(cfg.d_model, 3, "lstm", encoder_hidden_size=8, seed=2)
    ids = torch.randint(0, cfg.vocab_size, (1, 5))
    padded = torch.cat([ids, torch.zeros(1, 3, dtype=torch.long)], 1)
    mask = torch.cat([torch.ones(1, 5), torch.zeros(1, 3)], 1).long()
    a = model.apply(params, **ptuning.apply(prompt, model.embed(params, ids), None, None))["logits"]
    b = model.apply(params, **ptuning.apply(prompt, model.embed(params, padded), mask, None))["logits"]
    assert maxdiff(a, b[:, : 3 + 5]) <= 1e-5


def test_guide_p_tuning_transformer_is_expressible():
    """The guide's P_TuningTransformer.forward(input_ids, attention_mask, labels) as one function."""
    cfg = tiny()
    model = af.Transformer(cfg)
    params = model.init(seed=0)
    prompt = ptuning.init(cfg.d_model, 10, "mlp", seed=0)

    def p_tuning_forward(params, prompt, input_ids, attention_mask=None, labels=None):
        embeddings = model.embed(params, input_ids)
        return model.apply(params, **ptuning.apply(prompt, embeddings, attention_mask, labels))

    ids = torch.randint(0, cfg.vocab_size, (2, 6))
    out = p_tuning_forward(params, prompt, ids, torch.ones(2, 6, dtype=torch.long), ids)
    assert out["logits"].shape == (2, 16, cfg.vocab_size) and torch.isfinite(out["loss"])


def test_generation_aam_and_transformers_agree():
    pytest.importorskip("transformers")
    from aam_func.interop import hf

    cfg = tiny()
    model = af.Transformer(cfg)
    params = model.init(seed=4)
    prompt = ptuning.init(cfg.d_model, 4, "mlp", seed=5)
    ids = torch.randint(0, cfg.vocab_size, (2, 5), generator=torch.Generator().manual_seed(1))
    ours = ptuning.generate(model, params, prompt, ids, 6)
    assert ours.shape == (2, 11) and torch.equal(ours[:, :5], ids)
    hf_model = hf.to_transformers(cfg, params).eval()
    batch = ptuning.apply(prompt, hf_model.get_input_embeddings()(ids), torch.ones(2, 5, dtype=torch.long))
    ref_logits = hf_model(inputs_embeds=batch["inputs_embeds"], attention_mask=batch["attention_mask"]).logits
    our_logits = model.apply(params, **ptuning.apply(prompt, model.embed(params, ids)))["logits"]
    assert maxdiff(ref_logits, our_logits) <= 1e-4
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        theirs = hf_model.generate(inputs_embeds=batch["inputs_embeds"], attention_mask=batch["attention_mask"],
                                   max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(theirs[:, -6:], ours[:, 5:])


def test_per_sample_prompt_grads():
    cfg = tiny()
    model = af.Transformer(cfg)
    params = model.init(seed=0)
    prompt = ptuning.init(cfg.d_model, 3, "mlp", encoder_hidden_size=8, seed=0)
    ids = torch.randint(0, cfg.vocab_size, (3, 6))

    def loss(pr, x):
        x = x[None]
        return model.apply(params, **ptuning.apply(pr, model.embed(params, x), labels=x))["loss"]

    per = vmap(grad(loss), in_dims=(None, 0))(prompt, ids)
    for i in range(3):
        assert maxdiff(tree.map(lambda t: t[i], per), grad(loss)(prompt, ids[i])) <= 1e-5


def test_dropout_on_virtual_tokens():
    prompt = ptuning.init(8, 4, None, seed=0)
    emb = torch.randn(2, 3, 8)
    a = ptuning.apply(prompt, emb, train=True, dropout=0.5, generator=torch.Generator().manual_seed(0))
    b = ptuning.apply(prompt, emb, train=False, dropout=0.5)
    assert torch.equal(b["inputs_embeds"][0, :4], prompt["embedding"]["weight"])
    assert not torch.equal(a["inputs_embeds"][:, :4], b["inputs_embeds"][:, :4])
    assert torch.equal(a["inputs_embeds"][:, 4:], emb)


def test_bad_input():
    with pytest.raises(ValueError, match="num_virtual_tokens"):
        ptuning.init(8, 0)
    with pytest.raises(ValueError, match="encoder must be one of"):
        ptuning.init(8, 2, "gru")
    with pytest.raises(ValueError, match="encoder_hidden_size"):
        ptuning.init(8, 2, "mlp", encoder_hidden_size=0)
    prompt = ptuning.init(8, 2, "mlp")
    with pytest.raises(ValueError, match="d_model=8 but embeddings have 6"):
        ptuning.apply(prompt, torch.zeros(1, 3, 6))
    with pytest.raises(ValueError, match=r"\(batch, seq, d_model\)"):
        ptuning.apply(prompt, torch.zeros(3, 8))
    with pytest.raises(ValueError, match="attention_mask must be"):
        ptuning.apply(prompt, torch.zeros(1, 3, 8), torch.ones(1, 4))
    with pytest.raises(ValueError, match="labels must be"):
        ptuning.apply(prompt, torch.zeros(1, 3, 8), None, torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="embedding"):
        ptuning.prompts({"mlp_head": {}})
