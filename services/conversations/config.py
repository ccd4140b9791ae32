"""Configuration of the conversations service."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from shared.config import CommonConfig, ConfigError, env_float, env_int, env_secret, env_str
from shared.encryption import Keyring
from shared.routes import DEFAULT_PORTS
from shared.store import db_path


@dataclass(frozen=True)
class ConversationsConfig:
    """Settings of the conversations service.

    The account key (`THREADLINE_ACCOUNT_KEY_ID`/`_SECRET`) is the only credential that can
    create and list apps; it sees every app.
    """

    common: CommonConfig
    db_path: str
    account_key_id: str
    account_key_secret: str
    identity_timeout: float
    # Seals app key secrets, channel credentials and webhook secrets (THREADLINE_SECRETS_KEY).
    keyring: Keyring
    # Messages of recent history a channel receives when a conversation is handed off to it.
    handoff_recap_count: int = 10

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
        return cls(common=common, db_path=db_path(common.data_dir, "conversations"),
                   account_key_id=key_id, account_key_secret=secret, identity_timeout=timeout,
                   keyring=Keyring.from_env(environ, sandbox=common.sandbox), handoff_recap_count=recap)
