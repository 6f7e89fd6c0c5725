"""How a ``Diagnosis`` reads: the one-line summary per verdict, the text report, the JSON.

Owns: every word of the output that is not a finding's own. Must not know: how a verdict is
reached.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    from .report import Diagnosis

SUMMARY: Final[Mapping[str, str]] = {
    "ok": "the CA can reach edgeproxy of this deployment for {name} over TLS-ALPN-01",
    "dns_not_here": "{name} does not point at this deployment",
    "port_closed": "TCP {port} does not answer at an address the CA would use for {name}",
    "tls_terminated_in_front": "something in front of edgeproxy terminates TLS",
    "proxy_protocol_mismatch": "the load balancer's and edgeproxy's PROXY protocol settings differ",
    "not_edgeproxy": "the server reached is not an edgeproxy reading this deployment's storage",
    "http01_unreachable": "the CA cannot fetch edgeproxy's HTTP-01 answer for {name} on port 80",
    "error": "the diagnosis could not finish or the result is ambiguous",
}


def summary(diagnosis: Diagnosis) -> str:
    return SUMMARY[diagnosis.verdict].format(name=diagnosis.name, port=diagnosis.port)


def to_json(diagnosis: Diagnosis) -> dict[str, Any]:
    """The ``--json`` document; keys are stable, ``fix`` is null on passing checks."""
    return {
        "name": diagnosis.name,
        "port": diagnosis.port,
        "verdict": diagnosis.verdict,
        "ok": diagnosis.ok,
        "summary": summary(diagnosis),
        "findings": [
            {"check": f.check, "ok": f.ok, "detail": f.detail, "fix": f.fix}
            for f in diagnosis.findings
        ],
    }


def render_text(diagnosis: Diagnosis) -> str:
    """One line per check (OK/FAIL), its fix indented below, then the verdict."""
    width = max((len(f.check) for f in diagnosis.findings), default=0)
    lines = [f"edgeproxy doctor {diagnosis.name} (port {diagnosis.port})"]
    for f in diagnosis.findings:
        mark = "OK  " if f.ok else "FAIL"
        lines.append(f"  {mark} {f.check:<{width}}  {f.detail}")
        if f.fix:
            lines.append(f"       {'':<{width}}  fix: {f.fix}")
    status = "OK" if diagnosis.ok else "FAIL"
    lines.append(f"verdict: {status}: {diagnosis.verdict}: {summary(diagnosis)}")
    return "\n".join(lines)
