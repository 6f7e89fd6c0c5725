"""The ``edgeproxy`` command line: run, check, demo, certs, hostnames, storage, doctor.

Exit codes: 0 success, 1 runtime failure, 2 invalid config or usage (listing every problem).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click
import trio

from . import __version__
from .config import Config, config_warnings, load_config
from .errors import ConfigError, StorageError
from .logs import setup_logging

_T = TypeVar("_T")
_F = TypeVar("_F", bound=Callable[..., Any])

CONFIG_ENV = "EDGEPROXY_CONFIG"
#: Entries stored per batch by ``hostnames import`` (one sync or commit each).
IMPORT_BATCH = 1000


def _config_option(*, load: bool = True) -> Callable[[_F], _F]:
    """``--config``: the loaded ``cfg`` (a bad file exits 2 listing its problems), or with
    ``load=False`` the ``config_path`` itself, for the commands that read it again later."""
    return click.option(
        "--config",
        "-c",
        "cfg" if load else "config_path",
        type=click.Path(dir_okay=False, path_type=Path),
        envvar=CONFIG_ENV,
        required=True,
        callback=(lambda _ctx, _param, path: _load(path)) if load else None,
        help=f"TOML config file (or ${CONFIG_ENV}).",
    )


_json_option = click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")


def _say(message: str) -> None:
    click.echo(message, err=True)


def _load(path: Path) -> Config:
    try:
        return load_config(path)
    except ConfigError as exc:
        click.echo(f"{path}: invalid configuration:", err=True)
        for p in exc.problems:
            click.echo(f"  {p}", err=True)
        sys.exit(2)


def _exit_on_config_errors(exc: BaseException) -> NoReturn:
    """Exit 2 listing the problems when ``exc`` is (a group of) ConfigErrors found while
    starting (a busy port, say): one line each, no traceback. Anything else is re-raised."""
    from .errors import config_errors

    errors = config_errors(exc)
    if not errors:
        raise exc
    for err in errors:
        for p in err.problems:
            click.echo(p, err=True)
    sys.exit(2)


def _run_with_config(fn: Callable[..., Awaitable[_T]], *args: Any) -> _T:
    """``trio.run`` for a command: a config problem found while opening storage exits 2."""
    try:
        return trio.run(fn, *args)
    except (ConfigError, BaseExceptionGroup) as exc:
        _exit_on_config_errors(exc)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="edgeproxy")
def main() -> None:
    """edgeproxy: a TLS-terminating TCP edge proxy that obtains its own certificates."""


@main.command()
@_config_option(load=False)
def run(config_path: Path) -> None:
    """Run the proxy with a config file (SIGTERM drains, SIGHUP reloads)."""
    cfg = _load(config_path)
    setup_logging(cfg.log.format, cfg.log.level)
    for warning in config_warnings(cfg):
        logging.getLogger("edgeproxy").warning("config: %s", warning)
    if cfg.server.workers != 1:
        from .workers import run_supervisor

        sys.exit(run_supervisor(cfg, config_path))
    from .app import raise_fd_limit, run_process, tune_gc_for_serving

    tune_gc_for_serving()
    raise_fd_limit(cfg.server.max_handshakes)
    try:
        trio.run(lambda: run_process(cfg, config_path=config_path))
    except (ConfigError, BaseExceptionGroup) as exc:
        _exit_on_config_errors(exc)


@main.command()
@_config_option(load=False)
def check(config_path: Path) -> None:
    """Validate a config file: exit 0 if valid, 2 listing every problem."""
    cfg = _load(config_path)
    from .app import load_static_certificates
    from .certs.dns01 import Zone
    from .secret_env import tsig_secret

    try:
        load_static_certificates(cfg)
        for zone in cfg.acme.dns:
            Zone.from_config(zone, tsig_secret(zone))  # its TSIG secret is set and readable
    except ConfigError as exc:
        for p in exc.problems:
            click.echo(f"  {p}", err=True)
        sys.exit(2)
    warnings = config_warnings(cfg)
    for w in warnings:
        click.echo(f"  warning: {w}", err=True)
    click.echo(
        f"{config_path}: OK ({len(cfg.routes)} routes, issuer {cfg.tls.issuer}, "
        f"storage {cfg.storage.backend}"
        + (f"; {len(warnings)} warning(s) above" if warnings else "")
        + ")"
    )


@main.command()
@click.option("--listen", default="127.0.0.1:8443", show_default=True, help="TLS listen address.")
@click.option(
    "--state-dir",
    default=".edgeproxy-demo",
    show_default=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Where the demo keeps its CA and certificates.",
)
@click.option(
    "--admin",
    default="127.0.0.1:9901",
    show_default=True,
    help="Admin (metrics/health) address; '' disables.",
)
def demo(listen: str, state_dir: Path, admin: str) -> None:
    """Run the embedded default: internal CA, hello upstream, no config needed."""
    from .app import run_process
    from .demo import DEMO_HOST, demo_config, prepare_state, start_hello_upstream

    setup_logging("text", "info")
    state_dir = state_dir.resolve()

    async def main_async() -> None:
        # The CA file exists before the listener opens: a client may connect at once.
        files = await prepare_state(state_dir)
        async with trio.open_nursery() as nursery:
            upstream = await start_hello_upstream(nursery)
            cfg = demo_config(state_dir, listen, upstream, admin or None, files)

            async def ready(_: object) -> None:
                port = listen.rsplit(":", 1)[1]
                host = listen.rsplit(":", 1)[0].strip("[]")
                metrics_line = f"Metrics: http://{admin}/metrics. " if admin else ""
                click.echo(
                    "\nedgeproxy demo is running. Try:\n\n"
                    f"  curl --cacert {files.ca} --resolve {DEMO_HOST}:{port}:{host} "
                    f"https://{DEMO_HOST}:{port}/\n"
                    f"  curl --cacert {files.ca} https://localhost:{port}/\n\n"
                    "localhost, 127.0.0.1 and ::1 are in the demo's local certificate; any "
                    "name under *.edgeproxy.test gets its own certificate on first use. "
                    f"{metrics_line}Ctrl-C to stop.\n",
                )

            await run_process(cfg, on_ready=ready)
            nursery.cancel_scope.cancel()

    try:
        trio.run(main_async)
    except (ConfigError, BaseExceptionGroup) as exc:
        _exit_on_config_errors(exc)
    except KeyboardInterrupt:
        pass


# ---------------------------------------------------------------- certs


def _fmt_ts(ts: Any) -> str:
    if not ts:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M", time.gmtime(float(ts)))


async def _read_statuses(cfg: Config, name: str | None) -> list[dict[str, Any]]:
    from .app import build_storage
    from .certs import status_store
    from .progress import run_steps

    storage = build_storage(cfg)
    try:
        out = []
        items = [n for n, _ in await status_store.listed(storage) if name in (None, n)]
        # Reading 100,000 statuses takes a while: progress on stderr, Ctrl-C between reads.

        async def read(item: str) -> int:
            try:
                st = await status_store.read(storage, item)
            except status_store.UnreadableStatus:
                st = None  # a corrupt status is left out of the listing
            if st is not None:
                out.append(status_store.as_record(st))
            return 1

        result = await run_steps(items, read, total=len(items), what="statuses", say=_say)
        if result.stopped:
            click.echo(f"stopped by Ctrl-C after reading {result.steps} of {len(items)} statuses "
                       "(nothing was changed)", err=True)  # fmt: skip
            sys.exit(130)
        return out
    finally:
        await storage.aclose()


@main.group()
def certs() -> None:
    """Inspect and pre-issue certificates in the deployment's storage."""


