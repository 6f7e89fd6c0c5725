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
"""

from __future__ import annotations

import contextlib
import ipaddress
import secrets
import ssl
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal

import dns.asyncresolver
import dns.exception
import dns.name
import dns.rdatatype
import dns.resolver
import trio
from cryptography import x509

from .certs.challenges import NEGATIVE_TTL
from .config import Config
from .errors import StorageError
from .names import normalize_name, validate_hostname
from .storage.base import Storage
from .tls.challenge_cert import ACME_IDENTIFIER_OID, ACME_TLS_ALPN, acme_identifier_value
from .wire.proxy_protocol import build_v1, build_v2

__all__ = [
    "SELF_TEST_TTL",
    "Diagnosis",
    "DnsAnswer",
    "DnsJudgement",
    "Finding",
    "TlsAttempt",
    "Verdict",
    "diagnose",
    "dns_fix",
    "doctor_command",
    "judge_dns",
    "judge_http01",
    "judge_silence",
    "judge_tls",
    "parse_nameserver",
]

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

SELF_TEST_TTL: Final = 60.0
_TOKEN_PREFIX: Final = "doctor-"
_MAX_CNAME_HOPS: Final = 16
_KEEP_RECEIVED: Final = 64  # enough for the first record header and an HTTP status line
_READ: Final = 16384

_SUMMARY: Final[Mapping[str, str]] = {
    "ok": "the CA can reach edgeproxy of this deployment for {name} over TLS-ALPN-01",
    "dns_not_here": "{name} does not point at this deployment",
    "port_closed": "TCP {port} does not answer at an address the CA would use for {name}",
    "tls_terminated_in_front": "something in front of edgeproxy terminates TLS",
    "proxy_protocol_mismatch": "the load balancer's and edgeproxy's PROXY protocol settings differ",
    "not_edgeproxy": "the server reached is not an edgeproxy reading this deployment's storage",
    "http01_unreachable": "the CA cannot fetch edgeproxy's HTTP-01 answer for {name} on port 80",
    "error": "the diagnosis could not finish or the result is ambiguous",
}

_FIX_TLS_TERMINATED: Final = (
    "make the load balancer's listener on port {port} plain TCP (AWS NLB: protocol TCP, not "
    "TLS; haproxy: mode tcp without 'ssl' on the bind line) and turn off any TLS inspection, "
    "so the CA's acme-tls/1 handshake reaches edgeproxy untouched"
)
_FIX_OTHER_STORAGE: Final = (
    "make every replica behind the load balancer use this config's storage (same "
    "storage.path, or the same storage.dsn in cluster mode), and make sure no other ACME "
    "client answers TLS on port {port} for {name}"
)
_FIX_PORT_CLOSED: Final = (
    "open TCP {port} end to end: the firewall / security group must allow TCP {port} from "
    "anywhere (the CA validates from many places), the load balancer needs a TCP listener on "
    "{port}, and its targets (edgeproxy) must be registered and healthy"
)

# TLS alert descriptions (RFC 8446 s6, RFC 5246 s7.2, RFC 7301 s3.2) by code.
_ALERTS: Final[Mapping[int, str]] = {
    0: "close_notify",
    10: "unexpected_message",
    20: "bad_record_mac",
    22: "record_overflow",
    40: "handshake_failure",
    42: "bad_certificate",
    43: "unsupported_certificate",
    46: "certificate_unknown",
    47: "illegal_parameter",
    48: "unknown_ca",
    50: "decode_error",
    51: "decrypt_error",
    70: "protocol_version",
    71: "insufficient_security",
    80: "internal_error",
    86: "inappropriate_fallback",
    90: "user_canceled",
    109: "missing_extension",
    110: "unsupported_extension",
    112: "unrecognized_name",
    116: "certificate_required",
    120: "no_application_protocol",
}
_ALERT_CONTENT_TYPE: Final = 21
_TLS_CONTENT_TYPES: Final = frozenset({20, 21, 22, 23})


# --- results ---------------------------------------------------------------------------------


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
        return _SUMMARY[self.verdict].format(name=self.name, port=self.port)

    def to_json(self) -> dict[str, Any]:
        """The ``--json`` document; keys are stable, ``fix`` is null on passing checks."""
        return {
            "name": self.name,
            "port": self.port,
            "verdict": self.verdict,
            "ok": self.ok,
            "summary": self.summary,
            "findings": [
                {"check": f.check, "ok": f.ok, "detail": f.detail, "fix": f.fix}
                for f in self.findings
            ],
        }

    def render(self) -> str:
        """Human output: one line per check (OK/FAIL), its fix indented below, then the verdict."""
        width = max((len(f.check) for f in self.findings), default=0)
        lines = [f"edgeproxy doctor {self.name} (port {self.port})"]
        for f in self.findings:
            mark = "OK  " if f.ok else "FAIL"
            lines.append(f"  {mark} {f.check:<{width}}  {f.detail}")
            if f.fix:
                lines.append(f"       {'':<{width}}  fix: {f.fix}")
        status = "OK" if self.ok else "FAIL"
        lines.append(f"verdict: {status}: {self.verdict}: {self.summary}")
        return "\n".join(lines)


# --- DNS: observation and judgement ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DnsAnswer:
    """What resolving one name gave: its CNAME chain (targets in order) and final addresses.

    ``error`` is set when the resolver could not answer (timeout, SERVFAIL); a name that does
    not exist has ``nxdomain`` set and no error: that is an answer.
    """

    name: str
    chain: tuple[str, ...] = ()
    addresses: tuple[str, ...] = ()
    nxdomain: bool = False
    error: str | None = None


@dataclass(frozen=True, slots=True)
class DnsJudgement:
    """``points_here`` is None when it could not be decided (no targets, resolver failure)."""

    points_here: bool | None
    finding: Finding
    # Addresses to probe, best first: NAME's own when it points here, else the targets'
    # (so the report also says whether the path works once DNS is fixed); ``probe_note``
    # says which of the two it is.
    probe_addresses: tuple[str, ...] = ()
    probe_note: str = ""


_NOTE_TARGET: Final = (
    " (a target's address: DNS does not point here, so this checks the path as it will be "
    "once DNS is fixed)"
)


def _norm_ip(text: str) -> str:
    return ipaddress.ip_address(text).compressed


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _target_key(target: str) -> str:
    try:
        return normalize_name(target)
    except ValueError:  # InvalidName: judged as unresolvable rather than crashing the report
        return target.lower()


def _describe(answer: DnsAnswer) -> str:
    hops = " -> ".join((answer.name, *(f"CNAME {c}" for c in answer.chain)))
    addrs = ", ".join(answer.addresses) if answer.addresses else "no A/AAAA records"
    return f"{hops} -> {addrs}"


def dns_fix(name: str, targets: Sequence[str], target_addresses: Iterable[str]) -> str:
    """The record(s) the customer should create so ``name`` points at the deployment."""
    hostnames = [t for t in targets if not _is_ip(t)]
    addresses = sorted({_norm_ip(a) for a in target_addresses}, key=_ip_sort_key)
    records = ", ".join(addresses) if addresses else "the deployment's addresses"
    if hostnames:
        return (
            f"create a CNAME {name} -> {hostnames[0]} (at a zone apex, where a CNAME is not "
            f"allowed: an ALIAS/ANAME record to {hostnames[0]}, or A/AAAA records to {records})"
        )
    return f"create A/AAAA records {name} -> {records}"


def _ip_sort_key(text: str) -> tuple[int, int]:
    ip = ipaddress.ip_address(text)
    return ip.version, int(ip)


def judge_dns(
    answer: DnsAnswer, targets: Sequence[str], target_answers: Mapping[str, DnsAnswer]
) -> DnsJudgement:
    """Does ``answer`` point at the targets? A pure decision over resolved data.

    NAME points here when its CNAME chain reaches a target hostname (or a name in a target's
    own chain: customers sometimes CNAME straight to the load balancer's name), or when every
    address it resolves to belongs to a target. Some-but-not-all is a failure: the CA picks
    one address, and the stray one fails validation some of the time.
    """
    name = answer.name
    target_names: dict[str, str] = {}  # a name in a target's chain -> the target
    target_ips: set[str] = set()
    unresolved: list[str] = []
    for target in targets:
        if _is_ip(target):
            target_ips.add(_norm_ip(target))
            continue
        norm = _target_key(target)
        target_names[norm] = target
        t_answer = target_answers.get(norm)
        if t_answer is None:
            continue
        for hop in t_answer.chain:
            target_names.setdefault(hop, target)
        target_ips.update(_norm_ip(a) for a in t_answer.addresses)
        if t_answer.error or not t_answer.addresses:
            why = t_answer.error or ("NXDOMAIN" if t_answer.nxdomain else "no A/AAAA records")
            unresolved.append(f"{target} ({why})")
    target_order = sorted(target_ips, key=_ip_sort_key)
    fix = dns_fix(name, targets, target_ips)
    note = f"; targets not resolved: {', '.join(unresolved)}" if unresolved else ""

    if not targets:
        return DnsJudgement(
            None,
            Finding(
                "dns",
                False,
                f"{_describe(answer)}; onboarding.target is empty, so there is nothing to "
                "compare with",
                "set onboarding.target in the config to the hostname(s) or addresses custom "
                "domains must point at (e.g. the load balancer's DNS name)",
            ),
            answer.addresses,
        )
    if answer.error is not None:
        return DnsJudgement(
            None,
            Finding(
                "dns",
                False,
                f"could not resolve {name}: {answer.error}",
                "check the resolver (or --nameserver) answers, then run doctor again",
            ),
            tuple(target_order),
            _NOTE_TARGET,
        )
    via = next((hop for hop in answer.chain if hop in target_names), None)
    if via is not None:
        target = target_names[via]
        how = f"its CNAME chain reaches {via}" + (f" (target {target})" if via != target else "")
        return DnsJudgement(
            True,
            Finding("dns", True, f"{_describe(answer)}: {how}{note}"),
            answer.addresses or tuple(target_order),
            "" if answer.addresses else f" (an address of target {target})",
        )
    if answer.nxdomain:
        return DnsJudgement(
            False,
            Finding("dns", False, f"{name} does not exist (NXDOMAIN){note}", fix),
            tuple(target_order),
            _NOTE_TARGET,
        )
    mine = [a for a in answer.addresses if _norm_ip(a) in target_ips]
    stray = [a for a in answer.addresses if _norm_ip(a) not in target_ips]
    if mine and not stray:
        return DnsJudgement(
            True,
            Finding("dns", True, f"{_describe(answer)}: every address is a target's{note}"),
            tuple(mine),
        )
    if mine:
        return DnsJudgement(
            False,
            Finding(
                "dns",
                False,
                f"{_describe(answer)}: {', '.join(stray)} do(es) not belong to the targets "
                f"({', '.join(target_order)}); the CA may validate against them{note}",
                f"remove the records for {', '.join(stray)}, or better: {fix}",
            ),
            tuple(mine),
        )
    wanted = ", ".join(targets)
    return DnsJudgement(
        False,
        Finding(
            "dns",
            False,
            f"{_describe(answer)}: neither the chain nor the addresses reach the targets "
            f"({wanted}{': ' + ', '.join(target_order) if target_order else ''}){note}",
            fix,
        ),
        tuple(target_order),
        _NOTE_TARGET,
    )


# --- TLS: observation and judgement ----------------------------------------------------------

ProxyPrefix = Literal["none", "v2", "v1"]


@dataclass(frozen=True, slots=True)
class TlsAttempt:
    """What one ``acme-tls/1`` attempt observed, without interpretation.

    ``received`` holds the first bytes the server sent (before decryption); ``closed`` means
    the server ended the connection (FIN or reset) before the handshake finished;
    ``tls_error`` is OpenSSL's reason when the handshake failed (e.g. the name of an alert
    that arrived encrypted, which ``received`` cannot show).
    """

    address: str
    port: int
    prefix: ProxyPrefix = "none"
    connected: bool = True
    connect_error: str | None = None
    received: bytes = b""
    closed: bool = False
    timed_out: bool = False
    handshake_ok: bool = False
    alpn: str | None = None
    certificate: bytes | None = None  # DER
    tls_error: str | None = None

    @property
    def where(self) -> str:
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"{host}:{self.port}"

    @property
    def silent(self) -> bool:
        """Accepted, then not a single byte back before close or timeout."""
        return self.connected and not self.received and not self.handshake_ok

    @property
    def speaks_tls(self) -> bool:
        r = self.received
        return self.handshake_ok or (len(r) >= 2 and r[0] in _TLS_CONTENT_TYPES and r[1] == 3)

    @property
    def alert(self) -> str | None:
        """The TLS alert the server sent, from the plaintext record or OpenSSL's reason."""
        r = self.received
        if len(r) >= 7 and r[0] == _ALERT_CONTENT_TYPE and r[1] == 3:
            return _ALERTS.get(r[6], f"alert_{r[6]}")
        return alert_from_openssl_reason(self.tls_error)


