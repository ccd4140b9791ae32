"""Settings of the sms (Twilio) channel service."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from shared.config import CommonConfig, ConfigError, env_float
from shared.encryption import Keyring
from shared.outbound import SendSettings
from shared.routes import DEFAULT_PORTS


@dataclass(frozen=True)
class SmsConfig:
    """Everything the sms service reads from its environment.

    Credentials are not here: they come per integration from the integrations KV bucket.
    """

    common: CommonConfig
    # Throughput per sender (a US/CA long code sends 1 segment/s; an integration's
    # `segmentsPerSecond` overrides this, e.g. 100 for a short code).
    segments_per_second: float
    # A send that would wait longer than this for its sender's bucket is put back on the stream
    # (delayed) instead of holding its JetStream ack past `ack_wait_seconds`.
    max_rate_wait_seconds: float
    ack_wait_seconds: float
    # SMS_RETRY_BASE_SECONDS, _RETRY_MAX_SECONDS, _MAX_SEND_ATTEMPTS, _SEND_TIMEOUT_SECONDS.
    send: SendSettings
    # Opens the integrations' sealed credentials (THREADLINE_SECRETS_KEY).
    keyring: Keyring = field(default_factory=Keyring)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> SmsConfig:
        """Build and validate the configuration."""
        env = os.environ if environ is None else environ
        common = CommonConfig.from_env(DEFAULT_PORTS["sms"], env)
        config = cls(
            common=common,
            segments_per_second=env_float("SMS_SEGMENTS_PER_SECOND", 1.0, env),
            max_rate_wait_seconds=env_float("SMS_MAX_RATE_WAIT_SECONDS", 20.0, env),
            ack_wait_seconds=env_float("SMS_ACK_WAIT_SECONDS", 60.0, env),
            send=SendSettings.from_env("SMS", env),
        )
        if config.segments_per_second <= 0:
            raise ConfigError("SMS_SEGMENTS_PER_SECOND must be positive")
        if config.max_rate_wait_seconds < 0:
            raise ConfigError("SMS_MAX_RATE_WAIT_SECONDS must be >= 0")
        if config.ack_wait_seconds <= config.max_rate_wait_seconds + config.send.send_timeout_seconds:
            raise ConfigError("SMS_ACK_WAIT_SECONDS must exceed SMS_MAX_RATE_WAIT_SECONDS + SMS_SEND_TIMEOUT_SECONDS")
        # Last, so that a bad setting is reported as itself rather than as a missing key.
        return replace(config, keyring=Keyring.from_env(env, sandbox=common.sandbox))
