"""Pure train/eval steps: purity, learning, accumulation, precisions, metrics, bitwise resume."""

import math

import pytest
import torch

import aam_func as af
from aam_func import optim, tree
from aam_func.checkpoint import load_checkpoint, save_checkpoint
from aam_func.data import BlockLoader
from aam_func.train import evaluate, make_lm_loss, make_eval_step, make_train_step

CFG = af.ModelConfig(vocab_size=97, d_model=32, n_layers=2, n_heads=4, max_seq_len=16, dropout=0.0)


pytestmark = pytest.mark.usefixtures("one_thread")


def _batch(seed=0, rows=4, seq=16, vocab=97):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, vocab, (rows, seq), generator=g)
    return {"input_ids": x, "labels": x}


def _opt(params, steps=20, lr=3e-3):
    return optim.adamw_warmup_cosine(params, learning_rate=lr, total_steps=steps, warmup_steps=3, end_value=lr / 10,
                                     weight_decay=0.1, max_grad_norm=1.0)


def _clone(t):
    return tree.map(lambda x: x.clone(), t)


def _equal(a, b):
    fa, fb = tree.flatten(a), tree.flatten(b)
    return fa.keys() == fb.keys() and all(torch.equal(fa[k], fb[k]) for k in fa)


def test_step_is_pure_and_learns():
    model = af.Transformer(CFG)
    params = model.init(seed=0)
    step = make_train_step(make_lm_loss(model), _opt(params))
    state = step.init(params)
    batch = _batch()
    p0, s0, b0 = _clone(params), _clone(state), _clone(batch)
    new_p, new_s, m = step(params, state, batch)
    assert _equal(params, p0) and _equal(state, s0) and _equal(batch, b0)  # nothing written in place
    assert float(m["learning_rate"]) == 0.0 and _equal(new_p, params)  # warmup starts at lr 0
    losses = [float(m["loss"])]
    for _ in range(15):
        new_p, new_s, m = step(new_p, new_s, batch)
        losses.append(float(m["loss"]))
    assert not _equal(new_p, params)
    assert losses[-1] < losses[0] - 0.5
    assert set(m) == {"loss", "learning_rate", "grad_norm", "tokens", "skipped"}
    assert int(m["tokens"]) == batch["input_ids"].numel()


def test_metrics_match_direct_computation():
    model = af.Transformer(CFG)
    params = model.init(seed=1)
    opt = _opt(params, steps=10, lr=1e-2)
    step = make_train_step(make_lm_loss(model), opt)
    state = step.init(params)
    batch = _batch(1)
    loss, grads = model.apply(params, **batch)["loss"], torch.func.grad(lambda p: model.apply(p, **batch)["loss"])(params)
    _, state2, m = step(params, state, batch)
    assert float(m["loss"]) == pytest.approx(float(loss), rel=1e-6)
    assert float(m["grad_norm"]) == pytest.approx(float(optim.global_norm(grads)), rel=1e-5)
    schedule = optim.warmup_cosine(1e-2, 3, 10, end_value=1e-3)
    assert float(m["learning_rate"]) == pytest.approx(float(schedule(0)), abs=1e-12)
    _, _, m2 = step(params, state2, batch)
    assert float(m2["learning_rate"]) == pytest.approx(float(schedule(1)), rel=1e-6)
    # without inject_hyperparams or clipping: the given constant and a computed norm
    plain = make_train_step(make_lm_loss(model), optim.sgd(0.1), learning_rate=0.1)
    _, _, m3 = plain(params, plain.init(params), batch)
    assert float(m3["learning_rate"]) == pytest.approx(0.1)
    assert float(m3["grad_norm"]) == pytest.approx(float(optim.global_norm(grads)), rel=1e-5)


