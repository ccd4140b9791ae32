"""Settings of the handoff service."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from shared.config import CommonConfig, ConfigError, env_float, env_int
from shared.routes import DEFAULT_PORTS

# Codes live at most this long in the KV bucket (expired ones answer "expired" until then).
MAX_CODE_TTL_SECONDS = 24 * 3600


@dataclass(frozen=True)
class HandoffConfig:
    """Everything the handoff service reads from its environment."""

    common: CommonConfig
    # How long a link code can be redeemed after it was issued.
    code_ttl_seconds: float
    # Per sender (app, integration, channel user): failed redemptions allowed per window.
    max_sender_failures: int
    sender_window_seconds: float
    # Per code: wrong-channel / foreign attempts after which the code is burned.
    max_code_failures: int

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> HandoffConfig:
        """Build and validate the configuration."""
        env = os.environ if environ is None else environ
        config = cls(
            common=CommonConfig.from_env(DEFAULT_PORTS["handoff"], env),
            code_ttl_seconds=env_float("THREADLINE_HANDOFF_CODE_TTL_SECONDS", 600.0, env),
            max_sender_failures=env_int("THREADLINE_HANDOFF_MAX_SENDER_FAILURES", 5, env),
            sender_window_seconds=env_float("THREADLINE_HANDOFF_SENDER_WINDOW_SECONDS", 900.0, env),
            max_code_failures=env_int("THREADLINE_HANDOFF_MAX_CODE_FAILURES", 5, env),
        )
        if not 0 < config.code_ttl_seconds <= MAX_CODE_TTL_SECONDS:
            raise ConfigError(f"THREADLINE_HANDOFF_CODE_TTL_SECONDS must be in (0, {MAX_CODE_TTL_SECONDS}]")
        if config.max_sender_failures < 1 or config.max_code_failures < 1:
            raise ConfigError("THREADLINE_HANDOFF_MAX_SENDER_FAILURES and _MAX_CODE_FAILURES must be at least 1")
        if not 0 < config.sender_window_seconds <= MAX_CODE_TTL_SECONDS:
            raise ConfigError(f"THREADLINE_HANDOFF_SENDER_WINDOW_SECONDS must be in (0, {MAX_CODE_TTL_SECONDS}]")
        return config
