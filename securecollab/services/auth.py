"""Identity: registration, password login, access JWTs, rotating refresh tokens.

- Passwords: argon2id (argon2-cffi), hashed and verified in worker threads behind a
  limiter sized to the CPU count, so a login flood cannot run dozens of 64 MiB hashes
  at once.
- Access tokens: JWT HS512 only, claims `sub`, `username`, `roles`, `iat`, `exp`, `jti`,
  optional `device_id`, and `sid` (the refresh-token family, so logout can revoke the
  session). Every other algorithm (`none`, HS256 with the same secret, RS*) is refused.
- Refresh tokens: opaque random strings; only their SHA-256 is stored. Each use rotates
  the token; presenting an already-rotated token revokes the whole family (theft).
- No user enumeration on login: an unknown user gets the same error as a bad password,
  after a dummy argon2 verify so the timing matches.
- Login attempts are throttled per username and per client IP through the backplane's
  sliding windows (every attempt counts, successful or not).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import secrets
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import argon2
import jwt
import trio

from securecollab.backplane import Backplane, Delivery
from securecollab.config import Settings
from securecollab.ids import new_id, now_ms
from securecollab.services.audit import AuditService
from securecollab.services.errors import (
    ConflictError,
    Forbidden,
    InvalidInput,
    RateLimited,
    Unauthorized,
)
from securecollab.store import Conflict, RefreshTokenRecord, Store, UserRecord

log = logging.getLogger("securecollab.auth")

JWT_ALGORITHM = "HS512"
DEFAULT_ROLES: tuple[str, ...] = ("ROLE_USER",)
MAX_PASSWORD_CHARS = 1024  # argon2 hashes anything, but a policy bound keeps requests sane
MAX_DISPLAY_NAME = 100
# email-like: local@domain; the domain may be a bare host (alice@localhost) for labs
USER_ID_RE = re.compile(r"^[A-Za-z0-9._%+\-]{1,64}@[A-Za-z0-9\-]{1,63}(\.[A-Za-z0-9\-]{1,63})*$")
LOGIN_FAILED = "invalid username or password"


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated caller. `jti` is None for password (STOMP login/passcode) auth."""

    user_id: str
    roles: tuple[str, ...]
    device_id: str | None
    jti: str | None
    family_id: str | None = None  # the refresh-token family (session) the JWT came from


@dataclass(frozen=True, slots=True)
class TokenPair:
    access_token: str
    expires_in: int  # seconds
    refresh_token: str
    user_id: str
    device_id: str | None = None


