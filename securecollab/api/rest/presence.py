"""Presence over REST: `GET /api/presence?userIds=a,b` (authenticated).

Presence is shared only between contacts, as on `/topic/presence`: the caller sees
itself and its peers (users sharing a channel or conversation); other ids come back in
`hidden`, so the answer never reveals whether a stranger is online.
"""

from __future__ import annotations

from pydantic import BaseModel, Field
from quart import Blueprint, request
from quart_schema import document_response, tag, validate_response

from securecollab.api.rest.middleware import app_ctx, current_principal
from securecollab.api.rest.schemas import ErrorBody
from securecollab.services.errors import InvalidInput, Unavailable
from securecollab.services.presence import MAX_QUERY_USERS

bp = Blueprint("presence", __name__, url_prefix="/api/presence")


class PresenceOut(BaseModel):
    userId: str
    status: str = Field(description="ONLINE | AWAY | OFFLINE")
    devices: list[str] = Field(description="device ids with a live session")
    lastSeen: int | None = Field(description="ms since the epoch; null if never seen")


class PresenceListOut(BaseModel):
    users: list[PresenceOut]
    hidden: list[str] = Field(description="requested ids the caller may not see")


@bp.get("")
@tag(["presence"])
@validate_response(PresenceListOut)
@document_response(ErrorBody, 401)
@document_response(ErrorBody, 422)
async def get_presence() -> PresenceListOut:
    """Presence of up to 100 users: `?userIds=a,b,c` (comma-separated)."""
    raw = request.args.get("userIds", "")
    user_ids = [u.strip() for u in raw.split(",") if u.strip()]
    if not user_ids:
        raise InvalidInput(
            "userIds is required (comma-separated user ids)", code="missing_user_ids"
        )
    if len(set(user_ids)) > MAX_QUERY_USERS:
        raise InvalidInput(
            f"at most {MAX_QUERY_USERS} userIds per request", code="too_many_user_ids"
        )
    presence = app_ctx().presence
    if presence is None:
        raise Unavailable("presence is not available on this server")
    views, hidden = await presence.visible_to(current_principal().user_id, user_ids)
    return PresenceListOut(
        users=[
            PresenceOut(
                userId=v.user_id, status=v.status, devices=list(v.devices), lastSeen=v.last_seen
            )
            for v in views
        ],
        hidden=hidden,
    )
