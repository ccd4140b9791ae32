"""The sandbox's other channel fakes (Messenger, Telegram, Twilio, …), next to `FakeWhatsApp`.

Each fake serves its platform's API and its scriptable phone under `/sandbox/`, and keeps its
accounts in step with the integrations that point at the sandbox. To add one, implement
`ChannelFake` in `<channel>_fake.py` and append it in `build_channel_fakes`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Protocol

from aiohttp import web

from shared.records import IntegrationRecord

from .messenger_fake import FakeMessenger, gateway_base
from .push_fake import FakeApns, FakeFcm
from .telegram_fake import FakeTelegram
from .twilio_fake import FakeTwilio
from .uploads import Uploads


class ChannelFake(Protocol):
    """What the sandbox service needs from a channel fake."""

    # The integration type whose records `sync` receives (e.g. "messenger", "telegram", "twilio").
    integration_type: str

    def routes(self, prefix: str) -> list[web.RouteDef]:
        """Routes of the fake platform API and of its scriptable phone, under `prefix`."""
        ...

    def sync(self, records: Sequence[IntegrationRecord]) -> None:
        """Make the fake's accounts match these integration records (all of this type)."""
        ...

    async def close(self) -> None:
        """Stop pending deliveries."""
        ...


def build_channel_fakes(public_url: str, data_dir: str | None, uploads: Uploads | None = None) -> list[ChannelFake]:
    """Every channel fake the sandbox hosts besides WhatsApp.

    `public_url` is the sandbox's public URL (`<gateway public base>/sandbox`; webhooks go to the
    gateway base), `data_dir` where each fake keeps its phone's history across restarts, in
    `<data_dir>/sandbox-<channel>.jsonl` (None: memory only), `uploads` the files the phones send.
    """
    def store(channel: str) -> str | None:
        # Next to FakeWhatsApp's `sandbox-whatsapp.jsonl`: one JSON-lines journal per channel.
        return os.path.join(data_dir, f"sandbox-{channel}.jsonl") if data_dir else None

    fakes: list[ChannelFake] = []
    fakes.append(FakeTwilio(public_url=public_url.rstrip("/").removesuffix("/sandbox") + "/sandbox",
                            store_path=store("twilio"), uploads=uploads))
    fakes.append(FakeMessenger(gateway_base(public_url), store_path=store("messenger"), uploads=uploads))
    fakes.append(FakeTelegram(public_url, store_path=store("telegram"), uploads=uploads))
    fakes.append(FakeFcm(public_url, store_path=store("android")))
    fakes.append(FakeApns(public_url, store_path=store("ios")))
    return fakes