def hash_refresh_token(token: str) -> str:
    """SHA-256 hex: refresh tokens are 256-bit random, so a fast hash is enough."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def ensure_jwt_secret(settings: Settings) -> tuple[bytes, bool]:
    """Return (secret, generated_now): from config, else data_dir/jwt_secret (created once).

    Blocking (file I/O): call it from a worker thread. The file holds 64 random bytes
    as hex and is created with mode 0600 inside a 0700 data directory.
    """
    if settings.server.jwt_secret:
        return settings.server.jwt_secret.encode("utf-8"), False
    data = settings.server.data_path
    data.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = data / "jwt_secret"
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return _read_secret(path), False
    secret = secrets.token_bytes(64)
    with os.fdopen(fd, "w") as f:
        f.write(secret.hex() + "\n")
    return secret, True


def _read_secret(path: Path) -> bytes:
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        log.warning(
            "jwt secret file is readable by others; chmod 600 it",
            extra={"fields": {"path": str(path), "mode": oct(mode)}},
        )
    text = path.read_text().strip()
    try:
        secret = bytes.fromhex(text)
    except ValueError:
        raise RuntimeError(f"{path}: not a hex secret; delete it to generate a new one") from None
    if len(secret) < 64:
        raise RuntimeError(f"{path}: secret shorter than 64 bytes; delete it to regenerate")
    return secret


class PasswordHasher:
    """argon2id in worker threads, at most `concurrency` at a time."""

    def __init__(
        self, *, time_cost: int, memory_kib: int, parallelism: int, concurrency: int
    ) -> None:
        self._ph = argon2.PasswordHasher(
            time_cost=time_cost,
            memory_cost=memory_kib,
            parallelism=parallelism,
            type=argon2.Type.ID,
        )
        self._limiter = trio.CapacityLimiter(concurrency)
        self._dummy: str | None = None

    async def hash(self, password: str) -> str:
        return await trio.to_thread.run_sync(self._ph.hash, password, limiter=self._limiter)

    async def verify(self, encoded: str, password: str) -> bool:
        def run() -> bool:
            try:
                return self._ph.verify(encoded, password)
            except (argon2.exceptions.VerificationError, argon2.exceptions.InvalidHashError):
                return False

        return await trio.to_thread.run_sync(run, limiter=self._limiter)

    async def dummy_verify(self, password: str) -> None:
        """Spend the time a real verify would take (unknown users: no timing oracle)."""
        if self._dummy is None:
            self._dummy = await self.hash(secrets.token_urlsafe(16))
        await self.verify(self._dummy, password)


class AuthService:
    """Registration, login, token refresh/logout and token verification."""

    def __init__(
        self,
        store: Store,
        backplane: Backplane,
        settings: Settings,
        audit: AuditService,
        *,
        jwt_secret: bytes,
    ) -> None:
        self._store = store
        self._backplane = backplane
        self._settings = settings
        self._cfg = settings.auth
        self._audit = audit
        self._secret = jwt_secret
        self.passwords = PasswordHasher(
            time_cost=self._cfg.argon2_time_cost,
            memory_kib=self._cfg.argon2_memory_kib,
            parallelism=self._cfg.argon2_parallelism,
            concurrency=max(1, os.cpu_count() or 1),
        )

    # ------------------------------------------------------------------ policy
    def check_user_id(self, user_id: str) -> str:
        """Validate an email-like userId (<= 254 chars); returns it stripped."""
        uid = user_id.strip()
        if len(uid) > 254 or not USER_ID_RE.match(uid):
            raise InvalidInput(
                "userId must be email-like, e.g. alice@example.com", code="invalid_user_id"
            )
        return uid

    def check_password(self, password: str) -> None:
        """Password policy: min_password_length..1024 characters, not only whitespace."""
        n = self._cfg.min_password_length
        if len(password) < n:
            raise InvalidInput(f"password must have at least {n} characters", code="weak_password")
        if len(password) > MAX_PASSWORD_CHARS:
            raise InvalidInput(
                f"password must have at most {MAX_PASSWORD_CHARS} characters", code="weak_password"
            )
        if not password.strip():
            raise InvalidInput("password must not be only whitespace", code="weak_password")

    @staticmethod
    def _clean_display_name(name: str | None, user_id: str) -> str:
        if name is None or not name.strip():
            return user_id.split("@", 1)[0]
        name = name.strip()
        if len(name) > MAX_DISPLAY_NAME:
            raise InvalidInput(
                f"displayName must have at most {MAX_DISPLAY_NAME} characters",
                code="invalid_display_name",
            )
        if any(unicodedata.category(c).startswith("C") for c in name):
            raise InvalidInput(
                "displayName must not contain control characters", code="invalid_display_name"
            )
        return name

    # ------------------------------------------------------------------ registration
    async def register(
        self,
        user_id: str,
        password: str,
        display_name: str | None = None,
        ip: str | None = None,
        *,
        roles: Sequence[str] = DEFAULT_ROLES,
        by_admin: bool = False,
    ) -> UserRecord:
        """Create a user. `by_admin` (the CLI) works even when registration is disabled."""
        if not by_admin and not self._cfg.registration_enabled:
            raise Forbidden("registration is disabled on this server", code="registration_disabled")
        if not by_admin and ip:
            # each registration costs an argon2id hash: same per-IP budget as logins
            await self._hit(
                f"register:ip:{ip}", self._cfg.login_limit_per_ip_per_min, "registration"
            )
        uid = self.check_user_id(user_id)
        self.check_password(password)
        name = self._clean_display_name(display_name, uid)
        user = UserRecord(
            user_id=uid,
            password_hash=await self.passwords.hash(password),
            display_name=name,
            roles=tuple(roles),
            created_at=now_ms(),
        )
        try:
            await self._store.create_user(user)
        except Conflict:
            raise ConflictError("this userId is already registered", code="user_exists") from None
        await self._audit.record(
            uid, "auth.register", uid, ip, {"by_admin": by_admin} if by_admin else None
        )
        return user

    # ------------------------------------------------------------------ login
    async def _throttle_login(self, username: str, ip: str | None) -> None:
        now = now_ms()
        checks = [
            (f"login:user:{username.strip().lower()}", self._cfg.login_limit_per_user_per_min)
        ]
        if ip:
            checks.insert(0, (f"login:ip:{ip}", self._cfg.login_limit_per_ip_per_min))
        for key, limit in checks:
            await self._hit(key, limit, "login", now)

    async def _hit(self, key: str, limit: int, what: str, now: int | None = None) -> None:
        """Count one attempt in a 1-minute sliding window; RateLimited when over `limit`."""
        decision = await self._backplane.hit(key, limit, 60_000, now_ms() if now is None else now)
        if not decision.allowed:
            retry = -(-decision.retry_after_ms // 1000)
            raise RateLimited(
                f"too many {what} attempts; retry in {retry} s",
                retry_after_s=retry,
                code=f"{what}_throttled",
            )

    async def _check_password_login(
        self, username: str, password: str, ip: str | None
    ) -> UserRecord:
        await self._throttle_login(username, ip)
        user = await self._store.get_user(username.strip()) if username.strip() else None
        if user is None:
            await self.passwords.dummy_verify(password)
            ok = False
        else:
            ok = await self.passwords.verify(user.password_hash, password)
            ok = ok and user.deleted_at is None
        if not ok or user is None:
            # target is what the caller typed: an operator can spot sprays on one account
            await self._audit.record(None, "auth.login.failure", username[:254], ip)
            raise Unauthorized(LOGIN_FAILED, code="invalid_credentials")
        return user

    async def login(
        self, username: str, password: str, ip: str | None = None, *, device_id: str | None = None
    ) -> TokenPair:
        """Check the password and start a session (a new refresh-token family)."""
        user = await self._check_password_login(username, password, ip)
        family = new_id()
        refresh = await self._new_refresh(user.user_id, family, device_id)
        await self._audit.record(user.user_id, "auth.login.success", user.user_id, ip)
        return TokenPair(
            access_token=self.issue_access_token(user, device_id=device_id, family_id=family),
            expires_in=self._cfg.access_ttl_s,
            refresh_token=refresh,
            user_id=user.user_id,
            device_id=device_id,
        )

    async def authenticate_password(
        self, username: str, password: str, ip: str | None = None
    ) -> Principal:
        """Password check for STOMP CONNECT login/passcode; same throttling and audit as login."""
        user = await self._check_password_login(username, password, ip)
        return Principal(user.user_id, user.roles, None, None)

    # ------------------------------------------------------------------ tokens
    def issue_access_token(
        self, user: UserRecord, *, device_id: str | None = None, family_id: str | None = None
    ) -> str:
        now_s = now_ms() // 1000
        claims: dict[str, object] = {
            "sub": user.user_id,
            "username": user.user_id,
            "roles": list(user.roles),
            "iat": now_s,
            "exp": now_s + self._cfg.access_ttl_s,
            "jti": new_id(),
        }
        if device_id:
            claims["device_id"] = device_id
        if family_id:
            claims["sid"] = family_id
        return jwt.encode(claims, self._secret, algorithm=JWT_ALGORITHM)

    async def _new_refresh(self, user_id: str, family: str, device_id: str | None) -> str:
        token = secrets.token_urlsafe(32)
        now = now_ms()
        await self._store.add_refresh_token(
            RefreshTokenRecord(
                token_hash=hash_refresh_token(token),
                user_id=user_id,
                family_id=family,
                issued_at=now,
                expires_at=now + self._cfg.refresh_ttl_s * 1000,
                device_id=device_id,
            )
        )
        return token

    async def refresh(self, refresh_token: str, ip: str | None = None) -> TokenPair:
        """Rotate a refresh token into a new pair; reuse of a rotated token revokes its family."""
        old_hash = hash_refresh_token(refresh_token)
        rec = await self._store.get_refresh_token(old_hash)
        if rec is None:
            raise Unauthorized("invalid refresh token", code="invalid_token")
        now = now_ms()
        if rec.revoked_at is not None:
            raise Unauthorized("refresh token revoked", code="invalid_token")
        if rec.used_at is not None:
            await self._reuse_detected(rec, ip, now)
        if rec.expires_at <= now:
            raise Unauthorized("refresh token expired", code="token_expired")
        user = await self._store.get_user(rec.user_id)
        if user is None or user.deleted_at is not None:
            await self._store.revoke_token_family(rec.family_id, now)
            raise Unauthorized("unknown or deleted user", code="invalid_token")
        new_token = secrets.token_urlsafe(32)
        new = RefreshTokenRecord(
            token_hash=hash_refresh_token(new_token),
            user_id=user.user_id,
            family_id=rec.family_id,
            issued_at=now,
            expires_at=now + self._cfg.refresh_ttl_s * 1000,
            device_id=rec.device_id,
        )
        if not await self._store.rotate_refresh_token(old_hash, new, now):
            # lost a race with another use of the same token: that is reuse too
            await self._reuse_detected(rec, ip, now)
        return TokenPair(
            access_token=self.issue_access_token(
                user, device_id=rec.device_id, family_id=rec.family_id
            ),
            expires_in=self._cfg.access_ttl_s,
            refresh_token=new_token,
            user_id=user.user_id,
            device_id=rec.device_id,
        )

    async def _reuse_detected(self, rec: RefreshTokenRecord, ip: str | None, now: int) -> None:
        revoked = await self._store.revoke_token_family(rec.family_id, now)
        await self._end_live_sessions(rec.user_id, rec.family_id, "session revoked")
        await self._audit.record(
            rec.user_id,
            "auth.refresh.reuse",
            rec.user_id,
            ip,
            {"family": rec.family_id, "revoked": revoked},
        )
        log.warning("refresh token reuse: family revoked", extra={"fields": {"user": rec.user_id}})
        raise Unauthorized("refresh token already used; session revoked", code="token_reused")

    async def logout(
        self, principal: Principal, refresh_token: str | None = None, ip: str | None = None
    ) -> None:
        """Revoke the session: the given refresh token's family, else the JWT's own family."""
        family = principal.family_id
        if refresh_token:
            rec = await self._store.get_refresh_token(hash_refresh_token(refresh_token))
            if rec is None or rec.user_id.lower() != principal.user_id.lower():
                raise InvalidInput(
                    "refreshToken is not one of your sessions", code="invalid_refresh_token"
                )
            family = rec.family_id
        if family:
            await self._store.revoke_token_family(family, now_ms())
            await self._end_live_sessions(principal.user_id, family, "session ended: logged out")
        await self._audit.record(principal.user_id, "auth.logout", principal.user_id, ip)

    async def _end_live_sessions(self, user_id: str, family: str, why: str) -> None:
        """Close the STOMP connections that authenticated with this login session's
        tokens, on every node (a control delivery through the backplane)."""
        try:
            await self._backplane.publish(
                Delivery(
                    kind="control",
                    destination="",
                    body=b"",
                    headers=(("action", "disconnect"), ("session-key", family), ("message", why)),
                    user_id=user_id,
                )
            )
        except Exception:  # the revocation is committed; new connections are refused
            log.exception("could not close the live sessions of a revoked login session")

    async def verify_access_token(self, token: str) -> Principal:
        """Check an access JWT and that its user still exists; raise Unauthorized otherwise.

        Refused: any algorithm but HS512 (incl. `none`), bad signature, expired, `nbf`
        in the future, missing `sub`/`username`/`roles`/`iat`/`exp`/`jti`, unknown or
        deleted user, a session (`sid`) that was logged out or revoked
        (`token_revoked`). Roles come from the store, so a role change applies at once.
        (STOMP connections of a session are closed by its logout: `_end_live_sessions`.)
        """
        try:
            header = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError:
            raise Unauthorized("malformed token", code="invalid_token") from None
        if header.get("alg") != JWT_ALGORITHM:
            raise Unauthorized("token algorithm not accepted", code="invalid_token")
        try:
            claims = jwt.decode(
                token,
                self._secret,
                algorithms=[JWT_ALGORITHM],
                options={"require": ["sub", "iat", "exp", "jti"]},
            )
        except jwt.ExpiredSignatureError:
            raise Unauthorized("token expired", code="token_expired") from None
        except jwt.ImmatureSignatureError:
            raise Unauthorized("token not yet valid", code="invalid_token") from None
        except jwt.InvalidSignatureError:
            raise Unauthorized("bad token signature", code="invalid_token") from None
        except jwt.InvalidTokenError:
            raise Unauthorized("invalid token", code="invalid_token") from None
        sub, username, roles = claims.get("sub"), claims.get("username"), claims.get("roles")
        device = claims.get("device_id")
        if (
            not isinstance(sub, str)
            or not isinstance(username, str)
            or not isinstance(roles, list)
            or not all(isinstance(r, str) for r in roles)
            or not (device is None or isinstance(device, str))
        ):
            raise Unauthorized("token is missing required claims", code="invalid_token")
        user = await self._store.get_user(sub)
        if user is None or user.deleted_at is not None:
            raise Unauthorized("unknown or deleted user", code="invalid_token")
        sid = claims.get("sid")
        if isinstance(sid, str) and await self._store.family_revoked(sid):
            # logged out (or its refresh token was stolen and reused): the access
            # token dies with the session, not an hour later when it expires
            raise Unauthorized("session ended: log in again", code="token_revoked")
        return Principal(
            user_id=user.user_id,
            roles=user.roles,
            device_id=device,
            jti=str(claims["jti"]),
            family_id=sid if isinstance(sid, str) else None,
        )

    async def get_user(self, user_id: str) -> UserRecord | None:
        """The user record (None when unknown), for profile routes."""
        return await self._store.get_user(user_id)
