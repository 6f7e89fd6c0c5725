"""acme-tls/1 hellos for a name with no pending challenge, through a real proxy.

Anyone can send them; each once cost a storage read (a database query on PostgreSQL) and a
long WARNING line. Now: a handful of reads, at most one line per interval, and the metric
still counts every one. Real Python ``ssl`` clients against ``run_process`` on loopback,
whose file storage is wrapped to count challenge reads.
"""

from __future__ import annotations

import logging
import ssl
from pathlib import Path

import pytest
import trio
from prometheus_client import REGISTRY

from edgeproxy.certs.challenges import NEGATIVE_TTL
from edgeproxy.storage.file import FileStorage
from testkit.proxy import base_config, running_proxy

METRIC = "edgeproxy_acme_validation_without_pending_challenge_total"
N = 40
WAVE = 8


class CountingStorage(FileStorage):
    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.challenge_reads = 0

    async def get_challenge(self, name: str) -> str | None:
        self.challenge_reads += 1
        return await super().get_challenge(name)


async def acme_tls_hello(port: int, name: str) -> None:
    """A validation-style handshake (ALPN acme-tls/1); it is refused here."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["acme-tls/1"])
    tcp = await trio.open_tcp_stream("127.0.0.1", port)
    tls = trio.SSLStream(tcp, ctx, server_hostname=name)
    with pytest.raises((ssl.SSLError, trio.BrokenResourceError)):
        with trio.fail_after(20):
            await tls.do_handshake()
    await trio.aclose_forcefully(tls)


async def test_a_flood_of_validation_hellos_costs_few_reads_and_one_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    storage = CountingStorage(tmp_path / "state")
    cfg = base_config(tmp_path, [{"sni": ["*"], "default": True, "upstreams": ["127.0.0.1:9"]}])
    before = REGISTRY.get_sample_value(METRIC) or 0.0
    async with running_proxy(tmp_path, cfg, storage=storage) as p:
        with caplog.at_level(logging.WARNING, logger="edgeproxy.conn"):
            t0 = trio.current_time()
            # Waves of concurrent hellos, as a flood sends them: what one read answers is
            # shared, whatever the machine's load makes of the time between waves.
            for _ in range(N // WAVE):
                async with trio.open_nursery() as nursery:
                    for _ in range(WAVE):
                        nursery.start_soon(acme_tls_hello, p.port, "nobody.example.test")
            elapsed = trio.current_time() - t0
    assert (REGISTRY.get_sample_value(METRIC) or 0.0) - before == N
    # One read per NEGATIVE_TTL of the run at most, and never one per hello.
    assert storage.challenge_reads <= elapsed / NEGATIVE_TTL + 1
    assert storage.challenge_reads < N
    lines = [r for r in caplog.records if "no pending challenge" in r.getMessage()]
    assert len(lines) == 1, [r.getMessage() for r in lines]
