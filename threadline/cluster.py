"""`threadline up --cluster`: the system as it runs on Kubernetes, on one machine.

A 3-node NATS JetStream cluster on loopback (routes between the nodes, one store per node,
streams and KV buckets with 3 replicas), a PostgreSQL server holding every service's state
(THREADLINE_DATABASE_URL, a schema per service), two replicas of every service behind a
round-robin balancer (what a Kubernetes Service does), and the usual front door routing
`shared.routes.ROUTES`. The replicas of a service split the partitions of its consumer groups
(`shared.partitions`) and share its database.

It exists to prove the deployment's failure story where it can be run: a NATS node (even the
one leading the streams) or a replica of any service can die and no acknowledged message is
lost or duplicated (`tests/cluster/`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import importlib.util
import itertools
import logging
import os
import secrets
import signal
import stat
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import nats.errors
import nats.js.errors
from aiohttp import web

from shared.bus import Bus
from shared.egress import ALLOW_ENV
from shared.files import ensure_private_file, private_dir, write_private
from shared.natsauth import ADMIN_USER
from shared.routes import DEFAULT_PORTS, ROUTES
from shared.subjects import INBOUND, PARTITIONS_VARIABLE, StreamSpec, partitions_for
from threadline.bootstrap import AccountKey, bootstrap_sandbox
from threadline.cli import (
    MAIL_SMTP_PORT_VARIABLE,
    SANDBOX_INTEGRATIONS,
    SMTP_PORT_VARIABLE,
    START_ORDER,
    Launcher,
    LaunchError,
    ServiceProcess,
    load_secrets,
    loopback_egress_allow,
    service_env,
)
from threadline.frontdoor import FrontdoorSite, build_frontdoor
from threadline.natsserver import NatsServer, cluster_node_config, credentials_url, free_port
from threadline.postgres import LoginRefused, PostgresServer

log = logging.getLogger(__name__)

# Where the cluster's PostgreSQL data goes when running as root (see `postgres_dir`).
ROOTS_POSTGRES_PARENT = "/var/lib/threadline-postgres"

CLUSTER_SIZE = 3
# Every service runs two replicas, as in deploy/k8s (the sandbox's fakes keep their state in memory: one).
REPLICAS = 2
SINGLE_REPLICA = frozenset({"sandbox"})


def service_available(name: str) -> bool:
    """True when `services.<name>` exists in this checkout (a service may be newer than the launcher)."""
    return importlib.util.find_spec(f"services.{name}") is not None


@dataclass
class NatsNode:
    """One node of the loopback cluster."""

    name: str
    server: NatsServer
    cluster_port: int
    monitor_port: int
    config_path: str

    @property
    def url(self) -> str:
        return self.server.url


@dataclass
class NatsCluster:
    """`size` nats-server processes routed to each other, JetStream on each.

    With `passwords`, every node requires the users of shared/natsauth.py; `url` then carries
    the admin's credentials (for the launcher's own checks and tests), `address` none.
    """

    data_dir: str
    size: int = CLUSTER_SIZE
    host: str = "127.0.0.1"
    nodes: list[NatsNode] = field(default_factory=list)
    passwords: Mapping[str, str] | None = None

    @property
    def address(self) -> str:
        """Every node's client URL, comma-separated (what THREADLINE_NATS_URL takes)."""
        return ",".join(node.server.address for node in self.nodes if node.server.process is not None)

    @property
    def url(self) -> str:
        """`address` with the admin's credentials (when the cluster has users)."""
        if self.passwords is None:
            return self.address
        return credentials_url(self.address, ADMIN_USER, self.passwords[ADMIN_USER])

    def start(self) -> NatsCluster:
        """Write each node's config and start them all (blocking until each accepts clients)."""
        client_ports = [free_port() for _ in range(self.size)]
        # Routes authenticate too: a local process cannot join the cluster as a node (one run's
        # nodes all start here, so a password per run will do).
        route_password = secrets.token_urlsafe(24) if self.passwords is not None else None
        cluster_ports = [free_port() for _ in range(self.size)]
        routes = [f"nats://{self.host}:{port}" for port in cluster_ports]
        # The nodes share this machine's cores: each Go runtime sized for all of them kept
        # threads spinning and handing work to each other (a quarter of nats-server's CPU per
        # message in cluster mode on 2 cores, measured with bench/e2e.py --cluster). A
        # GOMAXPROCS set by the operator wins.
        node_procs = max(1, len(os.sched_getaffinity(0)) // self.size)
        for i in range(self.size):
            name = f"nats-{i}"
            store = private_dir(os.path.join(self.data_dir, name))
            monitor_port = free_port()
            config_path = os.path.join(store, "nats.conf")
            write_private(config_path, cluster_node_config(
                server_name=name, host=self.host, client_port=client_ports[i], cluster_port=cluster_ports[i],
                routes=routes, monitor_port=monitor_port, passwords=self.passwords, route_password=route_password))
            server = NatsServer(store_dir=store, port=client_ports[i], host=self.host,
                                extra_args=["-c", config_path], log_path=os.path.join(store, "nats-server.log"),
                                env={"GOMAXPROCS": os.environ.get("GOMAXPROCS", str(node_procs))})
            self.nodes.append(NatsNode(name, server, cluster_ports[i], monitor_port, config_path))
        try:
            for node in self.nodes:
                node.server.start()
        except Exception:
            self.stop()
            raise
        return self

    def node(self, server_name: str) -> NatsNode:
        """The node called `server_name` (as JetStream names leaders)."""
        for node in self.nodes:
            if node.name == server_name:
                return node
        raise KeyError(server_name)

    def kill(self, server_name: str) -> None:
        """SIGKILL one node: no lame duck, no leadership hand-over (the hard case)."""
        process = self.node(server_name).server.process
        if process is not None:
            process.kill()
            process.wait()
            self.node(server_name).server.process = None

    def stop(self) -> None:
        """Stop every node still running."""
        for node in self.nodes:
            node.server.stop()

    async def astop(self) -> None:
        """`stop` without blocking the event loop."""
        await asyncio.to_thread(self.stop)


async def wait_for_jetstream(url: str, replicas: int, timeout: float = 30.0) -> None:
    """Block until the cluster has a meta leader and the streams exist with `replicas` replicas."""
    deadline = time.monotonic() + timeout
    bus = await Bus.connect(url, "threadline-cluster")
    try:
        while True:
            try:
                await bus.ensure_streams(replicas)
                return
            except (TimeoutError, nats.errors.Error, nats.js.errors.Error) as exc:
                if time.monotonic() > deadline:
                    raise LaunchError(f"JetStream cluster not ready after {timeout}s: {exc}") from exc
                await asyncio.sleep(0.25)
    finally:
        await bus.close()


async def stream_leader(bus: Bus, stream: StreamSpec = INBOUND) -> str | None:
    """The server name of the node leading `stream` (None while an election runs)."""
    info = await bus.js.stream_info(stream.name)
    return info.cluster.leader if info.cluster is not None else None


class RoundRobinBalancer:
    """A TCP balancer over a service's replicas, as a Kubernetes Service is.

    Each new connection goes to the next replica; a replica that refuses the connection is
    skipped (its endpoint would have been removed), so a dead replica costs in-flight requests
    only, which the caller retries as a platform does.
    """

    def __init__(self, backends: list[tuple[str, int]], host: str = "127.0.0.1") -> None:
        self.backends = backends
        self.host = host
        self.port = 0
        self._next = itertools.cycle(range(len(backends)))
        self._server: asyncio.Server | None = None
        self._pipes: set[asyncio.Task[None]] = set()

    async def start(self) -> RoundRobinBalancer:
        self._server = await asyncio.start_server(self._accept, self.host, 0)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        for _ in range(len(self.backends)):
            host, port = self.backends[next(self._next)]
            with contextlib.suppress(OSError):
                return await asyncio.open_connection(host, port)
        return None

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream = await self._connect()
        if upstream is None:
            writer.close()
            return
        up_reader, up_writer = upstream
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))

    @staticmethod
    async def _pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        try:
            while data := await src.read(65536):
                dst.write(data)
                await dst.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            with contextlib.suppress(OSError, RuntimeError):
                dst.close()

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)
            self._server = None


