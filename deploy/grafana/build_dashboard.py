"""Writes deploy/grafana/edgeproxy.json, the Grafana dashboard for edgeproxy's metrics.

    python deploy/grafana/build_dashboard.py          # rewrite the JSON
    python deploy/grafana/build_dashboard.py --check  # exit 1 when the JSON is out of date

Plain dictionaries in Grafana's dashboard JSON model (schemaVersion 39), no library: the model
is stable and small enough that a dependency would add more than it saves. Every query uses
only metric names from edgeproxy/metrics.py; tests/integration/test_grafana_dashboard.py runs
each one against a real Prometheus scraping a real edgeproxy and requires a series back.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

OUT = Path(__file__).with_name("edgeproxy.json")
DS = {"type": "prometheus", "uid": "${datasource}"}
RATE = "$__rate_interval"
WIDTH, HEIGHT = 12, 8


class Layout:
    """Places panels two per row, rows of full width, in the order they are added."""

    def __init__(self) -> None:
        self.panels: list[dict[str, Any]] = []
        self.y = 0
        self.x = 0

    def row(self, title: str) -> None:
        if self.x:
            self.x, self.y = 0, self.y + HEIGHT
        self._add({"type": "row", "title": title, "collapsed": False, "panels": []}, 24, 1)
        self.x, self.y = 0, self.y + 1

    def panel(
        self,
        kind: str,
        title: str,
        description: str,
        targets: list[tuple[str, str]],
        unit: str = "short",
        **options: Any,
    ) -> None:
        panel: dict[str, Any] = {
            "type": kind,
            "title": title,
            "description": description,
            "datasource": DS,
            "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
            "options": options or _default_options(kind),
            "targets": [
                {
                    "refId": chr(ord("A") + i),
                    "datasource": DS,
                    "expr": expr,
                    "legendFormat": legend,
                    "range": kind == "timeseries",
                    "instant": kind != "timeseries",
                }
                for i, (expr, legend) in enumerate(targets)
            ],
        }
        self._add(panel, WIDTH, HEIGHT)
        self.x += WIDTH
        if self.x >= 24:
            self.x, self.y = 0, self.y + HEIGHT

    def _add(self, panel: dict[str, Any], w: int, h: int) -> None:
        panel["id"] = len(self.panels) + 1
        panel["gridPos"] = {"x": self.x, "y": self.y, "w": w, "h": h}
        self.panels.append(panel)


def _default_options(kind: str) -> dict[str, Any]:
    if kind == "timeseries":
        return {
            "legend": {"displayMode": "table", "placement": "bottom", "calcs": ["max"]},
            "tooltip": {"mode": "multi", "sort": "desc"},
        }
    return {
        "reduceOptions": {"calcs": ["lastNotNull"], "values": False},
        "colorMode": "value",
        "graphMode": "none",
    }


def rate(metric: str, by: str = "", where: str = "") -> str:
    grouping = f" by ({by})" if by else ""
    return f"sum{grouping} (rate({metric}{where}[{RATE}]))"


def quantile(q: float, metric: str, where: str = "") -> str:
    return f"histogram_quantile({q}, sum by (le) (rate({metric}_bucket{where}[{RATE}])))"


def build() -> dict[str, Any]:
    d = Layout()
    d.row("Traffic")
    d.panel(
        "timeseries",
        "Connections",
        "Accepted per second and currently open.",
        [
            (rate("edgeproxy_connections_accepted_total"), "accepted/s"),
            ("sum(edgeproxy_connections_active)", "open"),
        ],
    )
    d.panel(
        "timeseries",
        "Connections closed by reason",
        "ok is a finished connection; the rest say why it ended early.",
        [(rate("edgeproxy_connections_closed_total", "reason"), "{{reason}}")],
        "ops",
    )
    d.panel(
        "timeseries",
        "TLS handshakes by result",
        "Completed, refused and failed handshakes.",
        [(rate("edgeproxy_tls_handshakes_total", "result"), "{{result}}")],
        "ops",
    )
    d.panel(
        "timeseries",
        "Handshake failures by reason",
        "Refused (unknown or denied name, no route) and failed (timeout, bad ClientHello) "
        "handshakes.",
        [
            (
                rate("edgeproxy_tls_handshakes_total", "result, reason", '{result!="ok"}'),
                "{{result}}: {{reason}}",
            )
        ],
        "ops",
    )
    d.panel(
        "timeseries",
        "Handshake duration",
        "From accept to completed handshake, including a first certificate's wait.",
        [
            (quantile(0.5, "edgeproxy_tls_handshake_duration_seconds"), "p50"),
            (quantile(0.99, "edgeproxy_tls_handshake_duration_seconds"), "p99"),
        ],
        "s",
    )
    d.panel(
        "timeseries",
        "Refused and shed at accept",
        "Connections refused at a limit, and ones shed before their ClientHello.",
        [
            (rate("edgeproxy_connections_refused_total", "limit"), "refused: {{limit}}"),
            (rate("edgeproxy_connections_shed_total", "reason"), "shed: {{reason}}"),
        ],
        "ops",
    )
    d.panel(
        "timeseries",
        "Bytes proxied",
        "Plaintext bytes per second, by direction.",
        [(rate("edgeproxy_bytes_total", "direction"), "{{direction}}")],
        "Bps",
    )
    d.panel(
        "timeseries",
        "ClientHellos by result",
        "http: a plain-HTTP client on the TLS port; not_tls: anything else.",
        [(rate("edgeproxy_client_hellos_total", "result"), "{{result}}")],
        "ops",
    )
    d.panel(
        "timeseries",
        "Plain-HTTP listener",
        "Requests on [http] listen by result: HTTP-01 answers, redirects to HTTPS, refusals.",
        [(rate("edgeproxy_http_requests_total", "result"), "{{result}}")],
        "reqps",
    )
    d.row("Upstreams")
    d.panel(
        "timeseries",
        "Upstream connect failures",
        "Failed connection attempts to upstreams, by route and upstream.",
        [
            (
                rate("edgeproxy_upstream_connect_failures_total", "route, upstream"),
                "{{route}} {{upstream}}",
            )
        ],
        "ops",
    )
    d.panel(
        "timeseries",
        "Upstream connect time (p99)",
        "By route.",
        [
            (
                "histogram_quantile(0.99, sum by (le, route) "
                f"(rate(edgeproxy_upstream_connect_duration_seconds_bucket[{RATE}])))",
                "{{route}}",
            )
        ],
        "s",
    )
    d.row("Certificates")
    d.panel(
        "timeseries",
        "Certificates by state",
        "Managed certificates (the largest count any process reports).",
        [("max by (state) (edgeproxy_certificates)", "{{state}}")],
    )
    d.panel(
        "stat",
        "Earliest expiry",
        "Time until the first managed certificate expires.",
        [
            (
                "min(edgeproxy_certificate_earliest_expiry_timestamp_seconds > 0) - time()",
                "earliest expiry",
            )
        ],
        "s",
    )
    d.panel(
        "timeseries",
        "Renewals",
        "Renewal attempts by outcome, and renewals overdue.",
        [
            (rate("edgeproxy_certificate_renewals_total", "outcome"), "{{outcome}}"),
            ("max(edgeproxy_certificate_renewals_due)", "due"),
        ],
    )
    d.panel(
        "timeseries",
        "Issuance attempts",
        "ACME orders by outcome.",
        [(rate("edgeproxy_acme_orders_total", "outcome"), "{{outcome}}")],
        "ops",
    )
    d.panel(
        "timeseries",
        "Certificates in memory",
        "Certificates ready in each process's cache (at most tls.cache_size), summed.",
        [("sum(edgeproxy_certificates_cached)", "cached")],
    )
    d.panel(
        "timeseries",
        "Maintenance passes",
        "Wall time of a renewal pass (p99) and stored certificates examined per second.",
        [
            (quantile(0.99, "edgeproxy_maintenance_pass_duration_seconds"), "pass p99 (s)"),
            (rate("edgeproxy_maintenance_names_examined_total"), "names examined/s"),
        ],
    )
    d.row("ACME")
    d.panel(
        "timeseries",
        "ACME requests",
        "Requests to the CA by endpoint.",
        [(rate("edgeproxy_acme_requests_total", "endpoint"), "{{endpoint}}")],
        "reqps",
    )
    d.panel(
        "timeseries",
        "ACME errors",
        "Answers other than 2xx, by endpoint and status (error: no answer at all).",
        [
            (
                rate("edgeproxy_acme_requests_total", "endpoint, status", '{status!~"2.."}'),
                "{{endpoint}} {{status}}",
            )
        ],
        "reqps",
    )
    d.panel(
        "timeseries",
        "CA budget",
        "Per CA (acme.issuers name): 1 while its ACME account is paused after the CA answered "
        "rateLimited or 503 with Retry-After (no replica sends it new orders until the pause "
        "ends; waiting names are ordered then). Per [acme.limits] budget: the orders left in "
        "its window, the lowest any replica saw (+Inf: limit off); names over a budget wait "
        "with state rate_limited.",
        [
            (
                "max by (issuer) (edgeproxy_acme_account_paused)",
                "{{issuer}} paused",
            ),
            (
                "min by (limit) (edgeproxy_acme_budget_remaining)",
                "{{limit}} left",
            ),
        ],
    )
    d.panel(
        "timeseries",
        "Challenges",
        "TLS-ALPN-01 validations answered, and validation handshakes with no pending "
        "challenge (the load balancer or shared storage is wrong when these rise).",
        [
            (rate("edgeproxy_acme_challenges_answered_total"), "answered"),
            (
                rate("edgeproxy_acme_validation_without_pending_challenge_total"),
                "without pending challenge",
            ),
        ],
        "ops",
    )
    d.panel(
        "timeseries",
        "On-demand decisions",
        "Allow checks for new names, by result and source.",
        [
            (
                rate("edgeproxy_on_demand_decisions_total", "result, source"),
                "{{result}} ({{source}})",
            )
        ],
        "ops",
    )
    d.panel(
        "timeseries",
        "Event delivery",
        "Lifecycle events accepted by the receiver, failed attempts (retried), events given up, "
        "and the outbox backlog.",
        [
            (rate("edgeproxy_events_delivered_total"), "delivered/s"),
            (rate("edgeproxy_events_failed_total"), "failed/s"),
            (rate("edgeproxy_events_dropped_total"), "dropped/s"),
            (rate("edgeproxy_events_lost_total"), "lost/s (never stored)"),
            ("max(edgeproxy_events_queued)", "queued"),
        ],
    )
    d.row("Storage and process")
    d.panel(
        "timeseries",
        "Storage errors",
        "Failed storage operations, by operation.",
        [(rate("edgeproxy_storage_errors_total", "operation"), "{{operation}}")],
        "ops",
    )
    d.panel(
        "timeseries",
        "Storage lock wait (p99)",
        "Time waiting for a storage lock.",
        [(quantile(0.99, "edgeproxy_storage_lock_wait_seconds"), "p99")],
        "s",
    )
    d.panel(
        "timeseries",
        "Config reloads and background errors",
        "SIGHUP reloads by result; unexpected exceptions in background work by task.",
        [
            (rate("edgeproxy_config_reloads_total", "result"), "reload {{result}}"),
            (rate("edgeproxy_background_task_errors_total", "task"), "error in {{task}}"),
        ],
        "ops",
    )
    return {
        "uid": "edgeproxy",
        "title": "edgeproxy",
        "description": "Traffic, certificates, ACME and storage of an edgeproxy fleet.",
        "tags": ["edgeproxy"],
        "timezone": "utc",
        "editable": True,
        "graphTooltip": 1,
        "refresh": "30s",
        "schemaVersion": 39,
        "version": 1,
        "time": {"from": "now-6h", "to": "now"},
        "templating": {
            "list": [
                {
                    "name": "datasource",
                    "label": "Prometheus",
                    "type": "datasource",
                    "query": "prometheus",
                    "current": {},
                    "hide": 0,
                },
            ]
        },
        "annotations": {"list": []},
        "links": [],
        "panels": d.panels,
    }


def render() -> str:
    return json.dumps(build(), indent=2) + "\n"


def main(argv: list[str]) -> int:
    text = render()
    if argv[1:] == ["--check"]:
        if OUT.read_text() != text:
            print(f"{OUT} is out of date: run python {Path(__file__).as_posix()}")
            return 1
        return 0
    OUT.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
