"""The servers under test and the origin behind them, started from ``bench/configs/`` templates.

Owns: rendering each template (``string.Template``: ``$name`` placeholders) into the run's
work directory, the command line of each program, and the per-start OpenSSL configuration
that turns TLS session tickets on or off. Must not know the workloads or how results are
computed; ``procs.Supervisor`` starts and stops what this module describes.

Every terminator is started the same way: pinned to one CPU, one worker/thread, the same
ECDSA P-256 certificate, TLS 1.2-1.3 with the TLS 1.3 suites in edgeproxy's order (AES-128-GCM
first, server preference), forwarding plain TCP to the origin nginx. Session tickets are
switched with ``OPENSSL_CONF`` (``NumTickets = 0``), which every OpenSSL-based one honours:
OpenSSL applies the ``system_default`` section to each new ``SSL_CTX``, including the OpenSSL
bundled in the ``cryptography`` wheel that edgeproxy uses through pyOpenSSL. Caddy (Go's
``crypto/tls``) reads no OpenSSL configuration: its tickets are switched in its own config.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import string
import subprocess
import sys
from abc import ABC, abstractmethod
from dataclasses import dataclass
from itertools import count
from pathlib import Path
from typing import ClassVar, Final

from testkit.ports import free_port

from .pki import BenchPki
from .procs import Server, Supervisor

__all__ = [
    "BODIES",
    "CONFIGS",
    "REPO_ROOT",
    "TERMINATORS",
    "Caddy",
    "Edgeproxy",
    "Haproxy",
    "HaproxyBigbuf",
    "Hitch",
    "NginxStream",
    "Origin",
    "Stage",
    "Terminator",
    "openssl_conf",
    "render",
    "snapshot_edgeproxy",
    "start_origin",
]

CONFIGS: Final = Path(__file__).resolve().parent / "configs"
REPO_ROOT: Final = Path(__file__).resolve().parent.parent

# TLS 1.3 suites in edgeproxy's (fixed, server-preference) order, given to the others too so
# the bulk rows compare the same cipher.
CIPHERSUITES: Final = "TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256"

# Paths the origin serves, by workload body size.
BODIES: Final = {"empty": ("/empty.bin", 0), "1k": ("/1k.bin", 1024), "1m": ("/1m.bin", 1 << 20)}

_serial = count(1)


def snapshot_edgeproxy(workdir: Path) -> tuple[Path, dict[str, object]]:
    """Copy the ``edgeproxy`` package into ``workdir`` and describe what was copied.

    Every edgeproxy start imports the copy, so a run measures one version of the code even
    when the working tree changes while it runs (several people share it). The description
    (commit, files that differ from it, a digest of the copy) goes into the results.
    """
    root = workdir / "edgeproxy-src"
    shutil.copytree(
        REPO_ROOT / "edgeproxy",
        root / "edgeproxy",
        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
    )
    digest = hashlib.sha256()
    for path in sorted((root / "edgeproxy").rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())

    def git(*args: str) -> str:
        proc = subprocess.run(
            ["git", "-C", str(REPO_ROOT), *args], capture_output=True, text=True, check=False
        )
        return proc.stdout if proc.returncode == 0 else ""

    status = git("status", "--porcelain", "--", "edgeproxy")
    return root, {
        "commit": git("rev-parse", "HEAD").strip() or None,
        "changed_files": [line[3:] for line in status.splitlines()],
        "sha256": digest.hexdigest(),
    }


def render(template: str, dest: Path, **values: object) -> Path:
    text = (CONFIGS / template).read_text()
    dest.write_text(string.Template(text).substitute({k: str(v) for k, v in values.items()}))
    return dest


def openssl_conf(workdir: Path, *, tickets: bool) -> Path:
    """The ``OPENSSL_CONF`` file for a start with session tickets on or off."""
    dest = workdir / ("openssl-tickets.cnf" if tickets else "openssl-notickets.cnf")
    if not dest.exists():
        render("openssl.cnf", dest, num_tickets_line="" if tickets else "NumTickets = 0")
    return dest


@dataclass(frozen=True)
class Stage:
    """What every terminator start needs to know about the run."""

    workdir: Path
    pki: BenchPki
    origin_port: int
    cpu: int | None  # the terminators' CPU
    max_connections: int  # idle connections the run will hold, plus headroom
    nofile: int  # the descriptor limit every process inherits
    edgeproxy_root: Path = REPO_ROOT  # where ``python -m edgeproxy`` imports from
    edgeproxy_log_level: str = "warning"


@dataclass(frozen=True)
class Origin:
    server: Server
    port: int
    status_port: int

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"


def start_origin(
    sup: Supervisor, workdir: Path, *, cpu: int | None, nofile: int, connections: int
) -> Origin:
    """Debian's nginx serving the workload bodies over plain HTTP on loopback."""
    docroot = workdir / "docroot"
    docroot.mkdir(parents=True, exist_ok=True)
    # Started as root, nginx serves files as an unprivileged user: it must be able to walk in.
    for d in (workdir, docroot):
        d.chmod(0o755)
    for path, size in BODIES.values():
        (docroot / path.lstrip("/")).write_bytes(b"x" * size)
    for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (workdir / "nginx-tmp" / sub).mkdir(parents=True, exist_ok=True)
    port, status_port = free_port(), free_port()
    conf = render(
        "upstream-nginx.conf",
        workdir / "upstream-nginx.conf",
        workdir=workdir,
        docroot=docroot,
        port=port,
        status_port=status_port,
        nofile=nofile,
        worker_connections=connections,
    )
    argv = ["nginx", "-p", str(workdir), "-e", str(workdir / "upstream-nginx.error.log")]
    server = sup.start("origin-nginx", [*argv, "-c", str(conf)], cpu=cpu, port=port)
    return Origin(server, port, status_port)


