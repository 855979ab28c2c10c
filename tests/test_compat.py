"""aam_func.compat: the guide's classes are thin binds of the functional core.

Each class is checked against the functional spec it wraps (same names, same values, same
outputs), the pipeline and torch.optim against the functional training loop, and every error
path the guide's users will meet.
"""

import importlib.util
import json
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import aam_func as af
from aam_func import compat, optim, tree
from aam_func.compat import (
    AdvancedLossFunctions,
    AdvancedMultiHeadAttention,
    AdvancedOptimizers,
    AdvancedPositionalEncoding,
    AdvancedTokenizer,
    AdvancedTrainingPipeline,
    AdvancedTransformerModel,
    LoRALayer,
    LoRALinear,
    ModelConfig,
    P_TuningLayer,
    TokenizerError,
)
from aam_func.layers import SelfAttention, sinusoidal_table
from aam_func.peft import ptuning
from aam_func.train import dropout_generator, make_lm_loss, make_train_step

TINY = dict(vocab_size=61, d_model=32, n_layers=2, n_heads=4, d_ff=64, max_seq_len=24)


def tiny(**kw):
    return ModelConfig(**{**TINY, **kw})


def ids(shape, high=61, seed=0):
    return torch.randint(0, high, shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    from aam_func.data import default_corpus

    d = tmp_path_factory.mktemp("tok")
    AdvancedTokenizer.train(default_corpus()[:20], vocab_size=300, save_dir=str(d))
    return str(d)


# ----------------------------------------------------------------------------- the model


def test_model_is_the_bound_spec():
    cfg = tiny(dropout=0.0)
    model = AdvancedTransformerModel(cfg, seed=5)
    spec, ref = af.Transformer(cfg), af.Transformer(cfg).init(seed=5)
    flat = tree.flatten(ref)
    assert [n for n, _ in model.named_parameters()] == list(flat)
    assert all(torch.equal(p, flat[n]) for n, p in model.named_parameters())
    x = ids((2, 7))
    out = model(x, labels=x)
    want = spec.apply(ref, x, labels=x)
    assert torch.equal(out["logits"], want["logits"]) and torch.equal(out["loss"], want["loss"])
    assert model(x)["loss"] is None
    # functional_call swaps tensors by the same names
    doubled = {n: 2 * t for n, t in flat.items()}
    fc = torch.func.functional_call(model, doubled, (x,))
    assert torch.equal(fc["logits"], spec.apply(tree.unflatten(doubled), x)["logits"])


def test_dropout_follows_train_and_eval_modes():
    model = AdvancedTransformerModel(tiny(dropout=0.3), seed=0)
    x = ids((2, 6))
    model.eval()
    assert torch.equal(model(x)["logits"], model(x)["logits"])
    model.train()
    torch.manual_seed(0)
    a = model(x)["logits"]
    assert not torch.equal(a, model(x)["logits"])


def test_seed_none_follows_torch_manual_seed():
    torch.manual_seed(11)
    a = AdvancedTransformerModel(tiny())
    torch.manual_seed(11)
    b = AdvancedTransformerModel(tiny())
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_typed_views_let_init_code_find_layers():
    model = AdvancedTransformerModel(tiny(), seed=0)
    kinds = {type(m).__mro__[1] for m in model.modules()}
    assert {nn.Linear, nn.Embedding, nn.LayerNorm} <= kinds
    before = model.get_parameter("blocks.0.attn.qkv.weight").clone()

    def init_weights(m):
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            nn.init.constant_(m.bias, 0.5)

    model.apply(init_weights)
    w = model.get_parameter("blocks.0.attn.qkv.weight")
    assert not torch.equal(w, before)
    assert bool((model.get_parameter("blocks.1.mlp.fc.bias") == 0.5).all())
    # the forward reads the re-initialised tensors
    x = ids((1, 5))
    model.eval()
    assert torch.equal(model(x)["logits"], af.Transformer(model.config).apply(model.params(), x)["logits"])


def test_rmsnorm_config_gets_rmsnorm_views():
    model = AdvancedTransformerModel(tiny(norm="rmsnorm", bias=False), seed=0)
    assert any(isinstance(m, nn.RMSNorm) for m in model.modules())
    assert not any(isinstance(m, nn.LayerNorm) for m in model.modules())


def test_embedding_and_forward_with_embeddings_equal_forward():
    model = AdvancedTransformerModel(tiny(dropout=0.0), seed=1)
    x = ids((2, 6))
    emb = model.embedding(x)
    assert emb.shape == (2, 6, 32)
    a = model(x, labels=x)
    b = model.forward_with_embeddings(emb, None, x)
    assert torch.allclose(a["logits"], b["logits"]) and torch.allclose(a["loss"], b["loss"])


def test_forward_with_embeddings_extends_mask_and_labels_over_prompts():
    cfg = tiny(dropout=0.0)
    model = AdvancedTransformerModel(cfg, seed=1)
    pt = P_TuningLayer(cfg.d_model, prompt_length=3, dropout=0.0, seed=2)
    x = ids((2, 5))
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]], dtype=torch.float32)
    out = model.forward_with_embeddings(pt(model.embedding(x)), mask, x)
    batch = ptuning.apply(pt.params(), model.embedding(x), mask, x)
    want = af.Transformer(cfg).apply(model.params(), **batch)
    assert out["logits"].shape == (2, 8, cfg.vocab_size)
    assert torch.allclose(out["loss"], want["loss"]) and torch.allclose(out["logits"], want["logits"])
    with pytest.raises(ValueError, match="attention_mask must be"):
        model.forward_with_embeddings(torch.zeros(2, 4, cfg.d_model), torch.ones(2, 6))


