"""User routes."""

from __future__ import annotations

from pydantic import BaseModel, Field
from quart import Blueprint
from quart_schema import document_response, tag, validate_response

from securecollab.api.rest.middleware import app_ctx, current_principal
from securecollab.api.rest.schemas import ErrorBody
from securecollab.services.errors import Unauthorized

bp = Blueprint("users", __name__, url_prefix="/api/users")


class MeOut(BaseModel):
    userId: str
    displayName: str
    roles: list[str]
    createdAt: int = Field(description="ms since the epoch")


@bp.get("/me")
@tag(["users"])
@validate_response(MeOut)
@document_response(ErrorBody, 401)
async def me() -> MeOut:
    """The caller's own profile."""
    principal = current_principal()
    user = await app_ctx().auth.get_user(principal.user_id)
    if user is None or user.deleted_at is not None:  # deleted between token check and here
        raise Unauthorized("unknown or deleted user", code="invalid_token")
    return MeOut(
        userId=user.user_id,
        displayName=user.display_name,
        roles=list(user.roles),
        createdAt=user.created_at,
    )
