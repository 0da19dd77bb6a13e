"""Write ops for the SQLite writer-process tests, importable by the writer process.

(An op reaches the writer pickled by reference, so it must live in a module the writer
can import; the test module itself drags in pytest and hypothesis.)
"""

from __future__ import annotations

import sqlite3


class TwoArgError(Exception):
    """Pickles fine, fails to unpickle: pickle calls TwoArgError(message) with one arg."""

    def __init__(self, a: str, b: str) -> None:
        super().__init__(f"{a}/{b}")


def raise_two_arg_error(c: sqlite3.Connection) -> None:
    raise TwoArgError("a", "b")


def print_to_stdout(text: str, c: sqlite3.Connection) -> str:
    print(text)  # fd 1 of the writer is the reply pipe's old number: must not corrupt it
    return text
