"""Gaps found by mutation testing (scripts/mutation.py) in the attention's dispatch facts."""

import torch
from torch.func import vmap

from aam_func.ops.attention import backends

KW = dict(backend="auto", causal=True, key_padding_mask=None, window=None, sparsity=None, relative_bias=None,
          dropout_p=0.0, q_offset=None)


def test_call_facts_outside_any_transform_report_no_transform():
    """A plain call is neither under vmap nor under forward-mode AD (a mutant that reported vmap
    for every eager call sent plain calls down the vmap rows of the table)."""
    q = torch.randn(1, 2, 4, 8)
    f = backends.call_facts(q, q, q, **KW)
    assert not f.vmap and not f.forward_ad and not f.compiling
    inside = []
    vmap(lambda q_: inside.append(backends.call_facts(q_, q_, q_, **KW)) or q_)(q[None])
    assert inside[0].vmap and not inside[0].forward_ad
