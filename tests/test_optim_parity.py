"""The new optimizers against their PyTorch references over 100 steps (≤ 1e-5 relative):
torch.optim.Muon, torch.optim.Adafactor, schedulefree.AdamWScheduleFree, and
torch.optim.swa_utils.AveragedModel (EMA). Formulas and claims: proofs/optim_modern.md."""

from __future__ import annotations

import copy

import pytest
import schedulefree  # the `test` extra
import torch
from torch.func import functional_call, grad

from aam_func import optim, tree

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 100


def _rel(ours: dict, ref: dict) -> float:
    """Largest per-leaf ``max|a - b| / max|b|`` over the leaves of ``ref``."""
    fa, fb = tree.flatten(ours), tree.flatten(ref)
    return max(((fa[k] - fb[k]).abs().max() / fb[k].abs().max().clamp_min(1e-12)).item() for k in fb)


def _shapes_params(shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {f"p{i}": torch.randn(s, generator=g) for i, s in enumerate(shapes)}


def _grad_stream(params, steps, seed=1):
    """Fixed gradients per step (independent of the params: the update rules are compared, not
    the amplification of one-ulp differences through a loss)."""
    g = torch.Generator().manual_seed(seed)
    return [{k: torch.randn(v.shape, generator=g) for k, v in params.items()} for _ in range(steps)]


def _run_torch(opt_cls, params, grads, **kw):
    tp = {k: v.clone().requires_grad_() for k, v in params.items()}
    opt = opt_cls(list(tp.values()), **kw)
    if hasattr(opt, "train"):
        opt.train()
    for g in grads:
        for k, p in tp.items():
            p.grad = g[k].clone()
        opt.step()
    return opt, {k: v.detach() for k, v in tp.items()}


def _run_ours(opt, params, grads):
    state = opt.init(params)
    for g in grads:
        updates, state = opt.update(g, state, params)
        params = optim.apply_updates(params, updates)
    return params, state


# ----------------------------------------------------------------------------- Muon


@pytest.mark.parametrize("kw", [
    dict(lr=0.02, weight_decay=0.1),
    dict(lr=0.01, weight_decay=0.0, momentum=0.9, nesterov=False),
    dict(lr=0.02, weight_decay=0.05, adjust_lr_fn="match_rms_adamw", ns_steps=3),
])
def test_muon_follows_torch_optim_muon_for_100_steps(kw):
    params = _shapes_params([(8, 5), (5, 8), (6, 6)])
    grads = _grad_stream(params, STEPS)
    _, ref = _run_torch(torch.optim.Muon, params, grads, **kw)
    ours = optim.muon(kw["lr"], momentum=kw.get("momentum", 0.95), nesterov=kw.get("nesterov", True),
                      weight_decay=kw["weight_decay"], ns_steps=kw.get("ns_steps", 5),
                      adjust_lr_fn=kw.get("adjust_lr_fn"), mask=lambda n, x: True)
    out, _ = _run_ours(ours, params, grads)
    assert _rel(out, ref) <= 1e-5


def test_muon_adam_fallback_follows_torch_adamw_on_the_other_leaves():
    """The default mask: hidden matrices to Muon; embeddings, head and 1-d leaves to AdamW."""
    params = {"embed.weight": torch.randn(10, 6), "blocks.0.fc.weight": torch.randn(12, 6),
              "blocks.0.fc.bias": torch.randn(12), "ln_f.weight": torch.randn(6), "lm_head.weight": torch.randn(10, 6)}
    params = tree.unflatten(params)
    flat = tree.flatten(params)
    grads = [tree.unflatten(g) for g in _grad_stream(flat, STEPS)]
    muon_names = ["blocks.0.fc.weight"]
    adam_names = [n for n in flat if n not in muon_names]
    tp = {k: v.clone().requires_grad_() for k, v in flat.items()}
    tm = torch.optim.Muon([tp[n] for n in muon_names], lr=0.02, weight_decay=0.1)
    ta = torch.optim.AdamW([tp[n] for n in adam_names], lr=3e-3, betas=(0.9, 0.95), weight_decay=0.01)
    for g in grads:
        for k, v in tree.flatten(g).items():
            tp[k].grad = v.clone()
        tm.step()
        ta.step()
    ours = optim.muon(0.02, weight_decay=0.1, adam_learning_rate=3e-3, adam_weight_decay=0.01)
    out, state = _run_ours(ours, params, grads)
    assert set(tree.flatten(state["muon"])) >= {"muon.mu.blocks.0.fc.weight"}
    assert _rel(tree.flatten(out), {k: v.detach() for k, v in tp.items()}) <= 1e-5


def test_orthogonalize_gives_singular_values_near_one():
    g = torch.randn(16, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    s = torch.linalg.svdvals(optim.orthogonalize(g, dtype=None, steps=8))
    assert s.min() > 0.6 and s.max() < 1.25
    q = optim.orthogonalize(g, dtype=None, coefficients=(1.5, -0.5, 0.0), steps=60)  # cubic NS: exactly U Vᵀ
    u, _, vh = torch.linalg.svd(g, full_matrices=False)
    torch.testing.assert_close(q, u @ vh, atol=1e-8, rtol=0)


# ----------------------------------------------------------------------------- Adafactor


@pytest.mark.parametrize("kw", [dict(lr=1e-2), dict(lr=0.05, weight_decay=0.1, d=2.0, beta2_decay=-0.5),
                                dict(lr=1e-2, eps=(1e-30, 1e-3))])
def test_adafactor_follows_torch_optim_adafactor_for_100_steps(kw):
    params = _shapes_params([(8, 5), (5,), (3, 4, 6), ()])
    grads = _grad_stream(params, STEPS)
    _, ref = _run_torch(torch.optim.Adafactor, params, grads, **kw)
    eps1, eps2 = kw.get("eps", (None, 1e-3))
    ours = optim.adafactor(kw["lr"], beta2_decay=kw.get("beta2_decay", -0.8), eps1=eps1, eps2=eps2,
                           d=kw.get("d", 1.0), weight_decay=kw.get("weight_decay", 0.0))
    out, _ = _run_ours(ours, params, grads)
    assert _rel(out, ref) <= 1e-5


def _mlp_pair(make_torch, ours, steps=STEPS):
    """The same small MLP trained by a torch-style optimizer and by ``ours`` (loss-driven gradients)."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
    tnet = copy.deepcopy(net)
    topt = make_torch(tnet.parameters())
    if hasattr(topt, "train"):
        topt.train()
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(1))
    y = torch.randn(64, 4, generator=torch.Generator().manual_seed(2))
    params = {k: v.detach().clone() for k, v in net.named_parameters()}
    loss = lambda p, xb, yb: ((functional_call(net, p, (xb,)) - yb) ** 2).mean()  # noqa: E731
    state = ours.init(params)
    for s in range(steps):
        xb, yb = x[(s % 8) * 8:(s % 8 + 1) * 8], y[(s % 8) * 8:(s % 8 + 1) * 8]
        topt.zero_grad()
        ((tnet(xb) - yb) ** 2).mean().backward()
        topt.step()
        updates, state = ours.update(grad(loss)(params, xb, yb), state, params)
        params = optim.apply_updates(params, updates)
    return params, topt, tnet, state


def test_adafactor_follows_torch_on_an_mlp():
    ours, _, tnet, _ = _mlp_pair(lambda p: torch.optim.Adafactor(p, lr=0.02, weight_decay=0.01),
                                 optim.adafactor(0.02, weight_decay=0.01))
    assert _rel(ours, {k: v.detach() for k, v in tnet.named_parameters()}) <= 1e-5


# ----------------------------------------------------------------------------- schedule-free



@pytest.mark.parametrize("kw", [dict(lr=0.01), dict(lr=0.02, weight_decay=0.1, warmup_steps=10, betas=(0.8, 0.99)),
                                dict(lr=0.01, r=1.0, weight_lr_power=1.0)])
def test_schedule_free_follows_the_reference_for_100_steps(kw):
    params = _shapes_params([(8, 5), (5,)])
    grads = _grad_stream(params, STEPS)
    ref_opt, ref_y = _run_torch(schedulefree.AdamWScheduleFree, params, grads, **kw)
    b1, b2 = kw.get("betas", (0.9, 0.999))
    ours = optim.schedule_free_adamw(kw["lr"], b1, b2, weight_decay=kw.get("weight_decay", 0.0),
                                     warmup_steps=kw.get("warmup_steps", 0), r=kw.get("r", 0.0),
                                     weight_lr_power=kw.get("weight_lr_power", 2.0))
    out, state = _run_ours(ours, params, grads)
    assert _rel(out, ref_y) <= 1e-5  # y: the training point
    ref_opt.eval()  # writes x into the reference's params (tensors in ref_y share storage)
    x = optim.eval_params(state, out)
    assert _rel(x, ref_y) <= 1e-5
    assert _rel(optim.schedule_free_eval_params(state, out), ref_y) <= 1e-5


def test_schedule_free_follows_the_reference_on_an_mlp():
    ours, topt, tnet, state = _mlp_pair(lambda p: schedulefree.AdamWScheduleFree(p, lr=0.01, warmup_steps=5),
                                        optim.schedule_free_adamw(0.01, warmup_steps=5))
    topt.eval()
    ref = {k: v.detach() for k, v in tnet.named_parameters()}
    assert _rel(optim.eval_params(state, ours), ref) <= 1e-5


# ----------------------------------------------------------------------------- EMA


@pytest.mark.parametrize("decay", [0.9, 0.999])
def test_ema_follows_swa_utils_averaged_model(decay):
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    torch.manual_seed(0)
    net = torch.nn.Linear(6, 3)
    avg = AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(decay))
    params = {k: v.detach().clone() for k, v in net.named_parameters()}
    grads = _grad_stream(params, STEPS)
    sgd = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    for g in grads:
        for k, p in net.named_parameters():
            p.grad = g[k].clone()
        sgd.step()
        avg.update_parameters(net)
    out, state = _run_ours(optim.ema(optim.sgd(0.1, momentum=0.9), decay), params, grads)
    assert _rel(out, {k: v.detach() for k, v in net.named_parameters()}) <= 1e-5  # updates are the inner's
    assert _rel(optim.eval_params(state, out), {k: v.detach() for k, v in avg.module.named_parameters()}) <= 1e-5
