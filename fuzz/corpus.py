"""The seed corpus: real and hand-built inputs the fuzzer starts mutating from.

Seeds matter more than run time: a mutation of a real Chromium hello reaches the extension
walker at once, random bytes almost never do. So each target gets the real thing first:

* ``client_hello``: the ClientHellos captured from curl, openssl, Python and Chromium
  (``testkit/clienthellos``), the same hellos re-fragmented into several records,
  built hellos with GREASE, ``acme-tls/1``, ECH and padding, and the not-TLS openers the
  parser classifies (HTTP, HTTP/2 preface, PROXY, SSLv2).
* ``proxy_protocol``: headers from ``build_v1``/``build_v2`` (IPv4, IPv6, mapped, TLVs incl.
  the AWS VPC endpoint id, LOCAL), ``PROXY UNKNOWN``, each followed by a ClientHello start.
* ``acme_messages``: directory, order, authorization, account, problem and renewalInfo
  bodies shaped like pebble's and Let's Encrypt's, plus Retry-After and Link header values.

Run ``python -m fuzz.corpus DIR`` to write it; ``build_corpus`` is what ``run.py`` calls.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from edgeproxy.wire.proxy_protocol import (
    PP2_SUBTYPE_AWS_VPCE_ID,
    PP2_TYPE_ALPN,
    PP2_TYPE_AUTHORITY,
    PP2_TYPE_AWS,
    PP2_TYPE_CRC32C,
    PP2_TYPE_NOOP,
    PP2_TYPE_UNIQUE_ID,
    build_v1,
    build_v2,
)
from testkit import tlsbuild as tb
from testkit.clienthellos import CAPTURED

DICTIONARIES = Path(__file__).resolve().parent / "dicts"


def captured_hellos() -> dict[str, bytes]:
    """The real ClientHellos, by fixture name."""
    return {p.stem: p.read_bytes() for p in sorted(CAPTURED.glob("*.bin"))}


def client_hello_seeds() -> Iterator[tuple[str, bytes]]:
    for name, raw in captured_hellos().items():
        yield name, raw
        message = b"".join(p for _, p in tb.record_payloads(raw))
        yield f"{name}-records-7", tb.to_records(message, [7] * 8)
        yield f"{name}-records-halves", tb.to_records(message, [len(message) // 2])
        yield f"{name}-then-ccs", raw + tb.record(b"\x01", content_type=20)
    yield "built-grease", tb.record(tb.client_hello("grease.example.test", ["h2"], grease=True))
    yield "built-acme-tls", tb.record(tb.client_hello("acme.example.test", ["acme-tls/1"]))
    yield (
        "built-mlkem",
        tb.record(
            tb.client_hello(
                "pq.example.test", key_shares=((tb.X25519MLKEM768, 1216), (tb.X25519, 32))
            )
        ),
    )
    yield (
        "built-ech-padding",
        tb.record(
            tb.client_hello(
                "ech.example.test", extra_extensions=[tb.ech_outer(300)], padding_length=100
            )
        ),
    )
    yield (
        "built-no-extensions",
        tb.record(tb.handshake_message(tb.client_hello_body(extensions=None))),
    )
    yield "built-upper-dot-sni", tb.record(tb.client_hello("SHOP.Example.TEST."))
    yield "built-no-sni-tls12", tb.record(tb.client_hello(None, versions=None))
    yield "http-get", b"GET / HTTP/1.1\r\nHost: example.test\r\n\r\n"
    yield "http2-preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
    yield "proxy-v1-on-tls-port", b"PROXY TCP4 192.0.2.1 192.0.2.2 1234 443\r\n"
    yield "sslv2-hello", b"\x80\x2e\x01\x00\x02\x00\x15\x00\x00\x00\x10" + bytes(37)
    yield "alert", b"\x15\x03\x03\x00\x02\x02\x28"


def proxy_protocol_seeds() -> Iterator[tuple[str, bytes]]:
    hello = captured_hellos().get("curl-http1.1", b"\x16\x03\x01\x02\x00\x01")[:64]
    v4 = (("192.0.2.10", 51234), ("198.51.100.1", 443))
    v6 = (("2001:db8::10", 51234), ("2001:db8::1", 443))
    mapped = (("::ffff:192.0.2.10", 1), ("2001:db8::1", 65535))
    for label, (src, dst) in (("v4", v4), ("v6", v6), ("mapped", mapped)):
        yield f"v1-{label}", build_v1(src, dst) + hello
        yield f"v2-{label}", build_v2(src, dst) + hello
    tlvs = [
        (PP2_TYPE_ALPN, b"h2"),
        (PP2_TYPE_AUTHORITY, b"shop.example.test"),
        (PP2_TYPE_CRC32C, b"\x00\x00\x00\x00"),
        (PP2_TYPE_NOOP, b""),
        (PP2_TYPE_UNIQUE_ID, b"\x01" * 16),
        (PP2_TYPE_AWS, bytes((PP2_SUBTYPE_AWS_VPCE_ID,)) + b"vpce-0123456789abcdef0"),
    ]
    yield "v2-tlvs", build_v2(*v4, tlvs) + hello
    yield "v2-local", build_v2(None, None) + hello
    yield "v1-unknown", b"PROXY UNKNOWN\r\n" + hello
    yield "v1-unknown-addresses", b"PROXY UNKNOWN ::1 ::1 1 2\r\n" + hello
    # UNIX stream (family 0x31): 216 bytes of addresses, one of them abstract.
    unix_block = b"/run/lb.sock".ljust(108, b"\x00") + b"\x00abstract".ljust(108, b"\x00")
    yield (
        "v2-unix",
        (
            b"\r\n\r\n\x00\r\nQUIT\n"
            + bytes((0x21, 0x31))
            + len(unix_block).to_bytes(2, "big")
            + unix_block
        ),
    )


def _json(doc: Any) -> bytes:
    return json.dumps(doc, indent=None).encode()


def acme_seeds() -> Iterator[tuple[str, bytes]]:
    base = "https://ca.example.test/acme"
    yield (
        "directory",
        _json(
            {
                "newNonce": f"{base}/new-nonce",
                "newAccount": f"{base}/new-acct",
                "newOrder": f"{base}/new-order",
                "revokeCert": f"{base}/revoke-cert",
                "keyChange": f"{base}/key-change",
                "renewalInfo": f"{base}/renewal-info",
                "meta": {
                    "termsOfService": "https://ca.example.test/tos.pdf",
                    "externalAccountRequired": False,
                    "profiles": {"classic": "the default", "shortlived": "6 days"},
                },
            }
        ),
    )
    identifiers = [{"type": "dns", "value": "shop.example.test"}]
    yield (
        "order-pending",
        _json(
            {
                "status": "pending",
                "expires": "2025-06-08T12:00:00Z",
                "identifiers": identifiers,
                "authorizations": [f"{base}/authz/1"],
                "finalize": f"{base}/finalize/1",
                "profile": "classic",
                "replaces": "aYhba4dGQEHhs3uEe6CuLN4ByNQ.AIdlQyE",
            }
        ),
    )
    yield (
        "order-invalid",
        _json(
            {
                "status": "invalid",
                "identifiers": identifiers,
                "authorizations": [f"{base}/authz/1"],
                "finalize": f"{base}/finalize/1",
                "certificate": f"{base}/cert/1",
                "error": {
                    "type": "urn:ietf:params:acme:error:compound",
                    "detail": "several problems",
                    "status": 403,
                    "subproblems": [
                        {
                            "type": "urn:ietf:params:acme:error:caa",
                            "detail": "CAA forbids",
                            "identifier": {"type": "dns", "value": "shop.example.test"},
                        }
                    ],
                },
            }
        ),
    )
    yield (
        "authorization",
        _json(
            {
                "status": "invalid",
                "identifier": identifiers[0],
                "expires": "2025-06-08T12:00:00Z",
                "wildcard": False,
                "challenges": [
                    {
                        "type": "tls-alpn-01",
                        "url": f"{base}/chall/1",
                        "status": "invalid",
                        "token": "DGyRejmCefe7v4NfDGDKfA",
                        "validated": "2025-06-01T12:00:00Z",
                        "error": {
                            "type": "urn:ietf:params:acme:error:connection",
                            "detail": "connection refused",
                        },
                    },
                    {
                        "type": "http-01",
                        "url": f"{base}/chall/2",
                        "status": "pending",
                        "token": "x",
                    },
                ],
            }
        ),
    )
    yield "account", _json({"status": "valid", "contact": ["mailto:ops@example.test"]})
    yield (
        "problem",
        _json(
            {
                "type": "urn:ietf:params:acme:error:rateLimited",
                "detail": "too many certificates",
                "status": 429,
                "instance": "https://ca.example.test/docs/rate-limits",
            }
        ),
    )
    yield "problem-blank", _json({"detail": "no type"})
    yield (
        "renewal-info",
        _json(
            {
                "suggestedWindow": {
                    "start": "2025-07-01T00:00:00Z",
                    "end": "2025-07-02T00:00:00+02:00",
                },
                "explanationURL": "https://ca.example.test/ari",
            }
        ),
    )
    yield "retry-after-seconds", b"120"
    yield "retry-after-date", b"Wed, 21 Oct 2015 07:28:00 GMT"
    yield "links", b'<https://ca.example.test/acme/cert/1/1>;rel="alternate", <../dir>;rel=index'
    yield "html-503", b"<html><body>503 Service Unavailable</body></html>"


SEEDS = {
    "client_hello": client_hello_seeds,
    "proxy_protocol": proxy_protocol_seeds,
    "acme_messages": acme_seeds,
}


def build_corpus(root: Path) -> dict[str, int]:
    """Write every target's seeds under ``root/<target>/``; returns seeds written per target.

    File names are the seed's label plus a content hash, so rebuilding into a corpus the
    fuzzer already grew adds nothing twice and removes nothing it found.
    """
    counts: dict[str, int] = {}
    for target, seeds in SEEDS.items():
        folder = root / target
        folder.mkdir(parents=True, exist_ok=True)
        n = 0
        for label, data in seeds():
            digest = hashlib.sha1(data).hexdigest()[:12]
            (folder / f"seed-{label}-{digest}").write_bytes(data)
            n += 1
        counts[target] = n
    return counts


def dictionary_for(target: str) -> Path | None:
    """The libFuzzer ``-dict`` file for ``target``, if it has one."""
    path = DICTIONARIES / f"{target}.dict"
    return path if path.is_file() else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("root", type=Path, help="folder to write <target>/ seed folders into")
    args = parser.parse_args()
    for target, n in build_corpus(args.root).items():
        print(f"{target}: {n} seeds in {args.root / target}")


if __name__ == "__main__":
    main()
