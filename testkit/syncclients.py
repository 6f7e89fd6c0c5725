"""Blocking clients for tests that drive edgeproxy as a subprocess (and may kill it under them):
fetch a served certificate, start a handshake and forget it, poll a condition.
"""

from __future__ import annotations

import socket
import ssl
import threading
import time
from collections.abc import Callable
from pathlib import Path

from cryptography import x509


def fetch_cert(port: int, name: str, roots: Path, timeout: float = 40) -> x509.Certificate:
    ctx = ssl.create_default_context(cafile=str(roots))
    with (
        socket.create_connection(("127.0.0.1", port), timeout=timeout) as s,
        ctx.wrap_socket(s, server_hostname=name) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


def poke(port: int, name: str) -> None:
    """Start a handshake for ``name`` and forget it (the proxy dies under it)."""

    def go() -> None:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                ctx = ssl.create_default_context()
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE
                with ctx.wrap_socket(s, server_hostname=name):
                    pass
        except OSError:
            pass

    threading.Thread(target=go, daemon=True).start()


def wait_for(pred: Callable[[], bool], limit: float = 10.0) -> bool:
    """Poll ``pred`` every millisecond for at most ``limit`` s (a bound, not a measurement)."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.001)
    return False
