"""The running server's parts in one object, handed to routes, transports and jobs.

`app.run_server` builds one `AppContext` after the store and backplane are open. Later
parts add their services as fields here (with a default of None so the foundation
builds without them) and construct them in `app.build_services`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import trio

from securecollab.backplane import Backplane
from securecollab.broker.core import Broker
from securecollab.config import Settings
from securecollab.metrics import Metrics
from securecollab.services.audit import AuditService
from securecollab.services.auth import AuthService
from securecollab.services.channels import ChannelService
from securecollab.services.keys import KeyService
from securecollab.services.messages import MessageService
from securecollab.services.offline import OfflineService
from securecollab.services.presence import PresenceService
from securecollab.store import Store


@dataclass(eq=False)
class AppContext:
    """Everything one server instance owns.

    - `nursery`: the process nursery; start long-lived tasks here (they are cancelled
      after the transports have shut down, before the store closes).
    - `shutdown`: set when shutdown begins (signal, or a test leaving `running_server`):
      transports stop accepting and close their sessions; `/readyz` turns 503.
    - `ports`: bound ports by transport name ("http", later "stomp"), filled as each
      transport starts (port 0 in the config becomes the real port here).
    """

    settings: Settings
    store: Store
    backplane: Backplane
    audit: AuditService
    auth: AuthService
    metrics: Metrics
    nursery: trio.Nursery
    shutdown: trio.Event = field(default_factory=trio.Event)
    ports: dict[str, int] = field(default_factory=dict)
    # the embedded STOMP broker and presence (api/stomp_app.py builds both)
    broker: Broker | None = None
    presence: PresenceService | None = None
    # messaging (issue 5): built in app.build_services, wired to the broker by api/stomp_chat.py
    messages: MessageService | None = None
    channels: ChannelService | None = None
    keys: KeyService | None = None
    offline: OfflineService | None = None
    # free-form slots for parts that do not warrant a typed field yet
    extras: dict[str, Any] = field(default_factory=dict)
