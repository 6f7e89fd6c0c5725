"""The admin HTTP API as a plain ASGI 3 application: metrics, health, readiness, domain status.

Owns the admin endpoints: their routing table, bearer-token auth, status codes and JSON shapes.
It must not know which HTTP server runs it or how its socket is bound (``server.py`` does), nor
how the process is assembled: it sees the runtime only through the small protocols below, so a
unit test can drive it with a hand-made runtime and the real ``edgeproxy.app.Runtime`` fits too.

Every answer is built whole before the first byte is sent, so a failing handler still becomes a
clean 500 with a JSON body: the client never sees a traceback or a half-sent response.
"""

from __future__ import annotations

import builtins
import dataclasses
import hmac
import json
import logging
import os
import re
from collections.abc import Awaitable, Callable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import parse_qs

import trio
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

from ..certs.policy import Decision
from ..certs.record import iso, status_key
from ..certs.status import DomainStatus
from ..errors import StorageError
from ..names import InvalidName, normalize_name
from ..storage.base import StoredItem

log = logging.getLogger("edgeproxy.admin")

Scope = Mapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

#: How long ``/readyz`` waits for storage before calling the process not ready.
READY_STORAGE_TIMEOUT = 2.0
#: Parallel storage reads when collecting statuses other processes stored.
STATUS_READ_CONCURRENCY = 16

_STATUS_PREFIX = "status/"
_STATUS_SUFFIX = ".json"
_TIMESTAMP_FIELDS = ("not_after", "renew_at", "next_attempt", "updated_at")
_JSON = "application/json"


# ---------------------------------------------------------------------- what the app needs


class ProxyView(Protocol):
    @property
    def draining(self) -> bool: ...

    @property
    def bound(self) -> Sequence[tuple[str, int]]: ...


class PolicyView(Protocol):
    async def check(self, name: str, /) -> Decision: ...


class CertsView(Protocol):
    @property
    def policy(self) -> PolicyView: ...

    def statuses(self) -> list[DomainStatus]: ...

    def status(self, name: str, /) -> DomainStatus | None: ...

    async def obtain(self, name: str, /, *, force: bool = False) -> object:
        """The stored record on success, None when issuance failed (the status says why)."""


class StorageView(Protocol):
    async def get(self, key: str, /) -> bytes | None: ...

    # builtins.list: inside this class body the bare name means the method being defined.
    async def list(self, prefix: str = "", /) -> builtins.list[StoredItem]: ...


class AdminRuntime(Protocol):
    """The slice of ``edgeproxy.app.Runtime`` the admin API reads."""

    @property
    def storage(self) -> StorageView: ...

    @property
    def certs(self) -> CertsView: ...

    @property
    def proxy(self) -> ProxyView: ...


# ---------------------------------------------------------------------- requests and answers


@dataclass(frozen=True, slots=True)
class Request:
    method: str
    path: str
    query: Mapping[str, list[str]]
    headers: Mapping[bytes, bytes]  # lower-cased names; the first of repeated headers wins
    params: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    body: bytes
    content_type: str = _JSON
    headers: tuple[tuple[bytes, bytes], ...] = ()


def json_response(status: int, payload: object, *headers: tuple[bytes, bytes]) -> Response:
    body = json.dumps(payload, sort_keys=True, indent=1).encode() + b"\n"
    return Response(status, body, _JSON, headers)


def error_response(status: int, error: str, detail: str, **extra: object) -> Response:
    return json_response(status, {"error": error, "detail": detail, **extra})


def status_to_dict(st: DomainStatus, *, source: str) -> dict[str, object]:
    """A DomainStatus as JSON-ready dict: raw unix times plus ``*_iso`` UTC strings beside them.

    ``source`` says where it came from: ``process`` (this process's manager) or ``storage``
    (persisted by another process or replica, possibly older).
    """
    out: dict[str, object] = dataclasses.asdict(st)
    for key in _TIMESTAMP_FIELDS:
        value = out.get(key)
        out[f"{key}_iso"] = iso(value) if isinstance(value, int | float) else None
    window = st.ari_window
    out["ari_window"] = list(window) if window is not None else None
    out["ari_window_iso"] = [iso(window[0]), iso(window[1])] if window is not None else None
    out["source"] = source
    return out


def decision_to_dict(d: Decision) -> dict[str, object]:
    return {"allowed": d.allowed, "source": d.source, "reason": d.reason, "detail": d.detail}


# ---------------------------------------------------------------------- the application

Handler = Callable[["AdminApp", Request], Awaitable[Response]]


@dataclass(frozen=True, slots=True)
class Route:
    pattern: re.Pattern[str]
    methods: Mapping[str, Handler]
    needs_auth: bool = True


