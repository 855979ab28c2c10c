"""The structured result of :func:`aam_func.testing.check_op` and its one readable error."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

__all__ = ["CheckResult", "OpReport", "OpCheckError"]


class OpCheckError(AssertionError):
    """Raised by ``check_op`` (and ``OpReport.raise_if_failed``): lists every failing check.
    ``.report`` holds the :class:`OpReport`."""

    def __init__(self, report: "OpReport"):
        super().__init__(report.summary())
        self.report = report


@dataclass
class CheckResult:
    """One check over every sample. ``status`` is ``"passed"``, ``"failed"`` or ``"skipped"``;
    ``worst`` is the largest ``|op - reference|`` seen (None when the check compares nothing
    numerically, e.g. a contract check); ``detail`` says what failed, on which sample, or why
    the check was skipped; ``notes`` hold things worth knowing that are not failures (graph
    breaks under ``torch.compile``, "double backward not supported")."""

    name: str
    status: str = "passed"
    worst: Optional[float] = None
    detail: str = ""
    notes: list = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return self.status == "passed"

    @property
    def failed(self) -> bool:
        return self.status == "failed"

    def error(self, value: float) -> None:
        self.worst = value if self.worst is None else max(self.worst, value)

    def fail(self, detail: str) -> None:
        if not self.failed:  # the first failure names the sample; later ones add nothing new
            self.status, self.detail = "failed", detail

    def line(self) -> str:
        worst = "" if self.worst is None else f"  worst |op - ref| = {self.worst:.3g}"
        text = f"{self.status.upper():7s} {self.name}{worst}"
        if self.detail:
            text += "\n          " + self.detail.replace("\n", "\n          ")
        for n in self.notes:
            text += "\n          note: " + " ".join(str(n).split())
        return text


@dataclass
class OpReport:
    """What :func:`check_op` found: ``results[check_name] -> CheckResult`` in run order."""

    name: str
    results: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.failures

    @property
    def failures(self) -> list:
        return [r for r in self.results.values() if r.failed]

    @property
    def passed(self) -> list:
        return [r.name for r in self.results.values() if r.passed]

    def __getitem__(self, check: str) -> CheckResult:
        return self.results[check]

    def summary(self) -> str:
        bad = self.failures
        head = f"check_op({self.name}): " + (
            f"{len(bad)} of {len(self.results)} checks failed: {', '.join(r.name for r in bad)}"
            if bad else f"all {len(self.results)} checks passed"
        )
        return "\n".join([head] + ["  " + r.line() for r in self.results.values()])

    __str__ = summary

    def raise_if_failed(self) -> "OpReport":
        if self.failures:
            raise OpCheckError(self)
        return self
