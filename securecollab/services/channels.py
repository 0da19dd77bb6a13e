"""Channels: creation, membership and who may see or change what.

Roles per member: "owner" (the creator, exactly one), "admin", "member".

- Anyone authenticated may create a channel; they become its owner.
- Invite: owner or admins; only the owner may invite as "admin".
  Unknown users are refused (InvalidInput listing them); already-members are skipped
  and not counted.
- Leave: any member except the owner (the owner would leave the channel ownerless).
- Remove a member: the owner only; the owner cannot be removed.
- Reading a channel (details, members, messages) and subscribing to its topic:
  members only. A non-member gets NotFoundError, the same answer as for a channel that
  does not exist, so channel ids cannot be probed.

Every membership change is written to the audit log and announced on
`/user/queue/channels` to the affected user and the remaining members; a removed or
departed member's live subscription to `/topic/messages/{id}` is ended at once by a
broker control delivery.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from securecollab.backplane import Backplane, Delivery
from securecollab.ids import new_id, now_ms
from securecollab.services.audit import AuditService
from securecollab.services.errors import ConflictError, Forbidden, InvalidInput, NotFoundError
from securecollab.services.membership import ChannelMembers
from securecollab.services.messages import channel_topic
from securecollab.store import ChannelRecord, MemberRecord, Store

log = logging.getLogger(__name__)

CHANNELS_QUEUE = "/user/queue/channels"
DEFAULT_SETTINGS = {"encryption": "E2EE"}
MAX_NAME_CHARS = 100
MAX_DESCRIPTION_CHARS = 1000
MAX_SETTINGS = 32
MAX_SETTING_KEY_CHARS = 64
MAX_SETTING_VALUE_CHARS = 256
MAX_INVITES = 100  # user ids per invite call
INVITE_ROLES = ("member", "admin")


@dataclass(frozen=True, slots=True)
class ChannelView:
    channel: ChannelRecord
    members: list[MemberRecord]

    def to_json(self) -> dict[str, Any]:
        """The client-facing shape: ids, names, settings and members with their roles."""
        c = self.channel
        return {
            "id": c.id,
            "name": c.name,
            "description": c.description,
            "ownerId": c.owner_id,
            "settings": c.settings,
            "createdAt": c.created_at,
            "members": [m.user_id for m in self.members],
            "memberRoles": {m.user_id: m.role for m in self.members},
        }


def _text(value: object, field: str, max_chars: int, *, required: bool) -> str:
    if value is None:
        if required:
            raise InvalidInput(f"{field} is required")
        return ""
    if not isinstance(value, str):
        raise InvalidInput(f"{field} must be a string")
    value = value.strip()
    if required and not value:
        raise InvalidInput(f"{field} must not be empty")
    if len(value) > max_chars:
        raise InvalidInput(f"{field} is longer than {max_chars} characters")
    return value


def _settings(value: object) -> dict[str, str]:
    if value is None:
        return dict(DEFAULT_SETTINGS)
    if not isinstance(value, Mapping):
        raise InvalidInput("settings must be an object of string values")
    if len(value) > MAX_SETTINGS:
        raise InvalidInput(f"settings has more than {MAX_SETTINGS} entries")
    out = dict(DEFAULT_SETTINGS)
    for k, v in value.items():
        if not isinstance(k, str) or not k or len(k) > MAX_SETTING_KEY_CHARS:
            raise InvalidInput(f"a settings key must be 1..{MAX_SETTING_KEY_CHARS} characters")
        if not isinstance(v, str) or len(v) > MAX_SETTING_VALUE_CHARS:
            raise InvalidInput(
                f"settings[{k}] must be a string of at most {MAX_SETTING_VALUE_CHARS} characters"
            )
        out[k] = v
    return out


class ChannelService:
    """Channel lifecycle and membership rules; see the module docstring."""

    def __init__(
        self,
        store: Store,
        backplane: Backplane,
        audit: AuditService,
        *,
        members: ChannelMembers | None = None,
    ) -> None:
        self.store = store
        self.backplane = backplane
        self.audit = audit
        # the member-id cache the send path reads; every change here invalidates it
        self.members = members if members is not None else ChannelMembers.for_store(store)

    # ------------------------------------------------------------------ queries
    async def is_member(self, user_id: str, channel_id: str) -> bool:
        """Whether user_id may read / subscribe to / send into channel_id."""
        return await self.store.get_member(channel_id, user_id) is not None

    async def get(self, user_id: str, channel_id: str) -> ChannelView:
        """A channel with its members; members only (NotFoundError otherwise)."""
        channel = await self.store.get_channel(channel_id)
        members = await self.store.list_channel_members(channel_id) if channel else []
        if channel is None or not any(m.user_id == user_id for m in members):
            raise NotFoundError(f"channel {channel_id} not found")
        return ChannelView(channel, members)

    async def list_mine(self, user_id: str) -> list[ChannelView]:
        """The channels user_id is a member of, each with its members."""
        return [
            ChannelView(c, await self.store.list_channel_members(c.id))
            for c in await self.store.list_user_channels(user_id)
        ]

    async def _member_or_404(self, user_id: str, channel_id: str) -> MemberRecord:
        member = await self.store.get_member(channel_id, user_id)
        if member is None:
            raise NotFoundError(f"channel {channel_id} not found")
        return member

    # ------------------------------------------------------------------ changes
    async def create(self, owner_id: str, payload: object, *, ip: str | None = None) -> ChannelView:
        """Create a channel owned by owner_id: payload {name, description?, settings?}."""
        if not isinstance(payload, Mapping):
            raise InvalidInput("the request must be a JSON object")
        unknown = sorted(set(payload) - {"name", "description", "settings"})
        if unknown:
            raise InvalidInput(f"unknown field(s): {', '.join(map(str, unknown))}")
        now = now_ms()
        channel = ChannelRecord(
            id=new_id(),
            name=_text(payload.get("name"), "name", MAX_NAME_CHARS, required=True),
            description=_text(
                payload.get("description"), "description", MAX_DESCRIPTION_CHARS, required=False
            ),
            owner_id=owner_id,
            settings=_settings(payload.get("settings")),
            created_at=now,
        )
        try:
            await self.store.create_channel(channel)
        finally:
            self.members.changed(channel.id)
        await self.audit.record(owner_id, "channel.create", channel.id, ip, {"name": channel.name})
        return ChannelView(channel, [MemberRecord(channel.id, owner_id, "owner", now)])

    async def invite(
        self,
        actor_id: str,
        channel_id: str,
        user_ids: object,
        role: object = None,
        *,
        ip: str | None = None,
    ) -> int:
        """Add users to a channel; return how many were newly added.

        Owner or admins only; role "admin" only by the owner. Raises InvalidInput listing
        unknown users (nobody is added then).
        """
        actor = await self._member_or_404(actor_id, channel_id)
        if actor.role not in ("owner", "admin"):
            raise Forbidden("only the channel owner or an admin may invite")
        role = "member" if role is None else role
        if role not in INVITE_ROLES:
            raise InvalidInput("role must be member or admin")
        if role == "admin" and actor.role != "owner":
            raise Forbidden("only the channel owner may invite admins")
        if not isinstance(user_ids, list) or not user_ids:
            raise InvalidInput("userIds must be a non-empty list of user ids")
        if len(user_ids) > MAX_INVITES:
            raise InvalidInput(f"at most {MAX_INVITES} userIds per invite")
        if not all(isinstance(u, str) and u for u in user_ids):
            raise InvalidInput("userIds must be strings")
        stored = await self.store.existing_users(user_ids)
        by_lower = {u.lower(): u for u in stored}
        unknown = [u for u in user_ids if u.lower() not in by_lower]
        if unknown:
            raise InvalidInput(code="unknown_users", detail=f"unknown users: {', '.join(unknown)}")
        wanted = list(dict.fromkeys(by_lower[u.lower()] for u in user_ids))
        try:
            added = await self.store.add_channel_members(channel_id, wanted, str(role), now_ms())
        finally:
            self.members.changed(channel_id)
        if added:
            await self.audit.record(
                actor_id, "channel.invite", channel_id, ip, {"userIds": added, "role": role}
            )
            await self._announce(channel_id, {"type": "INVITED", "userIds": added, "by": actor_id})
        return len(added)

    async def leave(self, user_id: str, channel_id: str, *, ip: str | None = None) -> None:
        """Leave a channel; the owner cannot (ConflictError)."""
        member = await self._member_or_404(user_id, channel_id)
        if member.role == "owner":
            raise ConflictError("the owner cannot leave the channel")
        try:
            await self.store.remove_channel_member(channel_id, user_id)
        finally:
            self.members.changed(channel_id)
        await self.audit.record(user_id, "channel.leave", channel_id, ip, {"userId": user_id})
        await self._after_removal(
            channel_id, user_id, {"type": "LEFT", "userId": user_id, "by": user_id}
        )

    async def remove_member(
        self, actor_id: str, channel_id: str, user_id: str, *, ip: str | None = None
    ) -> None:
        """Remove user_id from the channel: the owner only; the owner cannot be removed."""
        actor = await self._member_or_404(actor_id, channel_id)
        if actor.role != "owner":
            raise Forbidden("only the channel owner may remove members")
        # members are stored under the stored spelling; the path may spell it otherwise
        user = await self.store.get_user(user_id)
        target = await self.store.get_member(channel_id, user.user_id if user else user_id)
        if target is None:
            raise NotFoundError(f"{user_id} is not a member of channel {channel_id}")
        if target.role == "owner":
            raise ConflictError("the owner cannot be removed from the channel")
        try:
            await self.store.remove_channel_member(channel_id, target.user_id)
        finally:
            self.members.changed(channel_id)
        await self.audit.record(
            actor_id, "channel.remove", channel_id, ip, {"userId": target.user_id}
        )
        await self._after_removal(
            channel_id,
            target.user_id,
            {"type": "REMOVED", "userId": target.user_id, "by": actor_id},
        )

    # ------------------------------------------------------------------ fan-out
    async def _after_removal(self, channel_id: str, user_id: str, event: dict[str, Any]) -> None:
        # End the departed user's live topic subscription first, so no message sent
        # after the removal committed can reach them.
        await self._publish(
            Delivery(
                kind="control",
                destination=channel_topic(channel_id),
                body=b"",
                headers=(("action", "unsubscribe"), ("reason", "removed from channel")),
                user_id=user_id,
            )
        )
        await self._announce(channel_id, event, also=[user_id])

    async def _announce(
        self, channel_id: str, event: dict[str, Any], also: Sequence[str] = ()
    ) -> None:
        """Tell every current member (and `also`) on /user/queue/channels."""
        channel = await self.store.get_channel(channel_id)
        members = [m.user_id for m in await self.store.list_channel_members(channel_id)]
        body = json.dumps(
            {
                **event,
                "channelId": channel_id,
                "channelName": channel.name if channel else None,
                "at": now_ms(),
            },
            separators=(",", ":"),
        ).encode()
        for user_id in dict.fromkeys([*members, *also]):
            await self._publish(
                Delivery(
                    kind="user",
                    destination=CHANNELS_QUEUE,
                    body=body,
                    headers=(("content-type", "application/json"),),
                    user_id=user_id,
                )
            )

    async def _publish(self, delivery: Delivery) -> None:
        try:
            await self.backplane.publish(delivery)
        except Exception:
            # The membership change is committed; a missed notice is not worth failing it.
            log.exception("channel notice to %s failed", delivery.user_id)
