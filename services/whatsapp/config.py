"""Settings of the whatsapp channel service."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from shared.config import CommonConfig, ConfigError, env_float, env_int
from shared.encryption import Keyring
from shared.routes import DEFAULT_PORTS


@dataclass(frozen=True)
class WhatsAppConfig:
    """Everything the whatsapp service reads from its environment.

    Credentials are not here: they come per integration from the integrations KV bucket.
    """

    common: CommonConfig
    # Graph API throughput per business number (Meta's default tier is 80 messages/s).
    messages_per_second: float
    # Back-off for transient send errors: base * 2^(attempt-1), capped.
    retry_base_seconds: float
    retry_max_seconds: float
    max_send_attempts: int
    send_timeout_seconds: float
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
            retry_base_seconds=env_float("WHATSAPP_RETRY_BASE_SECONDS", 1.0, env),
            retry_max_seconds=env_float("WHATSAPP_RETRY_MAX_SECONDS", 60.0, env),
            max_send_attempts=env_int("WHATSAPP_MAX_SEND_ATTEMPTS", 10, env),
            send_timeout_seconds=env_float("WHATSAPP_SEND_TIMEOUT_SECONDS", 15.0, env),
        )
        if config.messages_per_second <= 0:
            raise ConfigError("WHATSAPP_MESSAGES_PER_SECOND must be positive")
        if config.retry_base_seconds < 0 or config.retry_max_seconds < config.retry_base_seconds:
            raise ConfigError("WHATSAPP_RETRY_BASE_SECONDS must be >= 0 and <= WHATSAPP_RETRY_MAX_SECONDS")
        if config.max_send_attempts < 1:
            raise ConfigError("WHATSAPP_MAX_SEND_ATTEMPTS must be at least 1")
        if config.send_timeout_seconds <= 0:
            raise ConfigError("WHATSAPP_SEND_TIMEOUT_SECONDS must be positive")
        # Last, so that a bad setting is reported as itself rather than as a missing key.
        return replace(config, keyring=Keyring.from_env(env, sandbox=common.sandbox))
