"""Time to a certificate through each path (a benchmark, not a test):
``python -m bench.cert_paths [--names 10] [--paths tls-alpn-01,...]``.

Against Debian's pebble (PEBBLE_VA_NOSLEEP=1), edgeproxy in-process, curl as the client: from
connect to the first response byte of a new name's first request, ``--names`` names per path
after one warm-up name (which creates the ACME accounts):

* tls-alpn-01: pebble validates on edgeproxy's TLS port;
* http-01-after-tls-alpn-01: pebble's TLS-ALPN-01 port reaches nothing, its HTTP-01 port is
  edgeproxy's [http] listener (two orders per name);
* second-issuer: [[acme.issuers]] whose first CA drops every connection (a FaultInjector in
  front of pebble), so each name costs the failed attempt plus the second CA's issuance.
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

from bench.on_demand import curl_times
from bench.options import run_in_tmp, subset
from testkit.ondemand import NO_NONCE_CHAOS, acme_config
from testkit.pebble import FaultInjector, Pebble, Reply, pebbles
from testkit.ports import free_port
from testkit.proxy import running_proxy
from testkit.upstreams import http_handler, start_upstream

PATHS = ("tls-alpn-01", "http-01-after-tls-alpn-01", "second-issuer")


async def measure(
    port: int, roots: Path, cfg: dict[str, Any], tmp_path: Path, tag: str, names: int
) -> None:
    cfg["log"] = {"level": "warning"}
    async with running_proxy(tmp_path, cfg):
        await curl_times(port, f"warmup-{tag}.example.test", roots)
        times = []
        for i in range(names):
            connect, _, ttfb = await curl_times(port, f"{tag}{i}.example.test", roots)
            times.append(ttfb - connect)
    print(
        f"{tag}: new name, first request to first byte ({names} names): median "
        f"{statistics.median(times) * 1000:.0f} ms, worst {max(times) * 1000:.0f} ms"
    )


async def time_to_a_certificate(tmp_path: Path, path: str, names: int) -> None:
    """One path, with pebbles and a folder of its own."""
    with pebbles(tmp_path) as make_pebble:
        await _time_path(tmp_path, make_pebble, path, names)


async def _time_path(
    tmp_path: Path, make_pebble: Callable[..., Pebble], path: str, names: int
) -> None:
    port = free_port()
    async with trio.open_nursery() as nursery:
        up = await start_upstream(nursery, http_handler(b"ok\n"))
        roots = tmp_path / "roots.pem"
        if path == "tls-alpn-01":
            pebble = make_pebble(tls_port=port, env=NO_NONCE_CHAOS)
            roots.write_bytes(pebble.roots_pem())
            cfg = acme_config(tmp_path, port, pebble.directory_url, pebble.ca_bundle_path, up.addr)
        elif path == "http-01-after-tls-alpn-01":
            http_port = free_port()
            pebble = make_pebble(tls_port=free_port(), http_port=http_port, env=NO_NONCE_CHAOS)
            roots.write_bytes(pebble.roots_pem())
            cfg = acme_config(
                tmp_path,
                port,
                pebble.directory_url,
                pebble.ca_bundle_path,
                up.addr,
                acme={"challenges": ["tls-alpn-01", "http-01"]},
                http={"listen": [f"127.0.0.1:{http_port}"]},
            )
        else:
            first = make_pebble(tls_port=port, env=NO_NONCE_CHAOS)
            second = make_pebble(tls_port=port, env=NO_NONCE_CHAOS)
            roots.write_bytes(first.roots_pem() + second.roots_pem())
            inj = FaultInjector(first, rules=[lambda request: Reply.drop()])
            await nursery.start(inj.serve)
            cfg = acme_config(tmp_path, port, inj.directory_url, first.ca_bundle_path, up.addr)
            cfg["acme"] = {
                "issuers": [
                    {"name": "first", "directory": inj.directory_url,
                     "trust": str(first.ca_bundle_path)},
                    {"name": "second", "directory": second.directory_url,
                     "trust": str(second.ca_bundle_path)},
                ]
            }  # fmt: skip
        await measure(port, roots, cfg, tmp_path, path.replace("-", ""), names)
        nursery.cancel_scope.cancel()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.cert_paths", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--names", type=int, default=10, help="names per path (default 10)")
    parser.add_argument("--paths", type=subset(PATHS), default=list(PATHS),
                        help="comma-separated subset (default: all)")  # fmt: skip
    args = parser.parse_args(argv)
    for path in args.paths:
        run_in_tmp("bench-cert-paths-", time_to_a_certificate, path, args.names)


if __name__ == "__main__":
    main()