def alert_from_openssl_reason(reason: str | None) -> str | None:
    """``TLSV1_ALERT_INTERNAL_ERROR`` -> ``internal_error``; None if not an alert."""
    if not reason:
        return None
    r = reason.upper()
    for prefix in ("SSLV3_ALERT_", "TLSV1_ALERT_", "TLSV13_ALERT_", "TLSV1_"):
        if r.startswith(prefix):
            desc = r.removeprefix(prefix).lower()
            return desc if desc in _ALERTS.values() else None
    return None


@dataclass(frozen=True, slots=True)
class _CertFacts:
    summary: str
    dns_names: tuple[str, ...]
    digest: bytes | None  # the acmeIdentifier extnValue, if present
    critical: bool


def _certificate_facts(der: bytes) -> _CertFacts:
    try:
        cert = x509.load_der_x509_certificate(der)
    except ValueError as exc:
        return _CertFacts(f"an unparseable certificate ({exc})", (), None, False)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        dns_names = tuple(san.value.get_values_for_type(x509.DNSName))
    except x509.ExtensionNotFound:
        dns_names = ()
    digest: bytes | None = None
    critical = False
    try:
        ext = cert.extensions.get_extension_for_oid(ACME_IDENTIFIER_OID)
    except x509.ExtensionNotFound:
        pass
    else:
        critical = ext.critical
        if isinstance(ext.value, x509.UnrecognizedExtension):
            digest = ext.value.value
    subject = cert.subject.rfc4514_string() or "(empty subject)"
    names = ", ".join(dns_names) if dns_names else "none"
    issuer = cert.issuer.rfc4514_string() or "(empty issuer)"
    summary = f"a certificate for {subject} (DNS names: {names}; issuer {issuer})"
    return _CertFacts(summary, dns_names, digest, critical)


