"""Inputs the fuzzers found, kept forever, plus every seed replayed through every target.

Each finding is replayed through its fuzz target in-process (no atheris needed), so it fails
exactly as the fuzzer saw it if the bug comes back, and also checked against the public
function with the plain promise it broke.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from edgeproxy.acme.ari import parse_renewal_info
from edgeproxy.acme.errors import AcmeProblem, AcmeProtocolError
from edgeproxy.acme.messages import (
    parse_directory,
    parse_json,
    parse_links,
    parse_order,
    parse_retry_after,
    problem_from_response,
)
from fuzz.corpus import SEEDS, build_corpus
from fuzz.targets import TARGETS

NOW = datetime(2025, 6, 1, tzinfo=UTC)
DEEP_JSON = b"[" * 100_000  # deeper than the interpreter's recursion limit


@pytest.mark.parametrize("target", sorted(SEEDS))
def test_every_seed_passes_its_target(target: str, tmp_path: Path) -> None:
    counts = build_corpus(tmp_path)
    seeds = sorted((tmp_path / target).iterdir())
    assert len(seeds) == counts[target] > 5
    for path in seeds:
        TARGETS[target](path.read_bytes())


# --- acme_messages findings ---------------------------------------------------------------


def test_link_with_a_bracket_is_skipped_not_raised() -> None:
    # Found by acme_messages: urljoin raises ValueError("Invalid IPv6 URL") on "[" in a host.
    found = b'A<https://{"status": "invalid"}>;rel="alternate"'
    TARGETS["acme_messages"](found)
    links = parse_links(
        ['<https://[broken/cert/1>;rel="alternate", <https://ca.example.test/c/2>;rel="alternate"'],
        "https://ca.example.test/acme/",
    )
    assert links == [("https://ca.example.test/c/2", "alternate")]


@pytest.mark.parametrize("value", ["9" * 400, "9" * 5000])
def test_absurd_retry_after_is_garbage_not_an_exception(value: str) -> None:
    # Found by acme_messages: float(int("9" * 400)) overflows; int() refuses > 4300 digits.
    TARGETS["acme_messages"](value.encode())
    assert parse_retry_after(value, NOW) is None
    problem = problem_from_response(429, {"Retry-After": value}, b"")
    assert isinstance(problem, AcmeProblem) and problem.retry_after is None


def test_deeply_nested_json_is_a_protocol_error() -> None:
    # Found by acme_messages: json.loads raises RecursionError, not ValueError, past ~1000 deep.
    TARGETS["acme_messages"](DEEP_JSON)
    for parse in (
        lambda: parse_json(DEEP_JSON, "x"),
        lambda: parse_directory("u", DEEP_JSON),
        lambda: parse_order("u", DEEP_JSON),
        lambda: parse_renewal_info(DEEP_JSON, None, NOW),
    ):
        with pytest.raises(AcmeProtocolError):
            parse()
    problem = problem_from_response(500, {}, b'{"type": ' + DEEP_JSON)
    assert isinstance(problem, AcmeProblem) and problem.status == 500


def test_http_date_with_a_huge_day_is_garbage() -> None:
    # Found by acme_messages: email.utils.parsedate_to_datetime raises OverflowError when a
    # field does not fit a C long.
    found = b"%d,77777777777777777777777777771 Oct 6 0:2"
    TARGETS["acme_messages"](found)
    assert parse_retry_after(found.decode(), NOW) is None
