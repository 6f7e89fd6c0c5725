"""Real ACME for tests: Debian's pebble + pebble-challtestsrv, a TLS-ALPN-01 responder, and a
fault-injecting HTTPS proxy, all on loopback.

What this owns and how the pieces meet:

- ``start_pebble(tmp_path, tls_port=...)`` starts ``pebble-challtestsrv`` as a DNS server only
  (every A query answers 127.0.0.1, no AAAA) and ``pebble`` resolving through it, so pebble's
  validation authority connects to ``127.0.0.1:tls_port`` with SNI = the identifier and ALPN
  ``acme-tls/1``. Debian ships no certificate for pebble's HTTPS listener: one is made with
  trustme per instance and its CA written to ``ca_bundle_path`` (the trust for the ACME API).
  Ports are chosen with ``free_port`` and the helper waits until the directory answers.
  ``Pebble.stop()`` (or leaving the ``with`` block) ends both processes.
- ``TlsAlpnResponder`` is a tiny real RFC 8737 responder: a trio TCP listener serving, per SNI,
  the certificate from ``edgeproxy.tls.challenge_cert``. It is also a ``ChallengeSolver``.
- ``FaultInjector`` sits between an ACME client and pebble (HTTPS on its own port, h11 on
  trio), relays everything, adds ``renewalInfo`` to the directory (pebble 2.4 has no ARI) and
  answers requests matched by its ``rules`` with canned replies instead of relaying them
  (``rate_limited``: a CA's ``rateLimited`` with Retry-After). It learns the directory's
  endpoint names, so ``count("newOrder")`` counts requests per endpoint. ``serve_in_thread``
  runs it beside a test that drives real processes with blocking calls.

Nothing here knows about edgeproxy beyond the challenge certificate builder; it is shared by
the integration tests and ``bench/acme_issuance.py``.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import ssl
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import h11
import httpx
import trio
import trustme
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from edgeproxy.acme.jws import decode_payload, decode_protected
from edgeproxy.acme.messages import parse_links
from edgeproxy.tls.challenge_cert import ACME_TLS_ALPN, build_challenge_certificate
from testkit.ports import free_port
from testkit.procs import StopsOnExit, stop_process

__all__ = [
    "CHALLTESTSRV",
    "PEBBLE",
    "FaultInjector",
    "InjectedRequest",
    "Pebble",
    "PebbleStartError",
    "Reply",
    "TlsAlpnResponder",
    "injected_pebble_for_proxy",
    "pebble_available",
    "pebble_for_proxy",
    "rate_limited",
    "reject_first_replaces",
    "serve_in_thread",
    "start_pebble",
]

PEBBLE = "/usr/bin/pebble"
#: ``[acme.limits]`` switched off, for runs whose point is many orders: pebble has no rate
#: limits, and Let's Encrypt's figures (50 per registered domain, 5 per name a week) would
#: hold their names back.
NO_LIMITS = {
    "new_orders_per_account": 0,
    "certificates_per_registered_domain": 0,
    "failed_validations_per_hostname": 0,
    "duplicate_certificates": 0,
}
CHALLTESTSRV = "/usr/bin/pebble-challtestsrv"
START_TIMEOUT = 15.0


def pebble_available() -> bool:
    return shutil.which(PEBBLE) is not None and shutil.which(CHALLTESTSRV) is not None


class PebbleStartError(RuntimeError):
    """pebble or challtestsrv did not come up; the message carries their logs."""


@dataclass
class Pebble(StopsOnExit):
    """A running pebble. ``directory_url`` is the ACME directory; ``ca_bundle_path`` the CA of
    its HTTPS listener (and of the management interface); ``https_ca`` that CA as a trustme
    object, for helpers that need more certificates trusted by the same bundle."""

    directory_url: str
    management_url: str
    ca_bundle_path: Path
    https_ca: trustme.CA
    tls_port: int
    dns_port: int
    workdir: Path
    dns_management_port: int = 0  # pebble-challtestsrv's HTTP management (0: not ours)
    process: subprocess.Popen[bytes] | None = None
    dns_process: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        return self.directory_url.rsplit("/", 1)[0]

    def roots_pem(self) -> bytes:
        """Every issuing root pebble has (the default and any ``PEBBLE_ALTERNATE_ROOTS``),
        concatenated PEM, fetched from the management interface ``/roots/0`` and the
        ``Link: rel="alternate"`` URLs it names."""
        return b"".join(self.root_pems())

    def root_pems(self) -> list[bytes]:
        """The roots one by one: index 0 is the default chain's root."""
        with httpx.Client(verify=ssl.create_default_context(cafile=self.ca_bundle_path)) as http:
            first = http.get(f"{self.management_url}/roots/0", timeout=10.0)
            first.raise_for_status()
            roots = [first.content]
            for url, rel in parse_links(first.headers.get_list("link"), str(first.url)):
                if rel == "alternate":
                    response = http.get(url, timeout=10.0)
                    response.raise_for_status()
                    roots.append(response.content)
        return roots

    def logs(self) -> str:
        parts = []
        for name in ("pebble.log", "challtestsrv.log"):
            path = self.workdir / name
            if path.exists():
                parts.append(f"--- {name} ---\n{path.read_text(errors='replace')[-8000:]}")
        return "\n".join(parts)

    def stop(self) -> None:
        stop_process(self.process)
        stop_process(self.dns_process)


