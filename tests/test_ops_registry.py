"""Every custom op in aam_func/ops is registered and meets the discipline (DESIGN.md, "Custom ops").

Fails when an op module lacks its registration, its proof note or its reference twin, or when
any check of the public ``aam_func.testing.check_op`` fails on its float64 samples (gradcheck
with forward AD and batched grads, the double-backward contract, jvp and vmap against the
reference, ...): the checks live in aam_func.testing, not here.
"""

import importlib
import pathlib
import re

import pytest
import torch

from aam_func.ops import registry
from aam_func.testing import ALL_CHECKS, COMPILE_CHECKS, check_op

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


def _cases():
    """One case per (op, check). torch.compile is slow on a CPU: CI compiles one tiny op with the
    aot_eager backend; every op under inductor is marked slow."""
    for spec in SPECS:
        for check in ALL_CHECKS:
            if check in COMPILE_CHECKS:
                if spec.name == "rope":
                    yield pytest.param(spec, check, "aot_eager", id=f"{spec.name}-{check}-aot_eager")
                yield pytest.param(spec, check, "inductor", id=f"{spec.name}-{check}", marks=pytest.mark.slow)
            else:
                yield pytest.param(spec, check, None, id=f"{spec.name}-{check}")


@pytest.mark.parametrize("module", MODULES)
def test_every_op_module_registers_an_op(module):
    assert registry.specs_for_module(module), (
        f"aam_func/ops/{module} registers no op; call registry.register(OpSpec(...)) at import time "
        "(see aam_func/ops/registry.py)"
    )


def test_registry_is_not_empty():
    assert "attention" in _ids(SPECS)


@pytest.mark.parametrize("spec", SPECS, ids=_ids(SPECS))
def test_proof_note_and_reference_twin(spec):
    note = ROOT / spec.proof
    assert note.is_file(), f"op {spec.name!r}: proof note {spec.proof} is missing"
    text = note.read_text()
    assert re.search(r"\btest_\w+", text), f"{spec.proof}: claims must name the tests that check them"
    fn = spec.function
    assert spec.reference is not spec.op and spec.reference is not fn.apply, "the reference twin must be separate"
    for args, _ in spec.samples():
        diff = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
        assert all(a.dtype == torch.float64 for a in diff), f"op {spec.name!r}: samples must be float64"


@pytest.mark.parametrize("spec, check, backend", list(_cases()))
def test_op_certified(spec, check, backend):
    """aam_func.testing.check_op, one check at a time: functorch form, op == reference (values,
    grads), gradcheck with forward AD and batched grads, the double-backward contract, jvp,
    vmap (in_dims, nested, of grad and of jvp), non-contiguous and broadcast inputs, bf16
    autocast, torch.compile."""
    kw = {"compile_backend": backend} if backend else {}
    check_op(spec, checks=[check], **kw)


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
