"""Configuration of the `webhooks` service, read once from the environment and validated."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from shared.config import CommonConfig, ConfigError, env_float, env_int
from shared.db import DatabaseSettings
from shared.encryption import Keyring
from shared.routes import DEFAULT_PORTS

SERVICE_NAME = "webhooks"


@dataclass(frozen=True)
class WebhooksConfig:
    """Settings of the delivery engine. Durations are in seconds."""

    common: CommonConfig
    database: DatabaseSettings
    # First retry delay; each further retry doubles it (with jitter).
    retry_base_seconds: float = 2.0
    # How long a failing delivery keeps being retried before it is given up (SunCo: 15 min).
    retry_window_seconds: float = 900.0
    # Per-attempt HTTP timeout (SunCo: 20 s).
    timeout_seconds: float = 20.0
    # Most events in one envelope.
    max_batch_events: int = 50
    # Most concurrent HTTP requests to one webhook (each carries distinct conversations).
    max_inflight_per_webhook: int = 8
    # How long delivered and failed rows are kept before pruning.
    retention_seconds: float = 24 * 3600.0
    prune_interval_seconds: float = 300.0
    # Opens the webhooks' sealed secrets (THREADLINE_SECRETS_KEY).
    keyring: Keyring = field(default_factory=Keyring)

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> WebhooksConfig:
        """Build from THREADLINE_* variables; raise ConfigError on nonsense values."""
        common = CommonConfig.from_env(DEFAULT_PORTS[SERVICE_NAME], environ)
        config = cls(
            common=common,
            database=DatabaseSettings.from_env(common.data_dir, SERVICE_NAME, environ),
            retry_base_seconds=env_float("THREADLINE_WEBHOOK_RETRY_BASE_SECONDS", 2.0, environ),
            retry_window_seconds=env_float("THREADLINE_WEBHOOK_RETRY_WINDOW_SECONDS", 900.0, environ),
            timeout_seconds=env_float("THREADLINE_WEBHOOK_TIMEOUT_SECONDS", 20.0, environ),
            max_batch_events=env_int("THREADLINE_WEBHOOK_MAX_BATCH_EVENTS", 50, environ),
            max_inflight_per_webhook=env_int("THREADLINE_WEBHOOK_MAX_INFLIGHT", 8, environ),
            retention_seconds=env_float("THREADLINE_WEBHOOK_RETENTION_SECONDS", 24 * 3600.0, environ),
            prune_interval_seconds=env_float("THREADLINE_WEBHOOK_PRUNE_INTERVAL_SECONDS", 300.0, environ),
        )
        config.validate()
        # Last, so that a bad setting is reported as itself rather than as a missing key.
        return replace(config, keyring=Keyring.from_env(environ, sandbox=common.sandbox))

    def validate(self) -> None:
        """Refuse values that would make delivery misbehave."""
        if not self.retry_base_seconds > 0:
            raise ConfigError("THREADLINE_WEBHOOK_RETRY_BASE_SECONDS must be > 0")
        if not self.retry_window_seconds > 0:
            raise ConfigError("THREADLINE_WEBHOOK_RETRY_WINDOW_SECONDS must be > 0")
        if not self.timeout_seconds > 0:
            raise ConfigError("THREADLINE_WEBHOOK_TIMEOUT_SECONDS must be > 0")
        if not 1 <= self.max_batch_events <= 1000:
            raise ConfigError("THREADLINE_WEBHOOK_MAX_BATCH_EVENTS must be between 1 and 1000")
        if not 1 <= self.max_inflight_per_webhook <= 256:
            raise ConfigError("THREADLINE_WEBHOOK_MAX_INFLIGHT must be between 1 and 256")
        if not self.retention_seconds >= 0:
            raise ConfigError("THREADLINE_WEBHOOK_RETENTION_SECONDS must be >= 0")
        if not self.prune_interval_seconds > 0:
            raise ConfigError("THREADLINE_WEBHOOK_PRUNE_INTERVAL_SECONDS must be > 0")
