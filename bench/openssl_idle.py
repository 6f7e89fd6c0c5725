"""OpenSSL's C heap per idle, established TLS 1.3 server connection, and what each knob changes.

    python -m bench.openssl_idle                    # every variant, 2,000 connections each
    python -m bench.openssl_idle --count 500 --only baseline --only no-release-buffers
    heaptrack python -m bench.openssl_idle --only baseline --exit-held   # then: by allocation site
    heaptrack_print -f heaptrack.*.zst --print-leaks 1 --merge-backtraces 1 -n 200 -s 200

The OpenSSL part of ``bench.idle_memory`` (workload (d) of ``bench.run``), measured without the
proxy around it, so a setting can be tried in seconds. Each variant runs in a process of its
own: N server connections made as edgeproxy makes them (``tls/contexts.py``: the certificate's
context with tickets on, started on a ``ticket_context()``, OpenSSL reading and writing a
socket of a ``socketpair``), each with a full handshake against a client, one request and one
response, and one more read that finds nothing (as an idle reader leaves it). The clients are
freed before the second glibc ``mallinfo2()`` reading, so the figure is the servers' side
only, and OpenSSL's alone: the ``SSL.Connection`` and socket objects are Python objects under
512 bytes, which live in pymalloc's arenas, not in ``malloc``'s.

The client is Python's ``ssl`` (the interpreter's OpenSSL, Debian's 3.0 here: X25519, as
``bench.idle_client`` and so workload (d)); the ``pq-client`` variants use a pyOpenSSL client
on the wheel's own OpenSSL, whose default groups start with X25519MLKEM768 as current browsers
do. ``python-ssl-server`` is a reference, not edgeproxy: the same connections served by
Python's ``ssl`` module with its defaults, on the interpreter's OpenSSL. ``--exit-held`` ends the process with ``os._exit`` while the connections are held, so
``heaptrack``'s "leaks" are exactly what they hold.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import resource
import socket
import ssl
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL

from bench.pki import BenchPki, make_pki
from edgeproxy.tls import openssl_internals as internals
from edgeproxy.tls.contexts import (
    build_server_context,
    load_pem_chain,
    new_server_connection,
    ticket_context,
)
from testkit.malloc import malloc_in_use

WARM: Final = 20  # connections made before the first reading: one-time allocations settle
REQUEST: Final = b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n"
RESPONSE: Final = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"

ContextHook = Callable[[SSL.Context], object]


@dataclass(frozen=True)
class Variant:
    what: str
    contexts: ContextHook | None = None  # applied to the certificate and the ticket context
    ticket_context: bool = True  # start on a ticket context, as edgeproxy does
    on_socket: bool = True  # False: memory BIOs kept (edgeproxy attaches the socket)
    client_groups: bytes | None = None  # set: a pyOpenSSL client on the wheel's OpenSSL
    python_server: bool = False  # the server is Python's ``ssl`` (a reference, not edgeproxy)


def _clear_mode(mode: int) -> ContextHook:
    return lambda ctx: internals.Internals.lib.SSL_CTX_clear_mode(ctx._context, mode)


VARIANTS: Final[dict[str, Variant]] = {
    "baseline": Variant("edgeproxy's contexts, as in workload (d)"),
    "memory-bios": Variant("memory BIOs kept (no attach_socket)", on_socket=False),
    "no-release-buffers": Variant(
        "SSL_MODE_RELEASE_BUFFERS cleared", _clear_mode(SSL.MODE_RELEASE_BUFFERS)
    ),
    "no-auto-retry": Variant(
        "SSL_MODE_AUTO_RETRY cleared", _clear_mode(internals.Internals.lib.SSL_MODE_AUTO_RETRY)
    ),
    "no-ticket": Variant("SSL_OP_NO_TICKET", lambda ctx: ctx.set_options(SSL.OP_NO_TICKET)),
    "no-ticket-context": Variant("started on the certificate's context", ticket_context=False),
    "chacha20": Variant(
        "TLS 1.3 suite CHACHA20-POLY1305 only",
        lambda ctx: ctx.set_tls13_ciphersuites(b"TLS_CHACHA20_POLY1305_SHA256"),
    ),
    "aes256": Variant(
        "TLS 1.3 suite AES-256-GCM only",
        lambda ctx: ctx.set_tls13_ciphersuites(b"TLS_AES_256_GCM_SHA384"),
    ),
    "p256": Variant(
        "group P-256 only (the client's X25519 share refused: HelloRetryRequest)",
        lambda ctx: internals.set_context_groups(ctx, b"P-256"),
    ),
    "pq-client": Variant(
        "client on the wheel's OpenSSL, its default groups (X25519MLKEM768 first)",
        client_groups=b"",
    ),
    "pq-client-x25519": Variant(
        "the same client offering X25519 only (pq-client's control)", client_groups=b"X25519"
    ),
    "python-ssl-server": Variant(
        "reference: a Python ssl server (the interpreter's OpenSSL), its defaults",
        python_server=True,
    ),
}


class _Client:
    """The far end: ``send``/``recv`` plaintext, ``step`` the handshake (True when done)."""

    def __init__(self, pki: BenchPki, groups: bytes | None) -> None:
        self.groups = groups
        if groups is None:
            self.py_ctx = ssl.create_default_context(cafile=str(pki.ca_pem))
        else:
            ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
            ctx.load_verify_locations(str(pki.ca_pem))
            ctx.set_verify(SSL.VERIFY_PEER, lambda *_: True)  # the handshake is what counts
            if groups:
                internals.set_context_groups(ctx, groups)
            self.ossl_ctx = ctx
        self.name = pki.name

    def open(self, sock: socket.socket) -> Any:
        if self.groups is None:
            return self.py_ctx.wrap_socket(
                sock, server_hostname=self.name, do_handshake_on_connect=False
            )
        conn = SSL.Connection(self.ossl_ctx, sock)
        conn.set_connect_state()
        conn.set_tlsext_host_name(self.name.encode())
        return conn


def _client_step(client: Any) -> bool:
    try:
        client.do_handshake()
    except (ssl.SSLWantReadError, SSL.WantReadError):
        return False
    return True


def _pump_memory(conn: SSL.Connection, sock: socket.socket) -> None:
    """Memory-BIO server: move ciphertext between its BIOs and its end of the socket pair."""
    try:
        while data := sock.recv(65536):
            conn.bio_write(data)
    except BlockingIOError:
        pass
    try:
        while True:
            sock.sendall(conn.bio_read(65536))
    except SSL.WantReadError:
        pass


def _server_read(conn: SSL.Connection, sock: socket.socket, on_socket: bool) -> bytes:
    for _ in range(50):
        if not on_socket:
            _pump_memory(conn, sock)
        try:
            return internals.read_plaintext(conn, 16384)
        except SSL.WantReadError:
            continue
    raise RuntimeError("the request never arrived")


def _one(
    variant: Variant,
    server_ctx: SSL.Context,
    tickets: SSL.Context,
    client: _Client,
    keep: list[tuple[SSL.Connection, socket.socket]],
) -> str:
    """Open one server connection, leave it idle in ``keep``; the negotiated group's name."""
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    theirs.setblocking(False)
    conn = new_server_connection(
        server_ctx,
        sock=ours if variant.on_socket else None,
        session_ctx=tickets if variant.ticket_context else None,
    )
    far = client.open(theirs)
    server_done = client_done = False
    for _ in range(50):
        client_done = client_done or _client_step(far)
        if not variant.on_socket:
            _pump_memory(conn, ours)
        if not server_done:
            server_done = internals.handshake_step(conn) == internals.HANDSHAKE_DONE
        if not variant.on_socket:
            _pump_memory(conn, ours)
        if server_done and client_done:
            break
    if not (server_done and client_done):
        raise RuntimeError("the handshake did not finish")
    far.sendall(REQUEST)
    if not _server_read(conn, ours, variant.on_socket).startswith(b"GET "):
        raise RuntimeError("the request did not arrive")
    internals.write_plaintext(conn, RESPONSE)
    if not variant.on_socket:
        _pump_memory(conn, ours)
    if not far.recv(16384).startswith(b"HTTP/1.1 200"):
        raise RuntimeError("the response did not arrive")
    if conn.get_protocol_version_name() != "TLSv1.3":
        raise RuntimeError(f"negotiated {conn.get_protocol_version_name()}, not TLS 1.3")
    try:  # as an idle reader leaves it: one read that finds nothing
        internals.read_plaintext(conn, 16384)
    except SSL.WantReadError:
        pass
    group = conn.get_group_name() or "?"
    keep.append((conn, ours))
    theirs.close()
    del far
    return group


