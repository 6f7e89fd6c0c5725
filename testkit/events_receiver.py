"""A real HTTP receiver for edgeproxy's events: verifies every signature, records every event,
and can be taken down and brought back on the same port."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

import trio

from edgeproxy.events import verify
from testkit.ports import free_port


@dataclass
class Receiver:
    secret: bytes
    port: int = field(default_factory=free_port)
    events: list[dict[str, Any]] = field(default_factory=list)
    bad_signatures: int = 0
    _scope: trio.CancelScope | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks/edgeproxy"

    def ids(self) -> list[str]:
        return [e["id"] for e in self.events]

    def of_type(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["type"] == "net.edgeproxy." + kind]

    async def start(self, nursery: trio.Nursery) -> None:
        listeners = await trio.open_tcp_listeners(self.port, host="127.0.0.1")
        self._scope = scope = trio.CancelScope()

        async def serve() -> None:
            with scope:
                await trio.serve_listeners(self._handle, listeners)
            for lst in listeners:
                await lst.aclose()

        nursery.start_soon(serve)

    def stop(self) -> None:
        """Down: the port refuses connections (edgeproxy must retry later)."""
        assert self._scope is not None
        self._scope.cancel()

    async def _handle(self, stream: trio.SocketStream) -> None:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = await stream.receive_some(65536)
            if not chunk:
                return
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        headers = {}
        for line in head.split(b"\r\n")[1:]:
            k, _, v = line.partition(b":")
            headers[k.strip().lower().decode()] = v.strip().decode()
        length = int(headers.get("content-length", "0"))
        while len(body) < length:
            chunk = await stream.receive_some(65536)
            if not chunk:
                return
            body += chunk
        # The header as the README names it, as a receiver would spell it: not our constant,
        # so renaming the header breaks this test and not only receivers in the field.
        sig = headers.get("edgeproxy-signature", "")
        if verify(self.secret, sig, body, now=time.time()):
            self.events.append(json.loads(body))
            status = b"204 No Content"
        else:
            self.bad_signatures += 1
            status = b"401 Unauthorized"
        await stream.send_all(b"HTTP/1.1 " + status + b"\r\nContent-Length: 0\r\n"
                              b"Connection: close\r\n\r\n")  # fmt: skip
        await stream.aclose()
