"""The doctor's results: a ``Finding`` per check, the ``Diagnosis`` for one name, and the
``Report`` that collects findings while the diagnosis runs.

Owns: the verdict vocabulary (``Verdict``) and the rule that the first failing check names
the verdict. Must not know: how findings are observed or worded (``probe``, ``judge``), nor how
they are shown (``render``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from . import render

Verdict = Literal[
    "ok",
    "dns_not_here",
    "port_closed",
    "tls_terminated_in_front",
    "proxy_protocol_mismatch",
    "not_edgeproxy",
    "http01_unreachable",
    "error",
]


@dataclass(frozen=True, slots=True)
class Finding:
    """One check: what was observed (``detail``) and, if it failed, what to change (``fix``)."""

    check: str
    ok: bool
    detail: str
    fix: str | None = None


@dataclass(frozen=True, slots=True)
class Diagnosis:
    """The answer for one name: a verdict naming the first thing to fix, and every finding."""

    name: str
    verdict: Verdict
    findings: tuple[Finding, ...]
    port: int = 443

    @property
    def ok(self) -> bool:
        return self.verdict == "ok"

    @property
    def summary(self) -> str:
        return render.summary(self)

    def to_json(self) -> dict[str, Any]:
        """The ``--json`` document; keys are stable, ``fix`` is null on passing checks."""
        return render.to_json(self)

    def render(self) -> str:
        """Human output: one line per check (OK/FAIL), its fix indented below, then the verdict."""
        return render.render_text(self)


@dataclass
class Report:
    findings: list[Finding] = field(default_factory=list)
    verdict: Verdict | None = None

    def add(self, finding: Finding, verdict: Verdict | None = None) -> None:
        """Record a finding; the first non-ok verdict reported becomes the diagnosis'."""
        self.findings.append(finding)
        if verdict is not None and verdict != "ok" and self.verdict is None:
            self.verdict = verdict
