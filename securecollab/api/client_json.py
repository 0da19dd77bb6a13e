"""Strict JSON decoding of client input, shared by both doors (REST bodies, STOMP /app bodies).

Python's `json.loads` accepts more than a server should take from a stranger, and some
of what it accepts breaks later layers with an exception instead of a 4xx/ERROR:

- bytes in UTF-16/32 (auto-detected) or invalid UTF-8: RFC 8259 says UTF-8; refused.
- nesting deeper than the interpreter's recursion limit raises RecursionError (a 500);
  anything deeper than `MAX_DEPTH` is refused, no field of the API nests that deep.
- `NaN`, `Infinity`: not JSON; refused, and so are numbers that overflow a float.
- duplicate object keys: which one wins differs between parsers (and proxies); refused.
- U+0000 and lone surrogates (`"\\ud800"`): valid JSON escapes, but PostgreSQL text
  cannot hold NUL and UTF-8 cannot encode a lone surrogate, so they fail deep in the
  store; no field of the API may carry them; refused here.

Every refusal is a `BadJson` (a ValueError) whose message says what was wrong.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

MAX_DEPTH = 32  # arrays/objects inside each other; the API's deepest shape is 2


class BadJson(ValueError):
    """Client input that is not acceptable JSON; str(exc) is the reason, for the client."""


def _no_constants(name: str) -> Any:
    raise BadJson(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise BadJson(f"number {text[:32]} is out of range")
    return value


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)  # in C; a repeated key makes it shorter than `pairs`
    if len(result) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise BadJson(f"duplicate key {key[:64]!r}")
            seen.add(key)
    return result


def _check_text(s: str) -> None:
    if "\x00" in s:
        raise BadJson("strings must not contain U+0000")
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        raise BadJson("strings must not contain lone surrogates (\\ud800-\\udfff)") from None


def _check_tree(value: Any) -> None:
    """Depth and string checks, iteratively (a hostile body must not exhaust the stack)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, str):
            _check_text(node)
        elif isinstance(node, (dict, list)):
            if depth > MAX_DEPTH:
                raise BadJson(f"nested deeper than {MAX_DEPTH} levels")
            if isinstance(node, dict):
                for key, item in node.items():
                    _check_text(key)
                    stack.append((item, depth + 1))
            else:
                stack.extend((item, depth + 1) for item in node)


# One decoder for every call: `json.loads` with hooks builds a new JSONDecoder (and its
# scanner) per document, a fifth of the cost of decoding a message envelope.
_DECODER = json.JSONDecoder(
    object_pairs_hook=_unique_pairs, parse_constant=_no_constants, parse_float=_finite_float
)


# The same decoder without the duplicate-key hook: objects are built in C, without a
# Python call each. Only for `_flat_object`, which proves the absence of duplicates.
_SCAN_FLAT: Callable[[str, int], tuple[Any, int]] = json.JSONDecoder(  # type: ignore[attr-defined]
    parse_constant=_no_constants, parse_float=_finite_float
).scan_once


def _keys_if_flat(value: dict[str, Any]) -> int:
    """Keys of `value` plus those of the objects directly in it; -1 if anything nests deeper
    (an array, or an object in an object in `value`)."""
    n = len(value)
    for item in value.values():
        kind = type(item)
        if kind is dict:
            n += len(item)
            for inner in item.values():
                if type(inner) is dict or type(inner) is list:
                    return -1
        elif kind is list:
            return -1
    return n


def _flat_object(text: str) -> dict[str, Any] | None:
    """`text` decoded, when it is an object at most two levels deep with no backslash
    in it; None when the full path must decide (it also raises every error).

    Why: this is the shape of every message envelope, and for it the checks of the full
    path reduce to counting. No backslash: no escape, so no NUL or lone surrogate (text
    decoded from UTF-8 has none, the scanner refuses raw control characters) and no
    quote inside a string. Every key is followed by one ':' outside strings, so when the
    ':' in the whole text are exactly as many as the decoded keys, no object repeated a
    key (a repeat leaves fewer keys than ':'). Two levels are within MAX_DEPTH.
    """
    if "\\" in text:
        return None
    try:
        value, end = _SCAN_FLAT(text, 0)
    except Exception:  # StopIteration, JSONDecodeError, BadJson...: the full path says which
        return None
    if end != len(text) or type(value) is not dict:
        return None
    keys = _keys_if_flat(value)
    if keys < 0 or keys != text.count(":"):
        return None
    return value


def loads(data: bytes | str) -> Any:
    """Decode one JSON document from a client; BadJson (with a reason) when unacceptable."""
    from_utf8 = isinstance(data, bytes)
    if isinstance(data, bytes):
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise BadJson(f"the body is not valid UTF-8 (byte {exc.start})") from None
    else:
        text = data
    if text.startswith("\ufeff"):
        text = text[1:]  # RFC 8259 lets a parser ignore a byte order mark
    if from_utf8 and text[:1] == "{":
        flat = _flat_object(text)
        if flat is not None:
            return flat
    return _decode(text, from_utf8)


def _decode(text: str, from_utf8: bool) -> Any:
    """The full path of `loads` (`from_utf8`: `text` was decoded from UTF-8 bytes)."""
    try:
        value = _DECODER.decode(text)
    except BadJson:
        raise
    except RecursionError:
        raise BadJson(f"nested deeper than {MAX_DEPTH} levels") from None
    except ValueError as exc:
        raise BadJson(str(exc)) from None
    # Fast path (every message send): text decoded from valid UTF-8 holds no surrogate,
    # and json.loads refuses raw control characters, so NUL or a lone surrogate can only
    # come from a \u escape; and nesting deeper than MAX_DEPTH needs more than MAX_DEPTH
    # brackets. Without either, the tree walk cannot refuse anything.
    # (`"\\" not in` first: a one-character search is memchr, "\\u" a slower one)
    if (
        from_utf8
        and ("\\" not in text or "\\u" not in text)
        and text.count("[") + text.count("{") <= MAX_DEPTH
    ):
        return value
    _check_tree(value)
    return value
