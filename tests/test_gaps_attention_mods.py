"""Gaps found by mutation testing (scripts/mutation.py) in the programmable attention's mods.

The blockwise kernel finds the tensors a mod captures by walking its closures, containers and
attributes (``mods.captured_tensors``), up to a fixed depth: a table 20 levels down (the mod
itself is level 0) is found and gets its gradient. A mutant that stopped one level earlier
survived the suite. Deeper than that the walk gives up without a word (see the xfail)."""

from __future__ import annotations

import pytest
import torch

from aam_func.ops.attention import attention, mods


def _key_bias_mod(table, levels: int):
    """A score_mod adding ``table[kv_idx]``, with the table ``levels`` levels below the mod:
    the mod's closure holds ``levels - 1`` nested one-item lists around it."""
    box = table
    for _ in range(levels - 1):
        box = [box]

    def score_mod(score, b, h, q_idx, kv_idx):
        x = box
        while isinstance(x, list):
            x = x[0]
        return score + x[kv_idx]

    return score_mod


def _grads(sm, table):
    g = torch.Generator().manual_seed(21)
    q, k, v = (torch.randn(1, 2, 4, 3, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    w = torch.randn(1, 2, 4, 3, generator=g, dtype=torch.float64)
    out = []
    for backend in ("blockwise", "math"):
        o = attention(q, k, v, causal=True, score_mod=sm, backend=backend)
        # materialize_grads: a table the output does not depend on gets zeros, as an optimizer sees it
        out.append(torch.autograd.grad((o * w).sum(), table, allow_unused=True, materialize_grads=True)[0])
    return out


def test_a_table_twenty_levels_down_is_found_and_gets_its_gradient():
    table = torch.randn(4, dtype=torch.float64, requires_grad=True)
    sm = _key_bias_mod(table, 20)
    assert [t is table for t in mods.captured_tensors(sm)] == [True]
    blockwise, math = _grads(sm, table)
    assert blockwise.abs().max() > 1e-3  # the bias moves the output: a gradient that can be wrong
    torch.testing.assert_close(blockwise, math, atol=1e-12, rtol=1e-12)


def test_a_table_deeper_than_the_walk_is_found_or_refused():
    table = torch.randn(4, dtype=torch.float64, requires_grad=True)
    sm = _key_bias_mod(table, 21)
    try:
        blockwise, math = _grads(sm, table)
    except ValueError:
        return  # refused with an error: acceptable
    torch.testing.assert_close(blockwise, math, atol=1e-12, rtol=1e-12)


def test_a_table_below_the_walk_depth_is_refused_by_name():
    """Past the walk's depth a captured table could not be found; the call is refused before any
    kernel runs instead of dropping the table's gradient."""
    from aam_func.ops.attention.mods import _WALK_DEPTH

    table = torch.randn(4, dtype=torch.float64, requires_grad=True)
    q = torch.randn(1, 2, 4, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match=f"nested more than {_WALK_DEPTH} levels deep"):
        attention(q, q, q, causal=True, score_mod=_key_bias_mod(table, _WALK_DEPTH + 5), backend="blockwise")


def test_a_mod_whose_object_holds_itself_is_walked_once():
    """A callable object whose attribute refers back to it (a cycle) is walked without recursing
    forever, and its table still gets the math path's gradient."""

    class Bias:
        def __init__(self, table):
            self.table, self.me = table, None

        def __call__(self, score, b, h, q_idx, kv_idx):
            return score + self.table[kv_idx]

    table = torch.randn(4, dtype=torch.float64, requires_grad=True)
    sm = Bias(table)
    sm.me = sm
    blockwise, math = _grads(sm, table)
    assert blockwise.abs().max() > 1e-3
    torch.testing.assert_close(blockwise, math, atol=1e-12, rtol=1e-12)


def test_block_mask_sparsity_counts_a_partial_last_tile():
    """T = 10 with tiles of 4: three query tiles and three key tiles, the last ones partial. A
    causal mask visits 1 + 2 + 3 = 6 of the 9 tile pairs, so the kernel skips a third. (A mutant
    that counted 10 / 4 = 2.5 key tiles survived the suite, whose shapes were multiples of the
    tile.)"""
    from aam_func.ops.attention import create_block_mask

    bm = create_block_mask(mods.causal_mask, 1, 1, 10, 10, BLOCK_SIZE=4)
    assert bm.sparsity == pytest.approx(1 / 3)
    assert "sparsity=33.3%" in repr(bm)
