"""aam_func.testing.strategies produce only valid values and shrink to small ones.

Run them long with HYPOTHESIS_PROFILE=thorough (1000 examples per property)."""

import subprocess
import sys

import pytest
import torch
from hypothesis import find, given
from hypothesis import strategies as st

import aam_func as af
from aam_func import tree
from aam_func.ops import registry
from aam_func.testing import check_op
from aam_func.testing import strategies as afs

pytestmark = pytest.mark.usefixtures("one_thread")


@given(afs.model_configs(), st.data())
def test_model_configs_build_and_run(cfg, data):
    model = af.Transformer(cfg)
    p = data.draw(afs.params(model))
    assert tree.flatten(p).keys() == tree.flatten(model.param_shapes()).keys()
    batch = data.draw(afs.token_batches(cfg, padding="any", max_batch=2, max_seq=6))
    out = model.apply(p, **batch)
    assert out["logits"].shape == batch["input_ids"].shape + (cfg.vocab_size,)
    assert torch.isfinite(out["logits"]).all() and torch.isfinite(out["loss"])


@given(afs.model_configs(attention_types="local", position_encodings=["rope"], gqa=True, norms="rmsnorm", activations="swiglu"))
def test_model_config_filters_hold(cfg):
    assert cfg.attention_type == "local" and cfg.position_encoding == "rope" and cfg.norm == "rmsnorm"
    assert cfg.activation == "swiglu" and cfg.n_kv_heads < cfg.n_heads


@given(afs.model_configs(gqa=False))
def test_model_configs_without_gqa(cfg):
    assert cfg.n_kv_heads == cfg.n_heads


def test_bad_filters_are_named():
    with pytest.raises(ValueError, match="attention_types"):
        find(afs.model_configs(attention_types=["bogus"]), lambda c: True)
    with pytest.raises(ValueError, match="padding"):
        find(afs.token_batches(af.ModelConfig(vocab_size=5, d_model=4, n_heads=1, n_layers=1), padding="middle"), lambda b: True)
    with pytest.raises(ValueError, match="containers"):
        find(afs.pytrees(containers=("set",)), lambda t: True)
    with pytest.raises(ValueError, match="gqa=True"):
        find(afs.model_configs(gqa=True, max_heads=1), lambda c: True)


@given(afs.model_configs(max_layers=1), st.sampled_from([None, "left", "right", "any"]), st.data())
def test_token_batches_are_valid(cfg, padding, data):
    b = data.draw(afs.token_batches(cfg, padding=padding))
    ids, mask, labels, pos = b["input_ids"], b["attention_mask"], b["labels"], b["position_ids"]
    assert ids.dtype == torch.long and ((ids >= 0) & (ids < cfg.vocab_size)).all()
    assert (mask.sum(-1) >= 1).all()
    assert ((labels == -100) == (mask == 0)).all()
    if padding is None:
        assert mask.all()
    for row_mask, row_pos in zip(mask, pos):
        real = row_mask.nonzero().flatten()
        assert (real[1:] - real[:-1] == 1).all()  # one run of real tokens: padding only at the ends
        assert row_pos[real].tolist() == list(range(len(real)))
        if padding == "left":
            assert row_mask[-1] == 1
        if padding == "right":
            assert row_mask[0] == 1


def _walk(t, out):
    if isinstance(t, dict):
        for k, v in t.items():
            assert isinstance(k, str) and k
            out["dotted"] |= "." in k
            _walk(v, out)
    elif isinstance(t, (list, tuple)):
        for v in t:
            _walk(v, out)
    else:
        assert t is None or isinstance(t, torch.Tensor)
    return out


@given(afs.pytrees())
def test_pytrees_hold_tensors_and_none(t):
    _walk(t, {"dotted": False})


def test_pytrees_cover_every_shape_of_tree():
    assert find(afs.pytrees(containers=("dict",)), lambda t: _walk(t, {"dotted": False})["dotted"])
    assert isinstance(find(afs.pytrees(containers=("tuple",)), lambda t: isinstance(t, tuple) and len(t) > 0), tuple)
    assert isinstance(find(afs.pytrees(containers=("list",)), lambda t: isinstance(t, list) and len(t) > 0), list)
    assert find(afs.pytrees(containers=("dict",)), lambda t: isinstance(t, dict) and None in t.values()) is not None
    no_none = find(afs.pytrees(none_leaves=False, dotted_names=False, containers=("dict",)), lambda t: isinstance(t, dict) and len(t) >= 2)
    assert not _walk(no_none, {"dotted": False})["dotted"] and None not in no_none.values()


@given(st.sampled_from([torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.bool]), st.data())
def test_tensors_are_finite_and_within_safe_bounds(dtype, data):
    t = data.draw(afs.tensors(afs.shapes(max_dims=3), dtype=dtype))
    assert t.dtype == dtype and t.dim() <= 3
    if dtype.is_floating_point:
        assert torch.isfinite(t).all() and t.abs().max().item() <= afs.SAFE_BOUNDS[dtype] if t.numel() else True
    x = data.draw(afs.tensors((2, 3), elements=st.floats(0, 1), requires_grad=True))
    assert x.shape == (2, 3) and x.requires_grad and ((x >= 0) & (x <= 1)).all()


SPECS = [registry.get(n) for n in ("rope", "remat", "linear_cross_entropy")]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
@given(data=st.data())
def test_op_inputs_are_valid_samples(spec, data):
    args, kwargs = data.draw(afs.op_inputs(spec))
    diff = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    assert diff and all(a.dtype == torch.float64 and a.is_leaf for a in diff)
    check_op(spec, samples=[(args, kwargs)], checks=["values", "grads"])


def test_strategies_shrink_to_small_examples():
    cfg = find(afs.model_configs(), lambda c: True)
    assert (cfg.n_layers, cfg.n_heads, cfg.vocab_size, cfg.d_model) == (1, 1, 5, 2)
    b = find(afs.token_batches(cfg, padding="any"), lambda b: b["input_ids"].shape[0] >= 2)
    assert b["input_ids"].shape == (2, 1) and (b["input_ids"] == 0).all()
    t = find(afs.tensors(), lambda t: t.numel() >= 3)
    assert t.shape == (3,) and (t == 0).all()


def test_missing_hypothesis_is_a_clear_error():
    code = (
        "import sys; sys.modules['hypothesis'] = None\n"
        "import aam_func.testing; aam_func.testing.check_op  # the op checks need no hypothesis\n"
        "import aam_func.testing.strategies\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode != 0 and "ImportError" in run.stderr and "aam-func[testing]" in run.stderr, run.stderr
    assert "check_op" not in run.stderr  # it failed at the strategies import, not before