def test_gradient_checkpointing_same_grads_and_rng():
    cfg = tiny(dropout=0.2)
    a = AdvancedTransformerModel(cfg, seed=3)
    b = AdvancedTransformerModel(cfg, seed=3)
    b.gradient_checkpointing_enable()
    assert b.is_gradient_checkpointing and b.config.gradient_checkpointing and not a.is_gradient_checkpointing
    x = ids((2, 8))
    for m in (a, b):
        torch.manual_seed(42)
        m(x, labels=x)["loss"].backward()
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-6), n
    # under torch.func.grad as well (the pipeline's path)
    loss = lambda m: (lambda p: m.spec.apply(p, x, labels=x)["loss"])  # noqa: E731
    ga = torch.func.grad(loss(a))(a.params())
    gb = torch.func.grad(loss(b))(b.params())
    assert all(torch.allclose(ga_, gb_, atol=1e-6) for ga_, gb_ in zip(tree.leaves(ga), tree.leaves(gb)))
    # a config asking for it gets it from the start; disable undoes it
    c = AdvancedTransformerModel(tiny(gradient_checkpointing=True), seed=0)
    assert c.is_gradient_checkpointing
    c.gradient_checkpointing_disable()
    assert not c.is_gradient_checkpointing and not c.config.gradient_checkpointing


def test_jit_script_says_use_torch_compile():
    model = AdvancedTransformerModel(tiny(), seed=0)
    with pytest.raises(TypeError, match=r"torch\.compile"), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch 2.13 deprecates torch.jit.script
        torch.jit.script(model)
    compiled = torch.compile(model.eval(), backend="eager")
    x = ids((1, 4))
    assert torch.allclose(compiled(x)["logits"], model(x)["logits"])


def test_model_rejects_non_config():
    with pytest.raises(TypeError, match="ModelConfig"):
        AdvancedTransformerModel({"vocab_size": 10})


# ----------------------------------------------------------------------------- pipeline


def _functional_loop(cfg, seed, n_steps, batches, total, pipeline_seed):
    """What a hand-written functional loop does (the CLI's recipe with the guide's schedule)."""
    spec = af.Transformer(cfg)
    params = spec.init(seed=seed)
    opt = optim.adamw_warmup_cosine(params, learning_rate=cfg.learning_rate, total_steps=total,
                                    warmup_steps=cfg.warmup_steps, weight_decay=cfg.weight_decay,
                                    max_grad_norm=cfg.max_grad_norm)
    step = make_train_step(make_lm_loss(spec), opt)
    state = step.init(params)
    for i, b in enumerate(batches[:n_steps]):
        gen = dropout_generator(pipeline_seed, i, "cpu")
        params, state, _ = step(params, state, b, gen)
    return params


