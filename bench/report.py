"""From recorded runs to the summary, the Markdown table, the JSON file and the PNG chart.

Owns the aggregation rules: medians over repetitions; the ratio to HAProxy taken per
repetition (each terminator against the HAProxy run of the same round, so slow drift of a
shared machine cancels) and then its median; the targets and whether edgeproxy meets them in
every round (a target's baseline is the workload's ``target_vs``: HAProxy, or HAProxy with
big buffers for bulk; its worst round is shown).
Must not know how anything was measured.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from .workloads import IDLE_TARGET_KIB, WORKLOADS

__all__ = ["format_tables", "summarize", "write_chart", "write_json"]

BASELINE = "haproxy"
ISSUANCE_TARGET = 0.5  # edgeproxy's median at most half of Caddy's


def _median(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def _r(value: float | None, digits: int = 1) -> float | None:
    return None if value is None else round(value, digits)


def summarize(
    throughput: Sequence[dict[str, Any]],
    idle: Sequence[dict[str, Any]],
    issuance: Sequence[dict[str, Any]],
    terminators: Sequence[str],
) -> dict[str, Any]:
    per_round = {
        (row["terminator"], row["rep"], row["workload"]): row["requests_per_cpu_s"]
        for row in throughput
    }

    def ratios_to(base_name: str, runs: Sequence[dict[str, Any]]) -> list[float]:
        out = []
        for r in runs:
            base = per_round.get((base_name, r["rep"], r["workload"]))
            if base and r["requests_per_cpu_s"] is not None:
                out.append(r["requests_per_cpu_s"] / base)
        return out

    rows = []
    for key, workload in WORKLOADS.items():
        for name in terminators:
            runs = [r for r in throughput if r["workload"] == key and r["terminator"] == name]
            if not runs:
                continue
            ratio = _median(ratios_to(BASELINE, runs))
            target = workload.target if name == "edgeproxy" else None
            judged = ratios_to(workload.target_vs, runs) if target is not None else []
            worst = min(judged) if judged else None
            rows.append(
                {
                    "workload": key,
                    "title": workload.title,
                    "terminator": name,
                    "reps": len(runs),
                    "rps": _r(_median(r["rps"] for r in runs)),
                    "mbps": _r(_median(r["mbps"] for r in runs), 2),
                    "p99_ms": _r(_median(r["p99_ms"] for r in runs), 2),
                    "proxy_cpu_s": _r(_median(r["proxy_cpu_s"] for r in runs), 2),
                    "requests_per_cpu_s": _r(_median(r["requests_per_cpu_s"] for r in runs)),
                    "ratio_to_haproxy": _r(ratio, 3),
                    "target": target,
                    "target_vs": workload.target_vs if target is not None else None,
                    "worst_round_vs_target_baseline": _r(worst, 3),
                    # Every round, not the median: None when the baseline did not run.
                    "meets_target": None if target is None or worst is None else worst >= target,
                    "errors": sum(sum(r["errors"].values()) for r in runs),
                    "server_reuse_pct": _r(_median(r.get("server_reuse_pct") for r in runs)),
                    "probe_ok": all(r["probe_ok"] for r in runs),
                }
            )
    idle_rows = []
    for name in terminators:
        runs = [r for r in idle if r["terminator"] == name]
        if not runs:
            continue
        kib = _median(r["kib_per_connection"] for r in runs)
        worst_kib = max(
            (r["kib_per_connection"] for r in runs if r["kib_per_connection"]), default=None
        )
        target = IDLE_TARGET_KIB if name == "edgeproxy" else None
        idle_rows.append(
            {
                "terminator": name,
                "reps": len(runs),
                "connections": min(r["opened"] for r in runs),
                "requested": max(r["requested"] for r in runs),
                "origin_connections": min(r["origin_connections"] for r in runs),
                "rss_before_kib": _median(r["rss_before_kib"] for r in runs),
                "kib_per_connection": _r(kib, 2),
                "target_kib": target,
                "worst_round_kib": _r(worst_kib, 2),
                "meets_target": None
                if target is None or worst_kib is None
                else worst_kib <= target,
            }
        )
    by_system = {r["system"]: r for r in issuance}
    issuance_rows = []
    caddy = by_system.get("caddy", {}).get("median_ms")
    for r in issuance:
        ratio = None
        if r["system"] == "edgeproxy" and caddy and r["median_ms"] is not None:
            ratio = r["median_ms"] / caddy
        issuance_rows.append(
            {
                **{k: r[k] for k in ("system", "names", "ok", "median_ms", "p90_ms")},
                "ratio_to_caddy": _r(ratio, 3),
                "target": ISSUANCE_TARGET if r["system"] == "edgeproxy" else None,
                "meets_target": None if ratio is None else ratio <= ISSUANCE_TARGET,
            }
        )
    return {"throughput": rows, "idle": idle_rows, "issuance": issuance_rows}


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.3f}" if abs(value) < 10 else f"{value:,.1f}"
    return str(value)


def _verdict(meets: bool | None, target: str) -> str:
    if meets is None:
        return f"- ({target})" if target else ""
    return f"{'yes' if meets else 'NO'} ({target})"


def _table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def format_tables(summary: dict[str, Any]) -> str:
    """The summary as Markdown tables (readable in a terminal, pasteable into the README)."""
    parts = []
    if summary["throughput"]:
        header = [
            "workload",
            "terminator",
            "req/s",
            "MB/s",
            "p99 ms",
            "proxy CPU s",
            "req per CPU-s",
            "vs HAProxy",
            "target met",
            "errors",
        ]
        rows = []
        for r in summary["throughput"]:
            target = ""
            if r["target"] is not None:
                worst = r["worst_round_vs_target_baseline"]
                target = f">= {r['target']:.2f} vs {r['target_vs']} every round; worst " + (
                    f"{worst:.3f}" if worst is not None else f"-, no {r['target_vs']} row"
                )
            flag = "" if r["probe_ok"] else " (probe!)"
            rows.append(
                [
                    f"{r['workload']} {r['title']}{flag}",
                    r["terminator"],
                    _cell(r["rps"]),
                    _cell(r["mbps"]),
                    _cell(r["p99_ms"]),
                    _cell(r["proxy_cpu_s"]),
                    _cell(r["requests_per_cpu_s"]),
                    _cell(r["ratio_to_haproxy"]),
                    _verdict(r["meets_target"], target),
                    str(r["errors"]),
                ]
            )
        parts.append(_table(header, rows))
    if summary["idle"]:
        header = ["d idle TLS connections", "held", "at origin", "RSS before KiB", "KiB per conn"]
        header.append("target met")
        rows = [
            [
                r["terminator"],
                f"{r['connections']}/{r['requested']}",
                str(r["origin_connections"]),
                _cell(r["rss_before_kib"]),
                _cell(r["kib_per_connection"]),
                _verdict(
                    r["meets_target"],
                    f"<= {IDLE_TARGET_KIB:.0f} KiB every round; worst {_cell(r['worst_round_kib'])}",
                )
                if r["target_kib"] is not None
                else "",
            ]
            for r in summary["idle"]
        ]
        parts.append(_table(header, rows))
    if summary["issuance"]:
        header = ["e on-demand issuance", "ok", "median ms", "p90 ms", "vs Caddy", "target met"]
        rows = [
            [
                r["system"],
                f"{r['ok']}/{r['names']}",
                _cell(r["median_ms"]),
                _cell(r["p90_ms"]),
                _cell(r["ratio_to_caddy"]),
                _verdict(r["meets_target"], f"<= {ISSUANCE_TARGET:.2f}")
                if r["target"] is not None
                else "",
            ]
            for r in summary["issuance"]
        ]
        parts.append(_table(header, rows))
    return "\n\n".join(parts) + "\n"


def write_json(path: Path, document: dict[str, Any]) -> None:
    path.write_text(json.dumps(document, indent=2) + "\n")


def write_chart(path: Path, summary: dict[str, Any], terminators: Sequence[str]) -> None:
    """Three panels: CPU efficiency relative to HAProxy, idle memory, issuance latency."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(17, 5.2), width_ratios=[2.2, 1, 1])
    rows = summary["throughput"]
    keys = [k for k in WORKLOADS if any(r["workload"] == k for r in rows)]
    width = 0.8 / max(1, len(terminators))
    for i, name in enumerate(terminators):
        values = []
        for k in keys:
            row = next((r for r in rows if r["workload"] == k and r["terminator"] == name), None)
            values.append((row or {}).get("ratio_to_haproxy") or 0.0)
        xs = [j + (i - (len(terminators) - 1) / 2) * width for j in range(len(keys))]
        bars = ax1.bar(xs, values, width, label=name)
        ax1.bar_label(bars, fmt="%.2f", fontsize=7)
    for j, k in enumerate(keys):
        target = WORKLOADS[k].target
        if target is not None and WORKLOADS[k].target_vs == BASELINE:
            ax1.hlines(target, j - 0.4, j + 0.4, colors="black", linestyles="dashed")
    ax1.axhline(1.0, color="grey", linewidth=0.8)
    ax1.set_xticks(range(len(keys)), [f"{k}: {WORKLOADS[k].title}" for k in keys], fontsize=8)
    ax1.set_ylabel("requests per proxy CPU-second / HAProxy's")
    ax1.set_title("CPU efficiency vs HAProxy (dashed: edgeproxy target)")
    ax1.set_ylim(0, max(1.25, ax1.get_ylim()[1] * 1.1))
    ax1.legend(fontsize=8, ncols=max(1, len(terminators)), loc="upper center")

    idle = summary["idle"]
    ax2.bar([r["terminator"] for r in idle], [r["kib_per_connection"] or 0 for r in idle])
    ax2.axhline(IDLE_TARGET_KIB, color="black", linestyle="dashed")
    held = max((r["connections"] for r in idle), default=0)
    ax2.set_title(f"d: RSS per idle TLS connection ({held} held)")
    ax2.set_ylabel("KiB")
    ax2.tick_params(axis="x", labelsize=8)

    issuance = summary["issuance"]
    names = [r["system"] for r in issuance]
    ax3.bar(
        [i - 0.2 for i in range(len(names))],
        [r["median_ms"] or 0 for r in issuance],
        0.4,
        label="median",
    )
    ax3.bar(
        [i + 0.2 for i in range(len(names))], [r["p90_ms"] or 0 for r in issuance], 0.4, label="p90"
    )
    ax3.set_xticks(range(len(names)), names)
    ax3.set_ylabel("ms, first ClientHello to first response byte")
    ax3.set_title("e: on-demand issuance (pebble)")
    ax3.legend(fontsize=8)

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
