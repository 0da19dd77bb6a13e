"""Broker settings: a plain value object, filled from `[stomp]`, `[broker]`, `[presence]`."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class AclRule:
    """Who may use general-purpose destinations matching `pattern` (fnmatch glob).

    `subscribe` / `send` list user ids; "*" admits every authenticated user. A
    destination is admitted when ANY matching rule lists the user for that action.
    """

    pattern: str
    subscribe: tuple[str, ...] = ()
    send: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class BrokerConfig:
    """Limits and timings of the embedded broker. Times in seconds unless `_ms`."""

    server_name: str = "SecureCollab/0.1.0"
    max_frame_bytes: int = 102_400
    max_headers: int = 64
    max_header_line: int = 8_192
    connect_timeout_s: float = 10.0
    heartbeat_send_ms: int = 10_000  # how often we offer to send heart-beats
    heartbeat_recv_ms: int = 10_000  # how often we want to receive them
    outbound_queue_frames: int = 1_000
    outbound_queue_bytes: int = 4 * 1024 * 1024
    ws_always_binary: bool = False
    send_limit: int = 20  # SEND frames per user per window
    send_window_s: float = 10.0
    acl: tuple[AclRule, ...] = field(default_factory=tuple)
    queue_max_messages: int = 10_000  # backlog bound of one general /queue/<name>
    close_grace_s: float = 2.0  # time to flush the final ERROR/RECEIPT before aborting
    # SENDs of one connection to a pipelined /app handler (chat messages) that may wait
    # for their commit at once while the connection's next frames are read; 1 handles
    # each SEND to its end before reading on.
    pipeline_depth: int = 32
    presence_refresh_s: float = 60.0  # how often live sessions renew their presence TTL
    presence_ttl_s: float = 600.0  # TTL of backplane registrations (presence, subscribers)
    # After a user's last /user/queue/private subscription on this node ended, a live
    # delivery that finds none is handed back (hooks.on_undelivered) for this long: it
    # covers a sender that saw the subscriber registered just before it went.
    handback_grace_s: float = 60.0
