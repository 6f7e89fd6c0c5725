"""Three edgeproxy replicas behind HAProxy on one PostgreSQL, as ``tests/cluster`` and
``bench.cluster`` run them (``start_cluster``):

    curl --> HAProxy 127.0.0.1 (mode tcp, roundrobin, send-proxy-v2, check-send-proxy)
               |--> edgeproxy replica 127.0.0.2 --+
               |--> edgeproxy replica 127.0.0.3 --+--> PostgreSQL (shared storage)
               +--> edgeproxy replica 127.0.0.4 --+
    pebble (tlsPort = HAProxy's port): the CA's validations land on any replica.

Everything is a real process; every process is stopped on leaving ``start_cluster``, pass or fail.
"""

from __future__ import annotations

import os
import re
import socket
import ssl
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509

from edgeproxy.wire.proxy_protocol import build_v2
from testkit import postgres as pg
from testkit.pebble import Pebble, start_pebble
from testkit.ports import free_port
from testkit.procs import kill_process, stop_process
from testkit.proxy import wait_port

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

[acme.limits]
# 40-second certificates renew every 20 s: Let's Encrypt's 5 certificates per name a week and
# 300 orders in 3 hours would stop their renewals (the other budgets stay at its figures).
duplicate_certificates = 0
new_orders_per_account = 0

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
        kill_process(self.procs.pop(ip))

    def stop_all(self) -> None:
        for proc in self.procs.values():
            kill_process(proc)
        self.procs.clear()
        stop_process(self.haproxy)


def start_file_server(
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


@contextmanager
def start_cluster(tmp: Path, postgres_server: pg.PostgresServer) -> Iterator[Cluster]:
    """The whole topology, in ``tmp``, on a new database of ``postgres_server``; every process
    is stopped on leaving, pass or fail."""
    hport, rport = free_port(), free_port()
    db = "cluster_" + os.urandom(4).hex()
    postgres_server.create_database(db)
    pebble = start_pebble(tmp, tls_port=hport, validity=40, env={"PEBBLE_AUTHZREUSE": "0"})
    upstream, up_port = start_file_server(tmp)
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
        stop_process(upstream)
        pebble.stop()


def curl(c: Cluster, name: str, *, source: str = "127.0.0.9") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            "curl",
            "-sS",
            "--fail",
            "--max-time",
            "40",
            "--interface",
            source,
            "--cacert",
            str(c.roots),
            "--resolve",
            f"{name}:{c.hport}:127.0.0.1",
            f"https://{name}:{c.hport}/",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )


def replica_cert(c: Cluster, ip: str, name: str) -> x509.Certificate:
    """Handshake with one replica directly (sending the PROXY v2 header it expects)."""
    ctx = ssl.create_default_context(cafile=str(c.roots))
    with socket.create_connection((ip, c.rport), timeout=40) as s:
        s.sendall(build_v2(("127.0.0.50", 40000), (ip, c.rport)))
        with ctx.wrap_socket(s, server_hostname=name) as tls:
            der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


def validations(c: Cluster, name: str) -> int:
    log = (c.pebble.workdir / "pebble.log").read_text(errors="replace")
    return len(re.findall(rf'Pulled a task .*Value:"{re.escape(name)}"', log))
