"""per_sample's batched route (method="batched"): one batched forward and backward, no vmap.

Each model below is checked in float64 against the vmap route (exact for any loss) on the same
per-example losses: full gradients, norms, clipped sums and losses; then the contract's refusals.
"""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from aam_func import per_sample
from aam_func.per_sample.batched import BatchedUnsupported



@pytest.fixture(autouse=True)
def _float64():
    """Every model and batch here in float64, restored after each test (no leak into other files)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def _cnn():
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.ReLU(), nn.AvgPool2d(2),
        nn.Conv2d(4, 6, 3, padding="same", bias=False), nn.GroupNorm(3, 6), nn.ReLU(),
        nn.Flatten(), nn.Linear(6 * 4 * 4, 5),
    )


class _Tokens(nn.Module):
    """Embedding (with padding_idx) + LayerNorm + Linear + Conv1d + a head: every kind the route covers."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 6, padding_idx=0)
        self.norm = nn.LayerNorm(6)
        self.fc = nn.Linear(6, 6)
        self.conv = nn.Conv1d(6, 6, 3, padding=1)
        self.head = nn.Linear(6, 11)

    def forward(self, ids):
        h = self.norm(self.emb(ids))
        h = torch.tanh(self.fc(h))
        h = self.conv(h.transpose(1, 2)).transpose(1, 2)
        return self.head(h)


def _module_losses(model, kind):
    def losses(params, batch):
        x, y = batch
        out = functional_call(model, params, (x,))
        if kind == "tokens":
            return F.cross_entropy(out.transpose(1, 2), y, reduction="none").mean(1)
        return F.cross_entropy(out, y, reduction="none")

    return losses


def _problem(kind, B=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    if kind == "cnn":
        model = _cnn()
        batch = (torch.randn(B, 1, 8, 8, generator=g), torch.randint(0, 5, (B,), generator=g))
    else:
        model = _Tokens()
        ids = torch.randint(0, 11, (B, 7), generator=g)
        ids[0, :3] = 0  # padding rows receive no gradient
        batch = (ids, torch.randint(0, 11, (B, 7), generator=g))
    params = {k: v.detach() for k, v in model.named_parameters()}
    return model, params, batch, _module_losses(model, kind)


def _close(a, b, tol=1e-10):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].shape == b[k].shape, k
        torch.testing.assert_close(a[k], b[k], rtol=tol, atol=tol, msg=k)


@pytest.mark.parametrize("kind", ["cnn", "tokens"])
def test_grads_equal_the_vmap_route(kind):
    _, params, batch, losses = _problem(kind)
    want = per_sample.grads(losses, params, batch, method="vmap")
    got = per_sample.grads(losses, params, batch, method="batched")
    _close(got, want)
    got2 = per_sample.grads(losses, params, batch, method="batched", chunk_size=2)
    _close(got2, want)


@pytest.mark.parametrize("kind", ["cnn", "tokens"])
def test_norms_and_clipped_sum_equal_the_vmap_route(kind):
    _, params, batch, losses = _problem(kind)
    n_want = per_sample.norms(losses, params, batch, method="vmap")
    torch.testing.assert_close(per_sample.norms(losses, params, batch, method="batched"), n_want)
    C = float(n_want.median())  # some examples clipped, some not
    want = per_sample.clipped_sum(losses, params, batch, C, method="vmap")
    got = per_sample.clipped_sum(losses, params, batch, C, method="batched", chunk_size=3)
    _close(got.sum, want.sum)
    torch.testing.assert_close(got.norms, want.norms)
    torch.testing.assert_close(got.losses, want.losses)