def judge_tls(name: str, key_authorization: str, attempt: TlsAttempt) -> tuple[Verdict, Finding]:
    """Judge one attempt that got past TCP; silence is ``judge_silence``'s business."""
    where = attempt.where
    fmt = {"port": attempt.port, "name": name}
    via = {"none": "", "v2": " (after a PROXY v2 header)", "v1": " (after a PROXY v1 header)"}[
        attempt.prefix
    ]
    if not attempt.speaks_tls:
        head = attempt.received[:40]
        return "not_edgeproxy", Finding(
            "tls",
            False,
            f"{where} answered our ClientHello{via} with {len(attempt.received)}+ bytes that "
            f"are not TLS (starting {head!r}): the port reaches a plain-text service (e.g. an "
            "HTTP listener, or a server refusing a PROXY header it does not expect), not "
            "edgeproxy's TLS listener",
            f"point the load balancer's port {attempt.port} at edgeproxy's TLS listen address",
        )
    if not attempt.handshake_ok:
        alert = attempt.alert
        if alert == "unrecognized_name":
            return "not_edgeproxy", Finding(
                "tls",
                False,
                f"{where} refused acme-tls/1 for {name}{via} with the TLS alert "
                "unrecognized_name. edgeproxy answers so when its storage holds no pending "
                f"challenge for {name}, and ours was pending: the server reached does not read "
                "this deployment's storage (another deployment, a replica with other storage, "
                "or a TLS terminator that does not know the name)",
                _FIX_OTHER_STORAGE.format(**fmt),
            )
        if alert is not None:
            return "tls_terminated_in_front", Finding(
                "tls",
                False,
                f"{where} answered acme-tls/1 for {name}{via} with the TLS alert {alert} (what "
                "the CA reports as 'remote error: tls: internal error' or a handshake failure): "
                "a TLS terminator in front of edgeproxy handled the handshake itself "
                "(edgeproxy answers acme-tls/1 with its challenge certificate or "
                "unrecognized_name)",
                _FIX_TLS_TERMINATED.format(**fmt),
            )
        what = attempt.tls_error or ("timed out" if attempt.timed_out else "connection closed")
        return "error", Finding(
            "tls",
            False,
            f"{where} started TLS{via} but the handshake failed without an alert: {what}",
            "run doctor again; if it persists, capture the handshake (openssl s_client "
            f"-connect {where} -servername {name} -alpn acme-tls/1) and check the load "
            "balancer's logs",
        )
    if attempt.certificate is None:
        return "tls_terminated_in_front", Finding(
            "tls",
            False,
            f"{where} completed the handshake{via} without presenting a certificate",
            _FIX_TLS_TERMINATED.format(**fmt),
        )
    facts = _certificate_facts(attempt.certificate)
    alpn = attempt.alpn or "none"
    expected = acme_identifier_value(key_authorization)
    if facts.digest is not None and attempt.alpn == ACME_TLS_ALPN:
        if facts.digest == expected and facts.dns_names == (name,) and facts.critical:
            return "ok", Finding(
                "tls",
                True,
                f"{where} answered acme-tls/1 for {name}{via} with the RFC 8737 certificate "
                "carrying the digest of our self-test token: it is an edgeproxy of this "
                "deployment",
            )
        if facts.digest == expected:
            problem = (
                f"its DNS names are {', '.join(facts.dns_names) or 'missing'}, not exactly {name}"
                if facts.dns_names != (name,)
                else "the acmeIdentifier extension is not marked critical"
            )
            return "error", Finding(
                "tls",
                False,
                f"{where} answered with our self-test digest{via}, but {problem}: a CA would "
                "reject this certificate",
                "upgrade edgeproxy on every replica (its challenge certificate is not RFC 8737 "
                "conformant)",
            )
        return "not_edgeproxy", Finding(
            "tls",
            False,
            f"{where} answered acme-tls/1 for {name}{via} with an RFC 8737 certificate, but "
            "its acmeIdentifier digest is not the one of our self-test token: another ACME "
            "client answers for this name, or the replica reached reads other storage",
            _FIX_OTHER_STORAGE.format(**fmt),
        )
    missing = "no acmeIdentifier extension" if facts.digest is None else "an acmeIdentifier"
    return "tls_terminated_in_front", Finding(
        "tls",
        False,
        f"{where} completed a TLS handshake{via} but not the TLS-ALPN-01 one: negotiated ALPN "
        f"{alpn} (wanted {ACME_TLS_ALPN}) and presented {facts.summary} with {missing}"
        + (" but no acme-tls/1" if facts.digest is not None else "")
        + ": a TLS terminator (load balancer listener, CDN, TLS inspection) answered instead "
        "of edgeproxy",
        _FIX_TLS_TERMINATED.format(**fmt),
    )


