"""``check_op``: certify a custom op (an ``autograd.Function`` or any callable) for torch.func.

    from aam_func.testing import check_op
    report = check_op(MySoftplus, reference=F.softplus, samples=[((x,), {})])   # raises on failure
    report = check_op(spec)                         # an aam_func.ops.registry.OpSpec
    report = check_op(fn, ref, samples, raise_on_failure=False); report.ok; report["jvp"].worst

Each sample is ``(args, kwargs)``; the floating tensors in ``args`` with ``requires_grad=True``
are differentiated, everything else is held fixed. Samples should be tiny and float64 (the
default tolerances, 1e-10, are float64's; gradcheck runs in float64 whatever the sample).
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Optional

import torch
from torch.autograd.gradcheck import GradcheckError

from ._cases import make_cases
from ._op_checks import CHECKS, Options
from ._report import CheckResult, OpReport

__all__ = ["check_op", "op_tests", "ALL_CHECKS", "FORWARD_AD_CHECKS", "COMPILE_CHECKS"]

ALL_CHECKS = ("functorch_form",) + tuple(CHECKS)
FORWARD_AD_CHECKS = ("jvp", "vmap_jvp")
COMPILE_CHECKS = ("compile", "compile_grad")


def _resolve(function_or_op, reference, samples, name, function, fad, dbl):
    """Unpack an OpSpec / a Function subclass / a plain callable into the pieces."""
    from ..ops.registry import OpSpec

    if isinstance(function_or_op, OpSpec):
        spec = function_or_op
        return (spec.call, reference or spec.reference, samples or spec.samples, name or spec.name,
                function or spec.function, spec.supports_forward_ad if fad is None else fad,
                spec.supports_double_backward if dbl is None else dbl)
    if isinstance(function_or_op, type) and issubclass(function_or_op, torch.autograd.Function):
        op, function = function_or_op.apply, function or function_or_op
        name = name or function_or_op.__name__
    elif callable(function_or_op):
        op, name = function_or_op, name or getattr(function_or_op, "__name__", repr(function_or_op))
    else:
        raise TypeError(f"function_or_op must be an OpSpec, a torch.autograd.Function subclass or a callable, got {function_or_op!r}")
    if not callable(reference):
        raise TypeError(f"reference must be a callable with the op's signature, got {reference!r}")
    if samples is None:
        raise ValueError("samples is required (a list of (args, kwargs), or a callable returning one)")
    return op, reference, samples, name, function, True if fad is None else fad, dbl


def _defines(cls: type, attr: str) -> bool:
    """Whether ``cls`` (or a base below autograd.Function) defines ``attr`` itself."""
    base = set(torch.autograd.Function.__mro__)
    return any(attr in vars(c) for c in cls.__mro__ if c not in base)


def _functorch_form(function: type, fad: bool, res: CheckResult) -> None:
    missing = []
    if not _defines(function, "setup_context"):
        missing.append("setup_context (forward must not take ctx: torch.func transforms need the functorch form)")
    if not (getattr(function, "generate_vmap_rule", False) or _defines(function, "vmap")):
        missing.append("a vmap rule (generate_vmap_rule = True or a vmap staticmethod)")
    if fad and not _defines(function, "jvp"):
        missing.append("jvp (the op claims forward AD; pass supports_forward_ad=False if it has none)")
    if missing:
        res.fail(f"{function.__name__} lacks " + "; ".join(missing))


def _selected(checks, skip, function, fad) -> list:
    names = list(ALL_CHECKS if checks is None else checks)
    unknown = [c for c in list(names) + list(skip or ()) if c not in ALL_CHECKS]
    if unknown:
        raise ValueError(f"unknown check(s) {unknown}; known: {list(ALL_CHECKS)}")
    return [c for c in names if c not in set(skip or ())]


def check_op(
    function_or_op: Any,
    reference: Optional[Callable] = None,
    samples: Any = None,
    *,
    checks: Optional[Iterable[str]] = None,
    skip: Iterable[str] = (),
    function: Optional[type] = None,
    name: Optional[str] = None,
    supports_forward_ad: Optional[bool] = None,
    supports_double_backward: Optional[bool] = None,
    rtol: float = 1e-10,
    atol: float = 1e-10,
    bf16_rtol: float = 3e-2,
    bf16_atol: float = 3e-2,
    compile_backend: str = "inductor",
    compile_samples: int = 1,
    seed: int = 0,
    raise_on_failure: bool = True,
) -> OpReport:
    """Run every check (or ``checks``, minus ``skip``) of the op against ``reference`` on each
    sample; return an :class:`OpReport` and, unless ``raise_on_failure=False``, raise one
    :class:`OpCheckError` (an ``AssertionError``) listing every failing check.

    Checks (see ``ALL_CHECKS``): ``functorch_form`` (when the Function is known: setup_context,
    a vmap rule, jvp); ``values`` and ``grads`` against the reference; ``gradcheck`` (float64,
    ``check_forward_ad``, ``check_batched_grad``); ``gradgradcheck`` (``supports_double_backward``
    True: gradgradcheck; False: double backward must raise a clear error; None: either, the error
    noted); ``jvp``; ``vmap``, ``vmap_in_dims`` (batched along the last dim, other inputs
    unbatched), ``vmap_nested``, ``vmap_grad``, ``vmap_jvp``, each against a loop over the
    reference; ``noncontiguous`` and ``broadcast`` (stride-0) inputs; ``autocast_bf16`` (float32
    inputs under bf16 autocast against the float64 reference, ``|op - ref| <= bf16_atol +
    bf16_rtol |ref|``); ``compile`` and ``compile_grad`` (``torch.compile`` with
    ``compile_backend``, fullgraph where possible, graph breaks noted; on the first
    ``compile_samples`` samples). ``supports_forward_ad=False`` skips the jvp checks.
    """
    op, reference, samples, name, function, fad, dbl = _resolve(
        function_or_op, reference, samples, name, function, supports_forward_ad, supports_double_backward)
    names = _selected(checks, skip, function, fad)
    cases = make_cases(op, reference, samples)
    opt = Options(rtol, atol, bf16_rtol, bf16_atol, compile_backend, fad, dbl, seed)
    report = OpReport(name)
    for check in names:
        res = report.results[check] = CheckResult(check)
        if check == "functorch_form":
            if function is None:
                res.status, res.detail = "skipped", "no autograd.Function given (pass function=...)"
            else:
                _functorch_form(function, fad, res)
            continue
        if check in FORWARD_AD_CHECKS and not fad:
            res.status, res.detail = "skipped", "the op declares supports_forward_ad=False"
            continue
        run_on = cases[:compile_samples] if check in COMPILE_CHECKS else cases
        for case in run_on:
            try:
                CHECKS[check](case, res, opt)
            except Exception as e:  # noqa: BLE001 - every failure is reported, not raised here
                first = str(e).strip().splitlines() or [""]
                keep = 1 if isinstance(e, GradcheckError) else 4
                text = "\n".join(first[:keep]) + (" ..." if len(first) > keep else "")
                res.fail(f"sample {case.index}: {type(e).__name__}: {text}")
                break
    if raise_on_failure:
        report.raise_if_failed()
    return report


def op_tests(function_or_op: Any, reference: Optional[Callable] = None, samples: Any = None, *,
             checks: Optional[Iterable[str]] = None, marks: Optional[dict] = None, **kwargs) -> Callable:
    """A pytest test function parametrized over the checks: one test per check.

        test_my_softplus = op_tests(MySoftplus, F.softplus, samples, marks={"compile": pytest.mark.slow})

    ``marks`` maps a check name to a pytest mark (or a list of marks) for that case; other
    keyword arguments go to :func:`check_op`.
    """
    import pytest

    names = list(ALL_CHECKS if checks is None else checks)
    _selected(names, (), None, True)
    marks = marks or {}

    def mark_list(c):
        m = marks.get(c, ())
        return list(m) if isinstance(m, (list, tuple)) else [m]

    params = [pytest.param(c, id=c, marks=mark_list(c)) for c in names]

    @pytest.mark.parametrize("check", params)
    def test(check):
        report = check_op(function_or_op, reference, samples, checks=[check], raise_on_failure=False, **kwargs)
        if report[check].status == "skipped":
            pytest.skip(report[check].detail)
        report.raise_if_failed()

    return test