def test_pipeline_ends_with_the_functional_core_params():
    cfg = tiny(dropout=0.1, warmup_steps=1, learning_rate=3e-3)
    model = AdvancedTransformerModel(cfg, seed=4)
    pipe = AdvancedTrainingPipeline(model, cfg, num_training_steps=5, seed=9)
    batches = [{"input_ids": ids((2, 8), seed=i), "attention_mask": torch.ones(2, 8),
                "labels": ids((2, 8), seed=100 + i)} for i in range(3)]
    metrics = [pipe.train_step(b) for b in batches]
    assert set(metrics[0]) >= {"loss", "learning_rate", "grad_norm", "tokens"}
    assert metrics[0]["learning_rate"] == 0.0 and metrics[1]["learning_rate"] == pytest.approx(3e-3)
    assert metrics[0]["tokens"] == 16
    want = tree.flatten(_functional_loop(cfg, 4, 3, batches, 5, 9))
    for n, p in model.named_parameters():
        assert torch.equal(p, want[n]), n
    ev = pipe.evaluate_step(batches[0])
    assert set(ev) >= {"loss", "perplexity"} and ev["perplexity"] == pytest.approx(math.exp(ev["loss"]), rel=1e-5)


def test_pipeline_sees_changes_made_to_the_module():
    model = AdvancedTransformerModel(tiny(dropout=0.0, warmup_steps=2), seed=0)
    pipe = AdvancedTrainingPipeline(model, num_training_steps=10)
    b = {"input_ids": ids((2, 6))}
    before = pipe.evaluate_step(b)["loss"]
    with torch.no_grad():
        model.get_parameter("ln_f.weight").mul_(3.0)
    assert pipe.evaluate_step(b)["loss"] != before


def test_pipeline_mixed_precision_bf16_keeps_fp32_params():
    cfg = tiny(mixed_precision=True, dropout=0.0, warmup_steps=0)
    model = AdvancedTransformerModel(cfg, seed=0)
    pipe = AdvancedTrainingPipeline(model, cfg, num_training_steps=4)
    assert pipe.precision == "bf16"
    b = {"input_ids": ids((2, 8))}
    before = model.get_parameter("blocks.0.mlp.fc.weight").clone()
    m = pipe.train_step(b)
    assert math.isfinite(m["loss"])
    w = model.get_parameter("blocks.0.mlp.fc.weight")
    assert w.dtype == torch.float32 and not torch.equal(w, before)


def test_pipeline_errors(tok_dir):
    tok = AdvancedTokenizer(tok_dir, max_length=16)
    small = tiny()  # 61 < len(tok)
    with pytest.warns(UserWarning, match=r"has 300 tokens.*vocab_size is 61.*ModelConfig\(vocab_size=len\(tokenizer\)\)"):
        pipe = AdvancedTrainingPipeline(AdvancedTransformerModel(small, seed=0), small, tok)
    pipe.train_step({"input_ids": torch.full((1, 4), 60)})  # ids the model embeds are fine
    big_ids = {"input_ids": torch.full((1, 4), 200)}
    with pytest.raises(ValueError, match=r"vocab_size=61.*has 300 tokens.*len\(tokenizer\)"):
        pipe.train_step(big_ids)
    with pytest.raises(ValueError, match=r"vocab_size=61.*300 tokens"):
        pipe.generate_text("def f(x): return x", max_length=20)
    with pytest.raises(TypeError, match="AdvancedTransformerModel"):
        AdvancedTrainingPipeline(nn.Linear(2, 2), small)
    with pytest.raises(KeyError, match="input_ids"):
        pipe.train_step({"labels": torch.zeros(1, 2, dtype=torch.long)})
    no_tok = AdvancedTrainingPipeline(AdvancedTransformerModel(small, seed=0), small)
    with pytest.raises(ValueError, match="needs a tokenizer"):
        no_tok.generate_text("x")


def test_generate_text(tok_dir):
    tok = AdvancedTokenizer(tok_dir, max_length=16)
    cfg = tiny(vocab_size=len(tok), max_seq_len=32)
    pipe = AdvancedTrainingPipeline(AdvancedTransformerModel(cfg, seed=0), cfg, tok)
    prompt = "The value of"
    n_prompt = tok.tokenize_text(prompt)["input_ids"].shape[1]
    a = pipe.generate_text(prompt, max_length=12, temperature=0.8, top_k=20, top_p=0.9, seed=1)
    b = pipe.generate_text(prompt, max_length=12, temperature=0.8, top_k=20, top_p=0.9, seed=1)
    assert isinstance(a, str) and a == b and a.startswith(prompt)
    with pytest.raises(ValueError, match="max_length"):
        pipe.generate_text(prompt, max_length=n_prompt)


