"""Storage health as the certificate manager sees it: ``edgeproxy storage check`` and ``clean``.

The backend reports its own problems (leftover temp files, stale locks, expired challenges,
permissions); on top of that every certificate record must parse and its key must match its
certificate. Cleaning prunes certificates expired for longer than a grace period.

Cleaning never deletes a certificate that is still valid, whatever the grace period: the
check is on ``not_after`` itself, here where the deletion happens, not only on the command
line's options (a negative grace once deleted three valid certificates).
"""

from __future__ import annotations

import time

from ..errors import CorruptRecord, StorageError
from ..storage.base import Storage
from .record import CertRecord, RecordError, ari_key
from .status_store import status_key


async def check_storage(storage: Storage, *, now: float | None = None) -> list[str]:
    now = time.time() if now is None else now
    problems: list[str] = []
    upkeep = storage.capabilities.upkeep
    if upkeep is not None:
        problems.extend(await upkeep.check())
    else:
        for lock in await storage.list_locks():
            if lock.expires_at < now:
                problems.append(f"lock {lock.name}: expired, held by {lock.owner}")
    for item in await storage.list("certs/"):
        try:
            raw = await storage.get(item.key)
        except CorruptRecord as exc:
            # Sealed with another key, or no key configured: the backend's check names it.
            if not any(item.key in p for p in problems):
                problems.append(f"{item.key}: {exc}")
            continue
        if raw is None:
            continue
        try:
            CertRecord.from_json(raw)
        except RecordError as exc:
            problems.append(f"{item.key}: {exc}")
    return problems


#: Longest grace ``clean`` accepts (ten years): a larger one keeps everything forever anyway,
#: so it is a typo, not a policy.
MAX_GRACE_DAYS = 3650


def check_grace(grace: float) -> float:
    """``grace`` (seconds) if it is a sane retention period; ValueError otherwise."""
    if not 0 <= grace <= MAX_GRACE_DAYS * 86400.0:  # NaN fails too
        raise ValueError(
            f"grace must be between 0 and {MAX_GRACE_DAYS} days, got {grace / 86400.0!r} days"
        )
    return grace


async def clean_storage(storage: Storage, grace: float, *, now: float | None = None) -> list[str]:
    grace = check_grace(grace)
    now = time.time() if now is None else now
    removed: list[str] = []
    upkeep = storage.capabilities.upkeep
    if upkeep is not None:
        removed.extend(await upkeep.clean(now=now))
    for lock in await storage.list_locks():
        if lock.expires_at < now:
            await storage.unlock(lock.name, lock.owner)
            removed.append(f"lock {lock.name}")
    for name, expires in await storage.list_challenges():
        if expires < now:
            await storage.delete_challenge(name)
            removed.append(f"challenge {name}")
    for item in await storage.list("certs/"):
        try:
            raw = await storage.get(item.key)
        except CorruptRecord:
            # Undecryptable is not expired: most likely the wrong key is configured, and the
            # record is fine for whoever has the right one. check reports it; leave it be.
            continue
        if raw is None:
            continue
        try:
            rec = CertRecord.from_json(raw)
        except RecordError as exc:
            await storage.quarantine(item.key, str(exc))
            removed.append(f"{item.key} (quarantined: {exc})")
            continue
        # ``not_after < now`` on its own as well: an unexpired certificate stays, even if a
        # caller's grace arithmetic went wrong.
        if rec.not_after < now and rec.not_after + grace < now:
            try:
                await storage.delete(item.key)
                await storage.delete(status_key(rec.name))
                await storage.delete(ari_key(rec.name))
            except StorageError:
                continue
            removed.append(
                f"{item.key} (expired {time.strftime('%Y-%m-%d', time.gmtime(rec.not_after))})"
            )
    return list(dict.fromkeys(removed))