def _outcome(attempt: TlsAttempt) -> str:
    if not attempt.connected:
        return f"could not connect ({attempt.connect_error})"
    if attempt.silent:
        return "closed without a byte" if attempt.closed else "not a byte back"
    return "an answer"


def judge_silence(
    name: str,
    key_authorization: str,
    plain: TlsAttempt,
    with_proxy: Sequence[TlsAttempt],
    proxy_protocol: str | None = None,
) -> tuple[Verdict, list[Finding]]:
    """The plain attempt got no byte back; ``with_proxy`` are the retries with a header."""
    where = plain.where
    how = "closed the connection" if plain.closed else "sent nothing"
    first = Finding(
        "tls",
        False,
        f"{where} accepted TCP but {how} without a byte in answer to our ClientHello "
        f"(acme-tls/1, SNI {name})",
    )
    for attempt in with_proxy:
        if attempt.speaks_tls:
            version = attempt.prefix
            _, result = judge_tls(name, key_authorization, attempt)
            expects = (
                "edgeproxy expects PROXY v2 but the load balancer does not send it: enable "
                "proxy protocol v2 on the target group (haproxy: send-proxy-v2), or set "
                'server.proxy_protocol = "off"'
                if version == "v2"
                else "edgeproxy expects PROXY v1 but the load balancer does not send it: "
                "enable proxy protocol v1 (haproxy: send-proxy), or set "
                'server.proxy_protocol = "off"'
            )
            proxy = Finding(
                "proxy_protocol",
                False,
                f"the same ClientHello after a PROXY {version} header got a TLS answer: the "
                f"server expects a PROXY {version} header that nothing in front sends",
                expects,
            )
            rest = Finding(result.check + f"+proxy_{version}", result.ok, result.detail, result.fix)
            return "proxy_protocol_mismatch", [first, proxy, rest]
    tried = "; ".join(f"after a PROXY {a.prefix} header: {_outcome(a)}" for a in with_proxy)
    configured = (
        f' This config has server.proxy_protocol = "{proxy_protocol}".' if proxy_protocol else ""
    )
    both = Finding(
        "proxy_protocol",
        False,
        f"the same ClientHello again, {tried or 'no retry was possible'}. Either the "
        "load balancer sends PROXY headers and edgeproxy does not expect them "
        "(edgeproxy hangs up on them and counts edgeproxy_client_hellos_total"
        '{result="proxy_protocol"}), or nothing healthy is behind the load balancer.' + configured,
        'if edgeproxy_client_hellos_total{result="proxy_protocol"} grows on the replicas, set '
        'server.proxy_protocol = "v2" (or "any") to match the load balancer, and '
        "server.proxy_protocol_from to its networks; if edgeproxy_proxy_protocol_refused_total "
        "grows, the balancer's address is missing from server.proxy_protocol_from; otherwise "
        "check the load balancer's target health and that edgeproxy listens on the target port",
    )
    return "error", [first, both]


