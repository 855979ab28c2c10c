"""Issue 15 item 13: every F.embedding option and every F.linear / addmm form the ghost route
accepts gives the vmap route's norms, per-example gradients and clipped sums at chunk sizes 1,
2 and B (and both equal a Python loop); what cannot be factored takes the exact route, and what
has no per-example meaning (max_norm) is refused. Proof: proofs/per_sample.md §2."""

import pytest
import torch
import torch.nn.functional as F

from aam_func import per_sample as ps, tree

B, N, V, D = 5, 6, 11, 4
DT = torch.float64


def _params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"emb": torch.randn(V, D, generator=g, dtype=DT), "w": torch.randn(3, D, generator=g, dtype=DT),
            "b": torch.randn(3, generator=g, dtype=DT), "s": torch.randn(D, generator=g, dtype=DT) + 2,
            "v": torch.randn(D, D, generator=g, dtype=DT)}


def _ids(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (B, N), generator=g)
    ids[:, 0], ids[2, 1:3], ids[3, 4] = 0, V - 1, 3  # every example reads row 0; repeats of V-1 and 3
    ids[3, 5] = 3
    return ids


def _head(h, p):
    return F.linear(torch.tanh(h), p["w"], p["b"]).pow(2).mean()


_MODULES = {sparse: torch.nn.Embedding(V, D, padding_idx=0, sparse=sparse) for sparse in (False, True)}
_LINEAR = torch.nn.Linear(D, D)


def _lookup_cases(sparse):
    emb = lambda ids, w, **kw: F.embedding(ids, w, sparse=sparse, **kw)  # noqa: E731
    return {
        "padding_idx=0": lambda p, b: _head(emb(b["ids"], p["emb"], padding_idx=0), p),
        "padding_idx=-1": lambda p, b: _head(emb(b["ids"], p["emb"], padding_idx=-1), p),
        # the table is computed from params: the intercept never sees it, the lookup is batched
        "padding_idx, computed table": lambda p, b: _head(emb(b["ids"], p["emb"] * p["s"], padding_idx=0), p),
        "padding_idx, table also indexed": lambda p, b: _head(emb(b["ids"], p["emb"], padding_idx=0) + p["emb"][1], p),
        "scale_grad_by_freq": lambda p, b: _head(emb(b["ids"], p["emb"], scale_grad_by_freq=True), p),
        "scale_grad_by_freq+padding_idx": lambda p, b: _head(
            emb(b["ids"], p["emb"], padding_idx=0, scale_grad_by_freq=True), p),
        "scale_grad_by_freq, computed table": lambda p, b: _head(
            emb(b["ids"], p["emb"] * p["s"], scale_grad_by_freq=True), p),
        "nn.Embedding(padding_idx) through functional_call": lambda p, b: _head(torch.func.functional_call(
            _MODULES[sparse], {"weight": p["emb"]}, (b["ids"],)), p),
        "tied lookup and head, padding_idx": lambda p, b: F.linear(
            emb(b["ids"], p["emb"], padding_idx=0), p["emb"]).pow(2).mean(),
    }


GHOST = {  # which weights the ghost route factors, per case ("emb" is exact-route where absent)
    "padding_idx=0": {"emb", "w"}, "padding_idx=-1": {"emb", "w"}, "padding_idx, computed table": {"w"},
    "padding_idx, table also indexed": {"w"}, "scale_grad_by_freq": {"w"},
    "scale_grad_by_freq+padding_idx": {"w"}, "scale_grad_by_freq, computed table": {"w"},
    "nn.Embedding(padding_idx) through functional_call": {"emb", "w"}, "tied lookup and head, padding_idx": {"emb"},
}


def _loop(loss, params, batch):
    return [torch.func.grad(loss)(params, {k: v[i : i + 1] for k, v in batch.items()}) for i in range(B)]


def _norms(grads):
    return torch.stack([torch.cat([x.flatten() for x in tree.leaves(g)]).norm() for g in grads])


def _max_diff(a, b):
    return max((x - y).abs().max().item() for x, y in zip(tree.leaves(a), tree.leaves(b)))


