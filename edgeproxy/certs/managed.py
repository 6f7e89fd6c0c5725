"""Managed certificates (``[[acme.managed]]``): one certificate for listed names, wildcards too.

Owns: issuing each entry at start-up through DNS-01 (the only challenge a CA accepts for a
wildcard), renewing it once two thirds of its lifetime have passed, keeping it in storage
(``managed/<first name>.json``, secret) so replicas and restarts share it, and answering
``match(name)`` for the data path, where a managed certificate is matched like a
``[[certificates]]`` file (exact names first, then one-label wildcards).

Must not know: how DNS records are written (the issuer's solver) or on-demand policy: these
names are the operator's own, listed in the config, so nobody else is asked.

One entry's issuance is held under a storage lease: the replica that takes it issues, the
others find the new record when they get the lease (or at their next pass).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from typing import Protocol, cast

import trio
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes
from OpenSSL import SSL

from .. import metrics
from ..errors import StorageError
from ..issuers.base import IssuedCertificate, private_key_pem
from ..storage.base import Storage
from ..storage.locks import hold_lock, make_owner_id
from ..tls.contexts import build_server_context, generate_private_key
from .static import StaticCertificates

log = logging.getLogger("edgeproxy.managed")

RETRY_PAUSE = 60.0  # a failed entry is tried again this soon, not a whole interval later


class NamesIssuer(Protocol):
    async def issue_names(
        self,
        names: Sequence[str],
        private_key: CertificateIssuerPrivateKeyTypes,
        *,
        replacing: bytes | None = None,
        prefer: str | None = None,
    ) -> IssuedCertificate: ...


def storage_key(names: Sequence[str]) -> str:
    return f"managed/{names[0]}.json"


def due(cert: x509.Certificate, now: float) -> bool:
    """Renew once two thirds of the lifetime have passed (a 90-day certificate at day 60)."""
    start = cert.not_valid_before_utc.timestamp()
    end = cert.not_valid_after_utc.timestamp()
    return now >= start + (end - start) * 2 / 3


class ManagedCertificates:
    def __init__(
        self,
        entries: Sequence[Sequence[str]],
        *,
        storage: Storage,
        issuer: NamesIssuer,
        key_type: str = "ec256",
        renew_interval: float = 3600.0,
        lock_ttl: float = 60.0,
        issue_timeout: float = 300.0,
        session_tickets: bool = True,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.entries = [tuple(e) for e in entries]
        self._storage = storage
        self._issuer = issuer
        self._key_type = key_type
        self._renew_interval = renew_interval
        self._lock_ttl = lock_ttl
        self._issue_timeout = issue_timeout
        self._session_tickets = session_tickets
        self._clock = clock
        self._owner = make_owner_id()
        self._loaded: dict[tuple[str, ...], tuple[bytes, SSL.Context]] = {}
        self._index = StaticCertificates()
        self.errors: dict[tuple[str, ...], str] = {}

    def match(self, name: str) -> SSL.Context | None:
        return self._index.match(name)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            failed = await self.maintain_once()
            await trio.sleep(
                min(RETRY_PAUSE, self._renew_interval) if failed else self._renew_interval
            )

    async def maintain_once(self) -> bool:
        """Load, issue or renew every entry; True when one failed (it is retried sooner)."""
        failed = False
        for names in self.entries:
            try:
                await self._ensure(names)
            except Exception as exc:
                failed = True
                self.errors[names] = str(exc)
                metrics.BACKGROUND_TASK_ERRORS.labels("managed").inc()
                log.error("managed certificate for %s: %s", ", ".join(names), exc)
            else:
                self.errors.pop(names, None)
        return failed

    async def _ensure(self, names: tuple[str, ...]) -> None:
        chain = await self._read(names)
        if chain is not None and not due(chain[0], self._clock()):
            return
        async with hold_lock(
            self._storage, f"managed-{names[0]}", owner=self._owner, ttl=self._lock_ttl, wait=60
        ):
            chain = await self._read(names)  # another replica may have just renewed it
            if chain is not None and not due(chain[0], self._clock()):
                return
            key = cast(
                CertificateIssuerPrivateKeyTypes,
                generate_private_key(self._key_type),  # type: ignore[arg-type]
            )
            replacing = self._loaded.get(names, (None,))[0]
            with trio.fail_after(self._issue_timeout):
                issued = await self._issuer.issue_names(
                    names, key, replacing=replacing, prefer="dns-01"
                )
            record = {
                "names": list(names),
                "chain_pem": issued.chain_pem.decode(),
                "key_pem": private_key_pem(key),
                "issuer": issued.issuer_id,
            }
            await self._storage.put(storage_key(names), json.dumps(record).encode(), secret=True)
            log.info("managed certificate issued for %s", ", ".join(names))
        await self._read(names)

    async def _read(self, names: tuple[str, ...]) -> list[x509.Certificate] | None:
        """The stored chain for ``names``, loaded for serving when it changed."""
        raw = await self._storage.get(storage_key(names))
        if raw is None:
            return None
        try:
            d = json.loads(raw)
            chain_pem = d["chain_pem"].encode()
            chain = x509.load_pem_x509_certificates(chain_pem)
            if tuple(d["names"]) != names:
                return None  # the entry's names changed in the config: issue anew
            held = self._loaded.get(names)
            if held is None or held[0] != chain_pem:
                key = serialization.load_pem_private_key(d["key_pem"].encode(), password=None)
                ctx = build_server_context(chain, key, session_tickets=self._session_tickets)
                self._loaded[names] = (chain_pem, ctx)
                self._index = StaticCertificates([(n, ctx) for n, (_, ctx) in self._loaded.items()])
        except (ValueError, KeyError, TypeError, SSL.Error) as exc:
            raise StorageError(f"{storage_key(names)} is unreadable ({exc})") from None
        return chain
