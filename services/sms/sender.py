"""The sms send path: what Twilio's Messages.json needs of `HttpChannelSender`."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from urllib.parse import urlencode

from shared.bus import Bus, Retry
from shared.egress import EgressSession
from shared.http import basic_auth_header
from shared.messages.channel import OutboundSend
from shared.outbound import BoundedMemory, HttpChannelSender, PlatformRequest, SendSettings
from shared.twilio_wire import FORM_CONTENT_TYPE

from . import handlers
from .handlers import Credentials, Form, SegmentBucket, SendFailure


class SmsSender(HttpChannelSender[Credentials, Form]):
    """One Messages.json call per message part (a text past 1,600 characters goes as several),
    paced in segments per sender.

    The parts of a message already accepted are remembered in this process, so a delivery that
    comes back (its sender busy, a transient error on a later part) sends only the rest; a
    delivery holds its ack for at most `max_rate_wait_seconds` of waiting in all, however many
    parts it has (then it is put back on the stream and goes on where it stopped).
    """

    channel = handlers.CHANNEL
    classify_error = staticmethod(handlers.classify_error)
    parse_response = staticmethod(handlers.parse_send_response)

    def __init__(self, bus: Bus, session: EgressSession, settings: SendSettings,
                 credentials: Callable[[str], Credentials | None], segments_per_second: float,
                 max_rate_wait_seconds: float) -> None:
        super().__init__(bus, session, settings, credentials)
        self.segments_per_second = segments_per_second
        self.max_rate_wait_seconds = max_rate_wait_seconds
        self.buckets: dict[str, SegmentBucket] = {}
        # Provider SID (of every part) → (message id, conversation id), so a status callback can
        # name its message.
        self.sids: BoundedMemory[str, tuple[str, str]] = BoundedMemory()
        # Message id → when the current delivery must stop waiting for its sender's bucket.
        self.wait_until: BoundedMemory[str, float] = BoundedMemory()

    def unknown_integration(self) -> SendFailure:
        return SendFailure(http_status=0, code=None, title="Unknown or inactive Twilio integration", transient=True)

    async def plan(self, command: OutboundSend, creds: Credentials) -> list[Form]:
        forms = handlers.build_send_forms(command, creds)
        self.wait_until.remember(command.message_id, time.monotonic() + self.max_rate_wait_seconds)
        return forms

    async def part_sent(self, command: OutboundSend, creds: Credentials, index: int, provider_id: str,
                        started: float) -> None:
        await super().part_sent(command, creds, index, provider_id, started)
        self.sids.remember(provider_id, (command.message_id, command.conversation_id))

    async def pace(self, command: OutboundSend, creds: Credentials, part: Form) -> None:
        deadline = self.wait_until.get(command.message_id)
        budget = self.max_rate_wait_seconds if deadline is None else max(0.0, deadline - time.monotonic())
        wait = self._bucket(creds).reserve(handlers.send_cost(part), budget)
        if wait is None:
            # The sender's queue is long: come back later rather than hold the ack.
            raise Retry(self.max_rate_wait_seconds, f"sender {creds.sender_key} is busy")
        if wait <= 0:
            return
        if self.parts.get(command.message_id):
            # A later part of a message already partly sent: the sent parts are remembered in
            # this process only, so a stop waits for this one rather than have them sent again.
            await asyncio.sleep(wait)
        else:
            await self.bus.pause(wait, f"sender {creds.sender_key} is paced")

    def _bucket(self, creds: Credentials) -> SegmentBucket:
        rate = creds.segments_per_second or self.segments_per_second
        key = f"{creds.account_sid}:{creds.sender_key}"
        bucket = self.buckets.get(key)
        if bucket is None or bucket.rate != rate:
            bucket = self.buckets[key] = SegmentBucket(rate, burst=1.0)
        return bucket

    def request(self, creds: Credentials, part: Form) -> PlatformRequest:
        return PlatformRequest(
            url=creds.messages_url, body=urlencode(part).encode(), span_name="POST twilio Messages.json",
            headers={**basic_auth_header(creds.account_sid, creds.auth_token),
                     "Content-Type": FORM_CONTENT_TYPE, "Accept": "application/json"},
            server_address=creds.base_url, attributes={"threadline.twilio.sender": creds.sender_key})

    def accepted(self, http_status: int) -> bool:
        return 200 <= http_status < 300

    def unreachable(self, exc: Exception) -> SendFailure:
        return SendFailure(http_status=0, code=None, title=f"Twilio API unreachable: {exc!r}", transient=True)

    def sent_once(self, command: OutboundSend, provider_id: str) -> None:
        self.sids.remember(provider_id, (command.message_id, command.conversation_id))
        self.wait_until.pop(command.message_id, None)
