"""SQLite query plans of the message reads: every history page is an index range scan.

Migration 002 dropped two message indexes and made the channel index partial (fewer
indexes to maintain per insert). These checks keep the reads that relied on them honest:
1:1 history must walk idx_messages_sender for both directions, channel history the
partial idx_messages_channel; neither may fall back to a table scan.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from securecollab.store import open_store


async def _plan(db: Path, sql: str, params: tuple[object, ...]) -> str:
    conn = sqlite3.connect(db)
    try:
        rows = conn.execute("EXPLAIN QUERY PLAN " + sql, params).fetchall()
    finally:
        conn.close()
    return "\n".join(str(r[-1]) for r in rows)


async def test_history_reads_use_the_remaining_indexes(tmp_path: Path) -> None:
    db = tmp_path / "plans.db"
    async with open_store(f"sqlite:///{db}") as store:
        await store.migrate()
    conn = sqlite3.connect(db)
    names = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
    conn.close()
    assert "idx_messages_recipient" not in names
    assert "idx_messages_created_at" not in names
    assert {"idx_messages_sender", "idx_messages_channel", "idx_messages_client_id"} <= names

    branch = (
        "SELECT * FROM (SELECT * FROM messages WHERE sender_id = ? AND recipient_id = ?"
        " AND created_at >= ? ORDER BY id DESC LIMIT ?)"
    )
    direct = await _plan(
        db,
        branch + " UNION ALL " + branch + " ORDER BY id DESC LIMIT ? OFFSET ?",
        ("a", "b", 0, 50, "b", "a", 0, 50, 50, 0),
    )
    assert direct.count("USING INDEX idx_messages_sender") == 2, direct
    assert "SCAN messages" not in direct, direct

    channel = await _plan(
        db,
        "SELECT * FROM messages WHERE channel_id = ? ORDER BY id DESC LIMIT ? OFFSET ?",
        ("c", 50, 0),
    )
    assert "USING INDEX idx_messages_channel" in channel, channel
    assert "SCAN messages" not in channel, channel
