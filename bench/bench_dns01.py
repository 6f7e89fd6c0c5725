"""Time to a certificate through DNS-01 (a benchmark, not a test): run with
``pytest bench/bench_dns01.py -s -p no:cacheprovider``.

Debian's bind9 is the authoritative server of ``wild.test`` (TSIG key made now) and pebble
(PEBBLE_VA_NOSLEEP=1) resolves through it. After one warm-up entry (which creates the ACME
account), 10 managed certificates ``*.nI.wild.test`` + ``nI.wild.test`` are issued one after
the other, each timed from the order to the certificate stored: two authorizations sharing one
challenge name, two TSIG-signed updates, the propagation check on bind, validation, finalize,
and the two deletions.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from edgeproxy.app import build_managed, build_storage
from edgeproxy.certs.managed import ManagedCertificates
from edgeproxy.config import load_config_data
from testkit.bind import KEY_NAME, Named
from testkit.pebble import Pebble
from testkit.ports import free_port
from tests.integration.conftest import make_pebble  # noqa: F401
from tests.integration.test_dns01 import named  # noqa: F401
from tests.integration.test_on_demand_acme import NO_NONCE_CHAOS, acme_config

NAMES = 10


async def test_time_to_a_dns01_certificate(
    tmp_path: Path,
    make_pebble: Callable[..., Pebble],  # noqa: F811
    named: Named,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("EP_BENCH_TSIG", named.key_secret)
    pebble = make_pebble(tls_port=free_port(), dns_server=named.address, env=NO_NONCE_CHAOS)
    entries = [{"names": [f"*.n{i}.wild.test", f"n{i}.wild.test"]} for i in range(NAMES + 1)]
    cfg_data = acme_config(
        tmp_path, free_port(), pebble.directory_url, pebble.ca_bundle_path, "127.0.0.1:9",
        acme={
            "dns": [{"zone": "wild.test", "server": named.address, "tsig_key_name": KEY_NAME,
                     "tsig_secret_env": "EP_BENCH_TSIG"}],
            "managed": entries,
        },
    )  # fmt: skip
    cfg = load_config_data(cfg_data)
    managed = build_managed(cfg, build_storage(cfg))
    assert isinstance(managed, ManagedCertificates)
    times = []
    for i, names in enumerate(managed.entries):
        started = time.monotonic()
        await managed._ensure(names)
        if i:  # the first one also registers the account
            times.append(time.monotonic() - started)
        assert managed.match(f"a.n{i}.wild.test") is not None
    print(
        f"\ndns-01: managed certificate (*.nI.wild.test + nI.wild.test), order to stored "
        f"({NAMES} certificates): median {statistics.median(times) * 1000:.0f} ms, "
        f"worst {max(times) * 1000:.0f} ms"
    )