@dataclass
class ReplicaProcess(ServiceProcess):
    """One replica of a service (`name` is `<service>-<n>`, the module is `services.<service>`)."""

    service: str = ""

    async def start(self) -> None:
        log_file = open(ensure_private_file(self.log_path), "ab")
        self.process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", f"services.{self.service}", env=self.env, stdout=log_file,
            stderr=asyncio.subprocess.STDOUT,
        )
        log_file.close()
        self.started_at = time.monotonic()


@dataclass
class ClusterLauncher(Launcher):
    """`Launcher` with a 3-node NATS cluster, PostgreSQL and two replicas of every service."""

    cluster_size: int = CLUSTER_SIZE
    # Services to run (default: every one in START_ORDER present in this checkout).
    only: tuple[str, ...] | None = None
    # Replicas per service where not REPLICAS.
    replicas: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SINGLE_REPLICA, 1))
    cluster: NatsCluster | None = None
    postgres: PostgresServer | None = None
    balancers: dict[str, RoundRobinBalancer] = field(default_factory=dict)

    @property
    def service_names(self) -> tuple[str, ...]:
        wanted = START_ORDER if self.only is None else tuple(n for n in START_ORDER if n in self.only)
        return tuple(name for name in wanted if service_available(name))

    def replica_count(self, service: str) -> int:
        """How many replicas of `service` run."""
        return self.replicas.get(service, REPLICAS)

    def replicas_of(self, service: str) -> list[ReplicaProcess]:
        """The running replicas of one service, in start order."""
        return [p for p in self.services.values() if isinstance(p, ReplicaProcess) and p.service == service]

    async def _start(self) -> dict[str, Any]:
        """Start the NATS cluster, every replica, the balancers and the front door; bootstrap the sandbox."""
        private_dir(self.data_dir)
        private_dir(os.path.join(self.data_dir, "logs"))
        if self.port == 0:
            self.port = free_port()
        keys = load_secrets(self.data_dir)
        self.cluster = NatsCluster(os.path.join(self.data_dir, "nats-cluster"), size=self.cluster_size,
                                   passwords=keys["natsPasswords"])
        await asyncio.to_thread(self.cluster.start)
        stream_replicas = 3 if self.cluster_size >= 3 else 1
        await wait_for_jetstream(self.cluster.url, stream_replicas)
        self.say(f"nats-server cluster ({self.cluster_size} nodes, JetStream R{stream_replicas}) "
                 f"on {self.cluster.address}")
        self.postgres = PostgresServer(base_dir=await asyncio.to_thread(claim_postgres_dir, self.data_dir,
                                                                        keys["postgresPassword"]),
                                       password=keys["postgresPassword"])
        try:
            await asyncio.to_thread(self.postgres.start)
        except LoginRefused as exc:
            raise LaunchError(f"{exc}: remove {self.postgres.base_dir}, or restore the secrets.json it was"
                              " made with") from exc
        self.say(f"PostgreSQL on {self.postgres.host}:{self.postgres.port} (data in {self.postgres.data_dir})")
        replica_ports = {name: [free_port() for _ in range(self.replica_count(name))] for name in self.service_names}
        nats_ports = [p for n in self.cluster.nodes for p in (n.server.port, n.cluster_port, n.monitor_port)]
        mail_port = self.mail_smtp_port()
        own_ports = [self.port, self.postgres.port, mail_port, *nats_ports,
                     *(p for ports in replica_ports.values() for p in ports)]
        base_env = {
            # As many partitions as the most replicated service has replicas: each partition is a
            # consumer of its own, and in a cluster a Raft group on every NATS node (README,
            # "Replicas and partitions"). An explicit setting wins.
            PARTITIONS_VARIABLE: str(partitions_for(max(map(self.replica_count, self.service_names), default=1))),
            **os.environ,
            "THREADLINE_NATS_URL": self.cluster.address,
            "THREADLINE_STREAM_REPLICAS": str(stream_replicas),
            "THREADLINE_DATABASE_URL": self.postgres.url,
            "THREADLINE_DATA_DIR": os.path.abspath(self.data_dir),
            "THREADLINE_SANDBOX": "1",
            "THREADLINE_HTTP_HOST": "127.0.0.1",
            "THREADLINE_PUBLIC_BASE_URL": self.base_url,
            "THREADLINE_ACCOUNT_KEY_ID": keys["accountKeyId"],
            "THREADLINE_ACCOUNT_KEY_SECRET": keys["accountKeySecret"],
            "THREADLINE_SDK_TOKEN_SECRET": keys["sdkTokenSecret"],
            ALLOW_ENV: loopback_egress_allow(own_ports, os.environ.get(ALLOW_ENV, "")),
            SMTP_PORT_VARIABLE: str(self.sandbox_smtp_port()),
            MAIL_SMTP_PORT_VARIABLE: str(mail_port),
            "PYTHONUNBUFFERED": "1",
            **self.extra_env,
        }
        upstreams: dict[str, str] = {}
        for name in self.service_names:
            count = self.replica_count(name)
            ports = []
            for index in range(count):
                port = replica_ports[name][index]
                replica = f"{name}-{index}"
                proc = ReplicaProcess(name=replica, port=port, env=service_env(base_env, name, keys, port, replica),
                                      log_path=os.path.join(self.data_dir, "logs", f"{replica}.log"), service=name)
                self.services[replica] = proc
                await proc.start()
                ports.append(port)
            if count == 1:
                upstreams[name] = f"http://127.0.0.1:{ports[0]}"
            else:
                balancer = await RoundRobinBalancer([("127.0.0.1", p) for p in ports]).start()
                self.balancers[name] = balancer
                upstreams[name] = balancer.url
        await self._wait_ready()
        self._frontdoor = web.AppRunner(build_frontdoor(upstreams), access_log=None)
        await self._frontdoor.setup()
        await FrontdoorSite(self._frontdoor, self.host, self.port).start()
        self.account = AccountKey(keys["accountKeyId"], keys["accountKeySecret"])
        kinds = tuple(k for k in SANDBOX_INTEGRATIONS
                      if ("sms" if k == "twilio" else k) in self.service_names)
        return await bootstrap_sandbox(self.base_url, self.account, self.data_dir, kinds,
                                       desk=self.sandbox_desk and "desk" in self.service_names)

    async def shutdown(self, *, discard_database: bool = False) -> None:
        """Stop the front door, every replica (reverse start order), the balancers, PostgreSQL
        (its data removed with `discard_database`: a test's or a benchmark's, which nothing will
        start again; as root it lives outside the data dir, which would not take it along), then
        NATS."""
        self._stopping = True
        if self._frontdoor is not None:
            await self._frontdoor.cleanup()
            self._frontdoor = None
        await asyncio.gather(*(proc.stop() for proc in reversed(list(self.services.values()))))
        for balancer in self.balancers.values():
            await balancer.stop()
        if self.postgres is not None:
            await asyncio.to_thread(self.postgres.remove if discard_database else self.postgres.stop)
        if self.cluster is not None:
            await self.cluster.astop()


