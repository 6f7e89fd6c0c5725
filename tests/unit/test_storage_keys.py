"""``check_key``, the one gate between names and storage paths/rows, against control characters."""

from __future__ import annotations

import pytest

from edgeproxy.storage.base import check_key

CONTROL_CHARACTERS = [chr(c) for c in (*range(0x00, 0x20), 0x7F)]


@pytest.mark.parametrize("ch", CONTROL_CHARACTERS, ids=lambda c: f"0x{ord(c):02x}")
@pytest.mark.parametrize(
    "template", ["status/a{}.allowed.test.json", "certs/x.json{}", "{}certs/x.json", "a/{}/b"]
)
def test_check_key_refuses_every_control_character(ch: str, template: str) -> None:
    # A trailing "\\n" once passed (``$`` matches before it) and then failed deep inside a
    # background task, where a ValueError ended the process.
    with pytest.raises(ValueError):
        check_key(template.format(ch))


def test_check_key_accepts_what_the_manager_writes() -> None:
    for key in ("status/a.allowed.test.json", "certs/xn--bcher-kva.example.json", "locks/*.x"):
        assert check_key(key) == key
