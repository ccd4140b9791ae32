"""NATS and JetStream plumbing shared by every service.

- `Bus.publish` awaits the JetStream ack (so a caller knows the message is durable), sets
  `Nats-Msg-Id` for de-duplication and carries the trace context in headers.
- `Bus.consume` runs this replica's share of a consumer group (`shared.partitions`): a durable
  pull consumer per partition it holds, batches, explicit acks, per-key ordering with
  concurrency across keys, delayed redelivery for transient failures, and a span per message;
  each group's pending messages and redeliveries go to `shared.metrics`.
- `Bus.serve` exposes request/reply endpoints as a `nats.micro` service; `Bus.request` calls them.
- `KvMirror` keeps an in-memory copy of a KV bucket fresh by watching it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import io
import logging
import ssl
import time
import uuid
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import msgspec
import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext, api
from nats.js.kv import KeyValue
from nats.micro import add_service
from nats.micro.request import Request as MicroRequest
from nats.micro.service import EndpointConfig, Service, ServiceVerb, control_subject
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from shared import metrics
from shared.ids import iso
from shared.messages import type_of
from shared.natsauth import inbox_prefix
from shared.partitions import PartitionHook, PartitionLeases
from shared.subjects import (
    ALL_STREAMS,
    PARTITION_LEASE_SECONDS,
    PARTITION_MEMBERS_BUCKET,
    PARTITION_OWNERS_BUCKET,
    PARTITIONS,
    ConsumerSpec,
    StreamSpec,
)
from shared.tasks import cancel_and_wait
from shared.telemetry import extract_context, inject_headers, tracer

log = logging.getLogger(__name__)
_T = TypeVar("_T")
_tracer = tracer(__name__)

MSG_ID_HEADER = "Nats-Msg-Id"
PUBLISH_TIMEOUT_SECONDS = 10.0
# JetStream's API (no domain), for the requests nats-py has no call for, and the timeout of every
# JetStream API request.
JS_API_PREFIX = "$JS.API"
JS_API_TIMEOUT_SECONDS = 10.0
HANDLING_GRACE_SECONDS = 5.0
# How long `Bus.close` waits for its cancelled background tasks to end before it reports the
# ones still running (with where each is stuck) and goes on closing the connection.
STOP_TASKS_SECONDS = 5.0
# How long creating streams and buckets keeps trying while JetStream is busy or electing leaders
# (a cluster starting, every replica of every service asking at once): a service that gave up
# at the first timeout would exit and wait for a restart.
SETUP_RETRY_SECONDS = 30.0
SETUP_RETRY_PAUSE_SECONDS = 0.5
# How long an idle pull request waits for a message: a long poll, so that the dozens of idle
# partition consumers of a deployment cost the servers a request every few seconds each. A
# consumer told to stop ends its wait at once.
PULL_WAIT_SECONDS = 5.0
# How long a consumer waits before its next pull request after a batch that did not fill: the
# messages that arrive meanwhile come as one batch (one request and end status, one group commit,
# one write of the acks) instead of one or two each. At 500 msg/s offered it cut the CPU per
# message by 9–15 % (`bench/e2e.py --rate 500`), latency within the runs' spread; a full batch (a
# backlog) is followed by the next request at once, and an idle consumer's long poll still gets a
# message the moment it arrives.
PULL_PAUSE_SECONDS = 0.003
# The most stored messages `erase_published` walks (one request each) looking for what it erases.
ERASE_SCAN_MAX_STEPS = 20_000
# How much earlier than the caller's time `erase_published` starts its walk: the stream stamps a
# message with nats-server's clock when it stores it, the caller's time is its own clock's.
ERASE_CLOCK_MARGIN_SECONDS = 300.0
# How long past its redelivery delay a handed-back message holds its key's later messages back
# at most (it may never come back: erased by retention, its partition taken by another replica).
HOLD_GRACE_SECONDS = 60.0
# A message of a type this version does not know (`FromNewerVersion`): how often it is tried
# again, and for how long after it was stored — a rolling upgrade replaces the replica well
# within it; one rolled back never will.
NEWER_VERSION_RETRY_SECONDS = 10.0
NEWER_VERSION_PATIENCE_SECONDS = 15 * 60.0
# Where a partition's holder leaves the keys it holds for the next holder (in the owners bucket,
# beside the owner entries: `holds.<durable>`), and how long it tries to while NATS is away.
HOLDS_KEY_PREFIX = "holds."
HOLDS_HANDOVER_SECONDS = 30.0
# Where a durable being recreated at its ack floor starts, kept there until it exists again.
RESUME_KEY_PREFIX = "resume."
# How often the holder of a group's partition 0 looks again at the durables of partitions beyond
# today's count (`Bus._drain_leftovers`).
LEFTOVER_RECHECK_SECONDS = 60.0
# How long a KV mirror waits, past the watcher's end-of-initial-values marker, for the bucket's
# last revision before it starts with what it has (`KvMirror.start`).
KV_MIRROR_CATCH_UP_SECONDS = 2.0


class Retry(Exception):
    """Raise from a consumer handler to have the message redelivered after `delay` seconds.

    The later messages of its ordering key wait for it (they would overtake it), unless
    `let_pass`: the message is early (a status before the send it is about), and what comes
    after it is what it waits for.
    """

    def __init__(self, delay: float, reason: str = "", *, let_pass: bool = False) -> None:
        super().__init__(reason or f"retry in {delay}s")
        self.delay = delay
        self.let_pass = let_pass


class Poison(Exception):
    """Raise from a consumer handler when a message can never be processed (it is terminated)."""


class FromNewerVersion(Retry):
    """Raise from a consumer handler for a message of a type this version does not know: a newer
    replica published it during a rolling upgrade, and a newer replica of this service will
    handle it once it holds the partition. Until then it comes back every
    NEWER_VERSION_RETRY_SECONDS, its key's later messages waiting behind it. One stored longer
    than NEWER_VERSION_PATIENCE_SECONDS ago is terminated instead (an upgrade rolled back: no
    replica will ever know it, and its key must not wait for ever)."""

    def __init__(self, reason: str) -> None:
        super().__init__(NEWER_VERSION_RETRY_SECONDS, reason)


def refusal(data: bytes, error: Exception, known: Collection[str], what: str) -> FromNewerVersion | Poison:
    """What a handler raises for a stream message that failed to decode (`error`): FromNewerVersion
    when it is a well-formed message of a type not in `known` (its family's types), else Poison."""
    from_newer = type_of(data)
    if from_newer is not None and from_newer not in known:
        return FromNewerVersion(f"{what} of a type this version does not know ({from_newer})")
    return Poison(f"undecodable {what}: {error}")


Handler = Callable[[bytes, Mapping[str, str], "Delivery"], Awaitable[None]]
# The keys a consumer holds back: key → (stream seq, delay, monotonic deadline) of the message
# handed back that the key's later messages wait for.
Held = dict[str, tuple[int, float, float]]
_HOLDS_ENCODER = msgspec.json.Encoder()
# As left for the next holder: the deadline as seconds remaining.
_HOLDS_DECODER = msgspec.json.Decoder(dict[str, tuple[int, float, float]])
RequestHandler = Callable[[bytes, Mapping[str, str]], Awaitable[bytes]]


class Delivery:
    """Facts about one JetStream delivery handed to a consumer handler."""

    __slots__ = ("num_delivered", "published_at", "stream_sequence", "subject")

    def __init__(self, subject: str, num_delivered: int, stream_sequence: int, published_at: float = 0.0) -> None:
        self.subject = subject
        self.num_delivered = num_delivered
        self.stream_sequence = stream_sequence
        self.published_at = published_at  # when the stream stored it (Unix seconds, server clock); 0 unknown

    def __repr__(self) -> str:
        return f"Delivery({self.subject!r}, delivered={self.num_delivered}, seq={self.stream_sequence})"

    @classmethod
    def of(cls, msg: Msg) -> Delivery:
        """The delivery facts of a consumed message, read from its ack subject.

        `$JS.ACK.<stream>.<consumer>.<delivered>.<stream seq>.<consumer seq>.<time>.<pending>`, or
        with `<domain>.<account hash>` after `ACK` and a random token at the end. nats-py's
        `msg.metadata` parses the same into datetimes and dataclasses, a visible share of a
        consumer's CPU; anything else falls back to it.
        """
        tokens = (msg.reply or "").split(".")
        if (len(tokens) == 9 or len(tokens) >= 11) and tokens[0] == "$JS" and tokens[1] == "ACK":
            first = 4 if len(tokens) == 9 else 6
            delivered, sequence, stamp = tokens[first], tokens[first + 1], tokens[first + 3]
            if delivered.isdecimal() and sequence.isdecimal() and stamp.isdecimal():
                return cls(msg.subject, int(delivered) or 1, int(sequence), int(stamp) / 1e9)
        meta = msg.metadata
        return cls(msg.subject, meta.num_delivered or 1, meta.sequence.stream if meta.sequence else 0,
                   meta.timestamp.timestamp() if meta.timestamp else 0.0)


async def _retry_setup(setup: Callable[[], Awaitable[_T]]) -> _T:
    """Run an idempotent JetStream setup call again while the server answers 'busy' or not at all."""
    deadline = time.monotonic() + SETUP_RETRY_SECONDS
    while True:
        try:
            return await setup()
        except (nats.errors.TimeoutError, nats.js.errors.ServiceUnavailableError) as exc:
            if time.monotonic() > deadline:
                raise
            log.warning("JetStream setup not answered yet (%s), trying again", type(exc).__name__)
            await asyncio.sleep(SETUP_RETRY_PAUSE_SECONDS)


@dataclass
class Bus:
    """A connection to NATS with JetStream."""

    nc: NatsClient
    js: JetStreamContext
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)
    _services: list[Service] = field(default_factory=list)
    _pullers: list[PullBatches] = field(default_factory=list)
    _handling: set[asyncio.Task[Any]] = field(default_factory=set)  # consumers handling a batch
    _stopping: asyncio.Event = field(default_factory=asyncio.Event)
    _leases: list[PartitionLeases] = field(default_factory=list)
    # This process among the replicas of its service (partition leases are held under it).
    replica: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    # Replicas of the streams `ensure_streams` was asked for; KV buckets created later get the
    # same (a bucket made by whichever service starts first must survive a node loss too).
    stream_replicas: int = 1
    _publisher: JetStreamPublisher = field(init=False)

    def __post_init__(self) -> None:
        self._publisher = JetStreamPublisher(self.nc, timeout=PUBLISH_TIMEOUT_SECONDS)

    @classmethod
    async def connect(cls, url: str, name: str, *, user: str | None = None, password: str | None = None,
                      tls_ca_file: str | None = None, replica: str | None = None) -> Bus:
        """Connect (retrying while the server starts) and return a Bus.

        `user`/`password`: this service's NATS credentials (shared/natsauth.py); its replies then
        arrive under its own inbox prefix, the only `_INBOX` subjects it may subscribe to.
        `tls_ca_file`: verify `tls://` servers against this CA bundle. `replica`: this process's
        id among its service's replicas, unique and ideally stable across restarts (default: random).
        """

        async def on_error(exc: Exception) -> None:
            text = str(exc).lower()
            if "permissions violation" in text:
                # A subject missing from shared/natsauth.py: loud, or the caller only sees a timeout.
                log.error("nats refused: %s (user %s; see shared/natsauth.py)", exc, user)
            elif "authorization violation" in text:
                # Retried like an unreachable server, so say why the service never becomes ready.
                log.error("nats refused the credentials of user %s (THREADLINE_NATS_USER/_PASSWORD)", user)
            else:
                log.warning("nats error: %s", exc)

        # "nats://a:4222,nats://b:4222" lists several seeds (a cluster); nats-py wants a list.
        servers: str | list[str] = [u.strip() for u in url.split(",") if u.strip()] if "," in url else url
        options: dict[str, Any] = {}
        if user is not None:
            options.update(user=user, password=password, inbox_prefix=inbox_prefix(user))
        if tls_ca_file:
            options["tls"] = ssl.create_default_context(cafile=tls_ca_file)
        nc = await nats.connect(
            servers, name=name, max_reconnect_attempts=-1, reconnect_time_wait=0.5,
            connect_timeout=5, allow_reconnect=True, error_cb=on_error, drain_timeout=5, **options,
        )
        bus = cls(nc=nc, js=nc.jetstream(timeout=JS_API_TIMEOUT_SECONDS))
        if replica:
            bus.replica = replica
        return bus

    async def ensure_streams(self, replicas: int = 1, streams: tuple[StreamSpec, ...] = ALL_STREAMS) -> None:
        """Create (or update) the streams Threadline uses. Safe to call from every service.

        `replicas` (1, 3 or 5) is also the default for KV buckets this bus creates afterwards.
        """
        self.stream_replicas = replicas
        await _retry_setup(lambda: self._add_streams(replicas, streams))

    async def _add_streams(self, replicas: int, streams: tuple[StreamSpec, ...]) -> None:
        for spec in streams:
            config = api.StreamConfig(
                name=spec.name,
                subjects=list(spec.subjects),
                retention=api.RetentionPolicy.LIMITS,
                storage=api.StorageType.FILE,
                max_age=spec.max_age_seconds,
                duplicate_window=spec.duplicate_window_seconds,
                num_replicas=replicas,
            )
            try:
                await self.js.add_stream(config)
            except nats.js.errors.BadRequestError:
                await self.js.update_stream(config)

    async def pause(self, seconds: float, reason: str) -> None:
        """Wait `seconds` in a consumer handler (a platform's rate limit), unless this bus starts
        to stop meanwhile: then raise `Retry` with no delay, so the message goes back to the
        stream at once, ahead of its key's later messages, rather than hold the stop for up to
        HANDLING_GRACE_SECONDS. Only for a wait before the handler did anything it would repeat
        when the message comes again."""
        if not self._stopping.is_set():
            stopping = asyncio.ensure_future(self._stopping.wait())
            try:
                await asyncio.wait([stopping], timeout=seconds)
            finally:
                stopping.cancel()
            if not self._stopping.is_set():
                return
        raise Retry(0.0, f"stopping: {reason}")

    async def publish(self, subject: str, data: bytes, *, msg_id: str | None = None,
                      headers: Mapping[str, str] | None = None) -> api.PubAck:
        """Publish to JetStream and wait for the ack: on return the message is durable."""
        with _tracer.start_as_current_span(f"publish {subject.split('.')[0]}", kind=SpanKind.PRODUCER) as span:
            span.set_attribute("messaging.destination.name", subject)
            hdrs = inject_headers(dict(headers or {}))
            if msg_id is not None:
                hdrs[MSG_ID_HEADER] = msg_id
                span.set_attribute("messaging.message.id", msg_id)
            ack = await self._publisher.publish(subject, data, hdrs)
            if ack.duplicate:
                span.set_attribute("threadline.duplicate", True)
            return ack

    async def publish_together(self, messages: Sequence[tuple[str, bytes, str | None]]
                               ) -> list[api.PubAck | BaseException]:
        """Publish (subject, data, msg_id) messages back to back on this connection, then wait for
        every ack: the stream stores them in this order with nothing this process publishes in
        between. Each message's ack, or the exception its publish ended with."""
        with _tracer.start_as_current_span(f"publish {messages[0][0].split('.')[0]}", kind=SpanKind.PRODUCER) as span:
            span.set_attribute("messaging.destination.name", messages[0][0])
            span.set_attribute("messaging.batch.message_count", len(messages))
            base = inject_headers({})
            return await self._publisher.publish_together(
                [(subject, data, base if msg_id is None else {**base, MSG_ID_HEADER: msg_id})
                 for subject, data, msg_id in messages])

    async def request(self, subject: str, data: bytes, *, timeout: float = 5.0) -> bytes:
        """Send a request to a `nats.micro` endpoint and return the reply body."""
        with _tracer.start_as_current_span(f"request {subject}", kind=SpanKind.CLIENT):
            msg = await self.nc.request(subject, data, timeout=timeout, headers=inject_headers())
            if msg.headers and msg.headers.get("Nats-Service-Error-Code"):
                raise RequestFailed(int(msg.headers["Nats-Service-Error-Code"]),
                                    msg.headers.get("Nats-Service-Error", "service error"))
            return msg.data

    async def serve(self, name: str, endpoints: Mapping[str, RequestHandler], *, version: str = "0.1.0") -> Service:
        """Expose request/reply endpoints (subject → handler) as a `nats.micro` service.

        Returns once the endpoints answer: nats-py's flush() writes its PING ahead of
        subscriptions still in the send buffer, so it proves nothing; a request to the service's
        own PING subject is queued behind them, so its answer means they are registered.
        """
        service = await add_service(self.nc, name=name, version=version)
        for subject, handler in endpoints.items():
            await service.add_endpoint(EndpointConfig(
                name=subject.replace(".", "-"), subject=subject, handler=_micro_handler(subject, handler),
            ))
        self._services.append(service)
        await self.nc.request(control_subject(ServiceVerb.PING, name=name, id=service.id), b"", timeout=5)
        return service

    async def consume(self, spec: ConsumerSpec, handler: Handler, *, batch: int = 100,
                      ordering_key: Callable[[str, bytes], str] | None = None, ack_wait: float = 30.0,
                      max_ack_pending: int = 2000, on_acquire: PartitionHook | None = None,
                      on_release: PartitionHook | None = None, pause: float = PULL_PAUSE_SECONDS,
                      ) -> PartitionLeases:
        """Consume this replica's share of a consumer group until `close()`.

        The group's partitions are split among its live replicas (`shared.partitions`); for each
        partition it holds, this replica runs the partition's durable consumer (`consume_durable`).
        `on_acquire(n)` runs before partition n is consumed here, `on_release(n)` after it no
        longer is (the batch in hand finished). The holder of partition 0 also drains the group's
        durables an earlier deployment left — the one from before partitioning (then removed),
        those of partitions beyond today's count (kept, drained) — and looks again every
        LEFTOVER_RECHECK_SECONDS. (A key's messages still queued in a leftover are handled
        beside its new ones: change the count with the queues drained when per-key order
        matters to them.) `pause`: the wait before the next pull request after a batch that did
        not fill (PULL_PAUSE_SECONDS); a group whose handling nobody waits on may take longer
        ones, and bigger batches.
        """
        stops: dict[int, asyncio.Event] = {}
        loops: dict[int, asyncio.Task[None]] = {}
        key = ordering_key or (lambda subject, _data: subject)

        async def acquire(partition: int, took_over: bool) -> None:
            if on_acquire is not None:
                await on_acquire(partition)
            stop = stops[partition] = asyncio.Event()
            durable = spec.durable(partition)
            loops[partition] = self._spawn(
                self._consume_loop(spec.stream, durable, spec.filter(partition), handler, batch, key, ack_wait,
                                   max_ack_pending, stop, legacy=spec if partition == 0 else None,
                                   took_over=took_over, bucket=owners, pause=pause),
                name=f"consume:{durable}")

        async def release(partition: int) -> None:
            stop, loop = stops.pop(partition, None), loops.pop(partition, None)
            if stop is not None:
                stop.set()
            if loop is not None:
                # Not `await loop`: its own end (an error, a cancellation) is not ours to raise,
                # and a cancellation of this release (close() past its grace) must stop it.
                await asyncio.wait([loop])
            if on_release is not None:
                await on_release(partition)

        members = await self.key_value(PARTITION_MEMBERS_BUCKET, ttl=PARTITION_LEASE_SECONDS)
        owners = await self.key_value(PARTITION_OWNERS_BUCKET)
        leases = PartitionLeases(members, owners, spec.group, self.replica, PARTITIONS, PARTITION_LEASE_SECONDS,
                                 acquire, release)
        self._leases.append(leases)
        await leases.start()
        self._spawn(self._count_pending(spec, loops), name=f"pending:{spec.group}")
        return leases

    async def _count_pending(self, spec: ConsumerSpec, held: Mapping[int, object]) -> None:
        """Keep `shared.metrics.PENDING` current for this replica's share of a group: what its
        partitions' durables hold undelivered or unacknowledged, read every
        `PENDING_REFRESH_SECONDS` (a gauge's callback cannot await a request). A durable not
        created yet counts 0; a read that fails leaves the last count in place."""
        owner = object()
        try:
            while True:
                total = 0
                try:
                    for partition in list(held):
                        with contextlib.suppress(nats.js.errors.NotFoundError):  # being created
                            info = await self.js.consumer_info(spec.stream.name, spec.durable(partition))
                            total += (info.num_pending or 0) + (info.num_ack_pending or 0)
                except (TimeoutError, nats.errors.Error, nats.js.errors.Error) as exc:
                    log.debug("pending of %s not read: %s", spec.group, exc)
                else:
                    metrics.PENDING.set(owner, spec.group, total)
                await asyncio.sleep(metrics.PENDING_REFRESH_SECONDS)
        finally:
            metrics.PENDING.drop(owner)

    def consume_durable(self, stream: StreamSpec, durable: str, filter_subject: str, handler: Handler, *,
                        batch: int = 100, ordering_key: Callable[[str, bytes], str] | None = None,
                        ack_wait: float = 30.0, max_ack_pending: int = 2000) -> None:
        """Run one durable pull consumer in the background until `close()`.

        Messages in a fetched batch that share an ordering key (default: the subject) are
        handled one after another; different keys are handled concurrently. A handler that
        returns acks the message; `Retry` naks it with a delay; `Poison` (or an undecodable
        message) terminates it; any other exception naks it with a short delay.
        """
        key = ordering_key or (lambda subject, _data: subject)
        self._spawn(self._consume_loop(stream, durable, filter_subject, handler, batch, key, ack_wait,
                                       max_ack_pending, asyncio.Event()), name=f"consume:{durable}")

    def _spawn(self, coro: Awaitable[None], name: str) -> asyncio.Task[None]:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        task.set_name(name)
        self._tasks.append(task)
        task.add_done_callback(lambda done: self._tasks.remove(done) if done in self._tasks else None)
        return task

    async def _consume_loop(self, stream: StreamSpec, durable: str, filter_subject: str, handler: Handler,
                            batch: int, key: Callable[[str, bytes], str], ack_wait: float,
                            max_ack_pending: int, stop: asyncio.Event, legacy: ConsumerSpec | None = None,
                            took_over: bool = False, bucket: KeyValue | None = None,
                            pause: float = PULL_PAUSE_SECONDS) -> None:
        config = api.ConsumerConfig(
            durable_name=durable, ack_policy=api.AckPolicy.EXPLICIT, ack_wait=ack_wait,
            max_ack_pending=max_ack_pending, filter_subject=filter_subject,
            deliver_policy=api.DeliverPolicy.ALL,
        )
        puller = await self._start_puller(stream, durable, config, batch, stop, create=True, took_over=took_over,
                                          bucket=bucket)
        if puller is None:
            return
        # The keys the partition's previous holder left held (`_leave_holds`): none after a
        # takeover, whose consumer starts again at its ack floor, in stream order.
        held = {} if bucket is None else await self._take_holds(bucket, durable, ignore=took_over)
        drain: asyncio.Task[None] | None = None
        if legacy is not None:
            leftovers = [dataclasses.replace(config, durable_name=name, filter_subject=subjects_filter)
                         for name, subjects_filter in legacy.leftovers]
            drain = self._spawn(self._drain_leftovers(stream, leftovers, handler, batch, key, stop,
                                                      removed=legacy.group),
                                name=f"drain:{legacy.group}")
        try:
            await self._pull_and_handle(puller, durable, handler, key, stop, held, pause=pause)
        finally:
            with contextlib.suppress(Exception):
                await puller.stop()
            if puller in self._pullers:
                self._pullers.remove(puller)
            if bucket is not None:
                await self._leave_holds(bucket, durable, held)
            if drain is not None:
                # The partition is released only once its drain stopped too (it sees `stop`
                # and finishes the batch in hand): the next holder drains the same durables,
                # and two replicas pulling one would mix a key's messages.
                await asyncio.wait([drain])

    async def _add_durable(self, stream: StreamSpec, durable: str, config: api.ConsumerConfig,
                           bucket: KeyValue | None) -> None:
        """Create the durable; then it no longer needs the start kept for it (`_resumed`)."""
        await self.js.add_consumer(stream.name, config)
        if bucket is not None and config.deliver_policy == api.DeliverPolicy.BY_START_SEQUENCE:
            with contextlib.suppress(TimeoutError, nats.errors.Error, nats.js.errors.Error):
                await bucket.delete(f"{RESUME_KEY_PREFIX}{durable}")

    async def _resumed(self, bucket: KeyValue, durable: str, config: api.ConsumerConfig) -> api.ConsumerConfig:
        """The config of a missing durable: from the start kept for it when a holder was
        recreating it at its ack floor and stopped between the delete and the add, else from
        the stream's first message (a new durable)."""
        try:
            entry = await bucket.get(f"{RESUME_KEY_PREFIX}{durable}")
        except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
            return config
        start = (entry.value or b"").decode()
        if not start.isdecimal():
            return config
        log.warning("consumer %s: created again from stream sequence %s, where a holder was recreating it",
                    durable, start)
        return dataclasses.replace(config, deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=int(start))

    async def _take_holds(self, bucket: KeyValue, durable: str, *, ignore: bool) -> Held:
        """The keys the durable's previous holder left held (`_leave_holds`), removed from the
        bucket: a key's later messages go on waiting for its message handed back, which the
        server redelivers only after its delay, to whoever pulls then. Nothing (the entry only
        removed) when `ignore`."""
        entry_key = f"{HOLDS_KEY_PREFIX}{durable}"
        try:
            entry = await bucket.get(entry_key)
        except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
            return {}
        except (TimeoutError, nats.errors.Error, nats.js.errors.Error) as exc:
            log.warning("consumer %s: the keys its previous holder held not read: %s", durable, exc)
            return {}
        with contextlib.suppress(TimeoutError, nats.errors.Error, nats.js.errors.Error):
            await bucket.delete(entry_key, last=entry.revision)
        if ignore or not entry.value:
            return {}
        try:
            left = _HOLDS_DECODER.decode(entry.value)
        except (msgspec.DecodeError, msgspec.ValidationError):
            return {}
        now = time.monotonic()
        held = {key: (sequence, delay, now + remaining) for key, (sequence, delay, remaining) in left.items()
                if remaining > 0}
        if held:
            log.info("consumer %s: %d keys held by its previous holder wait for their messages handed back",
                     durable, len(held))
        return held

    async def _leave_holds(self, bucket: KeyValue, durable: str, held: Held) -> None:
        """Leave the keys this holder still holds for the durable's next holder (`_take_holds`):
        their messages handed back come again after their delay, and the key's later messages
        must not overtake them there. Tried again while NATS is away (the partition is given
        back only after this returns), for a bounded time."""
        now = time.monotonic()
        left = {key: (sequence, delay, until - now) for key, (sequence, delay, until) in held.items() if until > now}
        if not left:
            return
        data = _HOLDS_ENCODER.encode(left)
        deadline = now + HOLDS_HANDOVER_SECONDS
        while True:
            try:
                await bucket.put(f"{HOLDS_KEY_PREFIX}{durable}", data)
                return
            except (TimeoutError, nats.errors.Error, nats.js.errors.Error) as exc:
                if time.monotonic() > deadline or self.nc.is_closed:
                    log.warning("consumer %s: %d held keys not handed on (%s): their later messages may overtake"
                                " the ones handed back", durable, len(left), exc)
                    return
                await asyncio.sleep(0.5)

    async def _start_puller(self, stream: StreamSpec, durable: str, config: api.ConsumerConfig, batch: int,
                            stop: asyncio.Event, *, create: bool, took_over: bool = False,
                            bucket: KeyValue | None = None) -> PullBatches | None:
        """The durable's puller (created when missing, unless `create` is false: then None when
        there is no such durable).

        `took_over`: this replica has just taken the durable's partition from an owner that did
        not give it back (it died, or this replica restarted under its id). Messages still
        awaiting an ack were handed to it: the server would redeliver them only after `ack_wait`,
        behind the messages that came later. The durable is recreated at its ack floor instead, so
        the partition goes on at once and in stream order; the messages acked beyond the floor
        come again, which the handlers' idempotence absorbs. (A partition given back cleanly is
        not recreated: its holder finished its batch, handed the rest back, and left the keys it
        held for the next holder, `_leave_holds`.) `bucket` (the partition owners') keeps where
        a durable being recreated starts, until it is.
        """
        while not (self._stopping.is_set() or stop.is_set()):
            try:
                try:
                    info = await self.js.consumer_info(stream.name, durable)
                    if took_over and info.num_ack_pending:
                        floor = info.ack_floor.stream_seq if info.ack_floor else 0
                        log.warning("consumer %s: %d messages of a dead holder, resuming at the ack floor (%d)",
                                    durable, info.num_ack_pending, floor)
                        # From here on the floor's config (a retry after the delete must not
                        # recreate the durable from the stream's start).
                        config = dataclasses.replace(config, deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE,
                                                     opt_start_seq=(floor or 0) + 1)
                        took_over = False
                        if bucket is not None:
                            # Stopped (or dead) between the delete and the add, this replica
                            # leaves the next holder to create the durable from the floor, not
                            # from the stream's start.
                            await bucket.put(f"{RESUME_KEY_PREFIX}{durable}", str(config.opt_start_seq).encode())
                        await self.js.delete_consumer(stream.name, durable)
                        await self._add_durable(stream, durable, config, bucket)
                    elif info.config.filter_subject != config.filter_subject:
                        # An update of the same durable: where it delivers from stays as it is
                        # (the server refuses to change it; one recreated at its floor starts there).
                        await self.js.add_consumer(stream.name, dataclasses.replace(
                            config, deliver_policy=info.config.deliver_policy, opt_start_seq=info.config.opt_start_seq))
                except nats.js.errors.NotFoundError:
                    if not create:
                        return None
                    if bucket is not None:
                        config = await self._resumed(bucket, durable, config)
                    await self._add_durable(stream, durable, config, bucket)
                puller = await PullBatches.start(self.nc, stream.name, durable, batch, wait=PULL_WAIT_SECONDS)
                self._pullers.append(puller)
                return puller
            except (TimeoutError, nats.errors.Error, nats.js.errors.Error) as exc:
                log.warning("consumer %s not ready yet: %s", durable, exc)
                await asyncio.sleep(0.5)
        return None

    async def _drain_leftovers(self, stream: StreamSpec, configs: list[api.ConsumerConfig], handler: Handler,
                               batch: int, key: Callable[[str, bytes], str], stop: asyncio.Event,
                               removed: str) -> None:
        """Drain, one after another, the durables an earlier deployment may have left (most do
        not exist: one request each tells), and again every LEFTOVER_RECHECK_SECONDS while this
        replica holds partition 0: during a change of the count, replicas still on the old one
        may publish to (and consume) the old partitions for a while.

        Only `removed` (the pre-partitioning durable, which nothing creates any more) is
        deleted once empty. A partition's durable stays, drained, where it is: deleted, it
        would be created again by a later raise of the count with DeliverPolicy.ALL, and replay
        every message still retained on its subjects."""
        while not (self._stopping.is_set() or stop.is_set()):
            for config in configs:
                if self._stopping.is_set() or stop.is_set():
                    return
                await self._drain_legacy(stream, config, handler, batch, key, stop,
                                         remove=config.durable_name == removed)
            waits = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(self._stopping.wait())]
            try:
                await asyncio.wait(waits, timeout=LEFTOVER_RECHECK_SECONDS, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for wait in waits:
                    wait.cancel()

    async def _drain_legacy(self, stream: StreamSpec, config: api.ConsumerConfig, handler: Handler, batch: int,
                            key: Callable[[str, bytes], str], stop: asyncio.Event, *, remove: bool) -> None:
        """Handle what a leftover durable (the group's pre-partitioning one, or a partition's
        beyond today's count) still holds; delete it then if `remove`."""
        durable = config.durable_name or ""
        try:
            info = await self.js.consumer_info(stream.name, durable)
        except nats.js.errors.NotFoundError:
            return
        except (TimeoutError, nats.errors.Error, nats.js.errors.Error) as exc:
            log.warning("leftover consumer %s not read: %s", durable, exc)
            return
        drained = not info.num_pending and not info.num_ack_pending
        if not drained:
            puller = await self._start_puller(stream, durable, config, batch, stop, create=False)
            if puller is None:
                return
            log.info("draining consumer %s (left by an earlier partitioning)", durable)
            try:
                drained = await self._pull_and_handle(puller, durable, handler, key, stop, until_empty=True)
            finally:
                with contextlib.suppress(Exception):
                    await puller.stop()
                if puller in self._pullers:
                    self._pullers.remove(puller)
        if drained and remove:
            with contextlib.suppress(nats.errors.Error, nats.js.errors.Error, TimeoutError):
                await self.js.delete_consumer(stream.name, durable)
                log.info("consumer %s drained and removed", durable)

    async def _pull_and_handle(self, puller: PullBatches, durable: str, handler: Handler,
                               key: Callable[[str, bytes], str], stop: asyncio.Event, held: Held | None = None, *,
                               until_empty: bool = False, pause: float = PULL_PAUSE_SECONDS) -> bool:
        """Fetch and handle batches until stopped (or, `until_empty`, until the consumer has
        nothing pending or unacknowledged: then True). `held`: the keys held back (filled in
        place, for the caller to hand on)."""
        this_task = asyncio.current_task()
        assert this_task is not None
        # Stopping ends a pull request's wait at once (not after its expiry); a batch in hand finishes.
        waker = asyncio.create_task(_wake_on(stop, self._stopping, puller))
        try:
            return await self._pull_loop(puller, durable, handler, key, stop, this_task, until_empty, pause,
                                         {} if held is None else held)
        finally:
            waker.cancel()

    async def _pull_loop(self, puller: PullBatches, durable: str, handler: Handler, key: Callable[[str, bytes], str],
                         stop: asyncio.Event, this_task: asyncio.Task[Any], until_empty: bool,
                         pause: float, held: Held) -> bool:
        while not (self._stopping.is_set() or stop.is_set()):
            try:
                msgs = await puller.next_batch()
            except (nats.errors.ConnectionClosedError, nats.errors.DrainTimeoutError):
                return False
            except nats.errors.Error as exc:
                log.warning("fetch failed on %s: %s", durable, exc)
                await asyncio.sleep(0.5)
                continue
            if not msgs:
                if until_empty and await self._drained(puller.stream, durable):
                    return True
                continue
            groups: dict[str, list[Msg]] = {}
            for msg in msgs:
                groups.setdefault(key(msg.subject, msg.data), []).append(msg)
            self._handling.add(this_task)
            try:
                await asyncio.gather(*(self._handle_group(durable, group_key, group, handler, held)
                                       for group_key, group in groups.items()))
            finally:
                self._handling.discard(this_task)
            # A drain that took the last messages ends now, not after the next pull's wait.
            if until_empty and await self._drained(puller.stream, durable):
                return True
            if len(msgs) < puller.batch and pause > 0:
                await asyncio.sleep(pause)
        return False

    async def _drained(self, stream: str, durable: str) -> bool:
        """Whether the durable holds nothing undelivered or unacknowledged (False when unknown)."""
        with contextlib.suppress(nats.errors.Error, nats.js.errors.Error, TimeoutError):
            info = await self.js.consumer_info(stream, durable)
            return not info.num_pending and not info.num_ack_pending
        return False

    async def _handle_group(self, durable: str, group_key: str, group: list[Msg], handler: Handler,
                            held: Held) -> None:
        """One key's messages in stream order. A message handed back for later (`Retry`, a
        failure) holds back every later message of its key until it is handled: handled now,
        they would overtake it (a customer's second message stored before the first)."""
        sequenced = [(Delivery.of(msg).stream_sequence, msg) for msg in group]
        if len(sequenced) > 1:
            sequenced.sort(key=lambda item: item[0])
        for sequence, msg in sequenced:
            first = held.get(group_key)
            if first is not None and time.monotonic() > first[2]:
                # Its message never came back (erased by retention, or taken by another replica):
                # the key is not held forever.
                del held[group_key]
                first = None
            if first is not None and sequence > first[0]:
                with contextlib.suppress(nats.errors.Error):
                    await msg.nak(delay=first[1])
                continue
            delay = await self._handle_one(durable, msg, handler)
            if delay is None:
                if first is not None and sequence == first[0]:
                    del held[group_key]
            else:
                until = time.monotonic() + delay + HOLD_GRACE_SECONDS
                # The held message handed back again keeps the key held until its new delay is over.
                held[group_key] = (sequence, delay, until) if first is None or sequence <= first[0] else first

    async def _handle_one(self, durable: str, msg: Msg, handler: Handler) -> float | None:
        """Handle one message and ack it; the delay it was handed back with (nak), if it was."""
        headers: Mapping[str, str] = msg.headers or {}
        delivery = Delivery.of(msg)
        if delivery.num_delivered > 1:
            metrics.redelivered(durable)
        handed_back: float | None = None
        try:
            with _tracer.start_as_current_span(f"process {durable}", context=extract_context(headers),
                                               kind=SpanKind.CONSUMER) as span:
                span.set_attribute("messaging.destination.name", msg.subject)
                span.set_attribute("messaging.consumer.group.name", durable)
                span.set_attribute("messaging.message.delivery_count", delivery.num_delivered)
                try:
                    await handler(msg.data, headers, delivery)
                except FromNewerVersion as exc:
                    span.set_status(Status(StatusCode.ERROR, str(exc)))
                    age = time.time() - delivery.published_at
                    if delivery.published_at and age > NEWER_VERSION_PATIENCE_SECONDS:
                        log.error("terminating message on %s, still unknown %.0f s after it was stored: %s",
                                  msg.subject, age, exc)
                        await msg.term()
                        return None
                    log.warning("%s on %s: waiting for a newer replica", exc, msg.subject)
                    handed_back = exc.delay
                    await msg.nak(delay=exc.delay)
                    return handed_back
                except Retry as exc:
                    span.set_status(Status(StatusCode.ERROR, str(exc)))
                    handed_back = None if exc.let_pass else exc.delay
                    await msg.nak(delay=exc.delay)
                    return handed_back
                except Poison as exc:
                    span.set_status(Status(StatusCode.ERROR, str(exc)))
                    log.error("terminating message on %s: %s", msg.subject, exc)
                    await msg.term()
                    return None
                except Exception as exc:  # a bug or an outage: keep the message, try again soon
                    span.record_exception(exc)
                    span.set_status(Status(StatusCode.ERROR, str(exc)))
                    log.exception("handler failed on %s (delivery %d)", msg.subject, delivery.num_delivered)
                    handed_back = min(30.0, 0.5 * delivery.num_delivered)
                    await msg.nak(delay=handed_back)
                    return handed_back
                await msg.ack()
        except nats.errors.Error as exc:
            # A failed nak still leaves the message to come back (after ack_wait): hold its key.
            log.warning("ack/nak failed on %s: %s", msg.subject, exc)
            return handed_back
        return None

    # --- erasure: copies of personal data the streams would otherwise keep until max_age ----

    async def delete_message(self, stream: StreamSpec, seq: int) -> None:
        """Erase one stored message (the server overwrites it); a missing one is not an error."""
        if seq <= 0:
            return
        with contextlib.suppress(nats.js.errors.NotFoundError):
            await self.js.delete_msg(stream.name, seq)

    async def purge_subject(self, stream: StreamSpec, subject: str, before_seq: int | None = None, *,
                            consumed_only: bool = False) -> None:
        """Remove the messages stored on `subject` (only those below `before_seq` when given).

        `consumed_only`: only those every durable consumer that wants them has acknowledged.
        Each stored subject `subject` matches is purged up to the lowest ack floor among the
        consumers whose filters match it (as `purge_consumed` does per filter; a consumer of
        other subjects, whose floor says nothing of these, holds nothing back). A message a
        consumer has yet to read stays, for the stream's max age or a later purge."""
        if not consumed_only:
            await self._purge_below(stream, subject, before_seq)
            return
        stored = (await self.js.stream_info(stream.name, subjects_filter=subject)).state.subjects or {}
        if not stored:
            return
        consumers = await self.js.consumers_info(stream.name)
        for concrete in stored:
            floor = _lowest_ack_floor(consumers, concrete)
            bound = before_seq
            if floor is not None:
                bound = floor + 1 if bound is None else min(bound, floor + 1)
            await self._purge_below(stream, concrete, bound)

    async def erase_published(self, stream: StreamSpec, subject: str, msg_ids: Collection[str],
                              before_seq: int, since: float | None = None) -> int:
        """Erase the stored messages on `subject` (a filter) below `before_seq` whose Nats-Msg-Id is
        one of `msg_ids`, each once every durable consumer whose filter matches it has
        acknowledged it (one still unread stays: its consumer reads the erasure's announcement
        after it). Walks the subject's messages one request each, so it is for the rare erasure of
        one message: from those stored around `since` (Unix seconds, when the messages were
        published, less ERASE_CLOCK_MARGIN_SECONDS for the servers' clocks) when given, else from
        the oldest; it gives up (logged) after ERASE_SCAN_MAX_STEPS of them. Returns how many
        were erased."""
        wanted = set(msg_ids)
        if since is None:
            return await self._erase_walk(stream, subject, wanted, 1, before_seq)
        start = await self._first_stored_since(stream, subject, since - ERASE_CLOCK_MARGIN_SECONDS)
        erased = 0 if start is None else await self._erase_walk(stream, subject, wanted, start, before_seq)
        if wanted:
            # Not among those stored since: erased already, aged out, or stored before then by
            # a server whose clock is further behind than the margin. The older ones are looked
            # through too, rather than leave a copy behind.
            earlier = before_seq if start is None else min(start, before_seq)
            log.info("erasing %s from %s: not found from %s on, looking before sequence %d", sorted(wanted),
                     subject, iso(since - ERASE_CLOCK_MARGIN_SECONDS), earlier)
            erased += await self._erase_walk(stream, subject, wanted, 1, earlier)
        return erased

    async def _erase_walk(self, stream: StreamSpec, subject: str, wanted: set[str], seq: int,
                          before_seq: int) -> int:
        """`erase_published`'s walk from `seq` to below `before_seq`; found ids leave `wanted`."""
        consumers: list[api.ConsumerInfo] | None = None
        erased = 0
        for _step in range(ERASE_SCAN_MAX_STEPS):
            if not wanted or seq >= before_seq:
                break
            try:
                found = await self.js.get_msg(stream.name, seq=seq, subject=subject, next=True)
            except nats.js.errors.NotFoundError:
                break
            if found.seq is None or found.seq >= before_seq:
                break
            msg_id = (found.headers or {}).get(MSG_ID_HEADER)
            if msg_id in wanted:
                wanted.discard(msg_id)
                if consumers is None:
                    consumers = await self.js.consumers_info(stream.name)
                floor = _lowest_ack_floor(consumers, found.subject or subject)
                if floor is None or floor >= found.seq:
                    await self.delete_message(stream, found.seq)
                    erased += 1
            seq = found.seq + 1
        else:
            log.warning("erasing %s from %s: gave up after %d stored messages, at sequence %d",
                        sorted(wanted), subject, ERASE_SCAN_MAX_STEPS, seq)
        return erased

    async def _first_stored_since(self, stream: StreamSpec, subject: str, since: float) -> int | None:
        """The sequence of the first message on `subject` (a filter) the stream stored at or after
        `since` (Unix seconds), None when there is none: one lookup by time (nats-py's `get_msg`
        has no time parameter, the server's message-get request does)."""
        # `start_time` needs nats-server 2.11 or later (pyproject.toml, deploy/k8s).
        request = msgspec.json.encode({"start_time": iso(since), "next_by_subj": subject})
        reply = await self.nc.request(f"{JS_API_PREFIX}.STREAM.MSG.GET.{stream.name}", request,
                                      timeout=JS_API_TIMEOUT_SECONDS)
        found = msgspec.json.decode(reply.data, type=_MessageGetReply)
        if found.message is not None:
            return found.message.seq
        if found.error is not None and found.error.code == 404:
            return None
        error = found.error or _ApiError(description=reply.data.decode(errors="replace"))
        raise nats.js.errors.APIError(code=error.code, description=error.description)

    async def _purge_below(self, stream: StreamSpec, subject: str, before_seq: int | None) -> None:
        if before_seq is not None and before_seq <= 1:
            return  # nothing lies below it
        await self.js.purge_stream(stream.name, seq=before_seq, subject=subject)

    async def purge_consumed(self, stream: StreamSpec) -> int:
        """Remove the messages every durable consumer that wants them has acknowledged.

        For each consumer's filter, messages up to the lowest ack floor among the consumers
        whose filters overlap it are gone from every consumer's view already: a message that
        matches a filter is acknowledged by every consumer it was for once it is at or below
        their floors. Messages no consumer wants are left to the stream's max_age. Returns how
        many filters were purged.
        """
        consumers = await self.js.consumers_info(stream.name)
        purged = 0
        for subject in sorted({info.config.filter_subject or ">" for info in consumers}):
            floor = _lowest_ack_floor(consumers, subject) or 0
            if floor > 0:
                await self.js.purge_stream(stream.name, seq=floor + 1, subject=subject)
                purged += 1
        return purged

    async def key_value(self, bucket: str, *, history: int = 1, replicas: int | None = None,
                        ttl: float | None = None) -> KeyValue:
        """Return a KV bucket, creating it when missing (replicas default: `stream_replicas`;
        `ttl`: seconds after which entries expire, None = never)."""
        replicas = self.stream_replicas if replicas is None else replicas

        async def open_bucket() -> KeyValue:
            try:
                return await self.js.key_value(bucket)
            except nats.js.errors.BucketNotFoundError:
                try:
                    return await self.js.create_key_value(bucket=bucket, history=history, replicas=replicas, ttl=ttl)
                except nats.js.errors.BadRequestError:
                    return await self.js.key_value(bucket)

        return await _retry_setup(open_bucket)

    async def close(self) -> None:
        """Stop consumers and services, then drain the connection.

        A consumer handling a batch finishes it first (for up to `HANDLING_GRACE_SECONDS`): cut
        short, its messages would wait out `ack_wait` before another replica got them. Messages
        fetched but not handled yet are handed back at once (nak)."""
        self._stopping.set()
        if self._leases:
            # Every partition handed back (batches in hand finished, leases deleted): the other
            # replicas take them over at their next tick instead of after the lease TTL.
            try:
                await asyncio.wait_for(asyncio.gather(*(leases.stop() for leases in self._leases),
                                                      return_exceptions=True), HANDLING_GRACE_SECONDS + 2)
            except TimeoutError:
                log.warning("partitions not all given back within %.0f s: the other replicas take them"
                            " over when their leases expire", HANDLING_GRACE_SECONDS + 2)
        busy = [task for task in self._tasks if task in self._handling]
        for task in list(self._tasks):
            if task not in self._handling:
                task.cancel()
        if busy:
            await asyncio.wait(busy, timeout=HANDLING_GRACE_SECONDS)
        tasks = list(self._tasks)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(cancel_and_wait(tasks), STOP_TASKS_SECONDS)
        for task in tasks:
            if not task.done():
                where = io.StringIO()
                task.print_stack(file=where)
                log.error("task %s did not stop within %.0f s of its cancellation: %s",
                          task.get_name(), STOP_TASKS_SECONDS, where.getvalue())
        # A pull request still open would deliver into the inbox; drain would wait on it.
        for puller in list(self._pullers):
            with contextlib.suppress(Exception):
                await puller.stop()
        for service in self._services:
            with contextlib.suppress(Exception):
                await service.stop()
        with contextlib.suppress(Exception):
            await self.nc.drain()


class _PubAckReply(msgspec.Struct):
    stream: str = ""
    seq: int = 0
    domain: str | None = None
    duplicate: bool = False
    error: dict[str, Any] | None = None


_PUB_ACK_REPLY = msgspec.json.Decoder(_PubAckReply)


class _ApiError(msgspec.Struct):
    code: int = 0
    description: str = ""


class _StoredRef(msgspec.Struct):
    seq: int


class _MessageGetReply(msgspec.Struct):
    message: _StoredRef | None = None
    error: _ApiError | None = None


class JetStreamPublisher:
    """Publishes to JetStream and awaits each ack on one inbox subscription of its own.

    nats-py's `js.publish` is a request: a NUID and random bytes per token, `asyncio.wait_for`,
    the ack parsed with `json` into a dataclass — a visible share of every publisher's CPU.
    Here a token is a counter under a per-connection inbox, the timeout one timer, the ack
    decoded by msgspec. Errors are nats-py's: `NoStreamResponseError` (no stream listens),
    `APIError` (the stream refused), `nats.errors.TimeoutError`.
    """

    def __init__(self, nc: NatsClient, *, timeout: float) -> None:
        self.nc = nc
        self.timeout = timeout
        self._prefix = ""
        self._subscribing = asyncio.Lock()
        self._waiting: dict[str, asyncio.Future[api.PubAck]] = {}
        self._count = 0

    async def publish(self, subject: str, data: bytes, headers: dict[str, str]) -> api.PubAck:
        """Publish and return the stream's ack (the message is durable)."""
        if not self._prefix:
            await self._subscribe()
        self._count += 1
        token = str(self._count)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[api.PubAck] = loop.create_future()
        self._waiting[token] = future
        timer = loop.call_later(self.timeout, _expire, future)
        try:
            await self.nc.publish(subject, data, reply=f"{self._prefix}.{token}", headers=headers)
            return await future
        finally:
            timer.cancel()
            del self._waiting[token]

    async def publish_together(self, messages: Sequence[tuple[str, bytes, dict[str, str]]]
                               ) -> list[api.PubAck | BaseException]:
        """Send every message before awaiting any ack (nothing else this connection sends goes
        between them: nats-py queues a publish without yielding), then each one's ack or error."""
        if not self._prefix:
            await self._subscribe()
        loop = asyncio.get_running_loop()
        tokens: list[str] = []
        futures: list[asyncio.Future[api.PubAck]] = []
        for _message in messages:
            self._count += 1
            tokens.append(str(self._count))
            futures.append(loop.create_future())
            self._waiting[tokens[-1]] = futures[-1]
        timers = [loop.call_later(self.timeout, _expire, future) for future in futures]
        try:
            for (subject, data, headers), token in zip(messages, tokens, strict=True):
                await self.nc.publish(subject, data, reply=f"{self._prefix}.{token}", headers=headers)
            return list(await asyncio.gather(*futures, return_exceptions=True))
        finally:
            for timer in timers:
                timer.cancel()
            for token in tokens:
                del self._waiting[token]

    async def _subscribe(self) -> None:
        async with self._subscribing:
            if not self._prefix:
                prefix = self.nc.new_inbox()
                await self.nc.subscribe(f"{prefix}.*", cb=self._on_ack)
                self._prefix = prefix

    async def _on_ack(self, msg: Msg) -> None:
        future = self._waiting.get(msg.subject[len(self._prefix) + 1:])
        if future is None or future.done():
            return  # an ack that arrived after its publish gave up
        if _status(msg) == "503":
            future.set_exception(nats.js.errors.NoStreamResponseError())
            return
        try:
            reply = _PUB_ACK_REPLY.decode(msg.data)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            future.set_exception(nats.errors.Error(f"unreadable JetStream ack: {exc}"))
            return
        if reply.error is not None:
            try:
                nats.js.errors.APIError.from_error(reply.error)  # raises the error's own class
            except nats.js.errors.APIError as exc:
                future.set_exception(exc)
            except Exception:  # an error without a code: still a refusal
                future.set_exception(nats.js.errors.APIError(description=str(reply.error)))
            return
        future.set_result(api.PubAck(stream=reply.stream, seq=reply.seq, domain=reply.domain,
                                     duplicate=reply.duplicate))


def _status(msg: Msg) -> str | None:
    """The status code of a server's status message (404, 408, 409, 503, …); None for a message."""
    return msg.headers.get(api.Header.STATUS) if msg.headers else None


def _expire(future: asyncio.Future[api.PubAck]) -> None:
    if not future.done():
        future.set_exception(nats.errors.TimeoutError())


class PullBatches:
    """The batches of a durable pull consumer, one pull request each.

    A request asks for up to `batch` messages with `no_wait` and an expiry: the server sends at
    once what is there, or waits up to `wait` seconds for the first message, and ends the
    request with a status (404/408) unless the batch is full. The messages land in this
    object's inbox subscription through a callback: nats-py's `fetch` reads each one with
    `next_msg`, a task, a timer and a uuid4 per message, a visible share of every consumer's CPU.

    A consumer at its `max_ack_pending` gets what it may take and then no status until the
    request expires: a batch also ends once messages have stopped arriving for `IDLE_GAP`
    seconds. Each request has its own reply subject, so the status that ends an earlier one (a
    request that outlived its batch) cannot end the current one; the messages it brings late
    are kept for the next batch, and a batch never holds more than `batch` messages. No request
    goes out while the connection is down: nats-py would buffer them all, and on reconnect each
    would bring a batch at once.
    """

    IDLE_GAP = 0.01
    RECONNECT_POLL = 0.1

    def __init__(self, nc: NatsClient, stream: str, durable: str, batch: int, wait: float = 1.0) -> None:
        self.nc = nc
        self.batch = batch
        self.wait = wait
        self.stream = stream
        self.next_subject = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{durable}"
        self.inbox = nc.new_inbox()
        self._expires = int(wait * 1e9)
        self._subscription: Subscription | None = None
        self._requests = 0
        self._reply = ""
        self._msgs: list[Msg] = []
        self._ended = asyncio.Event()
        self._idle: asyncio.TimerHandle | None = None
        self._refusal: str | None = None

    @classmethod
    async def start(cls, nc: NatsClient, stream: str, durable: str, batch: int, wait: float = 1.0) -> PullBatches:
        """Subscribe the inbox the batches arrive in."""
        puller = cls(nc, stream, durable, batch, wait)
        puller._subscription = await nc.subscribe(f"{puller.inbox}.*", cb=puller._on_message)
        return puller

    async def next_batch(self) -> list[Msg]:
        """The next batch: what the consumer has now, else what arrives within `wait` (maybe
        nothing). Raises `nats.errors.Error` when the server refuses the request."""
        if len(self._msgs) >= self.batch:
            return self._take()
        while not self.nc.is_connected:
            if self.nc.is_closed:
                raise nats.errors.ConnectionClosedError
            await asyncio.sleep(self.RECONNECT_POLL)
        self._requests += 1
        self._reply = f"{self.inbox}.{self._requests}"
        self._ended.clear()
        self._cancel_idle()
        if self._msgs:  # brought late by an earlier request: they go with whatever comes now
            self._arm_idle()
        request = b'{"batch":%d,"expires":%d,"no_wait":true}' % (self.batch - len(self._msgs), self._expires)
        await self.nc.publish(self.next_subject, request, reply=self._reply)
        # The server ends the request itself; the margin covers a request lost to a reconnect.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._ended.wait(), self.wait + 1.0)
        self._cancel_idle()
        refusal, self._refusal = self._refusal, None
        if refusal is not None and not self._msgs:
            raise nats.errors.Error(f"pull request refused: {refusal}")
        return self._take()

    def _take(self) -> list[Msg]:
        msgs, self._msgs = self._msgs[:self.batch], self._msgs[self.batch:]
        return msgs

    async def _on_message(self, msg: Msg) -> None:
        status = _status(msg)
        if not status:
            self._msgs.append(msg)
            if len(self._msgs) >= self.batch:
                self._ended.set()
            elif self._idle is None:
                self._arm_idle()
            return
        if status == "100" or msg.subject != self._reply:  # a heartbeat, or an earlier request's end
            return
        if status not in ("404", "408"):  # 409 (consumer deleted, limits), 503 (no JetStream), …
            self._refusal = f"{status} {(msg.headers or {}).get(api.Header.DESCRIPTION, '')}".strip()
        self._ended.set()

    def _arm_idle(self) -> None:
        self._idle = asyncio.get_running_loop().call_later(self.IDLE_GAP, self._idle_check, len(self._msgs))

    def _idle_check(self, seen: int) -> None:
        self._idle = None
        if self._ended.is_set():
            return
        if len(self._msgs) > seen:  # still arriving: look again after another gap
            self._arm_idle()
        else:
            self._ended.set()

    def _cancel_idle(self) -> None:
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None

    def wake(self) -> None:
        """End the current request's wait now: `next_batch` returns what it has."""
        self._ended.set()

    async def stop(self) -> None:
        """Unsubscribe the inbox and hand back (nak) what arrived but was never handed out, so
        another replica gets it now rather than after `ack_wait`."""
        self._cancel_idle()
        if self._subscription is not None:
            await self._subscription.unsubscribe()
            self._subscription = None
        left, self._msgs = self._msgs, []
        for msg in left:
            with contextlib.suppress(Exception):
                await msg.nak()


async def _wake_on(stop: asyncio.Event, stopping: asyncio.Event, puller: PullBatches) -> None:
    waits = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(stopping.wait())]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        puller.wake()
    finally:
        for wait in waits:
            wait.cancel()


