"""LoRA as a pure transform: identity at B=0, merged == factored, unmerge, Conv1D orientation,
PEFT parity (logits, gradients, files), adapter-only training, per-sample grads, bad input."""

import copy
import json
import math
import os
import warnings

import pytest
import torch
from hypothesis import example, given, strategies as st
from torch import nn
from torch.func import grad, vmap

import aam_func as af
from aam_func import optim, tree
from aam_func.peft import AdapterFileError, LoRA, lora, load_pretrained, save_pretrained


def tiny(**kw):
    base = dict(vocab_size=41, d_model=16, n_layers=2, n_heads=2, d_ff=32, max_seq_len=24, dropout=0.0,
                position_encoding="learnable", activation="gelu_tanh")
    base.update(kw)
    return af.ModelConfig(**base)


LLAMA = dict(position_encoding="rope", norm="rmsnorm", activation="swiglu", bias=False, tie_embeddings=False, n_kv_heads=1)


def maxdiff(a, b):
    if isinstance(a, dict):
        fa, fb = tree.flatten(a), tree.flatten(b)
        assert fa.keys() == fb.keys()
        return max(maxdiff(fa[k], fb[k]) for k in fa)
    return (a - b).abs().max().item()


def gpt2(n_embd=16, n_layer=2, vocab=53):
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(n_embd=n_embd, n_layer=n_layer, n_head=2, vocab_size=vocab, n_positions=24, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=None, eos_token_id=None)
    torch.manual_seed(0)
    return GPT2LMHeadModel(cfg).eval()


# ----------------------------------------------------------------------------- core algebra


@given(st.integers(1, 9), st.integers(1, 9), st.integers(1, 9), st.integers(1, 4), st.booleans(),
       st.booleans(), st.integers(0, 2**16))
@example(fan_in=1, fan_out=6, rank_raw=1, batch=3, fif=True, rslora=False, seed=1)  # outputs near 50 (thorough)
def test_linear_merged_factored_unmerge(fan_in, fan_out, rank_raw, batch, fif, rslora, seed):
    rank = 1 + rank_raw % min(fan_in, fan_out)
    g = torch.Generator().manual_seed(seed)
    w = torch.randn((fan_in, fan_out) if fif else (fan_out, fan_in), generator=g)
    params = {"lin": {"weight": w, "bias": torch.randn(fan_out, generator=g)}}
    spec, ad = lora.init(params, targets="lin", rank=rank, alpha=3.0, use_rslora=rslora, seed=seed,
                         fan_in_fan_out=fif)
    x = torch.randn(batch, 3, fan_in, generator=g)

    def apply(p, x):
        W, b = p["lin"]["weight"], p["lin"]["bias"]
        return x @ W + b if fif else torch.nn.functional.linear(x, W, b)

    # B = 0: nothing changes, exactly
    assert torch.equal(spec.apply(apply, params, ad, x), apply(params, x))
    assert torch.equal(spec.merged(params, ad)["lin"]["weight"], w)
    g0 = grad(lambda a: spec.apply(apply, params, a, x).square().sum())(ad)["lin"]
    assert not g0["lora_A"].any() and g0["lora_B"].abs().sum() > 0  # A starts moving once B has
    ad = tree.map(lambda t: torch.randn(t.shape, generator=g), ad)
    A, B = ad["lin"]["lora_A"], ad["lin"]["lora_B"]
    s = 3.0 / (math.sqrt(rank) if rslora else rank)
    assert spec.scale == pytest.approx(s)
    merged = spec.merged(params, ad)
    delta = s * B @ A
    assert maxdiff(merged["lin"]["weight"], w + (delta.t() if fif else delta)) <= 1e-5
    ref = apply(merged, x)
    # float32 rounding of outputs as large as ~50 (drawn by the thorough profile) exceeds 1e-5
    tol = 1e-5 * max(1.0, float(ref.abs().max()))
    assert maxdiff(ref, spec.apply(apply, params, ad, x)) <= tol
    # the pure op agrees as well
    y = lora.linear(x, w, params["lin"]["bias"], A, B, s, fan_in_fan_out=fif)
    assert maxdiff(y, ref) <= tol
    assert maxdiff(spec.unmerge(merged, ad)["lin"]["weight"], w) <= 1e-6
    assert merged["lin"]["bias"] is params["lin"]["bias"]


