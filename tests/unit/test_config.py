from pathlib import Path

import pytest

from edgeproxy.config import load_config, load_config_data
from edgeproxy.errors import ConfigError

# This early example config must keep working: keys may be added, old configs must still load.
DESIGN_EXAMPLE = """
[server]
listen = ["0.0.0.0:443"]
proxy_protocol = "off"
workers = 1

[admin]
listen = "127.0.0.1:9901"

[tls]
issuer = "acme"
default_sni = "edge.example.net"

[acme]
directory = "https://acme-v02.api.letsencrypt.org/directory"
email = "ops@example.com"
trust = ""

[on_demand]
ask = "http://127.0.0.1:8080/allowed"
allow = ["*.example.net"]

[storage]
backend = "file"
path = "/var/lib/edgeproxy"

[[routes]]
sni = ["*.example.net", "shop.customer.com"]
upstreams = ["10.0.1.10:8080", "10.0.1.11:8080"]

[[routes]]
sni = ["*"]
default = true
upstreams = ["10.0.1.20:8080"]
send_proxy = "v2"
"""


def test_design_example_loads(tmp_path: Path) -> None:
    p = tmp_path / "c.toml"
    p.write_text(DESIGN_EXAMPLE)
    cfg = load_config(p)
    assert cfg.routes[1].send_proxy == "v2"
    assert cfg.on_demand.allow == ["*.example.net"]


def test_readme_example_loads(tmp_path: Path) -> None:
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    block = readme.split("```toml", 1)[1].split("```", 1)[0]
    p = tmp_path / "c.toml"
    p.write_text(block)
    cfg = load_config(p)
    assert cfg.server.listen == ["0.0.0.0:443", "[::]:443"]


def test_every_problem_is_listed_with_path_and_fix() -> None:
    with pytest.raises(ConfigError) as ei:
        load_config_data(
            {
                "server": {"listen": ["nope"], "proxy_protocol": "v3", "typo": 1},
                "routes": [{"sni": ["a.example"], "upstreams": []}],
            }
        )
    problems = ei.value.problems
    assert any(p.startswith("server.listen:") and "host:port" in p for p in problems)
    assert any(p.startswith("server.proxy_protocol:") and "(use one of" in p for p in problems)
    assert any(p.startswith("server.typo:") and "remove it" in p for p in problems)
    assert any(p.startswith("routes[0].upstreams:") for p in problems)


def test_acme_needs_an_allow_check() -> None:
    with pytest.raises(ConfigError) as ei:
        load_config_data(
            {"tls": {"issuer": "acme"}, "routes": [{"sni": ["*"], "upstreams": ["h:1"]}]}
        )
    assert "allow-check" in str(ei.value)


def test_admin_off_loopback_needs_token() -> None:
    base = {"tls": {"issuer": "internal"}, "routes": [{"sni": ["*"], "upstreams": ["h:1"]}]}
    with pytest.raises(ConfigError) as ei:
        load_config_data({**base, "admin": {"listen": "0.0.0.0:9901"}})
    assert "admin.token" in str(ei.value)
    load_config_data({**base, "admin": {"listen": "0.0.0.0:9901", "token": "s3cret"}})


@pytest.mark.parametrize(
    ("admin", "problem"),
    [
        ({"metrics_token": "m"}, "without admin.token"),
        ({"metrics_token_env": "EDGEPROXY_METRICS_TOKEN"}, "without admin.token"),
        ({"token": "same", "metrics_token": "same"}, "equals admin.token"),
    ],
)
def test_metrics_token_that_would_guard_nothing_is_refused(
    admin: dict[str, str], problem: str
) -> None:
    base = {"tls": {"issuer": "internal"}, "routes": [{"sni": ["*"], "upstreams": ["h:1"]}]}
    with pytest.raises(ConfigError) as ei:
        load_config_data({**base, "admin": admin})
    assert problem in str(ei.value)
    cfg = load_config_data(
        {**base, "admin": {"token": "admin-secret", "metrics_token_env": "EDGEPROXY_M"}}
    )
    assert cfg.admin.metrics_token_env == "EDGEPROXY_M"


def test_bad_toml_names_the_file(tmp_path: Path) -> None:
    p = tmp_path / "c.toml"
    p.write_text("[server\n")
    with pytest.raises(ConfigError) as ei:
        load_config(p)
    assert str(p) in ei.value.problems[0] and "TOML" in ei.value.problems[0]


def test_two_default_routes_refused() -> None:
    with pytest.raises(ConfigError):
        load_config_data(
            {
                "tls": {"issuer": "internal"},
                "routes": [
                    {"sni": ["*"], "default": True, "upstreams": ["h:1"]},
                    {"default": True, "upstreams": ["h:2"]},
                ],
            }
        )


def test_ticket_key_rotation_defaults_to_12_hours_and_must_be_positive() -> None:
    base = {"tls": {"issuer": "internal"}, "routes": [{"sni": ["*"], "upstreams": ["h:1"]}]}
    assert load_config_data(base).tls.ticket_key_rotation == 12 * 3600
    for bad in (0, -1, 8 * 86400):
        with pytest.raises(ConfigError) as ei:
            load_config_data({**base, "tls": {"issuer": "internal", "ticket_key_rotation": bad}})
        assert "tls.ticket_key_rotation" in str(ei.value)