def _lowest_ack_floor(consumers: Sequence[api.ConsumerInfo], subject: str) -> int | None:
    """The lowest ack floor (a stream sequence) among the durable consumers whose filters can
    match `subject`: every message on it at or below that one is acknowledged by all who want
    it. None when no consumer wants it."""
    floors = [info.ack_floor.stream_seq if info.ack_floor else 0 for info in consumers
              if subjects_overlap(subject, info.config.filter_subject or ">")]
    return min(floors) if floors else None


def subjects_overlap(a: str, b: str) -> bool:
    """True when some subject matches both filters (`*` one token, `>` the rest)."""
    left, right = a.split("."), b.split(".")
    for x, y in zip(left, right, strict=False):
        if x == ">" or y == ">":
            return True
        if x != y and x != "*" and y != "*":
            return False
    return len(left) == len(right)


class RequestFailed(Exception):
    """A request/reply endpoint answered with a service error."""

    def __init__(self, code: int, description: str) -> None:
        super().__init__(f"{code} {description}")
        self.code = code
        self.description = description


def _micro_handler(subject: str, handler: RequestHandler) -> Callable[[MicroRequest], Awaitable[None]]:
    async def handle(request: MicroRequest) -> None:
        headers = request.headers or {}
        with _tracer.start_as_current_span(f"serve {subject}", context=extract_context(headers),
                                           kind=SpanKind.SERVER) as span:
            try:
                reply = await handler(request.data, headers)
            except Exception as exc:
                span.record_exception(exc)
                span.set_status(Status(StatusCode.ERROR, str(exc)))
                log.exception("request handler %s failed", subject)
                await request.respond_error("500", "internal error")
                return
            await request.respond(reply)

    return handle


