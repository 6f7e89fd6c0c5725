"""Wires one edgeproxy process: storage, issuer, certificate manager, proxy, admin, signals.

This module and ``cli.py`` are the only places that assemble parts; everything else receives
what it needs. ``run_process`` runs until SIGTERM/SIGINT (drain, then exit 0); SIGHUP reloads
routes, upstreams, allow patterns and limits from the config file, keeping the old config if
the new one is invalid.
"""

from __future__ import annotations

import functools
import gc
import logging
import resource
import signal
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx
import trio

from . import metrics, secret_env
from .addresses import parse_hostport
from .certs.budget_store import CaBudgets
from .certs.budgets import Limits
from .certs.challenges import ChallengeResponder, HttpChallenges
from .certs.managed import ManagedCertificates
from .certs.manager import CertificateManager
from .certs.policy import OnDemandPolicy
from .certs.static import StaticCertificates
from .config import Config, RouteConfig, load_config
from .errors import ConfigError
from .events import Events
from .hostnames.registry import HostnameRegistry
from .issuers.account_pause import AccountPauses
from .issuers.base import Issuer
from .issuers.internal import InternalIssuer
from .names import InvalidName, validate_hostname
from .proxy.http import HttpListener, HttpSettings
from .proxy.routes import Route, RouteTable
from .proxy.senders import AddressSet
from .proxy.server import Proxy, Settings, open_listeners
from .storage.base import Storage
from .tls.tickets import TicketKeys

log = logging.getLogger("edgeproxy")


def build_storage(cfg: Config) -> Storage:
    enc = secret_env.storage_encryption_key(cfg.storage)
    try:
        if cfg.storage.backend == "postgres":
            from .storage.postgres import PostgresStorage

            return PostgresStorage(secret_env.storage_dsn(cfg.storage), encryption_key=enc)
        from .storage.file import FileStorage

        return FileStorage(cfg.storage.path, encryption_key=enc)
    except ValueError as exc:
        raise ConfigError([f"storage.encryption_key_env: {exc}"]) from None


def refuse_unsafe_storage(storage: Storage) -> None:
    """Refuse to serve from a file storage root others could swap (``root_problems``)."""
    from .storage.file import FileStorage

    if isinstance(storage, FileStorage):
        problems = storage.root_problems()
        if problems:
            raise ConfigError([f"storage.path: {p}" for p in problems])


def build_events(cfg: Config, storage: Storage) -> Events:
    ev = cfg.events
    secret = secret_env.events_secret(ev)
    return Events(storage, url=ev.url, secret=secret, source=ev.source, timeout=ev.timeout,
                  retry_max=ev.retry_max, max_age=ev.max_age,
                  lease_ttl=max(3.0, cfg.storage.lock_ttl))  # fmt: skip


def build_issuer(
    cfg: Config,
    storage: Storage,
    challenges: ChallengeResponder,
    http_challenges: HttpChallenges | None = None,
    pauses: AccountPauses | None = None,
) -> Issuer:
    if cfg.tls.issuer == "internal":
        return InternalIssuer(storage, key_type=cfg.tls.key_type)
    from .acme.client import ChallengeSolver
    from .issuers.acme import AcmeIssuer
    from .issuers.fallback import FallbackIssuer

    by_type: dict[str, ChallengeSolver] = {"tls-alpn-01": challenges}
    by_type["http-01"] = http_challenges or HttpChallenges(storage)
    solvers = [by_type[t] for t in cfg.acme.challenges]
    members = [
        AcmeIssuer.from_config(
            one,
            storage,
            solvers,
            hmac_key=secret_env.eab_hmac_key(one),
            lock_ttl=cfg.storage.lock_ttl,
            pauses=pauses,
        )
        for one in cfg.acme.issuer_configs()
    ]
    return members[0] if len(members) == 1 else FallbackIssuer(members)


