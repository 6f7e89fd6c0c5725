"""Cluster topology for the tests in this folder, started once per module:

    curl --> HAProxy 127.0.0.1 (mode tcp, roundrobin, send-proxy-v2, check-send-proxy)
               |--> edgeproxy replica 127.0.0.2 --+
               |--> edgeproxy replica 127.0.0.3 --+--> PostgreSQL (shared storage)
               +--> edgeproxy replica 127.0.0.4 --+
    pebble (tlsPort = HAProxy's port): the CA's validations land on any replica.

Everything is a real process; every process is stopped at teardown.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from testkit import postgres as pg
from testkit.pebble import Pebble, start_pebble
from testkit.ports import free_port
from testkit.proxy import wait_port

postgres_server = pg.postgres_server
REPLICA_IPS = ("127.0.0.2", "127.0.0.3", "127.0.0.4")


@dataclass
class Cluster:
    tmp: Path
    pebble: Pebble
    pg: pg.PostgresServer
    dsn: str
    db: str
    hport: int
    rport: int
    roots: Path
    upstream_port: int
    aport: int = 0  # each replica's admin API: {ip}:{aport}
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    haproxy: subprocess.Popen[bytes] | None = None

    def config_path(self, ip: str) -> Path:
        return self.tmp / f"replica-{ip}.toml"

    def log_path(self, ip: str) -> Path:
        return self.tmp / f"replica-{ip}.log"

    def write_config(self, ip: str) -> None:
        self.config_path(ip).write_text(f"""
[server]
listen = ["{ip}:{self.rport}"]
proxy_protocol = "v2"
proxy_protocol_from = ["127.0.0.0/8"]  # HAProxy, on loopback
handshake_timeout = 30

[admin]
listen = "{ip}:{self.aport}"

[tls]
issuer = "acme"
maintenance_interval = 1.0

[acme]
directory = "{self.pebble.directory_url}"
trust = "{self.pebble.ca_bundle_path}"

[on_demand]
allow = ["*.example.test"]
registry = true
wait = 25

[storage]
backend = "postgres"
dsn_env = "EDGEPROXY_TEST_DSN"
lock_ttl = 3

[log]
level = "info"

[[routes]]
sni = ["*"]
default = true
upstreams = ["127.0.0.1:{self.upstream_port}"]
""")

    def start_replica(self, ip: str) -> subprocess.Popen[bytes]:
        self.write_config(ip)
        with open(self.log_path(ip), "ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "edgeproxy", "run", "-c", str(self.config_path(ip))],
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "EDGEPROXY_TEST_DSN": self.dsn},
            )
        self.procs[ip] = proc
        wait_port(ip, self.rport, timeout=30)
        return proc

    def kill_replica(self, ip: str) -> None:
        proc = self.procs.pop(ip)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)

    def stop_all(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                proc.wait(timeout=10)
        self.procs.clear()
        if self.haproxy is not None and self.haproxy.poll() is None:
            self.haproxy.terminate()
            self.haproxy.wait(timeout=10)


def start_upstream(
    tmp: Path, body: str = "hello from the cluster upstream\n", folder: str = "www"
) -> tuple[subprocess.Popen[bytes], int]:
    www = tmp / folder
    www.mkdir()
    (www / "index.html").write_text(body)
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "http.server",
            str(port),
            "--bind",
            "127.0.0.1",
            "--directory",
            str(www),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_port("127.0.0.1", port)
    return proc, port


@pytest.fixture(scope="module")
def cluster(
    tmp_path_factory: pytest.TempPathFactory, postgres_server: pg.PostgresServer
) -> Iterator[Cluster]:
    tmp = tmp_path_factory.mktemp("cluster")
    hport, rport = free_port(), free_port()
    db = "cluster_" + os.urandom(4).hex()
    postgres_server.create_database(db)
    pebble = start_pebble(tmp, tls_port=hport, validity=40, env={"PEBBLE_AUTHZREUSE": "0"})
    upstream, up_port = start_upstream(tmp)
    roots = tmp / "roots.pem"
    roots.write_bytes(pebble.roots_pem())
    c = Cluster(
        tmp, pebble, postgres_server, postgres_server.dsn_for(db), db, hport, rport, roots, up_port,
        aport=free_port(),
    )  # fmt: skip
    try:
        servers = "\n".join(
            f"    server r{i} {ip}:{rport} send-proxy-v2 check check-send-proxy inter 500ms"
            for i, ip in enumerate(REPLICA_IPS)
        )
        conf = tmp / "haproxy.cfg"
        conf.write_text(f"""
global
    maxconn 2000
defaults
    mode tcp
    timeout connect 3s
    timeout client 60s
    timeout server 60s
frontend fe
    bind 127.0.0.1:{hport}
    default_backend replicas
backend replicas
    balance roundrobin
{servers}
""")
        for ip in REPLICA_IPS:
            c.start_replica(ip)
        c.haproxy = subprocess.Popen(
            ["haproxy", "-db", "-f", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT
        )
        wait_port("127.0.0.1", hport)
        yield c
    finally:
        c.stop_all()
        upstream.terminate()
        upstream.wait(timeout=10)
        pebble.stop()
