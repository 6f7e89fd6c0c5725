"""CloudEvents shape, signatures and retry schedule (sans-IO)."""

from __future__ import annotations

import json

import pytest

from edgeproxy.events import make_event, retry_delay, signature, verify

SECRET = b"whsec-test"


def test_event_is_a_cloudevent_with_a_sortable_id() -> None:
    event = make_event("hostname.created", "shop.customer.test", {"hostname": "shop.customer.test"},
                       source="edgeproxy/test", now=1_750_000_000.25)  # fmt: skip
    doc = json.loads(event.body)
    assert doc["specversion"] == "1.0" and doc["id"] == event.id
    assert doc["type"] == "net.edgeproxy.hostname.created" and doc["source"] == "edgeproxy/test"
    assert doc["subject"] == "shop.customer.test" and doc["time"] == "2025-06-15T15:06:40.250+00:00"
    assert doc["data"] == {"hostname": "shop.customer.test"}
    later = make_event("certificate.issued", "a.b.test", {}, source="s", now=1_750_000_001.0)
    assert later.id > event.id
    with pytest.raises(ValueError):
        make_event("certificate.stolen", "a.b.test", {}, source="s", now=1.0)


def test_signature_verifies_only_the_exact_body_and_a_recent_time() -> None:
    body = b'{"specversion":"1.0"}'
    header = signature(SECRET, 1000, body)
    assert header.startswith("t=1000,v1=") and len(header.split("v1=")[1]) == 64
    assert verify(SECRET, header, body, now=1000)
    assert not verify(SECRET, header, body + b" ", now=1000)
    assert not verify(b"other", header, body, now=1000)
    assert not verify(SECRET, header, body, now=1000 + 301)  # a replay, too old
    assert not verify(SECRET, header.replace("t=1000", "t=1001"), body, now=1000)
    assert not verify(SECRET, "v1=00", body, now=1000)


def test_retry_delay_doubles_to_the_cap_with_jitter() -> None:
    mid = [retry_delay(n, 3600, rand=lambda: 0.5) for n in (1, 2, 3, 20)]
    assert mid == [1.0, 2.0, 4.0, 3600.0]
    assert retry_delay(5, 3600, rand=lambda: 0.0) == 12.0
    assert retry_delay(5, 3600, rand=lambda: 1.0) == 20.0


def test_the_readme_receiver_snippet_verifies_our_signatures() -> None:
    # The README tells receivers how to check Edgeproxy-Signature without our package: the
    # snippet must accept what we send and refuse a changed body or an old time.
    import re
    import time
    from pathlib import Path

    readme = (Path(__file__).parents[2] / "README.md").read_text()
    snippets = [s for s in re.findall(r"```python\n(.*?)```", readme, re.S) if "def verify" in s]
    assert len(snippets) == 1
    space: dict[str, object] = {}
    exec(snippets[0], space)
    readme_verify = space["verify"]
    body = b'{"specversion":"1.0","id":"1"}'
    now = int(time.time())
    assert readme_verify(SECRET, signature(SECRET, now, body), body)  # type: ignore[operator]
    assert not readme_verify(SECRET, signature(SECRET, now, body), body + b"x")  # type: ignore[operator]
    assert not readme_verify(SECRET, signature(SECRET, now - 3600, body), body)  # type: ignore[operator]
    assert not readme_verify(b"other", signature(SECRET, now, body), body)  # type: ignore[operator]
