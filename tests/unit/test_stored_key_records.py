"""A stored record holding a private key that does not parse is refused with what to do,
never replaced silently: a second internal CA would not be trusted by clients, a second ACME
account would lose the first one's orders and rate-limit history."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgeproxy.errors import CorruptRecord
from edgeproxy.issuers.acme import AcmeIssuer, account_key_name
from edgeproxy.issuers.internal import CA_KEY, InternalIssuer
from edgeproxy.storage.file import FileStorage

DIRECTORY = "https://acme.example.test/directory"
MALFORMED = [
    b"not json",
    json.dumps({"cert_pem": "x"}).encode(),  # no key_pem
    json.dumps({"cert_pem": "x", "key_pem": "not a PEM key"}).encode(),
    json.dumps(["a", "list"]).encode(),
]


@pytest.mark.parametrize("raw", MALFORMED)
async def test_an_unreadable_internal_ca_record_is_refused_not_replaced(
    tmp_path: Path, raw: bytes
) -> None:
    storage = FileStorage(tmp_path / "state")
    await storage.put(CA_KEY, raw, secret=True)
    with pytest.raises(CorruptRecord, match=rf"internal CA record {CA_KEY} is unreadable .*delete it to create a new CA"):
        await InternalIssuer(storage).ca_certificate_pem()
    assert await storage.get(CA_KEY) == raw


@pytest.mark.parametrize("raw", MALFORMED)
async def test_an_unreadable_acme_account_record_is_refused_not_replaced(
    tmp_path: Path, raw: bytes
) -> None:
    storage = FileStorage(tmp_path / "state")
    name = account_key_name(DIRECTORY)
    await storage.put(name, raw, secret=True)
    issuer = AcmeIssuer(directory=DIRECTORY, storage=storage, solvers=[object()])  # type: ignore[list-item]
    with pytest.raises(CorruptRecord, match=rf"ACME account record {name} is unreadable .*create a new account"):
        await issuer._load_or_create_account()
    assert await storage.get(name) == raw
