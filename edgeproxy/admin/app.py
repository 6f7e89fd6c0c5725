"""The admin HTTP API, an ASGI application on FastAPI: metrics, health, readiness, domain status,
the CA accounts' pauses, and (from ``hostnames.py``) the hostname registry with its OpenAPI
document.

Owns the admin endpoints: their routing table, bearer-token auth, status codes and JSON shapes.
Routing is FastAPI's (``_build_api``); the handlers of the first endpoints keep their small
``Request``/``Response`` types and are adapted (``_legacy``), the trust checks below run as the
first step of every route (``_gate`` for the FastAPI-native ones), and routing's own 404/405
are answered only after the token check (``_http_error``).
It must not know which HTTP server runs it or how its socket is bound (``server.py`` does), nor
how the process is assembled: it sees the runtime only through the small protocols below, so a
unit test can drive it with a hand-made runtime and the real ``edgeproxy.app.Runtime`` fits too.

Every answer is built whole before the first byte is sent, so a failing handler still becomes a
clean 500 with a JSON body: the client never sees a traceback or a half-sent response.

Trust boundaries, checked in this order for every request:

1. *DNS rebinding.* Without an admin token only loopback may reach the API, but a web page can
   make its own hostname resolve to 127.0.0.1 and then talk to us as "same origin". Its
   requests still carry that hostname in ``Host``, so a tokenless admin answers only requests
   whose ``Host`` is a loopback name or address (``_loopback_host``).
2. *Tokens.* ``admin.token`` grants everything; ``admin.metrics_token`` grants the read-only
   monitoring routes (``/metrics``, ``/readyz``, ``/healthz``) and is refused elsewhere (403), so
   Prometheus never holds a secret that can order certificates.
3. *Cross-site requests.* A browser sends a "simple" cross-site POST (form or ``text/plain``
   body) without asking first, and the tokenless loopback admin cannot tell it apart from
   curl. State-changing requests (anything but GET/HEAD/OPTIONS) are refused when their
   ``Origin`` is not ours or ``Sec-Fetch-Site`` says another site, and they must carry either
   a JSON content type or the ``Edgeproxy-Request`` header: both force a browser to ask first
   with a CORS preflight, which this API never grants (``_cross_site_refusal``).
"""

from __future__ import annotations

import builtins
import dataclasses
import enum
import hmac
import json
import logging
import math
import os
import time
from collections.abc import Awaitable, Callable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Protocol, cast
from urllib.parse import parse_qs

import trio
from fastapi import Depends, FastAPI
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request as StarletteRequest
from starlette.responses import Response as StarletteResponse

from ..addresses import is_loopback_host
from ..certs import status_store
from ..certs.policy import Decision
from ..certs.record import iso
from ..certs.status import DomainStatus
from ..errors import OrderLimited, StorageError
from ..issuers.account_pause import stored_pauses
from ..names import InvalidName, validate_hostname
from ..storage.base import StoredItem
from .hostnames import (
    MAX_BODY,
    hostnames_router,
    http_problem,
    install_problem_handlers,
    is_hostnames_path,
    problem_response,
    storage_problem,
)

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

_TIMESTAMP_FIELDS = ("not_after", "renew_at", "next_attempt", "updated_at")
_JSON = "application/json"
#: The header operators and scripts send with state-changing requests (any non-empty value).
CUSTOM_HEADER = "Edgeproxy-Request"
_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
_SAME_SITE_FETCH = frozenset({b"same-origin", b"none"})


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

    async def issue_now(self, name: str, /, *, force: bool = False) -> object:
        """The stored record on success, None when issuance failed (the status says why);
        raises OrderLimited when the order rate limit or the name's backoff says not now."""


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


class Access(enum.IntEnum):
    """What a request's credentials grant; a route names the least it needs."""

    NONE = 0
    METRICS = 1  # admin.metrics_token: read-only monitoring
    ADMIN = 2  # admin.token, or no token configured


