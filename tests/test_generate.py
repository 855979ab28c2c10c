"""Generation: KV cache == no cache == transformers, left padding, sampling filters, eos, seeds."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import aam_func as af
from aam_func.generate import (
    forward_cached,
    forward_static,
    generate,
    init_cache,
    init_static_cache,
    left_pad,
    process_logits,
    top_k_filter,
    top_p_filter,
)


pytestmark = pytest.mark.usefixtures("one_thread")


def _model(pos="learnable", **kw):
    cfg = af.ModelConfig(vocab_size=211, d_model=32, n_layers=2, n_heads=4, max_seq_len=160, dropout=0.0,
                         position_encoding=pos, **kw)
    m = af.Transformer(cfg)
    return m, m.init(seed=0)


@pytest.mark.parametrize("pos,extra", [("learnable", {}), ("rope", {"n_kv_heads": 2}), ("sinusoidal", {})])
def test_cache_equals_no_cache_for_128_tokens(pos, extra):
    m, p = _model(pos, **extra)
    x = torch.randint(0, 211, (2, 9), generator=torch.Generator().manual_seed(1))
    a = generate(m, p, x, max_new_tokens=128)  # static cache (the default)
    b = generate(m, p, x, max_new_tokens=128, use_cache=False)
    c = generate(m, p, x, max_new_tokens=128, cache="dynamic")
    assert a.shape == (2, 137) and torch.equal(a, b) and torch.equal(a[:, :9], x) and torch.equal(c, b)


def test_greedy_equals_transformers_generate_on_imported_gpt2():
    transformers = pytest.importorskip("transformers")
    from aam_func.interop.hf import from_transformers

    torch.manual_seed(0)
    hc = transformers.GPT2Config(vocab_size=301, n_positions=160, n_embd=64, n_layer=2, n_head=4,
                                 resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    hf = transformers.GPT2LMHeadModel(hc).eval()
    with torch.no_grad():  # larger weights so the greedy path does not collapse into one repeated token
        for w in hf.parameters():
            w.mul_(3.0)
    cfg, params = from_transformers(hf)
    model = af.Transformer(cfg)
    x = torch.randint(1, 301, (2, 8), generator=torch.Generator().manual_seed(2))
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    with torch.no_grad():
        want = hf.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=128)
    ours = generate(model, params, x, max_new_tokens=128)
    assert len(set(ours[:, 8:].flatten().tolist())) > 5  # a non-trivial continuation
    assert torch.equal(ours, want)
    assert torch.equal(generate(model, params, x, max_new_tokens=128, use_cache=False), want)
    assert torch.equal(generate(model, params, x, max_new_tokens=128, cache="dynamic"), want)


@pytest.mark.parametrize("cache", ["static", "dynamic"])
def test_left_padded_batch_equals_each_prompt_alone(cache):
    m, p = _model("rope")
    prompts = [[5, 6, 7], [1, 2, 3, 4, 5, 6, 7, 8], [9]]
    ids, mask = left_pad(prompts, pad_token_id=0)
    batch = generate(m, p, ids, attention_mask=mask, max_new_tokens=20, cache=cache)
    for i, pr in enumerate(prompts):
        alone = generate(m, p, torch.tensor([pr]), max_new_tokens=20, cache=cache)
        assert torch.equal(batch[i, ids.shape[1] - len(pr):], alone[0])


def test_cache_is_a_pure_tensor_tree():
    m, p = _model()
    x = torch.randint(0, 211, (2, 5))
    cache = init_cache(m, 2)
    logits, c1 = forward_cached(m, p, x, cache)
    assert cache["kv"][0][0].shape[2] == 0 and c1["kv"][0][0].shape == (2, 4, 5, 8)  # input untouched
    assert c1["next_pos"].tolist() == [5, 5]
    nxt = logits[:, -1].argmax(-1, keepdim=True)
    l2, c2 = forward_cached(m, p, nxt, c1)
    full = m.apply(p, torch.cat([x, nxt], 1))["logits"][:, -1]
    torch.testing.assert_close(l2[:, -1], full, rtol=1e-5, atol=1e-5)
    assert c1["kv"][0][0].shape[2] == 5 and c2["kv"][0][0].shape[2] == 6


def test_static_cache_is_a_pure_tensor_tree_and_equals_the_full_forward():
    m, p = _model("rope", n_kv_heads=2)
    x = torch.randint(1, 211, (2, 5), generator=torch.Generator().manual_seed(5))
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    cache = init_static_cache(m, 2, 16)
    logits, c1 = forward_static(m, p, x, cache, mask)
    assert cache["kv"][0][0].abs().sum() == 0 and int(cache["length"]) == 0  # input untouched
    assert c1["kv"][0][0].shape == (2, 2, 16, 8) and int(c1["length"]) == 5 and c1["next_pos"].tolist() == [3, 5]
    assert c1["mask"][:, :5].long().tolist() == mask.tolist() and c1["mask"][:, 5:].all()
    nxt = logits[:, -1].argmax(-1, keepdim=True)
    l2, c2 = forward_static(m, p, nxt, c1, validate=False)
    assert int(c1["length"]) == 5 and int(c2["length"]) == 6 and c1["kv"][0][0][:, :, 5].abs().sum() == 0
    ids = torch.cat([x, nxt], 1)
    m6 = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1)
    full = m.apply(p, ids, attention_mask=m6, position_ids=(m6.cumsum(1) - 1).clamp(min=0))["logits"][:, -1]
    torch.testing.assert_close(l2[:, -1], full, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"max_len must be an int in \[1, 160\], got 161"):
        init_static_cache(m, 1, 161)
    with pytest.raises(TypeError, match="max_len must be an int"):
        init_static_cache(m, 1, 8.0)


def test_sampling_and_eos_same_on_static_and_dynamic_cache():
    m, p = _model()
    x = torch.randint(0, 211, (3, 4), generator=torch.Generator().manual_seed(3))
    kw = dict(max_new_tokens=25, do_sample=True, temperature=1.5, top_k=100, top_p=0.95, repetition_penalty=1.3, seed=2)
    a = generate(m, p, x, **kw)
    assert torch.equal(a, generate(m, p, x, cache="dynamic", **kw))
    eos = int(a[1, 6])
    b = generate(m, p, x, eos_token_id=eos, pad_token_id=3, **kw)
    assert torch.equal(b, generate(m, p, x, eos_token_id=eos, pad_token_id=3, cache="dynamic", **kw))
    assert (b[1, 7:] == 3).all()


@pytest.mark.slow
def test_compiled_decode_equals_eager_and_compiles_once():
    """compile=True: the same tokens as eager (left padding and not), one compiled graph per
    (padding, shape) however many tokens are decoded."""
    from torch._dynamo.utils import counters

    m, p = _model("rope", n_kv_heads=2)
    ids, mask = left_pad([[5, 6, 7], [1, 2, 3, 4, 5, 6, 7, 8]], pad_token_id=0)
    torch._dynamo.reset()
    counters.clear()
    for kw in (dict(attention_mask=mask), dict()):
        want = generate(m, p, ids, max_new_tokens=40, **kw)
        assert torch.equal(generate(m, p, ids, max_new_tokens=40, compile=True, **kw), want)
        assert torch.equal(generate(m, p, ids, max_new_tokens=30, compile=True, **kw), want[:, :38])
    assert counters["stats"]["unique_graphs"] == 2, dict(counters["stats"])
    with pytest.raises(ValueError, match="compile=True needs the static cache"):
        generate(m, p, ids, compile=True, cache="dynamic")


@given(st.integers(0, 2**31 - 1), st.floats(0.3, 2.0), st.integers(0, 30), st.floats(0.05, 1.0), st.floats(0.5, 2.0))
def test_processors_match_transformers(seed, temperature, top_k, top_p, penalty):
    from transformers.generation.logits_process import (
        LogitsProcessorList,
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(3, 50, generator=g) * 3
    logits[0, :10] = logits[0, 0]  # ties
    seen = torch.randint(0, 50, (3, 7), generator=g)
    procs = [RepetitionPenaltyLogitsProcessor(penalty), TemperatureLogitsWarper(temperature)]
    if top_k > 0:
        procs.append(TopKLogitsWarper(top_k))
    if top_p < 1.0:
        procs.append(TopPLogitsWarper(top_p))
    want = LogitsProcessorList(procs)(seen, logits.clone())
    got = process_logits(logits, seen, do_sample=True, temperature=temperature, top_k=top_k, top_p=top_p,
                         repetition_penalty=penalty)
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    torch.testing.assert_close(got[~torch.isinf(got)], want[~torch.isinf(want)])


def test_top_p_keeps_the_token_that_crosses_the_threshold():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = ~torch.isinf(top_p_filter(logits, 0.6))
    assert kept.tolist() == [[True, True, False, False]]  # 0.5 < 0.6, so 0.3 is kept too
    assert (~torch.isinf(top_p_filter(logits, 0.01))).sum() == 1
    assert (~torch.isinf(top_k_filter(logits, 2))).sum() == 2


def test_sampling_is_seeded_and_eos_stops():
    m, p = _model()
    x = torch.randint(0, 211, (3, 4), generator=torch.Generator().manual_seed(3))
    kw = dict(max_new_tokens=30, do_sample=True, temperature=1.5, top_k=100, top_p=0.95)
    a, b = generate(m, p, x, seed=5, **kw), generate(m, p, x, seed=5, **kw)
    c = generate(m, p, x, seed=6, **kw)
    assert torch.equal(a, b) and not torch.equal(a, c)
    # force an eos: the token greedy decoding emits first for row 0
    greedy = generate(m, p, x, max_new_tokens=10)
    eos = int(greedy[0, 4])
    out = generate(m, p, x, max_new_tokens=10, eos_token_id=eos, pad_token_id=7)
    assert out[0, 4] == eos and (out[0, 5:] == 7).all()
    for row in range(3):  # rows keep their greedy tokens up to and including their first eos
        gen = greedy[row, 4:].tolist()
        n = gen.index(eos) + 1 if eos in gen else len(gen)
        assert out[row, 4:4 + n].tolist() == gen[:n]


def test_bad_options():
    m, p = _model()
    x = torch.zeros((1, 3), dtype=torch.long)
    with pytest.raises(ValueError, match="max_seq_len=160"):
        generate(m, p, x, max_new_tokens=200)
    with pytest.raises(ValueError, match="temperature"):
        generate(m, p, x, do_sample=True, temperature=0.0)
    with pytest.raises(ValueError, match="top_p"):
        generate(m, p, x, top_p=0.0)
    with pytest.raises(ValueError, match="all 0"):
        generate(m, p, x, attention_mask=torch.zeros_like(x))
    with pytest.raises(ValueError, match="max_new_tokens must be an int >= 0"):
        generate(m, p, x, max_new_tokens=True)
    with pytest.raises(ValueError, match="top_k must be an int >= 0"):
        generate(m, p, x, top_k=2.0)
    with pytest.raises(ValueError, match="repetition_penalty"):
        generate(m, p, x, repetition_penalty=float("nan"))


@pytest.mark.parametrize("cache", ["static", "dynamic"])
def test_attention_mask_must_be_zero_one_or_bool(cache):
    """generate and the cache steps check the mask as the model does (issue 15): a 2 is an
    error, not "true"; a bool or a 0/1 float mask gives the tokens of the long 0/1 one."""
    m, p = _model()
    ids, mask = left_pad([[5, 6, 7], [1, 2, 3, 4]], pad_token_id=0)
    want = generate(m, p, ids, attention_mask=mask, max_new_tokens=5, cache=cache)
    for same in (mask.bool(), mask.float()):
        assert torch.equal(generate(m, p, ids, attention_mask=same, max_new_tokens=5, cache=cache), want)
    bad = mask.clone()
    bad[0, 3] = 2
    with pytest.raises(ValueError, match="only 0 and 1"):
        generate(m, p, ids, attention_mask=bad, max_new_tokens=5, cache=cache)
    with pytest.raises(ValueError, match=r"attention_mask must be \(batch, seq\) = \(2, 4\)"):
        generate(m, p, ids, attention_mask=mask[:, 1:], max_new_tokens=5, cache=cache)
    with pytest.raises(ValueError, match="only 0 and 1"):
        forward_cached(m, p, ids, init_cache(m, 2), bad)
    with pytest.raises(ValueError, match="only 0 and 1"):
        forward_static(m, p, ids, init_static_cache(m, 2, 8), bad)


def test_compiled_steps_are_a_bounded_lru():
    """generate(compile=True)'s compiled decode steps: one per (model, padded), reused, and at
    most COMPILED_STEPS_KEPT of them kept (least recently used dropped first). Nothing here is
    called, so nothing compiles."""
    from aam_func import generate as G

    G._compiled_step.cache_clear()
    n = G.COMPILED_STEPS_KEPT
    models = [af.Transformer(af.ModelConfig(vocab_size=11 + i, d_model=8, n_layers=1, n_heads=2, max_seq_len=8))
              for i in range(n + 3)]
    first = G._compiled_step(models[0], False)
    assert G._compiled_step(models[0], False) is first and G._compiled_step(models[0], True) is not first
    for mdl in models[1:]:
        G._compiled_step(mdl, False)
        assert G._compiled_step.cache_info().currsize <= n
    info = G._compiled_step.cache_info()
    assert info.currsize == n and info.maxsize == n
    assert G._compiled_step(models[-1], False) is G._compiled_step(models[-1], False)  # kept
    misses = G._compiled_step.cache_info().misses
    G._compiled_step(models[0], False)  # dropped long ago: made again
    assert G._compiled_step.cache_info().misses == misses + 1 and G._compiled_step(models[0], False) is not first
    G._compiled_step.cache_clear()