def _wait_tcp(port: int, proc: subprocess.Popen[bytes], deadline: float) -> bool:
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.02)
    return False


def pebble_for_proxy(make_pebble: Callable[..., Pebble], roots: Path) -> tuple[int, Pebble]:
    """(port, pebble) for an issuing proxy: pebble validates tls-alpn-01 against ``port``, the
    port the proxy must listen on, and its roots go to ``roots`` so a client can verify the
    chain the proxy serves."""
    port = free_port()
    pebble = make_pebble(tls_port=port)
    roots.write_bytes(pebble.roots_pem())
    return port, pebble


async def injected_pebble_for_proxy(
    nursery: trio.Nursery, make_pebble: Callable[..., Pebble], **pebble_args: Any
) -> tuple[int, Pebble, FaultInjector]:
    """(port, pebble, injector) for an issuing proxy that talks to pebble through a
    ``FaultInjector`` served in ``nursery`` (point the proxy at ``injector.directory_url``):
    pebble validates tls-alpn-01 against ``port``, the port the proxy must listen on.
    ``pebble_args`` go to ``make_pebble`` (``env``, ``validity``, ...)."""
    port = free_port()
    pebble = make_pebble(tls_port=port, **pebble_args)
    inj = FaultInjector(pebble)
    await nursery.start(inj.serve)
    return port, pebble, inj


