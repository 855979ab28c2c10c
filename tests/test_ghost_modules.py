"""Issue 16 deliverable 3: per-example gradients, ghost norms and DP on any nn.Module and any
params pytree: conv weights factored (unfold form) where exact, the rest exact through vmap,
BatchNorm refused by name; parity with a Python loop and with Opacus. Proof: proofs/ghost_modules.md."""

import collections
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils._pytree as pytree
from torch.func import functional_call

from aam_func import per_sample as ps

B = 5


def _loop(loss, params, batch):
    return [torch.func.grad(loss)(params, {k: v[i : i + 1] for k, v in batch.items()}) for i in range(B)]


def _norms(grads):
    return torch.stack([torch.cat([x.flatten() for x in pytree.tree_leaves(g)]).norm() for g in grads])


def _max_diff(a, b):
    pairs = list(zip(pytree.tree_leaves(a), pytree.tree_leaves(b)))
    assert all((x is None) == (y is None) for x, y in pairs)
    return max((x - y).abs().max().item() for x, y in pairs if x is not None)


def _module_loss(model):
    return lambda p, b: F.cross_entropy(functional_call(model, p, (b["x"],)), b["y"])


def _params(model):
    return {k: v.detach() for k, v in model.named_parameters()}


class Scale(nn.Module):
    """A custom layer: its parameter is used by a plain multiply (exact route)."""

    def __init__(self, n):
        super().__init__()
        self.s = nn.Parameter(torch.linspace(0.5, 1.5, n))

    def forward(self, x):
        return x * self.s.view(1, -1, *([1] * (x.dim() - 2)))


CONV2D = {
    "3x3": dict(kernel_size=3),
    "stride 2, padding 1": dict(kernel_size=3, stride=2, padding=1),
    "(3, 2) kernel, dilation (2, 1), padding (1, 2)": dict(kernel_size=(3, 2), dilation=(2, 1), padding=(1, 2)),
    "padding same": dict(kernel_size=3, padding="same"),
    "even kernel, padding same, dilation 2": dict(kernel_size=4, padding="same", dilation=2),
    "padding valid, no bias": dict(kernel_size=2, padding="valid", bias=False),
    "reflect padding": dict(kernel_size=3, padding=1, padding_mode="reflect"),
    "groups 3 (exact route)": dict(kernel_size=3, groups=3),
}
CONV1D = {
    "k3": dict(kernel_size=3),
    "k4 stride 2 padding 2 dilation 2": dict(kernel_size=4, stride=2, padding=2, dilation=2),
    "k4 padding same": dict(kernel_size=4, padding="same"),
}


def _conv_model(nd, kw):
    torch.manual_seed(0)
    conv = (nn.Conv2d if nd == 2 else nn.Conv1d)(3, 6, **kw)
    pool = nn.AdaptiveAvgPool2d(2) if nd == 2 else nn.AdaptiveAvgPool1d(2)
    return nn.Sequential(conv, nn.GroupNorm(2, 6), Scale(6), nn.ReLU(), pool, nn.Flatten(),
                         nn.Linear(6 * 2 ** nd, 4)).double()


def _check(model, batch, ghost, *, tol=1e-10):
    params, loss = _params(model), _module_loss(model)
    assert ps.ghost.discover(loss, params, batch).ghost == ghost
    ref = _loop(loss, params, batch)
    ref_norms = _norms(ref)
    C = 0.7 * ref_norms.median().item()
    w = (C / (ref_norms + ps.CLIP_EPS)).clamp(max=1)
    want = pytree.tree_map(lambda *xs: sum(w[i] * xs[i] for i in range(B)), *ref)
    for chunk, method in ((1, "ghost"), (2, "ghost"), (B, "ghost"), (2, "vmap")):
        if True:
            got = ps.grads(loss, params, batch, method=method, chunk_size=chunk)
            for i in range(B):
                assert _max_diff({k: v[i] for k, v in got.items()}, ref[i]) <= tol, (method, chunk, i)
            n = ps.norms(loss, params, batch, method=method, chunk_size=chunk)
            torch.testing.assert_close(n, ref_norms.float(), rtol=1e-5, atol=1e-7)
            clipped = ps.clipped_sum(loss, params, batch, C, method=method, chunk_size=chunk)
            assert _max_diff(clipped.sum, want) <= 1e-5 * C, (method, chunk)


@pytest.mark.parametrize("case", sorted(CONV2D))
def test_conv2d_forms_equal_vmap_and_the_loop_at_chunks_1_2_B(case):
    model = _conv_model(2, CONV2D[case])
    g = torch.Generator().manual_seed(1)
    batch = {"x": torch.randn(B, 3, 7, 8, generator=g, dtype=torch.float64), "y": torch.randint(0, 4, (B,), generator=g)}
    ghost = {"6.weight"} if "groups" in case else {"0.weight", "6.weight"}
    _check(model, batch, ghost)


