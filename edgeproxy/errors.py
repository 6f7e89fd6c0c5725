"""The root of edgeproxy's error tree.

Every package raises subclasses of these so callers can tell whose fault a failure is
(the peer's, ours, or a dependency's) without matching on message text. ``config_errors``
finds the ConfigErrors inside an exception group (what the CLI and each worker exit 2 on).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


class EdgeproxyError(Exception):
    """Base for every error edgeproxy raises on purpose."""


class ConfigError(EdgeproxyError):
    """The configuration is invalid; ``problems`` holds one ``key.path: what (fix)`` per line."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


def config_errors(exc: BaseException) -> list[ConfigError] | None:
    """The ConfigErrors in ``exc`` if it is one or a (nested) group of nothing else, else None.

    A config problem found inside a nursery (the admin socket, say) arrives wrapped in an
    exception group; it must still end as exit code 2, so the supervisor stops instead of
    restarting a worker that will fail the same way.
    """
    if isinstance(exc, ConfigError):
        return [exc]
    if not isinstance(exc, BaseExceptionGroup):
        return None
    found = []
    for inner in exc.exceptions:
        errors = config_errors(inner)
        if errors is None:
            return None
        found.extend(errors)
    return found


class PeerError(EdgeproxyError):
    """The remote peer sent something we refuse (garbage, oversized, too slow)."""


class UpstreamError(EdgeproxyError):
    """An upstream could not be reached or failed mid-stream."""


class CertificateUnavailable(EdgeproxyError):
    """No certificate can be served for a name right now.

    ``reason`` is a short machine-friendly token (``denied``, ``invalid_name``, ``timeout``,
    ``issuer_error`` ...) used for metrics and TLS alert choice.
    """

    def __init__(self, name: str | None, reason: str, detail: str = "") -> None:
        suffix = f" ({detail})" if detail else ""
        super().__init__(f"no certificate for {name!r}: {reason}{suffix}")
        self.name = name
        self.reason = reason
        self.detail = detail


class OrderLimited(EdgeproxyError):
    """A new order for ``name`` is not allowed now: ``limit`` says which limit (the config key,
    or ``backoff`` for the name's retry schedule after failures), ``retry_after`` when to try
    again, in seconds."""

    def __init__(self, name: str, limit: str, retry_after: float, detail: str) -> None:
        super().__init__(f"no new order for {name!r} now: {limit}: {detail}")
        self.name = name
        self.limit = limit
        self.retry_after = retry_after
        self.detail = detail


class StorageError(EdgeproxyError):
    """Storage could not complete an operation (I/O, database down, corrupt record)."""


class CorruptRecord(StorageError):
    """A stored record failed to parse or decrypt (callers decide whether to quarantine it)."""


@contextlib.contextmanager
def reading_record(what: str, remedy: str) -> Iterator[None]:
    """Parse a stored record inside: a malformed one (``ValueError``, ``KeyError``,
    ``TypeError``) raises ``CorruptRecord("WHAT is unreadable (why); REMEDY")``."""
    try:
        yield
    except (ValueError, KeyError, TypeError) as exc:
        raise CorruptRecord(f"{what} is unreadable ({exc}); {remedy}") from None


class LockUnavailable(StorageError):
    """A storage lock is held by another owner and did not become free in time."""