def test_flat_state_dict_keeps_its_form():
    params = af.Transformer(tiny()).init(seed=0)
    flat = tree.flatten(params)
    spec, ad = lora.init(flat, targets=["*.attn.qkv"], rank=2, alpha=4, b_std=0.5)
    m_flat, m_nested = spec.merged(flat, ad), spec.merged(params, ad)
    assert all(not isinstance(v, dict) for v in m_flat.values()) and m_flat.keys() == flat.keys()
    assert isinstance(m_nested["blocks"], dict)
    assert maxdiff(tree.unflatten(m_flat), m_nested) == 0.0
    # adapters round-trip through flatten/unflatten and keep their names
    assert tree.names(ad) == ["blocks.0.attn.qkv.lora_A", "blocks.0.attn.qkv.lora_B",
                              "blocks.1.attn.qkv.lora_A", "blocks.1.attn.qkv.lora_B"]
    assert maxdiff(tree.unflatten(tree.flatten(ad)), ad) == 0.0


@pytest.mark.parametrize("variant", ["gpt2", "llama"])
def test_transformer_identity_merged_equals_factored_and_grads(variant):
    cfg = tiny(**(LLAMA if variant == "llama" else {}))
    model = af.Transformer(cfg)
    params = model.init(seed=1)
    ids = torch.randint(0, cfg.vocab_size, (3, 9), generator=torch.Generator().manual_seed(0))
    targets = ["*.attn.qkv", "*.attn.out", "*.mlp.*"]
    spec, ad = lora.init(params, targets=targets, rank=3, alpha=6)
    base = model.apply(params, ids, labels=ids)
    assert torch.equal(spec.apply(model.apply, params, ad, ids, labels=ids)["logits"], base["logits"])
    ad = tree.map(lambda t: t + 0.3 * torch.randn(t.shape, generator=torch.Generator().manual_seed(t.numel())), ad)
    fact = spec.apply(model.apply, params, ad, ids, labels=ids)
    merg = model.apply(spec.merged(params, ad), ids, labels=ids)
    assert maxdiff(fact["logits"], merg["logits"]) <= 1e-5
    assert maxdiff(fact["logits"], base["logits"]) > 1e-3  # the adapters do something
    g_f = grad(lambda a: spec.apply(model.apply, params, a, ids, labels=ids)["loss"])(ad)
    g_m = grad(lambda a: model.apply(spec.merged(params, a), ids, labels=ids)["loss"])(ad)
    assert maxdiff(g_f, g_m) <= 1e-5
    assert tree.names(g_f) == tree.names(ad)


def test_tied_embedding_target_sees_merged_weight_everywhere():
    """A target used by F.embedding and as the tied head gets W + sBA in both uses."""
    cfg = tiny()
    model = af.Transformer(cfg)
    params = model.init(seed=0)
    spec, ad = lora.init(params, targets="embed", rank=2, alpha=2, b_std=0.3)
    ids = torch.randint(0, cfg.vocab_size, (2, 7))
    a = spec.apply(model.apply, params, ad, ids)["logits"]
    b = model.apply(spec.merged(params, ad), ids)["logits"]
    assert maxdiff(a, b) <= 1e-5


