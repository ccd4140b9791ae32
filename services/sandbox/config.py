"""Settings of the sandbox service."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from shared.config import CommonConfig, ConfigError, env_bool, env_int, env_str
from shared.routes import DEFAULT_PORTS, SANDBOX_SMTP_PORT


@dataclass(frozen=True)
class SandboxConfig:
    """The sandbox only runs with THREADLINE_SANDBOX on: it fakes platforms, never talks to real ones."""

    common: CommonConfig
    # Simulate the 24 h customer-service window (free-form outside it fails with 131047).
    enforce_window: bool
    # Send `sent`/`delivered` status webhooks after each accepted message.
    auto_statuses: bool
    # The SMTP sink (`smtp_fake`): where it listens (port 0: any free port).
    smtp_host: str = "127.0.0.1"
    smtp_port: int = SANDBOX_SMTP_PORT

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

    @property
    def mail_store_file(self) -> str:
        """Where the SMTP sink keeps its inbox across restarts (JSON lines)."""
        return os.path.join(self.common.data_dir, "sandbox-mail.jsonl")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> SandboxConfig:
        """Build and validate the configuration."""
        env = os.environ if environ is None else environ
        common = CommonConfig.from_env(DEFAULT_PORTS["sandbox"], env)
        if not common.sandbox:
            raise ConfigError("the sandbox service only runs with THREADLINE_SANDBOX=1")
        smtp_port = env_int("THREADLINE_SANDBOX_SMTP_PORT", SANDBOX_SMTP_PORT, env)
        if not 0 <= smtp_port <= 65535:
            raise ConfigError("THREADLINE_SANDBOX_SMTP_PORT must be between 0 and 65535")
        return cls(
            common=common,
            enforce_window=env_bool("SANDBOX_WHATSAPP_ENFORCE_WINDOW", False, env),
            auto_statuses=env_bool("SANDBOX_WHATSAPP_AUTO_STATUSES", True, env),
            smtp_host=env_str("THREADLINE_SANDBOX_SMTP_HOST", "127.0.0.1", env),
            smtp_port=smtp_port,
        )
