"""Where `threadline up --cluster` keeps PostgreSQL's data as root (outside the private data dir,
for the unprivileged user the server runs as): a data dir made anew at the same path gets a
database of its own instead of the old one, which refuses its password; nothing another user
could have planted is used; a server that refuses the password says so at once."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from threadline import cluster
from threadline.cli import LaunchError
from threadline.cluster import claim_postgres_dir
from threadline.postgres import LoginRefused, PostgresServer


@pytest.fixture
def as_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    parent = tmp_path / "var-lib" / "threadline-postgres"
    parent.parent.mkdir()
    monkeypatch.setattr(cluster, "ROOTS_POSTGRES_PARENT", str(parent))
    monkeypatch.setattr(cluster.os, "geteuid", lambda: 0)
    return parent


def test_a_data_dir_made_anew_gets_a_database_of_its_own(tmp_path: Path, as_root: Path) -> None:
    data_dir = str(tmp_path / "data")
    first = claim_postgres_dir(data_dir, "first-password")
    Path(first, "data").mkdir()
    assert claim_postgres_dir(data_dir, "first-password") == first  # a restart finds its data
    assert Path(first, "data").is_dir()

    second = claim_postgres_dir(data_dir, "second-password")  # secrets.json made anew

    assert second != first and Path(second).is_dir() and not any(Path(second).iterdir())
    assert Path(first, "data").is_dir()  # kept: removed by hand, never by a start
    assert claim_postgres_dir(str(tmp_path / "elsewhere"), "second-password") not in (first, second)
    parent = os.lstat(as_root)
    assert parent.st_mode & 0o777 == 0o711 and parent.st_uid == os.getuid()


def test_a_parent_or_folder_someone_else_could_have_planted_is_refused(tmp_path: Path, as_root: Path) -> None:
    data_dir = str(tmp_path / "data")
    elsewhere = tmp_path / "someone-elses"
    elsewhere.mkdir()
    as_root.symlink_to(elsewhere)  # a link where the parent goes
    with pytest.raises(LaunchError, match="nobody else may write"):
        claim_postgres_dir(data_dir, "pw")
    as_root.unlink()
    as_root.mkdir(mode=0o777)
    os.chmod(as_root, 0o777)  # a folder anyone may write to
    with pytest.raises(LaunchError, match="nobody else may write"):
        claim_postgres_dir(data_dir, "pw")
    os.chmod(as_root, 0o711)
    folder = Path(cluster.postgres_dir(data_dir, "pw"))
    folder.symlink_to(elsewhere)  # a link where the folder goes
    with pytest.raises(LaunchError, match="not a folder"):
        claim_postgres_dir(data_dir, "pw")


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