class AdminApp:
    """The ASGI callable; build it with ``make_admin_app``."""

    def __init__(self, rt: AdminRuntime, *, token: str | None) -> None:
        if token == "":
            # An empty secret would make every "Bearer " header valid: refuse it loudly.
            raise ValueError("admin token is empty: set a real token or none at all")
        self.rt = rt
        self._token = token.encode() if token is not None else None
        self._was_ready = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "lifespan":
            await _lifespan(receive, send)
            return
        if kind != "http":
            return  # websockets: nothing here speaks them; the server refuses the upgrade
        method = str(scope["method"]).upper()
        try:
            response = await self.handle(_request(scope, method))
        except Exception:
            log.exception("admin API: %s %s failed", method, scope.get("path", "?"))
            response = error_response(500, "internal", "the admin API hit an error; see the log")
        await _send(send, response, head=method == "HEAD")

    async def handle(self, req: Request) -> Response:
        for route in ROUTES:
            m = route.pattern.fullmatch(req.path)
            if m is None:
                continue
            if route.needs_auth and not self._authorized(req):
                return self._unauthorized()
            method = "GET" if req.method == "HEAD" else req.method
            handler = route.methods.get(method)
            if handler is None:
                allowed = sorted({*route.methods, *(["HEAD"] if "GET" in route.methods else [])})
                return json_response(
                    405,
                    {
                        "error": "method_not_allowed",
                        "detail": f"{req.method} is not allowed here",
                        "allowed": allowed,
                    },
                    (b"allow", ", ".join(allowed).encode()),
                )
            return await handler(self, dataclasses.replace(req, params=m.groupdict()))
        if not self._authorized(req):
            # Unknown paths answer 401 too without a token, so probing cannot map the API.
            return self._unauthorized()
        return error_response(404, "not_found", f"no admin endpoint at {req.path}")

    def _authorized(self, req: Request) -> bool:
        if self._token is None:
            return True
        scheme, _, credentials = req.headers.get(b"authorization", b"").partition(b" ")
        if scheme.lower() != b"bearer":
            return False
        # Constant time: the comparison must not reveal how much of a guessed token was right.
        return hmac.compare_digest(credentials.strip(), self._token)

    @staticmethod
    def _unauthorized() -> Response:
        return json_response(
            401,
            {"error": "unauthorized", "detail": "send 'Authorization: Bearer <admin token>'"},
            (b"www-authenticate", b'Bearer realm="edgeproxy-admin"'),
        )

    # ------------------------------------------------------------------ endpoints

    async def healthz(self, req: Request) -> Response:
        return Response(200, b"ok\n", "text/plain; charset=utf-8")

    async def readyz(self, req: Request) -> Response:
        proxy = self.rt.proxy
        if proxy.draining:
            return json_response(
                503,
                {
                    "ready": False,
                    "reason": "draining",
                    "detail": "the process is draining connections before exit",
                },
            )
        if not proxy.bound:
            return json_response(
                503,
                {
                    "ready": False,
                    "reason": "not_listening",
                    "detail": "no proxy listener is bound yet",
                },
            )
        problem: tuple[str, str] | None = None
        try:
            with trio.move_on_after(READY_STORAGE_TIMEOUT) as scope:
                await self.rt.storage.list(_STATUS_PREFIX)
        except StorageError as exc:
            problem = ("storage_error", str(exc))
        else:
            if scope.cancelled_caught:
                detail = f"storage did not answer within {READY_STORAGE_TIMEOUT:g}s"
                problem = ("storage_timeout", detail)
        if problem is None:
            self._was_ready = True
            return json_response(200, {"ready": True, "listeners": [list(a) for a in proxy.bound]})
        if self._was_ready:
            # Storage is needed to start, not to serve: cached certificates keep working.
            # Turning every replica unready during a database blip would take the whole
            # edge out of the load balancer, an outage made by the health check itself.
            return json_response(
                200,
                {
                    "ready": True,
                    "degraded": problem[0],
                    "detail": problem[1] + " (serving cached certificates; new names wait)",
                    "listeners": [list(a) for a in proxy.bound],
                },
            )
        return json_response(503, {"ready": False, "reason": problem[0], "detail": problem[1]})

    async def metrics(self, req: Request) -> Response:
        multiproc_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        if multiproc_dir:
            # Worker processes each write their own files there; reading them is disk work.
            body = await trio.to_thread.run_sync(_collect_multiprocess, multiproc_dir)
        else:
            body = generate_latest(REGISTRY)
        return Response(200, body, CONTENT_TYPE_LATEST)

    async def list_domains(self, req: Request) -> Response:
        local = self.rt.certs.statuses()
        seen = {st.name for st in local}
        out = [status_to_dict(st, source="process") for st in local]
        headers: list[tuple[bytes, bytes]] = []
        try:
            stored = await self._stored_statuses(exclude=seen)
        except StorageError as exc:
            # The operator still gets what this process knows; the header says it is partial.
            log.warning("admin API: cannot list stored statuses: %s", exc)
            headers.append((b"edgeproxy-partial", b"storage unavailable"))
            stored = []
        out.extend(status_to_dict(st, source="storage") for st in stored)
        out.sort(key=lambda d: str(d["name"]))
        return json_response(200, out, *headers)

    async def get_domain(self, req: Request) -> Response:
        name = _normalized(req.params["name"])
        if isinstance(name, Response):
            return name
        st = self.rt.certs.status(name)
        if st is not None:
            return json_response(200, status_to_dict(st, source="process"))
        try:
            stored = await self._read_stored_status(name)
        except StorageError as exc:
            return error_response(503, "storage_error", str(exc), name=name)
        if stored is None:
            return error_response(
                404, "unknown_domain", f"no status recorded for {name}", name=name
            )
        return json_response(200, status_to_dict(stored, source="storage"))

    async def issue(self, req: Request) -> Response:
        name = _normalized(req.params["name"])
        if isinstance(name, Response):
            return name
        certs = self.rt.certs
        decision = await certs.policy.check(name)
        if not decision.allowed:
            return json_response(
                403,
                {
                    "error": "denied",
                    "detail": decision.detail or decision.reason,
                    "name": name,
                    "decision": decision_to_dict(decision),
                },
            )
        force = _truthy(req.query.get("force", [""])[-1])
        record = await certs.obtain(name, force=force)
        st = certs.status(name)
        payload = status_to_dict(st, source="process") if st is not None else {"name": name}
        return json_response(200 if record is not None else 502, payload)

    # ------------------------------------------------------------------ stored statuses

    async def _stored_statuses(self, *, exclude: set[str]) -> list[DomainStatus]:
        items = await self.rt.storage.list(_STATUS_PREFIX)
        names = [n for it in items if (n := _status_name(it.key)) is not None and n not in exclude]
        found: dict[str, DomainStatus] = {}
        limiter = trio.CapacityLimiter(STATUS_READ_CONCURRENCY)

        async def read(n: str) -> None:
            async with limiter:
                try:
                    st = await self._read_stored_status(n)
                except StorageError as exc:
                    log.info("admin API: cannot read stored status for %s: %s", n, exc)
                    return
            if st is not None:
                found[n] = st

        async with trio.open_nursery() as nursery:
            for n in names:
                nursery.start_soon(read, n)
        return [found[n] for n in names if n in found]

    async def _read_stored_status(self, name: str) -> DomainStatus | None:
        try:
            key = status_key(name)
            raw = await self.rt.storage.get(key)
        except ValueError:
            return None  # not a name storage could hold (check_key refused it)
        if raw is None:
            return None
        try:
            st = DomainStatus.from_json(raw)
        except (ValueError, TypeError) as exc:
            log.warning("admin API: stored status %s is unreadable (%s); skipped", key, exc)
            return None
        return st if st.name == name else None