class Terminator(ABC):
    """One TLS terminator: its programs and how to start it for a ``Stage``."""

    name: ClassVar[str]
    programs: ClassVar[tuple[str, ...]]
    install_hint: ClassVar[str]

    @classmethod
    def missing(cls) -> list[str]:
        return [p for p in cls.programs if shutil.which(p) is None]

    @abstractmethod
    def command(self, stage: Stage, port: int, tag: str, *, tickets: bool) -> list[str]:
        """Write this start's config into ``stage.workdir`` and return the command line.

        ``tickets`` matters only to a server that ignores ``OPENSSL_CONF``.
        """

    def cwd(self, stage: Stage) -> Path | None:
        return None

    def session_reuse_pct(self, stage: Stage, server: Server) -> float | None:
        """Share of the last second's TLS handshakes that resumed, if the server can tell."""
        return None

    def env(self, stage: Stage, tag: str) -> dict[str, str]:
        """Environment besides ``OPENSSL_CONF`` for this start."""
        return {}

    def start(self, sup: Supervisor, stage: Stage, *, tickets: bool) -> Server:
        port = free_port()
        tag = f"{self.name}-{'tickets' if tickets else 'notickets'}-{next(_serial)}"
        argv = self.command(stage, port, tag, tickets=tickets)
        env = {
            "OPENSSL_CONF": str(openssl_conf(stage.workdir, tickets=tickets)),
            **self.env(stage, tag),
        }
        return sup.start(tag, argv, cpu=stage.cpu, env=env, port=port, cwd=self.cwd(stage))


class Edgeproxy(Terminator):
    name = "edgeproxy"
    programs = ()
    install_hint = "pip install -e . (from the repository root)"

    def command(self, stage: Stage, port: int, tag: str, *, tickets: bool) -> list[str]:
        conf = render(
            "edgeproxy.toml",
            stage.workdir / f"{tag}.toml",
            port=port,
            admin_port=free_port(),
            maxconn=max(stage.max_connections, 20000),
            workdir=stage.workdir,
            log_level=stage.edgeproxy_log_level,
            upstream_port=stage.origin_port,
            cert_pem=stage.pki.cert_pem,
            key_pem=stage.pki.key_pem,
        )
        return [sys.executable, "-m", "edgeproxy", "run", "-c", str(conf)]

    def cwd(self, stage: Stage) -> Path | None:
        return stage.edgeproxy_root  # ``-m edgeproxy`` imports from the working directory first


class Haproxy(Terminator):
    name = "haproxy"
    programs = ("haproxy",)
    install_hint = "apt-get install -y haproxy"
    # Lines added to the ``global`` section.
    tune: ClassVar[tuple[str, ...]] = ()

    def command(self, stage: Stage, port: int, tag: str, *, tickets: bool) -> list[str]:
        conf = render(
            "haproxy.cfg",
            stage.workdir / f"{tag}.cfg",
            port=port,
            maxconn=stage.max_connections,
            ciphersuites=CIPHERSUITES,
            combined_pem=stage.pki.combined_pem,
            upstream_port=stage.origin_port,
            stats_socket=self._socket(stage, tag),
            tune_lines="".join(f"    {line}\n" for line in self.tune),
        )
        return ["haproxy", "-db", "-f", str(conf)]

    @staticmethod
    def _socket(stage: Stage, tag: str) -> Path:
        return stage.workdir / f"{tag}.sock"

    def stats_command(self, stage: Stage, server: Server, command: str) -> str | None:
        """One command on the server's stats socket and its answer (None: no answer)."""
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(5)
                sock.connect(str(self._socket(stage, server.name)))
                sock.sendall(command.encode() + b"\n")
                data = b""
                while chunk := sock.recv(65536):
                    data += chunk
        except OSError:
            return None
        return data.decode(errors="replace")

    def session_reuse_pct(self, stage: Stage, server: Server) -> float | None:
        # ``show info`` derives SslFrontendSessionReuse_pct from the handshake and key
        # computation rates over the last second: read it right after the load stops.
        info = self.stats_command(stage, server, "show info")
        for line in (info or "").splitlines():
            key, _, value = line.partition(":")
            if key == "SslFrontendSessionReuse_pct":
                return float(value)
        return None