@pytest.mark.parametrize("case", sorted(CONV1D))
def test_conv1d_forms_equal_vmap_and_the_loop_at_chunks_1_2_B(case):
    model = _conv_model(1, CONV1D[case])
    g = torch.Generator().manual_seed(2)
    batch = {"x": torch.randn(B, 3, 11, generator=g, dtype=torch.float64), "y": torch.randint(0, 4, (B,), generator=g)}
    _check(model, batch, {"0.weight", "6.weight"})


def test_transformers_conv1d_embedding_and_norm_layers_of_one_module():
    transformers = pytest.importorskip("transformers")

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(13, 8, padding_idx=0)
            self.c_fc = transformers.pytorch_utils.Conv1D(16, 8)
            self.ln = nn.LayerNorm(16)
            self.rms = nn.RMSNorm(16)
            self.head = nn.Linear(16, 3)

        def forward(self, ids):
            return self.head(self.rms(self.ln(torch.tanh(self.c_fc(self.emb(ids)))))).mean(1)

    torch.manual_seed(0)
    model = Net()
    with torch.no_grad():  # Conv1D leaves its initialisation to the pretrained model's init
        model.c_fc.weight.normal_(0, 0.3), model.c_fc.bias.normal_(0, 0.1)
    model = model.double()
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 13, (B, 6), generator=g)
    ids[:, -1] = 0
    _check(model, {"x": ids, "y": torch.randint(0, 3, (B,), generator=g)}, {"emb.weight", "c_fc.weight", "head.weight"})


# ----------------------------------------------------------------------------- the CNN


def cnn():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.ReLU(), nn.AvgPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.GroupNorm(4, 16), nn.ReLU(), nn.AvgPool2d(2),
        nn.Flatten(), nn.Linear(64, 10),
    )


def _digits_like(n=B, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"x": torch.rand(n, 1, 8, 8, generator=g) * 16, "y": torch.randint(0, 10, (n,), generator=g)}


@pytest.mark.parametrize("method", ["auto", "ghost", "vmap"])
def test_cnn_per_sample_grads_equal_a_python_loop(method):
    model = cnn()
    params, loss, batch = _params(model), _module_loss(model), _digits_like()
    ref = _loop(loss, params, batch)
    got = ps.grads(loss, params, batch, method=method)
    assert list(got) == list(params)  # the named_parameters() dict comes back as it went in
    for i in range(B):
        assert _max_diff({k: v[i] for k, v in got.items()}, ref[i]) <= 1e-5


def test_cnn_clipped_sum_and_ghost_norms_equal_opacus():
    opacus = pytest.importorskip("opacus")
    model, batch = cnn(), _digits_like(8, seed=4)
    gsm = opacus.GradSampleModule(copy.deepcopy(model), loss_reduction="sum")
    F.cross_entropy(gsm(batch["x"]), batch["y"], reduction="sum").backward()
    samples = {n: p.grad_sample for n, p in gsm._module.named_parameters()}
    want_norms = torch.cat([v.reshape(8, -1) for v in samples.values()], 1).norm(dim=1)
    C = 0.5 * want_norms.median().item()
    w = (C / (want_norms + 1e-6)).clamp(max=1)  # Opacus's clip factor
    want_sum = {n: torch.einsum("i,i...->...", w, v) for n, v in samples.items()}
    params, loss = _params(model), _module_loss(model)
    for method in ("ghost", "vmap"):
        torch.testing.assert_close(ps.norms(loss, params, batch, method=method), want_norms, rtol=1e-5, atol=1e-6)
        got = ps.clipped_sum(loss, params, batch, C, method=method)
        for n in params:
            torch.testing.assert_close(got.sum[n], want_sum[n], rtol=1e-4, atol=1e-6)


def test_batchnorm_is_refused_with_its_name_and_the_fix_on_every_route():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(144, 10))
    params, loss, batch = _params(model), _module_loss(model), _digits_like()
    for call in (lambda m: ps.grads(loss, params, batch, method=m), lambda m: ps.norms(loss, params, batch, method=m),
                 lambda m: ps.clipped_sum(loss, params, batch, 1.0, method=m)):
        for method in ("ghost", "vmap"):
            with pytest.raises(ValueError, match=r"BatchNorm layer '1' .*nn\.GroupNorm"):
                call(method)
    with pytest.raises(ValueError, match=r"BatchNorm layer '1'"):
        ps.grads(loss, params, batch)  # auto
    model.eval()  # running statistics: a per-channel affine map, each example alone
    ref = _loop(loss, params, batch)
    got = ps.grads(loss, params, batch)
    assert _max_diff({k: v[3] for k, v in got.items()}, ref[3]) <= 1e-5


def test_batchnorm_without_affine_is_refused_without_a_name():
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 4), nn.BatchNorm1d(4, affine=False))
    with pytest.raises(ValueError, match=r"a BatchNorm layer \(F\.batch_norm in training mode\).*GroupNorm"):
        ps.norms(_module_loss(model), _params(model), _digits_like())


# ----------------------------------------------------------------------------- any pytree

Pair = collections.namedtuple("Pair", "conv head")