def postgres_dir(data_dir: str, password: str) -> str:
    """Where the cluster's PostgreSQL keeps its data: beside the rest, unless running as root —
    the server then runs as an unprivileged user, who cannot enter the private (0700, root's)
    data directory, so it gets a folder of its own in ROOTS_POSTGRES_PARENT (root's, which
    others may only traverse), named after the data dir and its database password: a data dir
    made anew at the same path (new secrets) gets a new database."""
    if os.geteuid() != 0:
        return os.path.join(os.path.abspath(data_dir), "postgres")
    path_tag = hashlib.sha256(os.path.abspath(data_dir).encode()).hexdigest()[:12]
    password_tag = hashlib.sha256(password.encode()).hexdigest()[:8]
    return os.path.join(ROOTS_POSTGRES_PARENT, f"{path_tag}-{password_tag}")


def claim_postgres_dir(data_dir: str, password: str) -> str:
    """`postgres_dir`, made safe to use as root: its parent is created root's, 0711 (nobody
    else can put anything there, so no name in it can be planted: a symlink, a folder holding
    one), and refused — LaunchError — when something else is there; the folder itself must be
    a folder, not a link. What earlier data dirs at the same path left there stays (their
    passwords went with them; remove them by hand)."""
    folder = postgres_dir(data_dir, password)
    if os.geteuid() != 0:
        return folder
    parent = os.path.dirname(folder)
    with contextlib.suppress(FileExistsError):
        os.mkdir(parent, 0o711)
    facts = os.lstat(parent)
    if (not stat.S_ISDIR(facts.st_mode) or facts.st_uid != os.getuid() or facts.st_mode & 0o022):
        raise LaunchError(f"{parent} must be a folder of this user's that nobody else may write to:"
                          " remove it (or what it is) and start again")
    try:
        os.mkdir(folder, 0o700)
    except FileExistsError:
        if not stat.S_ISDIR(os.lstat(folder).st_mode):
            raise LaunchError(f"{folder} is not a folder: remove it and start again") from None
    return folder


