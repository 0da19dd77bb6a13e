"""Fixtures of the hostile-input tests (the server runs in a thread: see shared.py)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.hardening.shared import SharedServer, shared_server_gen


@pytest.fixture(scope="module")
def server_overrides() -> dict[str, Any]:
    """Config overrides of the module's shared server (a module may redefine this)."""
    return {}


@pytest.fixture(scope="module")
def shared_server(
    tmp_path_factory: pytest.TempPathFactory, server_overrides: dict[str, Any]
) -> Iterator[SharedServer]:
    """One server per module: SQLite, STOMP on TCP, limits raised so fuzzing is not throttled."""
    yield from shared_server_gen(tmp_path_factory, server_overrides)
