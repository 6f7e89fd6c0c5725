"""The assembler's secret reader: which value wins, and what it refuses (``secret_env``).

The admin tokens are covered where they are served (``tests/integration/test_admin_server.py``),
the TSIG secret in ``test_dns01.py``; here the rest, and that the parts take the value given.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from edgeproxy import secret_env
from edgeproxy.acme.jws import b64url
from edgeproxy.certs.challenges import HttpChallenges
from edgeproxy.config import AcmeIssuerConfig, EventsConfig, StorageConfig
from edgeproxy.errors import ConfigError
from edgeproxy.issuers.acme import AcmeIssuer
from edgeproxy.storage import FileStorage

HMAC = b"h" * 32


def test_eab_key_from_the_environment_wins_and_an_empty_one_falls_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cfg = AcmeIssuerConfig(eab_kid="kid", eab_hmac_key="from-file", eab_hmac_key_env="EP_T_EAB")
    monkeypatch.setenv("EP_T_EAB", "from-env")
    assert secret_env.eab_hmac_key(cfg) == "from-env"
    monkeypatch.setenv("EP_T_EAB", "")
    assert secret_env.eab_hmac_key(cfg) == "from-file"
    assert secret_env.eab_hmac_key(AcmeIssuerConfig()) is None


def test_the_issuer_binds_the_account_with_the_key_it_is_given(tmp_path: Path) -> None:
    cfg = AcmeIssuerConfig(eab_kid="kid", eab_hmac_key_env="EP_T_UNSET_EAB")
    storage = FileStorage(tmp_path)
    solvers = [HttpChallenges(storage)]
    issuer = AcmeIssuer.from_config(cfg, storage, solvers, hmac_key=b64url(HMAC))
    assert issuer._eab == ("kid", HMAC)
    assert AcmeIssuer.from_config(cfg, storage, solvers)._eab is None  # no key: no binding


def test_dsn_from_the_environment_else_the_file(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = StorageConfig(backend="postgres", dsn="host=file", dsn_env="EP_T_DSN")
    monkeypatch.setenv("EP_T_DSN", "host=env")
    assert secret_env.storage_dsn(cfg) == "host=env"
    monkeypatch.delenv("EP_T_DSN")
    assert secret_env.storage_dsn(cfg) == "host=file"
    with pytest.raises(ConfigError, match="EP_T_DSN"):
        secret_env.storage_dsn(StorageConfig(backend="postgres", dsn_env="EP_T_DSN"))


def test_an_empty_encryption_key_refuses_to_start(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = StorageConfig(encryption_key_env="EP_T_KEY")
    monkeypatch.setenv("EP_T_KEY", "")
    with pytest.raises(ConfigError, match="EP_T_KEY is empty"):
        secret_env.storage_encryption_key(cfg)
    monkeypatch.setenv("EP_T_KEY", "k")
    assert secret_env.storage_encryption_key(cfg) == "k"
    assert secret_env.storage_encryption_key(StorageConfig()) is None


def test_events_are_not_sent_unsigned(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = EventsConfig(url="https://hooks.example/ep", secret_env="EP_T_EVENTS")
    monkeypatch.delenv("EP_T_EVENTS", raising=False)
    with pytest.raises(ConfigError, match="EP_T_EVENTS"):
        secret_env.events_secret(cfg)
    monkeypatch.setenv("EP_T_EVENTS", "s3cret")
    assert secret_env.events_secret(cfg) == b"s3cret"
    assert secret_env.events_secret(EventsConfig()) is None  # no events, no secret needed
