"""ACME messages, sans-IO: JSON and headers in, frozen dataclasses and typed problems out.

Owns: reading every ACME resource the client meets (directory s7.1.1, account s7.1.2, order
s7.1.3, authorization s7.1.4, challenge s8) into immutable values; problem documents (s6.7,
RFC 7807) into the ``AcmeProblem`` subclass named by their type; Retry-After (RFC 9110
s10.2.3) and Link (RFC 8288) headers; the request payloads we send; the CSR; choosing among
alternate chains (s7.4.2).

Must not know: sockets, httpx, trio, signing. Everything here is a pure function of its
arguments, so every edge case is a unit test with literal bytes.

Errors: a body we cannot read raises ``AcmeProtocolError`` naming the resource and the field;
a problem document never raises, it *returns* the problem for the caller to raise.
"""

from __future__ import annotations

import email.utils
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any
from urllib.parse import urljoin

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes
from cryptography.x509.oid import NameOID

from edgeproxy.acme.errors import AcmeProblem, AcmeProtocolError, Subproblem, problem_class
from edgeproxy.acme.jws import b64url

__all__ = [
    "Account",
    "Authorization",
    "CertificateChain",
    "Challenge",
    "Directory",
    "Identifier",
    "Order",
    "build_csr",
    "finalize_payload",
    "header",
    "new_account_payload",
    "new_order_payload",
    "parse_account",
    "parse_authorization",
    "parse_challenge",
    "parse_directory",
    "parse_json",
    "parse_links",
    "parse_order",
    "parse_retry_after",
    "poll_wait",
    "problem_from_json",
    "problem_from_response",
    "revoke_payload",
    "select_chain",
    "split_pem_chain",
]

JSON = dict[str, Any]
PEM_CHAIN = "application/pem-certificate-chain"
PROBLEM_JSON = "application/problem+json"

# RFC 8555 s7.1.6 status values in which a resource is still moving; anything else is final.
PENDING_STATES = frozenset({"pending", "processing"})


@dataclass(frozen=True, slots=True)
class Identifier:
    """An ACME identifier (RFC 8555 s9.7.7); we only ever order ``dns``."""

    type: str
    value: str


@dataclass(frozen=True, slots=True)
class Directory:
    """The directory resource (RFC 8555 s7.1.1) with its ``meta`` flattened in.

    ``renewal_info`` is set when the CA offers ARI (RFC 9773 s3); ``profiles`` maps profile
    name to description (draft-ietf-acme-profiles), empty when none are advertised. A URL the
    CA omitted is ``""``; the client refuses to use it with a clear error.
    """

    url: str
    new_nonce: str
    new_account: str
    new_order: str
    revoke_cert: str
    key_change: str
    renewal_info: str | None
    terms_of_service: str | None
    external_account_required: bool
    profiles: Mapping[str, str]


@dataclass(frozen=True, slots=True)
class Account:
    """An account resource (RFC 8555 s7.1.2): its URL (the JWS ``kid``), status, contacts."""

    url: str
    status: str
    contact: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Challenge:
    """A challenge (RFC 8555 s7.1.5, s8); ``error`` is set when validation failed."""

    type: str
    url: str
    status: str
    token: str | None
    error: AcmeProblem | None = None
    validated: str | None = None


@dataclass(frozen=True, slots=True)
class Authorization:
    """An authorization (RFC 8555 s7.1.4) for one identifier, with its challenges."""

    url: str
    identifier: Identifier
    status: str
    challenges: tuple[Challenge, ...]
    wildcard: bool = False
    expires: str | None = None

    def challenge(self, type_: str) -> Challenge | None:
        """The first challenge of ``type_`` (``tls-alpn-01``), or None if not offered."""
        return next((c for c in self.challenges if c.type == type_), None)

    def failed_challenge(self) -> Challenge | None:
        """The challenge that carries an error, the reason an invalid authorization failed."""
        return next((c for c in self.challenges if c.error is not None), None)