# --- network I/O -----------------------------------------------------------------------------


class _TapStream(trio.abc.Stream):
    """A transport that remembers the first bytes the server sent and whether it hung up, and
    can put bytes (a PROXY header) in front of the first thing we send."""

    def __init__(self, inner: trio.SocketStream, prefix: bytes) -> None:
        self._inner = inner
        self._prefix = prefix
        self.received = bytearray()
        self.closed = False

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._prefix:
            data, self._prefix = self._prefix + bytes(data), b""
        await self._inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self._inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        try:
            data = await self._inner.receive_some(max_bytes or _READ)
        except (trio.BrokenResourceError, OSError):
            self.closed = True
            raise
        if not data:
            self.closed = True
        elif len(self.received) < _KEEP_RECEIVED:
            self.received += data[: _KEEP_RECEIVED - len(self.received)]
        return data

    async def aclose(self) -> None:
        await self._inner.aclose()


def _client_context() -> ssl.SSLContext:
    # No verification on purpose: the RFC 8737 certificate is self-signed and judging the
    # certificate is our job, not the TLS library's.
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2  # RFC 8737 s3: TLS 1.2 or later
    ctx.set_alpn_protocols([ACME_TLS_ALPN])
    return ctx


async def _connect(address: str, port: int, step_timeout: float) -> trio.SocketStream | str:
    """A connected stream to the IP ``address``, or why not, in words."""
    # One socket to one address (not open_tcp_stream's happy eyeballs): the error we report
    # must be this address's own, not "all attempts failed".
    family = trio.socket.AF_INET6 if ":" in address else trio.socket.AF_INET
    sock = trio.socket.socket(family, trio.socket.SOCK_STREAM)
    with trio.move_on_after(step_timeout):
        try:
            await sock.connect((address, port))
        except ConnectionRefusedError:
            sock.close()
            return "connection refused (nothing listens there, or a firewall rejects)"
        except OSError as exc:
            sock.close()
            return exc.strerror or str(exc)
        return trio.SocketStream(sock)
    sock.close()
    return f"no answer within {step_timeout:g}s (packets dropped: firewall / security group?)"


def _proxy_header(prefix: ProxyPrefix, stream: trio.SocketStream) -> bytes:
    if prefix == "none":
        return b""
    local = stream.socket.getsockname()
    peer = stream.socket.getpeername()
    src, dst = (str(local[0]), int(local[1])), (str(peer[0]), int(peer[1]))
    return build_v2(src, dst) if prefix == "v2" else build_v1(src, dst)


async def probe_tls(
    address: str, port: int, name: str, *, prefix: ProxyPrefix = "none", step_timeout: float = 5.0
) -> TlsAttempt:
    """Connect and do the CA's handshake (SNI ``name``, ALPN ``acme-tls/1``); record it all.

    ``step_timeout`` bounds the connect and the handshake each; running out is recorded
    (``connect_error`` / ``timed_out``), not raised: it is an observation like any other.
    """
    base = TlsAttempt(address=address, port=port, prefix=prefix)
    conn = await _connect(address, port, step_timeout)
    if isinstance(conn, str):
        return TlsAttempt(address, port, prefix, connected=False, connect_error=conn)
    tap = _TapStream(conn, _proxy_header(prefix, conn))
    tls = trio.SSLStream(tap, _client_context(), server_hostname=name)
    tls_error: str | None = None
    handshake_ok = False
    timed_out = False
    alpn: str | None = None
    der: bytes | None = None
    try:
        with trio.move_on_after(step_timeout) as scope:
            try:
                await tls.do_handshake()
            except trio.BrokenResourceError as exc:
                cause = exc.__cause__
                if isinstance(cause, ssl.SSLError):
                    tls_error = cause.reason or cause.__class__.__name__
                elif cause is not None:
                    tls_error = str(cause) or cause.__class__.__name__
            else:
                handshake_ok = True
                alpn = tls.selected_alpn_protocol()
                der = tls.getpeercert(binary_form=True)
        timed_out = scope.cancelled_caught
    finally:
        if handshake_ok:
            with trio.move_on_after(1.0), contextlib.suppress(trio.BrokenResourceError):
                await tls.aclose()
        await trio.aclose_forcefully(tap)
    return TlsAttempt(
        address=base.address,
        port=base.port,
        prefix=prefix,
        received=bytes(tap.received),
        closed=tap.closed,
        timed_out=timed_out,
        handshake_ok=handshake_ok,
        alpn=alpn,
        certificate=der,
        tls_error=tls_error,
    )


def _make_resolver(
    nameserver: tuple[str, int] | None, timeout: float
) -> dns.asyncresolver.Resolver:
    if nameserver is None:
        resolver = dns.asyncresolver.Resolver()
    else:
        resolver = dns.asyncresolver.Resolver(configure=False)
        resolver.nameservers = [nameserver[0]]
        resolver.port = nameserver[1]
    resolver.lifetime = timeout
    return resolver


def _text(n: dns.name.Name) -> str:
    return n.to_text(omit_final_dot=True).lower()


