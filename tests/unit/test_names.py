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


CONTROL_CHARACTERS = [chr(c) for c in (*range(0x00, 0x20), 0x7F)]


@pytest.mark.parametrize("ch", CONTROL_CHARACTERS, ids=lambda c: f"0x{ord(c):02x}")
@pytest.mark.parametrize(
    "template",
    ["a{}.allowed.test", "{}a.allowed.test", "a.allowed.test{}", "a.allowed{}.test", "{}.allowed.test"],
)
def test_validate_refuses_every_control_character_anywhere(ch: str, template: str) -> None:
    # "a\n.allowed.test" once passed: ``$`` in an anchored ``re.match`` also matches before a
    # trailing newline, and an admin path carries a decoded %0a.
    with pytest.raises(InvalidName):
        validate_hostname(template.format(ch))


@pytest.mark.parametrize("ch", CONTROL_CHARACTERS, ids=lambda c: f"0x{ord(c):02x}")
def test_validate_refuses_control_characters_inside_u_labels(ch: str) -> None:
    # A U-label goes through the IDNA codec first, which keeps ASCII code points as they are.
    with pytest.raises(InvalidName):
        validate_hostname(f"bücher{ch}.allowed.test")
