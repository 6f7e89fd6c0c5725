"""The process log, set up from a config exactly as ``edgeproxy run`` does it, into a buffer."""

from __future__ import annotations

import io
import json
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from edgeproxy.config import load_config_data
from edgeproxy.logs import setup_logging


class ProcessLog:
    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self._monkeypatch = monkeypatch
        self._buf = io.StringIO()

    def setup(self, cfg_data: dict[str, Any]) -> None:
        cfg = load_config_data(cfg_data)
        with self._monkeypatch.context() as m:
            m.setattr(sys, "stderr", self._buf)  # setup_logging logs to the stderr of its time
            setup_logging(cfg.log.format, cfg.log.level)

    def text(self) -> str:
        return self._buf.getvalue()

    def lines(self) -> list[dict[str, Any]]:
        """JSON logs: every line must parse on its own, as one object (the whole contract)."""
        out = [json.loads(line) for line in self.text().splitlines()]
        assert all(isinstance(o, dict) for o in out)
        return out


@contextmanager
def process_log(monkeypatch: pytest.MonkeyPatch) -> Iterator[ProcessLog]:
    """Restores the logging setup ``ProcessLog.setup`` replaced, on exit."""
    root = logging.getLogger()
    saved_handlers, saved_level = list(root.handlers), root.level
    quiet = {n: logging.getLogger(n).level for n in ("httpx", "hypercorn.access", "psycopg.pool")}
    try:
        yield ProcessLog(monkeypatch)
    finally:
        for h in list(root.handlers):
            root.removeHandler(h)
        for h in saved_handlers:
            root.addHandler(h)
        root.setLevel(saved_level)
        for name, level in quiet.items():
            logging.getLogger(name).setLevel(level)
