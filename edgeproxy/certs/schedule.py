"""When each stored certificate renews: its renewal plan and its ARI state (RFC 9773).

Owns: the status's renewal time, source and reason; asking the issuer for the ARI window,
storing it per certificate, spacing out failed ARI checks (long-term and short-term errors);
whether a renewal may name the old certificate in ``replaces``.
Must not know: ordering, the maintenance pass's order of work.
"""

from __future__ import annotations

import logging
import random

from ..acme import ari
from ..errors import StorageError
from ..issuers.base import IssuanceError, RenewalInfoError
from ..issuers.fallback import issuer_for
from ..timefmt import iso_utc
from .cache import CertificateCache
from .record import AriState, CertRecord, RecordError, ari_key
from .renewal import RenewalPlan, plan_renewal

log = logging.getLogger("edgeproxy.certs")

ARI_CHECK_INTERVAL = 12 * 3600.0


class RenewalSchedule(CertificateCache):
    """The renewal-time layer of ``CertificateManager`` (layers: ``certs/manager_state.py``)."""

    async def _plan(self, rec: CertRecord, now: float) -> tuple[RenewalPlan, float | None]:
        """When to renew ``rec``, and when its ARI window should be asked for next."""
        ari_state = await self._ari_state(rec, now)
        window = ari_state.window if ari_state else None
        # Seeded by serial and window: every pass and every replica picks the same random
        # moment for this certificate, so the schedule neither drifts nor disagrees.
        rand = random.Random(f"{rec.serial}/{window}").random
        plan = plan_renewal(
            rec.not_before,
            rec.not_after,
            now,
            ari_start=window[0] if window else None,
            ari_end=window[1] if window else None,
            rand=rand,
        )
        reason = self._renewal_reason(rec, plan, ari_state)
        ari_next = ari_state.next_check if ari_state is not None else None
        st = self._status.get(rec.name)
        if st is None or (st.renew_at, st.renewal_source, st.ari_window, st.renewal_reason) != (
            plan.at,
            plan.source,
            window,
            reason,
        ):
            self._set_status(
                rec.name,
                renew_at=plan.at,
                renewal_source=plan.source,
                renewal_reason=reason,
                ari_window=window,
                not_after=rec.not_after,
                issuer=rec.issuer_id,
                **({"state": "valid"} if st is None else {}),
            )
        return plan, ari_next

    def _renewal_reason(
        self, rec: CertRecord, plan: RenewalPlan, ari_state: AriState | None
    ) -> str:
        """The operator's "why this renewal time?", in words for the status."""
        if plan.source == "expiring":
            return "in the last 5% of its lifetime: renewing now whatever ARI says"
        if plan.source == "ari":
            extra = (
                f" ({ari_state.explanation_url})" if ari_state and ari_state.explanation_url else ""
            )
            return f"a random time inside the CA's ARI window{extra}"
        if issuer_for(self.issuer, rec.issuer_id) is None:
            return f"issued by {rec.issuer_id}, not a configured issuer: no ARI, backstop"
        if ari_state is None:
            return "the issuer offers no ARI (RFC 9773): backstop"
        if ari_state.error is not None:
            if ari_state.long_term:
                what = "the CA has no ARI for this certificate (renewal sends no replaces)"
            else:
                what = f"ARI request failed {ari_state.failures} time(s) in a row"
            return (
                f"backstop: {what}: {ari_state.error}; "
                f"next ARI check {iso_utc(ari_state.next_check)}"
            )
        return "backstop: the CA's ARI window lies past the backstop"

    async def _stored_ari(self, rec: CertRecord) -> AriState | None:
        """The stored ARI state for exactly this certificate (a renewed one starts afresh)."""
        raw = await self.storage.get(ari_key(rec.name))
        if raw is None:
            return None
        try:
            state = AriState.from_json(raw)
        except RecordError:
            return None
        return state if state.serial == rec.serial else None

    async def _ari_state(self, rec: CertRecord, now: float) -> AriState | None:
        issuer = issuer_for(self.issuer, rec.issuer_id)
        if issuer is None:
            return None
        state = await self._stored_ari(rec)
        if state is not None and state.next_check > now:
            return state
        try:
            window = await issuer.renewal_window(rec.chain_pem.encode())
        except IssuanceError as exc:
            # RFC 9773 s4.3.3: a long-term error (the CA does not know this CertID) is asked
            # about again after six hours, short-term ones with backoff; never every pass.
            typed = exc if isinstance(exc, RenewalInfoError) else None
            long_term = typed is not None and typed.long_term
            status = typed.status if typed is not None else 0
            failures = (state.failures if state is not None and state.error else 0) + 1
            delay = ari.error_retry_delay(long_term, failures, exc.failure.retry_after)
            log.info(
                "ARI check for %s failed (%s, next in %.0fs): %s",
                rec.name,
                "long-term" if long_term else "short-term",
                delay,
                exc,
            )
            # A short-term failure keeps the last window (the CA has not withdrawn it); a
            # long-term one means there is none for this certificate.
            keep = state is not None and not long_term
            state = AriState(
                serial=rec.serial,
                start=state.start if keep and state is not None else None,
                end=state.end if keep and state is not None else None,
                explanation_url=state.explanation_url if keep and state is not None else None,
                next_check=now + delay,
                error=f"{exc}" + (f" (HTTP {status})" if status else ""),
                long_term=long_term,
                failures=failures,
            )
        else:
            if window is None:
                return None
            retry = window.retry_after if window.retry_after is not None else ARI_CHECK_INTERVAL
            state = AriState(
                serial=rec.serial,
                start=window.start.timestamp(),
                end=window.end.timestamp(),
                explanation_url=window.explanation_url,
                next_check=now + retry,
            )
        try:
            await self.storage.put(ari_key(rec.name), state.to_json())
        except StorageError as exc:
            log.debug("could not store ARI state for %s: %s", rec.name, exc)
        return state

    async def _replaces_allowed(self, old: CertRecord) -> bool:
        """May a renewal of ``old`` name it in ``replaces``? Not when the CA said it has no
        ARI for it: such a CA would refuse the order (it is retried without, but why ask)."""
        if issuer_for(self.issuer, old.issuer_id) is None:
            return False
        try:
            state = await self._stored_ari(old)
        except StorageError:
            return True  # the client drops replaces by itself if the CA objects
        return state is None or not state.long_term
