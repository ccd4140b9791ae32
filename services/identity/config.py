"""Configuration of the identity service."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from shared.config import CommonConfig
from shared.db import DatabaseSettings
from shared.routes import DEFAULT_PORTS


@dataclass(frozen=True)
class IdentityConfig:
    common: CommonConfig
    # Where users, clients, devices and the merge log are kept (THREADLINE_DATABASE_URL, or a
    # SQLite file under the data directory).
    database: DatabaseSettings

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> IdentityConfig:
        common = CommonConfig.from_env(DEFAULT_PORTS["identity"], environ)
        return cls(common=common, database=DatabaseSettings.from_env(common.data_dir, "identity", environ))
