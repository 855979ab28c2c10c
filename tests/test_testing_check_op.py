"""aam_func.testing.check_op: passes on a correct op, and names the failing check on each
deliberately wrong variant (the mutants below), in one readable error."""

import importlib.util
import pathlib
import sys

import pytest
import torch
import torch.nn.functional as F

from aam_func.testing import ALL_CHECKS, OpCheckError, check_op, op_tests

ROOT = pathlib.Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("certify_op", ROOT / "examples" / "certify_op.py")
example = sys.modules["certify_op"] = importlib.util.module_from_spec(_spec)  # dynamo re-imports it
_spec.loader.exec_module(example)

Softplus, reference, samples = example.Softplus, example.reference, example.samples
FAST = [c for c in ALL_CHECKS if c not in ("compile", "compile_grad")]


def _sp(x):
    return x.clamp(min=0) + torch.log1p(torch.exp(-x.abs()))


class WrongBackward(Softplus):
    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * torch.sigmoid(x) * (1 + 1e-3 * x)  # off by a relative 1e-3 x


class WrongJvp(Softplus):
    @staticmethod
    def jvp(ctx, t):
        (x,) = ctx.saved_tensors
        return t * torch.sigmoid(-x)


class MixingVmap(torch.autograd.Function):
    """A hand-written vmap rule that reverses the batch: element i gets element n-1-i's value."""

    @staticmethod
    def forward(x):
        return _sp(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])
        ctx.save_for_forward(inputs[0])

    @staticmethod
    def backward(ctx, g):
        return g * torch.sigmoid(ctx.saved_tensors[0])

    @staticmethod
    def jvp(ctx, t):
        return t * torch.sigmoid(ctx.saved_tensors[0])

    @staticmethod
    def vmap(info, in_dims, x):
        d = in_dims[0]
        if d is None:
            return MixingVmap.apply(x), None
        return MixingVmap.apply(x.flip(d)), d


class NoSetupContext(torch.autograd.Function):
    """The old form: forward takes ctx, so torch.func transforms refuse it."""

    generate_vmap_rule = True

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return _sp(x)

    @staticmethod
    def backward(ctx, g):
        return g * torch.sigmoid(ctx.saved_tensors[0])

    @staticmethod
    def jvp(ctx, t):
        return t * torch.sigmoid(ctx.saved_tensors[0])


class ContiguousOnly(Softplus):
    """Reads its input's storage as if it were contiguous: right only for contiguous inputs."""

    @staticmethod
    def forward(x):
        strides, s = [], 1
        for n in reversed(x.shape):
            strides.insert(0, s)
            s *= n
        return _sp(x.as_strided(x.shape, strides, x.storage_offset()))


def _failed(report):
    return [r.name for r in report.failures]


def test_correct_op_passes_every_check():
    report = check_op(Softplus, reference, samples, checks=FAST)
    assert report.ok and report.passed == FAST
    assert report["values"].worst < 1e-12 and report["jvp"].worst < 1e-12
    assert "all 14 checks passed" in str(report)


def test_compile_checks_pass_and_report_graph_breaks():
    report = check_op(Softplus, reference, samples, checks=["compile", "compile_grad"], compile_backend="aot_eager")
    assert report.ok
    # dynamo cannot trace a Function with a custom jvp whole: the break is reported, not hidden
    assert any("graph break" in n for n in report["compile"].notes)


def _drops_custom_backward(backend):
    from aam_func.testing._op_checks import _compile_drops_custom_backward

    return _compile_drops_custom_backward(backend)


@pytest.mark.slow
def test_compile_checks_inductor():
    """Sample 2 holds x = 0, where softplus's forward autograd (clamp's 1 + abs's 0) is not the
    op's rule sigmoid(0) = 1/2. A torch whose compile(grad) drops the custom backward
    (pytorch/pytorch#193279; torch 2.13 does) is caught there, and the report says why."""
    report = check_op(Softplus, reference, samples, checks=["compile", "compile_grad"], compile_samples=2,
                      raise_on_failure=False)
    assert report["compile"].passed, str(report)
    if _drops_custom_backward("inductor"):
        assert _failed(report) == ["compile_grad"], str(report)
        assert "pytorch/pytorch#193279" in report["compile_grad"].detail
        assert "sample 1:" in report["compile_grad"].detail and "first at (2,)" in report["compile_grad"].detail
    else:
        assert report.ok, str(report)


class StraightThrough(torch.autograd.Function):
    """round(x) with the identity as its backward: the forward's own autograd (zero) is not the
    op's gradient, so a compile(grad) that differentiates the forward gives the wrong answer."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return torch.round(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, g):
        return g


def test_compile_grad_names_the_dropped_backward():
    """check_op's compile_grad compares compiled grad with the reference's gradient; when it
    differs because torch dropped the op's backward, the failure says so."""
    ste_samples = [((torch.tensor([0.2, 1.7, -2.4], dtype=torch.float64).requires_grad_(),), {})]
    report = check_op(StraightThrough, lambda x: x + (torch.round(x) - x).detach(), ste_samples,
                      checks=["compile_grad"], compile_backend="aot_eager", raise_on_failure=False)
    if _drops_custom_backward("aot_eager"):
        assert _failed(report) == ["compile_grad"]
        assert "drops the custom backward" in report["compile_grad"].detail
    else:
        assert report.ok, str(report)


