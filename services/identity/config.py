"""Configuration of the identity service."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from shared.config import CommonConfig
from shared.routes import DEFAULT_PORTS
from shared.store import db_path


@dataclass(frozen=True)
class IdentityConfig:
    common: CommonConfig
    db_path: str

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> IdentityConfig:
        common = CommonConfig.from_env(DEFAULT_PORTS["identity"], environ)
        return cls(common=common, db_path=db_path(common.data_dir, "identity"))
