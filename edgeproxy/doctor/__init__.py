"""``edgeproxy doctor NAME``: can the CA reach this deployment's TLS-ALPN-01 answer for NAME?

(And, with HTTP-01 in ``acme.challenges``, its HTTP-01 answer on port 80: a self-test token
published the same way under the HTTP-01 key and fetched with Host = NAME.)

Owns: the onboarding diagnosis of one custom domain, end to end, as the CA would see it:
the customer's DNS (does NAME point at ``onboarding.target``?), the TCP path to port 443, and
a real ``acme-tls/1`` handshake carrying SNI = NAME that only an edgeproxy reading *this*
deployment's storage can answer correctly. The verdict names the first thing to fix; every
finding says what was observed and, when it failed, how to fix it.

Must not know: how the data path builds its answer (we only read the certificate it sends),
ACME accounts or orders, log files on remote machines. Like ``cli.py`` it may assemble storage
from a config (``doctor_command``); ``diagnose`` receives everything it needs.

Theory of operation
-------------------
The proof that a connection reached *us* is a self-test token: a random key authorization is
published with ``Storage.put_challenge(NAME, ...)``, exactly as the ACME issuer does, so any
replica sharing the storage answers ``acme-tls/1`` for NAME with the RFC 8737 certificate
whose critical acmeIdentifier extension holds SHA-256 of that key authorization. A TLS
terminator in front cannot produce that digest; a replica with other storage, or another ACME
client, produces a different one (or refuses the name). If a real validation for NAME is
pending, its key authorization is used instead and storage is left untouched: overwriting it
would fail a live issuance.

Observation is kept apart from judgement. The network code records what happened
(``DnsAnswer``, ``TlsAttempt``: bytes received, alert, ALPN, certificate); the ``judge_*``
functions are pure and turn observations into findings, so every verdict has a unit test.

PROXY protocol: an edgeproxy expecting a PROXY header checks the first byte and hangs up on a
bare ClientHello without sending anything. So when the plain attempt is met with silence we
try again with a PROXY v2 header (then v1) in front of the ClientHello; a TLS answer then
proves the mismatch. Silence either way is what a load balancer that *sends* PROXY headers to
an edgeproxy with ``proxy_protocol = "off"`` looks like, but also a balancer with no healthy
target: from outside both are a closed connection, so the finding names both and how to tell.

The package, one job per module (each imports only modules listed before it; ``render``
names ``Diagnosis`` for type hints only):

- ``render``: the summary line per verdict, the text report and the ``--json`` document;
  ``report``: ``Verdict``, ``Finding``, ``Diagnosis`` and the ``Report`` collecting findings.
- ``resolve``: DNS observation (``DnsAnswer``, ``resolve_chain``).
- ``probe``: network observation (``TlsAttempt``, ``probe_tls``, the HTTP-01 fetch).
- ``judge``: the pure judgements (``judge_dns``, ``judge_tls``, ``judge_silence``,
  ``judge_http01``) and every finding's wording.
- ``selftest``: publishing and withdrawing the self-test token in storage.
- ``diagnose``: the order of the checks for one name; ``command``: the CLI entry.
"""

from __future__ import annotations

from .command import doctor_command, parse_nameserver
from .diagnose import diagnose
from .judge import DnsJudgement, dns_fix, judge_dns, judge_http01, judge_silence, judge_tls
from .probe import TlsAttempt, alert_from_openssl_reason, probe_tls
from .report import Diagnosis, Finding, Verdict
from .resolve import DnsAnswer, resolve_chain
from .selftest import SELF_TEST_TTL

__all__ = [
    "SELF_TEST_TTL",
    "Diagnosis",
    "DnsAnswer",
    "DnsJudgement",
    "Finding",
    "TlsAttempt",
    "Verdict",
    "alert_from_openssl_reason",
    "diagnose",
    "dns_fix",
    "doctor_command",
    "judge_dns",
    "judge_http01",
    "judge_silence",
    "judge_tls",
    "parse_nameserver",
    "probe_tls",
    "resolve_chain",
]
