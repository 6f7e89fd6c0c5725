"""``/v1/hostnames``: the customer hostname registry's HTTP API, on FastAPI (ASGI, anyio on trio).

Owns the endpoints' shapes, status codes and problem documents (RFC 9457,
``application/problem+json``) and the OpenAPI document at ``/v1/openapi.json``. It does not
authenticate: ``app.AdminApp`` applies the admin API's trust rules (Host, token, cross-site)
before handing a request over, so every rule lives in one place for every endpoint.

Request bodies are pydantic models (unknown fields refused); hostname, upstream and metadata
rules are ``hostnames.entries``, shared with the CLI. A change is written to storage, then
applied to this process's registry mirror at once (other processes follow through the change
feed within ``[hostnames] poll_interval``).
"""

from __future__ import annotations

import builtins
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, Protocol, get_args

import trio
from fastapi import APIRouter, FastAPI, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..acme.jws import b64url, b64url_decode
from ..certs import status_store
from ..certs.record import CertRecord, RecordError, cert_key, iso
from ..certs.status import DomainStatus
from ..errors import StorageError
from ..hostnames.entries import BadEntry, decode_metadata, encode_metadata, parse_hostname
from ..hostnames.entries import parse_upstream as check_upstream
from ..storage.base import HostnameEntry

log = logging.getLogger("edgeproxy.admin")

PROBLEM_JSON = "application/problem+json"
#: Problem type URIs: this prefix plus the problem's kind (RFC 9457 s3.1.1, a tag URI).
PROBLEM_BASE = "tag:edgeproxy.net,2026:problem/"
#: Largest request body accepted; metadata is at most 4 KiB, the rest is a few short fields.
MAX_BODY = 64 * 1024
#: Parallel storage reads when describing a page of hostnames.
READ_CONCURRENCY = 16

# rate_limited: waiting for an [acme.limits] budget, ordered at its next_attempt;
# account_paused: waiting for the CA account's pause after a rateLimited, likewise.
State = Literal[
    "pending", "issuing", "active", "failing", "rate_limited", "account_paused", "denied",
    "removed",
]
STATES: tuple[str, ...] = get_args(State)

_TITLES = {
    "invalid-hostname": "Invalid hostname",
    "ip-literal": "IP address instead of a hostname",
    "invalid-upstream": "Invalid upstream",
    "invalid-metadata": "Invalid metadata",
    "metadata-too-large": "Metadata too large",
    "unknown-hostname": "Unknown hostname",
    "invalid-body": "Invalid request body",
    "body-too-large": "Request body too large",
    "invalid-query": "Invalid query parameter",
    "not-found": "Not found",
    "method-not-allowed": "Method not allowed",
    "storage-unavailable": "Storage unavailable",
}
_STATUS = {"metadata-too-large": 413, "body-too-large": 413, "unknown-hostname": 404,
           "not-found": 404, "method-not-allowed": 405, "storage-unavailable": 503}  # fmt: skip


# ---------------------------------------------------------------------- what the API needs


class HostnameStorage(Protocol):
    async def get(self, key: str, /) -> bytes | None: ...

    async def add_hostname(self, entry: HostnameEntry, /) -> tuple[HostnameEntry, bool]: ...

    async def get_hostname(self, hostname: str, /) -> HostnameEntry | None: ...

    async def update_hostname(self, entry: HostnameEntry, /) -> bool: ...

    async def remove_hostname(self, hostname: str, at: float, /) -> HostnameEntry | None: ...

    async def list_hostnames(
        self, *, after: str | None = None, limit: int = 100
    ) -> builtins.list[HostnameEntry]: ...


class HostnameCerts(Protocol):
    def status(self, name: str, /) -> DomainStatus | None: ...

    def start_issue(self, name: str, /) -> None: ...


class HostnameMirror(Protocol):
    def apply(self, name: str, entry: HostnameEntry | None, /) -> None: ...


class HostnameEvents(Protocol):
    async def publish(self, kind: str, subject: str, data: Mapping[str, object], /) -> None: ...


class HostnamesRuntime(Protocol):
    @property
    def storage(self) -> HostnameStorage: ...

    @property
    def certs(self) -> HostnameCerts: ...

    @property
    def hostnames(self) -> HostnameMirror: ...

    @property
    def events(self) -> HostnameEvents: ...


