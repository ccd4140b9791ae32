"""The messenger send path: the reply window, then the Send API calls of `HttpChannelSender`."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import msgspec

from shared.bus import Bus
from shared.egress import EgressSession
from shared.messages.channel import OutboundActivity, OutboundSend
from shared.outbound import HttpChannelSender, PlatformRequest, SendSettings, Unsendable
from shared.ratelimit import BucketMap

from . import handlers
from .handlers import Credentials, ReplyWindowPolicy, SendFailure, SendPart, WindowRefusal
from .store import Store


class MessengerSender(HttpChannelSender[Credentials, SendPart]):
    """Sends only inside the reply window (or with a tag Meta allows), as one or more Send API
    calls per message; each accepted part is recorded, so a retry never repeats one."""

    channel = handlers.CHANNEL
    classify_error = staticmethod(handlers.classify_error)
    parse_response = staticmethod(handlers.parse_send_response)

    def __init__(self, bus: Bus, session: EgressSession, settings: SendSettings,
                 credentials: Callable[[str], Credentials | None], store: Store, policy: ReplyWindowPolicy,
                 calls_per_second: float, media_calls_per_second: float) -> None:
        super().__init__(bus, session, settings, credentials)
        self.store = store
        self.policy = policy
        # Page-level Send API limits (§2.7): one bucket per Page for text, one for audio/video.
        self.buckets = BucketMap(calls_per_second)
        self.media_buckets = BucketMap(media_calls_per_second)

    def unknown_integration(self) -> SendFailure:
        return SendFailure(http_status=0, code=None, title="Unknown or inactive Messenger integration",
                           transient=True)

    async def plan(self, command: OutboundSend, creds: Credentials) -> list[SendPart]:
        last_user_at = await self.store.last_user_at(creds.page_id, command.recipient)
        decision = self.policy.decide(last_user_at, time.time(), human_agent=creds.human_agent,
                                      requested=handlers.requested_tagging(command))
        if isinstance(decision, WindowRefusal):
            raise Unsendable(decision.code, decision.title, decision.details)
        return handlers.build_send_parts(command, decision)

    async def done_parts(self, command: OutboundSend) -> dict[int, str]:
        # Parts accepted on an earlier delivery are not sent twice (the customer sees each once).
        return await self.store.sent_parts(command.message_id)

    async def pace(self, command: OutboundSend, creds: Credentials, part: SendPart) -> None:
        await (self.media_buckets if part.media else self.buckets).get(creds.page_id).acquire()

    def request(self, creds: Credentials, part: SendPart) -> PlatformRequest:
        return self._graph_post(creds, part.body)

    def activity_request(self, creds: Credentials, activity: OutboundActivity) -> PlatformRequest | None:
        """The business typing, stopping, or having read, as a `sender_action` on the Send API
        (the same endpoint and Page token as messages)."""
        body = handlers.sender_action_body(activity.recipient, activity.activity)
        return None if body is None else self._graph_post(creds, body, "POST graph page messages sender_action")

    @staticmethod
    def _graph_post(creds: Credentials, body: dict[str, Any], span_name: str = "POST graph page messages",
                    ) -> PlatformRequest:
        return PlatformRequest(
            url=creds.messages_url, body=msgspec.json.encode(body), span_name=span_name,
            headers={"Authorization": f"Bearer {creds.page_access_token}", "Content-Type": "application/json"},
            server_address=creds.base_url, attributes={"threadline.messenger.page_id": creds.page_id})

    def unreachable(self, exc: Exception) -> SendFailure:
        return SendFailure(http_status=0, code=None, title=f"Graph API unreachable: {exc!r}", transient=True)

    async def part_sent(self, command: OutboundSend, creds: Credentials, index: int, provider_id: str,
                        started: float) -> None:
        await self.store.record_sent(command.message_id, index, creds.page_id, command.recipient, provider_id,
                                     command.conversation_id, started)
