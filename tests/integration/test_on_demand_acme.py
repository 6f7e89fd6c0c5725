"""On-demand certificates from a real ACME CA (Debian's pebble), answered by the proxy itself.

Pebble's ``tlsPort`` is the proxy's port, so every TLS-ALPN-01 validation goes through
edgeproxy's data path exactly as a public CA's would. A ``FaultInjector`` (a recording HTTPS
proxy between edgeproxy and pebble) counts ACME requests where a test needs to know them.
"""

from __future__ import annotations

import json
import logging
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio
from cryptography import x509

from edgeproxy.certs.record import cert_key
from testkit.ask import ask_server
from testkit.ondemand import (
    BODY,
    NO_NONCE_CHAOS,
    acme_config,
    curl,
    handshake_fails,
    new_orders,
    peer_cert,
)
from testkit.pebble import (
    FaultInjector,
    InjectedRequest,
    Pebble,
    Reply,
    injected_pebble_for_proxy,
)
from testkit.ports import free_port
from testkit.proxy import running_proxy
from testkit.upstreams import echo, http_handler, start_upstream


async def test_first_request_for_a_new_name_gets_a_pebble_certificate(
    tmp_path: Path,
    nursery: trio.Nursery,
    make_pebble: Callable[..., Pebble],
    roots_file: Callable[[Pebble], Path],
) -> None:
    # Bad nonces at 30% all along: the client must retry them and still issue.
    port = free_port()
    pebble = make_pebble(tls_port=port, env={"PEBBLE_WFE_NONCEREJECT": "30"})
    roots = roots_file(pebble)
    up = await start_upstream(nursery, http_handler(BODY))
    async with running_proxy(
        tmp_path, acme_config(tmp_path, port, pebble.directory_url, pebble.ca_bundle_path, up.addr)
    ) as p:
        res = await curl(p, "shop.example.test", roots)
        assert res.returncode == 0, res.stderr.decode() + pebble.logs()[-2000:]
        assert res.stdout == BODY
        # Cached now: the second request needs no CA at all.
        pebble.stop()
        res = await curl(p, "shop.example.test", roots)
        assert res.returncode == 0 and res.stdout == BODY
        st = p.rt.certs.status("shop.example.test")
        assert st is not None and st.state == "valid"


async def test_twenty_concurrent_handshakes_make_one_order(
    tmp_path: Path,
    nursery: trio.Nursery,
    make_pebble: Callable[..., Pebble],
    roots_file: Callable[[Pebble], Path],
) -> None:
    port, pebble, inj = await injected_pebble_for_proxy(nursery, make_pebble, env=NO_NONCE_CHAOS)
    roots = roots_file(pebble)
    up = await start_upstream(nursery, http_handler(BODY))
    async with running_proxy(
        tmp_path, acme_config(tmp_path, port, inj.directory_url, pebble.ca_bundle_path, up.addr)
    ) as p:
        results: list[Any] = []

        async def one() -> None:
            results.append(await curl(p, "crowd.example.test", roots))

        async with trio.open_nursery() as n:
            for _ in range(20):
                n.start_soon(one)
        assert [r.returncode for r in results] == [0] * 20, [
            r.stderr for r in results if r.returncode
        ]
        assert all(r.stdout == BODY for r in results)
    assert new_orders(inj) == 1