@certs.command("list")
@_config_option()
@_json_option
def certs_list(cfg: Config, as_json: bool) -> None:
    """Every managed name with its state, expiry and next renewal (progress on stderr while
    the statuses are read; Ctrl-C stops, exit 130)."""
    rows = _run_with_config(_read_statuses, cfg, None)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    click.echo(f"{'NAME':40} {'STATE':9} {'NOT AFTER':16} {'RENEW AT':16} {'SOURCE':8} LAST ERROR")
    for r in sorted(rows, key=lambda r: r["name"]):
        click.echo(
            f"{r['name']:40} {r['state']:9} {_fmt_ts(r.get('not_after')):16} "
            f"{_fmt_ts(r.get('renew_at')):16} {r.get('renewal_source') or '-':8} "
            f"{r.get('last_error_type') or '-'}"
        )


@certs.command("status")
@_config_option()
@click.argument("name")
@_json_option
def certs_status(cfg: Config, name: str, as_json: bool) -> None:
    """Everything known about NAME, with a hint when something is wrong."""
    from .names import normalize_name

    name = normalize_name(name)
    rows = _run_with_config(_read_statuses, cfg, name)
    if not rows:
        click.echo(f"{name}: not managed (no certificate or attempt recorded)", err=True)
        sys.exit(1)
    r = rows[0]
    if as_json:
        click.echo(json.dumps(r, indent=2))
        return
    for label, key in (
        ("name", "name"),
        ("state", "state"),
        ("issuer", "issuer"),
        ("failures", "failures"),
        ("last error type", "last_error_type"),
        ("last error", "last_error"),
        ("hint", "hint"),
    ):
        click.echo(f"{label:16} {r.get(key) if r.get(key) is not None else '-'}")
    for label, key in (
        ("not after", "not_after"),
        ("renew at", "renew_at"),
        ("next attempt", "next_attempt"),
    ):
        click.echo(f"{label:16} {_fmt_ts(r.get(key))}")
    click.echo(f"{'challenge':16} {r.get('challenge_type') or '-'}")
    click.echo(f"{'renewal source':16} {r.get('renewal_source') or '-'}")
    if r.get("renewal_reason"):
        click.echo(f"{'renewal reason':16} {r['renewal_reason']}")
    if r.get("ari_window"):
        a, b = r["ari_window"]
        click.echo(f"{'ARI window':16} {_fmt_ts(a)} .. {_fmt_ts(b)}")