def build_managed(
    cfg: Config,
    storage: Storage,
    pauses: AccountPauses | None = None,
    budgets: CaBudgets | None = None,
) -> ManagedCertificates | None:
    """``[[acme.managed]]`` through the first CA, with DNS-01 as its only challenge type.

    Raises ConfigError when a zone's TSIG secret is missing from the environment.
    """
    if not cfg.acme.managed:
        return None
    from .certs.dns01 import Dns01Solver, Zone
    from .issuers.acme import AcmeIssuer

    zones = [Zone.from_config(z, secret_env.tsig_secret(z)) for z in cfg.acme.dns]
    first = cfg.acme.issuer_configs()[0]
    issuer = AcmeIssuer.from_config(
        first,
        storage,
        [Dns01Solver(zones, cfg.acme.dns_resolver)],
        hmac_key=secret_env.eab_hmac_key(first),
        lock_ttl=cfg.storage.lock_ttl,
        pauses=pauses,
    )
    return ManagedCertificates(
        [m.names for m in cfg.acme.managed],
        storage=storage,
        issuer=issuer,
        key_type=cfg.tls.key_type,
        renew_interval=max(cfg.tls.maintenance_interval, 60.0),
        lock_ttl=cfg.storage.lock_ttl,
        session_tickets=cfg.tls.session_tickets,
        budgets=budgets,
    )


def route_table(routes: Sequence[RouteConfig]) -> RouteTable:
    """The ``[[routes]]`` as the proxy's plain routes (file order: the first match wins)."""
    return RouteTable(
        [
            Route(
                index=i,
                patterns=tuple(r.sni),
                default=r.default,
                upstreams=tuple(parse_hostport(u, what="an upstream") for u in r.upstreams),
                send_proxy=r.send_proxy,
                alpn=tuple(r.alpn),
            )
            for i, r in enumerate(routes)
        ]
    )


def proxy_settings(cfg: Config) -> Settings:
    """What the TLS listeners need from the config, as plain values."""
    s = cfg.server
    return Settings(
        routes=route_table(cfg.routes),
        proxy_protocol=s.proxy_protocol,
        handshake_timeout=s.handshake_timeout,
        idle_timeout=s.idle_timeout,
        connect_timeout=s.connect_timeout,
        max_connections=s.max_connections,
        max_connections_per_ip=s.max_connections_per_ip,
        max_handshakes=s.max_handshakes,
        proxy_senders=(AddressSet(s.proxy_senders()) if s.proxy_protocol != "off" else None),
    )


def build_policy(
    cfg: Config,
    http: httpx.AsyncClient | None = None,
    registry: HostnameRegistry | None = None,
) -> OnDemandPolicy:
    od = cfg.on_demand
    return OnDemandPolicy(
        http=http,
        registry=registry,
        registry_allows=od.registry,
        allow=od.allow,
        ask=od.ask,
        ask_timeout=od.ask_timeout,
        allow_ttl=od.allow_cache_ttl,
        deny_ttl=od.deny_cache_ttl,
    )


@dataclass
class Runtime:
    """The assembled parts of one process, exposed for the admin API and tests."""

    cfg: Config
    storage: Storage
    certs: CertificateManager
    challenges: ChallengeResponder
    proxy: Proxy
    issuer: Issuer
    hostnames: HostnameRegistry
    events: Events
    http_challenges: HttpChallenges
    admin_bound: tuple[str, int] | None = None
    http: HttpListener | None = None  # the plain-HTTP listener, when [http] listen is set
    managed: ManagedCertificates | None = None  # [[acme.managed]], issued by DNS-01


