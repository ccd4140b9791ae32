"""Run a local PostgreSQL server (the binaries of the `pgserver` wheel, so pip installs it).

Used by the tests' fixtures and by `threadline up --cluster`. The server listens on loopback
only and requires a password (SCRAM); `url` carries it. PostgreSQL refuses to run as root: as
root the server runs as `nobody`, in a data directory that user owns.
"""

from __future__ import annotations

import contextlib
import glob
import importlib.util
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from urllib.parse import quote

from threadline.natsserver import free_port, wait_for_port

UNPRIVILEGED_USER = "nobody"
SUPERUSER = "threadline"
READY_TIMEOUT_SECONDS = 30.0


class LoginRefused(RuntimeError):
    """The server answers but refuses the password: its data directory was made with another."""


def find_postgres_bin() -> str:
    """The folder holding `postgres` and `initdb`: the pgserver wheel's, else a system install."""
    spec = importlib.util.find_spec("pgserver")
    candidates = []
    if spec is not None and spec.submodule_search_locations:
        candidates.append(os.path.join(next(iter(spec.submodule_search_locations)), "pginstall", "bin"))
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)
    on_path = shutil.which("postgres")
    if on_path is not None:
        candidates.append(os.path.dirname(on_path))
    for folder in candidates:
        if os.access(os.path.join(folder, "postgres"), os.X_OK) and os.access(os.path.join(folder, "initdb"), os.X_OK):
            return folder
    raise FileNotFoundError("PostgreSQL not found: install the project (pip install -e .) first, it brings pgserver")


@dataclass
class PostgresServer:
    """A PostgreSQL child process with its data under `base_dir` (created when None)."""

    base_dir: str | None = None
    port: int = 0
    host: str = "127.0.0.1"
    database: str = "threadline"
    password: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    extra_settings: dict[str, str] = field(default_factory=dict)
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return self.url_for(self.database)

    def url_for(self, database: str) -> str:
        """The URL of another database on this server."""
        return f"postgresql://{SUPERUSER}:{quote(self.password, safe='')}@{self.host}:{self.port}/{database}"

    @property
    def data_dir(self) -> str:
        assert self.base_dir is not None
        return os.path.join(self.base_dir, "data")

    def start(self) -> PostgresServer:
        """initdb (first time), start, wait until it answers, create `database`."""
        bin_dir = find_postgres_bin()
        as_root = os.geteuid() == 0
        if self.base_dir is None:
            # Under /tmp (world-traversable): an unprivileged server must reach its folder.
            self.base_dir = tempfile.mkdtemp(prefix="threadline-postgres-")
        os.makedirs(self.base_dir, mode=0o700, exist_ok=True)
        owner = pwd.getpwnam(UNPRIVILEGED_USER) if as_root else None
        if owner is not None:
            os.chown(self.base_dir, owner.pw_uid, owner.pw_gid)
        run_as = {"user": owner.pw_uid, "group": owner.pw_gid, "extra_groups": []} if owner is not None else {}
        fresh = not os.path.exists(os.path.join(self.data_dir, "PG_VERSION"))
        if fresh:
            password_file = os.path.join(self.base_dir, "initdb-password")
            with contextlib.suppress(FileNotFoundError):
                os.unlink(password_file)  # a leftover of an initdb that failed (not followed if a link)
            # Never through a link someone left there: the superuser's password goes in it.
            with open(os.open(password_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600), "w") as fh:
                fh.write(self.password)
            if owner is not None:
                os.chown(password_file, owner.pw_uid, owner.pw_gid)
            try:
                subprocess.run(
                    [os.path.join(bin_dir, "initdb"), "-D", self.data_dir, "-U", SUPERUSER, f"--pwfile={password_file}",
                     "-A", "scram-sha-256", "-E", "UTF8", "--no-sync", "--locale=C"],
                    check=True, capture_output=True, **run_as)  # type: ignore[call-overload]
            finally:
                os.unlink(password_file)
        if self.port == 0:
            self.port = free_port()
        # A fresh database's tables have no statistics, and a prepared statement planned then keeps
        # its generic plan until an ANALYZE: the inbound duplicate check scanned every message of
        # the app (an index on app_id alone looked as good as the unique one on an "empty" table)
        # for the first minute, the default pause between autovacuum's rounds. Rounds every few
        # seconds cost nothing measurable on a server this size.
        settings = {"listen_addresses": self.host, "port": str(self.port), "unix_socket_directories": self.base_dir,
                    "max_connections": "300", "autovacuum_naptime": "5s", **self.extra_settings}
        args = [os.path.join(bin_dir, "postgres"), "-D", self.data_dir]
        for name, value in settings.items():
            args += ["-c", f"{name}={value}"]
        log = open(os.open(os.path.join(self.base_dir, "postgres.log"),
                           os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o600), "ab")
        self.process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                        **run_as)  # type: ignore[call-overload]
        log.close()
        try:
            wait_for_port(self.host, self.port, READY_TIMEOUT_SECONDS)
            self._create_database(bin_dir)
        except Exception:
            self.stop()
            raise
        return self

    def _create_database(self, bin_dir: str) -> None:
        """createdb once the server accepts logins (it refuses them while starting up)."""
        env = {**os.environ, "PGPASSWORD": self.password}
        login = ["-h", self.host, "-p", str(self.port), "-U", SUPERUSER]
        deadline = time.monotonic() + READY_TIMEOUT_SECONDS
        while True:
            done = subprocess.run(
                [os.path.join(bin_dir, "psql"), *login, "-d", "postgres", "-tAc",
                 f"SELECT 1 FROM pg_database WHERE datname = '{self.database}'"],
                env=env, capture_output=True, text=True)
            if done.returncode == 0:
                break
            if "password authentication failed" in done.stderr:
                raise LoginRefused(f"PostgreSQL in {self.data_dir} refuses this password: its data was made with"
                                   f" another one ({done.stderr.strip()})")
            if time.monotonic() > deadline:
                raise TimeoutError(f"PostgreSQL did not accept logins: {done.stderr.strip()}")
            time.sleep(0.1)
        if done.stdout.strip() != "1":
            subprocess.run([os.path.join(bin_dir, "createdb"), *login, self.database], env=env, check=True,
                           capture_output=True)

    def stop(self, timeout: float = 15.0, how: signal.Signals = signal.SIGINT) -> None:
        """Stop the server: a "fast" shutdown by default (SIGINT, what pg_ctl stop -m fast
        sends), an "immediate" one with SIGQUIT; SIGKILL after `timeout`."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(how)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def kill(self) -> None:
        """SIGKILL the server (a crash)."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.process = None

    def remove(self) -> None:
        """Stop and delete the data directory. The shutdown is immediate: nothing of the data is
        kept, so a fast one's writing of every dirty page would be wasted."""
        self.stop(how=signal.SIGQUIT)
        if self.base_dir is not None:
            shutil.rmtree(self.base_dir, ignore_errors=True)
