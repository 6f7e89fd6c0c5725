from edgeproxy.app import route_table
from edgeproxy.config import load_config_data
from edgeproxy.proxy.routes import RouteTable


def table() -> RouteTable:
    cfg = load_config_data(
        {
            "tls": {"issuer": "internal"},
            "routes": [
                {"sni": ["*.example.net"], "upstreams": ["10.0.0.1:1", "10.0.0.2:1"]},
                {"sni": ["shop.example.net", "Shop.Customer.COM."], "upstreams": ["10.0.0.3:1"]},
                {"sni": ["*"], "default": True, "upstreams": ["10.0.0.4:1"]},
            ],
        }
    )
    return route_table(cfg.routes)


def test_exact_beats_wildcard_beats_catch_all() -> None:
    t = table()
    assert t.match("shop.example.net").index == 1  # type: ignore[union-attr]
    assert t.match("other.example.net").index == 0  # type: ignore[union-attr]
    assert t.match("a.b.example.net").index == 2  # type: ignore[union-attr]
    assert t.match("shop.customer.com").index == 1  # type: ignore[union-attr]


def test_no_sni_goes_to_default_route() -> None:
    assert table().match(None).index == 2  # type: ignore[union-attr]


def test_no_match_without_catch_all() -> None:
    cfg = load_config_data(
        {"tls": {"issuer": "internal"}, "routes": [{"sni": ["a.example"], "upstreams": ["h:1"]}]}
    )
    t = route_table(cfg.routes)
    assert t.match("b.example") is None
    assert t.match(None) is None


def test_round_robin_order() -> None:
    r = table().routes[0]
    first = [str(hp) for hp in r.upstream_order()]
    second = [str(hp) for hp in r.upstream_order()]
    assert first == ["10.0.0.1:1", "10.0.0.2:1"]
    assert second == ["10.0.0.2:1", "10.0.0.1:1"]
