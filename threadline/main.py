"""`threadline up`: the whole system on one machine — embedded NATS, every service, front door,
sandbox; `threadline up --cluster`: the same on a 3-node NATS cluster with replicated services."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os

import uvloop

from shared.service import settle_garbage_collector
from threadline.cli import Launcher
from threadline.cluster import run_cluster


def main(argv: list[str] | None = None) -> int:
    """The `threadline` command."""
    parser = argparse.ArgumentParser(prog="threadline", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="run the whole system locally (embedded NATS, SQLite, sandbox channels)")
    up.add_argument("--data-dir", default=os.environ.get("THREADLINE_DATA_DIR", ".threadline"),
                    help="where SQLite databases, JetStream files, logs and sandbox.json live (default .threadline)")
    up.add_argument("--host", default=os.environ.get("THREADLINE_HOST", "127.0.0.1"),
                    help="front door bind address (default 127.0.0.1)")
    up.add_argument("--port", type=int, default=int(os.environ.get("THREADLINE_PORT", "8080")),
                    help="front door port (default 8080)")
    up.add_argument("--nats-port", type=int, default=int(os.environ.get("THREADLINE_NATS_PORT", "4222")),
                    help="embedded nats-server port (default 4222; a free one if taken)")
    up.add_argument("--auto-ports", action="store_true",
                    help="give services and the sandbox SMTP sink free ports instead of 8081-8092 and 2525 "
                         "(to run beside another instance)")
    up.add_argument("--cluster", action="store_true",
                    help="3-node NATS JetStream cluster, two replicas of each stateless service")
    args = parser.parse_args(argv)
    # Whatever this run creates (databases, logs, JetStream files of the child nats-server) is
    # its owner's only.
    os.umask(0o077)
    if args.command == "up" and args.cluster:
        with contextlib.suppress(KeyboardInterrupt):
            return asyncio.run(run_cluster(args.data_dir, args.host, args.port))
        return 130
    if args.command == "up":
        launcher = Launcher(data_dir=args.data_dir, host=args.host, port=args.port, nats_port=args.nats_port,
                            auto_ports=args.auto_ports)
        # The front door proxies every public request in this process: uvloop, and the
        # services' collector settings.
        settle_garbage_collector()
        try:
            return uvloop.run(launcher.run())
        except KeyboardInterrupt:
            return 130
    return 2
