"""The embedded STOMP 1.2 broker (1.0 and 1.1 spoken too), transport-independent.

Files: `core.py` (Broker: sessions, subscriptions, queues, fan-out, /app routing),
`session.py` (one connection: parser, state, ack/tx bookkeeping, bounded outbound
queue, heart-beats), `destinations.py` (naming and authorization table),
`hooks.py` (extension points), `config.py`, `errors.py`, `metrics.py`.
Transports (`securecollab/transport/`) wrap a socket in a `session.Connection` and call
`Broker.serve_connection(conn)`.

Hook API for other parts (all async; assign on `ctx.broker.hooks`):

    hooks.can_subscribe_channel(user_id: str, channel_id: str) -> bool
        SUBSCRIBE /topic/messages/{channel_id} allowed iff True (default: deny). Also
        used by /app/typing {"channelId"} to check membership.
    hooks.initial_messages(user_id: str) -> list[InitialMessage]
        On SUBSCRIBE /user/queue/private: delivered first, oldest first, as MESSAGE
        frames with message-id = InitialMessage.message_id. Live deliveries for that
        subscription arriving meanwhile are buffered and de-duplicated by message-id, so
        there are no gaps or duplicates. The SUBSCRIBE's RECEIPT follows them.
    hooks.on_delivered(user_id: str, message_ids: list[str]) -> None
        Messages of /user/queue/private reached the client: ACKed (client: cumulative,
        client-individual: one) or, for ack:auto, written to the socket. Errors are
        logged, never fatal. (Delete the offline-queue entries here.)
    hooks.on_undelivered(user_id: str, message_ids: list[str]) -> None
        Messages of /user/queue/private accepted for live delivery that did not reach
        the client (dropped by a closing or slow session, unwritten at close, NACKed, or
        unACKed in client modes at UNSUBSCRIBE/disconnect). Queue them offline here:
        together with `initial_messages` this makes the private queue at-least-once.
        A delivery that finds no subscription of a user whose last one on this node
        ended less than `handback_grace_s` ago is handed back too. Subscriptions to
        /user/queue/private are registered in the backplane
        (`subscriber_add("/user/queue/private", ...)`, TTL `presence_ttl_s`, renewed
        every `presence_refresh_s`), so a service can ask `subscribed_users()` who
        would receive a message live on any node.
    hooks.peers_of(user_id: str) -> set[str]
        Users sharing a channel or conversation: the only ones who get that user's
        presence (on /topic/presence and GET /api/presence). Default: nobody.
    hooks.channel_members(channel_id: str) -> set[str]
        Recipients of channel typing notices (/app/typing {"channelId"}).
    hooks.on_session_open / on_session_close / on_session_activity(SessionInfo)
        Used by presence (api/stomp_app.py); leave them alone.

    broker.register_app_handler(destination: str, handler: AppHandler)
        handler(session: SessionInfo, frame: stomp.Frame) -> None for SEND to
        `destination` (exact) or under it (ending in "/"). Raise `errors.AppError(message,
        detail)` to refuse: the client gets ERROR (message header, receipt-id) and is
        disconnected. The SEND's RECEIPT is sent only after the handler returned, so
        return after the store commit. Wrap with `api.stomp_app.app_handler` to map
        service errors (ServiceError -> AppError) in one place.

Deliveries (services -> clients), through the backplane port:

    await backplane.publish(Delivery(kind="user", destination="/user/queue/private",
        body=json_bytes, headers=(("content-type", "application/json"),),
        user_id=recipient, message_id=msg_id, exclude_session=sender_session_id))
        -> every session of `user_id` subscribed to that destination (the Spring form
        "/user/{user_id}/queue/private" is accepted too); `exclude_session` skips one.
    Delivery(kind="topic", destination="/topic/messages/{channel_id}", ...)
        -> every subscriber of that destination on every node.
    Delivery(kind="control", destination="/topic/messages/{channel_id}", body=b"",
        headers=(("action", "unsubscribe"),), user_id=removed_user)
        -> ends that user's subscriptions to the destination at once (channel removal).
    Delivery(kind="control", destination="", body=b"", user_id=u,
        headers=(("action", "disconnect"), ("message", "account deleted")))
        -> ERROR with that message to every session of `u`, then close; with header
        ("session-key", k) only the sessions whose Identity.session_key is k (a logout),
        and a CONNECT of that key still authenticating is closed when it attaches.

MESSAGE frames carry subscription, message-id, destination (as subscribed),
content-length, the delivery's headers (content-type...), `ack` (1.2, non-auto
subscriptions) and `redelivered:true` for queue redeliveries.
"""