@pytest.mark.parametrize(
    "sni", ["denied.other.test", "127.0.0.1", "bad_name.example.test", "a..example.test"]
)
async def test_refused_names_make_no_acme_request(
    tmp_path: Path, nursery: trio.Nursery, make_pebble: Callable[..., Pebble], sni: str
) -> None:
    port, pebble, inj = await injected_pebble_for_proxy(nursery, make_pebble)
    up = await start_upstream(nursery, http_handler(BODY))
    async with running_proxy(
        tmp_path, acme_config(tmp_path, port, inj.directory_url, pebble.ca_bundle_path, up.addr)
    ) as p:
        res = await trio.run_process(
            ["openssl", "s_client", "-connect", f"127.0.0.1:{p.port}", "-servername", sni],
            stdin=b"",
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
        assert res.returncode != 0
        assert b"alert" in res.stderr or b"handshake failure" in res.stderr, res.stderr
    assert inj.seen == []




async def test_ask_endpoint_down_refuses_new_names_but_serves_cached(
    tmp_path: Path,
    nursery: trio.Nursery,
    make_pebble: Callable[..., Pebble],
    roots_file: Callable[[Pebble], Path],
) -> None:
    port = free_port()
    pebble = make_pebble(tls_port=port)
    roots = roots_file(pebble)
    up = await start_upstream(nursery, http_handler(BODY))
    url, scope = await ask_server(nursery, {"asked.customer.test", "later.customer.test"})
    cfg = acme_config(
        tmp_path,
        port,
        pebble.directory_url,
        pebble.ca_bundle_path,
        up.addr,
        on_demand={"allow": [], "ask": url, "allow_cache_ttl": 0, "deny_cache_ttl": 0},
    )
    async with running_proxy(tmp_path, cfg) as p:
        assert (await curl(p, "asked.customer.test", roots)).returncode == 0
        assert await handshake_fails(p.port, "notasked.customer.test")  # the ask said 404
        scope.cancel()  # the ask endpoint goes down
        await trio.sleep(0.1)
        assert await handshake_fails(p.port, "later.customer.test")
        st = p.rt.certs.status("later.customer.test")
        assert st is not None and st.last_error_type == "ask_unavailable"
        res = await curl(p, "asked.customer.test", roots)
        assert res.returncode == 0 and res.stdout == BODY


async def test_ca_down_serves_cached_and_says_unreachable(
    tmp_path: Path,
    nursery: trio.Nursery,
    make_pebble: Callable[..., Pebble],
    roots_file: Callable[[Pebble], Path],
) -> None:
    port = free_port()
    pebble = make_pebble(tls_port=port)
    roots = roots_file(pebble)
    up = await start_upstream(nursery, http_handler(BODY))
    cfg = acme_config(
        tmp_path, port, pebble.directory_url, pebble.ca_bundle_path, up.addr, on_demand={"wait": 5}
    )
    async with running_proxy(tmp_path, cfg) as p:
        assert (await curl(p, "before.example.test", roots)).returncode == 0
        pebble.stop()
        with trio.fail_after(20):  # the wait bound is 5 s; generous slack, no timing claim
            assert await handshake_fails(p.port, "after.example.test")
        with trio.fail_after(30):
            while (
                st := p.rt.certs.status("after.example.test")
            ) is None or st.last_error_type is None:
                await trio.sleep(0.2)
        assert st.last_error_type == "unreachable", st
        assert st.hint and "unreachable" in st.hint
        assert (await curl(p, "before.example.test", roots)).returncode == 0


async def test_renewal_before_expiry_while_a_connection_streams(
    tmp_path: Path,
    nursery: trio.Nursery,
    make_pebble: Callable[..., Pebble],
    roots_file: Callable[[Pebble], Path],
) -> None:
    port = free_port()
    pebble = make_pebble(tls_port=port, validity=90)
    roots = roots_file(pebble)
    up = await start_upstream(nursery, echo)
    async with running_proxy(
        tmp_path, acme_config(tmp_path, port, pebble.directory_url, pebble.ca_bundle_path, up.addr)
    ) as p:
        first = await peer_cert(port, "renew.example.test", roots)
        ctx = ssl.create_default_context(cafile=str(roots))
        tcp = await trio.open_tcp_stream("127.0.0.1", port)
        stream = trio.SSLStream(tcp, ctx, server_hostname="renew.example.test")
        rounds = 0
        renewed: x509.Certificate | None = None
        with trio.fail_after(80):
            while renewed is None:
                msg = f"ping {rounds}\n".encode()
                await stream.send_all(msg)
                got = b""
                while len(got) < len(msg):
                    got += await stream.receive_some(65536)
                assert got == msg
                rounds += 1
                await trio.sleep(0.5)
                if rounds % 4 == 0:
                    cert = await peer_cert(port, "renew.example.test", roots)
                    if cert.serial_number != first.serial_number:
                        renewed = cert
        # Renewed before the old one expired, and the old connection kept working throughout.
        assert renewed.not_valid_before_utc < first.not_valid_after_utc
        await stream.send_all(b"still here\n")
        assert await stream.receive_some(65536) == b"still here\n"
        await stream.aclose()
        st = p.rt.certs.status("renew.example.test")
        assert st is not None and st.state == "valid"


async def test_corrupt_record_and_stale_lock_are_recovered(
    tmp_path: Path,
    nursery: trio.Nursery,
    make_pebble: Callable[..., Pebble],
    roots_file: Callable[[Pebble], Path],
    caplog: pytest.LogCaptureFixture,
) -> None:
    port = free_port()
    pebble = make_pebble(tls_port=port)
    roots = roots_file(pebble)
    up = await start_upstream(nursery, http_handler(BODY))
    state = tmp_path / "state"
    # Stale files as other tools leave them: a torn record and a lock whose holder died.
    (state / "data" / "certs").mkdir(parents=True)
    (state / "data" / cert_key("torn.example.test")).write_bytes(b'{"name": "torn.exa')
    (state / "locks").mkdir(parents=True)
    (state / "locks" / "issue-torn.example.test.lock").write_text(
        json.dumps({"owner": "dead-host:1:x", "expires_at": 1.0, "created_at": 0.5})
    )
    caplog.set_level(logging.INFO)
    async with running_proxy(
        tmp_path, acme_config(tmp_path, port, pebble.directory_url, pebble.ca_bundle_path, up.addr)
    ) as p:
        res = await curl(p, "torn.example.test", roots)
        assert res.returncode == 0, res.stderr
        assert res.stdout == BODY
    assert list((state / "quarantine").iterdir()), "the torn record was not quarantined"
    text = " ".join(r.getMessage() for r in caplog.records)
    assert "quarantined" in text


async def test_ari_window_drives_renewal_with_replaces(
    tmp_path: Path,
    nursery: trio.Nursery,
    make_pebble: Callable[..., Pebble],
    roots_file: Callable[[Pebble], Path],
) -> None:
    """The CA's renewalInfo (served by the fault injector, since pebble 2.4 has no ARI) says
    "renew now": the next maintenance pass renews, sending `replaces` with the old CertID."""
    from datetime import timedelta

    from edgeproxy.acme.ari import cert_id

    port = free_port()
    pebble = make_pebble(tls_port=port, env=NO_NONCE_CHAOS)
    roots = roots_file(pebble)
    inj = FaultInjector(
        pebble, renewal_window=(timedelta(days=60), timedelta(days=61)), renewal_retry_after=60
    )
    await nursery.start(inj.serve)
    up = await start_upstream(nursery, http_handler(BODY))
    async with running_proxy(
        tmp_path, acme_config(tmp_path, port, inj.directory_url, pebble.ca_bundle_path, up.addr)
    ) as p:
        first = await peer_cert(port, "ari.example.test", roots)
        with trio.fail_after(20):  # the maintenance pass (1 s) fetches the far-away window first
            while (
                st := p.rt.certs.status("ari.example.test")
            ) is None or st.renewal_source != "ari":
                await trio.sleep(0.1)
        assert new_orders(inj) == 1
        # The CA changes its mind: the window is now in the past. The next ARI fetch happens
        # after Retry-After; make the process look again now.
        inj.renewal_window = (timedelta(days=-2), timedelta(days=-1))
        await p.rt.storage.delete("ari/ari.example.test.json")
        await p.rt.storage.set_due("ari.example.test", 0)  # its next action: now
        with trio.fail_after(30):
            while (
                await peer_cert(port, "ari.example.test", roots)
            ).serial_number == first.serial_number:
                await trio.sleep(0.2)
    orders = [r for r in inj.seen if r.method == "POST" and r.path.endswith("/order-plz")]
    assert len(orders) >= 2
    assert orders[1].jws_payload is not None
    assert orders[1].jws_payload.get("replaces") == cert_id(first)


def _plays_a_ca_without_ari(request: InjectedRequest) -> Reply | None:
    """The RFC 8555 CA of issue 16 that does not recognise RFC 9773 CertIDs: renewalInfo is
    404 ``malformed`` and so is every newOrder carrying ``replaces``."""
    malformed = "urn:ietf:params:acme:error:malformed"
    if request.method == "GET" and request.path.startswith("/renewal-info/"):
        return Reply.problem(404, malformed, "Certificate not found")
    payload = request.jws_payload or {}
    if "identifiers" in payload and "replaces" in payload:
        return Reply.problem(
            404, malformed, f"Certificate not found for certID {payload['replaces']}"
        )
    return None


async def test_a_ca_without_ari_for_the_certificate_cannot_block_its_renewal(
    tmp_path: Path,
    nursery: trio.Nursery,
    make_pebble: Callable[..., Pebble],
    roots_file: Callable[[Pebble], Path],
) -> None:
    """renewalInfo 404: asked once per certificate (RFC 9773's long-term error cadence, not on
    every maintenance pass), renewed by the backstop before expiry, no error on the way, and
    the status says why the backstop applies."""
    from edgeproxy.acme.ari import cert_id

    port = free_port()
    # 16 s certificates: the backstop (half the lifetime for short ones) comes after 8 s,
    # i.e. after about eight 1 s maintenance passes.
    pebble = make_pebble(tls_port=port, env=NO_NONCE_CHAOS, validity=16)
    roots = roots_file(pebble)
    inj = FaultInjector(pebble, rules=[_plays_a_ca_without_ari])
    await nursery.start(inj.serve)
    up = await start_upstream(nursery, http_handler(BODY))
    name = "noari.example.test"
    async with running_proxy(
        tmp_path, acme_config(tmp_path, port, inj.directory_url, pebble.ca_bundle_path, up.addr)
    ) as p:
        first = await peer_cert(port, name, roots)
        errors: set[str] = set()
        with trio.fail_after(20):
            while (st := p.rt.certs.status(name)) is None or not st.renewal_reason:
                await trio.sleep(0.1)
        assert st.renewal_source == "backstop", st
        assert "no ARI for this certificate" in st.renewal_reason and "404" in st.renewal_reason, st
        with trio.fail_after(40):
            while (
                renewed := await peer_cert(port, name, roots)
            ).serial_number == first.serial_number:
                st = p.rt.certs.status(name)
                if st is not None and st.last_error_type:
                    errors.add(f"{st.last_error_type}: {st.last_error}")
                await trio.sleep(0.2)
        assert renewed.not_valid_before_utc < first.not_valid_after_utc
        assert errors == set()
        res = await curl(p, name, roots)
        assert res.returncode == 0 and res.stdout == BODY, res.stderr
    asked = [r.path.rsplit("/", 1)[-1] for r in inj.seen if r.path.startswith("/renewal-info/")]
    assert asked.count(cert_id(first)) == 1, asked
    # Marked as unknown to the CA's ARI, the old certificate is not named in `replaces`.
    orders = [r for r in inj.seen if r.method == "POST" and r.path.endswith("/order-plz")]
    assert len(orders) >= 2
    assert all("replaces" not in (o.jws_payload or {}) for o in orders)


async def test_a_new_name_waits_on_demand_wait_beyond_the_handshake_timeout(
    tmp_path: Path,
    nursery: trio.Nursery,
    make_pebble: Callable[..., Pebble],
    roots_file: Callable[[Pebble], Path],
) -> None:
    """wait = 8, handshake_timeout = 3, the certificate takes over 5 s (the ask endpoint is
    slow): the handshake waits for it and the client is served."""
    port = free_port()
    pebble = make_pebble(tls_port=port)
    roots = roots_file(pebble)
    up = await start_upstream(nursery, http_handler(BODY))
    url, _ = await ask_server(nursery, {"slow.customer.test"}, delay=5.0)
    cfg = acme_config(
        tmp_path,
        port,
        pebble.directory_url,
        pebble.ca_bundle_path,
        up.addr,
        server={"listen": [f"127.0.0.1:{port}"], "handshake_timeout": 3},
        on_demand={"allow": [], "ask": url, "ask_timeout": 7, "wait": 8},
    )
    async with running_proxy(tmp_path, cfg) as p:
        started = trio.current_time()
        res = await curl(p, "slow.customer.test", roots)
        took = trio.current_time() - started
        assert res.returncode == 0, res.stderr
        assert res.stdout == BODY
        assert took >= 5.0  # the ask's delay really was inside this handshake


@pytest.mark.parametrize("answer", ["nothing", "wrong_certificate"])
async def test_a_failed_validation_hint_says_what_the_ca_met_and_names_our_port(
    tmp_path: Path, nursery: trio.Nursery, make_pebble: Callable[..., Pebble], answer: str
) -> None:
    """Pebble validates against another port than edgeproxy's: there either nothing listens
    (pebble: "Failed to connect") or a responder shows a certificate for another key
    authorization (pebble: "Incorrect validation certificate"). Two different hints, both
    naming the port edgeproxy listens on."""
    from testkit.pebble import TlsAlpnResponder

    name = "hint.example.test"
    validation_port = free_port()
    if answer == "wrong_certificate":
        responder = TlsAlpnResponder(validation_port, tmp_path / "wrong")
        await responder.present(name, "token", "not-the-key-authorization")
        await nursery.start(responder.serve)
    pebble = make_pebble(tls_port=validation_port, env=NO_NONCE_CHAOS)
    up = await start_upstream(nursery, http_handler(BODY))
    port = free_port()
    cfg = acme_config(tmp_path, port, pebble.directory_url, pebble.ca_bundle_path, up.addr)
    async with running_proxy(tmp_path, cfg) as p:
        assert await handshake_fails(port, name)
        with trio.fail_after(30):
            while (st := p.rt.certs.status(name)) is None or st.hint is None:
                await trio.sleep(0.1)
    assert st.last_error_type == "urn:ietf:params:acme:error:unauthorized", st
    assert f"listens on port {port} of [server] listen" in st.hint
    assert "port 443 for tls-alpn-01" in st.hint
    if answer == "nothing":
        assert "could not complete a connection" in st.hint, st
    else:
        assert "not edgeproxy's challenge response" in st.hint, st