def _check_against_vmap_and_loop(loss, ref_loss, params, batch, ghost_weights):
    assert ps.ghost.discover(loss, params, batch).ghost == ghost_weights
    ref = _loop(ref_loss, params, batch)
    ref_norms = _norms(ref).float()
    C = 0.5 * ref_norms.median().item()  # some examples clipped, some not
    w = (C / (ref_norms.double() + ps.CLIP_EPS)).clamp(max=1)
    want_sum = tree.map(lambda *xs: sum(w[i] * xs[i] for i in range(B)), *ref)
    for chunk in (1, 2, B):
        for method in ("vmap", "ghost"):
            got = ps.grads(loss, params, batch, method=method, chunk_size=chunk)
            for i in range(B):
                assert _max_diff(tree.map(lambda x: x[i], got), ref[i]) <= 1e-10, (method, chunk, i)
            n = ps.norms(loss, params, batch, method=method, chunk_size=chunk)
            torch.testing.assert_close(n, ref_norms, rtol=1e-5, atol=1e-7, msg=f"norms {method} chunk {chunk}")
            clipped = ps.clipped_sum(loss, params, batch, C, method=method, chunk_size=chunk)
            assert _max_diff(clipped.sum, want_sum) <= 1e-5, (method, chunk)


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
@pytest.mark.parametrize("case", sorted(GHOST))
def test_every_embedding_option_equals_vmap_and_the_loop_at_chunks_1_2_B(case, sparse):
    # "padding_idx, computed table" is the defect: norms off by ~0.5 at chunk ≥ 2 before the fix
    loss = _lookup_cases(sparse)[case]
    ref_loss = _lookup_cases(False)[case]  # sparse only changes the gradient's layout: loop densely
    _check_against_vmap_and_loop(loss, ref_loss, _params(), {"ids": _ids()}, GHOST[case])


def test_padding_lookup_of_a_table_computed_from_the_example():
    # the table depends on the example: batched even on the vmap route
    params = _params(1)

    def loss(p, b):
        table = p["emb"] * b["scale"].reshape(-1)[:1]
        return _head(F.embedding(b["ids"], table, padding_idx=0), p)

    batch = {"ids": _ids(1), "scale": torch.linspace(0.5, 2, B, dtype=DT)[:, None]}
    _check_against_vmap_and_loop(loss, loss, params, batch, {"w"})


_LINEAR_CASES = {
    "positional with bias": lambda p, b: _head(F.linear(b["x"], p["v"], p["s"]), p),
    "keywords, no bias": lambda p, b: _head(F.linear(input=b["x"], weight=p["v"]), p),
    "one position per example (1-D input)": lambda p, b: _head(F.linear(b["x"][0, 0], p["v"]), p),
    "4-D input": lambda p, b: _head(F.linear(b["x"].reshape(1, 2, 3, D), p["v"]), p),
    "a layer applied twice": lambda p, b: _head(F.linear(torch.tanh(F.linear(b["x"], p["v"])), p["v"], p["s"]), p),
    "nn.Linear through functional_call": lambda p, b: _head(torch.func.functional_call(
        _LINEAR, {"weight": p["v"], "bias": p["s"]}, (b["x"],)), p),
    "addmm (transformers Conv1D)": lambda p, b: _head(
        torch.addmm(p["s"], b["x"].reshape(-1, D), p["v"]).reshape(b["x"].shape), p),
    "addmm with alpha (not recognised: exact)": lambda p, b: _head(
        torch.addmm(p["s"], b["x"].reshape(-1, D), p["v"], alpha=0.5).reshape(b["x"].shape), p),
    "a linear and a lookup of one table": lambda p, b: _head(
        F.linear(b["x"], p["emb"][:D, :]) + F.embedding(b["ids"], p["v"], padding_idx=0), p),
}
_LINEAR_GHOST = {"addmm with alpha (not recognised: exact)": {"w"}, "a linear and a lookup of one table": {"v", "w"}}


@pytest.mark.parametrize("case", sorted(_LINEAR_CASES))
def test_every_linear_form_equals_vmap_and_the_loop_at_chunks_1_2_B(case):
    g = torch.Generator().manual_seed(4)
    batch = {"x": torch.randn(B, N, D, generator=g, dtype=DT), "ids": _ids(2) % D}
    loss = _LINEAR_CASES[case]
    _check_against_vmap_and_loop(loss, loss, _params(2), batch, _LINEAR_GHOST.get(case, {"v", "w"}))


@pytest.mark.parametrize("method", ["ghost", "vmap", "auto"])
def test_embedding_max_norm_is_refused_on_every_route_and_params_are_untouched(method):
    params = _params()
    before = params["emb"].clone()
    loss = lambda p, b: _head(F.embedding(b["ids"], p["emb"], max_norm=0.5), p)  # noqa: E731
    batch = {"ids": _ids()}
    with pytest.raises(ValueError, match=r"max_norm=0.5.*look up with max_norm=None"):
        ps.grads(loss, params, batch, method=method)
    if method != "auto":
        with pytest.raises(ValueError, match="max_norm"):
            ps.norms(loss, params, batch, method=method)
        with pytest.raises(ValueError, match="max_norm"):
            ps.clipped_sum(loss, params, batch, 1.0, method=method)
    assert torch.equal(params["emb"], before)  # the refusal comes before any in-place renorm
