"""``/ui/``: the operator's status page, server-rendered HTML on the admin listener.

Owns the page's routes, its sign-in, its templates' data and its HTTP security headers. The
hostname facts come from the hostnames API's own ``describe_hostname`` (one truth for the JSON
and the page); counts and the state filter come from ``StateIndex`` (``ui_index.py``).
It does not decide who may reach the admin listener: ``app.AdminApp`` applies the Host check
first, exactly as for the API.

Authentication
--------------
Without an admin token the page is open to loopback, like the API (the Host check stops DNS
rebinding). With a token, a browser signs in once: the form POSTs the token to ``/ui/login``,
which answers with a session cookie (``HttpOnly``: no script can read it, ``SameSite=Strict``:
no other site's request carries it, ``Path=/ui/``: the API never accepts it, no
``Expires``: gone when the browser session ends). The cookie is not the token: it is an
issue time and ``HMAC-SHA256(token, time)``, valid ``SESSION_TTL``; every process sharing the
token accepts it, and changing the token signs everyone out. Scripts may send
``Authorization: Bearer <admin token>`` instead. The metrics token grants nothing here.

Every POST (sign-in, sign-out, doctor) must carry an ``Origin`` that is this admin origin, and
no cross-site ``Sec-Fetch-Site``: browsers always send ``Origin`` with a form POST, so a page
elsewhere cannot submit these forms (and a missing ``Origin`` means it was not our form).

The page runs no script at all: the Content-Security-Policy allows only our own stylesheet,
same-origin form targets and no framing, so injected markup could neither run nor load.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import parse_qs, urlencode

import jinja2
import markupsafe
import trio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Route

from ..names import InvalidName, validate_hostname
from ..storage.base import HostnameEntry
from .hostnames import STATES, Hostname, describe_hostname, stored_status
from .ui_index import StateIndex, prefix_start

HERE = Path(__file__).parent
#: Rows per page.
PAGE = 50
#: How long a sign-in lasts (seconds); the browser forgets the cookie sooner when it closes.
SESSION_TTL = 12 * 3600
COOKIE = "edgeproxy_ui"
#: Seconds the first page load waits for the first count by state (then: "counting").
FIRST_COUNT_WAIT = 2.0
#: Seconds the doctor may take for one name before the page gives up waiting.
DOCTOR_DEADLINE = 60.0
#: Largest sign-in form body (a token and the field name).
MAX_FORM = 4096
#: Longest accepted search text (a hostname is at most 253 characters).
MAX_QUERY = 253
_SEARCH_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789.-_*")
_CSS = (HERE / "static" / "ui.css").read_bytes()
_CSS_ETAG = '"' + hashlib.sha256(_CSS).hexdigest()[:16] + '"'

CSP = (
    "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; "
    "frame-ancestors 'none'; base-uri 'none'"
)
SECURITY_HEADERS = {
    "content-security-policy": CSP,
    "x-content-type-options": "nosniff",
    # same-origin, not no-referrer: with no-referrer Chromium sends "Origin: null" on our own
    # form POSTs, and the Origin check could no longer tell them from a sandboxed page.
    "referrer-policy": "same-origin",
    "cache-control": "no-store",
    "x-frame-options": "DENY",
}


class Doctor(Protocol):
    async def __call__(self, name: str, /) -> Any:
        """An ``edgeproxy.doctor.Diagnosis`` for ``name``."""


# ---------------------------------------------------------------------- sessions


def session_value(token: bytes, issued: int) -> str:
    mac = hmac.new(token, f"edgeproxy-ui-session:{issued}".encode(), hashlib.sha256).hexdigest()
    return f"{issued}.{mac}"


def session_valid(token: bytes, value: str, now: float) -> bool:
    issued_text, _, _ = value.partition(".")
    if not issued_text.isdigit() or len(issued_text) > 12:
        return False
    issued = int(issued_text)
    if not (now - SESSION_TTL <= issued <= now + 60):
        return False
    # Constant time: the comparison must not reveal how much of a forged MAC was right.
    return hmac.compare_digest(session_value(token, issued).encode(), value.encode())


# ---------------------------------------------------------------------- the app


class StatusPage:
    """Build with ``make_ui``; ``AdminApp`` hands it every request under ``/ui``.

    ``rt`` is the process's ``edgeproxy.app.Runtime``: its storage, certificate manager and
    registry mirror (the hostnames API's protocols name what each part must answer).
    """

    def __init__(
        self,
        rt: Any,
        *,
        token: bytes | None,
        doctor: Doctor,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.rt = rt
        self.token = token
        self.doctor = doctor
        self.clock = clock
        self.index = StateIndex(rt.storage, rt.hostnames, rt.certs, clock=clock)
        self.env = jinja2.Environment(
            loader=jinja2.FileSystemLoader(HERE / "templates"),
            autoescape=True,  # every value is text; markup only comes from the templates
            undefined=jinja2.StrictUndefined,
        )
        self.env.filters["when"] = _when
        self.app = Starlette(
            routes=[
                Route("/ui", self.redirect_home, methods=["GET"]),
                Route("/ui/", self.home, methods=["GET"]),
                Route("/ui/login", self.login, methods=["POST"]),
                Route("/ui/logout", self.logout, methods=["POST"]),
                Route("/ui/ui.css", self.stylesheet, methods=["GET"]),
                Route("/ui/hostnames/{name}", self.hostname, methods=["GET"]),
                Route("/ui/hostnames/{name}/doctor", self.run_doctor, methods=["POST"]),
            ]
        )

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await self.app(scope, receive, send)

    # ------------------------------------------------------------------ auth

    def signed_in(self, request: Request) -> bool:
        if self.token is None:
            return True
        scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(
            credentials.strip().encode(), self.token
        ):
            return True
        cookie = request.cookies.get(COOKIE)
        return cookie is not None and session_valid(self.token, cookie, self.clock())

    def render(self, template: str, code: int = 200, **data: Any) -> HTMLResponse:
        data.setdefault("signed_in_with_cookie", self.token is not None)
        body = self.env.get_template(template).render(**data)
        return HTMLResponse(body, status_code=code, headers=SECURITY_HEADERS)

    def sign_in_page(self, error: str | None = None, status: int = 401) -> HTMLResponse:
        response = self.render("login.html", status, error=error, signed_in_with_cookie=False)
        response.headers["www-authenticate"] = 'Bearer realm="edgeproxy-admin"'
        return response

    # ------------------------------------------------------------------ routes

    async def redirect_home(self, request: Request) -> Response:
        return RedirectResponse("/ui/", 308, headers=SECURITY_HEADERS)

    async def stylesheet(self, request: Request) -> Response:
        headers = {**SECURITY_HEADERS, "cache-control": "no-cache", "etag": _CSS_ETAG}
        return Response(_CSS, media_type="text/css", headers=headers)

    async def login(self, request: Request) -> Response:
        refusal = _cross_site(request)
        if refusal is not None:
            return refusal
        if self.token is None:
            return RedirectResponse("/ui/", 303, headers=SECURITY_HEADERS)
        form = await _form(request)
        if form is None:
            return HTMLResponse(
                "<!doctype html><title>Refused</title><p>Send the sign-in form.</p>",
                status_code=400,
                headers=SECURITY_HEADERS,
            )
        given = form.get("token", "").strip().encode()
        if not hmac.compare_digest(given, self.token):
            return self.sign_in_page("That is not the admin token.")
        response = RedirectResponse("/ui/", 303, headers=SECURITY_HEADERS)
        response.set_cookie(
            COOKIE,
            session_value(self.token, int(self.clock())),
            path="/ui/",
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
        )
        return response

    async def logout(self, request: Request) -> Response:
        refusal = _cross_site(request)
        if refusal is not None:
            return refusal
        response = RedirectResponse("/ui/", 303, headers=SECURITY_HEADERS)
        response.delete_cookie(COOKIE, path="/ui/", httponly=True, samesite="strict")
        return response

    async def home(self, request: Request) -> Response:
        if not self.signed_in(request):
            return self.sign_in_page()
        state = request.query_params.get("state") or None
        query = (request.query_params.get("q") or "").strip().lower()
        after = request.query_params.get("after") or None
        problems = []
        if state is not None and state not in STATES:
            problems.append(f"unknown state {state!r}")
            state = None
        if len(query) > MAX_QUERY or not set(query) <= _SEARCH_CHARS:
            problems.append("search for the start of a hostname: letters, digits, '.', '-'")
            query = ""
        if after is not None and (len(after) > MAX_QUERY or not set(after) <= _SEARCH_CHARS):
            after = None
        counted = await self.index.ensure(FIRST_COUNT_WAIT)
        counts = self.index.counts() if counted else None
        if state is not None and not counted:
            problems.append("still counting hostnames by state: the filter works once that is "
                            "done (reload in a few seconds)")  # fmt: skip
            state = None
        names, more = await self._page_names(state, query, after)
        rows = await self._describe(names)
        next_url = None
        if more and names:
            params = {k: v for k, v in (("state", state), ("q", query)) if v}
            next_url = "/ui/?" + urlencode({**params, "after": names[-1]})
        return self.render(
            "index.html",
            400 if problems else 200,
            counts=counts,
            total=sum(counts.values()) if counts is not None else None,
            states=STATES,
            state=state,
            query=query,
            rows=rows,
            problems=problems,
            next_url=next_url,
            first_page=after is None,
            counted_at=self.index.counted_at,
        )

    async def hostname(self, request: Request) -> Response:
        if not self.signed_in(request):
            return self.sign_in_page()
        return await self._hostname_page(request.path_params["name"], None)

    async def run_doctor(self, request: Request) -> Response:
        refusal = _cross_site(request)
        if refusal is not None:
            return refusal
        if not self.signed_in(request):
            return self.sign_in_page()
        name = request.path_params["name"]
        try:
            name = validate_hostname(name)
        except InvalidName:
            return await self._hostname_page(name, None)
        with trio.move_on_after(DOCTOR_DEADLINE):
            return await self._hostname_page(name, await self.doctor(name))
        return await self._hostname_page(name, None, doctor_timeout=True)

    async def _hostname_page(
        self, raw: str, diagnosis: Any, *, doctor_timeout: bool = False
    ) -> Response:
        try:
            name = validate_hostname(raw)
        except InvalidName as exc:
            return self.render("missing.html", 400, name=raw, why=f"not a hostname: {exc}")
        entry = await self.rt.storage.get_hostname(name)
        if entry is None:
            return self.render("missing.html", 404, name=name, why="not a registered hostname")
        status = self.rt.certs.status(name) or await stored_status(self.rt.storage, name)
        (row,) = await self._describe([entry])
        history = await _history(self.rt.storage, name)
        return self.render(
            "hostname.html",
            row=row,
            entry=entry,
            status=status,
            history=history,
            diagnosis=diagnosis,
            doctor_timeout=doctor_timeout,
        )

    # ------------------------------------------------------------------ data

    async def _page_names(
        self, state: str | None, query: str, after: str | None
    ) -> tuple[list[HostnameEntry], bool]:
        """One page of entries in hostname order and whether more follow (keyset paging)."""
        if state is not None:
            names, more = self.index.page(state, query, after, PAGE)
            entries = [await self.rt.storage.get_hostname(n) for n in names]
            return [e for e in entries if e is not None], more
        start = after if after is not None else prefix_start(query)
        found = await self.rt.storage.list_hostnames(after=start, limit=PAGE + 1)
        matching = [e for e in found if e.hostname.startswith(query)]
        # Names are sorted: the first one without the prefix ends the search.
        more = len(matching) > PAGE
        return matching[:PAGE], more

    async def _describe(self, entries: list[HostnameEntry]) -> list[Hostname]:
        now = self.clock()
        out: list[Hostname | None] = [None] * len(entries)

        async def one(i: int, entry: HostnameEntry) -> None:
            st = self.rt.certs.status(entry.hostname)
            out[i] = await describe_hostname(self.rt.storage, entry, now, st)

        async with trio.open_nursery() as nursery:
            for i, entry in enumerate(entries):
                nursery.start_soon(one, i, entry)
        return [row for row in out if row is not None]


def make_ui(
    rt: Any, *, token: str | None, doctor: Doctor, clock: Callable[[], float] = time.time
) -> StatusPage:
    return StatusPage(
        rt, token=token.encode() if token is not None else None, doctor=doctor, clock=clock
    )


# ---------------------------------------------------------------------- helpers


def _cross_site(request: Request) -> Response | None:
    """Why a POST cannot be one of our own forms, as a response; None when it is."""
    origin = request.headers.get("origin")
    host = request.headers.get("host")
    fetch_site = (request.headers.get("sec-fetch-site") or "same-origin").strip().lower()
    own = host is not None and origin in (f"http://{host}", f"https://{host}")
    if own and fetch_site in ("same-origin", "none"):
        return None
    why = (
        "this form must be sent from the status page itself: its Origin "
        f"{origin!r} is not this admin origin"
        if not own
        else f"Sec-Fetch-Site says {fetch_site!r}"
    )
    return HTMLResponse(
        f"<!doctype html><title>Refused</title><p>Refused: {_escape(why)}.</p>",
        status_code=403,
        headers=SECURITY_HEADERS,
    )


async def _form(request: Request) -> dict[str, str] | None:
    """The urlencoded form body (at most ``MAX_FORM`` bytes), or None for anything else."""
    mime = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if mime != "application/x-www-form-urlencoded":
        return None
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM:
            return None
    try:
        fields = parse_qs(body.decode("ascii"), max_num_fields=4, strict_parsing=False)
    except (UnicodeDecodeError, ValueError):
        return None
    return {k: v[-1] for k, v in fields.items()}


def _escape(text: str) -> str:
    return str(markupsafe.escape(text))


def _when(ts: float | None) -> str:
    if not ts:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(ts))


async def _history(storage: Any, name: str) -> list[Any]:
    from ..certs.history import read_history

    return await read_history(storage, name)
