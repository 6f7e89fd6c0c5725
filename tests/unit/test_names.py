import pytest

from edgeproxy.names import (
    InvalidName,
    is_ip_literal,
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


@pytest.mark.parametrize(
    ("name", "literal"),
    [
        ("192.0.2.1", True),
        ("::1", True),
        ("[2001:db8::1]", True),
        ("fe80::1%eth0", True),
        ("shop.customer.com", False),
        ("host1", False),  # ends in a digit, yet no address: the parser decides
        ("1.2.3.4.example", False),
        ("999.1.1.1", False),
        ("", False),
    ],
)
def test_ip_literals_and_hostnames(name: str, literal: bool) -> None:
    # SNI goes through this on every connection; hostnames skip the address parser.
    assert is_ip_literal(name) is literal