# ----------------------------------------------------------------------------- optimizers


def test_create_optimizer_groups_follow_decay_mask():
    cfg = tiny(weight_decay=0.05, learning_rate=2e-3)
    model = AdvancedTransformerModel(cfg, seed=0)
    opt = AdvancedOptimizers.create_optimizer(model, cfg)
    assert isinstance(opt, torch.optim.AdamW)
    by_id = {id(p): n for n, p in model.named_parameters()}
    decay = {by_id[id(p)] for p in opt.param_groups[0]["params"]}
    no_decay = {by_id[id(p)] for p in opt.param_groups[1]["params"]}
    assert opt.param_groups[0]["weight_decay"] == 0.05 and opt.param_groups[1]["weight_decay"] == 0.0
    assert opt.param_groups[0]["lr"] == 2e-3
    assert "embed.weight" in decay and "blocks.0.attn.qkv.weight" in decay
    assert "blocks.0.attn.qkv.bias" in no_decay and "blocks.0.ln1.weight" in no_decay and "ln_f.bias" in no_decay
    assert decay | no_decay == set(by_id.values()) and not decay & no_decay
    model.get_parameter("embed.weight").requires_grad_(False)
    opt2 = AdvancedOptimizers.create_optimizer(model, cfg)
    assert sum(len(g["params"]) for g in opt2.param_groups) == len(by_id) - 1
    frozen = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        AdvancedOptimizers.create_optimizer(frozen, cfg)


def test_create_scheduler_is_warmup_cosine():
    cfg = tiny(learning_rate=1e-3, warmup_steps=3)
    model = AdvancedTransformerModel(cfg, seed=0)
    opt = AdvancedOptimizers.create_optimizer(model, cfg)
    sched = AdvancedOptimizers.create_scheduler(opt, cfg, num_training_steps=10)
    want = optim.warmup_cosine(1e-3, 3, 10)
    for t in range(12):
        assert opt.param_groups[0]["lr"] == pytest.approx(want(t), rel=1e-12, abs=1e-18), t
        opt.step()
        sched.step()
    with pytest.raises(ValueError, match="total_steps"):
        AdvancedOptimizers.create_scheduler(opt, cfg, num_training_steps=2)


