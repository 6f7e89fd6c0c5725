"""The doctor's judgements: pure functions from observations to findings and verdicts.

Owns: what each observation means (DNS pointing here or not, who answered the TLS handshake,
a PROXY protocol mismatch, the HTTP-01 answer) and the wording of every finding and fix, so
every verdict has a unit test. Must not know: sockets, resolvers or storage.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final

from cryptography import x509

from ..names import is_ip
from ..tls.challenge_cert import ACME_IDENTIFIER_OID, ACME_TLS_ALPN, acme_identifier_value
from .probe import KEEP_RECEIVED, TlsAttempt, host_port
from .report import Finding, Verdict
from .resolve import DnsAnswer, ip_sort_key, norm_ip, target_key

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
FIX_PORT_CLOSED: Final = (
    "open TCP {port} end to end: the firewall / security group must allow TCP {port} from "
    "anywhere (the CA validates from many places), the load balancer needs a TCP listener on "
    "{port}, and its targets (edgeproxy) must be registered and healthy"
)


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


def _describe(answer: DnsAnswer) -> str:
    hops = " -> ".join((answer.name, *(f"CNAME {c}" for c in answer.chain)))
    addrs = ", ".join(answer.addresses) if answer.addresses else "no A/AAAA records"
    return f"{hops} -> {addrs}"


def dns_fix(name: str, targets: Sequence[str], target_addresses: Iterable[str]) -> str:
    """The record(s) the customer should create so ``name`` points at the deployment."""
    hostnames = [t for t in targets if not is_ip(t)]
    addresses = sorted({norm_ip(a) for a in target_addresses}, key=ip_sort_key)
    records = ", ".join(addresses) if addresses else "the deployment's addresses"
    if hostnames:
        return (
            f"create a CNAME {name} -> {hostnames[0]} (at a zone apex, where a CNAME is not "
            f"allowed: an ALIAS/ANAME record to {hostnames[0]}, or A/AAAA records to {records})"
        )
    return f"create A/AAAA records {name} -> {records}"


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
        if is_ip(target):
            target_ips.add(norm_ip(target))
            continue
        norm = target_key(target)
        target_names[norm] = target
        t_answer = target_answers.get(norm)
        if t_answer is None:
            continue
        for hop in t_answer.chain:
            target_names.setdefault(hop, target)
        target_ips.update(norm_ip(a) for a in t_answer.addresses)
        if t_answer.error or not t_answer.addresses:
            why = t_answer.error or ("NXDOMAIN" if t_answer.nxdomain else "no A/AAAA records")
            unresolved.append(f"{target} ({why})")
    target_order = sorted(target_ips, key=ip_sort_key)
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
    mine = [a for a in answer.addresses if norm_ip(a) in target_ips]
    stray = [a for a in answer.addresses if norm_ip(a) not in target_ips]
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


def tcp_failed(address: str, port: int, why: str, how: str) -> Finding:
    return Finding(
        "tcp",
        False,
        f"could not connect to {host_port(address, port)}{how}: {why}",
        FIX_PORT_CLOSED.format(port=port),
    )


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
        f"{where} answered HTTP {status} {body[:KEEP_RECEIVED]!r}, not this deployment's "
        "HTTP-01 self-test token: another server answers port 80, or an edgeproxy with "
        "other storage",
        fix,
    )