# ---------------------------------------------------------------------- models


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class HostnameCreate(_Body):
    hostname: str = Field(description="DNS name; normalised (lower case, A-labels, no dot)")
    upstream: str | None = Field(None, description='"host:port" overriding the SNI routes')
    metadata: dict[str, Any] | None = Field(None, description="JSON object, at most 4 KiB")
    issue: bool = Field(True, description="start issuance now (false: at the first visitor)")


class HostnamePatch(_Body):
    upstream: str | None = Field(None, description='"host:port", or null for the SNI routes')
    metadata: dict[str, Any] | None = Field(None, description="replaces the metadata")


class Certificate(BaseModel):
    not_after: str
    issuer: str
    serial: str
    renewal_at: str | None
    renewal_source: str | None


class LastError(BaseModel):
    type: str
    detail: str
    hint: str | None
    at: str | None


class Hostname(BaseModel):
    hostname: str
    upstream: str | None
    metadata: dict[str, Any]
    created_at: str
    removed_at: str | None
    state: State
    certificate: Certificate | None
    last_error: LastError | None


class HostnameList(BaseModel):
    items: list[Hostname]
    next_cursor: str | None


class Problem(BaseModel):
    type: str
    title: str
    status: int
    detail: str
    instance: str | None = None


# ---------------------------------------------------------------------- problems


class ProblemError(Exception):
    def __init__(self, kind: str, detail: str, status: int | None = None) -> None:
        super().__init__(detail)
        self.kind, self.detail = kind, detail
        self.status = status or _STATUS.get(kind, 400)


def problem_response(
    kind: str, detail: str, status: int, instance: str | None = None
) -> JSONResponse:
    body = {
        "type": PROBLEM_BASE + kind,
        "title": _TITLES.get(kind, kind.replace("-", " ").capitalize()),
        "status": status,
        "detail": detail,
    }
    if instance is not None:
        body["instance"] = instance
    return JSONResponse(body, status_code=status, media_type=PROBLEM_JSON)


