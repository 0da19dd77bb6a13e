"""End to end: alice and bob, two devices each, through a real server on loopback.

Every device decrypts every message meant for it; nothing the server stores or logs
contains a plaintext (SQLite file + WAL, or a PostgreSQL dump); a tampered row fails
authentication on the reader; a device added later cannot read earlier messages.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
import trio

from securecollab.client.api import Client, ReceivedMessage, UndecryptableMessage
from tests.support.server import ServerHandle, running_server

from .conftest import SERVER_OVERRIDES, LogCapture, devices, register

ALICE, BOB = "alice@example.com", "bob@example.com"


def _texts(tag: str) -> dict[str, str]:
    """Distinctive plaintexts (easy to find if they ever leak)."""
    return {
        "a2b": f"PLAINTEXT-{tag}-alice-to-bob: meet at the blue door at 7",
        "b2a": f"PLAINTEXT-{tag}-bob-to-alice: bring the 4th key, ünïcødé ✓",
        "a2b_2": f"PLAINTEXT-{tag}-alice-to-bob-again via her second device",
        "chan_a": f"PLAINTEXT-{tag}-channel-from-alice: quarterly numbers are 42",
        "chan_b": f"PLAINTEXT-{tag}-channel-from-bob: ack, shipping friday",
    }


async def _conversation(srv: ServerHandle, tmp_path: Path, tag: str) -> dict[str, str]:
    texts = _texts(tag)
    await register(srv, ALICE, BOB)
    specs = [(ALICE, "a1"), (ALICE, "a2"), (BOB, "b1"), (BOB, "b2")]
    async with devices(srv, tmp_path, specs) as d:
        a1, a2, b1, b2 = (d[f"{u}/{dev}"] for u, dev in specs)

        await a1.client.send_text(BOB, texts["a2b"])
        await b2.client.send_text(ALICE, texts["b2a"])
        await a2.client.send_text(BOB, texts["a2b_2"])
        # 1:1: the recipient's devices and the sender's OTHER devices get it live.
        await b1.inbox.wait_texts([texts["a2b"], texts["b2a"], texts["a2b_2"]])
        await b2.inbox.wait_texts([texts["a2b"], texts["a2b_2"]])
        await a1.inbox.wait_texts([texts["b2a"], texts["a2b_2"]])
        await a2.inbox.wait_texts([texts["a2b"], texts["b2a"]])

        channel = await a1.client.create_channel("launch", "e2e test channel")
        assert await a1.client.invite(channel.id, [BOB]) == 1
        # bob's devices follow the new channel once the invite reaches them
        # (/user/queue/channels); give that a moment before sending into it.
        await _wait_followed([b1.client, b2.client, a2.client], channel.id)
        await a1.client.send_channel_text(channel.id, texts["chan_a"])
        await b1.client.send_channel_text(channel.id, texts["chan_b"])
        for dev, expected in (
            (a2, ["chan_a", "chan_b"]),
            (b1, ["chan_a"]),
            (b2, ["chan_a", "chan_b"]),
            (a1, ["chan_b"]),
        ):
            await dev.inbox.wait_texts([texts[k] for k in expected])

        # Nothing undecryptable was ever shown, and nothing came twice.
        for name, dev in d.items():
            assert not [i for i in dev.inbox.items if isinstance(i, UndecryptableMessage)], name
            ids = [i.id for i in dev.inbox.items]
            assert len(ids) == len(set(ids)), f"{name} got a message twice"

        # History decrypts on every device (the sender's own included).
        for dev in (a1, a2, b1, b2):
            hist = await dev.client.history(BOB if dev.client.user_id == ALICE else ALICE)
            assert [h.text for h in hist if isinstance(h, ReceivedMessage)] == [
                texts["a2b"],
                texts["b2a"],
                texts["a2b_2"],
            ]
            chan = await dev.client.channel_history(channel.id)
            assert [h.text for h in chan if isinstance(h, ReceivedMessage)] == [
                texts["chan_a"],
                texts["chan_b"],
            ]
    return texts


async def _wait_followed(clients: list[Client], channel_id: str) -> None:
    with trio.fail_after(10):
        for c in clients:
            await c.wait_following(channel_id)


def _assert_absent(blob: bytes, texts: dict[str, str], where: str) -> None:
    for name, text in texts.items():
        for form in (text, text[-20:]):  # whole, and a tail (no prefix needed to leak)
            assert form.encode() not in blob, f"plaintext {name!r} found in {where}"


async def test_conversation_on_sqlite_leaves_no_plaintext(
    tmp_path: Path, server_log: LogCapture
) -> None:
    async with running_server(tmp_path, **SERVER_OVERRIDES) as srv:
        texts = await _conversation(srv, tmp_path, "sqlite")
        db = Path(srv.settings.store.url.removeprefix("sqlite:///"))
        live = b"".join(p.read_bytes() for p in (db, db.with_name(db.name + "-wal")) if p.exists())
        _assert_absent(live, texts, "the live SQLite file + WAL")
    # after shutdown (WAL checkpointed into the main file)
    files = [p for p in db.parent.iterdir() if p.name.startswith(db.name)]
    _assert_absent(b"".join(p.read_bytes() for p in files), texts, "the SQLite files")
    assert len(server_log.lines) > 10  # the capture did see the server's log
    _assert_absent(server_log.text().encode(), texts, "the server log")
    # The ciphertexts really are there: the scan looked at the right bytes.
    with sqlite3.connect(db) as conn:
        (count,) = conn.execute("SELECT count(*) FROM messages").fetchone()
    assert count == 5


async def test_conversation_on_postgres_leaves_no_plaintext(
    tmp_path: Path, pg_url: str, server_log: LogCapture
) -> None:
    async with running_server(tmp_path, store__url=pg_url, **SERVER_OVERRIDES) as srv:
        texts = await _conversation(srv, tmp_path, "postgres")
    with trio.fail_after(60):
        done = await trio.run_process(
            ["pg_dump", "--data-only", "--no-owner", pg_url], capture_stdout=True
        )
    dump = done.stdout
    assert b"COPY public.messages" in dump and dump.count(b"\n") > 20
    _assert_absent(dump, texts, "the PostgreSQL dump")
    _assert_absent(server_log.text().encode(), texts, "the server log")


async def test_tampered_rows_fail_authentication(tmp_path: Path) -> None:
    """The server (or anyone with the database) alters a stored message: the reader sees
    an error, never altered text."""
    async with running_server(tmp_path, **SERVER_OVERRIDES) as srv:
        await register(srv, ALICE, BOB)
        async with devices(srv, tmp_path, [(ALICE, "a1"), (BOB, "b1")], listen=False) as d:
            alice, bob = d[f"{ALICE}/a1"].client, d[f"{BOB}/b1"].client
            for i in range(3):
                await alice.send_text(BOB, f"secret number {i}")
            rows = await bob.rest.messages(ALICE)
            originals = {m.id: dict(m.raw) for m in rows}
            assert sorted(bob.decrypt(m).text for m in rows) == [  # type: ignore[union-attr]
                "secret number 0",
                "secret number 1",
                "secret number 2",
            ]
            ids = sorted(originals)
            db = Path(srv.settings.store.url.removeprefix("sqlite:///"))

            def tamper() -> None:
                with sqlite3.connect(db, timeout=10) as conn:
                    (ct,) = conn.execute(
                        "SELECT encrypted_content FROM messages WHERE id = ?", (ids[0],)
                    ).fetchone()
                    conn.execute(
                        "UPDATE messages SET encrypted_content = ? WHERE id = ?",
                        (_flip_b64(ct), ids[0]),
                    )
                    iv1 = conn.execute("SELECT iv FROM messages WHERE id = ?", (ids[1],)).fetchone()
                    conn.execute(
                        "UPDATE messages SET iv = ? WHERE id = ?", (_flip_b64(iv1[0]), ids[1])
                    )
                    (keys2,) = conn.execute(
                        "SELECT keys FROM messages WHERE id = ?", (ids[2],)
                    ).fetchone()
                    wrapped = json.loads(keys2)
                    kid = f"{BOB}/b1"
                    wrapped[kid] = _flip_b64(wrapped[kid], at=-3)
                    conn.execute(
                        "UPDATE messages SET keys = ? WHERE id = ?", (json.dumps(wrapped), ids[2])
                    )

            await trio.to_thread.run_sync(tamper)
            history = await bob.history(ALICE)
            by_id = {h.id: h for h in history}
            reasons = [
                by_id[i].error.reason if isinstance(by_id[i], UndecryptableMessage) else "ok"
                for i in ids
            ]
            assert reasons == ["content-auth-failed", "content-auth-failed", "key-unwrap-failed"]
            assert all(not hasattr(by_id[i], "text") for i in ids)
            # alice's own copy: body and iv tampering hit her too; her wrapped key is intact.
            mine = {h.id: h for h in await alice.history(BOB)}
            assert isinstance(mine[ids[0]], UndecryptableMessage)
            assert isinstance(mine[ids[2]], ReceivedMessage)
            assert mine[ids[2]].text == "secret number 2"


def _flip_b64(value: str, at: int = 5) -> str:
    """Flip one bit of the decoded bytes at index `at` and re-encode."""
    import base64

    raw = bytearray(base64.b64decode(value))
    raw[at] ^= 0x01
    return base64.b64encode(bytes(raw)).decode()


async def test_a_device_added_later_cannot_read_earlier_messages(tmp_path: Path) -> None:
    async with running_server(tmp_path, **SERVER_OVERRIDES) as srv:
        await register(srv, ALICE, BOB)
        async with devices(srv, tmp_path, [(ALICE, "a1"), (BOB, "b1")], listen=False) as d:
            alice = d[f"{ALICE}/a1"].client
            await alice.send_text(BOB, "before the new phone")
            async with devices(srv, tmp_path, [(BOB, "phone")], listen=False) as d2:
                phone = d2[f"{BOB}/phone"].client
                alice.forget_keys(BOB)  # or wait out the 30 s directory cache
                await alice.send_text(BOB, "after the new phone")
                history = await phone.history(ALICE)
                assert isinstance(history[0], UndecryptableMessage)
                assert history[0].error.reason == "no-key-for-device"
                assert isinstance(history[1], ReceivedMessage)
                assert history[1].text == "after the new phone"
            # the old device still reads both
            old = await d[f"{BOB}/b1"].client.history(ALICE)
            assert [h.text for h in old if isinstance(h, ReceivedMessage)] == [
                "before the new phone",
                "after the new phone",
            ]


@pytest.mark.parametrize("missing", ["user", "device"])
async def test_send_to_unknown_user_or_keyless_user_is_a_clear_error(
    tmp_path: Path, missing: str
) -> None:
    from securecollab.client.api import NoDeviceKey, UnknownUser

    async with running_server(tmp_path, **SERVER_OVERRIDES) as srv:
        await register(srv, ALICE, BOB)
        async with devices(srv, tmp_path, [(ALICE, "a1")], listen=False) as d:
            alice = d[f"{ALICE}/a1"].client
            if missing == "user":
                with pytest.raises(UnknownUser, match=r"nobody@example\.com"):
                    await alice.send_text("nobody@example.com", "hello?")
            else:
                with pytest.raises(NoDeviceKey, match="no registered device key"):
                    await alice.send_text(BOB, "hello?")
