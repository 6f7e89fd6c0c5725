"""`edgeproxy certs issue|list|status` against a running deployment: the CLI orders through the
deployment's storage and the running proxy answers the CA's TLS-ALPN-01 validation."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio
from cryptography import x509

from edgeproxy.storage import FileStorage
from testkit.cli import cli
from testkit.ondemand import acme_config, peer_cert
from testkit.pebble import Pebble
from testkit.ports import free_port
from testkit.proxy import running_proxy
from testkit.tomlw import toml_dumps
from testkit.upstreams import http_handler, start_upstream


async def test_pre_issue_list_and_status(
    tmp_path: Path, nursery: trio.Nursery, make_pebble: Callable[..., Pebble]
) -> None:
    port = free_port()
    pebble = make_pebble(tls_port=port)
    roots = tmp_path / "roots.pem"
    roots.write_bytes(pebble.roots_pem())
    up = await start_upstream(nursery, http_handler(b"ok\n"))
    cfg = acme_config(tmp_path, port, pebble.directory_url, pebble.ca_bundle_path, up.addr)
    config = tmp_path / "edgeproxy.toml"
    config.write_text(toml_dumps(cfg))
    async with running_proxy(tmp_path, cfg):
        res = await cli("certs", "issue", "pre.example.test", "-c", str(config))
        assert res.returncode == 0, res.stderr.decode()
        assert b"pre.example.test: issued by" in res.stdout
        # The running proxy loads it from storage: no second order, a pebble chain.
        cert = await peer_cert(port, "pre.example.test", roots)
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        assert san.value.get_values_for_type(x509.DNSName) == ["pre.example.test"]
        assert "Pebble" in cert.issuer.rfc4514_string()
        refused = await cli("certs", "issue", "nope.other.test", "-c", str(config))
        assert refused.returncode == 1 and b"refused by the allow-check" in refused.stderr
    listed = await cli("certs", "list", "-c", str(config), "--json")
    assert listed.returncode == 0, listed.stderr.decode()
    rows = {r["name"]: r for r in json.loads(listed.stdout)}
    assert rows["pre.example.test"]["state"] == "valid"
    status = await cli("certs", "status", "pre.example.test", "-c", str(config))
    assert status.returncode == 0
    text = status.stdout.decode()
    assert "valid" in text and "backstop" in text
    unknown = await cli("certs", "status", "never.example.test", "-c", str(config))
    assert unknown.returncode == 1 and b"not managed" in unknown.stderr


async def test_pre_issue_of_a_registered_name_queues_its_events(
    tmp_path: Path, nursery: trio.Nursery, make_pebble: Callable[..., Pebble], monkeypatch: Any
) -> None:
    # With [on_demand] registry = true the CLI knows registered names (it runs no registry
    # mirror), and the certificate.issued event it makes reaches the outbox before it exits.
    port = free_port()
    pebble = make_pebble(tls_port=port)
    up = await start_upstream(nursery, http_handler(b"ok\n"))
    cfg = acme_config(tmp_path, port, pebble.directory_url, pebble.ca_bundle_path, up.addr)
    cfg["on_demand"] = {**cfg["on_demand"], "allow": [], "registry": True}
    # Nobody listens there: events stay in the outbox, where the test reads them.
    cfg["events"] = {"url": "http://127.0.0.1:9/hooks", "secret_env": "EP_TEST_EVENTS_SECRET"}
    monkeypatch.setenv("EP_TEST_EVENTS_SECRET", "s3cret")
    config = tmp_path / "edgeproxy.toml"
    config.write_text(toml_dumps(cfg))
    added = await cli("hostnames", "add", "reg.customer.test", "-c", str(config))
    assert added.returncode == 0, added.stderr.decode()
    async with running_proxy(tmp_path, cfg):
        res = await cli("certs", "issue", "reg.customer.test", "-c", str(config))
        assert res.returncode == 0, res.stderr.decode()
        refused = await cli("certs", "issue", "unregistered.customer.test", "-c", str(config))
        assert refused.returncode == 1 and b"refused by the allow-check" in refused.stderr
    storage = FileStorage(Path(cfg["storage"]["path"]))
    docs = [json.loads(e.body) for e in await storage.due_events(time.time() + 86400, 100)]
    kinds = [(d["type"], d["subject"]) for d in docs]
    assert ("net.edgeproxy.hostname.created", "reg.customer.test") in kinds
    assert ("net.edgeproxy.certificate.issued", "reg.customer.test") in kinds