async def resolve_chain(resolver: dns.asyncresolver.Resolver, name: str) -> DnsAnswer:
    """Follow NAME's CNAME chain and collect the A and AAAA addresses at its end.

    A recursive resolver hands back the whole chain in one answer; an authoritative or mock
    server may stop at the first CNAME whose target it does not hold, so we keep asking for
    the chain's end ourselves, up to ``_MAX_CNAME_HOPS``, refusing loops.
    """
    chain: list[str] = []
    seen = {name}
    current = name
    addresses: list[str] = []
    try:
        for _ in range(_MAX_CNAME_HOPS):
            answer = await resolver.resolve(
                current, dns.rdatatype.A, raise_on_no_answer=False, search=False
            )
            for rrset in answer.chaining_result.cnames:
                for rdata in rrset:
                    target = _text(rdata.target)
                    if target in seen:
                        return DnsAnswer(name, tuple(chain), error=f"CNAME loop at {target}")
                    seen.add(target)
                    chain.append(target)
            canonical = _text(answer.canonical_name)
            if answer.rrset is not None:
                addresses.extend(rdata.address for rdata in answer.rrset)
            if answer.rrset is None and canonical != current:
                current = canonical
                continue
            current = canonical
            break
        else:
            return DnsAnswer(name, tuple(chain), error=f"CNAME chain longer than {_MAX_CNAME_HOPS}")
        six = await resolver.resolve(
            current, dns.rdatatype.AAAA, raise_on_no_answer=False, search=False
        )
        if six.rrset is not None:
            addresses.extend(rdata.address for rdata in six.rrset)
    except dns.resolver.NXDOMAIN:
        return DnsAnswer(name, tuple(chain), tuple(addresses), nxdomain=True)
    except dns.exception.DNSException as exc:
        return DnsAnswer(name, tuple(chain), tuple(addresses), error=str(exc) or type(exc).__name__)
    return DnsAnswer(name, tuple(chain), tuple(dict.fromkeys(addresses)))


# --- the diagnosis ---------------------------------------------------------------------------

_MAX_PROBED_ADDRESSES: Final = 8


@dataclass
class _Report:
    findings: list[Finding] = field(default_factory=list)
    verdict: Verdict | None = None

    def add(self, finding: Finding, verdict: Verdict | None = None) -> None:
        """Record a finding; the first non-ok verdict reported becomes the diagnosis'."""
        self.findings.append(finding)
        if verdict is not None and verdict != "ok" and self.verdict is None:
            self.verdict = verdict


async def diagnose(
    name: str,
    *,
    targets: Sequence[str],
    storage: Storage,
    port: int = 443,
    nameserver: tuple[str, int] | None = None,
    connect_to: str | None = None,
    timeout: float = 5.0,  # noqa: ASYNC109 (a budget per step; running out is a finding)
    proxy_protocol: str | None = None,
    http_port: int | None = None,
) -> Diagnosis:
    """Check DNS, TCP and the acme-tls/1 answer for ``name`` as the CA would.

    With ``http_port`` (HTTP-01 enabled: 80, as the CA uses), also fetch an HTTP-01 self-test
    token from every address on that port, proving port 80 reaches this deployment's
    ``[http]`` listener.

    ``targets`` are what custom domains must point at (``onboarding.target``); ``storage`` is
    the deployment's, where the self-test token is published; ``nameserver`` (host, port)
    replaces the system resolver; ``connect_to`` probes that address instead of NAME's (e.g.
    the load balancer before the customer switched DNS); ``timeout`` bounds each DNS query,
    connect and handshake; ``proxy_protocol`` is the deployment's ``server.proxy_protocol``,
    used to word ambiguous findings. Every address NAME resolves to is probed (up to 8): the
    CA picks one, so one broken address fails validation some of the time.
    Raises ``InvalidName`` (a ValueError) for a name no CA would validate.
    """
    name = validate_hostname(name)
    report = _Report()
    try:
        resolver = _make_resolver(nameserver, timeout)
    except dns.exception.DNSException as exc:  # e.g. no /etc/resolv.conf
        no_dns = Finding("dns", False, f"no DNS resolver: {exc}", "pass --nameserver HOST:PORT")
        return Diagnosis(name, "error", (no_dns,), port)

    answer = await resolve_chain(resolver, name)
    target_answers: dict[str, DnsAnswer] = {}
    for target in targets:
        if not _is_ip(target):
            key = _target_key(target)
            target_answers[key] = await resolve_chain(resolver, key)
    dns_result = judge_dns(answer, targets, target_answers)
    if dns_result.points_here is None:
        report.add(dns_result.finding, "error")
    else:
        report.add(dns_result.finding, "ok" if dns_result.points_here else "dns_not_here")

    addresses, how = await _probe_addresses(resolver, dns_result, connect_to)
    if not addresses:
        report.add(
            Finding(
                "tcp",
                False,
                f"no address to probe: {how}",
                "fix the DNS finding above, or pass --connect-to ADDRESS",
            ),
            "error",
        )
        return Diagnosis(name, report.verdict or "error", tuple(report.findings), port)

    key_authorization, published, storage_finding = await _publish_self_test(storage, name)
    report.add(storage_finding, "ok" if storage_finding.ok else "error")
    try:
        for address in addresses:
            if key_authorization is None:
                await _check_tcp_only(report, address, port, how, timeout)
            else:
                await _probe_path(
                    report, name, key_authorization, address, port, how, timeout, proxy_protocol
                )
        if http_port is not None:
            await _probe_http01(report, storage, name, addresses, http_port, how, timeout)
    finally:
        if published:
            with trio.CancelScope(shield=True):
                await _withdraw_self_test(storage, name, key_authorization)
    return Diagnosis(name, report.verdict or "ok", tuple(report.findings), port)


