"""Where `threadline up --cluster` keeps PostgreSQL's data as root (outside the private data dir):
a data dir made anew at the same path gets a database of its own instead of the old one, which
refuses its password; what earlier data dirs there left is removed; a server that refuses the
password says so at once."""

from __future__ import annotations

from pathlib import Path

import pytest

from threadline import cluster
from threadline.cluster import claim_postgres_dir, postgres_dir
from threadline.postgres import LoginRefused, PostgresServer


@pytest.fixture
def as_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    parent = tmp_path / "var-tmp"
    parent.mkdir()
    monkeypatch.setattr(cluster, "ROOTS_POSTGRES_PARENT", str(parent))
    monkeypatch.setattr(cluster.os, "geteuid", lambda: 0)
    return parent


def test_a_data_dir_made_anew_gets_a_database_of_its_own_and_the_old_one_goes(tmp_path: Path, as_root: Path) -> None:
    data_dir = str(tmp_path / "data")
    first = claim_postgres_dir(data_dir, "first-password")
    Path(first, "data").mkdir(parents=True)
    assert claim_postgres_dir(data_dir, "first-password") == first  # a restart finds its data
    assert Path(first, "data").is_dir()
    other = claim_postgres_dir(str(tmp_path / "elsewhere"), "first-password")
    Path(other).mkdir()

    second = claim_postgres_dir(data_dir, "second-password")  # secrets.json made anew

    assert second != first and second.startswith(str(as_root))
    assert not Path(first).exists()
    assert Path(other).is_dir()  # another data dir's database stays


def test_the_folder_named_before_the_password_tag_is_kept_as_this_data_dirs(tmp_path: Path, as_root: Path) -> None:
    data_dir = str(tmp_path / "data")
    legacy = Path(postgres_dir(data_dir, "pw").rsplit("-", 1)[0])
    (legacy / "data").mkdir(parents=True)

    folder = claim_postgres_dir(data_dir, "pw")

    assert Path(folder, "data").is_dir() and not legacy.exists()


def test_a_server_whose_data_was_made_with_another_password_refuses_at_once(tmp_path: Path) -> None:
    server = PostgresServer(password="the-first-one").start()
    assert server.base_dir is not None
    try:
        server.stop()
        again = PostgresServer(base_dir=server.base_dir, password="a-new-one")
        with pytest.raises(LoginRefused, match="refuses this password"):  # not a wait for a login
            again.start()
        assert again.process is None  # stopped
    finally:
        server.remove()