@certs.command("issue")
@_config_option()
@click.argument("name")
def certs_issue(cfg: Config, name: str) -> None:
    """Pre-issue NAME through the deployment's storage (the running proxy answers the challenge)."""
    from .app import assemble
    from .names import InvalidName, validate_hostname

    setup_logging(cfg.log.format, cfg.log.level)
    try:
        name = validate_hostname(name)
    except InvalidName as exc:
        click.echo(f"{name}: not a valid hostname: {exc}", err=True)
        sys.exit(2)

    async def go() -> int:
        rt = assemble(cfg)
        try:
            await rt.hostnames.ensure(name)  # registry = true: a registered name is allowed
            decision = await rt.certs.policy.check(name)
            if not decision.allowed:
                click.echo(f"{name}: refused by the allow-check ({decision.detail})", err=True)
                return 1
            async with trio.open_nursery() as nursery:
                await nursery.start(rt.certs.run)
                rec = await rt.certs.obtain(name)
                nursery.cancel_scope.cancel()
            try:
                await rt.events.flush()  # certificate.issued/failed, for the proxies to deliver
            except StorageError as exc:
                click.echo(f"warning: events about {name} could not be stored, they will not "
                           f"be sent: {exc}", err=True)  # fmt: skip
            if rec is None:
                st = rt.certs.status(name)
                etype, err = (st.last_error_type, st.last_error) if st else ("?", "")
                click.echo(f"{name}: issuance failed: {etype}: {err}", err=True)
                if st and st.hint:
                    click.echo(f"hint: {st.hint}", err=True)
                return 1
            until = _fmt_ts(rec.not_after)
            click.echo(f"{name}: issued by {rec.issuer_id}, valid until {until} UTC")
            return 0
        finally:
            await rt.storage.aclose()

    sys.exit(_run_with_config(go))


