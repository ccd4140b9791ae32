"""Settings of the e-mail channel service."""

from __future__ import annotations

import os
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from shared.config import CommonConfig, ConfigError, Rate, env_float, env_int, env_rates, env_str
from shared.encryption import Keyring
from shared.mailreply import SANDBOX_AUTHSERV_ID
from shared.outbound import SendSettings
from shared.routes import DEFAULT_PORTS, MAIL_SMTP_PORT


@dataclass(frozen=True)
class EmailConfig:
    """Everything the e-mail service reads from its environment (credentials come per
    integration from the integrations KV bucket)."""

    common: CommonConfig
    # The SMTP receiver (THREADLINE_MAIL_SMTP_HOST / _PORT; port 0: any free port; "off": no
    # SMTP receiver, the Mailgun and SendGrid webhooks only).
    smtp_host: str
    smtp_port: int | None
    # The name the receiver greets with (THREADLINE_MAIL_HOSTNAME).
    smtp_hostname: str
    # SMTP sessions and webhook posts handled at once (THREADLINE_MAIL_MAX_SESSIONS): each may
    # hold a 25 MB mail in memory; past it, 421 / 503 and the sender retries.
    max_sessions: int
    # How long reading one mail may take (THREADLINE_MAIL_PARSE_BUDGET_SECONDS), in a worker process.
    parse_budget_seconds: float
    # A certificate for STARTTLS (THREADLINE_MAIL_TLS_CERT_FILE / _KEY_FILE; none: plain SMTP).
    tls_cert_file: str | None
    # Hosts whose Authentication-Results headers are believed (THREADLINE_MAIL_TRUSTED_AUTHSERV_IDS,
    # comma-separated: the front MTA that checked SPF/DKIM/DMARC). None listed: DKIM is verified here.
    trusted_authserv_ids: frozenset[str]
    # Mails one sender may send to one app (THREADLINE_MAIL_PER_SENDER, e.g. "20/m,200/h").
    per_sender: tuple[Rate, ...]
    send: SendSettings
    tls_key_file: str | None = None
    keyring: Keyring = field(default_factory=Keyring)

    def tls_context(self) -> ssl.SSLContext | None:
        """The STARTTLS context (ConfigError when the files cannot be loaded)."""
        if self.tls_cert_file is None:
            return None
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        try:
            context.load_cert_chain(self.tls_cert_file, self.tls_key_file)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"THREADLINE_MAIL_TLS_CERT_FILE / _KEY_FILE cannot be loaded: {exc}") from exc
        return context

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> EmailConfig:
        """Build and validate the configuration."""
        env = os.environ if environ is None else environ
        common = CommonConfig.from_env(DEFAULT_PORTS["email"], env)
        raw_port = env_str("THREADLINE_MAIL_SMTP_PORT", str(MAIL_SMTP_PORT), env).strip().lower()
        port = None if raw_port == "off" else env_int("THREADLINE_MAIL_SMTP_PORT", MAIL_SMTP_PORT, env)
        if port is not None and not 0 <= port < 65536:
            raise ConfigError("THREADLINE_MAIL_SMTP_PORT must be a port number or off")
        trusted = {part.strip().lower() for part in env_str("THREADLINE_MAIL_TRUSTED_AUTHSERV_IDS", "", env).split(",")
                   if part.strip()}
        if common.sandbox:
            trusted.add(SANDBOX_AUTHSERV_ID)
        config = cls(
            common=common,
            smtp_host=env_str("THREADLINE_MAIL_SMTP_HOST", "127.0.0.1", env),
            smtp_port=port,
            smtp_hostname=env_str("THREADLINE_MAIL_HOSTNAME", "threadline.local", env),
            max_sessions=env_int("THREADLINE_MAIL_MAX_SESSIONS", 8, env),
            parse_budget_seconds=env_float("THREADLINE_MAIL_PARSE_BUDGET_SECONDS", 30.0, env),
            tls_cert_file=env_str("THREADLINE_MAIL_TLS_CERT_FILE", "", env) or None,
            tls_key_file=env_str("THREADLINE_MAIL_TLS_KEY_FILE", "", env) or None,
            trusted_authserv_ids=frozenset(trusted),
            per_sender=env_rates("THREADLINE_MAIL_PER_SENDER", "20/m,200/h", env),
            send=SendSettings.from_env("MAIL", env),
        )
        if config.parse_budget_seconds <= 0:
            raise ConfigError("THREADLINE_MAIL_PARSE_BUDGET_SECONDS must be positive")
        if config.max_sessions < 1:
            raise ConfigError("THREADLINE_MAIL_MAX_SESSIONS must be at least 1")
        if (config.tls_cert_file is None) != (config.tls_key_file is None):
            raise ConfigError("set both THREADLINE_MAIL_TLS_CERT_FILE and THREADLINE_MAIL_TLS_KEY_FILE, or neither")
        config.tls_context()
        # Last, so that a bad setting is reported as itself rather than as a missing key.
        return replace(config, keyring=Keyring.from_env(env, sandbox=common.sandbox))