def test_torch_optim_training_matches_functional_core():
    cfg = tiny(dropout=0.0, warmup_steps=2, learning_rate=5e-3, max_grad_norm=0.5)
    model = AdvancedTransformerModel(cfg, seed=6)
    opt = AdvancedOptimizers.create_optimizer(model, cfg)
    sched = AdvancedOptimizers.create_scheduler(opt, cfg, num_training_steps=6)
    batches = [{"input_ids": ids((2, 8), seed=i)} for i in range(4)]
    for b in batches:
        opt.zero_grad()
        model(b["input_ids"], labels=b["input_ids"])["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=cfg.max_grad_norm)
        opt.step()
        sched.step()
    spec = af.Transformer(cfg)
    params = spec.init(seed=6)
    step = make_train_step(make_lm_loss(spec), AdvancedOptimizers.functional(cfg, params, 6))
    state = step.init(params)
    for b in batches:
        params, state, _ = step(params, state, b)
    flat = tree.flatten(params)
    for n, p in model.named_parameters():
        assert torch.allclose(p, flat[n], atol=2e-6, rtol=1e-5), n


# ----------------------------------------------------------------------------- positions


def test_positional_sinusoidal_fixed_and_learnable_start_equal():
    x = torch.randn(2, 9, 16)
    fixed = AdvancedPositionalEncoding(16, max_len=20, dropout=0.0, encoding_type="sinusoidal", use_learnable=False)
    learn = AdvancedPositionalEncoding(16, max_len=20, dropout=0.0, encoding_type="sinusoidal", use_learnable=True)
    assert list(dict(fixed.named_parameters())) == [] and list(dict(learn.named_parameters())) == ["weight"]
    want = x + sinusoidal_table(torch.arange(9), 16)
    assert torch.allclose(fixed(x), want) and torch.allclose(learn(x), want)
    learn(x).sum().backward()
    assert learn.weight.grad is not None and bool((learn.weight.grad[9:] == 0).all())
    # (seq, d) is the batch-of-one case
    assert torch.allclose(fixed(x[0]), want[0])


def test_positional_learnable_and_rope():
    x = torch.randn(3, 7, 8)
    pe = AdvancedPositionalEncoding(8, max_len=10, dropout=0.0, encoding_type="learnable", use_learnable=True, seed=0)
    assert pe.weight.shape == (10, 8) and torch.allclose(pe(x), x + pe.weight[:7])
    rope = AdvancedPositionalEncoding(8, max_len=10, dropout=0.0, encoding_type="rope", use_learnable=True)
    y = rope(x)
    assert y.shape == x.shape and list(rope.parameters()) == []
    assert torch.allclose(y, af.ops.rope.rope(x[:, None], torch.arange(7))[:, 0])
    assert torch.allclose(y[:, 0], x[:, 0])  # position 0 is not rotated
    assert torch.allclose(y.norm(dim=-1), x.norm(dim=-1), atol=1e-5)  # a rotation


def test_positional_dropout_and_errors():
    pe = AdvancedPositionalEncoding(8, max_len=4, dropout=0.5)
    x = torch.ones(2, 4, 8)
    pe.train()
    assert bool((pe(x) == 0).any())
    pe.eval()
    assert not bool((pe(x) == 0).any())
    with pytest.raises(ValueError, match="5 positions but max_len is 4"):
        pe(torch.ones(1, 5, 8))
    with pytest.raises(ValueError, match="d_model=8"):
        pe(torch.ones(1, 4, 6))
    with pytest.raises(ValueError, match="encoding_type"):
        AdvancedPositionalEncoding(8, encoding_type="alibi")
    with pytest.raises(ValueError, match="use_learnable=False"):
        AdvancedPositionalEncoding(8, encoding_type="learnable", use_learnable=False)
    with pytest.raises(ValueError, match="even d_model"):
        AdvancedPositionalEncoding(7, encoding_type="rope")


# ----------------------------------------------------------------------------- attention


@pytest.mark.parametrize("kind", ["standard", "relative", "local", "sparse"])
def test_attention_is_self_attention_and_encoder_style(kind):
    attn = AdvancedMultiHeadAttention(16, 2, dropout=0.0, attention_type=kind, max_relative_position=4, seed=0).eval()
    x = torch.randn(2, 6, 16)
    y = attn(x)
    spec = SelfAttention(16, 2, causal=False, attention_type=kind, max_relative_position=4, weight_init="xavier_uniform")
    assert torch.allclose(y, spec.apply(attn.params(), x, positions=torch.arange(6)), atol=1e-6)
    x2 = x.clone()
    x2[:, 1] += 1.0  # non-causal: a later token changes an earlier output
    assert not torch.allclose(attn(x2)[:, 0], y[:, 0])
    assert bool((attn.get_parameter("qkv.bias") == 0).all())  # xavier init, zero bias


def test_attention_causal_flash_mask_and_errors():
    x = torch.randn(2, 6, 16)
    causal = AdvancedMultiHeadAttention(16, 4, dropout=0.0, causal=True, seed=0).eval()
    x2 = x.clone()
    x2[:, 3:] += 1.0
    assert torch.allclose(causal(x2)[:, :3], causal(x)[:, :3], atol=1e-6)
    flash = AdvancedMultiHeadAttention(16, 4, dropout=0.0, use_flash_attention=True, seed=0).eval()
    std = AdvancedMultiHeadAttention(16, 4, dropout=0.0, seed=0).eval()
    assert flash.spec.backend == "blockwise" and torch.allclose(flash(x), std(x), atol=1e-5)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1.0] * 6])
    y = std(x, attention_mask=mask)
    x3 = x.clone()
    x3[0, 4:] = 5.0  # padded keys do not matter
    assert torch.allclose(std(x3, attention_mask=mask)[0, :4], y[0, :4], atol=1e-6)
    with pytest.raises(ValueError, match="only 0 and 1"):
        std(x, attention_mask=mask * 0.5)
    with pytest.raises(ValueError, match=r"\(batch, seq, d_model\)"):
        std(torch.randn(6, 16))
    with pytest.raises(ValueError, match="choose one"):
        AdvancedMultiHeadAttention(16, 4, use_flash_attention=True, use_xformers=True)


