"""Time to a certificate through DNS-01 (a benchmark, not a test):
``python -m bench.dns01 [--names 10]``.

Debian's bind9 is the authoritative server of ``wild.test`` (TSIG key made now) and pebble
(PEBBLE_VA_NOSLEEP=1) resolves through it. After one warm-up entry (which creates the ACME
account), ``--names`` managed certificates ``*.nI.wild.test`` + ``nI.wild.test`` are issued one
after the other, each timed from the order to the certificate stored: two authorizations
sharing one challenge name, two TSIG-signed updates, the propagation check on bind,
validation, finalize, and the two deletions.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

from bench.options import run_in_tmp
from edgeproxy.app import build_managed, build_storage
from edgeproxy.certs.managed import ManagedCertificates
from edgeproxy.config import load_config_data
from testkit.bind import KEY_NAME, start_named
from testkit.ondemand import NO_NONCE_CHAOS, acme_config
from testkit.pebble import pebbles
from testkit.ports import free_port


async def time_to_a_dns01_certificate(tmp_path: Path, names: int) -> None:
    named = start_named(tmp_path, {"wild.test": []})
    try:
        os.environ["EP_BENCH_TSIG"] = named.key_secret
        with pebbles(tmp_path) as make_pebble:
            pebble = make_pebble(tls_port=free_port(), dns_server=named.address,
                                 env=NO_NONCE_CHAOS)  # fmt: skip
            entries = [{"names": [f"*.n{i}.wild.test", f"n{i}.wild.test"]}
                       for i in range(names + 1)]  # fmt: skip
            cfg_data = acme_config(
                tmp_path, free_port(), pebble.directory_url, pebble.ca_bundle_path, "127.0.0.1:9",
                acme={
                    "dns": [{"zone": "wild.test", "server": named.address,
                             "tsig_key_name": KEY_NAME, "tsig_secret_env": "EP_BENCH_TSIG"}],
                    "managed": entries,
                },
            )  # fmt: skip
            cfg = load_config_data(cfg_data)
            managed = build_managed(cfg, build_storage(cfg))
            assert isinstance(managed, ManagedCertificates)
            times = []
            for i, entry in enumerate(managed.entries):
                started = time.monotonic()
                await managed._ensure(entry)
                if i:  # the first one also registers the account
                    times.append(time.monotonic() - started)
                assert managed.match(f"a.n{i}.wild.test") is not None
    finally:
        named.stop()
    print(
        f"dns-01: managed certificate (*.nI.wild.test + nI.wild.test), order to stored "
        f"({names} certificates): median {statistics.median(times) * 1000:.0f} ms, "
        f"worst {max(times) * 1000:.0f} ms"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.dns01", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--names", type=int, default=10, help="certificates to time (default 10)")
    args = parser.parse_args(argv)
    run_in_tmp("bench-dns01-", time_to_a_dns01_certificate, args.names)


if __name__ == "__main__":
    main()
