"""Client side of the container smoke checks in ``check-deploy.sh``: real TLS, real sockets.

Owns what a client does against a running edgeproxy container: fetch a page through TLS
(optionally behind a PROXY v2 header, as the NLB sends it), knock like an NLB health check
(PROXY v2 LOCAL, then close), be refused when a PROXY header comes from an address outside
``server.proxy_protocol_from``, and prove a drain: a request in flight when the container is
told to stop still gets its answer, while new connections are already refused. It must not
know how the container was started or stopped (the script passes the stop command). Standard
library only, so it runs on any Python 3.11 beside the image build.

Exit status 0 means the check held; otherwise the last line on stderr says what broke.
"""

from __future__ import annotations

import argparse
import ipaddress
import socket
import ssl
import struct
import subprocess
import sys
import time

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
#: Upper bound for waiting on the container (listener closing, stop command finishing).
PATIENCE = 60.0


class SmokeError(Exception):
    """A check did not hold; the message says which and what was seen."""


def proxy_v2_header(source: str, source_port: int, dest: str, dest_port: int) -> bytes:
    """PROXY v2, PROXY command, TCP over IPv4: what an NLB prepends to a client's bytes."""
    addresses = (
        ipaddress.IPv4Address(source).packed
        + ipaddress.IPv4Address(dest).packed
        + struct.pack("!HH", source_port, dest_port)
    )
    return V2_SIGNATURE + bytes((0x21, 0x11)) + struct.pack("!H", len(addresses)) + addresses


def proxy_v2_local() -> bytes:
    """PROXY v2 LOCAL with no address block: an NLB health check connection."""
    return V2_SIGNATURE + bytes((0x20, 0x00, 0x00, 0x00))


def open_tls(
    port: int, ca: str | None, name: str, *, preamble: bytes = b"", host: str = "127.0.0.1"
) -> ssl.SSLSocket:
    """TLS to ``host:port`` for ``name``, verified against ``ca`` (``None``: not verified)."""
    ctx = ssl.create_default_context(cafile=ca)
    if ca is None:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    raw = socket.create_connection((host, port), timeout=PATIENCE)
    if preamble:
        raw.sendall(preamble)
    return ctx.wrap_socket(raw, server_hostname=name)


def read_response(tls: ssl.SSLSocket) -> tuple[int, bytes]:
    data = b""
    while chunk := tls.recv(65536):
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line = head.split(b"\r\n", 1)[0].split()
    if len(status_line) < 2 or not status_line[1].isdigit():
        raise SmokeError(f"not an HTTP response: {data[:200]!r}")
    return int(status_line[1]), body


def request(name: str) -> bytes:
    return f"GET / HTTP/1.1\r\nHost: {name}\r\nConnection: close\r\n\r\n".encode()


def fetch(port: int, ca: str | None, name: str, preamble: bytes = b"") -> bytes:
    with open_tls(port, ca, name, preamble=preamble) as tls:
        tls.sendall(request(name))
        status, body = read_response(tls)
    if status != 200:
        raise SmokeError(f"GET https://{name}/ answered {status}: {body[:200]!r}")
    return body


def refuses_connections(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=2):
            return False
    except ConnectionRefusedError:
        return True
    except OSError:
        return False


