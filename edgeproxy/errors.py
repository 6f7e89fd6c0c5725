"""The root of edgeproxy's error tree.

Every package raises subclasses of these so callers can tell whose fault a failure is
(the peer's, ours, or a dependency's) without matching on message text.
"""

from __future__ import annotations


class EdgeproxyError(Exception):
    """Base for every error edgeproxy raises on purpose."""


class ConfigError(EdgeproxyError):
    """The configuration is invalid; ``problems`` holds one ``key.path: what (fix)`` per line."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


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


class LockUnavailable(StorageError):
    """A storage lock is held by another owner and did not become free in time."""