def _hp(address: str, port: int) -> str:
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def _tcp_failed(address: str, port: int, why: str, how: str) -> Finding:
    return Finding(
        "tcp",
        False,
        f"could not connect to {_hp(address, port)}{how}: {why}",
        _FIX_PORT_CLOSED.format(port=port),
    )


async def _probe_addresses(
    resolver: dns.asyncresolver.Resolver, dns_result: DnsJudgement, connect_to: str | None
) -> tuple[tuple[str, ...], str]:
    """(addresses to probe, how they were chosen: a note for the findings or why none)."""
    if connect_to is not None:
        if _is_ip(connect_to):
            return (connect_to,), " (--connect-to)"
        answer = await resolve_chain(resolver, _target_key(connect_to))
        if not answer.addresses:
            why = answer.error or "no A/AAAA records"
            return (), f"--connect-to {connect_to} did not resolve ({why})"
        return answer.addresses[:_MAX_PROBED_ADDRESSES], f" ({connect_to}, from --connect-to)"
    if not dns_result.probe_addresses:
        return (), "neither the name nor the targets resolved to an address"
    return dns_result.probe_addresses[:_MAX_PROBED_ADDRESSES], dns_result.probe_note


async def _publish_self_test(storage: Storage, name: str) -> tuple[str | None, bool, Finding]:
    """(key authorization to expect, whether we wrote it, finding)."""
    try:
        pending = await storage.get_challenge(name)
        if pending is not None and pending.startswith(_TOKEN_PREFIX):
            return (
                pending,
                False,
                Finding(
                    "storage",
                    True,
                    f"another doctor run's self-test token for {name} is pending: used it",
                ),
            )
        if pending is not None:
            return (
                pending,
                False,
                Finding(
                    "storage",
                    True,
                    f"a real TLS-ALPN-01 validation for {name} is pending: used its key "
                    "authorization as the token and left storage untouched",
                ),
            )
        # Same shape as an ACME key authorization (token "." thumbprint), ASCII only.
        token = f"{_TOKEN_PREFIX}{secrets.token_urlsafe(24)}.{secrets.token_urlsafe(32)}"
        await storage.put_challenge(name, token, SELF_TEST_TTL)
        # A running edgeproxy believes a miss for this name for NEGATIVE_TTL (acme-tls/1
        # floods): ask only once any miss from before the write has expired, as the issuer does.
        await trio.sleep(NEGATIVE_TTL)
    except (StorageError, OSError) as exc:
        return (
            None,
            False,
            Finding(
                "storage",
                False,
                f"could not publish the self-test challenge in storage: {exc}",
                "run doctor as the user edgeproxy runs as, with the same config, so it can "
                "write the deployment's storage",
            ),
        )
    return (
        token,
        True,
        Finding(
            "storage",
            True,
            f"published a self-test challenge for {name} in the deployment's storage "
            f"(expires in {SELF_TEST_TTL:g}s, withdrawn afterwards)",
        ),
    )


async def _withdraw_self_test(storage: Storage, name: str, token: str | None) -> None:
    # A real issuance may have replaced our token meanwhile: withdraw only our own. (The
    # check and the delete are two steps; the window is a storage round trip.)
    with contextlib.suppress(StorageError, OSError):
        if await storage.get_challenge(name) == token:
            await storage.delete_challenge(name)


async def _check_tcp_only(
    report: _Report, address: str, port: int, how: str, step_timeout: float
) -> None:
    conn = await _connect(address, port, step_timeout)
    if isinstance(conn, str):
        report.add(_tcp_failed(address, port, conn, how), "port_closed")
        return
    await trio.aclose_forcefully(conn)
    report.add(Finding("tcp", True, f"connected to {_hp(address, port)}{how}"))


async def _probe_path(
    report: _Report,
    name: str,
    key_authorization: str,
    address: str,
    port: int,
    how: str,
    step_timeout: float,
    proxy_protocol: str | None,
) -> None:
    plain = await probe_tls(address, port, name, step_timeout=step_timeout)
    if not plain.connected:
        report.add(_tcp_failed(address, port, plain.connect_error or "?", how), "port_closed")
        return
    report.add(Finding("tcp", True, f"connected to {plain.where}{how}"))
    if not plain.silent:
        verdict, finding = judge_tls(name, key_authorization, plain)
        report.add(finding, verdict)
        return
    retries: list[TlsAttempt] = []
    prefixes: tuple[ProxyPrefix, ...] = ("v2", "v1")
    for prefix in prefixes:
        attempt = await probe_tls(address, port, name, prefix=prefix, step_timeout=step_timeout)
        retries.append(attempt)
        if attempt.speaks_tls or not attempt.connected:
            break
    verdict, findings = judge_silence(name, key_authorization, plain, retries, proxy_protocol)
    for finding in findings:
        report.add(finding)
    if report.verdict is None:
        report.verdict = verdict


# --- HTTP-01 (port 80) ----------------------------------------------------------------------


_FIX_HTTP01: Final = (
    "the load balancer must forward TCP {port} untouched to edgeproxy's [http] listen address "
    "(and send the PROXY header exactly when [http] proxy_protocol expects one), and every "
    "replica must share this deployment's storage"
)


def judge_http01(
    name: str,
    key_authorization: str,
    where: str,
    port: int,
    status: int | None,
    body: bytes,
    error: str | None,
) -> tuple[Verdict, Finding]:
    """Turn one HTTP-01 self-test fetch into a finding (pure)."""
    fix = _FIX_HTTP01.format(port=port)
    if error is not None:
        return "http01_unreachable", Finding(
            "http-01", False, f"GET of the self-test token from {where} failed: {error}", fix
        )
    if status == 200 and body.strip() == key_authorization.encode():
        return "ok", Finding(
            "http-01", True, f"{where} answered this deployment's HTTP-01 self-test for {name}"
        )
    return "http01_unreachable", Finding(
        "http-01",
        False,
        f"{where} answered HTTP {status} {body[:_KEEP_RECEIVED]!r}, not this deployment's "
        "HTTP-01 self-test token: another server answers port 80, or an edgeproxy with "
        "other storage",
        fix,
    )


