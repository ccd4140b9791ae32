"""Settings of the messenger channel service."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from shared.config import CommonConfig, ConfigError, env_float
from shared.db import DatabaseSettings
from shared.encryption import Keyring
from shared.outbound import SendSettings
from shared.routes import DEFAULT_PORTS


@dataclass(frozen=True)
class MessengerConfig:
    """Everything the messenger service reads from its environment.

    Credentials are not here: they come per integration from the integrations KV bucket.
    """

    common: CommonConfig
    # Send API calls per second per Page (platform reference §2.7): 300 for text, links and
    # stickers; 10 for audio and video.
    calls_per_second: float
    media_calls_per_second: float
    # MESSENGER_RETRY_BASE_SECONDS, _RETRY_MAX_SECONDS, _MAX_SEND_ATTEMPTS, _SEND_TIMEOUT_SECONDS.
    send: SendSettings
    # The standard messaging window and the HUMAN_AGENT tag's reach (platform reference §2.5).
    window_hours: float
    human_agent_days: float
    # How long sent message ids are kept to map delivery/read watermarks back to our messages.
    sent_retention_days: float
    # Where reply windows and sent message ids are kept (THREADLINE_DATABASE_URL, or a SQLite
    # file under the data directory).
    database: DatabaseSettings
    # Opens the integrations' sealed credentials (THREADLINE_SECRETS_KEY).
    keyring: Keyring = field(default_factory=Keyring)


    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> MessengerConfig:
        """Build and validate the configuration."""
        env = os.environ if environ is None else environ
        common = CommonConfig.from_env(DEFAULT_PORTS["messenger"], env)
        config = cls(
            common=common,
            calls_per_second=env_float("MESSENGER_CALLS_PER_SECOND", 300.0, env),
            media_calls_per_second=env_float("MESSENGER_MEDIA_CALLS_PER_SECOND", 10.0, env),
            send=SendSettings.from_env("MESSENGER", env),
            window_hours=env_float("MESSENGER_WINDOW_HOURS", 24.0, env),
            human_agent_days=env_float("MESSENGER_HUMAN_AGENT_DAYS", 7.0, env),
            sent_retention_days=env_float("MESSENGER_SENT_RETENTION_DAYS", 30.0, env),
            database=DatabaseSettings.from_env(common.data_dir, "messenger", env),
        )
        if config.calls_per_second <= 0 or config.media_calls_per_second <= 0:
            raise ConfigError("MESSENGER_CALLS_PER_SECOND and MESSENGER_MEDIA_CALLS_PER_SECOND must be positive")
        # Longer than Meta allows would turn the policy into a policy violation.
        if not 0 < config.window_hours <= 24:
            raise ConfigError("MESSENGER_WINDOW_HOURS must be in (0, 24]")
        if not 0 <= config.human_agent_days <= 7:
            raise ConfigError("MESSENGER_HUMAN_AGENT_DAYS must be in [0, 7]")
        if config.sent_retention_days <= 0:
            raise ConfigError("MESSENGER_SENT_RETENTION_DAYS must be positive")
        # Last, so that a bad setting is reported as itself rather than as a missing key.
        return replace(config, keyring=Keyring.from_env(env, sandbox=common.sandbox))
