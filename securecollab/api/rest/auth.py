"""Auth routes: register, login, refresh, logout (thin: parse, call AuthService, shape)."""

from __future__ import annotations

from pydantic import BaseModel, Field
from quart import Blueprint
from quart_schema import document_response, tag, validate_request, validate_response

from securecollab.api.rest.middleware import app_ctx, client_ip, current_principal, public
from securecollab.api.rest.schemas import ErrorBody
from securecollab.services.auth import TokenPair

bp = Blueprint("auth", __name__, url_prefix="/api/auth")


class RegisterIn(BaseModel):
    userId: str = Field(max_length=254, description="email-like id, e.g. alice@example.com")
    password: str = Field(max_length=4096)
    displayName: str | None = Field(default=None, max_length=1000)


class UserOut(BaseModel):
    userId: str
    displayName: str
    createdAt: int = Field(description="ms since the epoch")


class LoginIn(BaseModel):
    username: str = Field(max_length=254, description="the userId")
    password: str = Field(max_length=4096)
    deviceId: str | None = Field(
        default=None, max_length=128, description="optional device id, put in the JWT"
    )


class TokenOut(BaseModel):
    token: str = Field(description="access JWT (HS512); send as Authorization: Bearer")
    expiresIn: int = Field(description="access token lifetime, seconds")
    userId: str
    refreshToken: str = Field(description="opaque; single use, rotates on refresh")


class RefreshIn(BaseModel):
    token: str = Field(max_length=512, description="the refresh token")


class LogoutIn(BaseModel):
    refreshToken: str | None = Field(
        default=None, max_length=512, description="session to end (default: this token's)"
    )


class SuccessOut(BaseModel):
    success: bool


def _tokens(pair: TokenPair) -> TokenOut:
    return TokenOut(
        token=pair.access_token,
        expiresIn=pair.expires_in,
        userId=pair.user_id,
        refreshToken=pair.refresh_token,
    )


@bp.post("/register")
@public
@tag(["auth"])
@validate_request(RegisterIn)
@validate_response(UserOut, 201)
@document_response(ErrorBody, 409)
@document_response(ErrorBody, 422)
@document_response(ErrorBody, 403)
async def register(data: RegisterIn) -> tuple[UserOut, int]:
    """Create an account.

    Password policy: at least `[auth] min_password_length` (10) characters. 409 when
    the userId is taken, 403 when registration is disabled.
    """
    user = await app_ctx().auth.register(data.userId, data.password, data.displayName, client_ip())
    return UserOut(
        userId=user.user_id, displayName=user.display_name, createdAt=user.created_at
    ), 201


@bp.post("/login")
@public
@tag(["auth"])
@validate_request(LoginIn)
@validate_response(TokenOut)
@document_response(ErrorBody, 401)
@document_response(ErrorBody, 429)
async def login(data: LoginIn) -> TokenOut:
    """Log in with userId and password; returns an access JWT and a refresh token.

    The same 401 answers an unknown user and a wrong password. Attempts are limited
    per username and per client IP (429 with Retry-After).
    """
    pair = await app_ctx().auth.login(
        data.username, data.password, client_ip(), device_id=data.deviceId
    )
    return _tokens(pair)


@bp.post("/refresh")
@public
@tag(["auth"])
@validate_request(RefreshIn)
@validate_response(TokenOut)
@document_response(ErrorBody, 401)
async def refresh(data: RefreshIn) -> TokenOut:
    """Trade a refresh token for a new pair; the old refresh token stops working.

    Presenting an already-used refresh token revokes every token of that session.
    """
    return _tokens(await app_ctx().auth.refresh(data.token, client_ip()))


@bp.post("/logout")
@tag(["auth"])
@validate_request(LogoutIn)
@validate_response(SuccessOut)
@document_response(ErrorBody, 401)
async def logout(data: LogoutIn) -> SuccessOut:
    """End a session: revoke the given refresh token's family, else this JWT's session."""
    await app_ctx().auth.logout(current_principal(), data.refreshToken, client_ip())
    return SuccessOut(success=True)