@dataclass(frozen=True, slots=True)
class Order:
    """An order (RFC 8555 s7.1.3); ``url`` is its Location, ``error`` set when invalid."""

    url: str
    status: str
    identifiers: tuple[Identifier, ...]
    authorizations: tuple[str, ...]
    finalize: str
    certificate: str | None = None
    error: AcmeProblem | None = None
    expires: str | None = None
    profile: str | None = None
    replaces: str | None = None


@dataclass(frozen=True, slots=True)
class CertificateChain:
    """A downloaded certificate (RFC 8555 s7.4.2).

    ``pem`` is the chosen chain (leaf first); ``alternates`` the other chains the CA offered
    via ``Link: rel="alternate"`` (including the default one when a preferred chain won).
    """

    pem: bytes
    alternates: tuple[bytes, ...] = ()


# --- headers ---------------------------------------------------------------------------


def header(headers: Mapping[str, str], name: str) -> str | None:
    """Case-insensitive header lookup that works for plain dicts and httpx.Headers alike."""
    value = headers.get(name)
    if value is not None:
        return value
    lowered = name.lower()
    for key, val in headers.items():
        if key.lower() == lowered:
            return val
    return None


def parse_retry_after(value: str | None, now: datetime) -> float | None:
    """Seconds to wait from a Retry-After value (RFC 9110 s10.2.3), or None if absent/garbage.

    Accepts delta-seconds and HTTP-dates (relative to the timezone-aware ``now``; a date in
    the past gives 0.0). Clamping to a sane range is the caller's business: a rate-limit
    wait of hours is real information, a poll interval of hours is not.
    """
    if value is None:
        return None
    text = value.strip()
    if not text:
        return None
    if text.isascii() and text.isdigit():
        # Beyond 15 digits (30 million years) it is garbage, and int()/float() would raise.
        return float(int(text)) if len(text) <= 15 else None
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError, OverflowError):  # Overflow: a day of 10**30
        return None
    if when.tzinfo is None:  # HTTP-dates are GMT by definition (RFC 9110 s5.6.7)
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - now).total_seconds())


def poll_wait(delay: float, retry_after: float | None, cap: float) -> float:
    """The pause before the next poll: our own ``delay``, stretched by the CA's Retry-After.

    RFC 8555 s7.5.1/s7.4 let the CA say how long to wait; we never poll sooner than asked,
    but a Retry-After beyond ``cap`` is clamped (a confused CA must not park an issuance for
    an hour; the caller's deadline ends it anyway). A Retry-After shorter than our delay
    does not speed us up.
    """
    if retry_after is None:
        return delay
    return max(delay, min(retry_after, cap))


_LINK = re.compile(r"<([^>]*)>((?:\s*;\s*[^;,]+)*)")
_LINK_PARAM = re.compile(r";\s*([A-Za-z0-9!#$&+\-.^_`|~*]+)\s*=\s*(\"[^\"]*\"|[^;,\s]+)")


def parse_links(values: Iterable[str], base_url: str) -> list[tuple[str, str]]:
    """``(absolute URL, rel)`` for every link in the Link header values (RFC 8288 s3).

    ACME servers send several links with the same ``rel`` (``alternate`` chains, s7.4.2), so
    this returns all of them in order instead of a dict. A ``rel`` with several
    space-separated types yields one pair per type.
    """
    links: list[tuple[str, str]] = []
    for value in values:
        for match in _LINK.finditer(value):
            try:
                target = urljoin(base_url, match.group(1).strip())
            except ValueError:  # e.g. an unbalanced "[" in the host: not a usable link
                continue
            for name, raw in _LINK_PARAM.findall(match.group(2)):
                if name.lower() == "rel":
                    for rel in raw.strip('"').split():
                        links.append((target, rel.lower()))
    return links


# --- problems ---------------------------------------------------------------------------