async def _fetch_http01(
    address: str, port: int, name: str, token: str, step_timeout: float
) -> tuple[int | None, bytes, str | None]:
    """(status, body, error) of ``GET /.well-known/acme-challenge/TOKEN`` with Host NAME."""
    import h11

    conn = await _connect(address, port, step_timeout)
    if isinstance(conn, str):
        return None, b"", f"could not connect: {conn}"
    client = h11.Connection(h11.CLIENT)
    request = h11.Request(
        method="GET",
        target=f"/.well-known/acme-challenge/{token}",
        headers=[("Host", name), ("User-Agent", "edgeproxy-doctor"), ("Connection", "close")],
    )
    status: int | None = None
    body = b""
    try:
        with trio.fail_after(step_timeout):
            await conn.send_all(
                (client.send(request) or b"") + (client.send(h11.EndOfMessage()) or b"")
            )
            while True:
                event = client.next_event()
                if event is h11.NEED_DATA:
                    client.receive_data(await conn.receive_some(_READ))
                elif isinstance(event, h11.Response):
                    status = event.status_code
                elif isinstance(event, h11.Data):
                    body += bytes(event.data)
                    if len(body) > _READ:
                        break
                elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                    break
    except trio.TooSlowError:
        return status, body, f"no complete answer within {step_timeout:g}s"
    except (h11.ProtocolError, trio.BrokenResourceError, OSError) as exc:
        return status, body, f"not an HTTP answer ({exc})"
    finally:
        await trio.aclose_forcefully(conn)
    return status, body, None


async def _probe_http01(
    report: _Report,
    storage: Storage,
    name: str,
    addresses: Sequence[str],
    port: int,
    how: str,
    step_timeout: float,
) -> None:
    from .certs.challenges import http_challenge_key

    token = f"{_TOKEN_PREFIX}{secrets.token_urlsafe(24)}"
    key_authorization = f"{token}.{secrets.token_urlsafe(32)}"
    key = http_challenge_key(token)
    try:
        await storage.put_challenge(key, key_authorization, SELF_TEST_TTL)
    except (StorageError, OSError) as exc:
        report.add(
            Finding("http-01", False, f"could not publish the HTTP-01 self-test: {exc}"), "error"
        )
        return
    try:
        for address in addresses:
            status, body, error = await _fetch_http01(address, port, name, token, step_timeout)
            verdict, finding = judge_http01(
                name, key_authorization, f"{_hp(address, port)}{how}", port, status, body, error
            )
            report.add(finding, verdict)
    finally:
        with trio.CancelScope(shield=True), contextlib.suppress(StorageError, OSError):
            await storage.delete_challenge(key)


# --- the command -----------------------------------------------------------------------------


def parse_nameserver(value: str) -> tuple[str, int]:
    """``HOST:PORT`` / ``[v6]:PORT`` / ``HOST`` (port 53) with HOST an IP address."""
    value = value.strip()
    host, port_s = value, "53"
    if value.startswith("["):
        host, sep, rest = value[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f"{value!r} is not [IPv6]:PORT")
        port_s = rest[1:] or "53"
    elif value.count(":") == 1:
        host, port_s = value.split(":")
    if not _is_ip(host):
        raise ValueError(f"{value!r}: the nameserver must be an IP address (HOST:PORT)")
    try:
        port = int(port_s)
    except ValueError:
        raise ValueError(f"{value!r}: port {port_s!r} is not a number") from None
    if not 1 <= port <= 65535:
        raise ValueError(f"{value!r}: port must be 1-65535")
    return host, port


def doctor_command(
    cfg: Config,
    name: str,
    *,
    as_json: bool = False,
    port: int = 443,
    http_port: int = 80,
    nameserver: str | None = None,
    connect_to: str | None = None,
    timeout: float = 5.0,
    storage: Storage | None = None,
    echo: Callable[[str], None] = print,
    echo_err: Callable[[str], None] = print,
) -> int:
    """Run the diagnosis for the CLI; returns the exit code (0 only when the verdict is ok).

    ``cfg`` is a loaded ``Config``: targets from ``onboarding.target``, storage from
    ``build_storage(cfg)`` unless ``storage`` is given (closed afterwards either way).
    Usage errors (bad NAME or --nameserver) print to ``echo_err`` and return 2.
    """
    import json

    try:
        ns = parse_nameserver(nameserver) if nameserver else None
        name = validate_hostname(name)
    except ValueError as exc:
        echo_err(f"error: {exc}")
        return 2
    if storage is None:
        from .app import build_storage

        storage = build_storage(cfg)
    store = storage

    async def run() -> Diagnosis:
        try:
            return await diagnose(
                name,
                targets=list(cfg.onboarding.target),
                storage=store,
                port=port,
                nameserver=ns,
                connect_to=connect_to,
                timeout=timeout,
                proxy_protocol=cfg.server.proxy_protocol,
                http_port=http_port if "http-01" in cfg.acme.challenges else None,
            )
        finally:
            await store.aclose()

    result = trio.run(run)
    echo(json.dumps(result.to_json(), indent=2) if as_json else result.render())
    return 0 if result.ok else 1
