"""The device key directory over REST: register, read (one device or all), delete own.

Any authenticated user may read any user's public keys (a sender needs every device of
every recipient); `DELETE /api/keys/{deviceId}` names no user, so it can only ever
delete one of the caller's own devices.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field
from quart import Blueprint
from quart_schema import document_request, document_response, tag

from securecollab.api.rest.chat import json_body
from securecollab.api.rest.middleware import app_ctx, client_ip, current_principal
from securecollab.api.rest.schemas import ErrorBody
from securecollab.services.errors import Unavailable
from securecollab.services.keys import KeyService, key_json

bp = Blueprint("keys", __name__, url_prefix="/api/keys")


class RegisterIn(BaseModel):
    deviceId: str = Field(description="1..128 of letters, digits and . _ : @ + -")
    publicKey: str = Field(description="PEM SubjectPublicKeyInfo, X25519 (or P-256)")


class RegisterOut(BaseModel):
    bundleId: str
    deviceId: str
    registeredAt: int = Field(description="ms since the epoch")


class KeyOut(BaseModel):
    bundleId: str
    userId: str
    deviceId: str
    publicKey: str
    registeredAt: int
    lastUsedAt: int | None = Field(description="when the device last fetched its messages")


class SuccessOut(BaseModel):
    success: bool


def keys() -> KeyService:
    service = app_ctx().keys
    if service is None:
        raise Unavailable("the key directory is not available on this server")
    return service


@bp.post("/register")
@tag(["keys"])
@document_request(RegisterIn)
@document_response(RegisterOut, 201)
@document_response(ErrorBody, 422)
async def register() -> tuple[dict[str, Any], int]:
    """Publish (or replace, audited) the public key of one of your devices."""
    rec = await keys().register(current_principal().user_id, await json_body(), ip=client_ip())
    return {
        "bundleId": rec.bundle_id,
        "deviceId": rec.device_id,
        "registeredAt": rec.registered_at,
    }, 201


@bp.get("/<user_id>/<device_id>")
@tag(["keys"])
@document_response(KeyOut, 200)
@document_response(ErrorBody, 404)
async def get_one(user_id: str, device_id: str) -> dict[str, Any]:
    """One device's public key."""
    return key_json(await keys().get(user_id, device_id))


@bp.get("/<user_id>")
@tag(["keys"])
@document_response(list[KeyOut], 200)
@document_response(ErrorBody, 404)
async def get_all(user_id: str) -> list[dict[str, Any]]:
    """Every registered device of a user (404 for an unknown user)."""
    return [key_json(k) for k in await keys().list(user_id)]


@bp.delete("/<device_id>")
@tag(["keys"])
@document_response(SuccessOut, 200)
@document_response(ErrorBody, 404)
async def delete(device_id: str) -> dict[str, bool]:
    """Delete one of your own devices' keys."""
    await keys().delete(current_principal().user_id, device_id, ip=client_ip())
    return {"success": True}