def test_bound_module_call():
    cfg = tiny()
    model = af.Transformer(cfg)
    params = model.init(seed=0)
    spec, ad = lora.init(params, targets=["*.mlp.fc"], rank=2, alpha=4, b_std=0.2)
    module = af.bind(model, params)
    ids = torch.randint(0, cfg.vocab_size, (2, 5))
    want = model.apply(spec.merged(params, ad), ids)["logits"]
    assert maxdiff(spec.call(module, ad, ids)["logits"], want) <= 1e-5
    assert maxdiff(spec.call_merged(module, ad, ids)["logits"], want) <= 1e-5
    # the module is untouched
    assert maxdiff(module.params(), params) == 0.0 and not module._forward_hooks


# ----------------------------------------------------------------------------- Conv1D / modules


def test_gpt2_conv1d_orientation_and_square_weights():
    pytest.importorskip("transformers")
    m = gpt2()
    spec, ad = lora.init(m, targets=["c_attn", "attn.c_proj"], rank=2, alpha=4, b_std=0.2)
    t = {x.name: x for x in spec.targets}
    assert t["transformer.h.0.attn.c_attn"].fan_in_fan_out and t["transformer.h.0.attn.c_attn"].out_features == 48
    assert t["transformer.h.0.attn.c_proj"].fan_in_fan_out  # square (16, 16): only the module type tells
    assert not LoRA.build(m, targets="lm_head", rank=2, alpha=1).targets[0].fan_in_fan_out  # nn.Linear
    ids = torch.randint(0, 53, (2, 6))
    fact = spec.call(m, ad, ids).logits
    merged_sd = spec.merged(dict(m.named_parameters()), ad)  # a flat mapping stays flat
    want = torch.func.functional_call(m, merged_sd, (ids,)).logits
    assert maxdiff(fact, want) <= 1e-5
    assert maxdiff(spec.call_merged(m, ad, ids).logits, want) <= 1e-5
    # state_dict targets need the orientation said explicitly; wrong orientation is refused
    with pytest.raises(ValueError, match="shape"):
        LoRA.build(dict(m.state_dict()), targets=["c_attn"], rank=2, alpha=1).merged(
            {"transformer.h.0.attn.c_attn.weight": torch.zeros(48, 16)}, ad)


def test_dropout_applies_to_branch_input_only():
    lin = nn.Linear(6, 5)
    spec, ad = lora.init(lin_holder := nn.Sequential(lin), targets="0", rank=2, alpha=2, dropout=0.5)
    x = torch.randn(4, 6)
    lin_holder.train()
    # B = 0: dropout on the branch cannot show, even in training
    assert torch.equal(spec.call(lin_holder, ad, x), lin(x))
    ad = tree.map(lambda t: torch.randn(t.shape), ad)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    y1 = spec.wrap(lambda p, x: lin_holder(x), train=True, generator=g1)(lin_holder, ad, x)
    y2 = spec.wrap(lambda p, x: lin_holder(x), train=True, generator=g2)(lin_holder, ad, x)
    assert torch.equal(y1, y2)  # the generator makes it reproducible
    # reconstruct: y = xWᵀ + b + s·(drop(x)Aᵀ)Bᵀ with the same mask
    keep = (torch.rand(x.shape, generator=torch.Generator().manual_seed(5)) >= 0.5).float() / 0.5
    A, B = ad["0"]["lora_A"], ad["0"]["lora_B"]
    want = lin(x) + spec.scale * ((x * keep) @ A.t()) @ B.t()
    assert maxdiff(y1, want) <= 1e-5
    lin_holder.eval()
    assert maxdiff(spec.call(lin_holder, ad, x), spec.call_merged(lin_holder, ad, x)) <= 1e-5


# ----------------------------------------------------------------------------- PEFT parity


def _peft_copy(m, spec, ad, **cfg):
    peft = pytest.importorskip("peft", reason="PEFT parity needs `pip install peft` (the peft extra)")
    pm = peft.get_peft_model(copy.deepcopy(m), peft.LoraConfig(
        r=spec.rank, lora_alpha=spec.alpha, target_modules=list(spec.names), fan_in_fan_out=True,
        use_rslora=spec.use_rslora, **cfg))
    flat = tree.flatten(ad)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.copy_(flat[n.replace("base_model.model.", "").replace(".default.weight", "")])
    return pm.eval()