def test_accumulation_equals_the_full_batch():
    model = af.Transformer(CFG)
    params = model.init(seed=2)
    batch = _batch(2, rows=8)
    full = make_train_step(make_lm_loss(model), optim.sgd(0.5))
    acc = make_train_step(make_lm_loss(model), optim.sgd(0.5), accumulate=4)
    p1, _, m1 = full(params, full.init(params), batch)
    p4, _, m4 = acc(params, acc.init(params), batch)
    assert float(m4["loss"]) == pytest.approx(float(m1["loss"]), rel=1e-5)
    for a, b in zip(tree.leaves(p1), tree.leaves(p4)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="cannot be split into accumulate=3"):
        make_train_step(make_lm_loss(model), optim.sgd(0.5), accumulate=3)(params, {}, batch)


def test_bf16_autocast_under_grad_keeps_fp32_masters():
    model = af.Transformer(CFG)
    params = model.init(seed=3)
    batch = _batch(3)
    f32 = make_train_step(make_lm_loss(model), optim.adamw(1e-3))
    b16 = make_train_step(make_lm_loss(model), optim.adamw(1e-3), precision="bf16")
    _, _, m32 = f32(params, f32.init(params), batch)
    pb, sb, mb = b16(params, b16.init(params), batch)
    assert all(x.dtype == torch.float32 for x in tree.leaves(pb))
    assert float(mb["loss"]) == pytest.approx(float(m32["loss"]), rel=2e-2)
    assert float(mb["loss"]) != float(m32["loss"])  # bf16 really ran
    assert float(mb["grad_norm"]) == pytest.approx(float(m32["grad_norm"]), rel=5e-2)


def test_fp16_loss_scaling_skips_overflow_and_backs_off():
    model = af.Transformer(CFG)
    params = model.init(seed=4)
    base = make_lm_loss(model)

    def loss_fn(p, batch):
        return base(p, batch) * batch["factor"][0]

    step = make_train_step(loss_fn, optim.sgd(0.1), precision="fp16", loss_scale={"init_scale": 1024.0})
    state = step.init(params)
    ok = {**_batch(4), "factor": torch.ones(4)}
    p1, s1, m1 = step(params, state, ok)
    assert float(m1["loss_scale"]) == 1024.0 and math.isfinite(float(m1["loss"]))
    assert not _equal(p1, params)
    bad = {**_batch(4), "factor": torch.full((4,), float("inf"))}
    p2, s2, _ = step(p1, s1, bad)
    assert _equal(p2, p1)  # skipped
    assert float(optim.loss_scale(s2)) == 512.0
    with pytest.raises(ValueError, match="step.init"):
        step(params, optim.sgd(0.1).init(params), ok)


def test_eval_step_and_token_weighted_evaluate():
    model = af.Transformer(CFG)
    params = model.init(seed=5)
    ev = make_eval_step(make_lm_loss(model, train=False))
    a, b = _batch(5, rows=3), _batch(6, rows=1)
    ma = ev(params, a)
    assert float(ma["perplexity"]) == pytest.approx(math.exp(float(ma["loss"])), rel=1e-6)
    assert int(ma["tokens"]) == 3 * 15
    both = torch.cat([a["input_ids"], b["input_ids"]])
    whole = float(model.apply(params, both, labels=both)["loss"])
    assert evaluate(ev, params, [a, b])["loss"] == pytest.approx(whole, rel=1e-5)
    with pytest.raises(ValueError, match="no tokens"):
        evaluate(ev, params, [])


def test_weighted_mean_loss_is_the_token_weighted_mean_with_a_capped_perplexity():
    from aam_func.train import weighted_mean_loss

    assert weighted_mean_loss(3.0 * 10 + 1.0 * 30, 40) == {"loss": 1.5, "perplexity": math.exp(1.5), "tokens": 40}
    assert weighted_mean_loss(2000.0, 1)["perplexity"] == math.exp(700.0)  # no overflow
    with pytest.raises(ValueError, match="no tokens"):
        weighted_mean_loss(0.0, 0)


