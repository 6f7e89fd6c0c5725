"""Every Prometheus metric edgeproxy exports, defined in one place.

The only module allowed global mutable state: prometheus-client's registry is process-wide by
design. Labels are bounded sets (reasons, results, route labels from the config, ACME endpoint
names): never a client address or a server name, so cardinality cannot grow with traffic.
"""

from __future__ import annotations

import bisect
import functools
import os
from collections.abc import Callable

from prometheus_client import Counter, Gauge, Histogram


def multiprocess_mode() -> bool:
    """Values live in per-process files ([server] workers > 1), where no series can be removed."""
    return "PROMETHEUS_MULTIPROC_DIR" in os.environ or "prometheus_multiproc_dir" in os.environ


CONNECTIONS_ACCEPTED = Counter(
    "edgeproxy_connections_accepted_total", "TCP connections accepted by the listeners."
)
CONNECTIONS_ACTIVE = Gauge(
    "edgeproxy_connections_active", "Connections currently open.", multiprocess_mode="livesum"
)
CONNECTIONS_CLOSED = Counter(
    "edgeproxy_connections_closed_total", "Connections closed, by reason.", ["reason"]
)
CONNECTIONS_REFUSED = Counter(
    "edgeproxy_connections_refused_total",
    "Connections refused at accept because a limit was reached.",
    ["limit"],
)
CONNECTIONS_SHED = Counter(
    "edgeproxy_connections_shed_total",
    "Connections closed before their ClientHello to make room under overload, by reason.",
    ["reason"],
)
PROXY_PROTOCOL_REFUSED = Counter(
    "edgeproxy_proxy_protocol_refused_total",
    "Connections refused before their PROXY header, by reason (untrusted_peer: the peer is "
    "not in server.proxy_protocol_from).",
    ["reason"],
)
PROXY_HEADERS = Counter(
    "edgeproxy_proxy_protocol_headers_total", "PROXY protocol headers read, by result.", ["result"]
)
CLIENT_HELLOS = Counter(
    "edgeproxy_client_hellos_total", "ClientHello peeks, by result.", ["result"]
)
HANDSHAKES = Counter(
    "edgeproxy_tls_handshakes_total", "TLS handshakes, by result and reason.", ["result", "reason"]
)
HANDSHAKE_SECONDS = Histogram(
    "edgeproxy_tls_handshake_duration_seconds",
    "From accept to completed TLS handshake (includes PROXY header, peek, certificate lookup).",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20),
)
BYTES = Counter("edgeproxy_bytes_total", "Plaintext bytes proxied, by direction.", ["direction"])
UPSTREAM_CONNECT_FAILURES = Counter(
    "edgeproxy_upstream_connect_failures_total",
    "Failed upstream connection attempts, by route and upstream.",
    ["route", "upstream"],
)
UPSTREAM_CONNECT_SECONDS = Histogram(
    "edgeproxy_upstream_connect_duration_seconds",
    "Time to establish an upstream connection, by route.",
    ["route"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5),
)
ACME_REQUESTS = Counter(
    "edgeproxy_acme_requests_total",
    "HTTP requests to the ACME server, by endpoint and status.",
    ["endpoint", "status"],
)
ACME_ORDERS = Counter(
    "edgeproxy_acme_orders_total", "Certificate issuance attempts, by outcome.", ["outcome"]
)
ACME_REPLACES_DROPPED = Counter(
    "edgeproxy_acme_replaces_dropped_total",
    "newOrder retried without 'replaces' after the CA refused an order carrying it.",
)
CHALLENGES_ANSWERED = Counter(
    "edgeproxy_acme_challenges_answered_total",
    "Validation requests answered (TLS-ALPN-01 handshakes, HTTP-01 requests).",
)
HTTP_REQUESTS = Counter(
    "edgeproxy_http_requests_total",
    "Requests on the plain-HTTP listener ([http] listen), by result (challenge, redirect, "
    "not_served, challenge_not_pending, bad_request, timeout, ...).",
    ["result"],
)
ISSUER_ORDERS = Counter(
    "edgeproxy_acme_issuer_orders_total",
    "Issuance attempts per configured ACME CA (acme.issuers name), by outcome.",
    ["issuer", "outcome"],
)
# One series per configured CA (acme.issuers name): the account-wide pause after the CA said
# rateLimited (or 503 with Retry-After), shared by every replica through storage.
ACME_ACCOUNT_PAUSED = Gauge(
    "edgeproxy_acme_account_paused",
    "1 while new orders to this CA account are paused by its rateLimited/503 Retry-After.",
    ["issuer"],
    multiprocess_mode="livemax",
)
ACME_ACCOUNT_PAUSED_UNTIL = Gauge(
    "edgeproxy_acme_account_paused_until_timestamp_seconds",
    "Unix time the account's pause ends (0 when not paused).",
    ["issuer"],
    multiprocess_mode="livemax",
)
ISSUER_FALLBACKS = Counter(
    "edgeproxy_acme_issuer_fallbacks_total",
    "Names handed to the next ACME CA after one could not issue.",
    ["failed", "next"],
)
CHALLENGE_FALLBACKS = Counter(
    "edgeproxy_acme_challenge_fallbacks_total",
    "New orders with the next challenge type after the preferred one failed validation.",
    ["failed", "next"],
)
CHALLENGES_WITHOUT_PENDING = Counter(
    "edgeproxy_acme_validation_without_pending_challenge_total",
    "acme-tls/1 handshakes for a name with no pending challenge on this node (check the load "
    "balancer forwards TCP untouched and that replicas share storage).",
)
ON_DEMAND_DECISIONS = Counter(
    "edgeproxy_on_demand_decisions_total",
    "Allow-check decisions for unknown names, by result and source.",
    ["result", "source"],
)
CERTIFICATES = Gauge(
    "edgeproxy_certificates",
    "Managed certificates, by state.",
    ["state"],
    multiprocess_mode="livemax",
)
CERTIFICATE_EARLIEST_EXPIRY = Gauge(
    "edgeproxy_certificate_earliest_expiry_timestamp_seconds",
    "Unix time of the earliest not_after among managed certificates.",
    multiprocess_mode="livemin",
)
# Opt-in ([admin] per_domain_metrics): one series per managed name, for small fleets only.
CERTIFICATE_EXPIRY = Gauge(
    "edgeproxy_certificate_expiry_timestamp_seconds",
    "Unix time of not_after per managed name (only with admin.per_domain_metrics = true).",
    ["name"],
    multiprocess_mode="livemax",
)
RENEWALS_DUE = Gauge(
    "edgeproxy_certificate_renewals_due",
    "Certificates whose renewal time has passed.",
    multiprocess_mode="livemax",
)
CERTIFICATES_CACHED = Gauge(
    "edgeproxy_certificates_cached",
    "Certificates ready in this process's memory (at most tls.cache_size; ~4 KiB each).",
    multiprocess_mode="livesum",
)
MAINTENANCE_PASS_SECONDS = Histogram(
    "edgeproxy_maintenance_pass_duration_seconds",
    "Wall time of one certificate maintenance pass (renewals and ARI checks included).",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
MAINTENANCE_NAMES_EXAMINED = Counter(
    "edgeproxy_maintenance_names_examined_total",
    "Stored certificates a maintenance pass looked at (planned, maybe renewed).",
)
RENEWALS = Counter(
    "edgeproxy_certificate_renewals_total", "Renewal attempts, by outcome.", ["outcome"]
)
# [acme.limits] (certs/budgets.py): what the shared budgets leave, as this process last read
# them from storage. Per-domain and per-name limits have one series, not one per key: the
# budget left to the most used key this process looked at (at most 4096 keys remembered).
ACME_BUDGET_REMAINING = Gauge(
    "edgeproxy_acme_budget_remaining",
    "Orders left in an [acme.limits] budget window (+Inf: limit off). Per registered domain, "
    "hostname and name set: what the most used one seen by this process has left.",
    ["limit"],
    multiprocess_mode="livemin",
)
ACME_BUDGET_EXEMPT_ORDERS = Gauge(
    "edgeproxy_acme_budget_exempt_orders",
    "ARI-timed renewal orders of the account in the last 3 hours (exempt from [acme.limits]).",
    multiprocess_mode="livemax",
)
STORAGE_ERRORS = Counter(
    "edgeproxy_storage_errors_total", "Storage operation errors, by operation.", ["operation"]
)
LOCK_WAIT_SECONDS = Histogram(
    "edgeproxy_storage_lock_wait_seconds",
    "Time spent waiting for a storage lock.",
    buckets=(0.001, 0.01, 0.1, 0.5, 1, 5, 10, 30, 60),
)
EVENTS_DELIVERED = Counter(
    "edgeproxy_events_delivered_total", "Lifecycle events the receiver accepted (2xx)."
)
EVENTS_FAILED = Counter(
    "edgeproxy_events_failed_total", "Event delivery attempts that failed (retried later)."
)
EVENTS_DROPPED = Counter(
    "edgeproxy_events_dropped_total", "Events given up after [events] max_age undelivered."
)
EVENTS_LOST = Counter(
    "edgeproxy_events_lost_total",
    "Events never stored: made while storage failed, with the in-memory queue (10,000) full.",
)
EVENTS_QUEUED = Gauge(
    "edgeproxy_events_queued",
    "Events waiting in the storage outbox.",
    multiprocess_mode="livemax",
)
CONFIG_RELOADS = Counter("edgeproxy_config_reloads_total", "SIGHUP reloads, by result.", ["result"])
BACKGROUND_TASK_ERRORS = Counter(
    "edgeproxy_background_task_errors_total",
    "Unexpected exceptions in background work (certificate manager, events, hostname registry, "
    "port-80 connections), by task: logged with a traceback and dropped (a bug or an input "
    "nobody foresaw); the process keeps serving.",
    ["task"],
)
#: The ``task`` label values of BACKGROUND_TASK_ERRORS.
BACKGROUND_TASKS = (
    "acquire",
    "renew",
    "reload",
    "persist_status",
    "maintenance",
    "event",
    "registry",
    "http",
)

# Export every label value an alert rule selects on from startup, at 0: increase() needs a
# sample before the first event, or the first failure after a restart goes unseen.
for _outcome in ("valid", "failed"):
    ACME_ORDERS.labels(_outcome)
for _outcome in ("renewed", "failed"):
    RENEWALS.labels(_outcome)
for _limit in ("max_connections", "max_connections_per_ip", "max_handshakes", "accept_error"):
    CONNECTIONS_REFUSED.labels(_limit)
for _result in ("ok", "rejected"):
    CONFIG_RELOADS.labels(_result)
for _shed in ("max_handshakes", "hello_timeout_scaled"):
    CONNECTIONS_SHED.labels(_shed)
for _task in BACKGROUND_TASKS:
    BACKGROUND_TASK_ERRORS.labels(_task)
CONNECTIONS_CLOSED.labels("upstream_unreachable")
STORAGE_ERRORS.labels("corrupt_record")

# Label children used on every connection, bound once: ``labels()`` takes a lock and builds a
# key per call, which the per-connection path does not need to pay.
CLIENT_HELLOS_OK = CLIENT_HELLOS.labels("ok")
HANDSHAKES_OK = HANDSHAKES.labels("ok", "")
BYTES_TO_UPSTREAM = BYTES.labels("to_upstream")
BYTES_TO_CLIENT = BYTES.labels("to_client")
CLOSED_OK = CONNECTIONS_CLOSED.labels("ok")
PROXY_UNTRUSTED = PROXY_PROTOCOL_REFUSED.labels("untrusted_peer")  # also exported at 0


def adder(metric: Counter | Gauge, amount: float = 1) -> Callable[[], None]:
    """``metric.inc(amount)`` as a bound call, for counts made on every connection.

    ``inc`` checks on each call what cannot change for a metric fixed at import (that it is
    observable: no labels left unset; that a counter's amount is not negative) and costs three
    Python calls more than the increment itself, a few per cent of a connection's Python. The
    checks run here, once; the call is the increment of prometheus-client's value object, the
    one ``inc`` makes (``_value``: in one process a locked float, with workers the shared file;
    ``tests/unit/test_metrics_adder.py`` pins both).
    """
    metric._raise_if_not_observable()  # type: ignore[no-untyped-call]
    if isinstance(metric, Counter) and amount < 0:
        raise ValueError("a counter only grows")
    return functools.partial(metric._value.inc, amount)


def amount_adder(counter: Counter) -> Callable[[float], None]:
    """``counter.inc(amount)`` as a bound call taking the amount, for per-connection byte
    counts: the caller passes a count, never negative (``adder`` says why and how)."""
    counter._raise_if_not_observable()  # type: ignore[no-untyped-call]
    return counter._value.inc  # type: ignore[no-any-return]


def observer(histogram: Histogram) -> Callable[[float], None]:
    """``histogram.observe(amount)`` as a bound call, for per-connection durations.

    The same values as ``observe`` (the sum, and the first bucket whose upper bound is at
    least ``amount``) without its per-call checks and its walk over the buckets: the bucket
    is found by bisection. ``amount`` is a real number (a NaN would land in the first bucket,
    where ``observe`` counts it in none).
    """
    histogram._raise_if_not_observable()  # type: ignore[no-untyped-call]
    add_sum = histogram._sum.inc
    add_bucket = [functools.partial(b.inc, 1) for b in histogram._buckets]
    bounds = list(histogram._upper_bounds)  # ascending, +Inf last

    def observe(amount: float) -> None:
        add_sum(amount)
        add_bucket[bisect.bisect_left(bounds, amount)]()

    return observe


# The per-connection increments (accept, ClientHello, handshake, close), bound once.
ACCEPTED_ADD = adder(CONNECTIONS_ACCEPTED)
ACTIVE_UP = adder(CONNECTIONS_ACTIVE)
ACTIVE_DOWN = adder(CONNECTIONS_ACTIVE, -1)
CLIENT_HELLOS_OK_ADD = adder(CLIENT_HELLOS_OK)
HANDSHAKES_OK_ADD = adder(HANDSHAKES_OK)
CLOSED_OK_ADD = adder(CLOSED_OK)
BYTES_TO_UPSTREAM_ADD = amount_adder(BYTES_TO_UPSTREAM)
BYTES_TO_CLIENT_ADD = amount_adder(BYTES_TO_CLIENT)
HANDSHAKE_SECONDS_OBSERVE = observer(HANDSHAKE_SECONDS)
