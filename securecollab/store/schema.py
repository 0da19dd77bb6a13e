"""Versioned schema migrations: SQL files under `store/migrations/<dialect>/NNN_name.sql`.

Each file is applied once, in version order, inside a transaction that also records it
in the `schema_version` table (version, name, applied_at). A database whose highest
recorded version is above the newest file refuses to open (`SchemaTooNew`): it was
migrated by a newer release, and old code could corrupt it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache
from importlib import resources

from securecollab.store import SchemaTooNew

_NAME = re.compile(r"^(\d{3,})_([a-z0-9_]+)\.sql$")


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str


@cache
def migrations(dialect: str) -> tuple[Migration, ...]:
    """All migrations for `dialect` ("sqlite" or "postgres"), oldest first."""
    folder = resources.files("securecollab.store").joinpath("migrations", dialect)
    found: list[Migration] = []
    for entry in folder.iterdir():
        match = _NAME.match(entry.name)
        if match is None:
            continue
        found.append(Migration(int(match[1]), match[2], entry.read_text(encoding="utf-8")))
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    if versions != list(range(1, len(found) + 1)):
        raise RuntimeError(f"{dialect} migrations must be numbered 1..N without gaps: {versions}")
    return tuple(found)


def latest_version(dialect: str) -> int:
    return len(migrations(dialect))


def pending(dialect: str, current: int) -> list[Migration]:
    """Migrations above `current`; raise SchemaTooNew if `current` is beyond the code."""
    latest = latest_version(dialect)
    if current > latest:
        raise SchemaTooNew(
            f"database schema version {current} is newer than this release supports "
            f"(up to {latest}): it was migrated by a newer securecollab. Upgrade securecollab, "
            f"or point [store] url at another database."
        )
    return [m for m in migrations(dialect) if m.version > current]
