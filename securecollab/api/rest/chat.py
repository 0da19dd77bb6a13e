"""Chat over REST: send a message, page 1:1 history, read and acknowledge the offline queue.

Thin routes: each parses input, calls `services.messages` / `services.offline`, and
shapes the answer. The envelope is parsed by the service (not by a pydantic model), so
a plaintext field gets the same "plaintext is not accepted" refusal on both doors.

Which device is fetching (for the key directory's `lastUsedAt`): the access token's
`device_id` claim; when the token carries none, the `X-Device-Id` header. Either way
only one of the caller's own devices can be touched.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field
from quart import Blueprint, request
from quart_schema import document_querystring, document_request, document_response, tag

from securecollab.api.rest.middleware import app_ctx, current_principal
from securecollab.api.rest.schemas import ErrorBody
from securecollab.context import AppContext
from securecollab.services.errors import InvalidInput, Unavailable
from securecollab.services.messages import (
    MAX_PAGE_LIMIT,
    MAX_PAGE_OFFSET,
    message_json,
    parse_page,
)
from securecollab.services.offline import MAX_LIST

bp = Blueprint("chat", __name__, url_prefix="/api/chat")

DEVICE_HEADER = "X-Device-Id"


class EnvelopeIn(BaseModel):
    """An E2EE envelope. Exactly one of `to` / `channelId`; no plaintext field is accepted."""

    to: str | None = Field(default=None, description="recipient userId (1:1)")
    channelId: str | None = Field(default=None, description="channel id (channel message)")
    encryptedContent: str = Field(description="base64 AES-256-GCM ciphertext, decoded <= 64 KiB")
    iv: str = Field(description="base64 nonce of 12 or 16 bytes")
    keys: dict[str, str] | None = Field(
        default=None, description='"userId/deviceId" -> base64 wrapped message key'
    )
    clientMessageId: str | None = Field(
        default=None, description="idempotency key: a retry returns the original message"
    )


class SentOut(BaseModel):
    id: str = Field(description="message id (UUIDv7, time-ordered)")
    status: str = Field(description='"SENT": the message is durable')
    createdAt: int = Field(description="ms since the epoch")
    clientMessageId: str | None = None


class MessageOut(BaseModel):
    id: str
    from_: str = Field(alias="from")
    to: str | None
    channelId: str | None
    encryptedContent: str
    iv: str
    keys: dict[str, str]
    createdAt: int
    clientMessageId: str | None


class OfflineOut(MessageOut):
    queuedAt: int
    expiresAt: int


class HistoryQuery(BaseModel):
    with_: str = Field(alias="with", description="the other user of the conversation")
    limit: int | None = Field(default=50, ge=1, le=MAX_PAGE_LIMIT, description="1..200")
    offset: int | None = Field(default=0, ge=0, le=MAX_PAGE_OFFSET, description="rows to skip")
    fromDate: int | None = Field(default=None, ge=0, le=2**53, description="ms epoch, inclusive")
    toDate: int | None = Field(default=None, ge=0, le=2**53, description="ms epoch, inclusive")
    before: str | None = Field(default=None, description="cursor: only messages older than id")


class AckIn(BaseModel):
    ids: list[str] = Field(description="message ids to remove from your offline queue")


class AckOut(BaseModel):
    acked: int = Field(description="entries removed (ids not in your queue are ignored)")


def chat_ctx() -> AppContext:
    """The context, with the messaging services present (503 otherwise)."""
    ctx = app_ctx()
    if ctx.messages is None or ctx.offline is None or ctx.keys is None:
        raise Unavailable("messaging is not available on this server")
    return ctx


async def json_body() -> Any:
    """The request's JSON (415/400 via JsonRequest for non-JSON or malformed bodies)."""
    return await request.get_json()


async def touch_device() -> None:
    """Record that the calling device fetched its messages (key directory lastUsedAt)."""
    principal = current_principal()
    device = principal.device_id or request.headers.get(DEVICE_HEADER)
    if device and len(device) <= 128:
        keys = chat_ctx().keys
        assert keys is not None
        await keys.touch(principal.user_id, device)


@bp.post("/send-message")
@tag(["chat"])
@document_request(EnvelopeIn)
@document_response(SentOut, 201)
@document_response(SentOut, 200)
@document_response(ErrorBody, 404)
@document_response(ErrorBody, 422)
async def send_message() -> tuple[dict[str, Any], int]:
    """Send an E2EE message: 201 once durable; 200 with the original on an idempotent retry."""
    ctx = chat_ctx()
    assert ctx.messages is not None
    result = await ctx.messages.send(current_principal().user_id, await json_body())
    m = result.message
    out = {
        "id": m.id,
        "status": "SENT",
        "createdAt": m.created_at,
        "clientMessageId": m.client_message_id,
    }
    return out, 201 if result.created else 200


@bp.get("/messages")
@tag(["chat"])
@document_querystring(HistoryQuery)
@document_response(list[MessageOut], 200)
@document_response(ErrorBody, 404)
@document_response(ErrorBody, 422)
async def history() -> list[dict[str, Any]]:
    """Your 1:1 conversation with `with`, newest first; limit <= 200 (more is a 422)."""
    ctx = chat_ctx()
    assert ctx.messages is not None
    with_user = request.args.get("with", "").strip()
    if not with_user:
        raise InvalidInput("with is required: the userId of the other side", code="missing_with")
    page = parse_page(request.args)
    rows = await ctx.messages.direct_history(current_principal().user_id, with_user, page)
    await touch_device()
    return [message_json(m) for m in rows]


@bp.get("/offline-messages")
@tag(["chat"])
@document_response(list[OfflineOut], 200)
async def offline_messages() -> list[dict[str, Any]]:
    """Messages queued for you while you had no live session, oldest first (at most 500).

    Reading does not remove them: acknowledge with POST /api/chat/offline-messages/ack.
    """
    ctx = chat_ctx()
    assert ctx.offline is not None
    entries = await ctx.offline.pending(current_principal().user_id, limit=MAX_LIST)
    await touch_device()
    return [
        {**message_json(e.message), "queuedAt": e.queued_at, "expiresAt": e.expires_at}
        for e in entries
    ]


@bp.post("/offline-messages/ack")
@tag(["chat"])
@document_request(AckIn)
@document_response(AckOut, 200)
@document_response(ErrorBody, 422)
async def ack_offline() -> dict[str, int]:
    """Remove messages from your own offline queue (idempotent; at most 1000 ids)."""
    ctx = chat_ctx()
    assert ctx.offline is not None
    body = await json_body()
    if not isinstance(body, dict):
        raise InvalidInput('the body must be {"ids": [...]}')
    acked = await ctx.offline.ack(current_principal().user_id, body.get("ids"))
    return {"acked": acked}