class AdminApp:
    """The ASGI callable; build it with ``make_admin_app``. Host check, body limit, HEAD and
    the last-resort 500 are here; everything else is the FastAPI app's."""

    def __init__(
        self, rt: AdminRuntime, *, token: str | None, metrics_token: str | None = None
    ) -> None:
        if token == "" or metrics_token == "":
            # An empty secret would make every "Bearer " header valid: refuse it loudly.
            raise ValueError("admin token is empty: set a real token or none at all")
        if metrics_token is not None and (token is None or metrics_token == token):
            # Without a distinct admin token the metrics token would guard nothing.
            raise ValueError("the metrics token needs an admin token different from it")
        self.rt = rt
        self._token = token.encode() if token is not None else None
        self._metrics_token = metrics_token.encode() if metrics_token is not None else None
        self._was_ready = False
        self._api = self._build_api()
        # The status page (``ui.py``), built on first use (Jinja2 and templates load then).
        self._ui: Any = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "lifespan":
            await _lifespan(receive, send)
            return
        if kind != "http":
            return  # websockets: nothing here speaks them; the server refuses the upgrade
        method = str(scope["method"]).upper()
        req = _request(scope, method)
        head = method == "HEAD"
        if self._token is None and not _loopback_host(req):
            await _send(send, _foreign_host(req), head=head)
            return
        if req.path == "/ui" or req.path.startswith("/ui/"):
            # The page signs its users in itself (token form, session cookie); the Host check
            # against DNS rebinding above is the API's, here as everywhere.
            await self._status_page()(dict(scope), receive, send)
            return
        if is_hostnames_path(req.path):
            length = req.headers.get(b"content-length", b"0")
            if not length.isdigit() or int(length) > MAX_BODY:
                detail = f"bodies are limited to {MAX_BODY} bytes (Content-Length {length!r})"
                await problem_response("body-too-large", detail, 413, req.path)(
                    dict(scope), receive, send
                )
                return
        started = False

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                message = {**message, "headers": [*message.get("headers", ()), _NO_STORE]}
            elif head and message["type"] == "http.response.body":
                message = {**message, "body": b""}  # content-length stays: HEAD is GET's head
            await send(message)

        try:
            await self._api(dict(scope), receive, guarded_send)
        except Exception:
            # Starlette has answered 500 with our JSON (``_internal``) and re-raises: log once.
            log.exception("admin API: %s %s failed", method, req.path)
            if not started:
                await _send(send, _internal(), head=head)

    # ------------------------------------------------------------------ routing (FastAPI)

    def _build_api(self) -> FastAPI:
        api = FastAPI(
            title="edgeproxy admin API",
            version="1",
            openapi_url=None,  # served by the hostnames router, behind the trust checks
            docs_url=None,
            redoc_url=None,
            description="Customer hostnames: register, inspect, change and remove. Errors of "
            "/v1/hostnames are RFC 9457 problem documents (application/problem+json).",
        )
        api.router.redirect_slashes = False  # "/healthz/" is not an endpoint, not a redirect
        for path, methods, handler, needs in LEGACY_ROUTES:
            api.add_api_route(path, self._legacy(handler, needs), methods=list(methods),
                              include_in_schema=False)  # fmt: skip
        gate = Depends(self._gate(Access.ADMIN))
        api.include_router(
            hostnames_router(cast(Any, self.rt), lambda: api.openapi(), dependencies=[gate])
        )
        install_problem_handlers(api)
        api.add_exception_handler(_Refused, _refused)  # type: ignore[arg-type]
        api.add_exception_handler(StarletteHTTPException, self._http_error)  # type: ignore[arg-type]
        api.add_exception_handler(StorageError, _storage_error)  # type: ignore[arg-type]
        api.add_exception_handler(Exception, lambda request, exc: _starlette(_internal()))
        return api

    def _status_page(self) -> ASGIApp:
        if self._ui is None:
            from .ui import make_ui

            rt = cast(Any, self.rt)  # the real Runtime: registry mirror and config too
            token = self._token.decode() if self._token is not None else None
            self._ui = make_ui(rt, token=token, doctor=partial(_doctor, rt))
        return cast(ASGIApp, self._ui)

    def _refusal(self, req: Request, needs: Access) -> Response | None:
        """Token, then cross-site: the trust checks after routing (``__call__`` did Host)."""
        access = self._access(req)
        if access < needs:
            return self._unauthorized() if access is Access.NONE else _forbidden(req)
        return _cross_site_refusal(req)

    def _gate(self, needs: Access) -> Callable[[StarletteRequest], Awaitable[None]]:
        async def gate(request: StarletteRequest) -> None:
            refusal = self._refusal(_request(request.scope, request.method), needs)
            if refusal is not None:
                raise _Refused(refusal)

        return gate

    def _legacy(self, handler: Handler, needs: Access) -> Callable[..., Awaitable[object]]:
        async def endpoint(request: StarletteRequest) -> StarletteResponse:
            req = dataclasses.replace(
                _request(request.scope, request.method.upper()), params=request.path_params
            )
            refusal = self._refusal(req, needs)
            return _starlette(refusal or await handler(self, req))

        return endpoint

    async def _http_error(
        self, request: StarletteRequest, exc: StarletteHTTPException
    ) -> StarletteResponse:
        """Routing's 404 and 405: after the token check, so probing cannot map the API."""
        req = _request(request.scope, request.method.upper())
        access = self._access(req)
        needs = _PATH_NEEDS.get(req.path, Access.ADMIN)
        if access < needs:
            return _starlette(self._unauthorized() if access is Access.NONE else _forbidden(req))
        if is_hostnames_path(req.path):
            return http_problem(request, exc)
        if exc.status_code == 405:
            allow = (exc.headers or {}).get("Allow", "")
            allowed = sorted({m.strip() for m in allow.split(",") if m.strip()})
            return _starlette(json_response(
                405,
                {"error": "method_not_allowed", "detail": f"{req.method} is not allowed here",
                 "allowed": allowed},
                (b"allow", ", ".join(allowed).encode()),
            ))  # fmt: skip
        if exc.status_code == 404:
            return _starlette(error_response(404, "not_found", f"no admin endpoint at {req.path}"))
        return _starlette(error_response(exc.status_code, "http_error", str(exc.detail)))

    def _access(self, req: Request) -> Access:
        if self._token is None:
            return Access.ADMIN
        scheme, _, credentials = req.headers.get(b"authorization", b"").partition(b" ")
        if scheme.lower() != b"bearer":
            return Access.NONE
        presented = credentials.strip()
        # Constant time: the comparison must not reveal how much of a guessed token was right.
        if hmac.compare_digest(presented, self._token):
            return Access.ADMIN
        if self._metrics_token is not None and hmac.compare_digest(
            presented, self._metrics_token
        ):
            return Access.METRICS
        return Access.NONE

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
                await status_store.listed(self.rt.storage)
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

    async def acme_accounts(self, req: Request) -> Response:
        """The CA accounts' pauses after a rateLimited, as storage holds them for every
        replica."""
        try:
            pauses = await stored_pauses(self.rt.storage, time.time())
        except StorageError as exc:
            return error_response(503, "storage_error", str(exc))
        return json_response(200, {"accounts": pauses})

    async def get_domain(self, req: Request) -> Response:
        raw = req.params["name"]
        # A managed wildcard certificate's status is kept under its first name, "*.example.net".
        wildcard = raw.startswith("*.")
        name = _normalized(raw[2:] if wildcard else raw)
        if isinstance(name, Response):
            return name
        if wildcard:
            name = f"*.{name}"
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
        try:
            record = await certs.issue_now(name, force=force)
        except OrderLimited as exc:
            retry = max(1, math.ceil(min(exc.retry_after, 86400.0)))
            return json_response(
                429,
                {
                    "error": "rate_limited",
                    "limit": exc.limit,
                    "detail": exc.detail,
                    "retry_after": retry,
                    "name": name,
                },
                (b"retry-after", str(retry).encode()),
            )
        st = certs.status(name)
        payload = status_to_dict(st, source="process") if st is not None else {"name": name}
        return json_response(200 if record is not None else 502, payload)

    # ------------------------------------------------------------------ stored statuses

    async def _stored_statuses(self, *, exclude: set[str]) -> list[DomainStatus]:
        listed = await status_store.listed(self.rt.storage)
        names = [n for n, _ in listed if n not in exclude]
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
            return await status_store.read(self.rt.storage, name)
        except status_store.UnreadableStatus as exc:
            key = status_store.status_key(name)
            log.warning("admin API: stored status %s is unreadable (%s); skipped", key, exc)
            return None
        except ValueError:
            return None  # not a name storage could hold (check_key refused it)