def test_bad_arguments():
    model = af.Transformer(CFG)
    with pytest.raises(ValueError, match="precision"):
        make_train_step(make_lm_loss(model), optim.sgd(0.1), precision="fp8")
    with pytest.raises(ValueError, match="accumulate"):
        make_train_step(make_lm_loss(model), optim.sgd(0.1), accumulate=0)
    with pytest.raises(TypeError, match="GradientTransformation"):
        make_train_step(make_lm_loss(model), torch.optim.SGD)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_resume_is_bitwise(tmp_path, dropout):
    """20 steps == 10 steps, save, load, 10 steps: params and optimizer state bit for bit."""
    cfg = CFG.replace(dropout=dropout)
    model = af.Transformer(cfg)
    blocks = torch.randint(0, 97, (40, 16), generator=torch.Generator().manual_seed(0))
    loader = BlockLoader(blocks, 4, seed=3)

    def run(params, state, start, stop, step):
        for s in range(start, stop):
            gen = torch.Generator().manual_seed(1000 + s)
            params, state, _ = step(params, state, loader.batch(s), gen)
        return params, state

    params0 = model.init(seed=0)
    step = make_train_step(make_lm_loss(model), _opt(params0))
    straight = run(params0, step.init(params0), 0, 20, step)

    half = run(params0, step.init(params0), 0, 10, step)
    save_checkpoint(tmp_path / "ck", cfg=cfg, params=half[0], opt_state=half[1], step=10)
    fresh = make_train_step(make_lm_loss(model), _opt(params0))  # a new process would rebuild everything
    ck = load_checkpoint(tmp_path / "ck", opt_template=fresh.init(params0))
    assert ck.step == 10
    resumed = run(ck.params, ck.opt_state, 10, 20, fresh)
    assert _equal(straight[0], resumed[0])
    assert _equal(straight[1], resumed[1])
    assert not _equal(straight[0], half[0])


