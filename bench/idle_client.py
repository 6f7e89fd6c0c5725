"""Opens N TLS connections through a terminator, makes one request on each, then holds them idle.

Run as its own process (pinned next to wrk) so its memory and CPU never mix with the
harness's:

    python -m bench.idle_client --port 8443 --name localhost --cafile ca.pem --count 10000

Each connection: TCP connect, full TLS handshake (verified against ``--cafile``), one
``GET`` with keep-alive, response headers read. That last step proves the path to the origin
exists for every connection (a terminator may connect upstream lazily) and leaves each one as
a real idle keep-alive client would: handshake done, TLS 1.3 tickets delivered, nothing in
flight. Then it prints ``READY <open> <failed>`` and waits; when its stdin closes it closes
every connection and exits. Handshakes are limited to ``--concurrency`` at a time so no
terminator's accept backlog or handshake limit is what is being measured.
"""

from __future__ import annotations

import argparse
import ssl
import sys

import trio

__all__ = ["hold_idle", "main"]


async def _open_one(
    port: int, name: str, ctx: ssl.SSLContext, request: bytes
) -> trio.SSLStream[trio.SocketStream]:
    tcp = await trio.open_tcp_stream("127.0.0.1", port)
    tls = trio.SSLStream(tcp, ctx, server_hostname=name)
    try:
        await tls.do_handshake()
        await tls.send_all(request)
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = await tls.receive_some(16384)
            if not chunk:
                raise trio.BrokenResourceError("closed before the response headers")
            head += chunk
        if not head.startswith(b"HTTP/1.1 200"):
            raise trio.BrokenResourceError(head.split(b"\r\n", 1)[0].decode(errors="replace"))
    except BaseException:
        await trio.aclose_forcefully(tls)
        raise
    return tls


async def hold_idle(
    port: int, name: str, cafile: str, count: int, concurrency: int, path: str
) -> None:
    ctx = ssl.create_default_context(cafile=cafile)
    request = f"GET {path} HTTP/1.1\r\nHost: {name}\r\n\r\n".encode()
    streams: list[trio.SSLStream[trio.SocketStream]] = []
    failures: dict[str, int] = {}
    limit = trio.Semaphore(concurrency)

    async def one() -> None:
        async with limit:
            try:
                with trio.fail_after(30):
                    streams.append(await _open_one(port, name, ctx, request))
            except (OSError, ssl.SSLError, trio.BrokenResourceError, trio.TooSlowError) as exc:
                key = type(exc).__name__
                failures[key] = failures.get(key, 0) + 1

    async with trio.open_nursery() as nursery:
        for _ in range(count):
            nursery.start_soon(one)
    failed = sum(failures.values())
    print(f"READY {len(streams)} {failed} {failures or ''}", flush=True)
    await trio.to_thread.run_sync(sys.stdin.read)  # until the harness closes our stdin
    for stream in streams:
        await trio.aclose_forcefully(stream)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--name", required=True, help="SNI and Host header")
    parser.add_argument("--cafile", required=True)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--concurrency", type=int, default=100)
    parser.add_argument("--path", default="/empty.bin")
    args = parser.parse_args()
    trio.run(hold_idle, args.port, args.name, args.cafile, args.count, args.concurrency, args.path)


if __name__ == "__main__":
    main()
