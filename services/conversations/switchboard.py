"""The switchboard (SunCo v2): which integration is in control of a conversation, and the
actions that move control between a bot, an agent desk and back.

An app has at most one switchboard with up to ten switchboard integrations, each standing for a
custom integration (`integrationId`) or an integration type (`integrationType`, e.g. `desk`).
A conversation's `switchboard_active` (in control) and `switchboard_pending` (offered control)
columns name them; every change goes through `Store.set_control`, a compare-and-set on both, so
two replicas (or two callers) acting on one conversation at once apply one change after the
other and announce each exactly once. The configuration is the database's; the apps KV bucket
carries a copy (`records.SwitchboardRecord`) that `webhooks` filters deliveries with and that
the inbound path reads to give new conversations to the default integration without a query.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import AsyncIterator
from typing import Any

import msgspec

from services.conversations import models
from services.conversations.admin import Admin, member_record, switchboard_lock
from services.conversations.core import ConversationCore
from services.conversations.store import Store, conversation_ref
from shared import records
from shared.db import Row
from shared.http import ApiError
from shared.ids import new_id, now
from shared.messages import conversation as conv

MAX_SWITCHBOARD_INTEGRATIONS = 10
NEXT = "next"
# An integration type a switchboard integration may stand for without an integration id (an
# internal handler such as `desk`, or a partner's client id as SunCo has them).
_INTEGRATION_TYPE = re.compile(r"^[A-Za-z0-9:_.-]{1,64}$")
# Compare-and-set attempts before a control action gives up (others kept changing the state).
_CONTROL_ATTEMPTS = 5


def member_out(member: records.SwitchboardIntegrationRecord) -> models.SwitchboardIntegration:
    return models.SwitchboardIntegration(
        id=member.id, name=member.name, integration_id=member.integration_id or "",
        integration_type=member.integration_type, deliver_standby_events=member.deliver_standby_events,
        next_switchboard_integration_id=member.next_switchboard_integration_id,
        message_history_count=member.message_history_count)


def switchboard_out(row: Row) -> models.Switchboard:
    return models.Switchboard(id=row["id"], enabled=bool(row["enabled"]),
                              default_switchboard_integration_id=row["default_switchboard_integration_id"])


def resolve_target(target: str, switchboard: records.SwitchboardRecord,
                   active: records.SwitchboardIntegrationRecord | None) -> records.SwitchboardIntegrationRecord:
    """The switchboard integration a control action names: `next` (the active one's next), else
    by id, by name, then by integration type, in that order; 400 when none or several match."""
    if target == NEXT:
        if active is None or active.next_switchboard_integration_id is None:
            raise ApiError(400, "No next switchboard integration: nobody is in control, or the one in control "
                                "has no nextSwitchboardIntegrationId", "bad_request")
        following = switchboard.integration(active.next_switchboard_integration_id)
        if following is None:
            raise ApiError(400, "The next switchboard integration no longer exists", "bad_request")
        return following
    for field in ("id", "name", "integration_type"):
        found = [m for m in switchboard.integrations if getattr(m, field) == target]
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            raise ApiError(400, f"{target!r} names several switchboard integrations", "bad_request")
    raise ApiError(400, f"No switchboard integration {target!r} in this app's switchboard", "bad_request")


class Switchboards:
    """Switchboards and switchboard integrations (config), and the control actions."""

    def __init__(self, store: Store, admin: Admin, core: ConversationCore) -> None:
        self.store = store
        self.admin = admin
        self.core = core

    # --- configuration ----------------------------------------------------------------------
    # Every change reads, checks and writes inside one transaction serialized per app (with
    # `Admin.delete_integration` too), so two calls at once, on any replicas, cannot leave a
    # default, a next or a member pointing at something the other one removed.

    @contextlib.asynccontextmanager
    async def _changing(self, app_id: str) -> AsyncIterator[None]:
        await self.admin.app_row(app_id)
        async with self.store.tx():
            await self.store.serialize(switchboard_lock(app_id))
            yield
            await self.admin.publish_app(app_id)

    async def _switchboard_row(self, app_id: str, switchboard_id: str) -> Row:
        row = await self.store.switchboard(app_id, switchboard_id)
        if row is None:
            raise ApiError(404, "Switchboard not found", "switchboard_not_found")
        return row

    async def create(self, app_id: str) -> models.Switchboard:
        """The app's switchboard, created disabled (configure it, then enable it); 409 when the
        app has one."""
        async with self._changing(app_id):
            if not await self.store.add_switchboard(new_id(), app_id, False, now()):
                raise ApiError(409, "This app already has a switchboard", "conflict")
        row = await self.store.switchboard(app_id)
        assert row is not None
        return switchboard_out(row)

    async def listed(self, app_id: str) -> list[models.Switchboard]:
        await self.admin.app_row(app_id)
        row = await self.store.switchboard(app_id)
        return [] if row is None else [switchboard_out(row)]

    async def update(self, app_id: str, switchboard_id: str, body: models.SwitchboardUpdateBody) -> models.Switchboard:
        async with self._changing(app_id):
            row = await self._switchboard_row(app_id, switchboard_id)
            default_id = row["default_switchboard_integration_id"]
            if body.default_switchboard_integration_id is not msgspec.UNSET:
                default_id = body.default_switchboard_integration_id  # null: no default
            members = {m["id"] for m in await self.store.switchboard_integrations(switchboard_id)}
            if default_id is not None and default_id not in members:
                raise ApiError(400, "defaultSwitchboardIntegrationId must be a switchboard integration of this "
                                    "switchboard", "bad_request")
            enabled = bool(row["enabled"]) if body.enabled is None else body.enabled
            await self.store.set_switchboard(switchboard_id, enabled, default_id)
        return switchboard_out(await self._switchboard_row(app_id, switchboard_id))

    async def delete(self, app_id: str, switchboard_id: str) -> None:
        async with self._changing(app_id):
            await self._switchboard_row(app_id, switchboard_id)
            await self.store.delete_switchboard(switchboard_id)

    async def members(self, app_id: str, switchboard_id: str) -> list[models.SwitchboardIntegration]:
        await self.admin.app_row(app_id)
        await self._switchboard_row(app_id, switchboard_id)
        return [member_out(member_record(r)) for r in await self.store.switchboard_integrations(switchboard_id)]

    async def _check_member(self, app_id: str, values: dict[str, Any], others: list[Row]) -> dict[str, Any]:
        """`values` (a member's columns) checked against the app and the other members."""
        if values["name"] == NEXT:
            raise ApiError(400, f"{NEXT!r} is the keyword for a member's next: not a name", "bad_request")
        if any(o["name"] == values["name"] for o in others):
            raise ApiError(409, f"A switchboard integration named {values['name']!r} exists", "conflict")
        if values["integration_id"] is not None:
            integration = await self.store.get_integration(app_id, values["integration_id"])
            if integration is None or integration["type"] != "custom":
                raise ApiError(400, "integrationId must be a custom integration of this app", "bad_request")
            if any(o["integration_id"] == values["integration_id"] for o in others):
                raise ApiError(409, "That integration is a switchboard integration already", "conflict")
            values["integration_type"] = integration["type"]
        elif not values["integration_type"] or not _INTEGRATION_TYPE.match(values["integration_type"]):
            raise ApiError(400, "One of integrationId or integrationType (1-64 of [A-Za-z0-9:_.-]) is required",
                           "bad_request")
        following = values["next_switchboard_integration_id"]
        if following is not None and following not in {o["id"] for o in others} | {values["id"]}:
            raise ApiError(400, "nextSwitchboardIntegrationId must be a switchboard integration of this switchboard",
                           "bad_request")
        return values

    async def add_member(self, app_id: str, switchboard_id: str,
                         body: models.SwitchboardIntegrationCreateBody) -> models.SwitchboardIntegration:
        if body.integration_id is not None and body.integration_type is not None:
            raise ApiError(400, "Give integrationId or integrationType, not both", "bad_request")
        async with self._changing(app_id):
            await self._switchboard_row(app_id, switchboard_id)
            others = await self.store.switchboard_integrations(switchboard_id)
            if len(others) >= MAX_SWITCHBOARD_INTEGRATIONS:
                raise ApiError(400, f"A switchboard has at most {MAX_SWITCHBOARD_INTEGRATIONS} switchboard "
                                    "integrations", "bad_request")
            values = await self._check_member(app_id, {
                "id": new_id(), "app_id": app_id, "switchboard_id": switchboard_id, "name": body.name,
                "integration_id": body.integration_id, "integration_type": body.integration_type,
                "deliver_standby_events": body.deliver_standby_events,
                "next_switchboard_integration_id": body.next_switchboard_integration_id,
                "message_history_count": body.message_history_count, "created_at": now()}, others)
            await self.store.put_switchboard_integration(values)
        return member_out(member_record(values))

    async def _member_rows(self, switchboard_id: str, member_id: str) -> tuple[Row, list[Row]]:
        rows = await self.store.switchboard_integrations(switchboard_id)
        found = next((r for r in rows if r["id"] == member_id), None)
        if found is None:
            raise ApiError(404, "Switchboard integration not found", "switchboard_integration_not_found")
        return found, [r for r in rows if r["id"] != member_id]

    async def update_member(self, app_id: str, switchboard_id: str, member_id: str,
                            body: models.SwitchboardIntegrationUpdateBody) -> models.SwitchboardIntegration:
        if body.integration_id is not None and body.integration_type is not None:
            raise ApiError(400, "Give integrationId or integrationType, not both", "bad_request")
        async with self._changing(app_id):
            await self._switchboard_row(app_id, switchboard_id)
            row, others = await self._member_rows(switchboard_id, member_id)
            values = dict(row)
            for column, value in (("name", body.name), ("deliver_standby_events", body.deliver_standby_events),
                                  ("message_history_count", body.message_history_count)):
                if value is not None:
                    values[column] = value
            if body.next_switchboard_integration_id is not msgspec.UNSET:  # null: no next
                values["next_switchboard_integration_id"] = body.next_switchboard_integration_id
            if body.integration_id is not None:
                values["integration_id"], values["integration_type"] = body.integration_id, None
            elif body.integration_type is not None:
                values["integration_id"], values["integration_type"] = None, body.integration_type
            values = await self._check_member(app_id, values, others)
            await self.store.put_switchboard_integration(values)
        return member_out(member_record(values))

    async def delete_member(self, app_id: str, switchboard_id: str, member_id: str) -> None:
        """Remove a switchboard integration, unless it is the default or another one's next.
        Conversations it had control of have nobody in control then (the customer's next message
        gives them to the default)."""
        async with self._changing(app_id):
            switchboard = await self._switchboard_row(app_id, switchboard_id)
            _row, others = await self._member_rows(switchboard_id, member_id)
            if switchboard["default_switchboard_integration_id"] == member_id:
                raise ApiError(400, "The switchboard's default integration cannot be deleted; choose another "
                                    "default first", "bad_request")
            if any(o["next_switchboard_integration_id"] == member_id for o in others):
                raise ApiError(400, "Another switchboard integration passes control to this one (its next); "
                                    "change that first", "bad_request")
            await self.store.delete_switchboard_integration(member_id)

    # --- control ----------------------------------------------------------------------------

    async def _state(self, app_id: str, conversation_id: str) -> tuple[Row, records.SwitchboardRecord]:
        row = await self.store.get_conversation(app_id, conversation_id)
        if row is None:
            raise ApiError(404, "Conversation not found", "conversation_not_found")
        switchboard = await self.admin.switchboard_record(app_id)
        if switchboard is None or not switchboard.enabled:
            raise ApiError(400, "This app has no enabled switchboard", "bad_request")
        return row, switchboard

    @staticmethod
    def _caller_may(caller: str | None, member: records.SwitchboardIntegrationRecord | None, role: str) -> None:
        """An integration-scoped caller acts only for the switchboard integration that has the
        `role` (in control, or offered it); app and account keys may act for anyone."""
        if caller is not None and (member is None or member.integration_id != caller):
            raise ApiError(403, f"Only the switchboard integration {role} may do this", "forbidden")

    async def control(self, app_id: str, conversation_id: str, action: conv.SwitchboardAction, *,
                      target: str | None = None, metadata: dict[str, Any] | None = None,
                      reason: str | None = None, caller: str | None = None,
                      only_if_active_type: str | None = None) -> bool:
        """Apply a control action (`caller`: the integration an integration-scoped key belongs
        to) and announce it; a request the conversation's state refuses is answered 400 and
        announced as the action's failure. With `only_if_active_type` (an internal handler such as
        the desk acting on its own), nothing happens unless a member of that type is in control
        when the change is made (False then)."""
        models.check_metadata(metadata)
        for _ in range(_CONTROL_ATTEMPTS):
            row, switchboard = await self._state(app_id, conversation_id)
            expected = (row["switchboard_active"], row["switchboard_pending"])
            active = switchboard.integration(expected[0])
            pending = switchboard.integration(expected[1])
            if only_if_active_type is not None and (active is None or active.integration_type != only_if_active_type):
                return False
            try:
                if action == "acceptControl":
                    self._caller_may(caller, pending, "offered control")
                    if pending is None:
                        raise ApiError(400, "No switchboard integration was offered control", "bad_request")
                    wanted: tuple[str | None, str | None] = (pending.id, None)
                elif action == "releaseControl":
                    self._caller_may(caller, active, "in control")
                    wanted = (None, None)
                else:
                    self._caller_may(caller, active, "in control")
                    assert target is not None
                    chosen = resolve_target(target, switchboard, active)
                    if action == "offerControl":
                        if active is not None and chosen.id == active.id:
                            raise ApiError(400, "Control cannot be offered to the switchboard integration in control",
                                           "bad_request")
                        wanted = (expected[0], chosen.id)
                    else:
                        wanted = (chosen.id, None)
            except ApiError as refused:
                if refused.status == 400:
                    await self._announce(app_id, row, action, metadata, reason,
                                         error={"code": refused.code, "message": refused.title})
                raise
            if wanted == expected:  # already so: nothing changes, nothing to announce
                return True
            async with self.store.tx():
                # Not while a member is deleted: control never goes to one that is gone.
                await self.store.serialize(switchboard_lock(app_id))
                current = {m["id"] for m in await self.store.switchboard_integrations(switchboard.id)}
                if any(member is not None and member not in current for member in wanted):
                    continue  # the configuration changed under us: read it again
                updated = await self.store.set_control(conversation_id, expected, *wanted)
            if updated is not None:
                await self._announce(app_id, updated, action, metadata, reason)
                return True
        raise ApiError(409, "The conversation's control kept changing; try again", "conflict")

    async def _announce(self, app_id: str, row: Row, action: conv.SwitchboardAction,
                        metadata: dict[str, Any] | None, reason: str | None,
                        error: dict[str, str] | None = None) -> None:
        await self.core.publish_event(conv.SwitchboardControlled(
            id=new_id(), app_id=app_id, conversation_id=row["id"], created_at=now(), action=action,
            conversation=conversation_ref(row), metadata=metadata, reason=reason, error=error))