@pytest.mark.parametrize(
    "mutant, expected, spared",
    [
        (WrongBackward, {"grads", "gradcheck", "vmap_grad"}, {"values", "jvp"}),
        (WrongJvp, {"jvp", "vmap_jvp", "gradcheck"}, {"values", "grads", "vmap_grad"}),
        (MixingVmap, {"vmap", "vmap_in_dims", "vmap_nested"}, {"values", "grads", "jvp"}),
        (NoSetupContext, {"functorch_form", "vmap", "vmap_grad", "jvp"}, {"values", "grads"}),
        (ContiguousOnly, {"noncontiguous"}, {"values", "grads", "gradcheck", "jvp"}),
    ],
    ids=["wrong_backward", "wrong_jvp", "mixing_vmap", "no_setup_context", "contiguous_only"],
)
def test_mutant_is_caught_and_named(mutant, expected, spared):
    report = check_op(mutant, reference, samples, checks=FAST, raise_on_failure=False)
    failed = set(_failed(report))
    assert expected <= failed, (failed, str(report))
    assert not (spared & failed), str(report)
    with pytest.raises(OpCheckError) as err:
        check_op(mutant, reference, samples, checks=sorted(expected))
    text = str(err.value)
    assert f"{len(expected)} of {len(expected)} checks failed" in text
    for name in expected:
        assert f"FAILED  {name}" in text
    assert err.value.report.failures


class _SigmoidGrad(torch.autograd.Function):
    """g * sigmoid(x) whose own backward refuses clearly."""

    @staticmethod
    def forward(g, x):
        return g * torch.sigmoid(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, gg):
        raise RuntimeError("softplus: double backward is not supported")


class Once(Softplus):
    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return _SigmoidGrad.apply(g, x)


def test_double_backward_declared_unsupported_needs_a_clear_error():
    ok = check_op(Once, reference, samples, checks=["gradgradcheck"], supports_double_backward=False)
    assert "double backward not supported" in ok["gradgradcheck"].notes[0]
    auto = check_op(Once, reference, samples, checks=["gradgradcheck"])  # undeclared: the clear error passes
    assert auto["gradgradcheck"].notes
    # declared unsupported but it runs: told to declare it, so that gradgradcheck checks it
    bad = check_op(Softplus, reference, samples, checks=["gradgradcheck"], supports_double_backward=False, raise_on_failure=False)
    assert "declare it True" in bad["gradgradcheck"].detail
    with pytest.raises(OpCheckError, match="gradgradcheck"):
        check_op(Once, reference, samples, checks=["gradgradcheck"], supports_double_backward=True)


def test_plain_callable_multi_input_and_kwargs():
    def op(x, w, *, scale):
        return (x @ w) * scale, torch.tanh(x).sum(-1)

    def ref(x, w, *, scale):
        return torch.matmul(x, w) * scale, torch.tanh(x).sum(-1)

    r = lambda *s: torch.randn(*s, dtype=torch.float64).requires_grad_()  # noqa: E731
    report = check_op(op, ref, [((r(3, 4), r(4, 2)), {"scale": 0.5})], checks=FAST)
    assert report["functorch_form"].status == "skipped" and report.ok
    wrong = check_op(op, lambda x, w, scale: ((x @ w) * scale, torch.tanh(x).sum(0)), [((r(3, 4), r(4, 2)), {"scale": 0.5})],
                     checks=["values"], raise_on_failure=False)
    assert "shape" in wrong["values"].detail


def test_forward_ad_off_skips_jvp_checks():
    report = check_op(Softplus, reference, samples, checks=["jvp", "vmap_jvp", "gradcheck"], supports_forward_ad=False)
    assert report["jvp"].status == report["vmap_jvp"].status == "skipped" and report.ok


def test_bad_arguments_are_named():
    x = torch.randn(3, dtype=torch.float64)
    with pytest.raises(ValueError, match="requires_grad"):
        check_op(F.softplus, F.softplus, [((x,), {})])
    with pytest.raises(ValueError, match=r"samples\[0\] must be a pair"):
        check_op(F.softplus, F.softplus, [(x,)])
    with pytest.raises(ValueError, match="non-empty"):
        check_op(F.softplus, F.softplus, [])
    with pytest.raises(ValueError, match="unknown check"):
        check_op(Softplus, reference, samples, checks=["vmapp"])
    with pytest.raises(TypeError, match="function_or_op"):
        check_op(3, reference, samples)
    with pytest.raises(TypeError, match="reference"):
        check_op(Softplus, None, samples)


def test_broken_jvp_in_the_example_is_caught():
    report = check_op(example.BrokenJvp, reference, samples, checks=FAST, raise_on_failure=False)
    assert "jvp" in _failed(report)


# op_tests: one pytest test per check (the example op, the fast checks)
test_example_softplus = op_tests(Softplus, reference, samples, checks=FAST)
