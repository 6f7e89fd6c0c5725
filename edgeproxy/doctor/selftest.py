"""The self-test token: the proof that a connection reached an edgeproxy of *this* deployment.

Owns: publishing a random key authorization in the deployment's storage exactly as the ACME
issuer does (or reusing a pending real one, never overwriting it), and withdrawing only our
own afterwards. Must not know: how the token is checked on the wire (``probe``, ``judge``).
"""

from __future__ import annotations

import contextlib
import secrets
from typing import Final

import trio

from ..certs.challenges import NEGATIVE_TTL
from ..errors import StorageError
from ..storage.base import Storage
from .report import Finding

SELF_TEST_TTL: Final = 60.0
TOKEN_PREFIX: Final = "doctor-"


async def publish_self_test(storage: Storage, name: str) -> tuple[str | None, bool, Finding]:
    """(key authorization to expect, whether we wrote it, finding)."""
    try:
        pending = await storage.get_challenge(name)
        if pending is not None:
            seen = (
                f"another doctor run's self-test token for {name} is pending: used it"
                if pending.startswith(TOKEN_PREFIX)
                else f"a real TLS-ALPN-01 validation for {name} is pending: used its key "
                "authorization as the token and left storage untouched"
            )
            return pending, False, Finding("storage", True, seen)
        # Same shape as an ACME key authorization (token "." thumbprint), ASCII only.
        token = f"{TOKEN_PREFIX}{secrets.token_urlsafe(24)}.{secrets.token_urlsafe(32)}"
        await storage.put_challenge(name, token, SELF_TEST_TTL)
        # A running edgeproxy believes a miss for this name for NEGATIVE_TTL (acme-tls/1
        # floods): ask only once any miss from before the write has expired, as the issuer does.
        await trio.sleep(NEGATIVE_TTL)
    except (StorageError, OSError) as exc:
        return (
            None,
            False,
            Finding(
                "storage",
                False,
                f"could not publish the self-test challenge in storage: {exc}",
                "run doctor as the user edgeproxy runs as, with the same config, so it can "
                "write the deployment's storage",
            ),
        )
    return (
        token,
        True,
        Finding(
            "storage",
            True,
            f"published a self-test challenge for {name} in the deployment's storage "
            f"(expires in {SELF_TEST_TTL:g}s, withdrawn afterwards)",
        ),
    )


async def withdraw_self_test(storage: Storage, name: str, token: str | None) -> None:
    # A real issuance may have replaced our token meanwhile: withdraw only our own. (The
    # check and the delete are two steps; the window is a storage round trip.)
    with contextlib.suppress(StorageError, OSError):
        if await storage.get_challenge(name) == token:
            await storage.delete_challenge(name)
