"""Client JSON: the flat-object shortcut of `loads` never decides differently from its full path.

Every message envelope takes the shortcut; a body it cannot prove acceptable goes the
full way, which also words every refusal. Documents are built from pieces that hit each
of the shortcut's conditions: repeated keys (also behind ':' inside strings), escapes,
NUL, lone surrogates, arrays, deeper objects, non-finite numbers, stray bytes.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from securecollab.api import client_json

ATOMS = st.sampled_from(
    ['"a"', '"a:b"', '""', "1", "-0.5", "1e999", "NaN", "null", "true", '"\\u0000"',
     '"\\ud800"', '"x\\"y"', '"\\\\"', '"\\u0061"', "[]", "{}", '"é"', "[1]", '"{"']
)  # fmt: skip
KEYS = st.sampled_from(['"a"', '"b"', '"c"', '"d"', '"e"', '"a:"', '"\\u0061"', '"k\\""', '""'])
COLONS = st.sampled_from([":", " :", ": "])


def objects(values: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    pair = st.tuples(KEYS, COLONS, values).map("".join)
    return st.lists(pair, max_size=4).map(lambda ps: "{" + ",".join(ps) + "}")


def arr(items: str) -> str:
    return f"[{items}]"


VALUES = st.recursive(
    ATOMS,
    lambda inner: st.one_of(objects(inner), st.lists(inner, max_size=3).map(",".join).map(arr)),
    max_leaves=12,
)
# shaped like an envelope (what the shortcut takes), with the odd trap mixed in
SIMPLE = st.sampled_from(['"a"', '"b"', '"é"', "1", "null", "true", '"a:b"', "1e999", '"\\u0000"'])
FLAT = st.one_of(SIMPLE, objects(SIMPLE))
NOISE = st.sampled_from(list('{}[]:,"\\ \x00\x01a1'))


@st.composite
def documents(draw: st.DrawFn) -> str:
    text = draw(st.one_of(objects(FLAT), objects(VALUES)))
    # a few stray edits make broken documents
    for _ in range(draw(st.sampled_from([0, 0, 0, 1, 2]))):
        at = draw(st.integers(0, len(text)))
        if draw(st.booleans()) and text:
            text = text[:at] + text[at + 1 :]
        else:
            text = text[:at] + draw(NOISE) + text[at:]
    return text + draw(st.sampled_from(["", "", "", " ", "x"]))


def outcome(text: str) -> tuple[str, Any]:
    try:
        return "ok", client_json._decode(text, True)
    except client_json.BadJson as exc:
        return "refused", str(exc)


@settings(max_examples=1000, deadline=None)
@given(documents())
def test_the_flat_shortcut_accepts_only_what_the_full_path_accepts_unchanged(text: str) -> None:
    data = text.encode("utf-8", "surrogatepass")
    try:
        got: tuple[str, Any] = "ok", client_json.loads(data)
    except client_json.BadJson as exc:
        got = "refused", str(exc)
    expected = outcome(text)
    assert got == expected
    if got[0] == "ok":
        assert list(got[1]) == list(expected[1])  # key order too


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b'{"a":1,"a":2}', "duplicate key 'a'"),
        (b'{"a":"x:y","a":1}', "duplicate key 'a'"),  # the ':' count alone matches
        (b'{"k":{"b":"1","b":"2"}}', "duplicate key 'b'"),
        (b'{"a":1e999}', "number 1e999 is out of range"),
        (b'{"a":NaN}', "NaN is not valid JSON"),
        (b'{"a":"\\u0000"}', "strings must not contain U+0000"),
    ],
)
def test_envelope_shaped_bodies_are_still_refused(body: bytes, reason: str) -> None:
    with pytest.raises(client_json.BadJson) as exc:
        client_json.loads(body)
    assert str(exc.value) == reason


def test_an_envelope_takes_the_shortcut() -> None:
    text = '{"to":"bob@example.com","encryptedContent":"AAAA","keys":{"bob/phone":"QUJD"}}'
    assert client_json._flat_object(text) == client_json._decode(text, True)
