import os

import pytest
import torch
from hypothesis import given, strategies as st

from aam_func import tree


def sample():
    return {
        "embed": {"weight": torch.randn(5, 3)},
        "blocks": {"0": {"ln1": {"weight": torch.ones(3), "bias": torch.zeros(3)}}, "1": {"w": torch.randn(2, 2)}},
        "step": torch.tensor(3),
    }


def test_flatten_names_equal_state_dict_names():
    m = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    sd = m.state_dict()
    nested = tree.unflatten(sd)
    assert list(tree.flatten(nested)) == list(sd)
    assert nested["0"]["weight"] is sd["0.weight"]


def test_roundtrip_and_order():
    p = sample()
    flat = tree.flatten(p)
    assert list(flat) == ["embed.weight", "blocks.0.ln1.weight", "blocks.0.ln1.bias", "blocks.1.w", "step"]
    assert tree.flatten(tree.unflatten(flat)) == flat


@given(st.dictionaries(st.from_regex(r"[a-z]{1,3}(\.[a-z0-9]{1,2}){0,3}", fullmatch=True), st.integers(1, 4), min_size=1, max_size=8))
def test_unflatten_flatten_property(shapes):
    flat = {k: torch.zeros(v) for k, v in shapes.items()}
    try:
        nested = tree.unflatten(flat)
    except ValueError as e:  # a name that is both a leaf and a prefix of another
        assert "conflict" in str(e)
        return
    assert tree.flatten(nested).keys() == flat.keys()


def test_bad_keys():
    # dotted keys are names of their own (a flat named_parameters() dict); a clash is an error
    assert list(tree.flatten({"a.b": torch.zeros(1)})) == ["a.b"]
    with pytest.raises(ValueError, match="several leaves named 'a.b'"):
        tree.flatten({"a.b": torch.zeros(1), "a": {"b": torch.zeros(1)}})
    with pytest.raises(ValueError, match="non-empty"):
        tree.flatten({"": torch.zeros(1)})
    with pytest.raises(ValueError, match="conflict"):
        tree.unflatten({"a": torch.zeros(1), "a.b": torch.zeros(1)})


def test_map_multiple_trees_and_names():
    a, b = sample(), tree.map(lambda x: x * 2, sample())
    s = tree.map(lambda x, y: x + y, a, b)
    assert torch.equal(s["blocks"]["1"]["w"], a["blocks"]["1"]["w"] + b["blocks"]["1"]["w"])
    named = tree.map(lambda n, x: n, a, names=True)
    assert named["blocks"]["0"]["ln1"]["bias"] == "blocks.0.ln1.bias"


def test_map_structure_mismatch_lists_keys():
    a = sample()
    b = tree.unflatten({k: v for k, v in tree.flatten(a).items() if k != "step"} | {"extra": torch.zeros(1)})
    with pytest.raises(ValueError) as e:
        tree.map(lambda x, y: x, a, b)
    assert "missing: step" in str(e.value) and "unexpected: extra" in str(e.value)


def test_leaves_count_names():
    p = sample()
    assert tree.count(p) == 15 + 3 + 3 + 4 + 1
    assert len(tree.leaves(p)) == 5
    assert tree.names(p)[0] == "embed.weight"


def test_partition_merge_by_glob_predicate_and_mask():
    p = sample()
    sel, rest = tree.partition(p, "*.bias")
    assert tree.names(sel) == ["blocks.0.ln1.bias"]
    assert tree.flatten(tree.merge(sel, rest)).keys() == tree.flatten(p).keys()
    sel2, _ = tree.partition(p, lambda n, x: x.dim() == 2)
    assert set(tree.names(sel2)) == {"embed.weight", "blocks.1.w"}
    mask = tree.select(p, ["embed.*", "step"])
    sel3, _ = tree.partition(p, mask)
    assert set(tree.names(sel3)) == {"embed.weight", "step"}
    with pytest.raises(ValueError, match="matches no parameter; available: embed.weight"):
        tree.partition(p, "nothing.*", require_match=True)
    with pytest.raises(ValueError, match="more than one tree"):
        tree.merge(p, sel)
    with pytest.raises(TypeError):
        tree.partition(p, 3)


def test_cast_and_to():
    p = tree.cast(sample(), torch.float64)
    assert p["embed"]["weight"].dtype == torch.float64
    assert p["step"].dtype == torch.int64  # integers untouched
    assert tree.to(p, torch.float16)["blocks"]["1"]["w"].dtype == torch.float16


def test_save_load_roundtrip_and_validation(tmp_path):
    p = sample()
    path = tmp_path / "params.safetensors"
    tree.save(p, path, metadata={"step": "3"})
    q, meta = tree.load(path, with_metadata=True)
    assert meta["step"] == "3"
    assert all(torch.equal(x, y) for x, y in zip(tree.leaves(p), tree.leaves(tree.load(path, like=p))))
    assert [f for f in os.listdir(tmp_path) if f.startswith(".tmp")] == []
    like = tree.unflatten({k: v for k, v in tree.flatten(p).items() if k != "step"})
    like["embed"]["weight"] = torch.zeros(6, 3)
    like["new"] = torch.zeros(1)
    with pytest.raises(ValueError) as e:
        tree.load(path, like=like)
    msg = str(e.value)
    assert "missing: new" in msg and "unexpected: step" in msg and "embed.weight (expected (6, 3), got (5, 3))" in msg


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        tree.load(tmp_path / "nope.safetensors")
    bad = tmp_path / "bad.safetensors"
    tree.save(sample(), bad)
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cannot read params file"):
        tree.load(bad)


def test_save_is_atomic_when_interrupted(tmp_path, monkeypatch):
    path = tmp_path / "p.safetensors"
    tree.save({"a": torch.ones(2)}, path)
    import safetensors.torch as st_mod

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(st_mod, "save_file", boom)
    with pytest.raises(KeyboardInterrupt):
        tree.save({"a": torch.zeros(2)}, path)
    assert torch.equal(tree.load(path)["a"], torch.ones(2))
    assert [f for f in os.listdir(tmp_path) if f.startswith(".tmp")] == []


def test_unflatten_like_keeps_empty_subtrees_and_template_order():
    template = {"b": {"x": torch.zeros(1)}, "empty": {}, "a": torch.zeros(2)}
    flat = {"a": torch.ones(2), "b.x": torch.ones(1)}
    out = tree.unflatten_like(template, flat)
    assert list(out) == ["b", "empty", "a"] and out["empty"] == {} and out["b"]["x"] is flat["b.x"]
    with pytest.raises(KeyError):
        tree.unflatten_like({"c": torch.zeros(1)}, flat)