def start_pebble(
    tmp_path: Path,
    *,
    tls_port: int,
    http_port: int | None = None,
    env: dict[str, str] | None = None,
    eab_keys: dict[str, str] | None = None,
    validity: int | None = None,
    dns_server: str | None = None,
) -> Pebble:
    """Start pebble (+ its DNS) in ``tmp_path``; returns once the directory answers.

    ``http_port`` is where HTTP-01 validations go (default: a port nothing listens on).
    ``env`` adds to/overrides ``PEBBLE_VA_NOSLEEP=1`` (e.g. ``PEBBLE_WFE_NONCEREJECT``,
    ``PEBBLE_ALTERNATE_ROOTS``, ``PEBBLE_AUTHZREUSE``). ``eab_keys`` (kid -> base64url HMAC
    key) makes External Account Binding required. ``validity`` sets
    ``certificateValidityPeriod`` in seconds. ``dns_server`` ("IP:port") makes pebble resolve
    through that server (e.g. a test's bind9, for DNS-01) instead of a challtestsrv. The caller must ``stop()`` the result (or use
    it as a context manager); a failed start stops what it started and raises
    ``PebbleStartError`` with the logs.
    """
    workdir = Path(tempfile.mkdtemp(prefix="pebble-", dir=tmp_path))
    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1", "localhost")
    ca_path = workdir / "https-ca.pem"
    ca.cert_pem.write_to_path(str(ca_path))
    cert_path, key_path = workdir / "https-cert.pem", workdir / "https-key.pem"
    cert_path.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    leaf.private_key_pem.write_to_path(str(key_path))

    acme_port, mgmt_port = free_port(), free_port()
    if http_port is None:
        http_port = free_port()  # nothing listens there: only TLS-ALPN-01 can succeed
    dns_port, dns_mgmt_port = free_port(), free_port()
    config: dict[str, Any] = {
        "listenAddress": f"127.0.0.1:{acme_port}",
        "managementListenAddress": f"127.0.0.1:{mgmt_port}",
        "certificate": str(cert_path),
        "privateKey": str(key_path),
        "httpPort": http_port,
        "tlsPort": tls_port,
        "ocspResponderURL": "",
        "externalAccountBindingRequired": eab_keys is not None,
    }
    if eab_keys is not None:
        config["externalAccountMACKeys"] = dict(eab_keys)
    if validity is not None:
        config["certificateValidityPeriod"] = validity
    config_path = workdir / "pebble-config.json"
    config_path.write_text(json.dumps({"pebble": config}, indent=2))

    proc_env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PEBBLE_VA_NOSLEEP": "1"}
    proc_env.update(env or {})
    pebble = Pebble(
        directory_url=f"https://127.0.0.1:{acme_port}/dir",
        management_url=f"https://127.0.0.1:{mgmt_port}",
        ca_bundle_path=ca_path,
        https_ca=ca,
        tls_port=tls_port,
        dns_port=dns_port,
        dns_management_port=dns_mgmt_port if dns_server is None else 0,
        workdir=workdir,
    )
    # Only the mock DNS: every A query answers 127.0.0.1 and AAAA nothing, so pebble's VA
    # dials 127.0.0.1:tls_port. The challenge servers are off (pebble-challtestsrv 2.4 has
    # no DoH listener to disable).
    dns_flags = {
        "-http01": "",
        "-https01": "",
        "-tlsalpn01": "",
        "-dns01": f"127.0.0.1:{dns_port}",
        "-management": f"127.0.0.1:{dns_mgmt_port}",
        "-defaultIPv4": "127.0.0.1",
        "-defaultIPv6": "",
    }
    deadline = time.monotonic() + START_TIMEOUT
    try:
        if dns_server is None:
            with (workdir / "challtestsrv.log").open("wb") as dns_log:
                pebble.dns_process = subprocess.Popen(
                    [CHALLTESTSRV, *(arg for pair in dns_flags.items() for arg in pair)],
                    stdout=dns_log,
                    stderr=subprocess.STDOUT,
                    env=proc_env,
                    cwd=workdir,
                )
            if not _wait_tcp(dns_mgmt_port, pebble.dns_process, deadline):
                raise PebbleStartError(f"pebble-challtestsrv did not start\n{pebble.logs()}")
        resolver = dns_server or f"127.0.0.1:{dns_port}"
        with (workdir / "pebble.log").open("wb") as pebble_log:
            pebble.process = subprocess.Popen(
                [PEBBLE, "-config", str(config_path), "-dnsserver", resolver],
                stdout=pebble_log,
                stderr=subprocess.STDOUT,
                env=proc_env,
                cwd=workdir,
            )
        _wait_directory(pebble, deadline)
    except BaseException:
        pebble.stop()
        raise
    return pebble


def _wait_directory(pebble: Pebble, deadline: float) -> None:
    assert pebble.process is not None
    verify = ssl.create_default_context(cafile=pebble.ca_bundle_path)
    with httpx.Client(verify=verify, timeout=2.0) as http:
        while time.monotonic() < deadline:
            if pebble.process.poll() is not None:
                raise PebbleStartError(f"pebble exited early\n{pebble.logs()}")
            try:
                if http.get(pebble.directory_url).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.02)
    raise PebbleStartError(f"pebble directory did not answer in time\n{pebble.logs()}")


# --- the TLS-ALPN-01 responder ----------------------------------------------------------


