"""The ACME client against a real CA: Debian's pebble, validating over real TLS-ALPN-01.

Each test tells one story: a fresh pebble (its DNS answers 127.0.0.1 for every name), our
``TlsAlpnResponder`` on pebble's ``tlsPort`` serving RFC 8737 certificates by SNI, and an
``AcmeClient`` that registers, orders, proves control and downloads. Where pebble cannot
misbehave on demand (``replaces`` refusals, 503s, dropped connections), a ``FaultInjector``
sits between client and pebble and lies on purpose.

Issued chains are checked with the real ``openssl verify`` against the roots pebble's
management interface reports, so "the chain verifies" means what it says.
"""

from __future__ import annotations

import ssl
import subprocess
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from edgeproxy.acme import (
    AccountDoesNotExist,
    AcmeProblem,
    AcmeTimeout,
    AcmeTransportError,
    AlreadyRevoked,
    BadNonce,
    ChallengeUnavailable,
    ExternalAccountRequired,
    OrderInvalid,
    RateLimited,
    Unauthorized,
    decode_eab_hmac_key,
)
from edgeproxy.acme.ari import cert_id
from edgeproxy.acme.client import BAD_NONCE_RETRIES, AcmeClient
from edgeproxy.acme.jws import AccountKey
from edgeproxy.acme.messages import split_pem_chain
from testkit.pebble import (
    FaultInjector,
    InjectedRequest,
    Pebble,
    Reply,
    TlsAlpnResponder,
    reject_first_replaces,
)
from testkit.ports import free_port

MakePebble = Callable[..., Pebble]

# Pebble's default rejects 5 % of nonces; most stories want no noise, the chaos one wants lots.
QUIET = {"PEBBLE_WFE_NONCEREJECT": "0"}
EAB_KID = "kid-1"
EAB_KEY = "zWNDZM6eQGHWpSRTPal5eIUYFTu7EajVIoguysqZ9wG44nMEtx3MUAsUDkMTQ12W"


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@asynccontextmanager
async def _client(
    directory_url: str, pebble: Pebble, key: AccountKey | None = None, **kwargs: Any
) -> AsyncIterator[AcmeClient]:
    async with AcmeClient(
        directory_url, key or _key(), verify=str(pebble.ca_bundle_path), **kwargs
    ) as client:
        yield client


def _certs(pem: bytes) -> list[x509.Certificate]:
    return [x509.load_pem_x509_certificate(block) for block in split_pem_chain(pem)]


def _issuer_cn(cert: x509.Certificate) -> str:
    return str(cert.issuer.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)


def _subject_cn(pem: bytes) -> str:
    cert = x509.load_pem_x509_certificate(pem)
    return str(cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)