# --- server.proxy_protocol_from -----------------------------------------------------------

_ROUTES = {"tls": {"issuer": "internal"}, "routes": [{"sni": ["*"], "upstreams": ["h:1"]}]}


def _server_problems(**server: object) -> list[str]:
    with pytest.raises(ConfigError) as ei:
        load_config_data({**_ROUTES, "server": server})
    return ei.value.problems


@pytest.mark.parametrize("mode", ["v1", "v2", "any"])
def test_proxy_protocol_without_proxy_protocol_from_is_refused(mode: str) -> None:
    (problem,) = _server_problems(proxy_protocol=mode)
    assert problem.startswith("server:") and "server.proxy_protocol_from" in problem
    assert "0.0.0.0/0" in problem  # the explicit way to trust everyone is named


def test_proxy_protocol_from_without_proxy_protocol_is_refused() -> None:
    (problem,) = _server_problems(proxy_protocol_from=["10.0.0.0/16"])
    assert 'proxy_protocol is "off"' in problem


def test_proxy_protocol_from_is_normalised() -> None:
    cfg = load_config_data(
        {
            **_ROUTES,
            "server": {
                "proxy_protocol": "v2",
                "proxy_protocol_from": ["10.0.0.0/16", "192.0.2.7", "2001:DB8::/32"],
            },
        }
    )
    assert cfg.server.proxy_protocol_from == ["10.0.0.0/16", "192.0.2.7/32", "2001:db8::/32"]
    assert [str(n) for n in cfg.server.proxy_senders()] == cfg.server.proxy_protocol_from


@pytest.mark.parametrize(
    ("entry", "says"),
    [
        ("10.0.0.1/16", "'10.0.0.0/16'"),  # host bits: the fix names the network
        ("10.0.0.0/33", "not a network"),
        ("10.0.0", "not a network"),
        ("nlb.example.net", "not a network"),
        ("fe80::%eth0/64", "zone index"),
        ("", "not a network"),
    ],
)
def test_bad_proxy_protocol_from_entries_are_refused_with_a_fix(entry: str, says: str) -> None:
    problems = _server_problems(proxy_protocol="v2", proxy_protocol_from=["10.1.0.0/16", entry])
    assert len(problems) == 1 and problems[0].startswith("server.proxy_protocol_from:")
    assert says in problems[0] and repr(entry) in problems[0]


def test_empty_proxy_protocol_from_is_refused() -> None:
    (problem,) = _server_problems(proxy_protocol="v2", proxy_protocol_from=[])
    assert problem.startswith("server.proxy_protocol_from:") and "refuses every" in problem


_ISSUER_BASE: dict[str, object] = {
    "routes": [{"sni": ["*"], "default": True, "upstreams": ["127.0.0.1:1"]}],
    "on_demand": {"allow": ["*.example.test"]},
}


def test_acme_issuers_in_order_with_shared_email_and_labels() -> None:
    cfg = load_config_data(
        {
            **_ISSUER_BASE,
            "acme": {
                "email": "ops@example.test",
                "issuers": [
                    {"directory": "https://acme.one.test/dir"},
                    {"name": "backup", "directory": "https://two.test/d", "email": "b@x.test"},
                ],
            },
        }
    )
    got = [(i.label, i.directory, i.email) for i in cfg.acme.issuer_configs()]
    assert got == [
        ("acme.one.test", "https://acme.one.test/dir", "ops@example.test"),
        ("backup", "https://two.test/d", "b@x.test"),
    ]
    single = load_config_data({**_ISSUER_BASE, "acme": {"directory": "https://solo.test/d"}})
    assert [i.directory for i in single.acme.issuer_configs()] == ["https://solo.test/d"]


@pytest.mark.parametrize(
    ("acme", "words"),
    [
        (
            {"directory": "https://a.test/d", "issuers": [{"directory": "https://b.test/d"}]},
            "acme.directory set beside [[acme.issuers]]",
        ),
        (
            {"issuers": [{"directory": "https://b.test/d"}, {"directory": "https://b.test/d"}]},
            "lists a directory twice",
        ),
        (
            {"issuers": [{"directory": "https://b.test/1"}, {"directory": "https://b.test/2"}]},
            "give each a unique name",
        ),
        ({"issuers": [{"directory": "ftp://b.test/1"}]}, "is not an http(s) URL"),
        ({"issuers": [{"directory": "https://b.test/1", "eab_kid": "k"}]}, "set both"),
        ({"issuers": [{"name": "Bad Name", "directory": "https://b.test/1"}]}, "lower-case"),
    ],
)
def test_bad_acme_issuers_are_refused(acme: dict[str, object], words: str) -> None:
    with pytest.raises(ConfigError) as ei:
        load_config_data({**_ISSUER_BASE, "acme": acme})
    assert any(words in p for p in ei.value.problems), ei.value.problems