@certs.command("import")
@_config_option()
@click.option("--cert", "cert_path", type=click.Path(path_type=Path),
              help="PEM chain, leaf first.")  # fmt: skip
@click.option("--key", "key_path", type=click.Path(path_type=Path),
              help="The leaf's unencrypted PEM private key.")  # fmt: skip
@click.option("--from-caddy", "caddy_dir", type=click.Path(path_type=Path),
              help="A Caddy (CertMagic) storage folder: every certificates/<issuer>/<name>/ "
                   "<name>.crt and .key in it.")  # fmt: skip
def certs_import(
    cfg: Config, cert_path: Path | None, key_path: Path | None, caddy_dir: Path | None
) -> None:
    """Adopt certificates obtained elsewhere: served from storage at once (no ACME order) for
    every DNS name they cover, and renewed through the configured issuer on schedule. A bad or
    mismatched pair is reported by path and nothing of it is stored; the others are imported
    (exit 1 when anything was skipped). Progress as for `hostnames import`: a bar on a
    terminal, else a line a second on stderr; Ctrl-C stops after the pair in flight (stored
    whole) and says how many were imported (exit 130)."""
    from .app import build_storage
    from .certs.importer import BadImport, caddy_pairs, import_pair, read_pair
    from .certs.record import CertRecord
    from .errors import StorageError
    from .progress import StepsDone, run_steps

    single = cert_path is not None or key_path is not None
    if (caddy_dir is not None) == single or (single and (cert_path is None or key_path is None)):
        click.echo("give --cert and --key, or --from-caddy DIR", err=True)
        sys.exit(2)
    problems: list[str] = []
    if caddy_dir is not None:
        pairs, problems = caddy_pairs(caddy_dir)
    else:
        assert cert_path is not None and key_path is not None
        pairs = [(cert_path, key_path)]
    batches: list[list[CertRecord]] = []
    try:
        for crt, key in pairs:
            try:
                batches.append(read_pair(crt, key))
            except BadImport as exc:
                problems.append(str(exc))
    except KeyboardInterrupt:  # still checking: nothing is written yet
        click.echo(f"stopped by Ctrl-C while checking pair {len(batches) + 1} of {len(pairs)}: "
                   "nothing was imported", err=True)  # fmt: skip
        sys.exit(130)
    for problem in problems:
        click.echo(f"not imported: {problem}", err=True)

    async def go() -> tuple[StepsDone | None, str | None]:
        storage = build_storage(cfg)

        async def store(records: list[CertRecord]) -> int:
            # One step per pair: Ctrl-C waits until every record of the pair in flight is stored.
            for done in await import_pair(storage, records):
                until = _fmt_ts(done.not_after)
                if done.stored:
                    click.echo(f"{done.name}: imported, valid until {until} UTC")
                else:
                    click.echo(f"{done.name}: kept the stored certificate (valid until "
                               f"{until} UTC, not older than this one)")  # fmt: skip
            return 1

        result: StepsDone | None = None
        failure: str | None = None
        try:
            try:
                result = await run_steps(batches, store, total=len(batches),
                                         what="certificates", say=_say)  # fmt: skip
            except* StorageError as group:
                failure = str(group.exceptions[0])
        finally:
            await storage.aclose()
        return result, failure

    result, failure = _run_with_config(go)
    if failure is not None:
        click.echo(f"not imported: storage: {failure}", err=True)
        sys.exit(1)
    assert result is not None
    if result.stopped:
        click.echo(f"stopped by Ctrl-C: {result.steps} of {len(batches)} certificate pairs "
                   "imported, each whole; run the same import again for the rest (a name whose "
                   "stored certificate lasts as long is kept)", err=True)  # fmt: skip
        sys.exit(130)
    if problems or not batches:
        sys.exit(1)


# ---------------------------------------------------------------- hostnames


