"""Configuration from the environment, validated at start."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from shared.egress import EgressPolicy

PLACEHOLDER_SECRETS = frozenset({"", "changeme", "change-me", "secret", "placeholder", "sandbox", "dev", "test"})


class ConfigError(ValueError):
    """Raised when the environment does not describe a runnable service."""


def env_str(name: str, default: str | None = None, environ: Mapping[str, str] | None = None) -> str:
    """Read a string variable; raise ConfigError when it is missing and has no default."""
    env = os.environ if environ is None else environ
    value = env.get(name)
    if value is None or value == "":
        if default is None:
            raise ConfigError(f"{name} must be set")
        return default
    return value


def env_int(name: str, default: int, environ: Mapping[str, str] | None = None) -> int:
    """Read an integer variable."""
    raw = env_str(name, str(default), environ)
    try:
        return int(raw)
    except ValueError as exc:
        raise ConfigError(f"{name} must be an integer, got {raw!r}") from exc


def env_float(name: str, default: float, environ: Mapping[str, str] | None = None) -> float:
    """Read a float variable."""
    raw = env_str(name, str(default), environ)
    try:
        return float(raw)
    except ValueError as exc:
        raise ConfigError(f"{name} must be a number, got {raw!r}") from exc


def env_bool(name: str, default: bool, environ: Mapping[str, str] | None = None) -> bool:
    """Read a boolean variable (1/true/yes/on)."""
    raw = env_str(name, "1" if default else "0", environ).strip().lower()
    return raw in {"1", "true", "yes", "on"}


def env_secret(name: str, *, sandbox: bool, default: str | None = None,
               environ: Mapping[str, str] | None = None) -> str:
    """Read a secret; outside the sandbox refuse missing, placeholder or short values."""
    value = env_str(name, default if sandbox else None, environ)
    if not sandbox and (value.strip().lower() in PLACEHOLDER_SECRETS or len(value) < 16):
        raise ConfigError(f"{name} holds a placeholder or too-short secret; set a real one (>= 16 chars)")
    return value


@dataclass(frozen=True)
class Rate:
    """At most `count` actions per sliding window of `window_seconds`."""

    count: int
    window_seconds: float


_RATE = re.compile(r"^\s*([0-9]+)\s*/\s*([0-9]*)\s*([smhd])\s*$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
MAX_RATE_WINDOW_SECONDS = 7 * 86400


def parse_rates(raw: str) -> tuple[Rate, ...]:
    """Parse `"10/h,30/d"` (count / optional number + s|m|h|d, comma-separated); ValueError if malformed."""
    rates = []
    for part in raw.split(","):
        match = _RATE.match(part)
        if match is None:
            raise ValueError(f"{part.strip()!r} is not <count>/<window> such as 10/h or 3/15m")
        count, number, unit = int(match.group(1)), int(match.group(2) or 1), match.group(3)
        window = number * _UNIT_SECONDS[unit]
        if count < 1 or not 1 <= window <= MAX_RATE_WINDOW_SECONDS:
            raise ValueError(f"{part.strip()!r}: the count must be >= 1 and the window between 1s and 7d")
        rates.append(Rate(count, float(window)))
    return tuple(sorted(rates, key=lambda r: r.window_seconds))


def env_rates(name: str, default: str, environ: Mapping[str, str] | None = None) -> tuple[Rate, ...]:
    """Read a rate limit such as `10/h,30/d` (see `parse_rates`)."""
    try:
        return parse_rates(env_str(name, default, environ))
    except ValueError as exc:
        raise ConfigError(f"{name}: {exc}") from exc


_REPLICA_ID = re.compile(r"[A-Za-z0-9_-]{1,63}")


@dataclass(frozen=True)
class S3Settings:
    """Where and how to reach the bucket."""

    bucket: str
    prefix: str = ""
    endpoint_url: str | None = None
    region: str = "us-east-1"
    access_key_id: str | None = None
    secret_access_key: str | None = None
    addressing_style: str = "auto"


@dataclass(frozen=True)
class ObjectStoreSettings:
    """`THREADLINE_OBJECT_STORE_URL` (unset: local disk under `<data dir>/<folder>`)."""

    local_root: Path
    s3: S3Settings | None = None

    @classmethod
    def local(cls, data_dir: str, folder: str = "attachments") -> ObjectStoreSettings:
        """Local disk under the data directory."""
        return cls(local_root=Path(data_dir) / folder)

    @classmethod
    def from_env(cls, data_dir: str, environ: Mapping[str, str], *, sandbox: bool,
                 folder: str = "attachments") -> ObjectStoreSettings:
        """Read and check the settings. For S3: `THREADLINE_S3_ENDPOINT_URL` (a compatible server;
        unset for AWS), `THREADLINE_S3_REGION`, `THREADLINE_S3_ACCESS_KEY_ID` and
        `THREADLINE_S3_SECRET_ACCESS_KEY` (both or neither: neither takes the AWS default chain,
        e.g. an IAM role), `THREADLINE_S3_ADDRESSING` (auto | path | virtual)."""
        url = env_str("THREADLINE_OBJECT_STORE_URL", "", environ).strip()
        local_root = Path(data_dir) / folder
        if not url:
            return cls(local_root=local_root)
        parts = urlsplit(url)
        if parts.scheme != "s3" or not parts.netloc or parts.query or parts.fragment:
            raise ConfigError("THREADLINE_OBJECT_STORE_URL must be s3://bucket or s3://bucket/prefix")
        prefix = parts.path.strip("/")
        if prefix and not _OBJECT_PREFIX.match(prefix):
            raise ConfigError("THREADLINE_OBJECT_STORE_URL's prefix may hold letters, digits, _, - and /")
        endpoint = env_str("THREADLINE_S3_ENDPOINT_URL", "", environ).strip() or None
        if endpoint is not None and urlsplit(endpoint).scheme not in ("http", "https"):
            raise ConfigError("THREADLINE_S3_ENDPOINT_URL must be an http(s) URL")
        key_id = env_str("THREADLINE_S3_ACCESS_KEY_ID", "", environ).strip() or None
        secret = (env_secret("THREADLINE_S3_SECRET_ACCESS_KEY", sandbox=sandbox, environ=environ)
                  if key_id else None)
        if key_id is None and env_str("THREADLINE_S3_SECRET_ACCESS_KEY", "", environ):
            raise ConfigError("THREADLINE_S3_SECRET_ACCESS_KEY is set without THREADLINE_S3_ACCESS_KEY_ID")
        addressing = env_str("THREADLINE_S3_ADDRESSING", "auto", environ).strip().lower()
        if addressing not in ("auto", "path", "virtual"):
            raise ConfigError("THREADLINE_S3_ADDRESSING must be auto, path or virtual")
        return cls(local_root=local_root, s3=S3Settings(
            bucket=parts.netloc, prefix=f"{prefix}/" if prefix else "", endpoint_url=endpoint,
            region=env_str("THREADLINE_S3_REGION", "us-east-1", environ).strip() or "us-east-1",
            access_key_id=key_id, secret_access_key=secret, addressing_style=addressing))


_OBJECT_PREFIX = re.compile(r"^[A-Za-z0-9_-]+(/[A-Za-z0-9_-]+)*$")


@dataclass(frozen=True)
class CommonConfig:
    """Settings every service shares."""

    nats_url: str
    http_host: str
    http_port: int
    data_dir: str
    sandbox: bool
    stream_replicas: int
    public_base_url: str
    # Where outbound HTTP/SMTP may go (THREADLINE_EGRESS_ALLOW, THREADLINE_EGRESS_ALLOW_HTTP).
    egress: EgressPolicy = field(default_factory=EgressPolicy)
    # NATS credentials of this service (shared/natsauth.py gives each service its own user);
    # None = anonymous, which no server Threadline starts or deploys accepts.
    nats_user: str | None = None
    nats_password: str | None = None
    # CA bundle that signed the NATS servers' certificates (a `tls://` NATS URL).
    nats_tls_ca_file: str | None = None
    # This process among its service's replicas (THREADLINE_REPLICA_ID: the pod name in
    # Kubernetes): partition leases are held under it, and a replica restarted under the same id
    # takes its partitions back at once. None: a random id per start.
    replica_id: str | None = None
    # Where files are kept (THREADLINE_OBJECT_STORE_URL); None: local disk under the data directory.
    files: ObjectStoreSettings | None = None

    @property
    def file_store(self) -> ObjectStoreSettings:
        """The object store settings (`shared.objectstore`)."""
        return self.files or ObjectStoreSettings.local(self.data_dir)

    @classmethod
    def from_env(cls, default_port: int, environ: Mapping[str, str] | None = None) -> CommonConfig:
        """Build from THREADLINE_* variables; `default_port` is the service's own HTTP port."""
        port = env_int("THREADLINE_HTTP_PORT", default_port, environ)
        if not 0 <= port < 65536:
            raise ConfigError("THREADLINE_HTTP_PORT out of range")
        replicas = env_int("THREADLINE_STREAM_REPLICAS", 1, environ)
        if replicas not in (1, 3, 5):
            raise ConfigError("THREADLINE_STREAM_REPLICAS must be 1, 3 or 5")
        sandbox = env_bool("THREADLINE_SANDBOX", False, environ)
        public_base_url = env_str("THREADLINE_PUBLIC_BASE_URL", "http://127.0.0.1:8080", environ).rstrip("/")
        try:
            egress = EgressPolicy.from_env(os.environ if environ is None else environ, sandbox=sandbox,
                                           public_base_url=public_base_url)
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc
        # The servers Threadline starts and deploys refuse anonymous connections; a password,
        # when given, must be a real one.
        nats_user = env_str("THREADLINE_NATS_USER", "", environ) or None
        nats_password = None
        if nats_user is not None:
            nats_password = env_secret("THREADLINE_NATS_PASSWORD", sandbox=sandbox, environ=environ)
        elif env_str("THREADLINE_NATS_PASSWORD", "", environ):
            raise ConfigError("THREADLINE_NATS_PASSWORD needs THREADLINE_NATS_USER")
        replica_id = env_str("THREADLINE_REPLICA_ID", "", environ) or None
        if replica_id is not None and not _REPLICA_ID.fullmatch(replica_id):
            raise ConfigError("THREADLINE_REPLICA_ID may hold only letters, digits, '-' and '_' (at most 63)")
        data_dir = env_str("THREADLINE_DATA_DIR", ".threadline", environ)
        return cls(
            nats_url=env_str("THREADLINE_NATS_URL", "nats://127.0.0.1:4222", environ),
            http_host=env_str("THREADLINE_HTTP_HOST", "127.0.0.1", environ),
            http_port=port,
            data_dir=data_dir,
            sandbox=sandbox,
            stream_replicas=replicas,
            public_base_url=public_base_url,
            egress=egress,
            nats_user=nats_user,
            nats_password=nats_password,
            nats_tls_ca_file=env_str("THREADLINE_NATS_TLS_CA_FILE", "", environ) or None,
            replica_id=replica_id,
            files=ObjectStoreSettings.from_env(data_dir, os.environ if environ is None else environ,
                                               sandbox=sandbox),
        )