def problem_from_json(
    doc: Mapping[str, Any], *, status: int = 0, retry_after: float | None = None
) -> AcmeProblem:
    """An ``AcmeProblem`` (the subclass its ``type`` names) from a problem object (s6.7).

    Used for response bodies and for the ``error`` fields embedded in orders and challenges.
    Tolerant by design: a problem is already bad news, so a malformed one still becomes an
    ``AcmeProblem`` rather than masking the CA's message with a parse error.
    """
    type_ = doc.get("type")
    if not isinstance(type_, str) or not type_:
        type_ = "about:blank"  # RFC 7807 s4.2
    detail = doc.get("detail")
    body_status = doc.get("status")
    if not status and isinstance(body_status, int):
        status = body_status
    subproblems: list[Subproblem] = []
    raw_subs = doc.get("subproblems")
    if isinstance(raw_subs, list):
        for sub in raw_subs:
            if not isinstance(sub, Mapping):
                continue
            ident = sub.get("identifier")
            ident_value = ident.get("value") if isinstance(ident, Mapping) else None
            sub_type = sub.get("type")
            sub_detail = sub.get("detail")
            subproblems.append(
                Subproblem(
                    type=sub_type if isinstance(sub_type, str) else "about:blank",
                    detail=sub_detail if isinstance(sub_detail, str) else "",
                    identifier=ident_value if isinstance(ident_value, str) else None,
                )
            )
    instance = doc.get("instance")
    return problem_class(type_)(
        type_,
        detail if isinstance(detail, str) else "",
        status,
        tuple(subproblems),
        retry_after,
        instance if isinstance(instance, str) else None,
    )


def problem_from_response(status: int, headers: Mapping[str, str], body: bytes) -> AcmeProblem:
    """The problem an error response carries (RFC 8555 s6.7), with Retry-After in seconds.

    A body that is not a JSON problem (a proxy's HTML 503, say) still yields an
    ``AcmeProblem`` of type ``about:blank`` whose detail quotes the start of the body, so
    the status and ``retry_after`` reach the caller either way.
    """
    retry_after = parse_retry_after(header(headers, "retry-after"), datetime.now(UTC))
    doc: Any = None
    try:
        doc = json.loads(body) if body else None
    except (UnicodeDecodeError, ValueError, RecursionError):  # nested past the stack limit
        doc = None
    if isinstance(doc, dict) and ("type" in doc or "detail" in doc):
        return problem_from_json(doc, status=status, retry_after=retry_after)
    snippet = body[:200].decode("utf-8", "replace").strip()
    detail = f"HTTP {status} without a problem document" + (f": {snippet}" if snippet else "")
    return AcmeProblem("about:blank", detail, status, (), retry_after)


# --- resources --------------------------------------------------------------------------


def _resource(kind: str, url: str, body: bytes) -> tuple[str, JSON]:
    """(what, doc): the ``kind`` object at ``url`` parsed, and how its errors name it."""
    what = f"{kind} {url}"
    return what, parse_json(body, what)


def parse_json(body: bytes, what: str) -> JSON:
    """A JSON object from a response body, or ``AcmeProtocolError`` naming ``what``."""
    try:
        doc = json.loads(body)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # RecursionError: too deep
        raise AcmeProtocolError(f"{what}: response is not JSON ({exc})") from exc
    if not isinstance(doc, dict):
        raise AcmeProtocolError(f"{what}: response is not a JSON object")
    return doc


def _str(doc: Mapping[str, Any], key: str, what: str) -> str:
    value = doc.get(key)
    if not isinstance(value, str) or not value:
        raise AcmeProtocolError(f"{what}: field {key!r} is missing or not a string")
    return value


def _opt_str(doc: Mapping[str, Any], key: str, what: str) -> str | None:
    value = doc.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise AcmeProtocolError(f"{what}: field {key!r} is not a string")
    return value


def _list(doc: Mapping[str, Any], key: str, what: str) -> list[Any]:
    value = doc.get(key, [])
    if not isinstance(value, list):
        raise AcmeProtocolError(f"{what}: field {key!r} is not a list")
    return value


def _str_list(doc: Mapping[str, Any], key: str, what: str) -> tuple[str, ...]:
    value = doc.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise AcmeProtocolError(f"{what}: field {key!r} is not a list of strings")
    return tuple(value)


