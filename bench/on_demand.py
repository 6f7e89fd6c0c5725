"""On-demand latency (a benchmark, not a test): ``python -m bench.on_demand [--names 20]``.

Against Debian's pebble (PEBBLE_VA_NOSLEEP=1) with edgeproxy answering TLS-ALPN-01 itself:
time from connect to the first response byte for ``--names`` new names (curl's
time_starttransfer), and the handshake time of an already cached name
(time_appconnect - time_connect).
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import trio

from bench.options import run_in_tmp
from testkit.ondemand import acme_config
from testkit.pebble import pebbles
from testkit.ports import free_port
from testkit.proxy import running_proxy
from testkit.upstreams import http_handler, start_upstream


async def curl_times(port: int, name: str, roots: Path) -> tuple[float, float, float]:
    res = await trio.run_process(
        [
            "curl",
            "-sS",
            "--fail",
            "-o",
            "/dev/null",
            "-w",
            "%{time_connect} %{time_appconnect} %{time_starttransfer}",
            "--cacert",
            str(roots),
            "--resolve",
            f"{name}:{port}:127.0.0.1",
            f"https://{name}:{port}/",
        ],
        capture_stdout=True,
        check=True,
    )
    connect, app, first = (float(x) for x in res.stdout.split())
    return connect, app, first


async def measure(tmp_path: Path, names: int) -> None:
    port = free_port()
    with pebbles(tmp_path) as make_pebble:
        pebble = make_pebble(tls_port=port)
        roots = tmp_path / "roots.pem"
        roots.write_bytes(pebble.roots_pem())
        async with trio.open_nursery() as nursery:
            up = await start_upstream(nursery, http_handler(b"ok\n"))
            cfg = acme_config(tmp_path, port, pebble.directory_url, pebble.ca_bundle_path, up.addr)
            cfg["log"] = {"level": "warning"}
            async with running_proxy(tmp_path, cfg):
                await curl_times(port, "warmup.example.test", roots)  # creates the ACME account
                first = []
                for i in range(names):
                    connect, _, ttfb = await curl_times(port, f"new{i}.example.test", roots)
                    first.append(ttfb - connect)
                cached = []
                for i in range(names):
                    connect, app, _ = await curl_times(port, f"new{i}.example.test", roots)
                    cached.append(app - connect)
            nursery.cancel_scope.cancel()
    print(
        f"new name, first request to first byte ({names} names): median "
        f"{statistics.median(first) * 1000:.0f} ms, worst {max(first) * 1000:.0f} ms"
        f"\ncached name, TLS handshake ({names}): median {statistics.median(cached) * 1000:.2f} ms, "
        f"worst {max(cached) * 1000:.2f} ms"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.on_demand", description=__doc__)
    parser.add_argument("--names", type=int, default=20, help="new names to time (default 20)")
    args = parser.parse_args(argv)
    run_in_tmp("bench-on-demand-", measure, args.names)


if __name__ == "__main__":
    main()