def drain(port: int, ca: str, name: str, stop_command: list[str]) -> None:
    """A request in flight at stop time completes; new connections are refused meanwhile."""
    tls = open_tls(port, ca, name)
    with tls:
        text = request(name)
        # Everything but the blank line that ends the headers: the upstream is still waiting
        # for the request when the stop begins.
        tls.sendall(text[:-2])
        stopper = subprocess.Popen(stop_command, stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + PATIENCE
        while not refuses_connections(port):
            if time.monotonic() > deadline or stopper.poll() is not None:
                stopper.kill()
                raise SmokeError("the listener did not close after the stop signal")
            time.sleep(0.1)
        if stopper.poll() is not None:
            raise SmokeError(
                f"the stop finished before the in-flight request ended: {stopper.returncode}"
            )
        tls.sendall(text[-2:])
        status, body = read_response(tls)
    if status != 200:
        raise SmokeError(f"in-flight request answered {status} during the drain: {body[:200]!r}")
    print(f"in-flight request completed during the drain ({len(body)} bytes)")
    try:
        code = stopper.wait(timeout=PATIENCE)
    except subprocess.TimeoutExpired:
        stopper.kill()
        raise SmokeError("the stop command did not finish") from None
    if code != 0:
        raise SmokeError(f"{' '.join(stop_command)} exited {code}")


def health_check(port: int) -> None:
    """Connect, send PROXY v2 LOCAL, close: the connection must be accepted."""
    with socket.create_connection(("127.0.0.1", port), timeout=PATIENCE) as s:
        s.sendall(proxy_v2_local())
        s.shutdown(socket.SHUT_WR)
        s.settimeout(PATIENCE)
        leftover = s.recv(1024)
    if leftover:
        raise SmokeError(f"health check connection got bytes back: {leftover[:100]!r}")


def untrusted(port: int, source: str, name: str) -> None:
    """From ``source``: a PROXY v2 header and a ClientHello; the proxy must hang up unheard."""
    raw = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    raw.settimeout(PATIENCE)
    raw.bind((source, 0))
    try:
        raw.connect(("127.0.0.1", port))
        raw.sendall(proxy_v2_header("203.0.113.66", 40000, "127.0.0.1", port))
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        with ctx.wrap_socket(raw, server_hostname=name) as tls:
            tls.recv(1)
    except (ConnectionError, ssl.SSLError):
        return  # reset or closed without a TLS answer: refused
    except TimeoutError:
        raise SmokeError(f"a PROXY header from {source} was neither answered nor refused") from None
    finally:
        raw.close()
    raise SmokeError(f"a PROXY header from {source} got a TLS handshake: it was trusted")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    for cmd in ("fetch", "drain"):
        p = sub.add_parser(cmd)
        p.add_argument("--port", type=int, required=True)
        p.add_argument("--name", required=True, help="SNI / Host to ask for")
        if cmd == "fetch":
            trust = p.add_mutually_exclusive_group(required=True)
            trust.add_argument("--ca", help="PEM CA that signed the proxy's certificate")
            trust.add_argument("--insecure", action="store_true", help="do not verify")
            p.add_argument("--proxy-v2-from", metavar="IP:PORT", help="send PROXY v2 first")
            p.add_argument("--expect", default="", help="text the body must contain")
        else:
            p.add_argument("--ca", required=True, help="PEM CA that signed the proxy's certificate")
            p.add_argument("stop_command", nargs="+", help="command that stops the container")
    hc = sub.add_parser("health-check")
    hc.add_argument("--port", type=int, required=True)
    un = sub.add_parser("untrusted", help="a PROXY header from --source must be refused")
    un.add_argument("--port", type=int, required=True)
    un.add_argument("--source", required=True, help="local address outside proxy_protocol_from")
    un.add_argument("--name", default="untrusted.edgeproxy.test", help="SNI to ask for")
    args = parser.parse_args(argv)

    try:
        if args.cmd == "fetch":
            preamble = b""
            if args.proxy_v2_from:
                ip, _, src_port = args.proxy_v2_from.rpartition(":")
                preamble = proxy_v2_header(ip, int(src_port), "127.0.0.1", args.port)
            body = fetch(args.port, args.ca, args.name, preamble)
            if args.expect.encode() not in body:
                raise SmokeError(f"body lacks {args.expect!r}: {body[:200]!r}")
            print(body.decode(errors="replace").strip())
        elif args.cmd == "drain":
            drain(args.port, args.ca, args.name, args.stop_command)
        elif args.cmd == "untrusted":
            untrusted(args.port, args.source, args.name)
        else:
            health_check(args.port)
    except (SmokeError, OSError, ssl.SSLError) as exc:
        print(f"smoke {args.cmd}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
