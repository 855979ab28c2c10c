"""Every custom op in aam_func/ops is registered and meets the discipline (DESIGN.md, "Custom ops").

Fails when an op module lacks its registration, its proof note, its reference twin, or when
gradcheck (with forward AD and batched grads), the double-backward contract, or
vmap(grad(op)) == vmap(grad(reference)) does not hold on its float64 samples.
"""

import importlib
import pathlib
import re

import pytest
import torch
from torch.func import grad, vmap

from aam_func.ops import registry

ROOT = pathlib.Path(__file__).resolve().parents[1]
OPS_DIR = ROOT / "aam_func" / "ops"
MODULES = sorted(
    [p.stem for p in OPS_DIR.glob("*.py") if not p.stem.startswith("_") and p.stem != "registry"]
    + [p.parent.name for p in OPS_DIR.glob("*/__init__.py") if not p.parent.name.startswith("_")]
)
for _m in MODULES:
    importlib.import_module(f"aam_func.ops.{_m}")
SPECS = registry.all_specs()


def _ids(specs):
    return [s.name for s in specs]


def _split(args):
    """Indices of the differentiated inputs: floating tensors that require grad."""
    return [i for i, a in enumerate(args) if isinstance(a, torch.Tensor) and a.is_floating_point() and a.requires_grad]


def _bind(fn, args, kwargs, diff):
    def call(*xs):
        full = list(args)
        for i, x in zip(diff, xs):
            full[i] = x
        return fn(*full, **kwargs)

    return call


def _tensors(out):
    return (out,) if isinstance(out, torch.Tensor) else tuple(o for o in out if isinstance(o, torch.Tensor))


def _samples(spec):
    samples = spec.samples()
    assert samples, f"op {spec.name!r}: samples() returned nothing"
    for args, kwargs in samples:
        diff = _split(args)
        assert diff, f"op {spec.name!r}: a sample has no floating input with requires_grad=True"
        assert all(args[i].dtype == torch.float64 for i in diff), f"op {spec.name!r}: samples must be float64"
        yield args, kwargs, diff


@pytest.mark.parametrize("module", MODULES)
def test_every_op_module_registers_an_op(module):
    assert registry.specs_for_module(module), (
        f"aam_func/ops/{module} registers no op; call registry.register(OpSpec(...)) at import time "
        "(see aam_func/ops/registry.py)"
    )


def test_registry_is_not_empty():
    assert "attention" in _ids(SPECS)


@pytest.mark.parametrize("spec", SPECS, ids=_ids(SPECS))
def test_proof_note_and_functorch_form(spec):
    note = ROOT / spec.proof
    assert note.is_file(), f"op {spec.name!r}: proof note {spec.proof} is missing"
    text = note.read_text()
    assert re.search(r"\btest_\w+", text), f"{spec.proof}: claims must name the tests that check them"
    fn = spec.function
    assert "setup_context" in vars(fn), f"{fn.__name__} must use the functorch form (setup_context)"
    assert getattr(fn, "generate_vmap_rule", False) or "vmap" in vars(fn), f"{fn.__name__} needs a vmap rule"
    if spec.supports_forward_ad:
        assert "jvp" in vars(fn), f"{fn.__name__} claims forward AD but defines no jvp"
    assert spec.reference is not spec.op and spec.reference is not fn.apply, "the reference twin must be separate"


@pytest.mark.parametrize("spec", SPECS, ids=_ids(SPECS))
def test_op_equals_reference(spec):
    for args, kwargs, diff in _samples(spec):
        op, ref = _bind(spec.call, args, kwargs, diff), _bind(spec.reference, args, kwargs, diff)
        xs = [args[i] for i in diff]
        outs_op, outs_ref = _tensors(op(*xs)), _tensors(ref(*xs))
        assert len(outs_op) == len(outs_ref)
        for a, b in zip(outs_op, outs_ref):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
        cot = [torch.randn_like(o) for o in outs_op]
        g_op = torch.autograd.grad(outs_op, xs, cot, allow_unused=True)
        g_ref = torch.autograd.grad(outs_ref, xs, cot, allow_unused=True)
        for a, b in zip(g_op, g_ref):
            if a is None or b is None:
                assert a is None and b is None or (a if b is None else b).abs().max() == 0
                continue
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("spec", SPECS, ids=_ids(SPECS))
def test_gradcheck_forward_ad_and_batched_grad(spec):
    for args, kwargs, diff in _samples(spec):
        op = _bind(spec.call, args, kwargs, diff)
        xs = tuple(args[i] for i in diff)
        assert torch.autograd.gradcheck(op, xs, check_forward_ad=spec.supports_forward_ad, check_batched_grad=True)


@pytest.mark.parametrize("spec", SPECS, ids=_ids(SPECS))
def test_double_backward_supported_or_clear_error(spec):
    for args, kwargs, diff in _samples(spec):
        op = _bind(spec.call, args, kwargs, diff)
        xs = tuple(args[i] for i in diff)
        if spec.supports_double_backward:
            assert torch.autograd.gradgradcheck(op, xs)
            continue
        out = _tensors(op(*xs))
        try:
            gs = torch.autograd.grad(sum((o * o).sum() for o in out), xs, create_graph=True, allow_unused=True)
            total = sum(g.sum() for g in gs if g is not None)
            assert isinstance(total, torch.Tensor) and total.requires_grad, (
                f"op {spec.name!r}: first-order grads carry no graph, so double backward fails obscurely; "
                "mark the backward @once_differentiable or raise a clear error"
            )
            torch.autograd.grad(total, xs, allow_unused=True)
        except RuntimeError as e:
            assert re.search(r"(?i)double backward|differentiate twice|not supported", str(e)), str(e)
        else:
            pytest.fail(f"op {spec.name!r}: double backward ran; set supports_double_backward=True so gradgradcheck checks it")


@pytest.mark.parametrize("spec", SPECS, ids=_ids(SPECS))
def test_vmap_grad_equals_reference(spec):
    g = torch.Generator().manual_seed(0)
    for args, kwargs, diff in _samples(spec):
        # a batch of two: each differentiated input and a perturbed copy; other tensors shared
        batched = [torch.stack([args[i].detach(), args[i].detach() + 0.01 * torch.randn(args[i].shape, generator=g, dtype=args[i].dtype)]) for i in diff]
        cots = [torch.randn(o.shape, generator=g, dtype=o.dtype) for o in _tensors(spec.call(*args, **kwargs))]

        def loss(fn):
            bound = _bind(fn, args, kwargs, diff)
            return lambda *xs: sum((o * c).sum() for o, c in zip(_tensors(bound(*xs)), cots))

        argnums = tuple(range(len(diff)))
        g_op = vmap(grad(loss(spec.call), argnums=argnums))(*batched)
        g_ref = vmap(grad(loss(spec.reference), argnums=argnums))(*batched)
        for a, b in zip(g_op, g_ref):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_register_rejects_non_functions_and_duplicates():
    with pytest.raises(TypeError, match="autograd.Function"):
        registry.OpSpec(name="x", function=object, reference=lambda: 0, proof="proofs/x.md", samples=list)
    spec = registry.get("attention")

    class Other(torch.autograd.Function):  # defined in this test module, not aam_func.ops.attention.kernel
        @staticmethod
        def forward(x):
            return x

    with pytest.raises(ValueError, match="already registered"):
        registry.register(registry.OpSpec(name="attention", function=Other, reference=spec.reference, proof=spec.proof, samples=spec.samples))
    with pytest.raises(KeyError, match="no op named"):
        registry.get("does-not-exist")
