"""HTTP-01 on port 80 with a real pebble and HAProxy (issue 16).

Pebble's TLS-ALPN-01 port reaches nothing, its HTTP-01 port is HAProxy's frontend (mode tcp,
``send-proxy-v2``), which forwards to edgeproxy's plain-HTTP listener: a new name's first
order fails TLS-ALPN-01 validation, the next order uses HTTP-01 through HAProxy and succeeds,
and the renewal starts with HTTP-01. The same port redirects a browser to HTTPS with 308.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import trio

from edgeproxy.certs.record import CertRecord, cert_key
from testkit.ondemand import BODY, NO_NONCE_CHAOS, acme_config, curl
from testkit.pebble import FaultInjector, Pebble
from testkit.ports import free_port
from testkit.procs import stop_process
from testkit.proxy import running_proxy, wait_port
from testkit.upstreams import http_handler, start_upstream

pytestmark = pytest.mark.skipif(
    shutil.which("haproxy") is None, reason="Debian haproxy not installed (tests/run installs it)"
)

BROWSER = "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0"


@contextmanager
def haproxy_in_front(tmp_path: Path, front: int, back: int) -> Iterator[None]:
    conf = tmp_path / "haproxy-80.cfg"
    conf.write_text(f"""
global
    maxconn 100
defaults
    mode tcp
    timeout connect 5s
    timeout client 30s
    timeout server 30s
frontend fe80
    bind 127.0.0.1:{front}
    default_backend be80
backend be80
    server ep 127.0.0.1:{back} send-proxy-v2
""")
    proc = subprocess.Popen(
        ["haproxy", "-db", "-f", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT
    )
    try:
        wait_port("127.0.0.1", front)
        yield
    finally:
        stop_process(proc, grace=10)


def new_orders(inj: FaultInjector) -> list[str]:
    return [
        str((r.jws_payload or {}).get("identifiers"))
        for r in inj.seen
        if r.method == "POST" and r.path.endswith("/order-plz")
    ]


async def test_http01_through_haproxy_after_tls_alpn01_fails(
    tmp_path: Path, nursery: trio.Nursery, make_pebble: Callable[..., Pebble]
) -> None:
    nothing = free_port()  # pebble's TLS-ALPN-01 port: nobody listens
    front80, http_port, port = free_port(), free_port(), free_port()
    pebble = make_pebble(tls_port=nothing, http_port=front80, env=NO_NONCE_CHAOS)
    roots = tmp_path / "roots.pem"
    roots.write_bytes(pebble.roots_pem())
    inj = FaultInjector(pebble)
    await nursery.start(inj.serve)
    up = await start_upstream(nursery, http_handler(BODY))
    cfg = acme_config(
        tmp_path,
        port,
        inj.directory_url,
        pebble.ca_bundle_path,
        up.addr,
        acme={"challenges": ["tls-alpn-01", "http-01"]},
        http={
            "listen": [f"127.0.0.1:{http_port}"],
            "proxy_protocol": "v2",
            "proxy_protocol_from": ["127.0.0.1/32"],  # HAProxy
        },
    )
    name = "cdn.example.test"
    with haproxy_in_front(tmp_path, front80, http_port):
        async with running_proxy(tmp_path, cfg) as p:
            started = time.monotonic()
            res = await curl(p, name, roots)
            took = time.monotonic() - started
            assert res.returncode == 0, res.stderr.decode() + pebble.logs()[-3000:]
            assert res.stdout == BODY
            print(f"\ntime to a certificate, HTTP-01 after a TLS-ALPN-01 failure: {took:.2f}s")
            st = p.rt.certs.status(name)
            assert st is not None and st.state == "valid" and st.challenge_type == "http-01", st
            assert len(new_orders(inj)) == 2  # TLS-ALPN-01 failed, then HTTP-01
            raw = await p.rt.storage.get(cert_key(name))
            rec = CertRecord.from_json(raw or b"")
            assert rec.challenge_type == "http-01"

            # The renewal starts with what worked: one order, no TLS-ALPN-01 attempt first.
            renewed = await p.rt.certs.obtain(name, old=rec, force=True)
            assert renewed is not None and renewed.serial != rec.serial
            assert renewed.challenge_type == "http-01"
            assert len(new_orders(inj)) == 3

            # Port 80 (through HAProxy, PROXY v2) sends a browser to HTTPS, keeping the path.
            out = await trio.run_process(
                ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code} %{redirect_url}",
                 "-A", BROWSER, f"http://{name}:{front80}/cart?item=7",
                 "--resolve", f"{name}:{front80}:127.0.0.1"],
                capture_stdout=True, check=True,
            )  # fmt: skip
            assert out.stdout.decode() == f"308 https://{name}/cart?item=7"
            # A name edgeproxy does not serve gets no redirect.
            out = await trio.run_process(
                ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}",
                 f"http://elsewhere.test:{front80}/", "--resolve",
                 f"elsewhere.test:{front80}:127.0.0.1"],
                capture_stdout=True, check=True,
            )  # fmt: skip
            assert out.stdout.decode() == "404"
