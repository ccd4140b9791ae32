"""Settings of the notifications service."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from shared.config import CommonConfig, ConfigError, Rate, env_float, env_int, env_rates, env_secret
from shared.db import DatabaseSettings
from shared.encryption import Keyring
from shared.routes import DEFAULT_PORTS

MAX_DELAY_SECONDS = 7 * 24 * 3600


@dataclass(frozen=True)
class NotificationsConfig:
    """Everything the notifications service reads from its environment."""

    common: CommonConfig
    # Where pending notifications, sends, reply windows, opt-ins and limit counts are kept
    # (THREADLINE_DATABASE_URL, or a SQLite file under the data directory).
    database: DatabaseSettings
    # How long a business reply may stay unread before the customer is notified (apps may
    # override it with `settings.notifications.delaySeconds`).
    default_delay_seconds: float
    # How often the timer looks for notifications that fell due.
    tick_seconds: float
    # Signs opt-out links and keys the opt-in code hashes.
    secret: str
    # Opt-in confirmation codes: lifetime, wrong tries allowed, starts allowed per user per hour.
    code_ttl_seconds: float
    max_code_attempts: int
    max_starts_per_hour: int
    request_timeout: float
    # Sends to addresses a customer typed (services/notifications/limits.py), as `10/h,50/d`:
    # opt-in requests per client address (IPv6: /64) and per app + page Origin; confirmation
    # codes per destination address (all apps) and per app; away notifications to opted-in
    # addresses per destination and per app.
    optin_limit_per_ip: tuple[Rate, ...] = (Rate(10, 3600.0), Rate(50, 86400.0))
    optin_limit_per_origin: tuple[Rate, ...] = (Rate(60, 3600.0), Rate(500, 86400.0))
    code_limit_per_address: tuple[Rate, ...] = (Rate(3, 3600.0), Rate(10, 86400.0))
    code_limit_per_app: tuple[Rate, ...] = (Rate(100, 3600.0), Rate(1000, 86400.0))
    send_limit_per_address: tuple[Rate, ...] = (Rate(20, 3600.0), Rate(100, 86400.0))
    send_limit_per_app: tuple[Rate, ...] = (Rate(5000, 3600.0), Rate(50000, 86400.0))
    # Opens the integrations' sealed credentials (THREADLINE_SECRETS_KEY).
    keyring: Keyring = field(default_factory=Keyring)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> NotificationsConfig:
        """Build and validate the configuration."""
        env = os.environ if environ is None else environ
        common = CommonConfig.from_env(DEFAULT_PORTS["notifications"], env)
        config = cls(
            common=common,
            database=DatabaseSettings.from_env(common.data_dir, "notifications", env),
            default_delay_seconds=env_float("THREADLINE_NOTIFY_DEFAULT_DELAY_SECONDS", 300.0, env),
            tick_seconds=env_float("THREADLINE_NOTIFY_TICK_SECONDS", 0.5, env),
            secret=env_secret("THREADLINE_NOTIFY_SECRET", sandbox=common.sandbox,
                              default="sandbox-notifications-secret", environ=env),
            code_ttl_seconds=env_float("THREADLINE_NOTIFY_CODE_TTL_SECONDS", 600.0, env),
            max_code_attempts=env_int("THREADLINE_NOTIFY_MAX_CODE_ATTEMPTS", 5, env),
            max_starts_per_hour=env_int("THREADLINE_NOTIFY_MAX_OPTIN_STARTS_PER_HOUR", 5, env),
            request_timeout=env_float("THREADLINE_NOTIFY_REQUEST_TIMEOUT_SECONDS", 5.0, env),
            optin_limit_per_ip=env_rates("THREADLINE_NOTIFY_OPTIN_LIMIT_PER_IP", "10/h,50/d", env),
            optin_limit_per_origin=env_rates("THREADLINE_NOTIFY_OPTIN_LIMIT_PER_ORIGIN", "60/h,500/d", env),
            code_limit_per_address=env_rates("THREADLINE_NOTIFY_CODE_LIMIT_PER_ADDRESS", "3/h,10/d", env),
            code_limit_per_app=env_rates("THREADLINE_NOTIFY_CODE_LIMIT_PER_APP", "100/h,1000/d", env),
            send_limit_per_address=env_rates("THREADLINE_NOTIFY_SEND_LIMIT_PER_ADDRESS", "20/h,100/d", env),
            send_limit_per_app=env_rates("THREADLINE_NOTIFY_SEND_LIMIT_PER_APP", "5000/h,50000/d", env),
        )
        if not 0 < config.default_delay_seconds <= MAX_DELAY_SECONDS:
            raise ConfigError(f"THREADLINE_NOTIFY_DEFAULT_DELAY_SECONDS must be in (0, {MAX_DELAY_SECONDS}]")
        if not 0.05 <= config.tick_seconds <= 60:
            raise ConfigError("THREADLINE_NOTIFY_TICK_SECONDS must be between 0.05 and 60")
        if not 0 < config.code_ttl_seconds <= 24 * 3600:
            raise ConfigError("THREADLINE_NOTIFY_CODE_TTL_SECONDS must be in (0, 86400]")
        if config.max_code_attempts < 1 or config.max_starts_per_hour < 1:
            raise ConfigError("THREADLINE_NOTIFY_MAX_CODE_ATTEMPTS and _MAX_OPTIN_STARTS_PER_HOUR must be >= 1")
        if not 0 < config.request_timeout <= 60:
            raise ConfigError("THREADLINE_NOTIFY_REQUEST_TIMEOUT_SECONDS must be in (0, 60]")
        # Last, so that a bad setting is reported as itself rather than as a missing key.
        return replace(config, keyring=Keyring.from_env(env, sandbox=common.sandbox))

    @property
    def longest_limit_window(self) -> float:
        """How long a counted request or send must be remembered."""
        rates = (*self.optin_limit_per_ip, *self.optin_limit_per_origin, *self.code_limit_per_address,
                 *self.code_limit_per_app, *self.send_limit_per_address, *self.send_limit_per_app)
        return max([3600.0, *(rate.window_seconds for rate in rates)])