async def run_cluster(data_dir: str, host: str, port: int) -> int:
    """`threadline up --cluster`: start everything, serve until Ctrl-C, stop everything."""
    launcher = ClusterLauncher(data_dir=data_dir, host=host, port=port, nats_port=0, auto_ports=True)
    return await launcher.run()


def kubernetes_upstreams(environ: dict[str, str] | None = None) -> dict[str, str]:
    """Upstreams of an in-cluster front door: each routed service's Kubernetes Service.

    `THREADLINE_UPSTREAM_<SERVICE>` overrides one (e.g. another namespace).
    """
    env = os.environ if environ is None else environ
    names = sorted({route.service for route in ROUTES})
    return {name: env.get(f"THREADLINE_UPSTREAM_{name.upper()}", f"http://{name}:{DEFAULT_PORTS[name]}")
            for name in names}


async def serve_frontdoor(host: str, port: int, bootstrap: bool) -> None:
    """The dev overlay's front door (beside the sandbox, sharing its data dir): route, then bootstrap.

    Runs until SIGTERM. With `bootstrap`, creates the sandbox app and integrations through the
    business API once it answers (as `threadline up` does), writing `<data dir>/sandbox.json`.
    """
    runner = web.AppRunner(build_frontdoor(kubernetes_upstreams()), access_log=None)
    await runner.setup()
    await FrontdoorSite(runner, host, port).start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        if bootstrap:
            base_url = os.environ.get("THREADLINE_PUBLIC_BASE_URL", f"http://127.0.0.1:{port}").rstrip("/")
            account = AccountKey(os.environ["THREADLINE_ACCOUNT_KEY_ID"], os.environ["THREADLINE_ACCOUNT_KEY_SECRET"])
            data_dir = os.environ.get("THREADLINE_DATA_DIR", "/data")
            while not stop.is_set():
                try:
                    await bootstrap_sandbox(base_url, account, data_dir, SANDBOX_INTEGRATIONS)
                    log.warning("sandbox bootstrapped: %s/sandbox/", base_url)
                    break
                except Exception as exc:  # the API is not up yet: try again, as a Job would
                    log.warning("sandbox bootstrap not possible yet: %s", exc)
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), 3)
        await stop.wait()
    finally:
        await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    """`python -m threadline.cluster frontdoor [--bootstrap]` (used by deploy/k8s/overlays/dev)."""
    parser = argparse.ArgumentParser(prog="python -m threadline.cluster")
    sub = parser.add_subparsers(dest="command", required=True)
    front = sub.add_parser("frontdoor", help="route ROUTES to the Kubernetes Services (dev overlay)")
    front.add_argument("--host", default="0.0.0.0")
    front.add_argument("--port", type=int, default=8080)
    front.add_argument("--bootstrap", action="store_true", help="create the sandbox app and integrations")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    asyncio.run(serve_frontdoor(args.host, args.port, args.bootstrap))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