class KvMirror:
    """An in-memory copy of a KV bucket, kept fresh by a watcher.

    `ready` is set once the initial values are loaded; `get` then answers without I/O.
    """

    def __init__(self, bus: Bus, bucket: str, decode: Callable[[bytes], Any]) -> None:
        self.bus = bus
        self.bucket = bucket
        self.decode = decode
        self.values: dict[str, Any] = {}
        self.ready = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._listeners: list[Callable[[str, Any | None], None]] = []
        self._initial_revision = 0

    async def start(self) -> None:
        """Start watching and wait for the initial values."""
        kv = await self.bus.key_value(self.bucket)
        # The watcher's end-of-initial-values marker is not enough on its own: nats-py sends it
        # when the consumer has nothing pending, which is also the case while the values it has
        # already delivered are still in flight to us. Being ready means having seen the
        # bucket's last revision as of now (or, for an empty bucket, the marker).
        state = (await kv.status()).stream_info.state
        # A bucket whose values have all expired keeps its last sequence number: it is empty.
        self._initial_revision = state.last_seq if state.messages else 0
        watcher = await kv.watchall()
        self._task = asyncio.create_task(self._run(watcher), name=f"kv:{self.bucket}")
        await self._until_ready(kv, self._task)

    async def _until_ready(self, kv: KeyValue, watching: asyncio.Task[None]) -> None:
        """Wait for `ready`, checking every `KV_MIRROR_CATCH_UP_SECONDS` that the watch goes on
        (a watch that failed raises here rather than leaving its service starting forever)
        and that the bucket still holds values: should every value pending at the start expire
        before it is delivered, neither they nor the end marker ever come."""
        ready = asyncio.ensure_future(self.ready.wait())
        try:
            while True:
                await asyncio.wait([ready, watching], timeout=KV_MIRROR_CATCH_UP_SECONDS,
                                   return_when=asyncio.FIRST_COMPLETED)
                if ready.done():
                    return
                if watching.done():
                    failure = None if watching.cancelled() else watching.exception()
                    raise RuntimeError(f"watching KV bucket {self.bucket} ended before its values were"
                                       f" loaded: {failure!r}") from failure
                if not (await kv.status()).stream_info.state.messages:
                    self._ready_without_last_revision()
        finally:
            ready.cancel()

    async def _run(self, watcher: KeyValue.KeyWatcher) -> None:
        fallback: asyncio.TimerHandle | None = None
        try:
            async for entry in watcher:
                if entry is None:
                    if self._initial_revision == 0:
                        self.ready.set()
                    elif not self.ready.is_set() and fallback is None:
                        # The last revision may never come (a TTL bucket's value expiring on
                        # the way, a server marker the watcher skips): past the marker, wait a
                        # bounded time. (Should every pending value expire before delivery, no
                        # marker comes either: `_until_ready` sees the bucket empty.)
                        fallback = asyncio.get_running_loop().call_later(
                            KV_MIRROR_CATCH_UP_SECONDS, self._ready_without_last_revision)
                    continue
                if entry.operation in ("DEL", "PURGE") or entry.value in (None, b""):
                    self.values.pop(entry.key, None)
                else:
                    try:
                        self.values[entry.key] = self.decode(entry.value)
                    except Exception:
                        log.exception("undecodable KV entry %s/%s", self.bucket, entry.key)
                self._notify(entry.key)
                if not self.ready.is_set() and entry.revision >= self._initial_revision:
                    self.ready.set()
        finally:
            if fallback is not None:
                fallback.cancel()
            with contextlib.suppress(Exception):
                await watcher.stop()

    def _ready_without_last_revision(self) -> None:
        if not self.ready.is_set():
            log.warning("KV %s: revision %d never arrived; starting with what was seen",
                        self.bucket, self._initial_revision)
            self.ready.set()

    def get(self, key: str) -> Any | None:
        """The current value for `key`, or None."""
        return self.values.get(key)

    def add_listener(self, listener: Callable[[str, Any | None], None]) -> None:
        """Call `listener(key, value)` after each change the watcher sees (value None: deleted).

        Listeners run synchronously in the watcher task and must not block (schedule work
        instead). Values loaded before the listener was added are in `values`.
        """
        self._listeners.append(listener)

    def _notify(self, key: str) -> None:
        for listener in list(self._listeners):
            try:
                listener(key, self.values.get(key))
            except Exception:
                log.exception("KV listener failed on %s/%s", self.bucket, key)

    async def stop(self) -> None:
        """Stop watching."""
        await cancel_and_wait([self._task])


def current_span_trace_id() -> str:
    """Hex trace id of the current span (empty when none)."""
    ctx = trace.get_current_span().get_span_context()
    return format(ctx.trace_id, "032x") if ctx.is_valid else ""
