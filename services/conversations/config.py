"""Configuration of the conversations service."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from shared.config import CommonConfig, ConfigError, env_float, env_int, env_secret, env_str
from shared.db import DatabaseSettings
from shared.encryption import Keyring
from shared.routes import DEFAULT_PORTS
from shared.signing import DEFAULT_JWT_POLICY, JwtPolicy


@dataclass(frozen=True)
class ConversationsConfig:
    """Settings of the conversations service.

    The account key (`THREADLINE_ACCOUNT_KEY_ID`/`_SECRET`) is the only credential that can
    create and list apps; it sees every app.
    """

    common: CommonConfig
    # Its SQLite file under the data directory, or a schema of THREADLINE_DATABASE_URL.
    database: DatabaseSettings
    account_key_id: str
    account_key_secret: str
    identity_timeout: float
    # Seals app key secrets, channel credentials and webhook secrets (THREADLINE_SECRETS_KEY).
    keyring: Keyring
    # Messages of recent history a channel receives when a conversation is handed off to it.
    handoff_recap_count: int = 10
    # Business API and SDK login JWTs: time claims must be numbers, lifetime bounded
    # (THREADLINE_JWT_MAX_LIFETIME_SECONDS), exp required if THREADLINE_JWT_REQUIRE_EXP.
    jwt_policy: JwtPolicy = DEFAULT_JWT_POLICY

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> ConversationsConfig:
        """Build and validate from the environment."""
        common = CommonConfig.from_env(DEFAULT_PORTS["conversations"], environ)
        key_id = env_str("THREADLINE_ACCOUNT_KEY_ID", "act_000000000000000000000000" if common.sandbox else None,
                         environ)
        if not key_id.startswith("act_"):
            raise ConfigError("THREADLINE_ACCOUNT_KEY_ID must start with act_")
        secret = env_secret("THREADLINE_ACCOUNT_KEY_SECRET", sandbox=common.sandbox,
                            default="sandbox-account-secret", environ=environ)
        timeout = env_float("THREADLINE_IDENTITY_TIMEOUT", 5.0, environ)
        if timeout <= 0:
            raise ConfigError("THREADLINE_IDENTITY_TIMEOUT must be positive")
        recap = env_int("THREADLINE_HANDOFF_RECAP_COUNT", 10, environ)
        if not 0 <= recap <= 50:
            raise ConfigError("THREADLINE_HANDOFF_RECAP_COUNT must be between 0 and 50")
        return cls(common=common, database=DatabaseSettings.from_env(common.data_dir, "conversations", environ),
                   account_key_id=key_id, account_key_secret=secret, identity_timeout=timeout,
                   keyring=Keyring.from_env(environ, sandbox=common.sandbox), handoff_recap_count=recap,
                   jwt_policy=jwt_policy_from_env(environ))


def jwt_policy_from_env(environ: Mapping[str, str]) -> JwtPolicy:
    """`THREADLINE_JWT_MAX_LIFETIME_SECONDS` (default 24 h) and `THREADLINE_JWT_REQUIRE_EXP` (default off)."""
    lifetime = env_float("THREADLINE_JWT_MAX_LIFETIME_SECONDS", 24 * 3600.0, environ)
    if not 60 <= lifetime <= 366 * 86400:
        raise ConfigError("THREADLINE_JWT_MAX_LIFETIME_SECONDS must be between 60 and 31622400 (366 days)")
    raw = env_str("THREADLINE_JWT_REQUIRE_EXP", "false", environ).strip().lower()
    if raw not in _TRUE | _FALSE:
        raise ConfigError("THREADLINE_JWT_REQUIRE_EXP must be true or false")
    return JwtPolicy(max_lifetime_seconds=lifetime, require_exp=raw in _TRUE)


_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})
