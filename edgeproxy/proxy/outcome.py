"""What one client connection was and how it ended, and the one place a closed one is counted.

Owns: ``ConnInfo`` (the connection's record, filled in along its story), ``Outcome`` (the
closed vocabulary of how a connection ends, safe as a metric label), ``Result`` (an outcome
and its detail, e.g. the ClientHello error's reason or the TLS alert's name) and
``count_closed`` (the closed-connection metrics and the access line). Must not know: sockets,
TLS, how a connection reached its end.

The access line and the JSON log's ``result`` field show ``outcome:detail`` (``bad_hello:
decode_error``, ``no_certificate:denied``, ``tls_error:unknown_ca``), or the outcome alone; the
``edgeproxy_connections_closed_total`` label is the outcome alone (bounded).
"""

from __future__ import annotations

import enum
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final

from .. import metrics

if TYPE_CHECKING:
    from .reactor import Driver

access_log = logging.getLogger("edgeproxy.access")


class Outcome(enum.StrEnum):
    """How a connection ended. The ones with a detail say which in ``Result.detail``."""

    OK = "ok"
    # before the ClientHello
    EOF_IN_PROXY_HEADER = "eof_in_proxy_header"
    BAD_PROXY_HEADER = "bad_proxy_header"  # the parser's reason is in the log's "detail"
    HEALTH_CHECK = "health_check"  # a PROXY LOCAL header (a balancer's check) and no hello
    LIMIT_PER_IP = "limit_per_ip"
    EOF_BEFORE_HELLO = "eof_before_hello"
    EOF_SILENT = "eof_silent"
    PLAIN_HTTP = "plain_http"
    NOT_TLS = "not_tls"
    BAD_HELLO = "bad_hello"  # detail: the ClientHello error's reason
    # the decision and the handshake
    NO_ROUTE = "no_route"
    NO_CERTIFICATE = "no_certificate"  # detail: CertificateUnavailable's reason
    TLS_ERROR = "tls_error"  # detail: the handshake's reason token
    HANDSHAKE_TIMEOUT = "handshake_timeout"
    SHED = "shed"  # detail: why the overload shedding chose it
    ACME_NO_PENDING_CHALLENGE = "acme_no_pending_challenge"
    ACME_TLS_ERROR = "acme_tls_error"  # detail: the handshake's reason token
    ACME_CHALLENGE_ANSWERED = "acme_challenge_answered"
    # the pipe
    UPSTREAM_UNREACHABLE = "upstream_unreachable"
    UPSTREAM_RESET = "upstream_reset"
    IDLE_TIMEOUT = "idle_timeout"
    CLIENT_RESET = "client_reset"
    CLIENT_TLS_ERROR = "client_tls_error"
    INTERNAL_ERROR = "internal_error"


@dataclass(frozen=True, slots=True)
class Result:
    outcome: Outcome
    detail: str = ""

    def __str__(self) -> str:
        return f"{self.outcome}:{self.detail}" if self.detail else str(self.outcome)


# One shared value per outcome without a detail: the common ends cost no allocation.
PLAIN: Final = {outcome: Result(outcome) for outcome in Outcome}
OK: Final = PLAIN[Outcome.OK]


@dataclass(slots=True)
class ConnInfo:
    started: float
    peer: tuple[str, int]
    client: tuple[str, int]
    # The address the client connected to (the PROXY header's destination, else ours);
    # None until needed: a getsockname per connection is wasted when nothing uses it.
    local: tuple[str, int] | None = None
    sni: str | None = None
    alpn: str | None = None
    route: str | None = None
    upstream: str | None = None
    to_upstream: int = 0
    to_client: int = 0
    result: Result = OK
    counted_ip: str | None = None  # the address charged against max_connections_per_ip
    in_handshake: bool = True  # counted in Proxy.handshaking until the handshake phase ends
    extra: dict[str, str] = field(default_factory=dict)
    conn_id: int = 0  # key in Proxy.pre_hello
    # The connection's driver (``proxy/reactor.py``) and its one deadline: the handshake's
    # first (PROXY header, ClientHello and TLS handshake together), then the idle timeout,
    # which the pipe moves along on activity. Set at accept.
    timer: Driver = None  # type: ignore[assignment]
    shed: str | None = None  # why the overload shedding closed it, if it did


def count_closed(info: ConnInfo) -> None:
    """The metrics and the access line of a closed connection (a shed one gets no line: under
    attack that would be thousands a second; the overload summary line counts them)."""
    result = info.result
    if result is OK:
        metrics.CLOSED_OK_ADD()
    else:
        metrics.CONNECTIONS_CLOSED.labels(result.outcome.value).inc()
    if info.to_upstream:
        metrics.BYTES_TO_UPSTREAM_ADD(info.to_upstream)
    if info.to_client:
        metrics.BYTES_TO_CLIENT_ADD(info.to_client)
    if info.shed is None and access_log.isEnabledFor(logging.INFO):
        text = str(result)
        access_log.info(
            "%s sni=%s alpn=%s route=%s upstream=%s up=%d down=%d dur=%.3f result=%s",
            info.client[0],
            info.sni or "-",
            info.alpn or "-",
            info.route or "-",
            info.upstream or "-",
            info.to_upstream,
            info.to_client,
            time.monotonic() - info.started,
            text,
            extra={
                "client": f"{info.client[0]}:{info.client[1]}",
                "sni": info.sni,
                "alpn": info.alpn,
                "route": info.route,
                "upstream": info.upstream,
                "bytes_up": info.to_upstream,
                "bytes_down": info.to_client,
                "duration": round(time.monotonic() - info.started, 6),
                "result": text,
                **info.extra,
            },
        )
