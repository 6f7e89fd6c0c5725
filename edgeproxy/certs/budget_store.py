"""The CA budgets kept in storage, shared by every worker and replica and kept across restarts.

One call gates an order: ``admit(names, kind, failures)`` takes the short ``budgets`` lease,
reads the records the order draws on, asks ``budgets.decide`` and, when it says go, writes
them back with this order counted, all before the lease is released, so two processes never
both take the last unit of a budget. The records (JSON, each pruned to its window on every
write, so bounded by the limit's count):

* ``budgets/account/<hash of the issuer id>.json``: the account's order times, and apart from
  them its ARI-timed renewals (exempt, kept for the operator);
* ``budgets/domain/<registered domain>.json``: certificates of that registered domain;
* ``budgets/names/<name>.json``: certificates of that exact name set (a hash for several).

The failed validations of a name are not a record here: the name's shared backoff record
(``backoff/<name>.json``) keeps their times and the caller passes them in.

An order that brings no certificate gives back its certificate units (``refund``); its order
unit stays spent, as at the CA. The gauges say what this process last saw in storage.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import KW_ONLY, dataclass, field

from .. import metrics
from ..errors import StorageError
from ..storage.base import LockInfo, Storage
from ..storage.locks import hold_lock, make_owner_id
from .budgets import (
    LIMIT_NAMES,
    PERIODS,
    LimitName,
    Limits,
    OrderKind,
    Usage,
    Wait,
    charge,
    decide,
    prune,
    refund,
    registered_domain,
    remaining,
)

LOCK = "budgets"
# Keys whose usage the gauges are computed from (per-domain and per-name-set limits): the
# most used of the last ones this process looked at.
SEEN_KEYS = 4096


@dataclass(frozen=True, slots=True)
class Admitted:
    """Go: the order is counted at ``at`` (what ``refund`` needs if it brings nothing)."""

    at: float


def account_key(issuer_id: str) -> str:
    digest = hashlib.sha256(issuer_id.encode()).hexdigest()[:32]
    return f"budgets/account/{digest}.json"


def domain_key(name: str) -> str:
    return f"budgets/domain/{registered_domain(name)}.json"


def name_set_key(names: Sequence[str]) -> str:
    unique = sorted(set(names))
    if len(unique) == 1:
        return f"budgets/names/{unique[0]}.json"
    digest = hashlib.sha256("\n".join(unique).encode()).hexdigest()[:32]
    return f"budgets/names/set-{digest}.json"


@dataclass(eq=False)
class CaBudgets:
    storage: Storage
    limits: Limits
    _: KW_ONLY
    account: str
    clock: Callable[[], float] = time.time
    lock_ttl: float = 10.0
    lock_wait: float = 10.0
    _owner: str = field(default_factory=make_owner_id, init=False, repr=False)
    # (limit, key) -> times last seen in storage, most recent last; bounded.
    _seen: OrderedDict[tuple[LimitName, str], tuple[float, ...]] = field(
        default_factory=OrderedDict, init=False, repr=False
    )
    _ari: tuple[float, ...] = field(default=(), init=False, repr=False)

    async def admit(
        self, names: Sequence[str], kind: OrderKind, failures: Sequence[float] = ()
    ) -> Admitted | Wait:
        """May an order for ``names`` go now? If so it is counted; else when it may."""
        if not any(self.limits.count(limit) for limit in LIMIT_NAMES):
            return Admitted(self.clock())  # every limit off: nothing to keep, no storage
        async with self._lease():
            now = self.clock()
            acct = await self._read(account_key(self.account))
            dom = await self._read(domain_key(names[0]))
            dup = await self._read(name_set_key(names))
            usage = Usage(
                orders=_times(acct, "orders"),
                certificates=_times(dom, "certificates"),
                failures=tuple(failures),
                duplicates=_times(dup, "certificates"),
            )
            decision = decide(self.limits, usage, now, kind)
            ari = prune(_times(acct, "ari"), now, PERIODS["new_orders_per_account"])
            if isinstance(decision, Wait):
                self._observe(names, usage, ari, now)
                return decision
            if kind == "ari":
                ari = (*ari, now)
            after = charge(usage, now, kind)
            await self._write(account_key(self.account), {"orders": after.orders, "ari": ari})
            await self._write(domain_key(names[0]), {"certificates": after.certificates})
            await self._write(name_set_key(names), {"certificates": after.duplicates})
            self._observe(names, after, ari, now)
            return Admitted(now)

    async def refund(self, names: Sequence[str], at: float) -> None:
        """The order admitted at ``at`` brought no certificate: give back its certificate
        units (domain and name set). Best effort: a unit not given back only errs on the
        safe side until it leaves the window."""
        try:
            async with self._lease():
                for key in (domain_key(names[0]), name_set_key(names)):
                    record = await self._read(key)
                    times = _times(record, "certificates")
                    if at in times:
                        await self._write(key, {"certificates": refund(times, at)})
        except StorageError:
            return

    def update_metrics(self) -> None:
        """Set ``edgeproxy_acme_budget_remaining`` from what this process last saw (also
        called by maintenance, so windows emptying over time show without any order)."""
        now = self.clock()
        lowest: dict[LimitName, int] = {}
        for (limit, _key), times in self._seen.items():
            left = remaining(times, now, self.limits.count(limit), PERIODS[limit])
            if left is not None:
                lowest[limit] = min(left, lowest.get(limit, left))
        for limit in LIMIT_NAMES:
            count = self.limits.count(limit)
            # +Inf: switched off.
            value = float("inf") if count <= 0 else float(lowest.get(limit, count))
            metrics.ACME_BUDGET_REMAINING.labels(limit).set(value)
        ari = prune(self._ari, now, PERIODS["new_orders_per_account"])
        metrics.ACME_BUDGET_EXEMPT_ORDERS.set(len(ari))

    def _observe(
        self, names: Sequence[str], usage: Usage, ari: tuple[float, ...], now: float
    ) -> None:
        keyed: list[tuple[LimitName, str]] = [
            ("new_orders_per_account", account_key(self.account)),
            ("certificates_per_registered_domain", domain_key(names[0])),
            ("failed_validations_per_hostname", names[0]),
            ("duplicate_certificates", name_set_key(names)),
        ]
        for limit, key in keyed:
            self._seen.pop((limit, key), None)
            self._seen[(limit, key)] = prune(usage.times(limit), now, PERIODS[limit])
        while len(self._seen) > SEEN_KEYS:
            self._seen.popitem(last=False)
        self._ari = ari
        self.update_metrics()

    def _lease(self) -> AbstractAsyncContextManager[LockInfo]:
        # A fresh owner per call: a lease is re-entrant for its owner, and two tasks of this
        # process must not share one.
        return hold_lock(
            self.storage,
            LOCK,
            owner=f"{self._owner}:{secrets.token_hex(4)}",
            ttl=self.lock_ttl,
            wait=self.lock_wait,
            poll=0.05,
        )

    async def _read(self, key: str) -> dict[str, object]:
        raw = await self.storage.get(key)
        if raw is None:
            return {}
        try:
            record = json.loads(raw)
        except ValueError:
            return {}  # unreadable: as if empty (the write under this lease replaces it)
        return record if isinstance(record, dict) else {}

    async def _write(self, key: str, record: dict[str, tuple[float, ...]]) -> None:
        await self.storage.put(key, json.dumps(record, sort_keys=True).encode())


def _times(record: dict[str, object], field: str) -> tuple[float, ...]:
    value = record.get(field)
    if not isinstance(value, list):
        return ()
    return tuple(float(t) for t in value if isinstance(t, (int, float)) and not isinstance(t, bool))
