"""An append-only JSON-lines journal: how the sandbox's channel fakes keep their phones' history.

Each change is one line appended to the file; at start the fake replays every line (skipping a
torn or hand-edited one) and the file is rewritten compacted from the fake's live state. Without
a path the journal is a no-op, so the fakes stay memory-only in unit tests.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterable
from typing import Any

log = logging.getLogger(__name__)


class Journal:
    """One fake's journal file (None: memory only)."""

    def __init__(self, path: str | None) -> None:
        self.path = path

    def replay(self, apply: Callable[[dict[str, Any]], None]) -> int:
        """Feed every readable record to `apply`; the number of lines in the file (0 when missing)."""
        if self.path is None:
            return 0
        try:
            with open(self.path, encoding="utf-8") as fh:
                lines = fh.readlines()
        except FileNotFoundError:
            return 0
        except OSError as exc:
            log.warning("cannot read %s: %s", self.path, exc)
            return 0
        for line in lines:
            try:
                record = json.loads(line)
                if isinstance(record, dict):
                    apply(record)
            except (ValueError, KeyError, TypeError, AttributeError):
                # A torn last line after a crash, or a hand edit: skip it, keep the rest.
                continue
        return len(lines)

    def compact(self, records: Iterable[dict[str, Any]], lines_before: int) -> None:
        """Rewrite the file as `records` when that is shorter than the `lines_before` it had."""
        if self.path is None:
            return
        live = list(records)
        if len(live) >= lines_before:
            return
        tmp = f"{self.path}.tmp"
        try:
            with open(tmp, "w", encoding="utf-8") as fh:
                fh.writelines(json.dumps(r, separators=(",", ":")) + "\n" for r in live)
            os.replace(tmp, self.path)
        except OSError as exc:
            log.warning("cannot compact %s: %s", self.path, exc)

    def append(self, record: dict[str, Any]) -> None:
        """Append one record (a failure is logged: the sandbox keeps working in memory)."""
        if self.path is None:
            return
        try:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(record, separators=(",", ":")) + "\n")
        except (OSError, TypeError, ValueError) as exc:
            log.warning("cannot append to %s: %s", self.path, exc)
