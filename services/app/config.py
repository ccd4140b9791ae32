"""Configuration of the `app` service (the in-app SDK channel), from the environment."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from shared.config import CommonConfig, ConfigError, env_float, env_int
from shared.encryption import Keyring
from shared.routes import DEFAULT_PORTS
from shared.sdk_service import SdkSettings


@dataclass(frozen=True)
class AppConfig:
    """Settings of the `app` service. Push credentials are per integration (the KV bucket)."""

    common: CommonConfig
    # The SDK protocol: THREADLINE_SDK_TOKEN_SECRET, THREADLINE_APP_PING_INTERVAL, …
    sdk: SdkSettings
    # Seconds a business message may take to reach an open app socket before it is pushed.
    push_grace_seconds: float
    # Back-off for transient push errors: base * 2^(attempt-1), capped; then give up.
    retry_base_seconds: float
    retry_max_seconds: float
    max_push_attempts: int
    # Opens the integrations' sealed credentials (THREADLINE_SECRETS_KEY).
    keyring: Keyring = field(default_factory=Keyring)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> AppConfig:
        """Build and validate from the environment (`os.environ` when None)."""
        env = os.environ if environ is None else environ
        common = CommonConfig.from_env(DEFAULT_PORTS["app"], env)
        config = cls(
            common=common,
            sdk=SdkSettings.from_env(common, "THREADLINE_APP", env),
            push_grace_seconds=env_float("THREADLINE_APP_PUSH_GRACE_SECONDS", 3.0, env),
            retry_base_seconds=env_float("THREADLINE_APP_RETRY_BASE_SECONDS", 1.0, env),
            retry_max_seconds=env_float("THREADLINE_APP_RETRY_MAX_SECONDS", 60.0, env),
            max_push_attempts=env_int("THREADLINE_APP_MAX_PUSH_ATTEMPTS", 10, env),
        )
        if not 0 <= config.push_grace_seconds <= 3600:
            raise ConfigError("THREADLINE_APP_PUSH_GRACE_SECONDS must be between 0 and 3600")
        if config.retry_base_seconds < 0 or config.retry_max_seconds < config.retry_base_seconds:
            raise ConfigError("THREADLINE_APP_RETRY_BASE_SECONDS must be >= 0 and <= THREADLINE_APP_RETRY_MAX_SECONDS")
        if config.max_push_attempts < 1:
            raise ConfigError("THREADLINE_APP_MAX_PUSH_ATTEMPTS must be at least 1")
        # Last, so that a bad setting is reported as itself rather than as a missing key.
        return replace(config, keyring=Keyring.from_env(env, sandbox=common.sandbox))
