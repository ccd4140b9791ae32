"""The telegram send path: what the Bot API's send methods need of `HttpChannelSender`."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import msgspec

from shared import outbound
from shared.bus import Bus, Retry
from shared.egress import EgressSession
from shared.messages.channel import OutboundActivity, OutboundSend
from shared.outbound import HttpChannelSender, PlatformRequest, SendSettings
from shared.ratelimit import BucketMap, TokenBucket

from . import handlers
from .handlers import Credentials, MethodCall, SendFailure

# Chat buckets kept before the full (idle) ones are forgotten.
CHAT_BUCKETS_MAX = 20_000


class TelegramSender(HttpChannelSender[Credentials, MethodCall]):
    """One or more Bot API method calls per message (a carousel is a message per card), each
    paced per bot and per chat (1/s, 20/min in a group); a chat Telegram told to wait (429
    `retry_after`) sends nothing until then. The parts of a message already accepted are
    remembered (in this process), so a retry after a failed later part does not repeat them."""

    channel = handlers.CHANNEL
    classify_error = staticmethod(handlers.classify_error)

    def __init__(self, bus: Bus, session: EgressSession, settings: SendSettings,
                 credentials: Callable[[str], Credentials | None], bot_messages_per_second: float,
                 chat_messages_per_second: float, group_messages_per_minute: float) -> None:
        super().__init__(bus, session, settings, credentials)
        self.bot_buckets = BucketMap(bot_messages_per_second)
        self.chat_buckets = BucketMap(chat_messages_per_second, burst=1.0)
        self.group_buckets = BucketMap(group_messages_per_minute / 60.0, burst=1.0)
        # Chats Telegram told to wait (429 retry_after): monotonic time until which nothing is sent.
        self.paused_until: dict[str, float] = {}

    def unknown_integration(self) -> SendFailure:
        return SendFailure(http_status=0, error_code=None, description="Unknown or inactive Telegram integration",
                           transient=True, reported_code="telegram_unknown_integration")

    async def plan(self, command: OutboundSend, creds: Credentials) -> list[MethodCall]:
        return handlers.build_requests(command)

    async def pace(self, command: OutboundSend, creds: Credentials, part: MethodCall) -> None:
        chat_key = _chat_key(command)
        paused = self.paused_until.get(chat_key, 0.0) - time.monotonic()
        if paused > 0:
            raise Retry(paused, "chat paused by a 429")
        await self._chat_bucket(chat_key, command.recipient).acquire()
        await self.bot_buckets.get(command.integration_id).acquire()

    def _chat_bucket(self, chat_key: str, recipient: str) -> TokenBucket:
        buckets = self.group_buckets if handlers.is_group_chat(recipient) else self.chat_buckets
        if len(buckets.buckets) > CHAT_BUCKETS_MAX:
            now = buckets.clock()
            for key in [k for k, b in buckets.buckets.items()
                        if b.tokens + (now - b.updated) * b.rate >= b.burst and not b._lock.locked()]:
                del buckets.buckets[key]
            self.paused_until = {k: t for k, t in self.paused_until.items() if t > time.monotonic()}
        return buckets.get(chat_key)

    def request(self, creds: Credentials, part: MethodCall) -> PlatformRequest:
        method, params = part
        return PlatformRequest(
            url=creds.method_url(method), body=msgspec.json.encode(params), span_name=f"POST telegram {method}",
            headers={"Content-Type": "application/json"}, server_address=creds.base_url,
            attributes={"threadline.telegram.method": method})

    def unreachable(self, exc: Exception) -> SendFailure:
        # Never the exception's text in spans, logs or statuses: the URL holds the token.
        return SendFailure(http_status=0, error_code=None,
                           description=f"Bot API unreachable ({type(exc).__name__})", transient=True)

    def parse_response(self, body: bytes) -> str:
        result = handlers.parse_ok_result(body)
        try:
            return handlers.sent_message_id(result)
        except SendFailure:
            return ""  # sent all the same: never send it twice

    def failed_once(self, command: OutboundSend, failure: outbound.SendFailure) -> None:
        if failure.retry_after is not None:
            self.paused_until[_chat_key(command)] = time.monotonic() + failure.retry_after

    def sent_once(self, command: OutboundSend, provider_id: str) -> None:
        self.paused_until.pop(_chat_key(command), None)

    def activity_request(self, creds: Credentials, activity: OutboundActivity) -> PlatformRequest | None:
        """Typing → `sendChatAction` (shown for 5 s or until the next message); nothing while
        Telegram has the chat waiting, and nothing for typing:stop or conversation:read, which
        bots cannot show."""
        call = handlers.chat_action_request(activity.recipient, activity.activity)
        if call is None or self.paused_until.get(_chat_key(activity), 0.0) > time.monotonic():
            return None
        return self.request(creds, call)

    async def call(self, creds: Credentials, method: str, params: dict[str, Any]) -> Any:
        """Call a Bot API method with JSON parameters; its `result`, or SendFailure (EgressRefused
        when the egress policy refuses the integration's base URL)."""
        return handlers.parse_ok_result(await self.post(self.request(creds, (method, params))))


def _chat_key(command: OutboundSend | OutboundActivity) -> str:
    return f"{command.integration_id}:{command.recipient}"
