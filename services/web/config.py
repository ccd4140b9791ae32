"""Configuration of the `web` service, from the environment."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from shared.clientip import Network
from shared.config import CommonConfig
from shared.routes import DEFAULT_PORTS
from shared.sdk_service import SdkSettings


@dataclass(frozen=True)
class WebConfig:
    """Settings of the `web` service: the SDK protocol's (`THREADLINE_SDK_TOKEN_SECRET`,
    `THREADLINE_WEB_PING_INTERVAL`, `_SOCKET_QUEUE`, `_REQUEST_TIMEOUT`), and the proxies whose
    `X-Forwarded-For` names the client (`THREADLINE_TRUSTED_PROXIES`)."""

    common: CommonConfig
    sdk: SdkSettings

    @property
    def trusted_proxies(self) -> tuple[Network, ...]:
        """The proxies whose X-Forwarded-For is believed (the SDK settings hold them)."""
        return self.sdk.trusted_proxies

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> WebConfig:
        """Build and validate from THREADLINE_* variables (`os.environ` when None)."""
        env = os.environ if environ is None else environ
        common = CommonConfig.from_env(DEFAULT_PORTS["web"], env)
        return cls(common=common, sdk=SdkSettings.from_env(common, "THREADLINE_WEB", env))
