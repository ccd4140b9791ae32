"""Settings of the sandbox service."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from shared.config import CommonConfig, ConfigError, env_bool, env_int, env_str
from shared.encryption import Keyring
from shared.routes import DEFAULT_PORTS, SANDBOX_SMTP_PORT


@dataclass(frozen=True)
class SandboxConfig:
    """The sandbox only runs with THREADLINE_SANDBOX on: it fakes platforms, never talks to real ones."""

    common: CommonConfig
    # Simulate the 24 h customer-service window (free-form outside it fails with 131047).
    enforce_window: bool
    # Send `sent`/`delivered` status webhooks after each accepted message.
    auto_statuses: bool
    # The SMTP sink (`smtp_fake`): where it listens (port 0: any free port).
    smtp_host: str = "127.0.0.1"
    smtp_port: int = SANDBOX_SMTP_PORT
    # Where the e-mail service's SMTP receiver listens (THREADLINE_MAIL_SMTP_HOST / _PORT, the
    # variables that service reads; THREADLINE_SANDBOX_MAIL_HOST overrides the host): the sandbox
    # mail box sends its replies there. No port: replies are off, `mail_receiver_problem` says why
    # (shown on the page; the reply route answers 503).
    mail_receiver_host: str = "127.0.0.1"
    mail_receiver_port: int | None = None
    mail_receiver_problem: str = "THREADLINE_MAIL_SMTP_PORT is not set"
    # Opens the integrations' sealed credentials (THREADLINE_SECRETS_KEY).
    keyring: Keyring = field(default_factory=Keyring)

    @property
    def public_url(self) -> str:
        """Where the sandbox is reachable from outside (through the front door)."""
        return f"{self.common.public_base_url}/sandbox"

    @property
    def sandbox_file(self) -> str:
        """The file the lead's bootstrap writes: app id and integration ids of the demo."""
        return os.path.join(self.common.data_dir, "sandbox.json")

    @property
    def whatsapp_store_file(self) -> str:
        """Where the fake WhatsApp keeps its threads across restarts (JSON lines)."""
        return os.path.join(self.common.data_dir, "sandbox-whatsapp.jsonl")

    def webhook_url(self, integration_id: str) -> str:
        """The gateway's public webhook URL for one WhatsApp integration."""
        return f"{self.common.public_base_url}/webhooks/whatsapp/{integration_id}"

    @property
    def uploads_dir(self) -> str:
        """Where the photos and documents the phones send are kept."""
        return os.path.join(self.common.data_dir, "sandbox-uploads")

    @property
    def uploads_index_file(self) -> str:
        """The index of those files (JSON lines)."""
        return os.path.join(self.common.data_dir, "sandbox-uploads.jsonl")

    @property
    def mail_store_file(self) -> str:
        """Where the SMTP sink keeps its inbox across restarts (JSON lines)."""
        return os.path.join(self.common.data_dir, "sandbox-mail.jsonl")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> SandboxConfig:
        """Build and validate the configuration."""
        env = os.environ if environ is None else environ
        common = CommonConfig.from_env(DEFAULT_PORTS["sandbox"], env)
        if not common.sandbox:
            raise ConfigError("the sandbox service only runs with THREADLINE_SANDBOX=1")
        smtp_port = env_int("THREADLINE_SANDBOX_SMTP_PORT", SANDBOX_SMTP_PORT, env)
        if not 0 <= smtp_port <= 65535:
            raise ConfigError("THREADLINE_SANDBOX_SMTP_PORT must be between 0 and 65535")
        receiver_port, problem = mail_receiver_port(env)
        # The receiver's address as the sandbox reaches it: THREADLINE_SANDBOX_MAIL_HOST when the
        # e-mail service runs elsewhere (another pod), else the host it binds.
        receiver_host = env_str("THREADLINE_SANDBOX_MAIL_HOST", env_str("THREADLINE_MAIL_SMTP_HOST", "127.0.0.1", env),
                                env).strip()
        return cls(
            common=common,
            keyring=Keyring.from_env(env, sandbox=common.sandbox),
            enforce_window=env_bool("SANDBOX_WHATSAPP_ENFORCE_WINDOW", False, env),
            auto_statuses=env_bool("SANDBOX_WHATSAPP_AUTO_STATUSES", True, env),
            smtp_host=env_str("THREADLINE_SANDBOX_SMTP_HOST", "127.0.0.1", env),
            smtp_port=smtp_port,
            # A receiver listening on every interface is reached on loopback.
            mail_receiver_host="127.0.0.1" if receiver_host in ("", "0.0.0.0", "::") else receiver_host,
            mail_receiver_port=receiver_port,
            mail_receiver_problem=problem,
        )


def mail_receiver_port(env: Mapping[str, str]) -> tuple[int | None, str]:
    """(port, "") of the e-mail service's SMTP receiver from THREADLINE_MAIL_SMTP_PORT, or (None,
    why replies by mail are off) when it is unset, `off` or 0 (a port picked at start, which the
    sandbox cannot know: the launcher passes the real one). ConfigError for anything else."""
    raw = env.get("THREADLINE_MAIL_SMTP_PORT", "").strip().lower()
    if not raw:
        return None, ("THREADLINE_MAIL_SMTP_PORT is not set: the sandbox does not know where the e-mail"
                      " service receives mail")
    if raw == "off":
        return None, "the e-mail service's SMTP receiver is off (THREADLINE_MAIL_SMTP_PORT=off)"
    try:
        port = int(raw)
    except ValueError as exc:
        raise ConfigError(f"THREADLINE_MAIL_SMTP_PORT must be a port number or off, got {raw!r}") from exc
    if not 0 <= port <= 65535:
        raise ConfigError("THREADLINE_MAIL_SMTP_PORT must be between 0 and 65535")
    if port == 0:
        return None, ("THREADLINE_MAIL_SMTP_PORT is 0 (any free port): give the sandbox the port the e-mail"
                      " service listens on")
    return port, ""