def _identifier(raw: Any, what: str) -> Identifier:
    if not isinstance(raw, Mapping):
        raise AcmeProtocolError(f"{what}: identifier is not an object")
    return Identifier(_str(raw, "type", what), _str(raw, "value", what))


def _error(doc: Mapping[str, Any]) -> AcmeProblem | None:
    raw = doc.get("error")
    return problem_from_json(raw) if isinstance(raw, Mapping) else None


def parse_directory(url: str, body: bytes) -> Directory:
    """The directory object (RFC 8555 s7.1.1; ``renewalInfo`` RFC 9773 s3; ``profiles``)."""
    what, doc = _resource("directory", url, body)
    meta = doc.get("meta")
    meta = meta if isinstance(meta, Mapping) else {}
    raw_profiles = meta.get("profiles")
    profiles: dict[str, str] = {}
    if isinstance(raw_profiles, Mapping):
        profiles = {str(k): str(v) for k, v in raw_profiles.items()}
    tos = meta.get("termsOfService")
    renewal = doc.get("renewalInfo")
    return Directory(
        url=url,
        new_nonce=_str(doc, "newNonce", what),
        new_account=_str(doc, "newAccount", what),
        new_order=_str(doc, "newOrder", what),
        revoke_cert=_opt_str(doc, "revokeCert", what) or "",
        key_change=_opt_str(doc, "keyChange", what) or "",
        renewal_info=renewal if isinstance(renewal, str) and renewal else None,
        terms_of_service=tos if isinstance(tos, str) else None,
        external_account_required=meta.get("externalAccountRequired") is True,
        profiles=MappingProxyType(profiles),
    )


def parse_account(url: str, body: bytes) -> Account:
    """An account object (RFC 8555 s7.1.2). ``url`` comes from the Location header."""
    what = f"account {url}"
    doc = parse_json(body, what) if body.strip() else {}
    status = doc.get("status", "valid")
    return Account(
        url=url,
        status=status if isinstance(status, str) else "valid",
        contact=_str_list(doc, "contact", what),
    )


def parse_challenge(doc: Mapping[str, Any], what: str = "challenge") -> Challenge:
    """A challenge object (RFC 8555 s7.1.5, s8)."""
    if not isinstance(doc, Mapping):
        raise AcmeProtocolError(f"{what}: challenge is not an object")
    return Challenge(
        type=_str(doc, "type", what),
        url=_str(doc, "url", what),
        status=_str(doc, "status", what),
        token=_opt_str(doc, "token", what),
        error=_error(doc),
        validated=_opt_str(doc, "validated", what),
    )


def parse_authorization(url: str, body: bytes) -> Authorization:
    """An authorization object (RFC 8555 s7.1.4)."""
    what, doc = _resource("authorization", url, body)
    return Authorization(
        url=url,
        identifier=_identifier(doc.get("identifier"), what),
        status=_str(doc, "status", what),
        challenges=tuple(parse_challenge(c, what) for c in _list(doc, "challenges", what)),
        wildcard=doc.get("wildcard") is True,
        expires=_opt_str(doc, "expires", what),
    )


def parse_order(url: str, body: bytes) -> Order:
    """An order object (RFC 8555 s7.1.3; ``replaces`` RFC 9773 s5; ``profile``)."""
    what, doc = _resource("order", url, body)
    return Order(
        url=url,
        status=_str(doc, "status", what),
        identifiers=tuple(_identifier(i, what) for i in _list(doc, "identifiers", what)),
        authorizations=_str_list(doc, "authorizations", what),
        finalize=_str(doc, "finalize", what),
        certificate=_opt_str(doc, "certificate", what),
        error=_error(doc),
        expires=_opt_str(doc, "expires", what),
        profile=_opt_str(doc, "profile", what),
        replaces=_opt_str(doc, "replaces", what),
    )


# --- request payloads -------------------------------------------------------------------


def new_account_payload(
    *,
    contact: Sequence[str] = (),
    agree_tos: bool = False,
    only_return_existing: bool = False,
    eab: Mapping[str, Any] | None = None,
) -> JSON:
    """The newAccount payload (RFC 8555 s7.3; EAB s7.3.4; lookup s7.3.1)."""
    if only_return_existing:
        return {"onlyReturnExisting": True}
    payload: JSON = {"termsOfServiceAgreed": agree_tos}
    if contact:
        payload["contact"] = list(contact)
    if eab is not None:
        payload["externalAccountBinding"] = dict(eab)
    return payload


