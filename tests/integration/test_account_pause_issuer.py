"""``AcmeIssuer`` against real pebble through the fault injector: which CA answers pause the
account, for how long, and that a paused account sends the CA nothing.

The injector answers newOrder with a 503 carrying Retry-After as an HTTP-date (RFC 9110
s10.2.3, the form the cluster test does not use), then with a 503 without Retry-After.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path

import pytest
import trio
from cryptography.hazmat.primitives.asymmetric import ec

from edgeproxy.issuers.account_pause import ACCOUNT_PAUSED, AccountPause, AccountPauses, pause_key
from edgeproxy.issuers.acme import AcmeIssuer
from edgeproxy.issuers.base import IssuanceError, IssueRequest
from edgeproxy.storage.file import FileStorage
from testkit.pebble import FaultInjector, InjectedRequest, Pebble, Reply, TlsAlpnResponder
from testkit.ports import free_port

NAME = "shop.example.test"


def unavailable(retry_after: str | None) -> Callable[[InjectedRequest], Reply | None]:
    """newOrder answered 503 (a CA shedding load), with Retry-After as given."""

    def rule(request: InjectedRequest) -> Reply | None:
        if request.endpoint != "newOrder":
            return None
        headers = (("Retry-After", retry_after),) if retry_after is not None else ()
        return Reply.problem(503, "about:blank", "service busy", *headers)

    return rule


async def test_503_with_an_http_date_pauses_the_account_and_without_one_does_not(
    tmp_path: Path, nursery: trio.Nursery, make_pebble: Callable[..., Pebble]
) -> None:
    port = free_port()
    pebble = make_pebble(tls_port=port, env={"PEBBLE_WFE_NONCEREJECT": "0"})
    inj = FaultInjector(pebble)
    await nursery.start(inj.serve)
    storage = FileStorage(tmp_path / "state")
    pauses = AccountPauses(storage)
    issuer = AcmeIssuer(
        directory=inj.directory_url,
        storage=storage,
        solvers=[TlsAlpnResponder(port, tmp_path / "alpn")],
        trust=str(pebble.ca_bundle_path),
        pauses=pauses,
        label="pebble",
    )
    key = ec.generate_private_key(ec.SECP256R1())
    try:
        # Without Retry-After a 503 is one failed order, not the account's pause.
        inj.rules[:] = [unavailable(None)]
        with pytest.raises(IssuanceError) as plain:
            await issuer.issue(IssueRequest((NAME,), key))
        assert plain.value.failure.type == "about:blank"
        assert await storage.get(pause_key(inj.directory_url)) is None

        # With Retry-After as an HTTP-date 40 s ahead: paused until then.
        then = datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=40)
        inj.rules[:] = [unavailable(format_datetime(then, usegmt=True))]
        with pytest.raises(IssuanceError) as paused:
            await issuer.issue(IssueRequest((NAME,), key))
        assert paused.value.failure.type == ACCOUNT_PAUSED
        assert paused.value.failure.retry_after is not None and 30 < paused.value.failure.retry_after <= 40
        assert "(it answered HTTP 503: service busy)" in paused.value.failure.detail
        raw = await storage.get(pause_key(inj.directory_url))
        assert raw is not None
        record = AccountPause.from_json(raw, pause_key(inj.directory_url))
        assert abs(record.until - then.timestamp()) < 1 and record.label == "pebble"

        # Paused: the next order is refused before a byte goes to the CA, and so is one from
        # another process on the same storage (a fresh AccountPauses: nothing cached).
        inj.rules.clear()
        before = inj.count("newOrder")
        other = AcmeIssuer(
            directory=inj.directory_url, storage=storage,
            solvers=[TlsAlpnResponder(port, tmp_path / "alpn2")],
            trust=str(pebble.ca_bundle_path), pauses=AccountPauses(storage),
        )  # fmt: skip
        for each in (issuer, other):
            with pytest.raises(IssuanceError) as again:
                await each.issue(IssueRequest((NAME,), key))
            assert again.value.failure.type == ACCOUNT_PAUSED
        assert inj.count("newOrder") == before
        await other.aclose()
    finally:
        await issuer.aclose()
