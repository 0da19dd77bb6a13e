from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from .harness import BrokerServer, broker_server


@pytest.fixture
async def server() -> AsyncIterator[BrokerServer]:
    """A broker with the default config plus a permissive ACL for /queue/* and /topic/*."""
    from securecollab.broker.config import AclRule

    acl = (AclRule("/queue/*", ("*",), ("*",)), AclRule("/topic/*", ("*",), ("*",)))
    async with broker_server(acl=acl) as srv:
        yield srv