@pytest.mark.slow
def test_compiled_step_matches_eager():
    model = af.Transformer(CFG)
    params = model.init(seed=6)
    eager = make_train_step(make_lm_loss(model), _opt(params))
    comp = make_train_step(make_lm_loss(model), _opt(params), compile=True)
    pe, se = params, eager.init(params)
    pc, sc = params, comp.init(params)
    for i in range(3):
        pe, se, me = eager(pe, se, _batch(i))
        pc, sc, mc = comp(pc, sc, _batch(i))
        assert float(mc["loss"]) == pytest.approx(float(me["loss"]), rel=1e-4)
    for a, b in zip(tree.leaves(pe), tree.leaves(pc)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_compiled_step_with_an_eager_optimizer_matches_the_fully_compiled_one():
    """compile_optimizer=False (the optimizer behind a graph break, forward and backward still
    compiled) takes the same two steps as compile_optimizer=True."""
    cfg = CFG.replace(n_layers=1)
    model = af.Transformer(cfg)
    params = model.init(seed=8)
    out = []
    for compile_optimizer in (True, False):
        step = make_train_step(make_lm_loss(model), _opt(params), compile=True, compile_optimizer=compile_optimizer)
        p, s = params, step.init(params)
        for i in range(2):
            p, s, m = step(p, s, _batch(i))
        out.append((p, float(m["loss"])))
    assert out[0][1] == pytest.approx(out[1][1], rel=1e-5)
    for a, b in zip(tree.leaves(out[0][0]), tree.leaves(out[1][0])):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_gradient_checkpointing_from_the_config_gives_the_same_step():
    batch = _batch(7)
    outs = []
    for ckpt in (False, True):
        model = af.Transformer(CFG.replace(gradient_checkpointing=ckpt))
        params = model.init(seed=7)
        step = make_train_step(make_lm_loss(model), optim.sgd(0.1))
        outs.append(step(params, step.init(params), batch))
    torch.testing.assert_close(outs[0][2]["loss"], outs[1][2]["loss"], rtol=0, atol=0)
    for a, b in zip(tree.leaves(outs[0][0]), tree.leaves(outs[1][0])):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_eval_tokens_follow_the_loss_rule_for_ignored_labels_and_padding():
    # one rule (losses.count_targets): -100 labels and padded targets are not predicted tokens
    from aam_func.losses import count_targets
    from aam_func.train import batch_targets

    ids = torch.tensor([[5, 6, 7, 8], [1, 2, 3, 4]])
    labels = ids.clone()
    labels[0, 2] = -100
    mask = torch.tensor([[1, 1, 1, 1], [0, 1, 1, 1]])  # row 1 left-padded
    batch = {"input_ids": ids, "labels": labels, "attention_mask": mask}
    assert int(count_targets(labels, mask)) == 2 + 3 == int(batch_targets(batch))
    cfg = af.ModelConfig(vocab_size=16, d_model=8, n_layers=1, n_heads=2, max_seq_len=8)
    model = af.Transformer(cfg)
    m = make_eval_step(make_lm_loss(model, train=False))(model.init(seed=0), batch)
    assert int(m["tokens"]) == 5


def test_resolve_precision_and_dropout_generator():
    from aam_func.train import dropout_generator, fast_bf16, resolve_precision

    assert resolve_precision("fp32", "cpu") == "fp32" and resolve_precision("fp16", "cpu") == "fp16"
    assert resolve_precision("mixed", "cpu") == "bf16"
    assert resolve_precision("auto", "cpu") == ("bf16" if fast_bf16("cpu") else "fp32")
    with pytest.raises(ValueError, match="precision must be one of"):
        resolve_precision("fp8", "cpu")
    a = torch.rand(4, generator=dropout_generator(3, 7, "cpu"))
    assert torch.equal(a, torch.rand(4, generator=dropout_generator(3, 7, "cpu")))
    assert not torch.equal(a, torch.rand(4, generator=dropout_generator(3, 7, "cpu", rank=1)))
    assert not torch.equal(a, torch.rand(4, generator=dropout_generator(3, 8, "cpu")))
    # a CPU generator reads 32 bits of its seed: every (seed, step, rank) of a run still differs
    draws = {tuple(torch.rand(2, generator=dropout_generator(s, t, "cpu", r)).tolist())
             for s in (0, 1, 2**40) for t in range(20) for r in range(4)}
    assert len(draws) == 3 * 20 * 4
    with pytest.raises(ValueError, match="step must be an int >= 0"):
        dropout_generator(3, -1, "cpu")


def test_recipe_matches_hand_built_chain():
    cfg = af.ModelConfig(vocab_size=16, d_model=8, n_layers=1, n_heads=2, max_seq_len=8)
    params = af.Transformer(cfg).init(seed=0)
    grads = tree.map(lambda p: torch.ones_like(p) * 0.3, params)
    hand = optim.chain(optim.clip_by_global_norm(1.0), optim.inject_hyperparams(optim.adamw)(
        learning_rate=optim.warmup_cosine(1e-2, 2, 10, end_value=1e-3), weight_decay=0.1, mask=optim.decay_mask(params)))
    recipe = optim.adamw_warmup_cosine(params, learning_rate=1e-2, total_steps=10, warmup_steps=2, end_value=1e-3,
                                       weight_decay=0.1, max_grad_norm=1.0)
    s1, s2, p1, p2 = hand.init(params), recipe.init(params), params, params
    for _ in range(4):
        u1, s1 = hand.update(grads, s1, p1)
        u2, s2 = recipe.update(grads, s2, p2)
        p1, p2 = optim.apply_updates(p1, u1), optim.apply_updates(p2, u2)
    assert _equal(p1, p2)
    assert set(tree.flatten(s1)) == set(tree.flatten(s2))
    no_clip = optim.adamw_warmup_cosine(params, learning_rate=1e-2, total_steps=10, warmup_steps=2, max_grad_norm=0)
    assert not any("global_norm" in k for k in tree.flatten(no_clip.init(params)))
    with pytest.raises(ValueError, match="total_steps must be an int >= 1"):
        optim.adamw_warmup_cosine(params, learning_rate=1e-2, total_steps=0, warmup_steps=0)
