"""The delivery engine: schedules pending rows per webhook, POSTs envelopes, records outcomes."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import aiohttp
from opentelemetry import trace
from opentelemetry.trace import Link, SpanKind, Status, StatusCode

from services.webhooks.config import WebhooksConfig
from services.webhooks.handlers import (
    CompletedBatch,
    NewDelivery,
    Outcome,
    PendingDelivery,
    RetryPolicy,
    WebhookQueue,
    build_envelope,
    classify,
    request_headers,
)
from services.webhooks.store import DELIVERED, FAILED, PENDING, DeliveryStore
from shared import fencing, metrics, subjects
from shared.egress import REFUSED_CODE, EgressRefused, EgressSession
from shared.messages.conversation import Erasure
from shared.partitions import Lease
from shared.records import WebhookRecord
from shared.tasks import cancel_and_wait
from shared.telemetry import extract_context, inject_headers, log_fields, tracer

log = logging.getLogger(__name__)
_tracer = tracer(__name__)

# How much of a receiver's answer is read (to keep the connection reusable); the rest is dropped.
MAX_RESPONSE_BYTES = 64 * 1024
MAX_SPAN_LINKS = 32

WebhookLookup = Callable[[str, str], WebhookRecord | None]


@dataclass
class AttemptResult:
    """What one POST came back with."""

    status: int | None
    error: str | None
    # The egress policy refused the target: no retry can help until the business changes it.
    refused: bool = False

    @property
    def outcome(self) -> Outcome:
        return "failed" if self.refused else classify(self.status)


class Dispatcher:
    """Runs the deliveries of the partitions this replica holds, for every webhook: at most
    `max_inflight_per_webhook` POSTs per webhook and replica.

    A conversation's rows are delivered by the replica holding its partition of the events
    stream (`shared.partitions`): `acquire` loads the partition's pending rows, `release` drops
    them from memory once its attempts in flight have finished and recorded their outcome, so
    the next holder resumes exactly where this one stopped, in order.

    That holds for a replica that knows it lost the partition. One stalled past its lease does
    not know yet: its writes are fenced by the epoch of its take (`acquire` stores it before it
    loads the rows), so once another replica took the partition over they are refused
    (`fencing.StaleEpoch`) — an event's rows are not stored (its message is not acknowledged, the new
    owner gets it), an attempt's outcome is not recorded (the row stays pending for the new
    owner, which loaded it) — and this replica drops the partition's rows and gives it up.
    """

    def __init__(self, store: DeliveryStore, lookup: WebhookLookup, session: EgressSession,
                 config: WebhooksConfig, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.lookup = lookup
        self.session = session
        self.config = config
        self.clock = clock
        self.policy = RetryPolicy(config.retry_base_seconds, config.retry_window_seconds)
        self.queues: dict[str, WebhookQueue] = {}
        self.pending = 0
        self.inflight = 0
        self.delivered = 0
        self.failed = 0
        self._wake = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None
        self._prune_task: asyncio.Task[None] | None = None
        self._deliveries: set[asyncio.Task[None]] = set()
        self.partitions: set[int] = set()
        self.leases: dict[int, Lease] = {}  # partition → this replica's take of it (its epoch)
        self._superseded: set[int] = set()  # partitions whose writes were refused, until released
        self._inflight_partitions: Counter[int] = Counter()
        self._settled = asyncio.Event()  # set whenever an attempt finished

    async def start(self) -> None:
        """Start scheduling (rows come with the partitions this replica acquires)."""
        counts = await self.store.counts()
        self.delivered, self.failed = counts[DELIVERED], counts[FAILED]
        self._loop_task = asyncio.create_task(self._run(), name="webhooks:dispatch")
        self._prune_task = asyncio.create_task(self._prune_loop(), name="webhooks:prune")

    async def stop(self) -> None:
        """Stop scheduling and abandon attempts in flight (their rows stay pending)."""
        tasks = [t for t in (self._loop_task, self._prune_task) if t is not None] + list(self._deliveries)
        await cancel_and_wait(tasks)
        self._deliveries.clear()

    async def acquire(self, partition: int) -> None:
        """This replica now delivers the conversations of `partition` (an acquire hook of
        `shared.partitions`): fence the partition's writes with the epoch of this take, then
        resume its pending rows. fencing.StaleEpoch when a later take's epoch is stored already."""
        lease = await fencing.take(self.store.db, partition)
        self.leases[partition] = lease
        self._superseded.discard(partition)
        self.partitions.add(partition)
        resumed = await self.store.load_pending(partition)
        self.add(resumed)
        if resumed:
            log.info("resuming %d pending webhook deliveries of partition %d", len(resumed), partition,
                     extra=log_fields(partition=partition, deliveries=len(resumed)))

    async def release(self, partition: int) -> None:
        """Another replica delivers `partition` from now on: wait for its attempts in flight
        (their outcomes recorded), then drop its rows from memory (they stay pending in the
        database for the next holder)."""
        self.partitions.discard(partition)
        self._drop_partition(partition)
        while self._inflight_partitions[partition] > 0:
            self._settled.clear()
            await self._settled.wait()
        self._inflight_partitions.pop(partition, None)
        self._drop_partition(partition)
        self.leases.pop(partition, None)
        self._superseded.discard(partition)

    def _epochs(self, rows: Iterable[NewDelivery | PendingDelivery]) -> dict[int, int]:
        """The epochs of this replica's takes of the rows' partitions (those it holds)."""
        epochs: dict[int, int] = {}
        for row in rows:
            partition = subjects.partition_of(row.conversation_id)
            lease = self.leases.get(partition)
            if lease is not None:
                epochs[partition] = lease.epoch
        return epochs

    def _fenced(self, stale: fencing.StaleEpoch) -> None:
        """A write for a partition was refused, another replica having taken it over (this one
        was stalled past its lease): stop delivering its rows and give it up now."""
        partition = stale.partition
        if partition in self._superseded:
            return
        self._superseded.add(partition)
        log.warning("webhook deliveries of partition %d are another replica's now (%s): dropping its rows here",
                    partition, stale, extra=log_fields(partition=partition))
        self.partitions.discard(partition)
        self._drop_partition(partition)
        lease = self.leases.get(partition)
        if lease is not None:
            lease.fenced()

    async def insert(self, rows: list[NewDelivery]) -> None:
        """Store an event's rows, fenced by this replica's takes of their partitions, then schedule
        the new ones (durable before this returns). fencing.StaleEpoch, nothing stored, when their
        partition was taken over meanwhile (this replica gives it up)."""
        try:
            created = await self.store.insert(rows, self._epochs(rows))
        except fencing.StaleEpoch as stale:
            self._fenced(stale)
            raise
        self.add(created)

    def _drop_partition(self, partition: int) -> None:
        for queue in self.queues.values():
            mine = [c for c in queue.conversation_ids() if subjects.partition_of(c) == partition]
            self.pending -= queue.forget(mine, None)

    def add(self, rows: list[PendingDelivery]) -> None:
        """Schedule stored rows (rows of one conversation in event order)."""
        if self._superseded:
            rows = [row for row in rows if subjects.partition_of(row.conversation_id) not in self._superseded]
        if not rows:
            return
        now = self.clock()
        for row in rows:
            queue = self.queues.get(row.webhook_id)
            if queue is None:
                queue = self.queues[row.webhook_id] = WebhookQueue(row.webhook_id, row.app_id)
            queue.add(row, now)
        self.pending += len(rows)
        self._wake.set()

    def forget_queued(self, erasure: Erasure) -> None:
        """Drop the rows a privacy event names from this replica's queues (not the database)."""
        keys = [*erasure.conversation_ids, *([erasure.user_id] if erasure.user_id else [])]
        if not erasure.delivered_only:
            event_id = erasure.message.event_id if erasure.message is not None else None
            for queue in self.queues.values():
                self.pending -= queue.forget(keys, erasure.before, event_id)

    async def forget(self, erasure: Erasure) -> None:
        """A privacy event: drop the rows it names from the queues and the database."""
        self.forget_queued(erasure)
        removed = await self.store.forget(erasure)
        self.delivered -= removed.get(DELIVERED, 0)
        self.failed -= removed.get(FAILED, 0)
        if removed:
            log.info("forgot %d webhook deliveries after a privacy event", sum(removed.values()),
                     extra=log_fields(deliveries=sum(removed.values())))

    def stats(self) -> dict[str, int]:
        """Counts for /stats: pending includes rows in flight."""
        return {
            PENDING: self.pending, "inflight": self.inflight, DELIVERED: self.delivered, FAILED: self.failed,
            "webhooks": len(self.queues),
        }

    async def _run(self) -> None:
        max_inflight = self.config.max_inflight_per_webhook
        while True:
            self._wake.clear()
            now = self.clock()
            wake_at: float | None = None
            for webhook_id, queue in list(self.queues.items()):
                while queue.inflight_batches < max_inflight and queue.has_ready(now):
                    batch = queue.take_batch(now, self.config.max_batch_events)
                    if not batch:
                        break
                    queue.inflight_batches += 1
                    self.inflight += len(batch)
                    partitions = {subjects.partition_of(row.conversation_id) for row in batch}
                    self._inflight_partitions.update(partitions)
                    task = asyncio.create_task(self._deliver(queue, batch, partitions))
                    self._deliveries.add(task)
                    task.add_done_callback(self._deliveries.discard)
                if queue.inflight_batches < max_inflight:
                    # A full queue is woken by a finishing attempt, not by the clock.
                    due = queue.next_due()
                    if due is not None:
                        wake_at = due if wake_at is None else min(wake_at, due)
                if queue.is_idle() and queue.inflight_batches == 0:
                    del self.queues[webhook_id]
            timeout = None if wake_at is None else max(0.001, wake_at - self.clock())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)

    async def _deliver(self, queue: WebhookQueue, batch: list[PendingDelivery], partitions: set[int]) -> None:
        try:
            record = self.lookup(queue.app_id, queue.webhook_id)
            if record is None:
                result = AttemptResult(None, "webhook deleted")
                outcome: Outcome = "failed"
            else:
                started = time.perf_counter()
                try:
                    result = await self._post(record, batch)
                except Exception as exc:  # a bug must not leave the conversations blocked forever
                    log.exception("webhook POST to %s crashed", record.target)
                    result = AttemptResult(None, f"internal error: {type(exc).__name__}")
                outcome = result.outcome
                metrics.webhook_attempt(outcome, time.perf_counter() - started)
            completed = queue.complete(batch, outcome, self.clock(), self.policy)
            metrics.webhook_events([row.created_at for row in completed.delivered], len(completed.retried),
                                   len(completed.failed), self.clock())
            self.inflight -= len(batch)
            self.pending -= len(completed.delivered) + len(completed.failed)
            self.delivered += len(completed.delivered)
            self.failed += len(completed.failed)
            if completed.delivered:
                log.info("delivered %d event(s) to webhook %s", len(completed.delivered), queue.webhook_id,
                         extra=log_fields(webhook_id=queue.webhook_id, events=len(completed.delivered),
                                          http_status=result.status))
            for row in completed.failed:
                log.warning("webhook delivery failed: event %s to webhook %s after %d attempt(s): %s",
                            row.event_id, row.webhook_id, row.attempts, result.error, extra=log_fields(
                                event_id=row.event_id, webhook_id=row.webhook_id, app_id=row.app_id,
                                conversation_id=row.conversation_id, attempts=row.attempts,
                                http_status=result.status, error=result.error))
            try:
                await self._record_outcome(completed, result)
            except Exception:
                # The rows stay pending in the database: a restart delivers them again (same ids).
                log.exception("could not record webhook outcome for webhook %s", queue.webhook_id)
        finally:
            queue.inflight_batches -= 1
            self._inflight_partitions.subtract(partitions)
            self._settled.set()
            self._wake.set()

    async def _record_outcome(self, completed: CompletedBatch, result: AttemptResult) -> None:
        """Persist an attempt's outcome, fenced: the rows of a partition taken over meanwhile stay
        as they are (pending, in the new owner's hands), the others are written."""
        now = self.clock()
        delivered, failed, retried = completed.delivered, completed.failed, completed.retried
        while delivered or failed or retried:
            try:
                await self.store.record_outcome(delivered, failed, retried, now, result.status, result.error,
                                                self._epochs([*delivered, *failed, *retried]))
                return
            except fencing.StaleEpoch as stale:
                self._fenced(stale)
                delivered, failed, retried = (
                    [row for row in rows if subjects.partition_of(row.conversation_id) != stale.partition]
                    for rows in (delivered, failed, retried))

    async def _post(self, record: WebhookRecord, batch: list[PendingDelivery]) -> AttemptResult:
        body = build_envelope(record.app_id, record.id, record.version, (row.body for row in batch))
        headers = request_headers(record, body, self.clock())
        parent = extract_context(batch[0].trace_headers())
        with _tracer.start_as_current_span("POST webhook", context=parent, kind=SpanKind.CLIENT,
                                           links=_links(batch[1:])) as span:
            span.set_attribute("http.request.method", "POST")
            span.set_attribute("url.full", record.target)
            span.set_attribute("threadline.webhook.id", record.id)
            span.set_attribute("threadline.webhook.events", len(batch))
            span.set_attribute("threadline.webhook.attempt", max(r.attempts for r in batch) + 1)
            try:
                async with self.session.post(
                    record.target, data=body, headers=inject_headers(headers), allow_redirects=False,
                    timeout=aiohttp.ClientTimeout(total=self.config.timeout_seconds),
                ) as response:
                    with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                        await response.content.read(MAX_RESPONSE_BYTES)
                    status: int | None = response.status
            except EgressRefused as exc:
                span.set_status(Status(StatusCode.ERROR, REFUSED_CODE))
                return AttemptResult(None, f"{REFUSED_CODE}: {exc}", refused=True)
            except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                # ValueError: a target aiohttp cannot even parse; it is retried like any failure
                # until the window ends, in case the business fixes the URL.
                span.record_exception(exc)
                span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
                return AttemptResult(None, f"{type(exc).__name__}: {exc}".strip(": "))
            span.set_attribute("http.response.status_code", status or 0)
            if classify(status) != "delivered":
                span.set_status(Status(StatusCode.ERROR, f"HTTP {status}"))
                return AttemptResult(status, f"HTTP {status}")
            return AttemptResult(status, None)

    async def _prune_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.prune_interval_seconds)
            try:
                await self.prune()
            except Exception:
                log.exception("pruning webhook deliveries failed")

    async def prune(self) -> dict[str, int]:
        """Delete finished rows older than the retention period."""
        removed = await self.store.prune(self.clock() - self.config.retention_seconds)
        self.delivered -= removed.get(DELIVERED, 0)
        self.failed -= removed.get(FAILED, 0)
        return removed


def _links(rows: list[PendingDelivery]) -> list[Link]:
    """Links to the traces of the other events in a batch (the span's parent is the first's)."""
    links: list[Link] = []
    seen: set[int] = set()
    for row in rows:
        context = trace.get_current_span(extract_context(row.trace_headers())).get_span_context()
        if context.is_valid and context.trace_id not in seen:
            seen.add(context.trace_id)
            links.append(Link(context))
            if len(links) >= MAX_SPAN_LINKS:
                break
    return links