def make_admin_app(
    rt: AdminRuntime, *, token: str | None, metrics_token: str | None = None
) -> ASGIApp:
    """The admin ASGI app for ``rt``; with ``token`` set, all but ``/healthz`` need it.

    ``metrics_token`` (only with ``token``) grants ``/metrics`` and ``/readyz`` and nothing else.
    """
    return AdminApp(rt, token=token, metrics_token=metrics_token)


#: The endpoints kept from the first admin API: (path, methods, handler, least access).
LEGACY_ROUTES: tuple[tuple[str, tuple[str, ...], Handler, Access], ...] = (
    ("/healthz", ("GET", "HEAD"), AdminApp.healthz, Access.NONE),
    ("/readyz", ("GET", "HEAD"), AdminApp.readyz, Access.METRICS),
    ("/metrics", ("GET", "HEAD"), AdminApp.metrics, Access.METRICS),
    ("/v1/domains", ("GET", "HEAD"), AdminApp.list_domains, Access.ADMIN),
    ("/v1/domains/{name}", ("GET", "HEAD"), AdminApp.get_domain, Access.ADMIN),
    ("/v1/domains/{name}/issue", ("POST",), AdminApp.issue, Access.ADMIN),
    ("/v1/acme/accounts", ("GET", "HEAD"), AdminApp.acme_accounts, Access.ADMIN),
)
_PATH_NEEDS = {path: needs for path, _, _, needs in LEGACY_ROUTES if "{" not in path}
_NO_STORE = (b"cache-control", b"no-store")