class HaproxyBigbuf(Haproxy):
    """HAProxy with 64 KiB buffers (default 16 KiB), so the bulk row compares like with like.

    edgeproxy reads up to 256 KiB per upstream read in bulk; HAProxy's 16 KiB buffer caps
    each of its reads and ``SSL_write`` calls at 16 KiB. Its manual warns that bigger buffers
    cost memory per connection (two buffers per stream), which the (d) row shows.
    """

    name = "haproxy-bigbuf"
    tune = ("tune.bufsize 65536",)


class Caddy(Terminator):
    """Caddy (Go) as an HTTP reverse proxy terminating TLS with the same certificate.

    Unlike the others it is an HTTP proxy: it parses each request and keeps its own
    keep-alive pool to the origin (so the origin sees a few connections in (d), not one per
    client), which is what its users run. Nothing but the listener: admin endpoint off,
    automatic HTTPS off (no ACME, no redirect listener), OCSP stapling off for anything it
    would manage (the bench leaf names no OCSP responder, so the loaded one fetches nothing:
    its log says so), HTTP/3 off (no UDP listener), config not persisted, state in the run's
    directory. Go's TLS ignores ``OPENSSL_CONF``, so tickets are switched in its config.
    """

    name = "caddy"
    programs = ("caddy",)
    install_hint = "apt-get install -y caddy"

    def command(self, stage: Stage, port: int, tag: str, *, tickets: bool) -> list[str]:
        conf = render(
            "caddy-terminator.json",
            stage.workdir / f"{tag}.json",
            port=port,
            http_port=free_port(),
            tag=tag,
            workdir=stage.workdir,
            upstream_port=stage.origin_port,
            cert_pem=stage.pki.cert_pem,
            key_pem=stage.pki.key_pem,
            tickets_disabled="false" if tickets else "true",
        )
        return ["caddy", "run", "--config", str(conf)]

    def env(self, stage: Stage, tag: str) -> dict[str, str]:
        home = stage.workdir / f"{tag}-home"
        home.mkdir(exist_ok=True)
        # One OS thread running Go code, like the others' one worker; state under the run.
        return {
            "GOMAXPROCS": "1",
            "HOME": str(home),
            "XDG_DATA_HOME": str(home / "data"),
            "XDG_CONFIG_HOME": str(home / "config"),
        }


class NginxStream(Terminator):
    name = "nginx-stream"
    programs = ("nginx",)
    install_hint = "apt-get install -y nginx libnginx-mod-stream"
    MODULE: ClassVar[Path] = Path("/usr/lib/nginx/modules/ngx_stream_module.so")

    @classmethod
    def missing(cls) -> list[str]:
        return super().missing() + ([] if cls.MODULE.exists() else ["libnginx-mod-stream"])

    def command(self, stage: Stage, port: int, tag: str, *, tickets: bool) -> list[str]:
        conf = render(
            "nginx-stream.conf",
            stage.workdir / f"{tag}.conf",
            port=port,
            nofile=min(stage.nofile, 2 * stage.max_connections + 100),
            worker_connections=min(stage.nofile - 50, 2 * stage.max_connections + 50),
            ciphersuites=CIPHERSUITES,
            workdir=stage.workdir,
            cert_pem=stage.pki.cert_pem,
            key_pem=stage.pki.key_pem,
            upstream_port=stage.origin_port,
        )
        errlog = stage.workdir / f"{tag}.error.log"
        return ["nginx", "-p", str(stage.workdir), "-e", str(errlog), "-c", str(conf)]


class Hitch(Terminator):
    name = "hitch"
    programs = ("hitch",)
    install_hint = "apt-get install -y hitch"

    def command(self, stage: Stage, port: int, tag: str, *, tickets: bool) -> list[str]:
        (stage.workdir / "hitch-ocsp").mkdir(exist_ok=True)
        conf = render(
            "hitch.conf",
            stage.workdir / f"{tag}.conf",
            port=port,
            upstream_port=stage.origin_port,
            combined_pem=stage.pki.combined_pem,
            ciphersuites=CIPHERSUITES,
            workdir=stage.workdir,
            # hitch refuses to run its workers as root; they need no file access once started.
            user_line='user = "nobody"' if os.geteuid() == 0 else "",
        )
        return ["hitch", "--config", str(conf)]


TERMINATORS: Final[dict[str, type[Terminator]]] = {
    t.name: t for t in (Edgeproxy, Haproxy, HaproxyBigbuf, NginxStream, Hitch, Caddy)
}
