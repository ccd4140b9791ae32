"""Files only their owner can read: the data directory is 0700 and what is in it 0600.

Databases, their -wal/-shm files, secrets.json, sandbox.json, NATS configs and logs hold
secrets or personal data. Folders and files made before this existed are tightened when
touched. A folder Threadline does not own (a Kubernetes volume's root, mounted with fsGroup)
cannot be chmod'ed: that is logged, not fatal.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from typing import IO

log = logging.getLogger(__name__)

DIR_MODE = 0o700
FILE_MODE = 0o600


def _tighten(path: str, mode: int) -> None:
    try:
        if os.stat(path).st_mode & 0o777 != mode:
            os.chmod(path, mode)
    except PermissionError:
        log.warning("cannot restrict %s to %o (not its owner)", path, mode)


def private_dir(path: str) -> str:
    """Create `path` (and missing parents) as 0700, or restrict it to 0700; return it."""
    os.makedirs(path, mode=DIR_MODE, exist_ok=True)
    _tighten(path, DIR_MODE)
    return path


def ensure_private_file(path: str) -> str:
    """Create `path` empty as 0600 when missing, or restrict it to 0600; return it."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, FILE_MODE)
    os.close(fd)
    _tighten(path, FILE_MODE)
    return path


@contextlib.contextmanager
def private_file(path: str, mode: str = "wb") -> Iterator[IO[bytes]]:
    """Open `path` for writing ("wb", truncating, or "ab") as a 0600 file."""
    flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if mode == "ab" else os.O_TRUNC)
    fd = os.open(path, flags, FILE_MODE)
    _tighten(path, FILE_MODE)
    with os.fdopen(fd, mode) as fh:
        yield fh


def write_private(path: str, text: str) -> None:
    """Write `text` to `path` as a 0600 file (atomically: a reader never sees half of it)."""
    tmp = f"{path}.tmp"
    with private_file(tmp) as fh:
        fh.write(text.encode())
    os.replace(tmp, path)