class _Refused(Exception):
    """A trust check refused the request; the response says why."""

    def __init__(self, response: Response) -> None:
        super().__init__(response.status)
        self.response = response


async def _refused(request: StarletteRequest, exc: _Refused) -> StarletteResponse:
    return _starlette(exc.response)


async def _storage_error(request: StarletteRequest, exc: StorageError) -> StarletteResponse:
    if is_hostnames_path(request.url.path):
        return storage_problem(request, exc)
    log.warning("admin API: storage failed: %s", exc)
    return _starlette(error_response(503, "storage_error", str(exc)))


def _internal() -> Response:
    return error_response(500, "internal", "the admin API hit an error; see the log")


def _starlette(response: Response) -> StarletteResponse:
    headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in response.headers}
    return StarletteResponse(response.body, response.status, headers, response.content_type)


# ---------------------------------------------------------------------- trust boundaries


def _loopback_host(req: Request) -> bool:
    """Whether ``Host`` names this machine's loopback (or is absent: no browser omits it)."""
    raw = req.headers.get(b"host")
    if raw is None:
        return True
    host = raw.decode("latin-1").strip().lower()
    if host.startswith("["):
        host = host[1:].partition("]")[0]
    elif host.count(":") == 1:
        host = host.partition(":")[0]
    return is_loopback_host(host.removesuffix("."))


