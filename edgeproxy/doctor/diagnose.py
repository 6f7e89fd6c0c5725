"""``diagnose``: one name's diagnosis, end to end: resolve, publish the self-test, probe every
address (TLS-ALPN-01, and HTTP-01 on port 80 when enabled), withdraw, report.

Owns: the order of the checks and which addresses are probed. Must not know: what an
observation means (``judge``) or how the result is shown (``render``).
"""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import Sequence
from typing import Final

import dns.asyncresolver
import dns.exception
import trio

from ..errors import StorageError
from ..names import is_ip, validate_hostname
from ..storage.base import Storage
from .judge import DnsJudgement, judge_dns, judge_http01, judge_silence, judge_tls, tcp_failed
from .probe import ProxyPrefix, TlsAttempt, connect, fetch_http01, host_port, probe_tls
from .report import Diagnosis, Finding, Report
from .resolve import DnsAnswer, make_resolver, resolve_chain, target_key
from .selftest import SELF_TEST_TTL, TOKEN_PREFIX, publish_self_test, withdraw_self_test

_MAX_PROBED_ADDRESSES: Final = 8


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
    report = Report()
    try:
        resolver = make_resolver(nameserver, timeout)
    except dns.exception.DNSException as exc:  # e.g. no /etc/resolv.conf
        no_dns = Finding("dns", False, f"no DNS resolver: {exc}", "pass --nameserver HOST:PORT")
        return Diagnosis(name, "error", (no_dns,), port)

    answer = await resolve_chain(resolver, name)
    target_answers: dict[str, DnsAnswer] = {}
    for target in targets:
        if not is_ip(target):
            key = target_key(target)
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

    key_authorization, published, storage_finding = await publish_self_test(storage, name)
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
                await withdraw_self_test(storage, name, key_authorization)
    return Diagnosis(name, report.verdict or "ok", tuple(report.findings), port)


async def _probe_addresses(
    resolver: dns.asyncresolver.Resolver, dns_result: DnsJudgement, connect_to: str | None
) -> tuple[tuple[str, ...], str]:
    """(addresses to probe, how they were chosen: a note for the findings or why none)."""
    if connect_to is not None:
        if is_ip(connect_to):
            return (connect_to,), " (--connect-to)"
        answer = await resolve_chain(resolver, target_key(connect_to))
        if not answer.addresses:
            why = answer.error or "no A/AAAA records"
            return (), f"--connect-to {connect_to} did not resolve ({why})"
        return answer.addresses[:_MAX_PROBED_ADDRESSES], f" ({connect_to}, from --connect-to)"
    if not dns_result.probe_addresses:
        return (), "neither the name nor the targets resolved to an address"
    return dns_result.probe_addresses[:_MAX_PROBED_ADDRESSES], dns_result.probe_note


async def _check_tcp_only(
    report: Report, address: str, port: int, how: str, step_timeout: float
) -> None:
    conn = await connect(address, port, step_timeout)
    if isinstance(conn, str):
        report.add(tcp_failed(address, port, conn, how), "port_closed")
        return
    await trio.aclose_forcefully(conn)
    report.add(Finding("tcp", True, f"connected to {host_port(address, port)}{how}"))


async def _probe_path(
    report: Report,
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
        report.add(tcp_failed(address, port, plain.connect_error or "?", how), "port_closed")
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


async def _probe_http01(
    report: Report,
    storage: Storage,
    name: str,
    addresses: Sequence[str],
    port: int,
    how: str,
    step_timeout: float,
) -> None:
    from ..certs.challenges import http_challenge_key

    token = f"{TOKEN_PREFIX}{secrets.token_urlsafe(24)}"
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
            status, body, error = await fetch_http01(address, port, name, token, step_timeout)
            verdict, finding = judge_http01(
                name,
                key_authorization,
                f"{host_port(address, port)}{how}",
                port,
                status,
                body,
                error,
            )
            report.add(finding, verdict)
    finally:
        with trio.CancelScope(shield=True), contextlib.suppress(StorageError, OSError):
            await storage.delete_challenge(key)