@pytest.mark.skipif(importlib.util.find_spec("xformers") is not None, reason="xformers is installed")
def test_xformers_absent_is_a_clear_import_error():
    with pytest.raises(ImportError, match=r"xformers.*pip install xformers.*use_flash_attention=True"):
        AdvancedMultiHeadAttention(16, 4, use_xformers=True)


# ----------------------------------------------------------------------------- LoRA


def test_lora_layer_is_the_low_rank_branch():
    layer = LoRALayer(12, 10, rank=3, alpha=6.0, dropout=0.0, seed=0)
    x = torch.randn(4, 12)
    assert torch.equal(layer(x), torch.zeros(4, 10))  # B starts at 0
    assert [n for n, _ in layer.named_parameters()] == ["lora_A", "lora_B"]
    with torch.no_grad():
        layer.lora_B.normal_()
    want = 2.0 * (x @ layer.lora_A.T) @ layer.lora_B.T
    assert layer.scaling == 2.0 and torch.allclose(layer(x), want, atol=1e-5)
    layer(x).sum().backward()
    assert layer.lora_A.grad.abs().sum() > 0 and layer.lora_B.grad.abs().sum() > 0
    drop = LoRALayer(12, 10, rank=3, alpha=6.0, dropout=0.5, seed=0)
    with torch.no_grad():
        drop.lora_B.fill_(1.0)
    drop.eval()
    a = drop(x)
    drop.train()
    assert not torch.allclose(drop(x), a)


def test_lora_linear_wraps_linear_and_conv1d():
    from transformers.pytorch_utils import Conv1D

    base = nn.Linear(8, 6)
    ll = LoRALinear(base, rank=2, alpha=4.0, seed=0)
    x = torch.randn(3, 8)
    assert torch.equal(ll(x), base(x))
    with torch.no_grad():
        ll.lora_B.normal_()
    assert torch.allclose(ll(x), base(x) + 2.0 * (x @ ll.lora_A.T) @ ll.lora_B.T, atol=1e-5)
    assert ll.weight is base.weight and ll.in_features == 8 and ll.out_features == 6
    conv = Conv1D(6, 8)  # nf=6 outputs, nx=8 inputs, weight (8, 6)
    lc = LoRALinear(conv, rank=2, alpha=2.0, seed=0)
    with torch.no_grad():
        lc.lora_B.normal_()
    assert torch.allclose(lc(x), conv(x) + (x @ lc.lora_A.T) @ lc.lora_B.T, atol=1e-5)
    with pytest.raises(TypeError, match="nn.Linear or a transformers Conv1D"):
        LoRALinear(nn.Conv2d(1, 1, 1))
    with pytest.raises(ValueError, match="rank"):
        LoRALinear(nn.Linear(4, 2), rank=3)
    view = AdvancedTransformerModel(tiny(), seed=0).get_submodule("blocks.0.mlp.fc")
    with pytest.raises(TypeError, match=r"peft\.lora"):
        LoRALinear(view)


def _tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=2, n_head=2)).eval()


def test_apply_lora_on_gpt2_conv1d():
    model = _tiny_gpt2()
    x = ids((2, 6), high=50)
    before = model(x).logits
    names = compat.apply_lora(model, ["*.mlp.*"], rank=2, alpha=4.0, seed=0)
    assert names == ["transformer.h.0.mlp.c_fc", "transformer.h.0.mlp.c_proj",
                     "transformer.h.1.mlp.c_fc", "transformer.h.1.mlp.c_proj"]
    assert all(isinstance(model.get_submodule(n), LoRALinear) for n in names)
    assert torch.allclose(model(x).logits, before, atol=1e-6)  # B = 0
    for n, p in model.named_parameters():
        p.requires_grad = "lora" in n
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) == 8 and all(n.endswith(("lora_A", "lora_B")) for n in trainable)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    frozen = model.get_parameter("transformer.h.0.mlp.c_fc.base_layer.weight").clone()
    model.train()
    model(x, labels=x).loss.backward()
    opt.step()
    model.eval()
    assert not torch.allclose(model(x).logits, before)
    assert torch.equal(model.get_parameter("transformer.h.0.mlp.c_fc.base_layer.weight"), frozen)
    with pytest.raises(ValueError, match="match no weight"):
        compat.apply_lora(_tiny_gpt2(), ["nothing_here"], rank=2)
    with pytest.raises(TypeError, match=r"peft\.lora"):
        compat.apply_lora(AdvancedTransformerModel(tiny(), seed=0), ["*.mlp.fc"], rank=2)