def _openssl_verify(tmp_path: Path, chain_pem: bytes, roots_pem: bytes) -> None:
    """``openssl verify`` the leaf against ``roots_pem`` with the rest of the chain untrusted."""
    blocks = split_pem_chain(chain_pem)
    (tmp_path / "leaf.pem").write_bytes(blocks[0])
    (tmp_path / "untrusted.pem").write_bytes(b"".join(blocks[1:]))
    (tmp_path / "roots.pem").write_bytes(roots_pem)
    result = subprocess.run(
        [
            "openssl",
            "verify",
            "-CAfile",
            str(tmp_path / "roots.pem"),
            "-untrusted",
            str(tmp_path / "untrusted.pem"),
            str(tmp_path / "leaf.pem"),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def _public_der(key: ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey) -> bytes:
    public = key.public_key() if isinstance(key, ec.EllipticCurvePrivateKey) else key
    return public.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


async def _injector(nursery: trio.Nursery, pebble: Pebble, **kwargs: object) -> FaultInjector:
    injector = FaultInjector(pebble, **kwargs)  # type: ignore[arg-type]
    await nursery.start(injector.serve)
    return injector


# --- 1. the happy path ------------------------------------------------------------------


async def test_issues_for_two_names_with_a_verifying_chain(
    alpn_responder: TlsAlpnResponder, make_pebble: MakePebble, tmp_path: Path
) -> None:
    pebble = make_pebble(tls_port=alpn_responder.port, env=QUIET)
    names = ["www.edgeproxy.test", "api.edgeproxy.test"]
    cert_key = _key()

    async with _client(pebble.directory_url, pebble) as client:
        account = await client.register(contact=["mailto:ops@edgeproxy.test"])
        chain = await client.issue(names, cert_key, alpn_responder)

    assert account.status == "valid"
    assert account.contact == ("mailto:ops@edgeproxy.test",)
    leaf, *intermediates = _certs(chain.pem)
    assert intermediates, "pebble sends the leaf with its intermediate"
    sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sorted(sans.get_values_for_type(x509.DNSName)) == sorted(names)
    assert _public_der(leaf.public_key()) == _public_der(cert_key)  # type: ignore[arg-type]
    _openssl_verify(tmp_path, chain.pem, pebble.roots_pem())
    # Pebble really validated both names over TLS-ALPN-01 (several perspectives each) ...
    assert all(alpn_responder.hellos.get(name, 0) >= 1 for name in names)
    # ... and the solver was asked to withdraw both challenges afterwards.
    assert sorted(alpn_responder.presented) == sorted(names)
    assert alpn_responder._contexts == {}
    assert client.stats["issuances"] == 1
    assert client.stats.get("bad_nonce_retries", 0) == 0


async def test_short_lived_certificates_from_config(
    alpn_responder: TlsAlpnResponder, make_pebble: MakePebble
) -> None:
    # Later renewal tests need ~90 s certificates: pebble 2.4 reads certificateValidityPeriod.
    pebble = make_pebble(tls_port=alpn_responder.port, env=QUIET, validity=90)

    async with _client(pebble.directory_url, pebble) as client:
        await client.register()
        chain = await client.issue(["brief.edgeproxy.test"], _key(), alpn_responder)

    leaf = _certs(chain.pem)[0]
    lifetime = leaf.not_valid_after_utc - leaf.not_valid_before_utc
    assert timedelta(seconds=85) <= lifetime <= timedelta(seconds=95)


# --- 2. chaos: half the nonces rejected -------------------------------------------------


async def test_issues_while_pebble_rejects_half_the_nonces(
    alpn_responder: TlsAlpnResponder, make_pebble: MakePebble, tmp_path: Path
) -> None:
    pebble = make_pebble(tls_port=alpn_responder.port, env={"PEBBLE_WFE_NONCEREJECT": "50"})

    # At 50 % a request fails six times in a row with p = 1/64; over the ~12 signed requests
    # of an issuance the default budget of 5 retries would lose ~17 % of runs. This story is
    # about the retry working, so it gets a budget that makes a loss (p ~ 2e-6) a real bug.
    async with _client(pebble.directory_url, pebble, bad_nonce_retries=20) as client:
        await client.register()
        chain = await client.issue(["chaos.edgeproxy.test"], _key(), alpn_responder)

    _openssl_verify(tmp_path, chain.pem, pebble.roots_pem())
    assert client.stats["bad_nonce_retries"] > 0


async def test_bad_nonce_retries_are_bounded(
    alpn_responder: TlsAlpnResponder, make_pebble: MakePebble
) -> None:
    pebble = make_pebble(tls_port=alpn_responder.port, env={"PEBBLE_WFE_NONCEREJECT": "100"})

    async with _client(pebble.directory_url, pebble) as client:
        with pytest.raises(BadNonce) as caught:
            await client.register()

    assert caught.value.status == 400
    assert client.stats["bad_nonce_retries"] == BAD_NONCE_RETRIES
    assert client.stats["http_requests.newAccount"] == BAD_NONCE_RETRIES + 1


# --- 3. external account binding --------------------------------------------------------


async def test_eab_required_then_satisfied(
    alpn_responder: TlsAlpnResponder, make_pebble: MakePebble
) -> None:
    pebble = make_pebble(tls_port=alpn_responder.port, env=QUIET, eab_keys={EAB_KID: EAB_KEY})
    key = _key()

    async with _client(pebble.directory_url, pebble, key) as client:
        assert (await client.directory()).external_account_required
        with pytest.raises(ExternalAccountRequired):
            await client.register()
        with pytest.raises(Unauthorized) as wrong_mac:
            await client.register(eab=(EAB_KID, b"not the key the CA handed out"))
        account = await client.register(eab=(EAB_KID, decode_eab_hmac_key(EAB_KEY)))
        chain = await client.issue(["eab.edgeproxy.test"], _key(), alpn_responder)

    assert "external account binding" in wrong_mac.value.detail
    assert account.status == "valid"
    assert client.account_url == account.url
    assert split_pem_chain(chain.pem)


# --- 4. alternate chains ----------------------------------------------------------------


async def test_alternate_chains_and_preferred_chain(
    alpn_responder: TlsAlpnResponder, make_pebble: MakePebble, tmp_path: Path
) -> None:
    pebble = make_pebble(tls_port=alpn_responder.port, env={**QUIET, "PEBBLE_ALTERNATE_ROOTS": "2"})
    roots = pebble.root_pems()
    assert len(roots) == 3
    root_names = [_subject_cn(root) for root in roots]

    async with _client(pebble.directory_url, pebble) as client:
        await client.register()
        default = await client.issue(["alt.edgeproxy.test"], _key(), alpn_responder)
        default_top = _issuer_cn(_certs(default.pem)[-1])
        wanted = next(name for name in root_names if name != default_top)
        preferred = await client.issue(
            ["alt.edgeproxy.test"], _key(), alpn_responder, preferred_chain=wanted
        )

    # Without a preference: the CA's default chain, two alternates, one per extra root.
    assert len(default.alternates) == 2
    tops = {default_top} | {_issuer_cn(_certs(alt)[-1]) for alt in default.alternates}
    assert tops == set(root_names)
    # With one: the chain that ends under the requested root, the rest as alternates.
    assert _issuer_cn(_certs(preferred.pem)[-1]) == wanted
    assert len(preferred.alternates) == 2
    wanted_root = roots[root_names.index(wanted)]
    _openssl_verify(tmp_path, preferred.pem, wanted_root)
    with pytest.raises(AssertionError):  # and it really is a different trust path
        _openssl_verify(tmp_path, preferred.pem, roots[root_names.index(default_top)])
    for chain in preferred.alternates:
        _openssl_verify(tmp_path, chain, pebble.roots_pem())


# --- 5. revocation ----------------------------------------------------------------------


def _revocation_status(pebble: Pebble, cert: x509.Certificate) -> str:
    """What pebble's management interface says about ``cert``: "Valid" or "Revoked"."""
    response = httpx.get(
        f"{pebble.management_url}/cert-status-by-serial/{cert.serial_number:x}",
        verify=ssl.create_default_context(cafile=pebble.ca_bundle_path),
        timeout=10.0,
    )
    response.raise_for_status()
    return str(response.json()["Status"])


async def test_revoke_then_revoke_again(
    alpn_responder: TlsAlpnResponder, make_pebble: MakePebble
) -> None:
    pebble = make_pebble(tls_port=alpn_responder.port, env=QUIET)
    cert_key = _key()

    async with _client(pebble.directory_url, pebble) as client:
        await client.register()
        leaf = _certs((await client.issue(["gone.edgeproxy.test"], cert_key, alpn_responder)).pem)[
            0
        ]
        assert _revocation_status(pebble, leaf) == "Valid"
        await client.revoke(leaf, reason=4)  # superseded
        assert _revocation_status(pebble, leaf) == "Revoked"
        with pytest.raises(AlreadyRevoked) as again:
            await client.revoke(leaf)
        # Revocation signed by the certificate's own key (jwk header, RFC 8555 s7.6).
        other_key = _key()
        other = _certs(
            (await client.issue(["also.edgeproxy.test"], other_key, alpn_responder)).pem
        )[0]
        await client.revoke(other, cert_key=other_key)

    assert again.value.status == 400
    assert _revocation_status(pebble, other) == "Revoked"


# --- 6. finding the account again, and rolling its key ----------------------------------


async def test_find_account_by_key_and_key_rollover(
    alpn_responder: TlsAlpnResponder, make_pebble: MakePebble
) -> None:
    pebble = make_pebble(tls_port=alpn_responder.port, env=QUIET)
    key, new_key = _key(), rsa.generate_private_key(65537, 2048)

    async with _client(pebble.directory_url, pebble, key) as first:
        registered = await first.register()
    async with _client(pebble.directory_url, pebble, key) as again:
        found = await again.find_account()
        # Registering an existing key is not an error: the CA returns the same account.
        assert (await again.register()).url == registered.url
    async with _client(pebble.directory_url, pebble, _key()) as stranger:
        assert await stranger.find_account() is None
        with pytest.raises(AccountDoesNotExist):
            await stranger.issue(["nobody.edgeproxy.test"], _key(), alpn_responder)

    async with _client(pebble.directory_url, pebble, key, account_url=registered.url) as owner:
        await owner.key_rollover(new_key)  # EC P-256 -> RSA: RS256 from now on
        chain = await owner.issue(["rolled.edgeproxy.test"], _key(), alpn_responder)
    async with _client(pebble.directory_url, pebble, new_key) as by_new_key:
        after_new = await by_new_key.find_account()
    async with _client(pebble.directory_url, pebble, key) as by_old_key:
        after_old = await by_old_key.find_account()

    assert found is not None and found.url == registered.url
    assert split_pem_chain(chain.pem)
    assert after_new is not None and after_new.url == registered.url
    assert after_old is None


# --- 7. a validation that fails ---------------------------------------------------------


class _WrongKeyAuthorization:
    """Presents a certificate for the right name but the wrong key authorization."""

    challenge_type = "tls-alpn-01"

    def __init__(self, responder: TlsAlpnResponder) -> None:
        self.responder = responder
        self.cleaned: list[str] = []

    async def present(self, identifier: str, token: str, key_authorization: str) -> None:
        await self.responder.present(identifier, token, key_authorization + "-tampered")

    async def cleanup(self, identifier: str, token: str) -> None:
        self.cleaned.append(identifier)
        await self.responder.cleanup(identifier, token)


async def test_failed_validation_raises_order_invalid_with_the_challenge_problem(
    alpn_responder: TlsAlpnResponder, make_pebble: MakePebble
) -> None:
    pebble = make_pebble(tls_port=alpn_responder.port, env=QUIET)
    solver = _WrongKeyAuthorization(alpn_responder)

    async with _client(pebble.directory_url, pebble) as client:
        await client.register()
        with pytest.raises(OrderInvalid) as caught:
            await client.issue(["liar.edgeproxy.test"], _key(), solver)

    assert caught.value.identifier == "liar.edgeproxy.test"
    # Pebble reports a bad acmeIdentifier value as "unauthorized" (RFC 8555 s6.7).
    assert isinstance(caught.value.problem, Unauthorized)
    assert "acmeValidation" in caught.value.problem.detail
    assert solver.cleaned == ["liar.edgeproxy.test"]
    assert alpn_responder.hellos.get("liar.edgeproxy.test", 0) >= 1


async def test_unsupported_challenge_type_is_typed(
    alpn_responder: TlsAlpnResponder, make_pebble: MakePebble
) -> None:
    pebble = make_pebble(tls_port=alpn_responder.port, env=QUIET)

    class CarrierPigeon:
        challenge_type = "pigeon-01"

        async def present(self, identifier: str, token: str, key_authorization: str) -> None:
            raise AssertionError("never asked: pebble offers no pigeon-01")

        async def cleanup(self, identifier: str, token: str) -> None:
            raise AssertionError("never asked")

    async with _client(pebble.directory_url, pebble) as client:
        await client.register()
        with pytest.raises(ChallengeUnavailable) as caught:
            await client.issue(["bird.edgeproxy.test"], _key(), CarrierPigeon())

    assert "tls-alpn-01" in caught.value.offered


async def test_deadline_bounds_the_flow_and_cleanup_still_runs(
    alpn_responder: TlsAlpnResponder, make_pebble: MakePebble
) -> None:
    pebble = make_pebble(tls_port=alpn_responder.port, env=QUIET)

    class Stuck:
        challenge_type = "tls-alpn-01"
        cleaned: list[str] = []

        async def present(self, identifier: str, token: str, key_authorization: str) -> None:
            await trio.sleep_forever()

        async def cleanup(self, identifier: str, token: str) -> None:
            self.cleaned.append(identifier)

    solver = Stuck()
    async with _client(pebble.directory_url, pebble) as client:
        await client.register()
        with pytest.raises(AcmeTimeout):
            await client.issue(["slow.edgeproxy.test"], _key(), solver, deadline=0.5)

    assert solver.cleaned == ["slow.edgeproxy.test"]


async def test_unadvertised_profile_is_dropped(
    alpn_responder: TlsAlpnResponder, make_pebble: MakePebble
) -> None:
    pebble = make_pebble(tls_port=alpn_responder.port, env=QUIET)

    async with _client(pebble.directory_url, pebble) as client:
        await client.register()
        assert (await client.directory()).profiles == {}
        chain = await client.issue(
            ["profile.edgeproxy.test"], _key(), alpn_responder, profile="shortlived"
        )

    assert split_pem_chain(chain.pem)
    assert client.stats["profile_dropped"] == 1


# --- 8. replaces refused: retry once without it (through the fault injector) -----------


def _new_orders(injector: FaultInjector) -> list[InjectedRequest]:
    return [r for r in injector.seen if r.jws_payload and "identifiers" in r.jws_payload]


# Whatever the CA says to a newOrder carrying `replaces` (issue 16: a CA that does not know
# RFC 9773 CertIDs answers 404 malformed without naming the field), the order is retried once
# without it.
@pytest.mark.parametrize(
    ("status", "type_", "detail"),
    [
        (409, "urn:ietf:params:acme:error:alreadyReplaced", "already replaced"),
        (404, "urn:ietf:params:acme:error:malformed", "Certificate not found for certID X.Y"),
        (400, "urn:ietf:params:acme:error:unauthorized", "not your certificate"),
        (500, "urn:ietf:params:acme:error:serverInternal", "oops"),
        (403, "about:blank", "Forbidden"),
    ],
)
async def test_any_refusal_of_replaces_is_retried_once_without_it(
    alpn_responder: TlsAlpnResponder,
    make_pebble: MakePebble,
    nursery: trio.Nursery,
    status: int,
    type_: str,
    detail: str,
) -> None:
    pebble = make_pebble(tls_port=alpn_responder.port, env=QUIET)
    injector = await _injector(
        nursery, pebble, rules=[reject_first_replaces(type_, status, detail)]
    )
    names = ["renew.edgeproxy.test"]

    async with _client(injector.directory_url, pebble) as client:
        assert (await client.directory()).renewal_info == f"{injector.base_url}/renewal-info"
        await client.register()
        first = _certs((await client.issue(names, _key(), alpn_responder)).pem)[0]
        window = await client.renewal_info(first)
        second = _certs(
            (await client.issue(names, _key(), alpn_responder, replaces=cert_id(first))).pem
        )[0]

    assert client.stats["replaces_dropped"] == 1
    orders = _new_orders(injector)
    assert [o.jws_payload.get("replaces") for o in orders if o.jws_payload] == [
        None,
        cert_id(first),
        None,
    ]
    assert [o.injected for o in orders] == [False, True, False]
    assert second.serial_number != first.serial_number
    # The injector's synthetic ARI answer went through the client's renewal_info path.
    assert window is not None
    assert window.start > datetime.now(UTC) + timedelta(days=29)
    assert window.retry_after == 21600


async def test_replaces_is_not_sent_without_ari(
    alpn_responder: TlsAlpnResponder, make_pebble: MakePebble, nursery: trio.Nursery
) -> None:
    pebble = make_pebble(tls_port=alpn_responder.port, env=QUIET)
    injector = await _injector(nursery, pebble, advertise_renewal_info=False)

    async with _client(injector.directory_url, pebble) as client:
        await client.register()
        first = _certs((await client.issue(["plain.edgeproxy.test"], _key(), alpn_responder)).pem)
        await client.issue(
            ["plain.edgeproxy.test"], _key(), alpn_responder, replaces=cert_id(first[0])
        )
        assert await client.renewal_info(first[0]) is None

    assert all("replaces" not in (o.jws_payload or {}) for o in _new_orders(injector))
    assert client.stats.get("replaces_dropped", 0) == 0


# --- transport and server trouble, through the fault injector --------------------------


async def test_rate_limit_and_503_surface_retry_after(
    alpn_responder: TlsAlpnResponder, make_pebble: MakePebble, nursery: trio.Nursery
) -> None:
    pebble = make_pebble(tls_port=alpn_responder.port, env=QUIET)
    replies = [
        Reply.problem(429, "urn:ietf:params:acme:error:rateLimited", "too many certificates"),
        Reply(503, b"<html>down for maintenance</html>", (("Retry-After", "7"),)),
    ]
    replies[0] = Reply(429, replies[0].body, (*replies[0].headers, ("Retry-After", "3600")))

    def busy(request: InjectedRequest) -> Reply | None:
        if request.jws_payload and "identifiers" in request.jws_payload and replies:
            return replies.pop(0)
        return None

    injector = await _injector(nursery, pebble, rules=[busy])
    async with _client(injector.directory_url, pebble) as client:
        await client.register()
        with pytest.raises(RateLimited) as limited:
            await client.issue(["busy.edgeproxy.test"], _key(), alpn_responder)
        with pytest.raises(AcmeProblem) as unavailable:
            await client.issue(["busy.edgeproxy.test"], _key(), alpn_responder)
        chain = await client.issue(["busy.edgeproxy.test"], _key(), alpn_responder)

    assert limited.value.retry_after == 3600.0
    assert limited.value.status == 429
    assert unavailable.value.status == 503
    assert unavailable.value.retry_after == 7.0
    assert "maintenance" in unavailable.value.detail
    assert split_pem_chain(chain.pem)


async def test_dropped_reads_are_retried_dropped_writes_are_not(
    alpn_responder: TlsAlpnResponder, make_pebble: MakePebble, nursery: trio.Nursery
) -> None:
    pebble = make_pebble(tls_port=alpn_responder.port, env=QUIET)
    drops = {"authz": 1, "order": 1}

    def flaky(request: InjectedRequest) -> Reply | None:
        # The first POST-as-GET of an authorization, and the first newOrder, die mid-request.
        is_authz_read = request.jws_payload is None and "/authZ/" in request.path
        if request.method == "POST" and is_authz_read and drops["authz"]:
            drops["authz"] -= 1
            return Reply.drop()
        if request.jws_payload and "identifiers" in request.jws_payload and drops["order"]:
            drops["order"] -= 1
            return Reply.drop()
        return None

    injector = await _injector(nursery, pebble, rules=[flaky])
    async with _client(injector.directory_url, pebble) as client:
        await client.register()
        with pytest.raises(AcmeTransportError) as write_lost:
            await client.issue(["flaky.edgeproxy.test"], _key(), alpn_responder)
        chain = await client.issue(["flaky.edgeproxy.test"], _key(), alpn_responder)

    assert write_lost.value.request_sent
    assert client.stats["transport_retries"] == 1  # the read, once
    assert split_pem_chain(chain.pem)


async def test_unreachable_ca_is_a_transport_error() -> None:
    port = free_port()  # nothing listens there
    async with AcmeClient(f"https://127.0.0.1:{port}/dir", _key()) as client:
        with pytest.raises(AcmeTransportError) as caught:
            await client.directory()

    assert not caught.value.request_sent
    assert client.stats["transport_retries"] == 3
    assert client.stats["http_requests.directory"] == 4