class TlsAlpnResponder:
    """Serves RFC 8737 challenge certificates on 127.0.0.1:``port``, chosen by SNI.

    Implements ``ChallengeSolver``: ``present`` builds the certificate (one EC key reused for
    all of them: key generation is the slow part) and ``cleanup`` forgets it. An SNI with no
    challenge gets a handshake failure, as a real responder would. ``hellos`` counts the
    ClientHellos per SNI (pebble connects several times per validation).
    """

    challenge_type = "tls-alpn-01"

    def __init__(self, port: int, workdir: Path) -> None:
        self.port = port
        self._dir = workdir
        self._dir.mkdir(parents=True, exist_ok=True)
        self._key = ec.generate_private_key(ec.SECP256R1())
        self._key_path = self._dir / "challenge-key.pem"
        self._key_path.write_bytes(
            self._key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        self._contexts: dict[str, ssl.SSLContext] = {}
        self.hellos: dict[str, int] = {}
        self.presented: list[str] = []
        self._default = self._new_context()
        self._default.sni_callback = self._pick_context

    def _new_context(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.set_alpn_protocols([ACME_TLS_ALPN])
        return ctx

    def _pick_context(
        self, sslobj: ssl.SSLObject | ssl.SSLSocket, name: str | None, _: ssl.SSLContext
    ) -> int | None:
        sni = (name or "").lower()
        self.hellos[sni] = self.hellos.get(sni, 0) + 1
        ctx = self._contexts.get(sni)
        if ctx is None:
            return ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME
        sslobj.context = ctx
        return None

    async def present(self, identifier: str, token: str, key_authorization: str) -> None:
        cert, _ = build_challenge_certificate(identifier, key_authorization, key=self._key)
        cert_path = self._dir / f"{identifier}.pem"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        ctx = self._new_context()
        ctx.load_cert_chain(cert_path, self._key_path)
        self._contexts[identifier.lower()] = ctx
        self.presented.append(identifier)

    async def cleanup(self, identifier: str, token: str) -> None:
        self._contexts.pop(identifier.lower(), None)

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(self.port, host="127.0.0.1")
        task_status.started()
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, stream: trio.SocketStream) -> None:
        tls = trio.SSLStream(stream, self._default, server_side=True)
        try:
            with trio.move_on_after(10):
                # The CA only needs the handshake (certificate + ALPN); then we hang up.
                await tls.do_handshake()
                await tls.aclose()
        except (trio.BrokenResourceError, trio.ClosedResourceError, ssl.SSLError, OSError):
            pass
        finally:
            await trio.aclose_forcefully(stream)


# --- the fault injector -----------------------------------------------------------------


@dataclass(frozen=True)
class Reply:
    """A canned HTTP answer a rule gives instead of relaying to pebble."""

    status: int  # 0: hang up instead of answering
    body: bytes = b""
    headers: tuple[tuple[str, str], ...] = ()

    @classmethod
    def drop(cls) -> Reply:
        """Hang up without answering (the client sees the connection die mid-request)."""
        return cls(0)

    @classmethod
    def problem(
        cls, status: int, type_: str, detail: str, *headers: tuple[str, str]
    ) -> Reply:
        body = json.dumps({"type": type_, "detail": detail, "status": status}).encode()
        return cls(status, body, (("Content-Type", "application/problem+json"), *headers))


@dataclass
class InjectedRequest:
    """A request as the injector saw it; ``jws_payload``/``jws_url`` decoded for JOSE posts."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    jws_payload: dict[str, Any] | None = None
    jws_url: str | None = None
    injected: bool = False
    endpoint: str | None = None  # the directory's name for the path (newOrder, newNonce, ...)
    at: float = field(default_factory=time.time)


Rule = Callable[[InjectedRequest], Reply | None]

_HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "transfer-encoding",
    "content-length",
    "content-encoding",
    "upgrade",
    "proxy-connection",
}


def rate_limited(
    retry_after: str, *, endpoint: str = "newOrder", status: int = 429
) -> Rule:
    """A rule answering every request to ``endpoint`` (a directory name) with a
    ``rateLimited`` problem (RFC 8555 s6.6) and ``Retry-After: retry_after`` (as sent:
    delta-seconds or an HTTP-date). Add it to ``FaultInjector.rules`` and remove it again to
    switch the CA's limit on and off."""

    def rule(request: InjectedRequest) -> Reply | None:
        if request.endpoint != endpoint:
            return None
        return Reply.problem(
            status,
            "urn:ietf:params:acme:error:rateLimited",
            "too many new orders recently (injected)",
            ("Retry-After", retry_after),
        )

    return rule


def reject_first_replaces(
    type_: str = "urn:ietf:params:acme:error:alreadyReplaced",
    status: int = 409,
    detail: str = "the certificate named in replaces was replaced",
) -> Rule:
    """A rule answering the first newOrder that carries ``replaces`` with a problem."""
    fired = False

    def rule(request: InjectedRequest) -> Reply | None:
        nonlocal fired
        if fired or not request.jws_payload or "replaces" not in request.jws_payload:
            return None
        fired = True
        return Reply.problem(status, type_, detail)

    return rule


@dataclass
class FaultInjector:
    """An HTTPS reverse proxy in front of pebble that can lie on purpose.

    ``directory_url`` is what the client should use. The ``Host`` header is relayed as is, so
    pebble builds every URL (and checks every JWS ``url``) against the injector's address.
    The directory gains ``renewalInfo`` pointing here; ``GET {renewalInfo}/<certID>`` is
    answered with ``renewal_window`` (start, end offsets from now) and ``Retry-After:
    renewal_retry_after``. ``seen`` records every request, ``injected`` set on the ones a
    rule answered.
    """

    pebble: Pebble
    rules: list[Rule] = field(default_factory=list)
    advertise_renewal_info: bool = True
    renewal_window: tuple[timedelta, timedelta] = (timedelta(days=30), timedelta(days=31))
    renewal_retry_after: int = 21600
    seen: list[InjectedRequest] = field(default_factory=list)
    port: int = 0
    # Path -> directory name (newOrder, newNonce, ...), learnt from the directory it relays.
    endpoints: dict[str, str] = field(default_factory=dict)

    def count(self, endpoint: str, *, since: float = 0.0) -> int:
        """Requests to ``endpoint`` (a directory name, e.g. "newOrder") seen at or after the
        time ``since``, relayed or answered by a rule alike."""
        return sum(1 for r in list(self.seen) if r.endpoint == endpoint and r.at >= since)

    @property
    def base_url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def directory_url(self) -> str:
        return f"{self.base_url}/dir"

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        leaf = self.pebble.https_ca.issue_cert("127.0.0.1", "localhost")
        server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        leaf.configure_cert(server_ctx)
        server_ctx.set_alpn_protocols(["http/1.1"])
        upstream_verify = ssl.create_default_context(cafile=self.pebble.ca_bundle_path)
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        async with httpx.AsyncClient(verify=upstream_verify, timeout=15.0) as upstream:

            async def handle(stream: trio.SocketStream) -> None:
                tls = trio.SSLStream(stream, server_ctx, server_side=True)
                try:
                    await self._connection(tls, upstream)
                except (trio.BrokenResourceError, trio.ClosedResourceError, ssl.SSLError):
                    pass
                finally:
                    await trio.aclose_forcefully(tls)

            task_status.started()
            await trio.serve_listeners(handle, listeners)

    async def _connection(self, tls: trio.SSLStream[trio.SocketStream], upstream: Any) -> None:
        conn = h11.Connection(h11.SERVER)
        while True:
            request, body = await self._read_request(conn, tls)
            if request is None:
                return
            answer = await self._answer(request, body, upstream)
            if answer is None:
                return  # a rule asked to hang up
            status, headers, payload = answer
            headers = [*headers, ("Content-Length", str(len(payload)))]
            data = conn.send(h11.Response(status_code=status, headers=headers))
            data = (data or b"") + (conn.send(h11.Data(data=payload)) or b"")
            data += conn.send(h11.EndOfMessage()) or b""
            await tls.send_all(data)
            if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
                return
            conn.start_next_cycle()

    async def _read_request(
        self, conn: h11.Connection, tls: trio.SSLStream[trio.SocketStream]
    ) -> tuple[h11.Request | None, bytes]:
        request: h11.Request | None = None
        body = b""
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await tls.receive_some(65536)
                if not data and request is None:
                    return None, b""
                conn.receive_data(bytes(data))
            elif isinstance(event, h11.Request):
                request = event
            elif isinstance(event, h11.Data):
                body += bytes(event.data)
            elif isinstance(event, h11.EndOfMessage):
                return request, body
            elif isinstance(event, h11.ConnectionClosed):
                return None, b""
            else:
                return None, b""

    def _record(self, request: h11.Request, body: bytes) -> InjectedRequest:
        headers = {k.decode().lower(): v.decode() for k, v in request.headers}
        seen = InjectedRequest(request.method.decode(), request.target.decode(), headers, body)
        seen.endpoint = self.endpoints.get(seen.path.split("?", 1)[0])
        if seen.method == "POST" and body:
            try:
                jose = json.loads(body)
                seen.jws_payload = decode_payload(jose)
                seen.jws_url = str(decode_protected(jose).get("url"))
            except (ValueError, KeyError, TypeError):
                pass
        self.seen.append(seen)
        return seen

    async def _answer(
        self, request: h11.Request, body: bytes, upstream: Any
    ) -> tuple[int, list[tuple[str, str]], bytes] | None:
        seen = self._record(request, body)
        for rule in self.rules:
            reply = rule(seen)
            if reply is not None:
                seen.injected = True
                if reply.status == 0:
                    return None
                return reply.status, list(reply.headers), reply.body
        if seen.method == "GET" and seen.path.startswith("/renewal-info/"):
            return self._renewal_info()
        response = await upstream.request(
            seen.method,
            f"{self.pebble.base_url}{seen.path}",
            content=body or None,
            headers=[(k, v) for k, v in seen.headers.items() if k not in _HOP_BY_HOP],
        )
        payload = response.content.replace(self.pebble.base_url.encode(), self.base_url.encode())
        if seen.path == "/dir" and response.status_code == 200:
            directory = json.loads(payload)
            if self.advertise_renewal_info:
                directory["renewalInfo"] = f"{self.base_url}/renewal-info"
                payload = json.dumps(directory).encode()
            for name, url in directory.items():
                if isinstance(url, str) and url.startswith(self.base_url):
                    self.endpoints[url[len(self.base_url) :]] = name
        headers = [
            (k, v.replace(self.pebble.base_url, self.base_url))
            for k, v in response.headers.multi_items()
            if k.lower() not in _HOP_BY_HOP
        ]
        return response.status_code, headers, payload

    def _renewal_info(self) -> tuple[int, list[tuple[str, str]], bytes]:
        now = datetime.now(UTC).replace(microsecond=0)
        start, end = (now + offset for offset in self.renewal_window)
        body = json.dumps(
            {
                "suggestedWindow": {
                    "start": start.isoformat().replace("+00:00", "Z"),
                    "end": end.isoformat().replace("+00:00", "Z"),
                }
            }
        ).encode()
        headers = [
            ("Content-Type", "application/json"),
            ("Retry-After", str(self.renewal_retry_after)),
        ]
        return 200, headers, body


@contextmanager
def serve_in_thread(injector: FaultInjector) -> Iterator[FaultInjector]:
    """Serve ``injector`` from its own trio loop in a thread, for tests that drive real
    processes with blocking calls (the injector keeps answering while the test sleeps).
    Rules and counts are plain attributes, safe to change and read from the test's thread."""
    started = threading.Event()
    state: dict[str, Any] = {}

    async def main() -> None:
        with trio.CancelScope() as scope:
            state["token"], state["scope"] = trio.lowlevel.current_trio_token(), scope
            async with trio.open_nursery() as nursery:
                await nursery.start(injector.serve)
                started.set()

    def run() -> None:
        try:
            trio.run(main)
        except BaseException as exc:  # reported to the test's thread below
            state["error"] = exc
        finally:
            started.set()

    thread = threading.Thread(target=run, name="fault-injector", daemon=True)
    thread.start()
    started.wait(30)
    if "error" in state or not injector.port:
        raise RuntimeError(f"the fault injector did not start: {state.get('error')!r}")
    try:
        yield injector
    finally:
        trio.from_thread.run_sync(state["scope"].cancel, trio_token=state["token"])
        thread.join(10)


@contextmanager
def pebbles(tmp_path: Path) -> Iterator[Callable[..., Pebble]]:
    """``make(tls_port=..., env=..., ...)`` (``start_pebble``'s keywords) -> a running pebble;
    every pebble made is stopped on leaving, pass or fail."""
    started: list[Pebble] = []

    def make(**kwargs: Any) -> Pebble:
        pebble = start_pebble(tmp_path, **kwargs)
        started.append(pebble)
        return pebble

    try:
        yield make
    finally:
        for pebble in started:
            pebble.stop()