@pytest.mark.parametrize("rslora", [False, True])
def test_peft_parity_logits_and_adapter_grads(rslora):
    pytest.importorskip("peft", reason="PEFT parity needs `pip install peft` (the peft extra)")
    m = gpt2()
    spec, ad = lora.init(m, targets=["c_attn", "mlp.c_proj", "mlp.c_fc"], rank=3, alpha=5, use_rslora=rslora, b_std=0.2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = _peft_copy(m, spec, ad)
    ids = torch.randint(0, 53, (2, 8), generator=torch.Generator().manual_seed(1))
    ref = pm(ids, labels=ids)
    ref.loss.backward()
    out = spec.call(m, ad, ids, labels=ids)
    assert maxdiff(out.logits, ref.logits) <= 1e-5
    g = tree.flatten(grad(lambda a: spec.call(m, a, ids, labels=ids).loss)(ad))
    for n, p in pm.named_parameters():
        if "lora_" in n:
            assert maxdiff(g[n.replace("base_model.model.", "").replace(".default.weight", "")], p.grad) <= 1e-5
    assert all(p.grad is None for n, p in m.named_parameters())  # the base got no gradient


def test_saved_files_load_in_peft_and_back(tmp_path):
    peft = pytest.importorskip("peft", reason="PEFT file parity needs `pip install peft` (the peft extra)")
    m = gpt2()
    spec, ad = lora.init(m, targets=["c_attn", "mlp.c_proj"], rank=2, alpha=7, b_std=0.3)
    ids = torch.randint(0, 53, (2, 7))
    ours = spec.call(m, ad, ids).logits
    named = save_pretrained(spec, ad, tmp_path / "named", base_model=m, base_model_name_or_path="tiny-gpt2")
    config = json.loads((tmp_path / "named" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 2 and config["lora_alpha"] == 7
    assert config["fan_in_fan_out"] is True and config["base_model_name_or_path"] == "tiny-gpt2"
    assert config["target_modules"] == list(spec.names) and not os.path.exists(os.path.join(named, "README.md"))
    d = save_pretrained(spec, ad, tmp_path / "ad", base_model=m)  # no name: PEFT would try to fetch it
    from safetensors.torch import load_file

    sd = load_file(tmp_path / "ad" / "adapter_model.safetensors")
    key = "base_model.model.transformer.h.0.attn.c_attn.lora_A.weight"
    assert torch.equal(sd[key], ad["transformer"]["h"]["0"]["attn"]["c_attn"]["lora_A"])  # raw, never pre-scaled
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.PeftModel.from_pretrained(copy.deepcopy(m), d).eval()
    assert maxdiff(pm(ids).logits, ours) <= 1e-5
    spec2, ad2 = load_pretrained(d, base_model=m)
    assert spec2 == spec and maxdiff(ad2, ad) == 0.0
    # and files PEFT writes load here
    pm.save_pretrained(tmp_path / "theirs")
    spec3, ad3 = load_pretrained(tmp_path / "theirs", base_model=m)
    assert maxdiff(spec3.call(m, ad3, ids).logits, ours) <= 1e-5


@pytest.mark.parametrize("variant", ["gpt2", "llama"])
def test_aam_model_files_load_in_peft_on_exported_model(tmp_path, variant):
    peft = pytest.importorskip("peft", reason="PEFT file parity needs `pip install peft` (the peft extra)")
    from aam_func.interop import hf

    cfg = tiny(**(LLAMA if variant == "llama" else {}))
    model = af.Transformer(cfg)
    params = model.init(seed=2)
    spec, ad = lora.init(params, targets=["*.attn.qkv", "*.attn.out", "*.mlp.*"], rank=2, alpha=4, b_std=0.3)
    ids = torch.randint(0, cfg.vocab_size, (2, 6))
    ours = spec.apply(model.apply, params, ad, ids)["logits"]
    save_pretrained(spec, ad, tmp_path / "ad", base_model=model)
    hf_model = hf.to_transformers(cfg, params).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.PeftModel.from_pretrained(hf_model, tmp_path / "ad").eval()
    assert maxdiff(pm(ids).logits, ours) <= 1e-5
    spec2, ad2 = load_pretrained(tmp_path / "ad", base_model=model)
    assert spec2 == spec and maxdiff(ad2, ad) == 0.0


def test_loading_refuses_files_of_another_model(tmp_path):
    pytest.importorskip("transformers")
    m = gpt2()
    spec, ad = lora.init(m, targets=["c_attn"], rank=2, alpha=4)
    save_pretrained(spec, ad, tmp_path / "ad", base_model=m)
    with pytest.raises(AdapterFileError, match=r"adapter is 16 -> 48, the model's layer is 24 -> 72"):
        load_pretrained(tmp_path / "ad", base_model=gpt2(n_embd=24))
    # full module paths: adapters on a subset of a deeper model's layers are legitimate ...
    assert load_pretrained(tmp_path / "ad", base_model=gpt2(n_layer=3))[0] == spec
    # ... but PEFT-style short target_modules that select layers the file lacks are not
    conf_path = tmp_path / "ad" / "adapter_config.json"
    conf = json.loads(conf_path.read_text())
    conf_path.write_text(json.dumps(conf | {"target_modules": ["c_attn"]}))
    with pytest.raises(AdapterFileError, match="target_modules selects transformer.h.2.attn.c_attn"):
        load_pretrained(tmp_path / "ad", base_model=gpt2(n_layer=3))
    with pytest.raises(AdapterFileError, match="not an nn.Linear/Conv1D"):
        load_pretrained(tmp_path / "ad", base_model=nn.Sequential(nn.Linear(16, 48)))
    with pytest.raises(AdapterFileError, match="do not match this aam_func model"):
        load_pretrained(tmp_path / "ad", base_model=af.Transformer(tiny(n_layers=1)))
    # a broken or foreign directory
    (tmp_path / "bad").mkdir()
    with pytest.raises(AdapterFileError, match="missing"):
        load_pretrained(tmp_path / "bad")
    conf_path.write_text(json.dumps(conf | {"peft_type": "PREFIX_TUNING"}))
    with pytest.raises(AdapterFileError, match="peft_type"):
        load_pretrained(tmp_path / "ad")


def test_save_refuses_adapters_that_peft_cannot_hold(tmp_path):
    model = af.Transformer(tiny())
    params = model.init(seed=0)
    spec, ad = lora.init(params, targets="embed", rank=2, alpha=2)
    with pytest.raises(AdapterFileError, match="linear layers only"):
        save_pretrained(spec, ad, tmp_path / "x", base_model=model)
    with pytest.raises(TypeError, match="base_model"):
        save_pretrained(spec, ad, tmp_path / "x", base_model="gpt2")


# ----------------------------------------------------------------------------- training


def test_adapter_only_training_and_optimizer_state_size():
    from aam_func.train import make_lm_loss, make_train_step

    cfg = tiny()
    model = af.Transformer(cfg)
    params = model.init(seed=0)
    spec, ad, wrap = lora.from_cli_args(params, rank=4, alpha=8, targets="*.attn.qkv,*.mlp.fc", seed=0)
    assert spec.names == ("blocks.0.attn.qkv", "blocks.0.mlp.fc", "blocks.1.attn.qkv", "blocks.1.mlp.fc")
    step = make_train_step(wrap(make_lm_loss(model)), optim.adamw(1e-2))
    state = step.init(ad)
    moments = {k: v for k, v in tree.flatten(state).items() if v.is_floating_point()}
    assert sum(v.numel() for v in moments.values()) == 2 * tree.count(ad)
    assert all(".lora_" in k for k in moments)
    ids = torch.randint(0, cfg.vocab_size, (4, 12), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids}
    frozen = tree.map(torch.clone, params)
    losses = []
    for _ in range(8):
        ad, state, metrics = step(ad, state, batch)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < losses[0]
    assert maxdiff(params, frozen) == 0.0
    assert tree.names(ad) == tree.names(spec.shapes())


def test_per_sample_adapter_grads():
    cfg = tiny()
    model = af.Transformer(cfg)
    params = model.init(seed=0)
    spec, ad = lora.init(params, targets=["*.attn.qkv"], rank=2, alpha=4, b_std=0.1)
    ids = torch.randint(0, cfg.vocab_size, (4, 8), generator=torch.Generator().manual_seed(3))

    def loss(a, x):
        return spec.apply(model.apply, params, a, x[None], labels=x[None])["loss"]

    per = vmap(grad(loss), in_dims=(None, 0))(ad, ids)
    assert tree.names(per) == tree.names(ad)
    for i in range(ids.shape[0]):
        one = grad(loss)(ad, ids[i])
        assert maxdiff(tree.map(lambda t: t[i], per), one) <= 1e-5
    from aam_func import per_sample

    lib = per_sample.grads(lambda a, b: loss(a, b["input_ids"][0]), ad, {"input_ids": ids})
    assert maxdiff(lib, per) <= 1e-5
    # the two intercepts nest: ghost clipping sees the LoRA branch's F.linear(h, A), F.linear(·, B)
    ghost = per_sample.ghost.discover(lambda a, b: loss(a, b["input_ids"][0]), ad, {"input_ids": ids})
    assert ghost.ghost == set(tree.flatten(ad))
    norms = per_sample.norms(lambda a, b: loss(a, b["input_ids"][0]), ad, {"input_ids": ids}, chunk_size=3)
    torch.testing.assert_close(norms, per_sample.global_norms(per), rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------- init and bad input


def test_init_distributions_and_determinism():
    params = {"l": {"weight": torch.zeros(300, 200)}}
    spec, ad = lora.init(params, targets="l", rank=8, alpha=8, seed=4)
    A, B = ad["l"]["lora_A"], ad["l"]["lora_B"]
    assert A.shape == (8, 200) and B.shape == (300, 8) and not B.any()
    assert A.abs().max() <= 1 / math.sqrt(200) and A.abs().max() > 0.9 / math.sqrt(200)  # U(±1/√in)
    assert maxdiff(lora.init(params, targets="l", rank=8, alpha=8, seed=4)[1], ad) == 0.0
    _, ad_g = lora.init(params, targets="l", rank=8, alpha=8, init="gaussian", seed=4)
    assert abs(ad_g["l"]["lora_A"].std().item() - 1 / 8) < 0.01


def test_bad_input():
    params = af.Transformer(tiny()).init(seed=0)
    with pytest.raises(ValueError, match=r"match no weight.*available: .*blocks\.0\.attn\.qkv"):
        lora.init(params, targets=["*.nope"], rank=2, alpha=1)
    with pytest.raises(ValueError, match=r"\['\*\.nope'\] match no weight"):
        lora.init(params, targets=["*.attn.qkv", "*.nope"], rank=2, alpha=1)
    with pytest.raises(ValueError, match="match no weight"):
        lora.init(params, targets=lambda name: False, rank=2, alpha=1)
    for rank in (0, -1, 17):
        with pytest.raises(ValueError, match="rank"):
            lora.init(params, targets="*.attn.qkv", rank=rank, alpha=1)
    with pytest.raises(ValueError, match="dropout"):
        lora.init(params, targets="*.attn.qkv", rank=2, alpha=1, dropout=1.0)
    with pytest.raises(ValueError, match="init"):
        lora.init(params, targets="*.attn.qkv", rank=2, alpha=1, init="orthogonal")
    with pytest.raises(TypeError, match="Params or a torch.nn.Module"):
        lora.init([1, 2], targets="x", rank=1, alpha=1)
    spec, ad = lora.init(params, targets="*.attn.qkv", rank=2, alpha=1)
    with pytest.raises(ValueError, match="missing: blocks.1.attn.qkv.lora_A"):
        spec.merged(params, {"blocks": {"0": ad["blocks"]["0"]}})
    bad = tree.map(lambda t: t[:1], ad)
    with pytest.raises(ValueError, match="mis-shaped"):
        spec.merged(params, bad)
    other = af.Transformer(tiny(d_model=24, n_heads=2)).init(seed=0)
    with pytest.raises(ValueError, match="do not fit the LoRA targets"):
        spec.merged(other, ad)
    with pytest.raises(ValueError, match="mode"):
        spec.loss(lambda p, b: 0, params, mode="fused")
    w = torch.randn(4, 4)
    tied = {"a": {"weight": w}, "b": {"weight": w}}
    tspec, tad = lora.init(tied, targets=["a", "b"], rank=1, alpha=1)
    with pytest.raises(ValueError, match="'a' and 'b' are the same tensor object"):
        tspec.apply(lambda p, x: x, tied, tad, torch.zeros(1))
    dspec, _ = lora.init(params, targets="*.attn.qkv", rank=2, alpha=1, dropout=0.1)
    with pytest.raises(ValueError, match="factored"):
        dspec.loss(lambda p, b: 0, params, mode="merged")


@pytest.mark.parametrize("first", ["aam_func.interop.peft", "aam_func.peft"])
def test_peft_and_interop_peft_import_in_either_order(first):
    """interop.peft builds on peft.lora while peft re-exports interop.peft's file functions: no
    import cycle, whichever is loaded first. aam_func/__init__ (which loads peft first) is bypassed
    with a bare package so the order under test is the real one."""
    import subprocess
    import sys

    second = "aam_func.peft" if first == "aam_func.interop.peft" else "aam_func.interop.peft"
    code = (
        "import importlib, os, sys, types\n"
        "pkg = types.ModuleType('aam_func'); pkg.__path__ = [os.path.join(sys.argv[1], 'aam_func')]\n"
        "sys.modules['aam_func'] = pkg\n"
        f"importlib.import_module({first!r}); importlib.import_module({second!r})\n"
        "from aam_func.peft import save_pretrained, load_pretrained, AdapterFileError\n"
        "from aam_func.interop import peft as owner\n"
        "assert save_pretrained is owner.save_pretrained and AdapterFileError is owner.AdapterFileError\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(af.__file__)))
    proc = subprocess.run([sys.executable, "-c", code, root], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_peft_lazy_reexport_unknown_name():
    import aam_func.peft as peft_pkg

    with pytest.raises(AttributeError, match="no_such_name"):
        peft_pkg.no_such_name
    assert "save_pretrained" in dir(peft_pkg)


def test_from_cli_args_rejects_non_int_rank_and_non_number_alpha():
    """rank=2.7 used to become 2 and rank=True 1 (int()); alpha=True 1.0 (float())."""
    params = af.Transformer(tiny()).init(seed=0)
    for bad in (2.7, True, "4"):
        with pytest.raises(TypeError, match=r"rank must be an int >= 1, got"):
            lora.from_cli_args(params, rank=bad)
    with pytest.raises(ValueError, match=r"rank must be an int >= 1, got 0"):
        lora.from_cli_args(params, rank=0)
    with pytest.raises(TypeError, match=r"alpha must be a finite number, got True"):
        lora.from_cli_args(params, rank=4, alpha=True)
    spec, _, _ = lora.from_cli_args(params, rank=4)
    assert spec.rank == 4 and spec.alpha == 8.0