def _validation_detail(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "body"
        msg = str(err.get("msg", "invalid"))
        if err.get("type") == "extra_forbidden":
            msg = "unknown field (allowed: hostname, upstream, metadata, issue)"
        parts.append(f"{loc}: {msg}")
    return "; ".join(parts)


# ---------------------------------------------------------------------- the API


def is_hostnames_path(path: str) -> bool:
    """Paths this module answers (its errors are problem documents)."""
    return path == "/v1/hostnames" or path.startswith("/v1/hostnames/") or path == OPENAPI_PATH


OPENAPI_PATH = "/v1/openapi.json"
PROBLEMS: dict[int | str, dict[str, Any]] = {
    400: {"model": Problem, "description": "invalid input (problem document)"},
    404: {"model": Problem, "description": "unknown hostname (problem document)"},
}


def install_problem_handlers(api: FastAPI) -> None:
    """Problem documents for what FastAPI itself refuses on this module's paths."""

    @api.exception_handler(ProblemError)
    async def _problem(request: Request, exc: ProblemError) -> JSONResponse:
        return problem_response(exc.kind, exc.detail, exc.status, request.url.path)

    @api.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        where = "query" if any(e.get("loc", ("",))[0] == "query" for e in exc.errors()) else None
        kind = "invalid-query" if where else "invalid-body"
        return problem_response(kind, _validation_detail(exc), 400, request.url.path)


def http_problem(request: Request, exc: StarletteHTTPException) -> Response:
    """A 404/405 that routing answered on one of this module's paths, as a problem document."""
    kind = {404: "not-found", 405: "method-not-allowed"}.get(exc.status_code, "error")
    detail = f"{request.method} {request.url.path}: {exc.detail}"
    response = problem_response(kind, detail, exc.status_code, request.url.path)
    for k, v in (exc.headers or {}).items():
        response.headers[k] = v
    return response


def storage_problem(request: Request, exc: StorageError) -> JSONResponse:
    log.warning("hostnames API: storage failed: %s", exc)
    return problem_response("storage-unavailable", str(exc), 503, request.url.path)


def hostnames_router(
    rt: HostnamesRuntime,
    openapi: Callable[[], dict[str, Any]],
    *,
    clock: Callable[[], float] = time.time,
    dependencies: Sequence[Any] = (),
) -> APIRouter:
    """The ``/v1/hostnames`` endpoints and the OpenAPI document; ``dependencies`` run first
    (the admin API's trust checks)."""
    api = APIRouter(dependencies=list(dependencies))
    problems = PROBLEMS

    @api.get(OPENAPI_PATH, include_in_schema=False)
    async def openapi_document() -> JSONResponse:
        return JSONResponse(openapi())

    async def describe(entry: HostnameEntry) -> Hostname:
        return await _describe(rt, entry, clock())

    @api.post("/v1/hostnames", status_code=201, response_model=Hostname, responses=problems)
    async def create_hostname(body: HostnameCreate, response: Response) -> Hostname:
        """Register a hostname (201); the same hostname again answers 200 with the entry."""
        name = _hostname(body.hostname)
        upstream = _checked(check_upstream, body.upstream)
        metadata = _checked(encode_metadata, body.metadata)
        entry, created = await rt.storage.add_hostname(
            HostnameEntry(name, upstream, metadata, clock())
        )
        rt.hostnames.apply(name, entry)
        if not created:
            response.status_code = 200
        else:
            await rt.events.publish("hostname.created", name, entry_event_data(entry))
            if body.issue:
                rt.certs.start_issue(name)
        response.headers["location"] = f"/v1/hostnames/{name}"
        return await describe(entry)

    @api.get("/v1/hostnames", response_model=HostnameList, responses=problems)
    async def list_hostnames(
        state: State | None = None,
        limit: int = Query(100, ge=1, le=1000),
        cursor: str | None = None,
    ) -> HostnameList:
        """Entries in hostname order; pass ``next_cursor`` back as ``cursor`` for the next
        page (stable however entries change meanwhile)."""
        after = _decode_cursor(cursor) if cursor else None
        items: list[Hostname] = []
        scanned = 0
        # A state filter may skip most entries: look at no more than this many per request.
        budget = limit * 10 if state else limit
        exhausted = False
        while len(items) < limit and scanned < budget:
            page = await rt.storage.list_hostnames(after=after, limit=limit)
            if not page:
                exhausted = True
                break
            for entry, item in zip(page, await _describe_all(rt, page, clock()), strict=True):
                scanned += 1
                after = entry.hostname
                if state is None or item.state == state:
                    items.append(item)
                if len(items) >= limit or scanned >= budget:
                    break
            if len(page) < limit and after == page[-1].hostname:
                exhausted = True
                break
        next_cursor = None if exhausted or after is None else _encode_cursor(after)
        return HostnameList(items=items, next_cursor=next_cursor)

    @api.get("/v1/hostnames/{name}", response_model=Hostname, responses=problems)
    async def get_hostname(name: str) -> Hostname:
        return await describe(await _existing(rt, _hostname(name)))

    @api.patch("/v1/hostnames/{name}", response_model=Hostname, responses=problems)
    async def patch_hostname(name: str, body: HostnamePatch) -> Hostname:
        """Change ``upstream`` and/or ``metadata`` (fields left out stay as they are)."""
        current = await _existing(rt, _hostname(name))
        if not current.live:
            raise ProblemError("unknown-hostname", f"{current.hostname} was removed")
        given = body.model_fields_set
        upstream = (
            _checked(check_upstream, body.upstream) if "upstream" in given else current.upstream
        )
        metadata = (
            _checked(encode_metadata, body.metadata) if "metadata" in given else current.metadata
        )
        changed = HostnameEntry(current.hostname, upstream, metadata, current.created_at)
        if not await rt.storage.update_hostname(changed):
            raise ProblemError("unknown-hostname", f"{current.hostname} was removed meanwhile")
        stored = await rt.storage.get_hostname(current.hostname)
        rt.hostnames.apply(current.hostname, stored)
        return await describe(stored or changed)

    @api.delete("/v1/hostnames/{name}", status_code=204, responses=problems)
    async def delete_hostname(name: str) -> Response:
        """Stop serving and renewing the name now; its certificate is kept for
        ``[hostnames] removal_grace`` (re-adding it meanwhile needs no new order)."""
        hostname = _hostname(name)
        await _existing(rt, hostname)
        removed = await rt.storage.remove_hostname(hostname, clock())
        after = await rt.storage.get_hostname(hostname)
        rt.hostnames.apply(hostname, after)
        if removed is not None and after is not None:
            await rt.events.publish("hostname.deleted", hostname, entry_event_data(after))
        return Response(status_code=204)

    return api


# ---------------------------------------------------------------------- helpers


def entry_event_data(entry: HostnameEntry) -> dict[str, object]:
    """The ``data`` of hostname.created/deleted events: the entry as the API shows it."""
    return {
        "hostname": entry.hostname,
        "upstream": entry.upstream,
        "metadata": decode_metadata(entry.metadata),
        "created_at": iso(entry.created_at),
        "removed_at": iso(entry.removed_at),
    }


def _hostname(raw: str) -> str:
    try:
        return parse_hostname(raw)
    except BadEntry as exc:
        raise ProblemError(exc.kind, exc.detail) from None


def _checked(check: Callable[[Any], Any], value: Any) -> Any:
    try:
        return check(value)
    except BadEntry as exc:
        raise ProblemError(exc.kind, exc.detail) from None


async def _existing(rt: HostnamesRuntime, name: str) -> HostnameEntry:
    entry = await rt.storage.get_hostname(name)
    if entry is None:
        raise ProblemError("unknown-hostname", f"{name} is not a registered hostname")
    return entry


def _encode_cursor(name: str) -> str:
    return b64url(name.encode())


def _decode_cursor(cursor: str) -> str:
    try:
        name = b64url_decode(cursor).decode("ascii")
    except ValueError:  # not base64url, or not ASCII
        name = ""
    if not name or name != name.strip() or "/" in name:
        raise ProblemError("invalid-query", f"cursor {cursor!r} is not one this API handed out")
    return name


async def _describe_all(
    rt: HostnamesRuntime, entries: list[HostnameEntry], now: float
) -> list[Hostname]:
    out: list[Hostname | None] = [None] * len(entries)
    limiter = trio.CapacityLimiter(READ_CONCURRENCY)

    async def one(i: int, entry: HostnameEntry) -> None:
        async with limiter:
            out[i] = await _describe(rt, entry, now)

    async with trio.open_nursery() as nursery:
        for i, entry in enumerate(entries):
            nursery.start_soon(one, i, entry)
    return [item for item in out if item is not None]


async def _describe(rt: HostnamesRuntime, entry: HostnameEntry, now: float) -> Hostname:
    return await describe_hostname(rt.storage, entry, now, rt.certs.status(entry.hostname))


async def describe_hostname(
    storage: HostnameStorage, entry: HostnameEntry, now: float, st: DomainStatus | None = None
) -> Hostname:
    """``entry`` with its state, certificate and last error; ``st`` is this process's status
    of the name, if any (else the one another process stored)."""
    name = entry.hostname
    if st is None:
        st = await stored_status(storage, name)
    record = await _record(storage, name)
    cert = None
    if record is not None:
        cert = Certificate(
            not_after=iso(record.not_after) or "",
            issuer=_issuer(record),
            serial=record.serial,
            renewal_at=iso(st.renew_at) if st and st.not_after == record.not_after else None,
            renewal_source=st.renewal_source if st and st.not_after == record.not_after else None,
        )
    last_error = None
    if st is not None and st.last_error_type and entry.live:
        last_error = LastError(
            type=st.last_error_type, detail=st.last_error or "", hint=st.hint, at=iso(st.updated_at)
        )
    return Hostname(
        hostname=name,
        upstream=entry.upstream,
        metadata=decode_metadata(entry.metadata),
        created_at=iso(entry.created_at) or "",
        removed_at=iso(entry.removed_at),
        state=hostname_state(entry, st, record, now),
        certificate=cert,
        last_error=last_error,
    )


def hostname_state(
    entry: HostnameEntry, st: DomainStatus | None, record: CertRecord | None, now: float
) -> State:
    if not entry.live:
        return "removed"
    valid = record is not None and record.not_after > now
    if st is not None:
        if st.state == "issuing":
            return "issuing"
        if st.state == "denied":
            return "denied"
        if st.state == "failing":
            return "failing"
        if st.state in ("rate_limited", "account_paused"):
            return st.state
    return "active" if valid else "pending"


async def stored_status(storage: HostnameStorage, name: str) -> DomainStatus | None:
    """The status another process stored for ``name`` (None: none, or unreadable)."""
    try:
        return await status_store.read(storage, name)
    except status_store.UnreadableStatus:
        return None


async def _record(storage: HostnameStorage, name: str) -> CertRecord | None:
    raw = await storage.get(cert_key(name))
    if raw is None:
        return None
    try:
        return CertRecord.from_json(raw)
    except RecordError:
        return None


def _issuer(record: CertRecord) -> str:
    try:
        return record.chain()[0].issuer.rfc4514_string()
    except (ValueError, IndexError):
        return record.issuer_id
