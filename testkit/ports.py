"""Free loopback ports for test servers that need a fixed number (pebble's tlsPort etc.).

Ports come from [20000, 32000) so they never collide with the kernel's ephemeral range,
which is where the OS puts client sockets and port-0 listeners.
"""

from __future__ import annotations

import random
import socket

_taken: set[int] = set()


def free_port(host: str = "127.0.0.1") -> int:
    for _ in range(500):
        port = random.randrange(20000, 32000)
        if port in _taken:
            continue
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
        _taken.add(port)
        return port
    raise RuntimeError("no free port found")
