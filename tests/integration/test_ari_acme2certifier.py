"""ARI (RFC 9773) against a real ARI server: acme2certifier on loopback.

The story: a CA issues a certificate; we name it with ``cert_id``; the CA's ``renewalInfo``
endpoint recognises that name (and only that name), answers with a suggested window and a
Retry-After; ``parse_renewal_info`` reads both, clamping the polling hint to [1 min, 1 day];
``choose_renewal_time`` lands inside the window. The same through ``AcmeClient``: it issues,
then ``renewal_info(cert)`` agrees with what the server serves to a plain GET.

Certificates for the server-only checks come from certbot's ``acme`` library
(``issue_with_reference_client``), so a wrong CertID cannot hide behind a matching mistake in
our own client.
"""

from __future__ import annotations

import base64
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from edgeproxy.acme.ari import (
    RETRY_AFTER_MAX,
    RETRY_AFTER_MIN,
    RenewalInfo,
    cert_id,
    choose_renewal_time,
    parse_renewal_info,
)
from edgeproxy.acme.client import AcmeClient
from testkit.acme2certifier import A2C, issue_with_reference_client, start_acme2certifier

# What acme2certifier is told to serve (see testkit/acme2certifier.py): a window from
# 85 % of the lifetime to expiry, and Retry-After: 30, below ARI's one-minute floor.
THRESHOLD_PCT = 85.0
SERVER_RETRY_AFTER = 30


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(part: str) -> bytes:
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


def _expected_window(cert: x509.Certificate, threshold_pct: float) -> tuple[datetime, datetime]:
    """acme2certifier's documented rule, computed from the certificate alone."""
    issued, expires = cert.not_valid_before_utc, cert.not_valid_after_utc
    lifetime = int((expires - issued).total_seconds())
    return issued + timedelta(seconds=int(lifetime * threshold_pct / 100)), expires


def _fetch(a2c: A2C, ident: str) -> httpx.Response:
    return httpx.get(f"{a2c.renewal_info_url}/{ident}", timeout=10.0)


@pytest.fixture(scope="module")
def a2c(tmp_path_factory: pytest.TempPathFactory) -> Iterator[A2C]:
    server = start_acme2certifier(
        tmp_path_factory.mktemp("a2c"),
        retry_after=SERVER_RETRY_AFTER,
        renewal_threshold_pct=THRESHOLD_PCT,
    )
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def issued(a2c: A2C) -> x509.Certificate:
    return issue_with_reference_client(a2c, ["ari.edgeproxy.test"])


# --- the server side, with an independently issued certificate ---------------------------


def test_directory_advertises_renewal_info(a2c: A2C) -> None:
    directory = httpx.get(a2c.directory_url, timeout=10.0).json()

    assert directory["renewalInfo"] == a2c.renewal_info_url


def test_cert_id_names_the_issuing_ca_key(a2c: A2C, issued: x509.Certificate) -> None:
    ca_cert = x509.load_pem_x509_certificate(a2c.ca_cert_pem)
    ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest

    aki_part, serial_part = cert_id(issued).split(".")

    assert _unb64(aki_part) == ski
    assert int.from_bytes(_unb64(serial_part), "big", signed=True) == issued.serial_number


def test_server_serves_the_window_for_our_cert_id(a2c: A2C, issued: x509.Certificate) -> None:
    now = datetime.now(UTC)

    response = _fetch(a2c, cert_id(issued))

    assert response.status_code == 200, response.text
    assert response.headers["Retry-After"] == str(SERVER_RETRY_AFTER)
    info = parse_renewal_info(response.content, response.headers.get("Retry-After"), now)
    start, end = _expected_window(issued, THRESHOLD_PCT)
    assert (info.start, info.end) == (start, end)
    assert info.retry_after == RETRY_AFTER_MIN  # 30 s from the server, raised to one minute
    assert info.explanation_url is None
    chosen = choose_renewal_time(info, now)
    assert start <= chosen <= end


def _flip_aki(ident: str) -> str:
    aki, serial = ident.split(".")
    raw = bytearray(_unb64(aki))
    raw[-1] ^= 0x01
    return f"{_b64(bytes(raw))}.{serial}"


def _bump_serial(ident: str) -> str:
    aki, serial = ident.split(".")
    value = int.from_bytes(_unb64(serial), "big", signed=True) + 1
    return f"{aki}.{_b64(value.to_bytes(value.bit_length() // 8 + 1, 'big', signed=True))}"


def _foreign_cert_id() -> str:
    # A certificate from another CA, never seen by acme2certifier.
    leaf = trustme.CA().issue_cert("ari.edgeproxy.test").cert_chain_pems[0].bytes()
    return cert_id(x509.load_pem_x509_certificate(leaf))


@pytest.mark.parametrize(
    "wrong",
    [_flip_aki, _bump_serial, lambda _ident: _foreign_cert_id()],
    ids=["aki-off-by-one-bit", "serial-plus-one", "other-ca"],
)
def test_server_refuses_any_other_cert_id(
    a2c: A2C, issued: x509.Certificate, wrong: Callable[[str], str]
) -> None:
    ident = wrong(cert_id(issued))
    assert ident != cert_id(issued)

    response = _fetch(a2c, ident)

    assert response.status_code == 404, response.text
    assert response.json()["type"] == "urn:ietf:params:acme:error:malformed"


