"""The e2e suite runs on PostgreSQL: every service's state in a fresh database of the session's
server, as a multi-replica deployment keeps it. `threadline up`'s embedded SQLite default is
exercised end to end by test_up and test_crash (they start the launcher), and the store and
service tests run on both engines."""

from __future__ import annotations

import pytest

from tests.harness import System


@pytest.fixture
def system(system_on_postgres: System) -> System:
    """An empty in-process System on PostgreSQL (tests start the services they need)."""
    return system_on_postgres