def load_static_certificates(cfg: Config) -> StaticCertificates:
    """The ``[[certificates]]``, and the check that ``tls.default_sni`` can be served at all.

    A default_sni no issuer can get a certificate for (``localhost``, an IP literal) and no
    static certificate covers would fail every client that sends no SNI with
    ``no_certificate:invalid_name``: refused here, so ``check`` and ``run`` say so up front.
    Raises ConfigError listing every problem.
    """
    try:
        static = StaticCertificates.load(
            [(c.cert, c.key) for c in cfg.certificates], session_tickets=cfg.tls.session_tickets
        )
    except ConfigError as exc:
        problems = exc.problems
        static = None
    else:
        problems = []
    name = cfg.tls.default_sni
    if name is not None and (static is None or static.match(name) is None):
        try:
            validate_hostname(name)
        except InvalidName as exc:
            problems.append(
                f"tls.default_sni: {name!r} can never get a certificate ({exc}) (use a full "
                "DNS name such as edge.example.net, or add a [[certificates]] entry covering it)"
            )
    if problems:
        raise ConfigError(problems)
    assert static is not None
    return static


def acme_limits(cfg: Config) -> Limits:
    lim = cfg.acme.limits
    return Limits(
        new_orders_per_account=lim.new_orders_per_account,
        certificates_per_registered_domain=lim.certificates_per_registered_domain,
        failed_validations_per_hostname=lim.failed_validations_per_hostname,
        duplicate_certificates=lim.duplicate_certificates,
    )


def build_budgets(cfg: Config, storage: Storage, issuer: Issuer) -> CaBudgets | None:
    """[acme.limits], counted under the (first) CA's account; none for the internal issuer."""
    if cfg.tls.issuer != "acme":
        return None
    return CaBudgets(storage, acme_limits(cfg), account=issuer.id, lock_ttl=cfg.storage.lock_ttl)


def assemble(cfg: Config, storage: Storage | None = None) -> Runtime:
    storage = storage or build_storage(cfg)
    refuse_unsafe_storage(storage)
    challenges = ChallengeResponder(storage)
    http_challenges = HttpChallenges(storage)
    # One view of the CA accounts' pauses, shared by the issuers and the manager.
    pauses = AccountPauses(storage)
    issuer = build_issuer(cfg, storage, challenges, http_challenges, pauses)
    static = load_static_certificates(cfg)
    hostnames = HostnameRegistry(storage, poll_interval=cfg.hostnames.poll_interval)
    events = build_events(cfg, storage)
    # One budget view for on-demand and managed orders: both go through the first CA's account.
    budgets = build_budgets(cfg, storage, issuer)
    managed = build_managed(cfg, storage, pauses, budgets)
    certs = CertificateManager(
        storage=storage,
        issuer=issuer,
        policy=build_policy(cfg, registry=hostnames),
        registry=hostnames,
        events=events,
        removal_grace=cfg.hostnames.removal_grace,
        static=static,
        managed=managed,
        default_sni=cfg.tls.default_sni,
        key_type=cfg.tls.key_type,
        wait=cfg.on_demand.wait,
        max_orders_per_minute=cfg.on_demand.max_orders_per_minute,
        backoff_max=cfg.on_demand.backoff_max,
        renew_interval=cfg.tls.maintenance_interval,
        session_tickets=cfg.tls.session_tickets,
        cache_size=cfg.tls.cache_size,
        per_domain_metrics=cfg.admin.per_domain_metrics,
        lock_ttl=cfg.storage.lock_ttl,
        listen_ports=[a.port for a in cfg.server.listen_addresses()],
        http_ports=[a.port for a in cfg.http.listen_addresses()],
        account_pauses=pauses,
        budgets=budgets,
    )
    tickets = TicketKeys(cfg.tls.ticket_key_rotation) if cfg.tls.session_tickets else None
    proxy = Proxy(proxy_settings(cfg), certs, challenges, tickets)
    rt = Runtime(cfg, storage, certs, challenges, proxy, issuer, hostnames, events, http_challenges)
    rt.managed = managed
    if cfg.http.listen:
        h = cfg.http
        mode = cfg.http_proxy_mode()
        rt.http = HttpListener(
            HttpSettings(
                proxy_protocol=mode,
                timeout=h.timeout,
                max_connections=h.max_connections,
                max_header_bytes=h.max_header_bytes,
                proxy_senders=AddressSet(cfg.http_proxy_senders()) if mode != "off" else None,
            ),
            key_authorization=http_challenges.key_authorization,
            serves=functools.partial(_serves, rt),
        )
    return rt


