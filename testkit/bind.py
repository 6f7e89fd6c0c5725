"""Debian's bind9 (``named``) as the authoritative server of test zones, on loopback.

``start_named(tmp_path, zones)`` writes a config under ``tmp_path`` (its own directory, pid
file and journals), a TSIG key made now (HMAC-SHA256, 32 random bytes) that may update TXT
records anywhere in every zone (``update-policy { grant KEY zonesub TXT; }``), and one zone
file per zone with the extra records given; ``named -g`` runs in the foreground on
``127.0.0.1:port`` (UDP and TCP), also resolving (CNAMEs followed across its zones) for
loopback clients. ``Named.stop()`` ends it.
"""

from __future__ import annotations

import base64
import secrets
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import dns.message
import dns.query
import dns.rdatatype

from testkit.ports import free_port
from testkit.procs import stop_process

NAMED = "/usr/sbin/named"
KEY_NAME = "edgeproxy-test."


def named_available() -> bool:
    return shutil.which(NAMED) is not None


@dataclass
class Named:
    port: int
    key_secret: str  # base64
    workdir: Path
    process: subprocess.Popen[bytes]

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def txt(self, name: str) -> list[str]:
        """The TXT strings at ``name`` as bind answers them now (following a CNAME)."""
        q = dns.message.make_query(name, "TXT")
        r = dns.query.udp(q, "127.0.0.1", port=self.port, timeout=3)
        return [
            b"".join(rd.strings).decode()
            for rrset in r.answer
            if rrset.rdtype == dns.rdatatype.TXT
            for rd in rrset
        ]

    def logs(self) -> str:
        path = self.workdir / "named.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        stop_process(self.process)


def start_named(tmp_path: Path, zones: dict[str, list[str]]) -> Named:
    """``zones``: zone name (no trailing dot) -> extra record lines for its zone file."""
    workdir = tmp_path / "named"
    workdir.mkdir()
    port = free_port()
    secret = base64.b64encode(secrets.token_bytes(32)).decode()
    conf = [
        "options {",
        f'  directory "{workdir}";',
        f'  pid-file "{workdir}/named.pid";',
        f"  listen-on port {port} {{ 127.0.0.1; }};",
        "  listen-on-v6 { none; };",
        # Recursion on, from loopback only: bind 9.18 authoritative-only does not chase a
        # CNAME into another of its zones, and pebble needs a resolver that does (as a
        # CA's resolver would). Every name asked is in these zones: nothing goes out.
        "  recursion yes;",
        "  allow-recursion { 127.0.0.1; };",
        "  dnssec-validation no;",
        "  notify no;",
        "  allow-query { any; };",
        "};",
        "controls { };",
        f'key "{KEY_NAME}" {{ algorithm hmac-sha256; secret "{secret}"; }};',
    ]
    for zone, records in zones.items():
        (workdir / f"{zone}.db").write_text(
            "\n".join(
                [
                    "$TTL 60",
                    f"@ IN SOA ns.{zone}. hostmaster.{zone}. 1 60 60 600 60",
                    f"@ IN NS ns.{zone}.",
                    "ns IN A 127.0.0.1",
                    *records,
                    "",
                ]
            )
        )
        conf += [
            f'zone "{zone}" {{',
            "  type primary;",
            f'  file "{workdir}/{zone}.db";',
            f"  update-policy {{ grant {KEY_NAME} zonesub TXT; }};",
            "};",
        ]
    (workdir / "named.conf").write_text("\n".join(conf) + "\n")
    with (workdir / "named.log").open("wb") as log:
        # -n 1: one worker thread is plenty, and the machine is shared.
        proc = subprocess.Popen(
            [NAMED, "-g", "-4", "-n", "1", "-c", str(workdir / "named.conf")],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    named = Named(port, secret, workdir, proc)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"named exited\n{named.logs()}")
        try:
            q = dns.message.make_query(f"ns.{next(iter(zones))}", "A")
            dns.query.udp(q, "127.0.0.1", port=port, timeout=0.5)
            return named
        except (OSError, dns.exception.Timeout):
            time.sleep(0.1)
    named.stop()
    raise RuntimeError(f"named did not answer within 15s\n{named.logs()}")
