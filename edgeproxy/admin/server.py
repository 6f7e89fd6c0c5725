"""Runs the admin ASGI app on hypercorn's trio worker, inside the process's own event loop.

Owns the admin listening socket and the server's lifecycle: bind, tell the caller the address,
serve, and shut down gracefully when the surrounding nursery is cancelled. It must not know
what the endpoints do (``app.py`` does).

Theory of operation
-------------------
*Binding.* We bind the socket ourselves and hand hypercorn a duplicate as ``fd://N``. That way a
busy port fails here as a plain ``OSError`` (turned into a ``ConfigError`` naming the key), not
deep inside hypercorn's nurseries, and we learn the real address when the config says port 0.

*Graceful stop on cancellation.* Cancellation would kill in-flight requests mid-response, so
hypercorn runs inside a shielded scope with a ``shutdown_trigger``. A watcher task outside the
shield notices the cancellation, pulls the trigger and puts a deadline on the shield: hypercorn
stops accepting, lets requests finish for up to ``GRACEFUL_TIMEOUT`` and returns; the deadline
is the backstop so shutdown can never hang on a stuck request.
"""

from __future__ import annotations

import logging
import os
import socket
from functools import partial
from typing import Protocol, cast

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve
from hypercorn.typing import ASGIFramework

from ..addresses import HostPort, bound_socket
from ..errors import ConfigError
from .app import AdminRuntime, ASGIApp, make_admin_app

log = logging.getLogger("edgeproxy.admin")

#: Seconds in-flight admin requests get to finish once the process shuts down.
GRACEFUL_TIMEOUT = 3.0
#: Extra margin on top before the shield's deadline cuts hypercorn off regardless.
_SHUTDOWN_BACKSTOP = 2.0


class ServedRuntime(AdminRuntime, Protocol):
    """What ``serve_admin`` needs besides the app's view: a place for the bound address."""

    admin_bound: tuple[str, int] | None


class AdminListen(Protocol):
    """Where to listen and the tokens guarding the API (``secret_env.AdminSecrets``)."""

    @property
    def where(self) -> HostPort: ...

    @property
    def token(self) -> str | None: ...

    @property
    def metrics_token(self) -> str | None: ...


async def serve_admin(
    rt: ServedRuntime,
    listen: AdminListen,
    *,
    reuse_port: bool = False,
    task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the admin API on ``listen.where`` until cancelled.

    ``task_status.started`` receives the bound ``(host, port)`` once the socket accepts
    connections; the same tuple is stored as ``rt.admin_bound``. ``reuse_port`` lets the
    worker processes of one edgeproxy share the admin port (SO_REUSEPORT).
    """
    sock = _bind(listen.where, reuse_port=reuse_port)
    try:
        bound = _addr(sock.getsockname())
        config = _hypercorn_config(os.dup(sock.fileno()))
        app = make_admin_app(rt, token=listen.token, metrics_token=listen.metrics_token)
        await _serve_until_cancelled(app, config, bound, rt, task_status)
    finally:
        sock.close()


def _bind(where: HostPort, *, reuse_port: bool = False) -> socket.socket:
    try:
        return bound_socket(where, reuse_port=reuse_port)
    except OSError as exc:
        raise ConfigError(
            [
                f"admin.listen: cannot listen on {where} ({exc.strerror}) "
                "(free the port or change it)"
            ]
        ) from None


def _hypercorn_config(fd: int) -> HypercornConfig:
    config = HypercornConfig()
    config.bind = [f"fd://{fd}"]
    config.accesslog = None
    # Hypercorn's own messages go through our logging setup instead of a stderr handler.
    config.errorlog = logging.getLogger("edgeproxy.admin.http")
    config.graceful_timeout = GRACEFUL_TIMEOUT
    config.include_server_header = False
    return config


async def _serve_until_cancelled(
    app: ASGIApp,
    config: HypercornConfig,
    bound: tuple[str, int],
    rt: ServedRuntime,
    task_status: trio.TaskStatus[tuple[str, int]],
) -> None:
    shutdown = trio.Event()
    shield = trio.CancelScope(shield=True)

    async def stop_on_cancel() -> None:
        try:
            await trio.sleep_forever()
        finally:
            shutdown.set()
            shield.deadline = trio.current_time() + GRACEFUL_TIMEOUT + _SHUTDOWN_BACKSTOP

    async with trio.open_nursery() as outer:
        outer.start_soon(stop_on_cancel)
        with shield:
            async with trio.open_nursery() as inner:
                # The app types ASGI messages as plain mappings; hypercorn's are TypedDicts.
                framework = cast(ASGIFramework, app)
                await inner.start(partial(serve, framework, config, shutdown_trigger=shutdown.wait))
                rt.admin_bound = bound
                log.info("admin API listening on http://%s", _show(bound))
                task_status.started(bound)
        if shield.cancelled_caught:
            log.warning("admin API did not stop within %.0fs; cut off", GRACEFUL_TIMEOUT)
        # Hypercorn returned: either we asked it to, or it stopped on its own; end the watcher.
        outer.cancel_scope.cancel()


def _addr(sockname: tuple[str, int] | tuple[str, int, int, int]) -> tuple[str, int]:
    return sockname[0], sockname[1]


def _show(addr: tuple[str, int]) -> str:
    host, port = addr
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
