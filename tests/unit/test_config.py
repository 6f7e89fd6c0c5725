from pathlib import Path

import pytest

from edgeproxy.config import load_config, load_config_data
from edgeproxy.errors import ConfigError

# The example from DESIGN.md / README must keep working.
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
