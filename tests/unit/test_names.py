import pytest

from edgeproxy.names import (
    InvalidName,
    name_matches,
    normalize_name,
    normalize_pattern,
    validate_hostname,
)


@pytest.mark.parametrize(
    ("raw", "norm"),
    [
        ("Shop.Example.NET.", "shop.example.net"),
        ("bücher.example", "xn--bcher-kva.example"),
        ("a.b", "a.b"),
    ],
)
def test_normalize(raw: str, norm: str) -> None:
    assert normalize_name(raw) == norm


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "127.0.0.1",
        "[::1]",
        "::1",
        "localhost",
        "a..b",
        "-a.example",
        "a-.example",
        "a" * 64 + ".example",
        ("a" * 60 + ".") * 5 + "com",
        "a_b.example",
        "example.123",
        "sp ace.example",
    ],
)
def test_validate_refuses(bad: str) -> None:
    with pytest.raises(InvalidName):
        validate_hostname(bad)


def test_validate_accepts_and_normalises() -> None:
    assert validate_hostname("Shop.Customer.COM.") == "shop.customer.com"


@pytest.mark.parametrize(
    ("pattern", "name", "ok"),
    [
        ("*", "anything.example", True),
        ("*.example.net", "a.example.net", True),
        ("*.example.net", "example.net", False),
        ("*.example.net", "a.b.example.net", False),
        ("*.example.net", "aexample.net", False),
        ("shop.example.net", "shop.example.net", True),
        ("shop.example.net", "shop.example.net.evil", False),
    ],
)
def test_matching(pattern: str, name: str, ok: bool) -> None:
    assert name_matches(normalize_pattern(pattern), name) is ok
