"""How long one ACME issuance takes against pebble, and how many HTTP requests it costs.

Runs a real pebble (``PEBBLE_VA_NOSLEEP=1``, ``PEBBLE_AUTHZREUSE=0`` so every order really
validates) with our TLS-ALPN-01 responder, registers once, does one untimed warm-up issuance,
then times ``--runs`` issuances of fresh names, for each ``PEBBLE_WFE_NONCEREJECT`` level asked.
An issuance is ``AcmeClient.issue``: newOrder to downloaded chain (the certificate key is made
before the clock starts). Requests per issuance come from the client's own ``stats``.

    python -m bench.acme_issuance                # reject 0 and 50, 10 runs, 1 name
    python bench/acme_issuance.py --names 2 --reject 0 --runs 20

This is a measurement, not a test: nothing here asserts. Results print as a table and, with
``--json PATH``, as JSON (``bench/results/`` is git-ignored).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import trio
from cryptography.hazmat.primitives.asymmetric import ec

from edgeproxy.acme.client import AcmeClient
from testkit.pebble import TlsAlpnResponder, start_pebble
from testkit.ports import free_port


async def _measure(
    workdir: Path, reject: int, runs: int, names: int, bad_nonce_retries: int
) -> dict[str, Any]:
    port = free_port()
    responder = TlsAlpnResponder(port, workdir / f"alpn-{reject}")
    env = {"PEBBLE_WFE_NONCEREJECT": str(reject), "PEBBLE_AUTHZREUSE": "0"}
    timings: list[float] = []
    requests: list[int] = []
    bad_nonces: list[int] = []
    with start_pebble(workdir, tls_port=port, env=env) as pebble:
        async with trio.open_nursery() as nursery:
            await nursery.start(responder.serve)
            async with AcmeClient(
                pebble.directory_url,
                ec.generate_private_key(ec.SECP256R1()),
                verify=str(pebble.ca_bundle_path),
                bad_nonce_retries=bad_nonce_retries,
            ) as client:
                await client.register()
                for run in range(runs + 1):
                    identifiers = [f"n{i}-r{run}-x{reject}.bench.test" for i in range(names)]
                    key = ec.generate_private_key(ec.SECP256R1())
                    before = dict(client.stats)
                    start = time.perf_counter()
                    await client.issue(identifiers, key, responder)
                    elapsed = time.perf_counter() - start
                    if run == 0:
                        continue  # warm-up: TLS session to pebble, first nonce, imports
                    timings.append(elapsed)
                    requests.append(client.stats["http_requests"] - before.get("http_requests", 0))
                    bad_nonces.append(
                        client.stats.get("bad_nonce_retries", 0)
                        - before.get("bad_nonce_retries", 0)
                    )
            nursery.cancel_scope.cancel()
    return {
        "nonce_reject_percent": reject,
        "names": names,
        "runs": runs,
        "median_ms": round(statistics.median(timings) * 1000, 1),
        "min_ms": round(min(timings) * 1000, 1),
        "max_ms": round(max(timings) * 1000, 1),
        "median_requests": statistics.median(requests),
        "min_requests": min(requests),
        "max_requests": max(requests),
        "mean_bad_nonce_retries": round(statistics.fmean(bad_nonces), 1),
    }


async def _main(args: argparse.Namespace) -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory(prefix="acme-bench-") as tmp:
        return [
            await _measure(Path(tmp), reject, args.runs, args.names, args.bad_nonce_retries)
            for reject in args.reject
        ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--names", type=int, default=1, help="identifiers per order")
    parser.add_argument("--reject", type=int, nargs="+", default=[0, 50], help="nonce reject %%")
    parser.add_argument(
        "--bad-nonce-retries",
        type=int,
        default=20,
        help="per-request badNonce budget (the client's default is 5; at 50%% rejection that "
        "loses ~1 issuance in 6, which would measure luck, not speed)",
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    results = trio.run(_main, args)
    header = (
        f"{'reject%':>7} {'names':>5} {'runs':>4} {'median ms':>9} {'min':>7} {'max':>7} "
        f"{'requests':>8} {'badNonce':>8}"
    )
    print(header)
    for r in results:
        print(
            f"{r['nonce_reject_percent']:>7} {r['names']:>5} {r['runs']:>4} {r['median_ms']:>9} "
            f"{r['min_ms']:>7} {r['max_ms']:>7} {r['median_requests']:>8} "
            f"{r['mean_bad_nonce_retries']:>8}"
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