def _one_python(
    server_ctx: ssl.SSLContext, client: _Client, keep: list[tuple[ssl.SSLSocket, None]]
) -> str:
    """``_one`` with a Python ``ssl`` server: what the interpreter's OpenSSL holds."""
    ours, theirs = socket.socketpair()
    server = server_ctx.wrap_socket(ours, server_side=True, do_handshake_on_connect=False)
    far = client.open(theirs)
    server.setblocking(False)
    far.setblocking(False)
    server_done = client_done = False
    for _ in range(50):
        client_done = client_done or _client_step(far)
        server_done = server_done or _client_step(server)
        if server_done and client_done:
            break
    if not (server_done and client_done) or server.version() != "TLSv1.3":
        raise RuntimeError("the handshake did not finish in TLS 1.3")
    far.sendall(REQUEST)
    if not server.recv(16384).startswith(b"GET "):
        raise RuntimeError("the request did not arrive")
    server.sendall(RESPONSE)
    if not far.recv(16384).startswith(b"HTTP/1.1 200"):
        raise RuntimeError("the response did not arrive")
    with contextlib.suppress(ssl.SSLWantReadError):
        server.recv(16384)
    keep.append((server, None))
    far.close()
    return "-"  # Python 3.11 does not say which group it negotiated


def measure(name: str, count: int, exit_held: bool) -> None:
    """In a process of its own: print one result line, ``name bytes group``."""
    variant = VARIANTS[name]
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if hard < 2 * (count + WARM) + 64:
        raise SystemExit(f"RLIMIT_NOFILE {hard} is too low for {count} socket pairs")
    pki = make_pki(Path(tempfile.mkdtemp(prefix="edgeproxy-openssl-idle-")))
    chain = load_pem_chain(pki.cert_pem.read_bytes())
    key = serialization.load_pem_private_key(pki.key_pem.read_bytes(), password=None)
    server_ctx = build_server_context(chain, key, session_tickets=True)
    tickets = ticket_context()
    if variant.contexts is not None:
        for ctx in (server_ctx, tickets):
            variant.contexts(ctx)
    client = _Client(pki, variant.client_groups)
    keep: list[Any] = []
    py_ctx: ssl.SSLContext | None = None
    if variant.python_server:
        py_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        py_ctx.load_cert_chain(pki.cert_pem, pki.key_pem)

    def one() -> str:
        if py_ctx is not None:
            return _one_python(py_ctx, client, keep)
        return _one(variant, server_ctx, tickets, client, keep)

    for _ in range(WARM):
        one()
    gc.collect()
    before = malloc_in_use()
    group = ""
    for _ in range(count):
        group = one()
    gc.collect()
    after = malloc_in_use()
    if before is None or after is None:
        raise SystemExit("needs glibc's mallinfo2")
    print(f"{name} {(after - before) / count:.0f} {group}", flush=True)
    if exit_held:
        os._exit(0)  # heaptrack: what is still allocated is what the connections hold


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.openssl_idle", description=(__doc__ or "").split("\n\n")[0]
    )
    parser.add_argument("--count", type=int, default=2000, help="connections per variant")
    parser.add_argument("--only", action="append", choices=sorted(VARIANTS), help="variant")
    parser.add_argument("--exit-held", action="store_true", help="os._exit while held")
    parser.add_argument("--inside", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.inside:
        measure(args.inside, args.count, args.exit_held)
        return 0
    names = args.only or list(VARIANTS)
    if args.exit_held:
        if len(names) != 1:
            parser.error("--exit-held measures one variant: give one --only")
        measure(names[0], args.count, exit_held=True)
        return 0
    print(
        f"{SSL.OpenSSL_version(SSL.OPENSSL_VERSION).decode()} (server), "
        f"{ssl.OPENSSL_VERSION} (Python ssl client), {args.count:,} connections per variant"
    )
    print()
    print("| variant | what | group | bytes per idle connection | KiB | vs baseline |")
    print("|---|---|---|---|---|---|")
    base: float | None = None
    for name in names:
        argv_in = [sys.executable, "-m", "bench.openssl_idle", "--inside", name]
        argv_in += ["--count", str(args.count)]
        out = subprocess.run(argv_in, check=True, capture_output=True, text=True).stdout
        _, size_text, group = out.split()
        size = float(size_text)
        if name == "baseline":
            base = size
        delta = "" if base is None or name == "baseline" else f"{(size - base) / 1024:+.2f} KiB"
        what = VARIANTS[name].what
        print(f"| {name} | {what} | {group} | {size:,.0f} | {size / 1024:.2f} | {delta} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
