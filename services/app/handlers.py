"""The app channel's logic on decoded values: devices, what a push says, what a push round means.

Nothing here touches NATS, sockets or HTTP, so it is unit-tested directly.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Final

import msgspec

from services.app.push import PushMessage, PushOutcome
from shared import render
from shared.http import ApiError
from shared.messages.channel import DeliveryStatus, OutboundSend
from shared.messages.identity import RegisterDevice
from shared.records import IntegrationRecord
from shared.sdk import PostMessage, SessionClaims
from shared.sdk import SessionBody as SdkSessionBody
from shared.sunco import Device, FileContent, ImageContent, LocationContent, TextContent, Wire

APP_INTEGRATION_TYPES: Final = frozenset({"android", "ios"})
DEFAULT_PUSH_TITLE: Final = "New message"
_GUID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
MAX_PUSH_TOKEN_LENGTH: Final = 4096
MAX_INFO_BYTES: Final = 2048


class DeviceIn(Wire, kw_only=True):
    """A device as the app reports it (session creation and `PUT …/devices/{guid}`)."""

    guid: str | None = None
    push_notification_token: str | None = None
    app_version: str | None = None
    info: dict[str, Any] = {}


class SessionBody(SdkSessionBody, kw_only=True):
    """Body of the app's `POST …/sessions` (optional): the install the session starts on (and,
    from the SDK's body, a `linkCode` from the app's universal link). An anonymous session is
    pending until its first message, so its install is registered with that message
    (`StartBody.device`); a `linkCode` session registers it at once."""

    device: DeviceIn | None = None


class StartBody(PostMessage, kw_only=True):
    """Body of the app's first message (`POST …/conversations`): the message and the install it
    comes from (registered once the message created the session's user and client)."""

    device: DeviceIn | None = None


class DeviceResponse(Wire, kw_only=True):
    device: Device


def validate_device(device: DeviceIn, guid: str | None = None) -> DeviceIn:
    """400 for an unusable device: guid, token length, info size."""
    guid = guid if guid is not None else device.guid
    if guid is None or not _GUID.match(guid):
        raise ApiError(400, "device guid must be 1-128 characters of [A-Za-z0-9._:-]")
    token = device.push_notification_token
    if token is not None and (not token.strip() or len(token) > MAX_PUSH_TOKEN_LENGTH):
        raise ApiError(400, f"pushNotificationToken must be 1-{MAX_PUSH_TOKEN_LENGTH} characters")
    if device.app_version is not None and len(device.app_version) > 64:
        raise ApiError(400, "appVersion must be at most 64 characters")
    if len(msgspec.json.encode(device.info)) > MAX_INFO_BYTES:
        raise ApiError(400, f"device info must be at most {MAX_INFO_BYTES} bytes of JSON")
    return msgspec.structs.replace(device, guid=guid)


def register_device(claims: SessionClaims, record: IntegrationRecord, device: DeviceIn) -> RegisterDevice:
    """The identity request that records `device` under the session's sdk client."""
    assert device.guid is not None
    return RegisterDevice(
        app_id=claims.app, user_id=claims.user, client_id=claims.client, integration_id=record.id,
        device_type="ios" if record.type == "ios" else "android", guid=device.guid,
        push_notification_token=device.push_notification_token, app_version=device.app_version,
        info=device.info)


def session_client_info(body: SessionBody | StartBody | None, integration_type: str) -> dict[str, Any]:
    """The new sdk client's `info`: the platform and what the app said about its install."""
    info: dict[str, Any] = {"platform": integration_type}
    if body is not None and body.device is not None:
        if body.device.app_version:
            info["appVersion"] = body.device.app_version
        for key in ("os", "osVersion", "devicePlatform", "carrier", "appName", "sdkVersion"):
            value = body.device.info.get(key)
            if isinstance(value, str) and value:
                info[key] = value[:128]
    return info


# --- pushes ----------------------------------------------------------------------------------

def content_summary(send: OutboundSend) -> str:
    """One line a lock screen can show for the message."""
    content = send.content
    if isinstance(content, TextContent):
        return content.text
    if isinstance(content, ImageContent):
        return content.text or "📷 Photo"
    if isinstance(content, FileContent):
        return content.text or "📎 File"
    if isinstance(content, LocationContent):
        return "📍 Location"
    try:  # a carousel, a list, a form: the first line of its text form
        first = render.fallback(content).text.strip().split("\n", 1)[0]
    except render.NoFallback:
        return DEFAULT_PUSH_TITLE
    return first or DEFAULT_PUSH_TITLE


def push_message(send: OutboundSend, record: IntegrationRecord) -> PushMessage:
    """The push for a business message: titled with the integration's name, collapsed per
    conversation so a burst of replies shows as one notification."""
    return PushMessage(
        title=record.display_name or DEFAULT_PUSH_TITLE,
        body=content_summary(send),
        data={"appId": send.app_id, "conversationId": send.conversation_id, "messageId": send.message_id},
        collapse_id=send.conversation_id,
    )


def push_targets(devices: list[Device], send: OutboundSend) -> list[Device]:
    """The installs to push to: the recipient client's active devices on this integration that
    have a token."""
    return [d for d in devices if d.client_id == send.client_id and d.integration_id == send.integration_id
            and d.status == "active" and d.push_notification_token]


@dataclass(frozen=True)
class PushRound:
    """What one attempt at pushing a message to all of the client's devices came to."""

    # "sent": at least one device accepted; "retry": none did yet but some may later;
    # "failed": every device refused; "none": nothing to push to.
    status: str
    provider_id: str = ""
    code: str = ""
    reason: str = ""
    retry_after: float | None = None


def push_round(outcomes: list[PushOutcome]) -> PushRound:
    """Combine per-device outcomes: one device reached is enough to call the message sent."""
    if not outcomes:
        return PushRound("none")
    sent = [o for o in outcomes if o.status == "sent"]
    if sent:
        return PushRound("sent", provider_id=sent[0].provider_id)
    retry = [o for o in outcomes if o.status == "retry"]
    if retry:
        delays = [o.retry_after for o in retry if o.retry_after is not None]
        return PushRound("retry", code=retry[0].code, reason=retry[0].reason,
                         retry_after=max(delays) if delays else None)
    last = outcomes[-1]
    return PushRound("failed", code=last.code or last.status.upper(), reason=last.reason or last.status)


def delivery_status(send: OutboundSend, state: str, timestamp: float, *, provider_id: str = "",
                    code: str | None = None, title: str | None = None) -> DeliveryStatus:
    """The status reported to `conversations` about a message on the app channel."""
    return DeliveryStatus(
        app_id=send.app_id, integration_id=send.integration_id, channel=send.channel,
        provider_message_id=provider_id or f"app:{send.message_id}", status=state,  # type: ignore[arg-type]
        timestamp=timestamp, message_id=send.message_id, conversation_id=send.conversation_id,
        error_code=code, error_title=title)


def status_msg_id(status: DeliveryStatus) -> str:
    """Nats-Msg-Id of a status: reported once per message and state even if re-decided."""
    return f"app:{status.message_id}:{status.status}"
