"""Settings of the sandbox service."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from shared.config import CommonConfig, ConfigError, env_bool
from shared.routes import DEFAULT_PORTS


@dataclass(frozen=True)
class SandboxConfig:
    """The sandbox only runs with THREADLINE_SANDBOX on: it fakes platforms, never talks to real ones."""

    common: CommonConfig
    # Simulate the 24 h customer-service window (free-form outside it fails with 131047).
    enforce_window: bool
    # Send `sent`/`delivered` status webhooks after each accepted message.
    auto_statuses: bool

    @property
    def public_url(self) -> str:
        """Where the sandbox is reachable from outside (through the front door)."""
        return f"{self.common.public_base_url}/sandbox"

    @property
    def sandbox_file(self) -> str:
        """The file the lead's bootstrap writes: app id and integration ids of the demo."""
        return os.path.join(self.common.data_dir, "sandbox.json")

    @property
    def whatsapp_store_file(self) -> str:
        """Where the fake WhatsApp keeps its threads across restarts (JSON lines)."""
        return os.path.join(self.common.data_dir, "sandbox-whatsapp.jsonl")

    def webhook_url(self, integration_id: str) -> str:
        """The gateway's public webhook URL for one WhatsApp integration."""
        return f"{self.common.public_base_url}/webhooks/whatsapp/{integration_id}"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> SandboxConfig:
        """Build and validate the configuration."""
        env = os.environ if environ is None else environ
        common = CommonConfig.from_env(DEFAULT_PORTS["sandbox"], env)
        if not common.sandbox:
            raise ConfigError("the sandbox service only runs with THREADLINE_SANDBOX=1")
        return cls(
            common=common,
            enforce_window=env_bool("SANDBOX_WHATSAPP_ENFORCE_WINDOW", False, env),
            auto_statuses=env_bool("SANDBOX_WHATSAPP_AUTO_STATUSES", True, env),
        )