def _foreign_host(req: Request) -> Response:
    host = req.headers.get(b"host", b"").decode("latin-1")
    return error_response(
        403,
        "foreign_host",
        f"Host {host!r} is not a loopback name: without an admin token this API only answers "
        "requests addressed to localhost, 127.0.0.1 or [::1] (a web page using DNS rebinding "
        "sends its own name). Use http://127.0.0.1:PORT, or set admin.token.",
    )


def _cross_site_refusal(req: Request) -> Response | None:
    """Why a state-changing request may come from a web page, or None when it cannot."""
    if req.method in _SAFE_METHODS:
        return None
    origin = req.headers.get(b"origin")
    if origin is not None and not _own_origin(origin, req.headers.get(b"host")):
        return _cross_site(f"its Origin {origin.decode('latin-1')!r} is not this admin API")
    fetch_site = req.headers.get(b"sec-fetch-site")
    if fetch_site is not None and fetch_site.strip().lower() not in _SAME_SITE_FETCH:
        return _cross_site(f"Sec-Fetch-Site says {fetch_site.decode('latin-1')!r}")
    if not (req.headers.get(CUSTOM_HEADER.lower().encode(), b"").strip() or _json_body(req)):
        return _cross_site(
            f"it has neither a JSON Content-Type nor the {CUSTOM_HEADER} header, "
            "so a web page could have sent it"
        )
    return None


def _own_origin(origin: bytes, host: bytes | None) -> bool:
    # The API may sit behind a TLS-terminating proxy, so both schemes name our own origin.
    if host is None:
        return False
    o, h = origin.strip().lower(), host.strip().lower()
    return o in (b"http://" + h, b"https://" + h)


def _json_body(req: Request) -> bool:
    mime = req.headers.get(b"content-type", b"").partition(b";")[0].strip().lower()
    return mime == _JSON.encode() or (mime.startswith(b"application/") and mime.endswith(b"+json"))


def _cross_site(why: str) -> Response:
    return error_response(
        403,
        "cross_site_request",
        f"refused: {why}. Send state-changing requests from a script or the CLI with the "
        f"header '{CUSTOM_HEADER}: 1' (or a JSON body with 'Content-Type: application/json') "
        "and without an Origin of another site.",
    )


def _forbidden(req: Request) -> Response:
    return error_response(
        403,
        "forbidden",
        f"the metrics token grants only GET /metrics, /readyz and /healthz, not "
        f"{req.method} {req.path}: send the admin token",
    )


# ---------------------------------------------------------------------- helpers


def _request(scope: Scope, method: str) -> Request:
    headers: dict[bytes, bytes] = {}
    for k, v in scope.get("headers", ()):
        headers.setdefault(bytes(k).lower(), bytes(v))
    query = parse_qs(bytes(scope.get("query_string", b"")).decode("latin-1"))
    return Request(method=method, path=str(scope["path"]), query=query, headers=headers)


def _normalized(raw: str) -> str | Response:
    # The full hostname check, not just normalisation: the path is decoded (%0a is a newline),
    # and nothing that could not be an SNI may reach the allow-check, the ask endpoint or a
    # storage key.
    try:
        return validate_hostname(raw)
    except InvalidName as exc:
        return error_response(400, "invalid_name", f"{raw!r} is not a server name: {exc}")


def _truthy(value: str) -> bool:
    return value.lower() in {"1", "true", "yes", "on"}


async def _doctor(rt: Any, name: str) -> object:
    """``edgeproxy doctor NAME`` for the status page's button, with this process's config."""
    from ..doctor import diagnose

    cfg = rt.cfg
    return await diagnose(
        name,
        targets=list(cfg.onboarding.target),
        storage=rt.storage,
        proxy_protocol=cfg.server.proxy_protocol,
    )


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
