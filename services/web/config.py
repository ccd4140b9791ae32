"""Configuration of the `web` service, from the environment."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from shared.config import CommonConfig, ConfigError, env_float, env_int, env_secret
from shared.routes import DEFAULT_PORTS

SANDBOX_SDK_TOKEN_SECRET = "sandbox-sdk-token-secret-not-for-production"


@dataclass(frozen=True)
class WebConfig:
    """Settings of the `web` service."""

    common: CommonConfig
    # Signs SDK session tokens (THREADLINE_SDK_TOKEN_SECRET); rotating it logs every widget out.
    sdk_token_secret: str
    # Seconds between heartbeat pings on each socket.
    ping_interval: float
    # Frames a slow socket may have queued before it is closed (the client resumes by cursor).
    socket_queue_size: int
    # Seconds to wait for identity / conversations to answer.
    request_timeout: float

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> WebConfig:
        """Build and validate from THREADLINE_* variables (`os.environ` when None)."""
        env = os.environ if environ is None else environ
        common = CommonConfig.from_env(DEFAULT_PORTS["web"], env)
        config = cls(
            common=common,
            sdk_token_secret=env_secret("THREADLINE_SDK_TOKEN_SECRET", sandbox=common.sandbox,
                                        default=SANDBOX_SDK_TOKEN_SECRET, environ=env),
            ping_interval=env_float("THREADLINE_WEB_PING_INTERVAL", 20.0, env),
            socket_queue_size=env_int("THREADLINE_WEB_SOCKET_QUEUE", 256, env),
            request_timeout=env_float("THREADLINE_WEB_REQUEST_TIMEOUT", 5.0, env),
        )
        if not 0.05 <= config.ping_interval <= 300:
            raise ConfigError("THREADLINE_WEB_PING_INTERVAL must be between 0.05 and 300 seconds")
        if config.socket_queue_size < 8:
            raise ConfigError("THREADLINE_WEB_SOCKET_QUEUE must be at least 8")
        if config.request_timeout <= 0:
            raise ConfigError("THREADLINE_WEB_REQUEST_TIMEOUT must be positive")
        return config
