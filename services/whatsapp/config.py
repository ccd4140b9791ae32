"""Settings of the whatsapp channel service."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from shared.config import CommonConfig, ConfigError, env_float
from shared.encryption import Keyring
from shared.outbound import SendSettings
from shared.routes import DEFAULT_PORTS


@dataclass(frozen=True)
class WhatsAppConfig:
    """Everything the whatsapp service reads from its environment.

    Credentials are not here: they come per integration from the integrations KV bucket.
    """

    common: CommonConfig
    # Graph API throughput per business number (Meta's default tier is 80 messages/s).
    messages_per_second: float
    # WHATSAPP_RETRY_BASE_SECONDS, _RETRY_MAX_SECONDS, _MAX_SEND_ATTEMPTS, _SEND_TIMEOUT_SECONDS.
    send: SendSettings
    # Opens the integrations' sealed credentials (THREADLINE_SECRETS_KEY).
    keyring: Keyring = field(default_factory=Keyring)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> WhatsAppConfig:
        """Build and validate the configuration."""
        env = os.environ if environ is None else environ
        common = CommonConfig.from_env(DEFAULT_PORTS["whatsapp"], env)
        config = cls(
            common=common,
            messages_per_second=env_float("WHATSAPP_MESSAGES_PER_SECOND", 80.0, env),
            send=SendSettings.from_env("WHATSAPP", env),
        )
        if config.messages_per_second <= 0:
            raise ConfigError("WHATSAPP_MESSAGES_PER_SECOND must be positive")
        # Last, so that a bad setting is reported as itself rather than as a missing key.
        return replace(config, keyring=Keyring.from_env(env, sandbox=common.sandbox))
