"""A second CA when the first fails ([[acme.issuers]]), with two real pebbles (issue 16).

Each pebble has its own ports, state and roots; both validate TLS-ALPN-01 against edgeproxy.
The first sits behind a ``FaultInjector`` that plays it unreachable (every connection dropped)
or rate limited (newOrder answered 429 ``rateLimited``, which pauses its account for the
Retry-After), and then recovers.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import trio

from edgeproxy.certs.record import CertRecord, cert_key
from testkit.ondemand import BODY, NO_NONCE_CHAOS, acme_config, curl
from testkit.pebble import FaultInjector, InjectedRequest, Pebble, Reply
from testkit.ports import free_port
from testkit.proxy import RunningProxy, running_proxy
from testkit.upstreams import http_handler, start_upstream


def unreachable(request: InjectedRequest) -> Reply:
    return Reply.drop()


def rate_limited(request: InjectedRequest) -> Reply | None:
    if request.jws_payload and "identifiers" in request.jws_payload:
        reply = Reply.problem(
            429, "urn:ietf:params:acme:error:rateLimited", "too many new orders recently"
        )
        return Reply(429, reply.body, (*reply.headers, ("Retry-After", "3600")))
    return None


async def record(p: RunningProxy, name: str) -> CertRecord:
    return CertRecord.from_json((await p.rt.storage.get(cert_key(name))) or b"")


async def test_the_second_issuer_takes_over_and_renewals_go_back_to_the_first(
    tmp_path: Path, nursery: trio.Nursery, make_pebble: Callable[..., Pebble]
) -> None:
    port = free_port()
    first = make_pebble(tls_port=port, env=NO_NONCE_CHAOS)
    second = make_pebble(tls_port=port, env=NO_NONCE_CHAOS)
    roots = tmp_path / "roots.pem"
    roots.write_bytes(first.roots_pem() + second.roots_pem())
    inj = FaultInjector(first, rules=[unreachable])
    await nursery.start(inj.serve)
    up = await start_upstream(nursery, http_handler(BODY))
    cfg = acme_config(tmp_path, port, inj.directory_url, first.ca_bundle_path, up.addr)
    cfg["acme"] = {
        "email": "ops@example.test",
        "issuers": [
            {"name": "first", "directory": inj.directory_url, "trust": str(first.ca_bundle_path)},
            {
                "name": "second",
                "directory": second.directory_url,
                "trust": str(second.ca_bundle_path),
            },
        ],
    }
    async with running_proxy(tmp_path, cfg) as p:
        # 1. The first CA is unreachable: the second issues, at once.
        started = time.monotonic()
        res = await curl(p, "one.example.test", roots)
        took = time.monotonic() - started
        assert res.returncode == 0, res.stderr.decode()
        assert res.stdout == BODY
        print(f"\ntime to a certificate, second issuer (first unreachable): {took:.2f}s")
        rec = await record(p, "one.example.test")
        assert rec.issuer_id == second.directory_url
        st = p.rt.certs.status("one.example.test")
        assert st is not None and st.issuer == second.directory_url

        # 2. The first recovers: the next renewal goes back to it.
        inj.rules.clear()
        renewed = await p.rt.certs.obtain("one.example.test", old=rec, force=True)
        assert renewed is not None and renewed.issuer_id == inj.directory_url

        # 3. The first answers rateLimited: the second issues again.
        inj.rules.append(rate_limited)
        res = await curl(p, "two.example.test", roots)
        assert res.returncode == 0, res.stderr.decode()
        assert (await record(p, "two.example.test")).issuer_id == second.directory_url
        assert any(r.injected and r.jws_payload for r in inj.seen)

        # 4. Both refuse: the status names every issuer tried, with the CA's own words.
        second.stop()
        res = await curl(p, "three.example.test", roots)
        assert res.returncode != 0
        with trio.fail_after(30):
            while (st := p.rt.certs.status("three.example.test")) is None or not st.last_error:
                await trio.sleep(0.1)
        # The first's rateLimited paused its account: skipped at once, saying until when.
        assert st.last_error.startswith(
            "issuer first: account_paused: new orders to CA first are paused until"
        ), st
        assert "(it answered rateLimited: too many new orders recently)" in st.last_error, st
        orders = [r for r in inj.seen if r.jws_payload and "identifiers" in r.jws_payload]
        assert sum(1 for r in orders if r.injected) == 1  # no second order went to it
        assert st.last_error_type == "unreachable", st
