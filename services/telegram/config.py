"""Settings of the telegram channel service."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from shared.config import CommonConfig, ConfigError, env_float
from shared.encryption import Keyring
from shared.outbound import SendSettings
from shared.routes import DEFAULT_PORTS


@dataclass(frozen=True)
class TelegramConfig:
    """Everything the telegram service reads from its environment.

    Bot tokens and webhook secrets are not here: they come per integration from the
    integrations KV bucket.
    """

    common: CommonConfig
    # Bot API flood limits (platform reference §4.7): ~30 messages/s per bot, 1/s per chat,
    # 20/min per group chat.
    bot_messages_per_second: float
    chat_messages_per_second: float
    group_messages_per_minute: float
    # TELEGRAM_RETRY_BASE_SECONDS, _RETRY_MAX_SECONDS, _MAX_SEND_ATTEMPTS, _SEND_TIMEOUT_SECONDS
    # (the back-off for 5xx and unreachable; a 429 waits exactly the `retry_after` Telegram asks).
    send: SendSettings
    # Back-off of `setWebhook` while the Bot API refuses or cannot be reached.
    webhook_retry_base_seconds: float
    webhook_retry_max_seconds: float
    # Opens the integrations' sealed credentials (THREADLINE_SECRETS_KEY).
    keyring: Keyring = field(default_factory=Keyring)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> TelegramConfig:
        """Build and validate the configuration."""
        env = os.environ if environ is None else environ
        common = CommonConfig.from_env(DEFAULT_PORTS["telegram"], env)
        config = cls(
            common=common,
            bot_messages_per_second=env_float("TELEGRAM_BOT_MESSAGES_PER_SECOND", 30.0, env),
            chat_messages_per_second=env_float("TELEGRAM_CHAT_MESSAGES_PER_SECOND", 1.0, env),
            group_messages_per_minute=env_float("TELEGRAM_GROUP_MESSAGES_PER_MINUTE", 20.0, env),
            send=SendSettings.from_env("TELEGRAM", env),
            webhook_retry_base_seconds=env_float("TELEGRAM_WEBHOOK_RETRY_BASE_SECONDS", 0.2, env),
            webhook_retry_max_seconds=env_float("TELEGRAM_WEBHOOK_RETRY_MAX_SECONDS", 60.0, env),
        )
        for name, value in (("TELEGRAM_BOT_MESSAGES_PER_SECOND", config.bot_messages_per_second),
                            ("TELEGRAM_CHAT_MESSAGES_PER_SECOND", config.chat_messages_per_second),
                            ("TELEGRAM_GROUP_MESSAGES_PER_MINUTE", config.group_messages_per_minute)):
            if not value > 0:
                raise ConfigError(f"{name} must be positive")
        if (config.webhook_retry_base_seconds <= 0
                or config.webhook_retry_max_seconds < config.webhook_retry_base_seconds):
            raise ConfigError("TELEGRAM_WEBHOOK_RETRY_BASE_SECONDS must be > 0 and <= "
                              "TELEGRAM_WEBHOOK_RETRY_MAX_SECONDS")
        # Last, so that a bad setting is reported as itself rather than as a missing key.
        return replace(config, keyring=Keyring.from_env(env, sandbox=common.sandbox))