@main.group()
def hostnames() -> None:
    """Manage the customer hostname registry in the deployment's storage.

    Changes reach running proxies within [hostnames] poll_interval. Names added here are
    issued at their first visitor (or with `certs issue`); POST /v1/hostnames issues at once.
    """


def _storage_run(cfg: Config, work: Any) -> Any:
    """Run ``work(storage)`` in trio with the deployment's storage, closed afterwards."""
    from .app import build_storage

    async def go() -> Any:
        storage = build_storage(cfg)
        try:
            return await work(storage)
        finally:
            await storage.aclose()

    return trio.run(go)


async def _announce(cfg: Config, storage: Any, kind: str, entries: list[Any]) -> None:
    """Queue hostname.created/deleted events for the running proxies to deliver."""
    if not cfg.events.url:
        return
    from .admin.hostnames import entry_event_data
    from .events import Events

    events = Events(storage, url=cfg.events.url, secret=None, source=cfg.events.source)
    for entry in entries:
        try:
            await events.publish(kind, entry.hostname, entry_event_data(entry))
        except StorageError as exc:
            # The change itself is stored; only its announcement is not (nothing here retries).
            click.echo(f"warning: the {kind} event for {entry.hostname} could not be stored, "
                       f"it will not be sent: {exc}", err=True)  # fmt: skip


def _bad(exc: Exception) -> NoReturn:
    click.echo(f"error: {getattr(exc, 'detail', exc)}", err=True)
    sys.exit(2)


def _hostname_arg(name: str) -> str:
    """The NAME argument as a registry hostname; exit 2 with the reason when it is none."""
    from .hostnames.entries import BadEntry, parse_hostname

    try:
        return parse_hostname(name)
    except BadEntry as exc:
        _bad(exc)


async def _describe(storage: Any, entry: Any) -> dict[str, Any]:
    from .admin.hostnames import describe_hostname

    # No manager runs here: the state comes from what the proxies stored.
    return (await describe_hostname(storage, entry, time.time())).model_dump()


@hostnames.command("add")
@_config_option()
@click.argument("name")
@click.option("--upstream", help='"host:port" overriding the SNI routes for NAME.')
@click.option("--metadata", help="A JSON object (at most 4 KiB), returned as stored.")
def hostnames_add(cfg: Config, name: str, upstream: str | None, metadata: str | None) -> None:
    """Register NAME (an existing entry is left as it is)."""
    from .hostnames.entries import BadEntry, encode_metadata, parse_hostname, parse_upstream
    from .storage.base import HostnameEntry

    try:
        entry = HostnameEntry(parse_hostname(name), parse_upstream(upstream),
                              encode_metadata(json.loads(metadata) if metadata else None),
                              time.time())  # fmt: skip
    except BadEntry as exc:
        _bad(exc)
    except ValueError as exc:
        _bad(ValueError(f"--metadata is not valid JSON: {exc}"))

    async def work(storage: Any) -> bool:
        stored, created = await storage.add_hostname(entry)
        if created:
            await _announce(cfg, storage, "hostname.created", [stored])
        return bool(created)

    created = _storage_run(cfg, work)
    click.echo(f"{entry.hostname}: {'added' if created else 'already registered (unchanged)'}")


@hostnames.command("remove")
@_config_option()
@click.argument("name")
def hostnames_remove(cfg: Config, name: str) -> None:
    """Stop serving and renewing NAME (its certificate is kept for [hostnames] removal_grace)."""
    hostname = _hostname_arg(name)

    async def work(storage: Any) -> bool:
        if await storage.remove_hostname(hostname, time.time()) is None:
            return False
        await _announce(cfg, storage, "hostname.deleted", [await storage.get_hostname(hostname)])
        return True

    if not _storage_run(cfg, work):
        click.echo(f"{hostname}: not a registered hostname", err=True)
        sys.exit(1)
    click.echo(f"{hostname}: removed")