def make_admin_app(rt: AdminRuntime, *, token: str | None) -> ASGIApp:
    """The admin ASGI app for ``rt``; with ``token`` set, all but ``/healthz`` need it."""
    return AdminApp(rt, token=token)


_NAME = r"(?P<name>[^/]+)"

ROUTES: tuple[Route, ...] = (
    Route(re.compile(r"/healthz"), {"GET": AdminApp.healthz}, needs_auth=False),
    Route(re.compile(r"/readyz"), {"GET": AdminApp.readyz}),
    Route(re.compile(r"/metrics"), {"GET": AdminApp.metrics}),
    Route(re.compile(r"/v1/domains"), {"GET": AdminApp.list_domains}),
    Route(re.compile(rf"/v1/domains/{_NAME}"), {"GET": AdminApp.get_domain}),
    Route(re.compile(rf"/v1/domains/{_NAME}/issue"), {"POST": AdminApp.issue}),
)


# ---------------------------------------------------------------------- helpers


def _request(scope: Scope, method: str) -> Request:
    headers: dict[bytes, bytes] = {}
    for k, v in scope.get("headers", ()):
        headers.setdefault(bytes(k).lower(), bytes(v))
    query = parse_qs(bytes(scope.get("query_string", b"")).decode("latin-1"))
    return Request(method=method, path=str(scope["path"]), query=query, headers=headers)


def _normalized(raw: str) -> str | Response:
    try:
        return normalize_name(raw)
    except InvalidName as exc:
        return error_response(400, "invalid_name", f"{raw!r} is not a server name: {exc}")


def _status_name(key: str) -> str | None:
    if not (key.startswith(_STATUS_PREFIX) and key.endswith(_STATUS_SUFFIX)):
        return None
    name = key[len(_STATUS_PREFIX) : -len(_STATUS_SUFFIX)]
    return name or None


def _truthy(value: str) -> bool:
    return value.lower() in {"1", "true", "yes", "on"}


def _collect_multiprocess(path: str) -> bytes:
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=path)  # type: ignore[no-untyped-call]
    return bytes(generate_latest(registry))


async def _send(send: Send, response: Response, *, head: bool) -> None:
    headers = [
        (b"content-type", response.content_type.encode()),
        (b"content-length", str(len(response.body)).encode()),
        (b"cache-control", b"no-store"),
        *response.headers,
    ]
    await send({"type": "http.response.start", "status": response.status, "headers": headers})
    await send({"type": "http.response.body", "body": b"" if head else response.body})


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