def new_order_payload(
    identifiers: Sequence[str], *, profile: str | None = None, replaces: str | None = None
) -> JSON:
    """The newOrder payload (RFC 8555 s7.4; ``replaces`` RFC 9773 s5; ``profile``)."""
    payload: JSON = {"identifiers": [{"type": "dns", "value": name} for name in identifiers]}
    if profile is not None:
        payload["profile"] = profile
    if replaces is not None:
        payload["replaces"] = replaces
    return payload


def finalize_payload(csr_der: bytes) -> JSON:
    """The finalize payload: the DER CSR, base64url (RFC 8555 s7.4)."""
    return {"csr": b64url(csr_der)}


def revoke_payload(cert_der: bytes, reason: int = 0) -> JSON:
    """The revokeCert payload (RFC 8555 s7.6); reason codes are RFC 5280 s5.3.1's."""
    return {"certificate": b64url(cert_der), "reason": reason}


def build_csr(identifiers: Sequence[str], private_key: CertificateIssuerPrivateKeyTypes) -> bytes:
    """A DER CSR for ``identifiers`` signed by ``private_key`` (RFC 8555 s7.4, RFC 2986).

    Every name goes in the SAN. The first name is also the subject CN when it fits the
    64-character limit (RFC 5280 ub-common-name): old CAs want a CN, new ones ignore it.
    """
    if not identifiers:
        raise ValueError("a CSR needs at least one identifier")
    subject = (
        [x509.NameAttribute(NameOID.COMMON_NAME, identifiers[0])]
        if len(identifiers[0]) <= 64
        else []
    )
    builder = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name(subject))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName(n) for n in identifiers]), critical=False
        )
    )
    algorithm: hashes.SHA256 | None = hashes.SHA256()
    if isinstance(private_key, ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey):
        algorithm = None
    elif not isinstance(private_key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise TypeError(f"unsupported certificate key type {type(private_key).__name__}")
    return builder.sign(private_key, algorithm).public_bytes(serialization.Encoding.DER)


# --- certificate chains -----------------------------------------------------------------

_PEM_CERT = re.compile(rb"-----BEGIN CERTIFICATE-----\r?\n.+?\r?\n-----END CERTIFICATE-----", re.S)


def split_pem_chain(pem: bytes) -> list[bytes]:
    """The certificates of a PEM chain, each as its own PEM block (leaf first)."""
    return [m.group(0) + b"\n" for m in _PEM_CERT.finditer(pem)]


def _issuer_cns(pem: bytes) -> list[str]:
    """Issuer CNs of the chain's certificates, topmost (closest to the root) first."""
    names: list[str] = []
    for block in reversed(split_pem_chain(pem)):
        try:
            cert = x509.load_pem_x509_certificate(block)
        except ValueError:
            continue
        names.extend(str(a.value) for a in cert.issuer.get_attributes_for_oid(NameOID.COMMON_NAME))
    return names


def select_chain(
    default: bytes, alternates: Sequence[bytes], preferred: str | None
) -> CertificateChain:
    """Pick the chain whose topmost certificate was issued by ``preferred`` (an issuer CN).

    Like certbot's ``--preferred-chain``: first look for a chain whose *top* certificate's
    issuer CN matches, then for one where any certificate's issuer does; without a match (or
    a preference) the CA's default chain wins. The chains not chosen go to ``alternates``.
    """
    chains = [default, *alternates]
    if preferred is not None:
        for depth_limit in (1, None):
            for index, chain in enumerate(chains):
                if preferred in _issuer_cns(chain)[:depth_limit]:
                    rest = tuple(c for i, c in enumerate(chains) if i != index)
                    return CertificateChain(pem=chain, alternates=rest)
    return CertificateChain(pem=default, alternates=tuple(alternates))