@hostnames.command("list")
@_config_option()
@click.option("--state", type=click.Choice(["pending", "issuing", "active", "failing",
                                             "rate_limited", "account_paused", "denied",
                                             "removed"]))  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
def hostnames_list(cfg: Config, state: str | None, as_json: bool) -> None:
    """Every registered hostname (removed ones until purged) with its state."""

    async def work(storage: Any) -> None:
        if not as_json:
            click.echo(f"{'HOSTNAME':40} {'STATE':8} {'NOT AFTER':16} UPSTREAM")
        after = None
        while page := await storage.list_hostnames(after=after, limit=500):
            after = page[-1].hostname
            for entry in page:
                d = await _describe(storage, entry)
                if state is not None and d["state"] != state:
                    continue
                if as_json:
                    click.echo(json.dumps(d))
                    continue
                cert = d["certificate"] or {}
                not_after = (cert.get("not_after") or "-")[:16].replace("T", " ")
                click.echo(f"{d['hostname']:40} {d['state']:8} {not_after:16} "
                           f"{d['upstream'] or '-'}")  # fmt: skip

    _storage_run(cfg, work)


@hostnames.command("show")
@_config_option()
@click.argument("name")
@_json_option
def hostnames_show(cfg: Config, name: str, as_json: bool) -> None:
    """One hostname: entry, state, certificate, last error."""
    hostname = _hostname_arg(name)

    async def work(storage: Any) -> dict[str, Any] | None:
        entry = await storage.get_hostname(hostname)
        return None if entry is None else await _describe(storage, entry)

    d = _storage_run(cfg, work)
    if d is None:
        click.echo(f"{hostname}: not a registered hostname", err=True)
        sys.exit(1)
    if as_json:
        click.echo(json.dumps(d, indent=2))
        return
    cert, err = d["certificate"] or {}, d["last_error"] or {}
    for label, value in (
        ("hostname", d["hostname"]), ("state", d["state"]), ("upstream", d["upstream"]),
        ("metadata", json.dumps(d["metadata"])), ("created", d["created_at"]),
        ("removed", d["removed_at"]), ("not after", cert.get("not_after")),
        ("issuer", cert.get("issuer")), ("serial", cert.get("serial")),
        ("last error", err.get("type")), ("detail", err.get("detail")), ("hint", err.get("hint")),
    ):  # fmt: skip
        click.echo(f"{label:12} {value if value is not None else '-'}")


@hostnames.command("import")
@_config_option()
@click.argument("file", type=click.File("r", encoding="utf-8"))
def hostnames_import(cfg: Config, file: Any) -> None:
    """Register every hostname in FILE: one per line, or JSON lines with the fields hostname,
    upstream, metadata ('-' reads stdin). Bad lines are reported with their line number and
    skipped; the good ones are kept. Progress: a bar on a terminal, else a line a second on
    stderr. Ctrl-C stops after the current batch of 1,000 (stored whole) and says how far it
    got (exit 130). Exit 0 if every line was good, 1 otherwise."""
    from .hostnames.entries import BadEntry, parse_import_line
    from .progress import run_steps
    from .storage.base import HostnameEntry

    entries: list[HostnameEntry] = []
    line_numbers: list[int] = []
    bad = 0
    for number, line in enumerate(file, start=1):
        try:
            parsed = parse_import_line(line)
        except BadEntry as exc:
            click.echo(f"{file.name}:{number}: {exc.detail}", err=True)
            bad += 1
            continue
        if parsed is not None:
            entries.append(HostnameEntry(*parsed, created_at=time.time()))
            line_numbers.append(number)
    counts = {"added": 0, "existing": 0}
    stopped = False

    async def work(storage: Any) -> None:
        nonlocal stopped

        # Ctrl-C stops between batches: a batch is stored whole (one sync or one commit).
        async def store(batch: list[HostnameEntry]) -> int:
            results = await storage.add_hostnames(batch)
            for _, created in results:
                counts["added" if created else "existing"] += 1
            await _announce(cfg, storage, "hostname.created", [e for e, c in results if c])
            return len(batch)

        batches = [entries[i : i + IMPORT_BATCH] for i in range(0, len(entries), IMPORT_BATCH)]
        result = await run_steps(batches, store, total=len(entries), what="hostnames", say=_say)
        stopped = result.stopped

    t0 = time.monotonic()
    _storage_run(cfg, work)
    took = time.monotonic() - t0
    click.echo(f"{counts['added']} added, {counts['existing']} already registered, {bad} bad "
               f"line(s) ({took:.1f}s)")  # fmt: skip
    if stopped:
        done = counts["added"] + counts["existing"]
        last = f" (up to line {line_numbers[done - 1]} of {file.name})" if done else ""
        click.echo(f"stopped by Ctrl-C: {done} of {len(entries)} entries imported{last}, each "
                   "whole; run the same import again to add the rest (registered names are "
                   "skipped)", err=True)  # fmt: skip
        sys.exit(130)
    sys.exit(1 if bad else 0)