# ----------------------------------------------------------------------------- P-tuning


def test_p_tuning_layer_prepends_prompts():
    pt = P_TuningLayer(16, prompt_length=4, dropout=0.0, seed=0)
    x = torch.randn(3, 5, 16)
    y = pt(x)
    assert y.shape == (3, 9, 16) and torch.equal(y[:, 4:], x)
    assert torch.allclose(y, ptuning.apply(pt.params(), x)["inputs_embeds"])
    assert all(n.startswith(("embedding.", "mlp_head.")) for n, _ in pt.named_parameters())
    y.sum().backward()
    assert pt.get_parameter("embedding.weight").grad is not None
    assert [n for n, _ in P_TuningLayer(16, 4, encoder=None, seed=0).named_parameters()] == ["embedding.weight"]
    with pytest.raises(ValueError, match="d_model=16"):
        pt(torch.randn(1, 2, 8))


# ----------------------------------------------------------------------------- losses


def test_losses_are_the_core_functions():
    from aam_func import losses

    assert AdvancedLossFunctions.focal_loss is losses.focal_loss
    assert AdvancedLossFunctions.label_smoothing_loss is losses.label_smoothing_loss
    assert AdvancedLossFunctions.contrastive_loss is losses.contrastive_loss
    assert AdvancedLossFunctions.triplet_loss is losses.triplet_loss
    p, t = torch.randn(5, 3), torch.tensor([0, 1, 2, 1, 0])
    assert torch.allclose(AdvancedLossFunctions.focal_loss(p, t, alpha=1.0, gamma=0.0), F.cross_entropy(p, t))


# ----------------------------------------------------------------------------- tokenizer


def test_tokenizer_local_dir_and_methods(tok_dir):
    tok = AdvancedTokenizer(tok_dir, max_length=8, padding="max_length", truncation=True)
    assert len(tok) == 300
    one = tok.tokenize_text("print the value")
    assert one["input_ids"].shape == (1, 8) and one["attention_mask"].dtype == torch.long
    many = tok.tokenize_text(["a", "a much longer sentence than the other one, surely"])
    assert many["input_ids"].shape == (2, 8) and many["attention_mask"][0].sum() < 8
    assert torch.equal(tok.create_attention_mask(many["input_ids"]), many["attention_mask"])
    text = "return x"
    assert tok.decode_tokens(tok.tokenize_text(text, padding=False)["input_ids"]) == [text]


def test_tokenizer_gpt2_offline_error_says_what_to_do(tmp_path):
    with pytest.raises(TokenizerError) as e:
        AdvancedTokenizer("gpt2", max_length=16, cache_dir=str(tmp_path))
    msg = str(e.value)
    assert "'gpt2'" in msg and "not available offline" in msg
    assert "AdvancedTokenizer('/path/to/tokenizer_dir'" in msg and "AdvancedTokenizer.train(" in msg
    with pytest.raises(TokenizerError, match="does not exist"):
        AdvancedTokenizer(str(tmp_path / "missing" / "dir"))


def test_tokenizer_gpt2_from_a_cache(tmp_path, tok_dir):
    """The guide's name works when the Hugging Face cache has it (here a cache laid out by hand)."""
    repo = tmp_path / "models--gpt2"
    snap = repo / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    AdvancedTokenizer(tok_dir).save(str(snap))
    (snap / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    tok = AdvancedTokenizer("gpt2", max_length=16, cache_dir=str(tmp_path))
    assert len(tok) == 300 and tok.max_length == 16


def test_tokenizer_wraps_a_transformers_tokenizer(tok_dir):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(tok_dir)
    tok = AdvancedTokenizer(hf, max_length=4)
    assert tok.hf is hf and tok.tokenize_text("x y z w v u")["input_ids"].shape[1] == 4
