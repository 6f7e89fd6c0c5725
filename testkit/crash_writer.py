"""Child processes for storage tests that need real processes: SIGKILL, contention, races.

Run as ``python -m testkit.crash_writer MODE SPEC ...`` (``Children`` does it for you).
``SPEC`` says how the child opens the storage under test, so the same modes serve every backend:
``file:<root>`` today; a PostgreSQL backend adds its scheme to ``open_storage``.

Modes:

``put-loop SPEC KEY SIZE``
    Prints ``ready``, then puts complete, self-checking values of SIZE bytes under KEY forever
    (``secret=True``), printing ``wrote`` once after the first put. The test SIGKILLs it.
``lock-counter SPEC NAME COUNTER_KEY ITERATIONS``
    ITERATIONS times: take lease NAME (spin on ``try_lock``), read the counter, pause, write it
    back plus one, unlock. Lost updates prove two holders at once.
``race SPEC``
    Prints ``ready OWNER``; then for each lease name read from stdin calls ``try_lock`` once and
    prints ``NAME 1`` (won) or ``NAME 0``.
``hold SPEC NAME TTL``
    Takes lease NAME for TTL seconds, prints ``held OWNER`` and sleeps until killed.
"""

from __future__ import annotations

import hashlib
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import trio

from edgeproxy.storage import FileStorage, Storage, make_owner_id
from testkit.procs import StopsOnExit

REPO_ROOT = Path(__file__).resolve().parents[1]

_MAGIC = b"EPV1"
_DIGEST = 32


def open_storage(spec: str, *, clock: Callable[[], float] = time.time) -> Storage:
    scheme, _, rest = spec.partition(":")
    if scheme == "file":
        return FileStorage(rest, clock=clock)
    if scheme == "postgres":
        from edgeproxy.storage.postgres import PostgresStorage  # psycopg only when asked for

        return PostgresStorage(rest, clock=clock)
    raise ValueError(f"unknown storage spec {spec!r}")


def make_value(serial: int, size: int) -> bytes:
    """``size`` bytes that prove themselves complete: magic, serial, filler, SHA-256 of it all."""
    head = _MAGIC + serial.to_bytes(8, "big")
    filler_len = size - len(head) - _DIGEST
    seed = hashlib.sha256(head).digest()
    filler = (seed * (filler_len // len(seed) + 1))[:filler_len]
    body = head + filler
    return body + hashlib.sha256(body).digest()


def is_complete_value(data: bytes, size: int) -> bool:
    if len(data) != size or not data.startswith(_MAGIC):
        return False
    body, digest = data[:-_DIGEST], data[-_DIGEST:]
    return hashlib.sha256(body).digest() == digest


class Children(StopsOnExit):
    """Starts helper processes; on exit (``stop``) SIGKILLs and reaps every one still running."""

    def __init__(self) -> None:
        self._procs: list[subprocess.Popen[str]] = []

    def start(self, mode: str, *args: str) -> subprocess.Popen[str]:
        env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
        proc = subprocess.Popen(
            [sys.executable, "-m", "testkit.crash_writer", mode, *args],
            cwd=REPO_ROOT,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
        )
        self._procs.append(proc)
        return proc

    def stop(self) -> None:
        for proc in self._procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
            proc.wait()
            for stream in (proc.stdin, proc.stdout):
                if stream is not None:
                    stream.close()


async def _put_loop(storage: Storage, key: str, size: int) -> None:
    print("ready", flush=True)
    serial = 0
    while True:
        await storage.put(key, make_value(serial, size), secret=True)
        if serial == 0:
            print("wrote", flush=True)
        serial += 1


async def _lock_counter(storage: Storage, name: str, counter_key: str, iterations: int) -> None:
    owner = make_owner_id()
    for _ in range(iterations):
        while True:  # spin with jitter, as several waiters on one lease would
            if await storage.try_lock(name, owner, 30.0):
                break
            await trio.sleep(random.uniform(0, 0.002))
        try:
            raw = await storage.get(counter_key)
            count = int(raw) if raw else 0
            await trio.sleep(0.001)  # widen the window in which a second holder would interleave
            await storage.put(counter_key, str(count + 1).encode())
        finally:
            await storage.unlock(name, owner)


async def _race(storage: Storage) -> None:
    owner = make_owner_id()
    print(f"ready {owner}", flush=True)
    while line := await trio.to_thread.run_sync(sys.stdin.readline):
        name = line.strip()
        won = await storage.try_lock(name, owner, 60.0)
        print(f"{name} {int(won)}", flush=True)


async def _hold(storage: Storage, name: str, ttl: float) -> None:
    owner = make_owner_id()
    if not await storage.try_lock(name, owner, ttl):
        raise SystemExit(f"lease {name!r} is not free")
    print(f"held {owner}", flush=True)
    await trio.sleep_forever()


async def _run(mode: str, spec: str, rest: list[str]) -> None:
    storage = open_storage(spec)
    try:
        if mode == "put-loop":
            key, size = rest
            await _put_loop(storage, key, int(size))
        elif mode == "lock-counter":
            name, counter_key, iterations = rest
            await _lock_counter(storage, name, counter_key, int(iterations))
        elif mode == "race":
            await _race(storage)
        elif mode == "hold":
            name, ttl = rest
            await _hold(storage, name, float(ttl))
        else:
            raise SystemExit(f"unknown mode {mode!r}")
    finally:
        await storage.aclose()


def main(argv: list[str]) -> None:
    mode, spec, *rest = argv
    trio.run(_run, mode, spec, rest)


if __name__ == "__main__":
    main(sys.argv[1:])
