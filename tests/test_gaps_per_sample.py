"""Gaps found by mutation testing (scripts/mutation.py) in per_sample/."""

from __future__ import annotations

import pytest
import torch

from aam_func import per_sample
from aam_func.per_sample.paths import leaf_names


def test_leaf_names_are_the_dotted_names_in_flatten_order():
    """``leaf_names`` (public in per_sample.paths, used by no route) had no test: a mutant that
    returned the leaves instead of their names survived."""
    params = {"enc": {"w": torch.zeros(2), "b": None}, "layers": [torch.zeros(1), (torch.zeros(3),)]}
    assert leaf_names(params) == ["enc.w", "enc.b", "layers.0", "layers.1.0"]
    assert leaf_names({"a.b": torch.zeros(1)}) == ["a.b"]


def test_a_transform_error_is_explained_by_one_run_on_the_first_example():
    """When the vmap route fails with a RuntimeError, the loss runs once more on the first
    example alone (no transform, exact ops in force) to find a refusal that names the layer;
    that refusal is raised from the original error. The probe sees a batch of exactly one (a
    mutant that probed two examples survived)."""
    seen = []

    def loss(params, x):
        seen.append((tuple(x.shape), torch.is_grad_enabled()))
        if torch.is_grad_enabled():  # the vmap(grad) route: a transform error
            raise RuntimeError("a transform error")
        raise ValueError("layer 'enc' refused on the first example")  # the probe (run under no_grad)

    x = torch.arange(12.0).reshape(4, 3)
    with pytest.raises(ValueError, match="layer 'enc' refused") as info:
        per_sample.grads(loss, {"w": torch.ones(3)}, x, method="vmap")
    assert isinstance(info.value.__cause__, RuntimeError)
    assert seen[-1] == ((1, 3), False)
