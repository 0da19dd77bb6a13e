"""Channels over REST: create, invite, leave, remove, list, read, page messages.

Rules live in `services.channels` (who may do what) and `services.messages` (paging).
A non-member gets 404 for a channel, the same as for a channel that does not exist.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field
from quart import Blueprint, request
from quart_schema import document_querystring, document_request, document_response, tag

from securecollab.api.rest.chat import MessageOut, json_body, touch_device
from securecollab.api.rest.middleware import app_ctx, client_ip, current_principal
from securecollab.api.rest.schemas import ErrorBody
from securecollab.services.channels import ChannelService
from securecollab.services.errors import InvalidInput, Unavailable
from securecollab.services.messages import (
    MAX_PAGE_LIMIT,
    MAX_PAGE_OFFSET,
    MessageService,
    message_json,
    parse_page,
)

bp = Blueprint("channels", __name__, url_prefix="/api/channels")


class ChannelIn(BaseModel):
    name: str = Field(description="1..100 characters")
    description: str | None = Field(default=None, description="at most 1000 characters")
    settings: dict[str, str] | None = Field(
        default=None, description='string map; default {"encryption": "E2EE"}'
    )


class ChannelOut(BaseModel):
    id: str
    name: str
    description: str
    ownerId: str
    settings: dict[str, str]
    createdAt: int = Field(description="ms since the epoch")
    members: list[str] = Field(description="member userIds")
    memberRoles: dict[str, str] = Field(description="userId -> owner | admin | member")


class InviteIn(BaseModel):
    userIds: list[str] = Field(description="1..100 userIds")
    role: str | None = Field(default=None, description='"member" (default) or "admin" (owner only)')


class InviteOut(BaseModel):
    success: bool
    invitedCount: int = Field(description="newly added members (existing ones not counted)")


class SuccessOut(BaseModel):
    success: bool


class PageQuery(BaseModel):
    limit: int | None = Field(default=50, ge=1, le=MAX_PAGE_LIMIT, description="1..200")
    offset: int | None = Field(default=0, ge=0, le=MAX_PAGE_OFFSET, description="rows to skip")
    fromDate: int | None = Field(default=None, ge=0, le=2**53, description="ms epoch, inclusive")
    toDate: int | None = Field(default=None, ge=0, le=2**53, description="ms epoch, inclusive")
    before: str | None = Field(default=None, description="cursor: only messages older than id")


def services() -> tuple[ChannelService, MessageService]:
    ctx = app_ctx()
    if ctx.channels is None or ctx.messages is None:
        raise Unavailable("channels are not available on this server")
    return ctx.channels, ctx.messages


@bp.post("/create")
@tag(["channels"])
@document_request(ChannelIn)
@document_response(ChannelOut, 201)
@document_response(ErrorBody, 422)
async def create() -> tuple[dict[str, Any], int]:
    """Create a channel; you become its owner and first member."""
    channels, _ = services()
    view = await channels.create(current_principal().user_id, await json_body(), ip=client_ip())
    return view.to_json(), 201


@bp.get("")
@tag(["channels"])
@document_response(list[ChannelOut], 200)
async def mine() -> list[dict[str, Any]]:
    """The channels you are a member of, with their members."""
    channels, _ = services()
    return [v.to_json() for v in await channels.list_mine(current_principal().user_id)]


@bp.get("/<channel_id>")
@tag(["channels"])
@document_response(ChannelOut, 200)
@document_response(ErrorBody, 404)
async def get(channel_id: str) -> dict[str, Any]:
    """One channel you are a member of."""
    channels, _ = services()
    return (await channels.get(current_principal().user_id, channel_id)).to_json()


@bp.post("/<channel_id>/invite")
@tag(["channels"])
@document_request(InviteIn)
@document_response(InviteOut, 200)
@document_response(ErrorBody, 403)
@document_response(ErrorBody, 404)
@document_response(ErrorBody, 422)
async def invite(channel_id: str) -> dict[str, Any]:
    """Add users (owner or admins); unknown users -> 422 listing them, nobody added."""
    channels, _ = services()
    body = await json_body()
    if not isinstance(body, dict):
        raise InvalidInput('the body must be {"userIds": [...]}')
    unknown = sorted(set(body) - {"userIds", "role"})
    if unknown:
        raise InvalidInput(f"unknown field(s): {', '.join(map(str, unknown))}")
    count = await channels.invite(
        current_principal().user_id,
        channel_id,
        body.get("userIds"),
        body.get("role"),
        ip=client_ip(),
    )
    return {"success": True, "invitedCount": count}


@bp.post("/<channel_id>/leave")
@tag(["channels"])
@document_response(SuccessOut, 200)
@document_response(ErrorBody, 404)
@document_response(ErrorBody, 409)
async def leave(channel_id: str) -> dict[str, bool]:
    """Leave a channel (not as its owner); your live subscription to it ends."""
    channels, _ = services()
    await channels.leave(current_principal().user_id, channel_id, ip=client_ip())
    return {"success": True}


@bp.delete("/<channel_id>/members/<user_id>")
@tag(["channels"])
@document_response(SuccessOut, 200)
@document_response(ErrorBody, 403)
@document_response(ErrorBody, 404)
@document_response(ErrorBody, 409)
async def remove_member(channel_id: str, user_id: str) -> dict[str, bool]:
    """Remove a member (owner only); their live subscription to the channel ends at once."""
    channels, _ = services()
    await channels.remove_member(current_principal().user_id, channel_id, user_id, ip=client_ip())
    return {"success": True}


@bp.get("/<channel_id>/messages")
@tag(["channels"])
@document_querystring(PageQuery)
@document_response(list[MessageOut], 200)
@document_response(ErrorBody, 404)
@document_response(ErrorBody, 422)
async def messages(channel_id: str) -> list[dict[str, Any]]:
    """A channel's messages, newest first (members only); same paging as /api/chat/messages."""
    _, msgs = services()
    page = parse_page(request.args)
    rows = await msgs.channel_history(current_principal().user_id, channel_id, page)
    await touch_device()
    return [message_json(m) for m in rows]