def _serves(rt: Runtime, name: str) -> bool:
    """May port 80 redirect ``name`` to HTTPS? Only a name with a route whose certificate
    this process has or may get without asking anyone (no ask request per HTTP request)."""
    return rt.proxy.settings.routes.match(name) is not None and rt.certs.may_serve(name)


def apply_reload(rt: Runtime, new: Config) -> None:
    """Swap what can change without restarting: routes, limits, policy."""
    rt.proxy.reload(proxy_settings(new))
    rt.certs.policy = build_policy(new, http=rt.certs.policy.http_client, registry=rt.hostnames)
    if rt.certs.budgets is not None:
        rt.certs.budgets.limits = acme_limits(new)
    rt.cfg = new


def raise_fd_limit(max_handshakes: int) -> int:
    """Soft ``RLIMIT_NOFILE`` up to the hard limit; warn when ``max_handshakes`` does not fit.

    Every connection before its ClientHello holds a descriptor, and shedding starts only at
    ``server.max_handshakes``: if descriptors run out first, accept fails (EMFILE) and every
    newcomer waits, which is the lock-out shedding exists to prevent. systemd's default soft
    limit (1024) is below the default ``max_handshakes`` (2000); the hard limit rarely is.
    Returns the soft limit in force. Called by the CLI and worker entry points only.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            log.warning("could not raise the descriptor limit from %d to %d: %s", soft, target, exc)
    # Listeners, storage, logs and upstream sockets of connections past their hello.
    margin = 100
    if soft < max_handshakes + margin:
        log.warning(
            "server.max_handshakes = %d but this process may open only %d descriptors: silent "
            "connections can use them all before shedding starts (raise LimitNOFILE / ulimit -n "
            "to at least %d, or lower max_handshakes)",
            max_handshakes,
            soft,
            max_handshakes + margin,
        )
    return soft


async def _freeze_loaded_registry(rt: Runtime) -> None:
    """A serving process froze its startup heap (``tune_gc_for_serving``), but the hostname
    registry loads after the start: 100,000 entries left in the collected generations made
    every full collection stall all handshakes ~130 ms (bench.hostnames). Freeze them too."""
    await rt.hostnames.wait_loaded()
    if gc.get_freeze_count():
        gc.collect()
        gc.freeze()


# Cached names are long-lived, a few garbage-collected objects each: left in the collected
# generations, 100,000 of them made one full collection cost ~260 ms of CPU (bench.fleet),
# a stall for every connection. Each time the cache has grown by a tenth, and by at least
# GC_FREEZE_STEP names, since the last freeze, a serving process collects once and freezes
# what survived. Geometric steps bound the number of freezes (about 40 up to 100,000 names),
# and so what they may keep of in-flight connections; a full cache under LRU churn does
# not grow.
GC_FREEZE_STEP = 1024
GC_FREEZE_CHECK = 5.0  # seconds between looks at the cache's size


def cache_freeze_due(cached: int, frozen_at: int) -> bool:
    """Has the cache grown enough since the last freeze (at ``frozen_at`` names)?"""
    return cached >= frozen_at + max(GC_FREEZE_STEP, frozen_at // 10)


async def _freeze_cache_growth(rt: Runtime) -> None:
    if not gc.get_freeze_count():
        return  # not a serving process (``tune_gc_for_serving``): tests share one process
    frozen_at = 0
    while True:
        await trio.sleep(GC_FREEZE_CHECK)
        cached = rt.certs.cached_count()
        if cache_freeze_due(cached, frozen_at):
            gc.collect()
            gc.freeze()
            frozen_at = cached


def tune_gc_for_serving() -> None:
    """Make the cyclic garbage collector cheaper for a long-running server process.

    Every connection allocates a few dozen short-lived container objects (tasks, scopes,
    outcomes); with the default gen-0 threshold (700) a busy worker collects hundreds of
    times a second, rescanning live connection state each time. Freezing what exists after
    startup (modules, config, contexts) keeps it out of every later full collection. Called
    by the CLI and worker entry points only: tests run many proxies in one process.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(10_000, 20, 20)