# ---------------------------------------------------------------- storage


@main.group()
def storage() -> None:
    """Check and clean the certificate storage."""


@storage.command("check")
@_config_option()
def storage_check(cfg: Config) -> None:
    """Report leftover temp files, stale locks, corrupt records, bad permissions, an unsafe
    storage root, and secret values stored in clear or under another encryption key."""
    problems = _run_with_config(_with_storage, cfg, "check", 0.0)
    for p in problems:
        click.echo(p)
    if problems:
        sys.exit(1)
    click.echo("storage OK")


@storage.command("clean")
@_config_option()
@click.option(
    "--grace-days",
    default=30,
    show_default=True,
    # A negative grace would reach into the future and delete valid certificates; the storage
    # side refuses that too (clean_storage), this gives the operator a clear usage error.
    type=click.IntRange(0, 3650),
    help="Keep expired certificates this many days (0-3650); valid ones are never removed.",
)
def storage_clean(cfg: Config, grace_days: int) -> None:
    """Remove long-expired certificates, stale locks, orphaned challenges and temp files."""
    removed = _run_with_config(_with_storage, cfg, "clean", grace_days * 86400.0)
    for r in removed:
        click.echo(f"removed {r}")
    click.echo(f"{len(removed)} item(s) removed")


async def _with_storage(cfg: Config, what: str, grace: float) -> list[str]:
    from .app import build_storage
    from .certs.inventory import check_storage, clean_storage

    st = build_storage(cfg)
    try:
        if what == "check":
            return await check_storage(st)
        return await clean_storage(st, grace)
    finally:
        await st.aclose()


@main.command()
@_config_option()
@click.argument("name")
@_json_option
@click.option(
    "--port",
    default=443,
    show_default=True,
    type=click.IntRange(1, 65535),
    help="The port the CA connects to.",
)
@click.option(
    "--http-port",
    default=80,
    show_default=True,
    type=click.IntRange(1, 65535),
    help="The port the CA fetches HTTP-01 from (checked when acme.challenges has http-01).",
)
@click.option(
    "--nameserver", metavar="HOST:PORT", help="Resolve with this DNS server, not the system's."
)
@click.option(
    "--connect-to",
    metavar="ADDR",
    help="Probe this address instead of NAME's (e.g. the load balancer before DNS is switched).",
)
def doctor(
    cfg: Config,
    name: str,
    as_json: bool,
    port: int,
    http_port: int,
    nameserver: str | None,
    connect_to: str | None,
) -> None:
    """Can the CA reach this deployment for custom domain NAME? Exit 0 only if so."""
    from .doctor import doctor_command

    sys.exit(
        doctor_command(
            cfg,
            name,
            as_json=as_json,
            port=port,
            http_port=http_port,
            nameserver=nameserver,
            connect_to=connect_to,
            echo=click.echo,
            echo_err=lambda line: click.echo(line, err=True),
        )
    )


if __name__ == "__main__":  # pragma: no cover
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
