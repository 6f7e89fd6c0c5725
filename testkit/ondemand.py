"""edgeproxy issuing on demand from pebble, as the integration tests and benchmarks run it: its
config, and the clients (curl, Python ssl) that check what it serves.
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

import trio
from cryptography import x509

from testkit.pebble import FaultInjector
from testkit.proxy import RunningProxy, base_config

BODY = b"served over a pebble certificate\n"
# Tests that count newOrder POSTs: pebble rejects 5 % of nonces by default, and a retried
# newOrder is a second POST of the same order.
NO_NONCE_CHAOS = {"PEBBLE_WFE_NONCEREJECT": "0"}


def acme_config(
    tmp_path: Path, port: int, directory: str, trust: Path, up: str, **over: Any
) -> dict[str, Any]:
    """edgeproxy on 127.0.0.1:``port`` ordering on demand for ``*.example.test`` from the CA at
    ``directory`` (trusting ``trust``), one default route to ``up``; each ``over`` section is
    merged into the one it names."""
    cfg = base_config(
        tmp_path,
        [{"sni": ["*"], "default": True, "upstreams": [up]}],
        server={"listen": [f"127.0.0.1:{port}"]},
        tls={"issuer": "acme", "default_sni": None, "maintenance_interval": 1.0},
        acme={"directory": directory, "trust": str(trust), "email": "ops@example.test"},
        on_demand={"allow": ["*.example.test"], "wait": 20},
        storage={"lock_ttl": 5},
    )
    for k, v in over.items():
        cfg[k] = {**cfg.get(k, {}), **v}
    return cfg


async def curl(p: RunningProxy, name: str, roots: Path, *extra: str) -> Any:
    """``curl https://name/`` through the proxy, verifying against ``roots``; never raises on
    curl's exit status (the test reads ``returncode``, ``stdout`` and ``stderr``)."""
    with trio.fail_after(60):
        return await trio.run_process(
            [
                "curl",
                "-sS",
                "--fail",
                "--cacert",
                str(roots),
                "--resolve",
                f"{name}:{p.port}:127.0.0.1",
                *extra,
                f"https://{name}:{p.port}/",
            ],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )


async def peer_cert(port: int, name: str, roots: Path) -> x509.Certificate:
    """The leaf served for ``name`` on ``port``, after a handshake verified against ``roots``."""
    ctx = ssl.create_default_context(cafile=str(roots))
    tcp = await trio.open_tcp_stream("127.0.0.1", port)
    tls = trio.SSLStream(tcp, ctx, server_hostname=name)
    await tls.do_handshake()
    der = tls.getpeercert(binary_form=True)
    await trio.aclose_forcefully(tls)
    assert der is not None
    return x509.load_der_x509_certificate(der)


async def served_der(port: int, name: str, ctx: ssl.SSLContext) -> bytes | None:
    """The certificate (DER) the proxy on ``port`` serves for ``name``, None if refused."""
    tcp = await trio.open_tcp_stream("127.0.0.1", port)
    tls = trio.SSLStream(tcp, ctx, server_hostname=name)
    try:
        with trio.fail_after(30):
            await tls.do_handshake()
    except (trio.BrokenResourceError, ssl.SSLError):
        return None
    finally:
        await trio.aclose_forcefully(tls)
    der = tls.getpeercert(binary_form=True)
    assert der is not None
    return der


async def handshake_fails(port: int, name: str) -> bool:
    """Whether a handshake for ``name`` (no verification) is refused."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return await served_der(port, name, ctx) is None


def new_orders(inj: FaultInjector) -> int:
    """newOrder POSTs the injector passed to pebble so far."""
    return sum(1 for r in inj.seen if r.method == "POST" and r.path.endswith("/order-plz"))


def registry_config(tmp_path: Path, port: int, directory: str, trust: Path, up: str,
                    **over: Any) -> dict[str, Any]:  # fmt: skip
    """``acme_config`` with the hostname registry as the only source of names, and the admin
    API on a port of its own."""
    cfg = acme_config(tmp_path, port, directory, trust, up, **over)
    cfg["on_demand"] = {**cfg["on_demand"], "allow": [], "registry": True}
    cfg["admin"] = {"listen": "127.0.0.1:0"}
    cfg["hostnames"] = {"poll_interval": 0.2}
    return cfg


async def refused_with_unrecognized_name(port: int, name: str) -> bool:
    """Whether a handshake for ``name`` ends in an ``unrecognized_name`` alert."""
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    tcp = await trio.open_tcp_stream("127.0.0.1", port)
    tls = trio.SSLStream(tcp, ctx, server_hostname=name)
    try:
        with trio.fail_after(10):
            await tls.do_handshake()
    except ssl.SSLError as exc:
        return "UNRECOGNIZED_NAME" in str(exc).upper()
    except trio.BrokenResourceError as exc:
        return "UNRECOGNIZED_NAME" in str(exc.__cause__).upper()
    finally:
        await trio.aclose_forcefully(tls)
    return False
