"""Times as operators read them in statuses, hints and logs: ``2026-12-07T01:02:03Z`` (UTC)."""

from __future__ import annotations

import time


def iso_utc(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))
