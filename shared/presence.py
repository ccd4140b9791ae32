"""Socket presence in `subjects.SDK_PRESENCE_BUCKET`: the SDK replicas' side (`PresenceBoard`,
which writes) and the readers' side (`PresenceIndex`, which answers "is this customer connected
to this conversation right now?" in constant time). The entries are described in
`shared.messages.sdk_presence`.

Presence is advisory: a write that fails is logged and retried, never fatal, and never delays
a socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

import nats.errors
import nats.js.errors
from nats.js.kv import KeyValue

from shared import subjects
from shared.ids import now
from shared.messages.sdk_presence import (
    ENCODER,
    PresenceEntry,
    ReplicaAlive,
    SocketPresence,
    replica_key,
    socket_key,
)
from shared.tasks import cancel_and_wait

log = logging.getLogger(__name__)

# Writes in flight at once; beyond that they wait their turn (a connect wave is not slowed).
WRITE_WINDOW = 64
RETRY_SECONDS = 1.0
# Deleting this replica's entries on stop may take this long; a crash leaves them to the heartbeat.
STOP_SECONDS = 5.0
# A bucket just created with several replicas answers "no responders" until its leader is
# elected; the first heartbeat waits this long for it before the replica refuses to start.
START_SECONDS = 30.0
BUS_ERRORS = (TimeoutError, nats.errors.Error, nats.js.errors.Error)


class PresenceBoard:
    """One SDK replica's open sockets: written as they open, deleted as they close, and a
    heartbeat that keeps them all alive at the cost of one write every few seconds.

    `open` and `close` only note the change; one writer task sends the changes (a socket that
    opens and closes before its entry was written costs nothing).
    """

    def __init__(self, bucket: Callable[[], Awaitable[KeyValue]], replica_id: str,
                 clock: Callable[[], float] = now) -> None:
        self.bucket = bucket
        self.replica_id = replica_id
        self.clock = clock
        self.written: dict[str, tuple[SocketPresence, float]] = {}  # key → entry, when written
        self._open: dict[str, SocketPresence] = {}  # every open socket of this replica
        self._changed: dict[str, SocketPresence | None] = {}  # key → entry to write, None: delete
        self._in_flight: set[str] = set()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def open(self, socket_id: str, entry: SocketPresence) -> None:
        """Announce an open socket."""
        key = socket_key(self.replica_id, socket_id)
        self._open[key] = entry
        self._changed[key] = entry
        self._wake.set()

    def close(self, socket_id: str) -> None:
        """Withdraw a socket that closed."""
        key = socket_key(self.replica_id, socket_id)
        self._open.pop(key, None)
        if key in self.written or key in self._in_flight:
            self._changed[key] = None  # after the write in flight, in order
            self._wake.set()
        else:
            self._changed.pop(key, None)

    @property
    def open_sockets(self) -> int:
        """How many sockets this replica holds."""
        return len(self._open)

    async def start(self) -> None:
        """Write the heartbeat, then keep writing changes and heartbeats in the background."""
        deadline = self.clock() + START_SECONDS
        while True:
            try:
                await self._beat()
                break
            except (*BUS_ERRORS, ValueError) as exc:
                if self.clock() >= deadline:
                    raise
                log.info("presence bucket not writable yet (retrying): %r", exc)
                await asyncio.sleep(RETRY_SECONDS / 4)
        self._task = asyncio.create_task(self._run(), name=f"presence:{self.replica_id}")

    async def stop(self) -> None:
        """Stop writing; delete the heartbeat (every socket of this replica stops counting at
        once), then this replica's socket entries, within STOP_SECONDS."""
        await cancel_and_wait([self._task])
        self._task = None
        try:
            kv = await self.bucket()
            await kv.delete(replica_key(self.replica_id))
            async with asyncio.timeout(STOP_SECONDS):
                keys = list(self.written)
                for start in range(0, len(keys), WRITE_WINDOW):
                    await asyncio.gather(*(kv.delete(key) for key in keys[start:start + WRITE_WINDOW]))
            self.written.clear()
        except (*BUS_ERRORS, ValueError) as exc:
            log.warning("could not withdraw presence on stop (it dies with the heartbeat): %s", exc)

    async def _run(self) -> None:
        next_beat = self.clock() + subjects.SDK_REPLICA_BEAT_SECONDS
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(next_beat - self.clock(), 0.0)):
                    await self._wake.wait()
            self._wake.clear()
            try:
                if self.clock() >= next_beat:
                    await self._beat()
                    next_beat = self.clock() + subjects.SDK_REPLICA_BEAT_SECONDS
                    self._refresh_old()
                await self._flush()
            except (*BUS_ERRORS, ValueError) as exc:
                log.warning("could not write socket presence (retrying): %s", exc)
                await asyncio.sleep(RETRY_SECONDS)
                self._wake.set()

    async def _beat(self) -> None:
        kv = await self.bucket()
        await kv.put(replica_key(self.replica_id),
                     ENCODER.encode(ReplicaAlive(replica_id=self.replica_id, updated_at=self.clock())))

    def _refresh_old(self) -> None:
        # Entries of live sockets are rewritten long before the bucket's TTL would remove them.
        cutoff = self.clock() - subjects.SDK_PRESENCE_REFRESH_SECONDS
        for key, (entry, written_at) in self.written.items():
            if written_at < cutoff and key in self._open and key not in self._changed:
                self._changed[key] = entry

    async def _flush(self) -> None:
        kv = await self.bucket()
        while self._changed:
            batch = []
            for key in list(self._changed)[:WRITE_WINDOW]:
                batch.append((key, self._changed.pop(key)))
                self._in_flight.add(key)
            try:
                results = await asyncio.gather(*(self._write(kv, key, entry) for key, entry in batch),
                                               return_exceptions=True)
            finally:
                self._in_flight.clear()
            for (key, entry), result in zip(batch, results, strict=True):
                if isinstance(result, BaseException):
                    self._changed.setdefault(key, entry)  # unless a newer change came meanwhile
                    if not isinstance(result, (*BUS_ERRORS, ValueError)):
                        raise result
            failed = next((r for r in results if isinstance(r, BaseException)), None)
            if failed is not None:
                raise failed

    async def _write(self, kv: KeyValue, key: str, entry: SocketPresence | None) -> None:
        if entry is None:
            await kv.delete(key)
            self.written.pop(key, None)
            return
        written_at = self.clock()
        await kv.put(key, ENCODER.encode(entry))
        self.written[key] = (entry, written_at)


