"""Identifiers: message ids are RFC 9562 UUIDv7 text, ordered by creation."""

from __future__ import annotations

import uuid

from securecollab import ids
from securecollab.ids import now_ms, uuid7


def test_uuid7_is_a_version_7_uuid_carrying_the_creation_time() -> None:
    before = now_ms()
    text = uuid7()
    after = now_ms()
    u = uuid.UUID(text)
    assert str(u) == text  # canonical lowercase 8-4-4-4-12 text
    assert u.version == 7 and u.variant == uuid.RFC_4122
    assert before <= u.int >> 80 <= after


def test_uuid7_ids_sort_in_creation_order_even_within_a_millisecond() -> None:
    ids = [uuid7() for _ in range(20_000)]  # many share a millisecond
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert all(uuid.UUID(i).version == 7 for i in ids)
    # the random bits differ between milliseconds (not a plain counter from zero)
    firsts = {}
    for i in ids:
        firsts.setdefault(i[:13], i)
    assert len({v[-12:] for v in firsts.values()}) == len(firsts)


def test_uuid7_steps_past_a_previous_id_from_a_later_clock() -> None:
    # the previous id is ahead of the clock (same millisecond, or the clock stepped back);
    # the last case carries out of the random bits into the millisecond
    saved = ids._last_v7_text
    for last, expected in [
        ("ffffffff-fff0-7abc-9def-000000000041", "ffffffff-fff0-7abc-9def-000000000042"),
        ("ffffffff-fff0-7abc-9fff-ffffffffffff", "ffffffff-fff0-7abc-a000-000000000000"),
        ("ffffffff-fff0-7fff-bfff-ffffffffffff", "ffffffff-fff1-7000-8000-000000000000"),
    ]:
        ids._last_v7_text = last
        got = uuid7()
        assert got == expected
        assert got > last
        assert uuid.UUID(got).version == 7 and uuid.UUID(got).variant == uuid.RFC_4122
    ids._last_v7_text = saved  # (ids from the far future would stall the clock part)
