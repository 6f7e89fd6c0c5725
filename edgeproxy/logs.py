"""Logging setup: human text or one JSON object per line.

Structured fields travel as ``extra=`` on the record; the JSON formatter emits them, the text
formatter keeps the message short. Nothing here ever formats key material: callers pass names,
addresses and reason tokens only.

Log lines carry what peers sent (names, paths, addresses, error texts), so neither format may
let a peer start a line of its own. JSON escapes every control character by itself. The text
formatter writes each non-printable character of every field as a Python escape (``\\n``,
``\\x1b``, ``\\u2028``): one record is one line. A traceback is the one multi-line part; its
lines are escaped the same way except for their newlines, and every line after the first is
indented, so no line of it can pass for the start of a record (records start with the time).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable
from typing import Any

_STD_ATTRS = frozenset(
    logging.LogRecord("x", 0, "x", 0, "x", None, None).__dict__.keys()
    | {"message", "asctime", "taskName"}
)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for k, v in record.__dict__.items():
            if k not in _STD_ATTRS and not k.startswith("_"):
                out[k] = v
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def escape_text(text: str) -> str:
    """``text`` with every non-printable character (controls, line and paragraph separators,
    lone surrogates...) written as its escape; printable text, any script, is unchanged."""
    if text.isprintable():  # the usual case, checked in C
        return text
    # repr() of a non-printable character is its shortest escape: \n, \x1b, \u2028.
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


_TRACE_INDENT = "\n    "


def _escape_block(text: str) -> str:
    """A multi-line block (a traceback): lines escaped, the ones after the first indented."""
    return _TRACE_INDENT.join(escape_text(line) for line in text.split("\n"))


class TextFormatter(logging.Formatter):
    """``time LEVEL [pid] logger: message``, every field escaped (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s [%(process)d] %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        record.message = record.getMessage()
        line = (
            f"{self.formatTime(record)} {escape_text(record.levelname)} [{record.process}] "
            f"{escape_text(record.name)}: {escape_text(record.message)}"
        )
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            line += _TRACE_INDENT + _escape_block(record.exc_text)
        if record.stack_info:
            line += _TRACE_INDENT + _escape_block(self.formatStack(record.stack_info))
        return line


def setup_logging(fmt: str = "text", level: str = "info") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter())
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # httpx logs every request at INFO including URLs; ours are enough.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("hypercorn.access").setLevel(logging.WARNING)
    # psycopg's pool warns on every reconnect attempt during a database outage; our storage
    # layer already reports the outage once per failed operation.
    logging.getLogger("psycopg.pool").setLevel(logging.ERROR)


class LogThrottle:
    """At most one line per ``interval`` seconds for one kind of event a peer can repeat at
    will: the first is logged at once; the ones after it within the interval are only
    counted, and that count goes into the next line logged (the metric beside it stays exact).
    """

    __slots__ = ("_clock", "_next", "_suppressed", "interval")

    def __init__(self, interval: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = interval
        self._clock = clock
        self._next = float("-inf")
        self._suppressed = 0

    def admit(self) -> int | None:
        """None: don't log this one. Else log it, with this many suppressed since the last."""
        now = self._clock()
        if now < self._next:
            self._suppressed += 1
            return None
        self._next = now + self.interval
        suppressed, self._suppressed = self._suppressed, 0
        return suppressed
