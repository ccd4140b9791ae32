"""Settings of the desk service, read once from the environment and validated."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from shared.clientip import Network, env_trusted_proxies
from shared.config import CommonConfig, ConfigError, env_float, env_int, env_str
from shared.db import DatabaseSettings
from shared.encryption import Keyring
from shared.routes import DEFAULT_PORTS

from .auth import DEFAULT_ABSOLUTE_TIMEOUT, DEFAULT_IDLE_TIMEOUT

SERVICE_NAME = "desk"


@dataclass(frozen=True)
class DeskConfig:
    """Everything the desk reads from its environment. Durations are in seconds."""

    common: CommonConfig
    database: DatabaseSettings
    # An agent counts as online while their desk (a socket's heartbeat, a request, or the API on
    # their behalf) was heard from within this; past it their conversations go back to the queue.
    presence_grace_seconds: float = 90.0
    # How often the sweeper looks for agents past the grace period and snoozed conversations due.
    sweep_seconds: float = 5.0
    # Conversations an agent holds at once unless their account says otherwise.
    default_capacity: int = 5
    session_idle_seconds: float = DEFAULT_IDLE_TIMEOUT
    session_absolute_seconds: float = DEFAULT_ABSOLUTE_TIMEOUT
    # `make up`'s demo agent: an admin of every app, without a password, signed in by the sandbox
    # page's link only (`POST /desk/api/v1/session/demo`). Sandbox only.
    demo_agent_email: str = ""
    # Proxies whose X-Forwarded-For is believed (THREADLINE_TRUSTED_PROXIES): sign-in throttling
    # counts per client address.
    trusted_proxies: tuple[Network, ...] = ()
    # Signs CSRF tokens and keys the login throttle's entries (THREADLINE_SECRETS_KEY).
    keyring: Keyring = field(default_factory=Keyring)

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> DeskConfig:
        """Build from THREADLINE_* variables; raise ConfigError on nonsense values."""
        common = CommonConfig.from_env(DEFAULT_PORTS[SERVICE_NAME], environ)
        config = cls(
            common=common,
            database=DatabaseSettings.from_env(common.data_dir, SERVICE_NAME, environ),
            presence_grace_seconds=env_float("THREADLINE_DESK_PRESENCE_GRACE_SECONDS", 90.0, environ),
            sweep_seconds=env_float("THREADLINE_DESK_SWEEP_SECONDS", 5.0, environ),
            default_capacity=env_int("THREADLINE_DESK_DEFAULT_CAPACITY", 5, environ),
            session_idle_seconds=env_float("THREADLINE_DESK_SESSION_IDLE_SECONDS", DEFAULT_IDLE_TIMEOUT, environ),
            session_absolute_seconds=env_float("THREADLINE_DESK_SESSION_ABSOLUTE_SECONDS",
                                               DEFAULT_ABSOLUTE_TIMEOUT, environ),
            demo_agent_email=env_str("THREADLINE_DESK_DEMO_AGENT_EMAIL", "", environ),
            trusted_proxies=env_trusted_proxies(environ),
        )
        config.validate()
        return replace(config, keyring=Keyring.from_env(environ, sandbox=common.sandbox))

    def validate(self) -> None:
        """Refuse values that would make routing or sign-in misbehave."""
        if not 5 <= self.presence_grace_seconds <= 3600:
            raise ConfigError("THREADLINE_DESK_PRESENCE_GRACE_SECONDS must be between 5 and 3600")
        if not 0 < self.sweep_seconds <= self.presence_grace_seconds:
            raise ConfigError("THREADLINE_DESK_SWEEP_SECONDS must be > 0 and at most the presence grace")
        if not 1 <= self.default_capacity <= 100:
            raise ConfigError("THREADLINE_DESK_DEFAULT_CAPACITY must be between 1 and 100")
        if not 60 <= self.session_idle_seconds <= self.session_absolute_seconds <= 30 * 86400:
            raise ConfigError("THREADLINE_DESK_SESSION_IDLE_SECONDS must be at least 60 and at most"
                              " THREADLINE_DESK_SESSION_ABSOLUTE_SECONDS (at most 30 days)")
        if self.demo_agent_email and not self.common.sandbox:
            raise ConfigError("THREADLINE_DESK_DEMO_AGENT_EMAIL is for the sandbox only (THREADLINE_SANDBOX=1)")
