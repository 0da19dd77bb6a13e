"""Audit log: security events written to the store, and the retention job that prunes them.

Actions are dotted names (`auth.register`, `auth.login.success`, `auth.login.failure`,
`auth.refresh.reuse`, `auth.logout`, `server.jwt_secret.generated`, ...). `detail` is a
small JSON object; it must never carry passwords, tokens or secrets.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any

import trio

from securecollab.ids import now_ms
from securecollab.store import AuditRecord, Store, StoreError

log = logging.getLogger("securecollab.audit")

DAY_MS = 86_400_000


class AuditService:
    """Records security events; `prune_forever` enforces the retention period."""

    def __init__(self, store: Store, *, retention_days: int = 90) -> None:
        self._store = store
        self.retention_days = retention_days

    async def record(
        self,
        actor: str | None,
        action: str,
        target: str | None = None,
        ip: str | None = None,
        detail: Mapping[str, Any] | str | None = None,
    ) -> None:
        """Append one event (durable when this returns); times are the server's clock."""
        text = detail if isinstance(detail, str) or detail is None else json.dumps(dict(detail))
        await self._store.append_audit(
            AuditRecord(actor=actor, action=action, target=target, at=now_ms(), ip=ip, detail=text)
        )
        log.info(
            "audit",
            extra={"fields": {"action": action, "actor": actor, "target": target, "ip": ip}},
        )

    async def list(
        self, *, actor: str | None = None, action_prefix: str | None = None, limit: int = 100
    ) -> list[AuditRecord]:
        """Newest first (for admins and tests)."""
        return await self._store.list_audit(actor=actor, action_prefix=action_prefix, limit=limit)

    async def prune(self, now: int | None = None) -> int:
        """Delete entries older than the retention period; return how many."""
        now = now_ms() if now is None else now
        return await self._store.prune_audit(now - self.retention_days * DAY_MS)

    async def prune_forever(self, interval_s: float) -> None:
        """Prune now, then every `interval_s` seconds, until cancelled.

        A failing store (e.g. PostgreSQL restarting) is logged and retried next round;
        it must not take the process down.
        """
        while True:
            try:
                removed = await self.prune()
                if removed:
                    log.info("audit pruned", extra={"fields": {"removed": removed}})
            except StoreError as e:
                log.warning("audit prune failed", extra={"fields": {"error": str(e)}})
            await trio.sleep(interval_s)
