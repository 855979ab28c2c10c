"""tree.* on any pytree: flat named_parameters() dicts, lists, tuples, namedtuples, registered
dataclasses and None leaves each come back in their own form."""

import collections
import dataclasses

import pytest
import torch
import torch.utils._pytree as pytree
from hypothesis import given, strategies as st

from aam_func import tree

Pair = collections.namedtuple("Pair", "w b")


@dataclasses.dataclass
class Block:
    weight: torch.Tensor
    bias: object = None


pytree.register_dataclass(Block)


def same_tree(a, b):
    la, sa = pytree.tree_flatten(a, is_leaf=tree.is_leaf)
    lb, sb = pytree.tree_flatten(b, is_leaf=tree.is_leaf)
    return sa == sb and all(x is y for x, y in zip(la, lb))


def forms():
    m = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    named = {k: v.detach() for k, v in m.named_parameters()}
    return {
        "named": named,
        "nested": tree.unflatten(dict(named)),
        "list": [torch.randn(2, 3), torch.randn(3)],
        "tuple": (torch.randn(2), {"x": torch.randn(1)}),
        "namedtuple": Pair(torch.randn(2, 2), torch.randn(2)),
        "dataclass": [Block(torch.randn(2, 2)), Block(torch.randn(3), torch.randn(3))],
    }


@pytest.mark.parametrize("form", list(forms()))
def test_flatten_unflatten_keeps_each_form(form):
    t = forms()[form]
    flat = tree.flatten(t)
    assert same_tree(tree.unflatten(flat), t)
    assert same_tree(tree.unflatten_like(t, dict(flat)), t)
    doubled = tree.map(lambda x: 2 * x, t)
    assert pytree.tree_structure(doubled, is_leaf=tree.is_leaf) == pytree.tree_structure(t, is_leaf=tree.is_leaf)


def test_names():
    f = forms()
    assert tree.names(f["named"]) == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert tree.names(f["nested"]) == tree.names(f["named"])
    assert tree.names(f["list"]) == ["0", "1"]
    assert tree.names(f["tuple"]) == ["0", "1.x"]
    assert tree.names(f["namedtuple"]) == ["w", "b"]
    # torch's dataclass registration keeps a None field in the structure, not as a leaf
    assert tree.names(f["dataclass"]) == ["0.weight", "1.weight", "1.bias"]
    assert tree.unflatten(tree.flatten(f["dataclass"]))[0].bias is None
    assert tree.flatten({"a": None, "b": [None]}) == {"a": None, "b.0": None}


@pytest.mark.parametrize("form", list(forms()))
def test_partition_merge_keep_form(form):
    t = forms()[form]
    sel, rest = tree.partition(t, lambda n, x: x.dim() == 2)
    back = tree.merge(sel, rest)
    assert tree.flatten(back).keys() == tree.flatten(t).keys()
    fb = tree.flatten(back)
    assert all(fb[n] is leaf for n, leaf in tree.flatten(t).items())  # dict keys may come back reordered
    assert type(back) is type(t)


def test_subset_of_flat_dict_stays_flat_and_lists_hold_none():
    f = forms()
    sel, _ = tree.partition(f["named"], "*.bias")
    assert list(sel) == ["0.bias", "2.bias"]
    sel, rest = tree.partition(f["list"], "1")
    assert sel[0] is None and sel[1] is f["list"][1] and rest[1] is None
    with pytest.raises(ValueError, match="more than one tree"):
        tree.merge(f["list"], sel)


def test_masks_by_glob_same_on_every_form():
    f = forms()
    for key in ("named", "nested"):
        m = tree.flatten(tree.select(f[key], "*.bias"))
        assert m == {"0.weight": False, "0.bias": True, "2.weight": False, "2.bias": True}
    assert tree.select(f["list"], "1") == [False, True]
    assert tree.select(f["namedtuple"], ["b"]) == Pair(False, True)
    # a bool tree of any form is a mask too (a list of bools is not a list of globs)
    assert tree.select(f["list"], [True, False]) == [True, False]


def test_save_load_other_forms(tmp_path):
    f = forms()
    for key, t in f.items():
        path = tmp_path / f"{key}.safetensors"
        tree.save(t, path)
        back = tree.load(path, like=t)
        assert tree.flatten(back).keys() == tree.flatten(t).keys()
        assert all((x is None and y is None) or torch.equal(x, y) for x, y in zip(tree.leaves(back), tree.leaves(t)))
        assert pytree.tree_structure(back, is_leaf=tree.is_leaf) == pytree.tree_structure(t, is_leaf=tree.is_leaf)
    # without like: state_dict names nest as dicts
    assert set(tree.flatten(tree.load(tmp_path / "named.safetensors"))) == {"0.weight", "0.bias", "2.weight", "2.bias"}


def test_save_bad_leaves_named(tmp_path):
    with pytest.raises(TypeError, match="leaf 'a.1' must be a Tensor"):
        tree.save({"a": [torch.zeros(1), "x"]}, tmp_path / "x.safetensors")
    with pytest.raises(ValueError, match="bare tensor"):
        tree.save(torch.zeros(1), tmp_path / "x.safetensors")


names_st = st.from_regex(r"[a-z]{1,3}(\.[a-z0-9]{1,2}){0,2}", fullmatch=True)
leaf_st = st.one_of(st.none(), st.integers(0, 3).map(lambda n: torch.zeros(n)))
trees_st = st.recursive(
    leaf_st,
    lambda kids: st.one_of(
        st.dictionaries(names_st, kids, max_size=4),
        st.lists(kids, max_size=3),
        st.lists(kids, max_size=3).map(tuple),
    ),
    max_leaves=12,
)


@given(trees_st)
def test_random_pytrees_round_trip(t):
    try:
        flat = tree.flatten(t)
    except ValueError as e:  # a dotted key spelling the same name as a nested path
        assert "several leaves named" in str(e)
        return
    assert same_tree(tree.unflatten(flat), t)
    assert same_tree(tree.unflatten_like(t, dict(flat)), t)
    sel, rest = tree.partition(t, lambda n, x: len(n) % 2 == 0)
    assert tree.flatten(tree.merge(sel, rest)).keys() >= {n for n, x in flat.items() if x is not None}
