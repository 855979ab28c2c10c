"""The Transformer's model properties, through the public aam_func.testing checks: causal,
padding-invariant, batch-invariant, vmap(grad) == loop of grads, init a pure function of the
seed, in every attention variant. Each check is also shown to fail on a planted defect."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from test_model import VARIANTS, tiny

import aam_func as af
from aam_func.testing import (PropertyError, check_batch_invariance, check_causal, check_init_determinism,
                              check_padding_invariance, check_vmap_equals_loop, from_module)
from aam_func.testing import strategies as afs

pytestmark = pytest.mark.usefixtures("one_thread")


def _model(variant, seed=0):
    m = af.Transformer(tiny(**VARIANTS[variant]))
    return m, m.init(seed=seed)


def _ids(cfg, shape, seed=1):
    return torch.randint(0, cfg.vocab_size, shape, generator=torch.Generator().manual_seed(seed))


def _pad_sides(cfg):
    # block-aligned sparse patterns count sequence indices: documented, pad on the right only
    return "right" if cfg.attention_type == "sparse" and cfg.sparse_pattern == "fixed" else "both"


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_transformer_properties_hold_in_every_variant(variant):
    m, p = _model(variant)
    ids = _ids(m.cfg, (2, 9))
    assert check_causal(m.apply, p, ids) <= 1e-5
    assert check_padding_invariance(m.apply, p, ids, n_pad=3, side=_pad_sides(m.cfg)) <= 1e-5
    assert check_batch_invariance(m.apply, p, ids) <= 1e-5
    check_init_determinism(lambda seed: m.init(seed=seed))


@pytest.mark.parametrize("variant", ["gpt2", "llama", "relative", "local"])
def test_per_sample_grads_equal_loop(variant):
    m, p = _model(variant)
    ids = _ids(m.cfg, (3, 10))
    check_vmap_equals_loop(lambda p, x: m.apply(p, x[None], labels=x[None])["loss"], p, ids)


@given(afs.model_configs(), st.data())
def test_properties_on_drawn_configs(cfg, data):
    m = af.Transformer(cfg)
    p = data.draw(afs.params(m))
    ids = data.draw(afs.token_batches(cfg, max_batch=2, max_seq=8))["input_ids"]
    check_causal(m.apply, p, ids)
    check_padding_invariance(m.apply, p, ids, n_pad=data.draw(st.integers(1, 4)), side=_pad_sides(cfg))
    if ids.shape[0] > 1:
        check_batch_invariance(m.apply, p, ids)


def test_init_by_generator_and_exactly_one_source():
    m = af.Transformer(tiny())
    a = m.init(seed=5)
    b = m.init(generator=torch.Generator().manual_seed(5))
    assert all(torch.equal(x, y) for x, y in zip(af.tree.leaves(a), af.tree.leaves(b)))
    with pytest.raises(ValueError, match="exactly one"):
        m.init()


# ------------------------------------------------------------------ planted defects
def test_a_model_that_peeks_at_the_next_token_fails_causal():
    m, p = _model("gpt2")

    def peek(p, ids, **kw):
        out = m.apply(p, ids, **kw)["logits"]
        return out + 0.1 * torch.roll(out, -1, dims=1)

    with pytest.raises(PropertyError, match="check_causal: changing the tokens after position 0"):
        check_causal(peek, p, _ids(m.cfg, (1, 6)))


def test_a_model_whose_padding_leaks_fails_padding_invariance():
    m, p = _model("llama")

    def ignores_mask(p, ids, attention_mask=None, **kw):  # real tokens attend to the pads
        return m.apply(p, ids, **kw)

    ids = _ids(m.cfg, (2, 5))
    with pytest.raises(PropertyError, match="on the left changed the outputs at real positions"):
        check_padding_invariance(ignores_mask, p, ids, side="left")
    # causal attention never looks right, so right padding cannot leak even without the mask
    check_padding_invariance(ignores_mask, p, ids, side="right")


def test_a_model_whose_batch_elements_interact_fails_batch_invariance():
    m, p = _model("sinusoidal")

    def batch_mean(p, ids, **kw):
        out = m.apply(p, ids, **kw)["logits"]
        return out + 0.1 * out.mean(0, keepdim=True)

    with pytest.raises(PropertyError, match="example 0 alone differs"):
        check_batch_invariance(batch_mean, p, _ids(m.cfg, (2, 4)))
    with pytest.raises(ValueError, match="at least 2"):
        check_batch_invariance(m.apply, p, _ids(m.cfg, (1, 4)))


class _FlipBatch(torch.autograd.Function):
    """Identity, with a vmap rule that reverses the batch: per-sample results get mixed."""

    @staticmethod
    def forward(x):
        return x.clone()

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, g):
        return g

    @staticmethod
    def vmap(info, in_dims, x):
        return (_FlipBatch.apply(x.flip(in_dims[0])), in_dims[0]) if in_dims[0] is not None else (_FlipBatch.apply(x), None)


def test_a_loss_whose_vmap_mixes_examples_fails_vmap_equals_loop():
    m, p = _model("gpt2")
    ids = _ids(m.cfg, (2, 5))

    def loss(p, x):
        logits = _FlipBatch.apply(m.apply(p, x[None])["logits"])
        return torch.nn.functional.cross_entropy(logits[0, :-1], x[1:])

    with pytest.raises(PropertyError, match="check_vmap_equals_loop: example 0"):
        check_vmap_equals_loop(loss, p, ids)


def test_inits_that_read_global_state_or_ignore_the_seed_fail():
    with pytest.raises(PropertyError, match="init reads state other than its seed"):
        check_init_determinism(lambda seed: {"w": torch.randn(3, 3)})
    with pytest.raises(PropertyError, match="init ignores its seed"):
        check_init_determinism(lambda seed: {"w": torch.ones(3, 3)})


def test_properties_on_an_nn_module():
    torch.manual_seed(0)

    class RNNLM(torch.nn.Module):
        def __init__(self, bidirectional):
            super().__init__()
            self.emb = torch.nn.Embedding(11, 6)
            self.rnn = torch.nn.GRU(6, 4, batch_first=True, bidirectional=bidirectional)
            self.head = torch.nn.Linear(8 if bidirectional else 4, 11)

        def forward(self, ids):
            return self.head(self.rnn(self.emb(ids))[0])

    ids = torch.randint(0, 11, (2, 5), generator=torch.Generator().manual_seed(0))
    apply, params = from_module(RNNLM(bidirectional=False))
    check_causal(apply, params, ids)
    check_batch_invariance(apply, params, ids)
    apply, params = from_module(RNNLM(bidirectional=True))
    with pytest.raises(PropertyError, match="sees the future"):
        check_causal(apply, params, ids)
    bound = af.bind(af.Transformer(tiny()), af.Transformer(tiny()).init(seed=0))
    apply, params = from_module(bound)
    check_causal(apply, params, _ids(tiny(), (1, 5)))
    with pytest.raises(TypeError, match="nn.Module"):
        from_module(lambda x: x)


def test_bad_arguments_are_named():
    m, p = _model("gpt2")
    with pytest.raises(TypeError, match="input_ids"):
        check_causal(m.apply, p, torch.zeros(2, 3))
    with pytest.raises(ValueError, match="side='middle'"):
        check_padding_invariance(m.apply, p, _ids(m.cfg, (1, 3)), side="middle")
    with pytest.raises(ValueError, match="n_pad=0"):
        check_padding_invariance(m.apply, p, _ids(m.cfg, (1, 3)), n_pad=0)
    with pytest.raises(KeyError, match="output="):
        check_causal(m.apply, p, _ids(m.cfg, (1, 3)), output="hidden")
    with pytest.raises(TypeError, match="batch"):
        check_vmap_equals_loop(lambda p, x: x, p, [torch.tensor(1.0)])
