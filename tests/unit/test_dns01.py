"""DNS-01 config and record placement: every bad input is refused with its key named, and the
TSIG secret never appears in an error."""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path
from typing import Any

import dns.name
import pytest
from click.testing import CliRunner

from edgeproxy.app import build_managed
from edgeproxy.certs.dns01 import Zone, challenge_name, txt_value, zone_for
from edgeproxy.cli import main
from edgeproxy.config import Config, DnsZoneConfig, load_config_data
from edgeproxy.errors import ConfigError
from testkit.proxy import base_config
from testkit.tomlw import toml_dumps

ZONE = {
    "zone": "example.net",
    "server": "127.0.0.1:5353",
    "tsig_key_name": "edge.",
    "tsig_secret_env": "EP_UNIT_TSIG",
}


def config(tmp_path: Path, **acme: Any) -> Config:
    return load_config_data(
        base_config(
            tmp_path,
            [{"sni": ["*"], "default": True, "upstreams": ["127.0.0.1:9"]}],
            tls={"issuer": "acme"},
            acme=acme,
        )
    )


def refused(tmp_path: Path, **acme: Any) -> str:
    with pytest.raises(ConfigError) as err:
        config(tmp_path, **acme)
    return str(err.value.problems)


def test_txt_value_and_challenge_name() -> None:
    ka = "token.thumbprint"
    digest = base64.urlsafe_b64encode(hashlib.sha256(ka.encode()).digest()).decode()
    assert txt_value(ka) == digest.rstrip("=") and "=" not in txt_value(ka)
    # A wildcard and its apex share one challenge name (RFC 8555 s8.4).
    assert challenge_name("*.example.net") == challenge_name("example.net")
    assert challenge_name("a.example.net").to_text() == "_acme-challenge.a.example.net."


def test_most_specific_zone_wins() -> None:
    secret = base64.b64encode(b"k" * 32).decode()
    outer = Zone.from_config(DnsZoneConfig(**ZONE), secret)
    inner = Zone.from_config(DnsZoneConfig(**{**ZONE, "zone": "acme.example.net."}), secret)
    name = dns.name.from_text("_acme-challenge.x.acme.example.net")
    assert zone_for([outer, inner], name) is inner
    assert zone_for([outer, inner], dns.name.from_text("example.org")) is None
    # "notexample.net" is not inside example.net, whatever the string suffix says.
    assert zone_for([outer], dns.name.from_text("notexample.net")) is None


def test_managed_needs_a_zone(tmp_path: Path) -> None:
    assert "[[acme.dns]]" in refused(tmp_path, managed=[{"names": ["*.example.net"]}])


@pytest.mark.parametrize(
    ("managed", "said"),
    [
        ({"names": []}, "names"),
        ({"names": ["*"]}, "no name"),
        ({"names": ["a.example.net", "A.example.net"]}, "once"),
        ({"names": ["bad name.example.net"]}, "names"),
        ({"names": ["a.*.example.net"]}, "names"),
    ],
)
def test_bad_managed_names(tmp_path: Path, managed: dict[str, Any], said: str) -> None:
    assert said in refused(tmp_path, dns=[ZONE], managed=[managed])


@pytest.mark.parametrize(
    ("change", "said"),
    [
        ({"server": "127.0.0.1"}, "server"),
        ({"server": "127.0.0.1:99999"}, "server"),
        ({"tsig_algorithm": "hmac-md5"}, "tsig_algorithm"),
        ({"zone": "bad zone"}, "zone"),
        ({"check_servers": ["nope"]}, "check_servers"),
        ({"propagation_timeout": 0}, "propagation_timeout"),
        ({"tsig_secret": "c2VjcmV0"}, "tsig_secret"),  # the secret itself: never in the file
    ],
)
def test_bad_zone(tmp_path: Path, change: dict[str, Any], said: str) -> None:
    assert said in refused(tmp_path, dns=[{**ZONE, **change}])


def test_bad_resolver(tmp_path: Path) -> None:
    assert "dns_resolver" in refused(tmp_path, dns=[ZONE], dns_resolver="resolver")


def test_secret_missing_or_unreadable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = config(tmp_path, dns=[ZONE], managed=[{"names": ["*.example.net"]}])
    monkeypatch.delenv("EP_UNIT_TSIG", raising=False)
    with pytest.raises(ConfigError, match="EP_UNIT_TSIG"):
        build_managed(cfg, storage=None)  # type: ignore[arg-type]
    monkeypatch.setenv("EP_UNIT_TSIG", "not-base64-%%%-s3cr3t")
    with pytest.raises(ConfigError) as err:
        build_managed(cfg, storage=None)  # type: ignore[arg-type]
    assert "EP_UNIT_TSIG" in str(err.value.problems)
    assert "s3cr3t" not in str(err.value.problems)


def test_check_names_a_missing_tsig_secret(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = base_config(
        tmp_path,
        [{"sni": ["*"], "default": True, "upstreams": ["127.0.0.1:9"]}],
        tls={"issuer": "acme"},
    )
    zone = "\n".join(f"{k} = {json.dumps(v)}" for k, v in ZONE.items())
    path = tmp_path / "edgeproxy.toml"
    path.write_text(
        f'{toml_dumps(data)}\n[[acme.dns]]\n{zone}\n[[acme.managed]]\nnames = ["*.example.net"]\n'
    )
    monkeypatch.delenv("EP_UNIT_TSIG", raising=False)
    res = CliRunner().invoke(main, ["check", "-c", str(path)])
    assert res.exit_code == 2 and "EP_UNIT_TSIG" in res.output, res.output
    monkeypatch.setenv("EP_UNIT_TSIG", base64.b64encode(b"k" * 32).decode())
    res = CliRunner().invoke(main, ["check", "-c", str(path)])
    assert res.exit_code == 0, res.output