def _pytree_forms(named):
    """form -> (params in that form, to the named dict, from a named dict to that form)."""
    names = list(named)

    def to_nested(d):
        return {"conv": {"w": d["0.weight"], "b": d["0.bias"]}, "head": {"w": d["3.weight"], "b": None}}

    def from_nested(p):
        return {"0.weight": p["conv"]["w"], "0.bias": p["conv"]["b"], "3.weight": p["head"]["w"], "3.bias": named["3.bias"]}

    return {
        "named_parameters dict": (lambda p: p, lambda d: d),
        "list": (lambda p: dict(zip(names, p)), lambda d: [d[n] for n in names]),
        "tuple": (lambda p: dict(zip(names, p)), lambda d: tuple(d[n] for n in names)),
        "nested dict with a None leaf": (from_nested, to_nested),
        "namedtuple of lists": (lambda p: dict(zip(names, [*p.conv, *p.head])),
                                lambda d: Pair([d[n] for n in names[:2]], [d[n] for n in names[2:]])),
    }


@pytest.mark.parametrize("form", ["named_parameters dict", "list", "tuple", "nested dict with a None leaf",
                                  "namedtuple of lists"])
def test_params_as_any_pytree_come_back_in_their_structure(form):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(108, 10))
    named = _params(model)
    to_named, from_named = _pytree_forms(named)[form]
    params = from_named(named)
    loss = lambda p, b: _module_loss(model)(to_named(p), b)  # noqa: E731
    batch = _digits_like()
    ref_named = _loop(_module_loss(model), named, batch)
    ref = [from_named(r) for r in ref_named]  # "3.bias" is not a param of the None form
    spec = pytree.tree_structure(params)
    for method in ("auto", "ghost", "vmap"):
        got = ps.grads(loss, params, batch, method=method, chunk_size=2)
        assert pytree.tree_structure(got) == spec, method
        for i in range(B):
            assert _max_diff(pytree.tree_map(lambda v: None if v is None else v[i], got), ref[i]) <= 1e-5, (method, i)
    ref_norms = _norms([{k: v for k, v in r.items() if form != "nested dict with a None leaf" or k != "3.bias"}
                        for r in ref_named])
    for method in ("ghost", "vmap"):
        torch.testing.assert_close(ps.norms(loss, params, batch, method=method), ref_norms, rtol=1e-5, atol=1e-6)
        assert pytree.tree_structure(ps.clipped_sum(loss, params, batch, 1.0, method=method).sum) == spec
    assert pytree.tree_structure(ps.clipped_sum(loss, params, {k: v[:0] for k, v in batch.items()}, 1.0).sum) == spec


def test_a_non_tensor_leaf_is_an_error_naming_its_path():
    params = {"blocks": [{"w": torch.zeros(2, 2)}, {"w": 3.0}]}
    for call in (ps.grads, ps.norms, lambda *a: ps.clipped_sum(*a, 1.0), ps.losses):
        with pytest.raises(TypeError, match=r"params leaf 'blocks\.1\.w' is a float, expected a tensor"):
            call(lambda p, b: b["x"].sum(), params, {"x": torch.zeros(2, 2)})


@pytest.mark.slow  # ~2 s of work, but 20-30 s measured on the shared machine (imports under load)
def test_cnn_dp_example_runs_and_reports_accuracy_and_epsilon(monkeypatch, capsys):
    pytest.importorskip("sklearn")
    import importlib.util
    import pathlib
    import sys

    path = pathlib.Path(__file__).resolve().parents[1] / "examples" / "cnn_dp.py"
    spec = importlib.util.spec_from_file_location("cnn_dp_example", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    monkeypatch.setattr(sys, "argv", ["cnn_dp.py", "--epochs", "0.1", "--batch-size", "32"])
    example.main()
    out = capsys.readouterr().out
    assert "5 steps" in out and "final test accuracy" in out and "ε=4.00" in out


def test_nn_functionalize_pieces_work_with_every_route_and_batchnorm_is_refused_there_too():
    from aam_func import nn as afnn

    model = cnn()
    apply, params, buffers = afnn.functionalize(model)
    loss = lambda p, b: F.cross_entropy(apply(p, buffers, b["x"])[0], b["y"])  # noqa: E731
    batch = _digits_like()
    ref = _loop(_module_loss(model), _params(model), batch)
    for method in ("auto", "vmap"):
        got = ps.grads(loss, params, batch, method=method)
        for i in range(B):
            assert _max_diff({k: v[i] for k, v in got.items()}, ref[i]) <= 1e-5, method
    torch.testing.assert_close(ps.norms(loss, params, batch), _norms(ref), rtol=1e-5, atol=1e-6)
    bn = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(144, 10))
    apply, params, buffers = afnn.functionalize(bn)
    loss = lambda p, b: F.cross_entropy(apply(p, buffers, b["x"])[0], b["y"])  # noqa: E731
    for method in ("ghost", "vmap"):
        with pytest.raises(ValueError, match=r"BatchNorm layer '1' .*GroupNorm"):
            ps.clipped_sum(loss, params, batch, 1.0, method=method)
    assert int(buffers["1.num_batches_tracked"]) == 0  # the caller's buffers are never written
