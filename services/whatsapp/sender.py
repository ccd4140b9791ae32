"""The whatsapp send path: what the Graph API's messages endpoint needs of `HttpChannelSender`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgspec

from shared.bus import Bus
from shared.egress import EgressSession
from shared.messages.channel import OutboundActivity, OutboundSend
from shared.outbound import HttpChannelSender, PlatformRequest, SendSettings
from shared.ratelimit import BucketMap

from . import handlers
from .handlers import Credentials, SendFailure

WhatsAppBody = dict[str, Any]


class WhatsAppSender(HttpChannelSender[Credentials, WhatsAppBody]):
    """One Graph API call per message, paced per business number."""

    channel = handlers.CHANNEL
    classify_error = staticmethod(handlers.classify_error)
    parse_response = staticmethod(handlers.parse_send_response)

    def __init__(self, bus: Bus, session: EgressSession, settings: SendSettings,
                 credentials: Callable[[str], Credentials | None], messages_per_second: float) -> None:
        super().__init__(bus, session, settings, credentials)
        # Graph API throughput per business number.
        self.buckets = BucketMap(messages_per_second)

    def unknown_integration(self) -> SendFailure:
        return SendFailure(http_status=0, code=None, title="Unknown or inactive WhatsApp integration",
                           transient=True)

    async def plan(self, command: OutboundSend, creds: Credentials) -> list[WhatsAppBody]:
        return [handlers.build_send_body(command)]

    async def pace(self, command: OutboundSend, creds: Credentials, part: WhatsAppBody) -> None:
        await self.buckets.get(creds.phone_number_id).acquire()

    def request(self, creds: Credentials, part: WhatsAppBody, span_name: str = "POST graph messages"
                ) -> PlatformRequest:
        return PlatformRequest(
            url=creds.messages_url, body=msgspec.json.encode(part), span_name=span_name,
            headers={"Authorization": f"Bearer {creds.access_token}", "Content-Type": "application/json"},
            server_address=creds.base_url, attributes={"threadline.whatsapp.phone_number_id": creds.phone_number_id})

    def activity_request(self, creds: Credentials, activity: OutboundActivity) -> PlatformRequest | None:
        """Mark the customer's latest message read, with the typing indicator for typing:start."""
        body = handlers.activity_body(activity)
        return None if body is None else self.request(creds, body, span_name="POST graph messages status")

    def unreachable(self, exc: Exception) -> SendFailure:
        return SendFailure(http_status=0, code=None, title=f"Graph API unreachable: {exc!r}", transient=True)