class PresenceIndex:
    """The presence bucket's entries by (user, conversation), fed by a KV mirror's listener."""

    def __init__(self, clock: Callable[[], float] = now) -> None:
        self.clock = clock
        self.sockets: dict[str, SocketPresence] = {}
        self.by_conversation: dict[tuple[str, str], set[str]] = {}
        self.replicas: dict[str, float] = {}  # replica id → heartbeat time

    def apply(self, key: str, entry: PresenceEntry | None) -> None:
        """Take one change of the bucket (None: the key was deleted)."""
        previous = self.sockets.pop(key, None)
        if previous is not None:
            pair = (previous.user_id, previous.conversation_id)
            keys = self.by_conversation.get(pair)
            if keys is not None:
                keys.discard(key)
                if not keys:
                    del self.by_conversation[pair]
        if isinstance(entry, SocketPresence):
            self.sockets[key] = entry
            self.by_conversation.setdefault((entry.user_id, entry.conversation_id), set()).add(key)
        elif isinstance(entry, ReplicaAlive):
            self.replicas[entry.replica_id] = entry.updated_at
        elif key.startswith("replica."):
            self.replicas.pop(key.removeprefix("replica."), None)

    def connected(self, user_id: str, conversation_id: str) -> bool:
        """Whether `user_id` has a socket open on `conversation_id` on a live replica."""
        keys = self.by_conversation.get((user_id, conversation_id))
        if not keys:
            return False
        cutoff = self.clock() - subjects.SDK_REPLICA_DEAD_SECONDS
        return any(self.replicas.get(self.sockets[key].replica_id, 0.0) >= cutoff for key in keys)
