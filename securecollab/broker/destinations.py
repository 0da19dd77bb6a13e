"""Destination names: what each one is, and who may SUBSCRIBE or SEND to it.

| destination                    | SUBSCRIBE                  | SEND                 |
| `/user/queue/<x>`              | the user themself          | server only          |
| `/user/<ownId>/queue/<x>`      | same, Spring form          | server only          |
| `/topic/messages/<channelId>`  | members (hook)             | via /app/chat/send   |
| `/topic/presence`              | any authenticated user     | server only          |
| `/app/...`                     | never                      | registered handlers  |
| `/queue/<name>`, `/topic/<name>` | per [broker] acl         | per [broker] acl     |
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum
from fnmatch import fnmatchcase

from securecollab.broker.config import AclRule
from securecollab.broker.errors import BrokerError, Forbidden
from securecollab.ids import user_key


class Kind(Enum):
    USER = "user"  # per-user destination, resolved to the caller
    CHANNEL = "channel"  # /topic/messages/<channelId>
    PRESENCE = "presence"  # /topic/presence, delivered per user (filtered to peers)
    APP = "app"  # /app/... handled by registered handlers
    QUEUE = "queue"  # general-purpose competing-consumer queue
    TOPIC = "topic"  # general-purpose pub/sub topic


PRESENCE_TOPIC = "/topic/presence"
CHANNEL_PREFIX = "/topic/messages/"
PRIVATE_QUEUE = "/user/queue/private"


@dataclass(frozen=True, slots=True)
class Destination:
    kind: Kind
    name: str  # normalized: "/user/queue/x" for both user forms; else as written
    channel_id: str | None = None


def _valid_segment_path(path: str) -> bool:
    """Non-empty, no empty or dot segments, no control characters or wildcards."""
    if not path or path.startswith("/") or path.endswith("/"):
        return False
    if _BAD_CHAR.search(path) is not None:
        return False
    return "//" not in path and not any(seg in (".", "..") for seg in path.split("/"))


_BAD_CHAR = re.compile(r"[\x00-\x1f*?\[\]#]")  # control characters, wildcards


def parse(destination: str, user_id: str) -> Destination:
    """Classify `destination` for `user_id`; BrokerError/Forbidden when it is not usable.

    The Spring form `/user/<id>/queue/...` is accepted for the caller's own id only.
    """
    if destination.startswith("/user/"):
        rest = destination[len("/user/") :]
        if not rest.startswith("queue/"):
            owner, sep, rest = rest.partition("/")
            if not sep or not rest.startswith("queue/"):
                raise BrokerError(
                    f"invalid user destination {destination}",
                    "user destinations look like /user/queue/<name>",
                )
            if user_key(owner) != user_key(user_id):  # the owner's own spelling may differ
                raise Forbidden(
                    f"destination {destination} belongs to another user",
                    "subscribe to /user/queue/<name>; it resolves to your own queue",
                )
        name = rest[len("queue/") :]
        if not _valid_segment_path(name):
            raise BrokerError(f"invalid user destination {destination}")
        return Destination(Kind.USER, "/user/queue/" + name)
    if destination == PRESENCE_TOPIC:
        return Destination(Kind.PRESENCE, destination)
    if destination.startswith(CHANNEL_PREFIX):
        channel_id = destination[len(CHANNEL_PREFIX) :]
        if not _valid_segment_path(channel_id) or "/" in channel_id:
            raise BrokerError(f"invalid channel destination {destination}")
        return Destination(Kind.CHANNEL, destination, channel_id)
    if destination.startswith("/app/"):
        if not _valid_segment_path(destination[len("/app/") :]):
            raise BrokerError(f"invalid application destination {destination}")
        return Destination(Kind.APP, destination)
    for prefix, kind in (("/queue/", Kind.QUEUE), ("/topic/", Kind.TOPIC)):
        if destination.startswith(prefix):
            if not _valid_segment_path(destination[len(prefix) :]):
                raise BrokerError(f"invalid destination {destination}")
            return Destination(kind, destination)
    raise BrokerError(
        f"unknown destination {destination}",
        "destinations start with /user/queue/, /topic/, /queue/ or /app/",
    )


def server_only(destination: str) -> bool:
    """Destinations only the server publishes to (clients' SENDs are refused)."""
    return (
        destination.startswith("/user/")
        or destination == PRESENCE_TOPIC
        or destination.startswith(CHANNEL_PREFIX)
    )


def acl_allows(rules: tuple[AclRule, ...], destination: str, user_id: str, action: str) -> bool:
    """True when any rule matching `destination` lists `user_id` (or "*") for `action`."""
    for rule in rules:
        if fnmatchcase(destination, rule.pattern):
            who = rule.subscribe if action == "subscribe" else rule.send
            if "*" in who or user_id in who:
                return True
    return False
