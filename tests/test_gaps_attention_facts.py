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


def test_sdpa_backend_masks_equal_the_math_path():
    """backend='sdpa' with key padding, a window, or a query offset builds the dense mask (its
    plain fast paths are only for no mask): each equals the math path (a mutant that took the
    plain path whenever one of them was absent survived the suite before)."""
    import aam_func.ops.attention as A

    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 2, 6, 4, generator=g) for _ in range(3))
    pad = torch.ones(2, 6, dtype=torch.bool)
    pad[0, 4:] = False
    cases = [dict(causal=True, key_padding_mask=pad), dict(causal=False, key_padding_mask=pad),
             dict(causal=True, window=2)]
    for kw in cases:
        torch.testing.assert_close(A.attention(q, k, v, backend="sdpa", **kw), A.attention(q, k, v, backend="math", **kw),
                                   msg=str(kw))
    q1 = q[:, :, :2]
    torch.testing.assert_close(A.attention(q1, k, v, backend="sdpa", causal=True, q_offset=3),
                               A.attention(q1, k, v, backend="math", causal=True, q_offset=3))


def test_relative_bias_default_max_distance_is_128():
    """Shaw's default K is 128: the table for it has 2K+1 = 257 rows and equals passing K."""
    from aam_func.ops.attention import RelativeBias, attention

    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, 2, 5, 4, generator=g) for _ in range(3))
    table = torch.randn(257, 4, generator=g)
    torch.testing.assert_close(attention(q, k, v, relative_bias=RelativeBias("shaw", table), backend="math"),
                               attention(q, k, v, relative_bias=RelativeBias("shaw", table, max_distance=128),
                                         backend="math"))


def test_sdpa_backend_causal_with_few_queries_equals_the_math_path():
    """backend='sdpa', causal, Tq < Tk and no other mask: only one query (in the last position,
    reading every key) may skip the mask; two or three queries need the bottom-right triangle
    (a mutant that let Tq == 2 skip it survived the suite)."""
    import aam_func.ops.attention as A

    g = torch.Generator().manual_seed(5)
    k, v = (torch.randn(1, 2, 6, 4, generator=g) for _ in range(2))
    for tq in (1, 2, 3):
        q = torch.randn(1, 2, tq, 4, generator=g)
        torch.testing.assert_close(A.attention(q, k, v, backend="sdpa", causal=True),
                                   A.attention(q, k, v, backend="math", causal=True), msg=f"Tq={tq}")


def test_sdpa_backend_with_grouped_query_heads_equals_the_math_path():
    """GQA (4 query heads, 2 key/value heads) on backend='sdpa': full, causal, and with key
    padding (the dense-mask call), against the math path. No targeted test sent GQA to SDPA: a
    mutant that inverted its enable_gqa flag survived."""
    import aam_func.ops.attention as A

    g = torch.Generator().manual_seed(6)
    q = torch.randn(2, 4, 5, 4, generator=g)
    k, v = (torch.randn(2, 2, 5, 4, generator=g) for _ in range(2))
    pad = torch.ones(2, 5, dtype=torch.bool)
    pad[1, 3:] = False
    for kw in (dict(causal=False), dict(causal=True), dict(causal=True, key_padding_mask=pad)):
        torch.testing.assert_close(A.attention(q, k, v, backend="sdpa", **kw), A.attention(q, k, v, backend="math", **kw),
                                   msg=str(kw))