def test_server_refuses_garbage_cert_id(a2c: A2C) -> None:
    response = _fetch(a2c, "not-a-cert-id")

    assert response.status_code in (400, 404), response.text


@pytest.mark.parametrize(
    ("server_retry_after", "expected"),
    [(7200, 7200.0), (10**6, RETRY_AFTER_MAX)],
    ids=["in-range-honoured", "above-a-day-lowered"],
)
def test_retry_after_from_the_server_is_honoured_within_limits(
    tmp_path: Path, server_retry_after: int, expected: float
) -> None:
    # The too-small side (30 s -> 60 s) is covered by the module server above.
    with start_acme2certifier(tmp_path, retry_after=server_retry_after) as server:
        cert = issue_with_reference_client(server, ["retry.edgeproxy.test"])

        response = _fetch(server, cert_id(cert))

    assert response.status_code == 200, response.text
    assert response.headers["Retry-After"] == str(server_retry_after)
    info = parse_renewal_info(response.content, response.headers["Retry-After"], datetime.now(UTC))
    assert info.retry_after == expected


def test_forced_renewal_window_means_renew_now_or_soon(tmp_path: Path) -> None:
    # renewal_force makes acme2certifier answer "a year ago .. tomorrow": the CA wants the
    # certificate replaced. The draw must come from what is left, never from the past.
    with start_acme2certifier(tmp_path, renewal_force=True) as server:
        cert = issue_with_reference_client(server, ["force.edgeproxy.test"])
        now = datetime.now(UTC)

        response = _fetch(server, cert_id(cert))

    assert response.status_code == 200, response.text
    info = parse_renewal_info(response.content, response.headers.get("Retry-After"), now)
    assert info.start < now < info.end <= now + timedelta(days=1, minutes=5)
    assert choose_renewal_time(info, now, lambda: 0.0) == now
    assert choose_renewal_time(info, now, lambda: 1.0) == info.end


# --- the same through edgeproxy's own ACME client ----------------------------------------


class _AlreadyValidSolver:
    """acme2certifier validates nothing here, so presenting a challenge is a no-op."""

    challenge_type = "tls-alpn-01"

    def __init__(self) -> None:
        self.presented: list[str] = []
        self.cleaned: list[str] = []

    async def present(self, identifier: str, token: str, key_authorization: str) -> None:
        self.presented.append(identifier)

    async def cleanup(self, identifier: str, token: str) -> None:
        self.cleaned.append(identifier)


def _leaf(pem: bytes) -> x509.Certificate:
    return x509.load_pem_x509_certificate(pem)


async def test_client_issues_and_reads_the_same_renewal_info(a2c: A2C) -> None:
    solver = _AlreadyValidSolver()

    async with AcmeClient(a2c.directory_url, ec.generate_private_key(ec.SECP256R1())) as client:
        directory = await client.directory()
        assert directory.renewal_info == a2c.renewal_info_url
        await client.register()
        chain = await client.issue(
            ["client.edgeproxy.test"], ec.generate_private_key(ec.SECP256R1()), solver
        )
        cert = _leaf(chain.pem)

        info = await client.renewal_info(cert)

    assert solver.presented == solver.cleaned == ["client.edgeproxy.test"]
    assert isinstance(info, RenewalInfo)
    # The client's reading matches what the server serves to a plain GET of our CertID ...
    response = _fetch(a2c, cert_id(cert))
    assert response.status_code == 200, response.text
    direct = parse_renewal_info(
        response.content, response.headers.get("Retry-After"), datetime.now(UTC)
    )
    assert (info.start, info.end) == (direct.start, direct.end)
    # ... and what acme2certifier's rule gives for this very certificate.
    assert (info.start, info.end) == _expected_window(cert, THRESHOLD_PCT)
    # The server said 30 s; ARI's floor makes it a minute.
    assert info.retry_after == RETRY_AFTER_MIN


async def test_client_renewal_with_replaces_is_accepted(a2c: A2C) -> None:
    solver = _AlreadyValidSolver()

    async with AcmeClient(a2c.directory_url, ec.generate_private_key(ec.SECP256R1())) as client:
        await client.register()
        first = _leaf(
            (
                await client.issue(
                    ["renew.edgeproxy.test"], ec.generate_private_key(ec.SECP256R1()), solver
                )
            ).pem
        )
        second = _leaf(
            (
                await client.issue(
                    ["renew.edgeproxy.test"],
                    ec.generate_private_key(ec.SECP256R1()),
                    solver,
                    replaces=cert_id(first),
                )
            ).pem
        )
        second_info = await client.renewal_info(second)

    assert cert_id(second) != cert_id(first)
    # acme2certifier ignores "replaces" rather than refusing it, so nothing was dropped.
    assert client.stats.get("replaces_dropped", 0) == 0
    assert second_info is not None
    assert (second_info.start, second_info.end) == _expected_window(second, THRESHOLD_PCT)