def test_transformers_conv1d_gpt2_equals_the_vmap_route():
    """GPT-2's Conv1D is torch.addmm over (B·T, in) rows: the example-major flattening is accepted."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(vocab_size=31, n_positions=8, n_embd=8, n_layer=1, n_head=2,
                                  tie_word_embeddings=False, attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0)
    model = transformers.GPT2LMHeadModel(cfg).double().eval()
    params = {k: v.detach() for k, v in model.named_parameters()}
    ids = torch.randint(0, 31, (3, 6), generator=torch.Generator().manual_seed(1))

    def losses(p, ids):
        logits = functional_call(model, p, (ids,)).logits[:, :-1]
        return F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none").mean(1)

    # wpe is read by an embedding of positions shared by the batch (shape (1, T)): not batch-first
    with pytest.raises(BatchedUnsupported, match="transformer.wpe.weight"):
        per_sample.grads(losses, params, ids, method="batched")
    frozen = {k: v for k, v in params.items() if k != "transformer.wpe.weight"}

    def losses_wpe_fixed(p, ids):
        return losses({**p, "transformer.wpe.weight": params["transformer.wpe.weight"]}, ids)

    want = per_sample.grads(losses_wpe_fixed, frozen, ids, method="vmap")
    _close(per_sample.grads(losses_wpe_fixed, frozen, ids, method="batched"), want, 1e-9)


def test_dp_sgd_step_with_the_batched_route_equals_ghost():
    from aam_func import optim

    _, params, batch, losses = _problem("cnn", B=6)
    outs = []
    for method in ("ghost", "batched"):
        step = per_sample.dp_sgd(losses, optim.sgd(0.1), max_norm=0.5, noise_multiplier=1.0, method=method)
        p, _, info = step(params, optim.sgd(0.1).init(params), batch, torch.Generator().manual_seed(3))
        outs.append((p, info))
    _close(outs[1][0], outs[0][0])
    torch.testing.assert_close(outs[1][1].norms, outs[0][1].norms)
    torch.testing.assert_close(outs[1][1].loss, outs[0][1].loss)


def test_a_scalar_loss_is_refused_with_the_contract():
    _, params, batch, losses = _problem("cnn")
    with pytest.raises(BatchedUnsupported, match=r"per-example losses .*got \(\)"):
        per_sample.grads(lambda p, b: losses(p, b).mean(), params, batch, method="batched")


def test_a_param_without_a_formula_is_refused_by_name():
    _, params, batch, losses = _problem("cnn")
    scale = torch.ones(5)

    def scaled(p, b):  # "logit_scale" is multiplied in: no per-example formula
        x, y = b
        logits = functional_call(_problem("cnn")[0], {k: v for k, v in p.items() if k != "logit_scale"}, (x,))
        return F.cross_entropy(logits * p["logit_scale"], y, reduction="none")

    with pytest.raises(BatchedUnsupported, match="logit_scale.*method='ghost' or 'vmap'"):
        per_sample.grads(scaled, {**params, "logit_scale": scale}, batch, method="batched")


def test_a_use_that_is_not_batch_first_is_refused():
    W = torch.randn(3, 4)

    def time_major(p, x):  # (T, B, 4): the linear's leading dim is T, not B
        return F.linear(x.transpose(0, 1), p["w"]).sum((0, 2))

    with pytest.raises(BatchedUnsupported, match=r"linear\('w'\).*batch-first"):
        per_sample.grads(time_major, {"w": W}, torch.randn(5, 2, 4), method="batched")


def test_tied_weights_are_refused():
    W = torch.randn(4, 4)
    with pytest.raises(BatchedUnsupported, match="tied"):
        per_sample.grads(lambda p, x: F.linear(F.linear(x, p["a"]), p["b"]).sum(1), {"a": W, "b": W},
                         torch.randn(3, 4), method="batched")


def test_batched_is_for_params_only():
    with pytest.raises(ValueError, match="argnums=0"):
        per_sample.grads(lambda p, x: F.linear(x, p["w"]).sum(1), {"w": torch.randn(2, 2)}, torch.randn(3, 2),
                         method="batched", argnums=1)


def test_one_loss_serves_every_route():
    """A (B,)-returning loss works on the ghost and vmap routes too (a batch of one gives (1,))."""
    _, params, batch, losses = _problem("tokens", B=3)
    _close(per_sample.grads(losses, params, batch, method="ghost"), per_sample.grads(losses, params, batch, method="vmap"))


def test_batchnorm_in_training_mode_is_refused_by_name():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(2 * 6 * 6, 3)).train()
    params = {k: v.detach() for k, v in model.named_parameters()}
    batch = (torch.randn(4, 1, 8, 8), torch.randint(0, 3, (4,)))
    with pytest.raises(ValueError, match=r"BatchNorm layer '1'.*GroupNorm"):
        per_sample.grads(_module_losses(model, "cnn"), params, batch, method="batched")


def _loop_grads(losses, params, batch):
    """Per-example gradients by a Python loop of torch.func.grad on each example alone."""
    B = batch[0].shape[0]
    rows = [torch.func.grad(lambda p, i=i: losses(p, tuple(t[i:i + 1] for t in batch)).sum())(params) for i in range(B)]
    return {k: torch.stack([r[k] for r in rows]) for k in params}


class _InPlace(nn.Module):
    """In-place ops right after recognised uses: ReLU(inplace=True) on a conv's and a norm's
    output, and an in-place scale of a linear's output before the next layer."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.norm = nn.GroupNorm(2, 4)
        self.fc = nn.Linear(4 * 8 * 8, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        h = torch.relu_(self.conv(x))
        h = torch.relu_(self.norm(h))
        h = self.fc(h.flatten(1))
        h.mul_(h.detach().abs() + 1)  # changes the use's output in place (and its gradient downstream)
        return self.head(h)


def test_in_place_ops_on_a_use_output_keep_the_gradient_of_that_output():
    """The backward stops at each use's own node (its gradient edge), not at the tensor an
    in-place op has since re-pointed: the per-example gradients equal a Python loop."""
    torch.manual_seed(0)
    model = _InPlace()
    params = {k: v.detach() for k, v in model.named_parameters()}
    g = torch.Generator().manual_seed(2)
    batch = (torch.randn(4, 1, 8, 8, generator=g), torch.randint(0, 3, (4,), generator=g))
    losses = _module_losses(model, "cnn")
    _close(per_sample.grads(losses, params, batch, method="batched"), _loop_grads(losses, params, batch))


def test_a_use_under_no_grad_or_unused_gets_zero_gradients():
    """A use computed under torch.no_grad (not differentiable) and a use whose output the loss
    ignores give zero per-example gradients, as torch.func.grad does."""
    params = {"a": torch.randn(3, 4), "b": torch.randn(2, 4), "c": torch.randn(5, 4)}

    def losses(p, x):
        with torch.no_grad():
            frozen = F.linear(x, p["b"])
        F.linear(x, p["c"])  # computed and dropped
        return (F.linear(x, p["a"]).pow(2).sum(1) + frozen.sum(1))

    x = torch.randn(6, 4)
    got = per_sample.grads(losses, params, x, method="batched")
    _close(got, per_sample.grads(losses, params, x, method="vmap"))
    assert got["b"].abs().max() == 0 and got["c"].abs().max() == 0 and got["a"].abs().max() > 0

    def all_frozen(p, x):
        with torch.no_grad():
            return F.linear(x, p["a"]).sum(1)

    assert all(v.abs().max() == 0 for v in per_sample.grads(all_frozen, {"a": params["a"]}, x, method="batched").values())


def test_the_benchmark_cnn_in_float32_equals_a_python_loop():
    """examples/cnn_dp.py's CNN shape (conv 1→16, GroupNorm(4, 16), conv 16→32, GroupNorm(4, 32),
    linear 128→10) in float32 on digit-like inputs (values 0..16: the norms' inputs are far from
    centred): every per-example gradient within 1e-5 of a Python loop."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.GroupNorm(4, 16), nn.ReLU(), nn.AvgPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.GroupNorm(4, 32), nn.ReLU(), nn.AvgPool2d(2),
        nn.Flatten(), nn.Linear(128, 10),
    ).float()
    params = {k: v.detach() for k, v in model.named_parameters()}
    g = torch.Generator().manual_seed(3)
    batch = (torch.rand(12, 1, 8, 8, generator=g, dtype=torch.float32) * 16, torch.randint(0, 10, (12,), generator=g))
    losses = _module_losses(model, "cnn")
    got, want = per_sample.grads(losses, params, batch, method="batched"), _loop_grads(losses, params, batch)
    assert got["0.weight"].dtype == torch.float32
    for k in params:
        assert (got[k] - want[k]).abs().max() <= 1e-5, k


def test_norms_with_weight_only_and_several_rows_per_example_equal_the_vmap_route():
    """F.group_norm / F.layer_norm with a weight and no bias (the bias slot empty), a group norm
    over a 1-D feature map and a layer norm over (T, d) rows: the weight's gradient alone."""
    params = {"gw": torch.randn(6), "lw": torch.randn(4), "head": torch.randn(3, 4)}

    def losses(p, x):  # x (B, 6, 4)
        h = F.group_norm(x, 3, p["gw"], None, 1e-5)  # (B, C=6, L=4): groups of 2 channels
        h = F.layer_norm(h, (4,), p["lw"], None, 1e-5)  # each of the 6 rows of an example
        return F.linear(h, p["head"]).pow(2).sum((1, 2))

    x = torch.randn(5, 6, 4) * 3 + 2
    _close(per_sample.grads(losses, params, x, method="batched"), per_sample.grads(losses, params, x, method="vmap"))