async def run_process(
    cfg: Config,
    *,
    config_path: Path | None = None,
    storage: Storage | None = None,
    on_ready: Callable[[Runtime], Awaitable[None]] | None = None,
    reuse_port: bool = False,
    task_status: trio.TaskStatus[Runtime] = trio.TASK_STATUS_IGNORED,
) -> None:
    rt = assemble(cfg, storage)
    try:
        listeners = await open_listeners(cfg.server.listen_addresses(), reuse_port=reuse_port)
    except OSError as exc:
        raise ConfigError(
            [f"server.listen: cannot listen ({exc.strerror}) (free the port or change it)"]
        ) from None
    try:
        http_listeners = await open_listeners(cfg.http.listen_addresses(), reuse_port=reuse_port)
    except OSError as exc:
        for sock in listeners:
            sock.close()
        raise ConfigError(
            [f"http.listen: cannot listen ({exc.strerror}) (free the port or change it)"]
        ) from None
    async with trio.open_nursery() as nursery:
        await nursery.start(rt.hostnames.run)
        nursery.start_soon(_freeze_loaded_registry, rt)
        nursery.start_soon(_freeze_cache_growth, rt)
        await nursery.start(rt.events.run)
        await nursery.start(rt.certs.run)
        if rt.managed is not None:
            await nursery.start(rt.managed.run)
        feed = rt.storage.capabilities.change_feed
        if feed is not None:
            feed.on_change(rt.certs.on_storage_change)
            feed.on_change(rt.hostnames.on_storage_change)
        if cfg.admin.listen:
            from .admin.server import serve_admin

            admin = secret_env.admin_secrets(cfg.admin)
            await nursery.start(functools.partial(serve_admin, rt, admin, reuse_port=reuse_port))
        await nursery.start(rt.proxy.serve, listeners)
        # Port 0 in the config (tests, demo): hints name the port actually bound.
        rt.certs.listen_ports = tuple(port for _, port in rt.proxy.bound)
        if rt.http is not None:
            await nursery.start(rt.http.serve, http_listeners)
            rt.certs.http_ports = tuple(port for _, port in rt.http.bound)
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            log.info(
                "edgeproxy listening on %s",
                ", ".join(str(a) for a in cfg.server.listen_addresses()),
            )
            task_status.started(rt)
            if on_ready is not None:
                await on_ready(rt)
            async for signum in signals:
                if signum == signal.SIGHUP:
                    _reload(rt, config_path)
                    continue
                log.info(
                    "received %s: draining (up to %.0fs)",
                    signal.Signals(signum).name,
                    rt.cfg.server.drain_timeout,
                )
                rt.proxy.stop_accepting()
                with trio.move_on_after(rt.cfg.server.drain_timeout) as scope:
                    await rt.proxy.wait_idle()
                if scope.cancelled_caught:
                    log.warning("drain timeout: closing %d remaining connections", rt.proxy.active)
                else:
                    log.info("drained; exiting")
                break
        nursery.cancel_scope.cancel()
    await rt.storage.aclose()


def _reload(rt: Runtime, config_path: Path | None) -> None:
    if config_path is None:
        log.warning("SIGHUP ignored: no config file to reload (demo mode)")
        return
    try:
        new = load_config(config_path)
    except ConfigError as exc:
        metrics.CONFIG_RELOADS.labels("rejected").inc()
        log.error("reload rejected, keeping the running config:\n  %s", "\n  ".join(exc.problems))
        return
    apply_reload(rt, new)
    metrics.CONFIG_RELOADS.labels("ok").inc()
    log.info("config reloaded from %s", config_path)
