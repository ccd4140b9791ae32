"""Every metric Threadline exports, defined in this one module.

OpenTelemetry instruments, read by the Prometheus exporter (`PrometheusMetricReader`) into this
module's registry; each service serves them in the text exposition format on `GET /metrics` of
its own port (`shared.service.ServiceApp`). `install` sets the process's MeterProvider up once
(`shared.telemetry.setup_telemetry` calls it); before that every instrument is a no-op. Several
services in one process (the tests' `System`) share it: `/metrics` shows the process's metrics.

`METRICS` enumerates them (OpenTelemetry name, kind, unit, description, labels) and
`MetricSpec.series` gives the names Prometheus sees after the exporter's conversion, so the
dashboard (deploy/grafana/threadline-dashboard.json) is checked against what is exported.

Labels are low-cardinality by construction — channel, result, outcome, group, engine,
operation, service, reason, cause — never an id. Call sites are one line each: the helpers below.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final, Literal

from opentelemetry import metrics as otel_metrics
from opentelemetry.metrics import CallbackOptions, Observation
from prometheus_client import CollectorRegistry, generate_latest

Kind = Literal["counter", "histogram", "up_down_counter", "observable_gauge"]

# Label names.
CHANNEL: Final = "channel"
RESULT: Final = "result"
OUTCOME: Final = "outcome"
GROUP: Final = "group"
ENGINE: Final = "engine"
OPERATION: Final = "operation"
SERVICE: Final = "service"
REASON: Final = "reason"
CAUSE: Final = "cause"

# Label values.
IN_RESULTS: Final = ("accepted", "rejected", "duplicate")
OUT_RESULTS: Final = ("sent", "delivered", "failed", "retried")
WEBHOOK_ATTEMPT_OUTCOMES: Final = ("delivered", "retry", "failed")
WEBHOOK_EVENT_OUTCOMES: Final = ("delivered", "retried", "failed")
STORE_OPERATIONS: Final = ("execute", "executemany", "fetch", "fetchrow", "fetchval", "transaction",
                           "group_commit", "migrate")

# Histogram bucket bounds, in seconds.
STORE_BUCKETS: Final = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                        2.5, 5.0, 10.0)
POST_BUCKETS: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
WAIT_BUCKETS: Final = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0,
                       3600.0, 14400.0)
DELIVERY_BUCKETS: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
                           300.0, 900.0, 1800.0, 3600.0)

# How often each consumer group's pending count is read from JetStream (`shared.bus.Bus.consume`).
PENDING_REFRESH_SECONDS: Final = 15.0

_UNIT_SUFFIXES: Final = {"s": "seconds"}


@dataclass(frozen=True)
class MetricSpec:
    """One exported metric: its OpenTelemetry instrument and what Prometheus shows of it."""

    name: str  # the OpenTelemetry instrument name
    kind: Kind
    unit: str  # UCUM: "s", or an annotation such as "{message}" (no suffix in Prometheus)
    description: str
    labels: tuple[str, ...]
    buckets: tuple[float, ...] = ()

    @property
    def prometheus_name(self) -> str:
        """The metric family's name after the exporter's conversion: dots to underscores, the
        unit appended (`s` → `_seconds`; an annotation such as `{message}` adds nothing)."""
        base = self.name.replace(".", "_")
        suffix = _UNIT_SUFFIXES.get(self.unit, "")
        return f"{base}_{suffix}" if suffix and not base.endswith(f"_{suffix}") else base

    @property
    def series(self) -> tuple[str, ...]:
        """The sample names in the exposition (what a PromQL expression names)."""
        name = self.prometheus_name
        if self.kind == "counter":
            return (f"{name}_total",)
        if self.kind == "histogram":
            return (f"{name}_bucket", f"{name}_sum", f"{name}_count")
        return (name,)  # up-down counters and gauges are gauges


MESSAGES_IN: Final = MetricSpec(
    "threadline.messages.in", "counter", "{message}",
    "Customer messages received, per channel and result: accepted (durable in JetStream), rejected (a malformed"
    " item of a platform notification; a notification, update or SMS that cannot be read at all counts one),"
    " duplicate (JetStream already had its id:"
    " a platform's or an SDK client's retry).",
    (CHANNEL, RESULT))
MESSAGES_OUT: Final = MetricSpec(
    "threadline.messages.out", "counter", "{message}",
    "Send commands handled by a channel service, per channel and result: sent, delivered (app: an open socket"
    " took it, no push needed), failed (reported as failed), retried (a transient failure, tried again later).",
    (CHANNEL, RESULT))
WEBHOOK_DELIVERY_LATENCY: Final = MetricSpec(
    "threadline.webhook.delivery.latency", "histogram", "s",
    "Business webhooks: seconds from a delivery row's creation (the event reaching webhooks) to the successful"
    " POST that carried it, retries included.",
    (), DELIVERY_BUCKETS)
WEBHOOK_POST_DURATION: Final = MetricSpec(
    "threadline.webhook.post.duration", "histogram", "s",
    "Business webhooks: seconds one POST took, per outcome (delivered: 2xx; retry: to be tried again; failed:"
    " refused for good).",
    (OUTCOME,), POST_BUCKETS)
WEBHOOK_ATTEMPTS: Final = MetricSpec(
    "threadline.webhook.attempts", "counter", "{request}",
    "Business webhooks: POSTs made (one per batch of events), per outcome: delivered, retry, failed.",
    (OUTCOME,))
WEBHOOK_EVENTS: Final = MetricSpec(
    "threadline.webhook.events", "counter", "{event}",
    "Business webhooks: what an attempt did to each event it carried, per outcome: delivered, retried (scheduled"
    " again), failed (given up: refused, webhook deleted, or the retry window is over).",
    (OUTCOME,))
CONSUMER_PENDING: Final = MetricSpec(
    "threadline.consumer.pending", "observable_gauge", "{message}",
    "JetStream messages waiting for a consumer group in this replica: num_pending + num_ack_pending summed over"
    f" the partitions it holds, read every {PENDING_REFRESH_SECONDS:.0f} s.",
    (GROUP,))
CONSUMER_REDELIVERIES: Final = MetricSpec(
    "threadline.consumer.redeliveries", "counter", "{message}",
    "JetStream deliveries handled again (a message's delivery count above 1), per consumer group.",
    (GROUP,))
# One call in STORE_SAMPLE of the per-call operations is measured (counts: multiply by it).
STORE_SAMPLE: Final = 8
STORE_DURATION: Final = MetricSpec(
    "threadline.store.duration", "histogram", "s",
    "Database latency in seconds, per engine (sqlite, postgres) and operation: a call of a Database method"
    " (execute, executemany, fetch, fetchrow, fetchval: one call in 8 is measured), a whole transaction,"
    " one group-commit batch, a migration.",
    (ENGINE, OPERATION), STORE_BUCKETS)
WEBSOCKETS_OPEN: Final = MetricSpec(
    "threadline.websockets.open", "up_down_counter", "{socket}",
    "Realtime sockets open, per service (web, app: SDK clients; desk: open agent desks).",
    (SERVICE,))

MEDIA_COPIES: Final = MetricSpec(
    "threadline.media.copies", "counter", "{file}",
    "Customer media from a platform copied into the object store before its message is published, per channel"
    " and outcome: copied, failed (the platform or the store failed or was too slow: the message keeps the"
    " platform's URL), too_large, unavailable (the platform no longer has it).",
    (CHANNEL, OUTCOME))

DESK_ASSIGNMENTS: Final = MetricSpec(
    "threadline.desk.assignments", "counter", "{conversation}",
    "Agent desk: conversations given to an agent, per reason: least_busy, returning (back to the customer's last"
    " agent), transfer (to a named agent), manual (taken by an agent or given by an admin by hand).",
    (REASON,))
DESK_WAIT: Final = MetricSpec(
    "threadline.desk.wait", "histogram", "s",
    "Agent desk: seconds a conversation waited in the queue before an agent got it (from entering the queue, or"
    " re-entering it after a transfer or its agent leaving).",
    (), WAIT_BUCKETS)
DESK_REQUEUED: Final = MetricSpec(
    "threadline.desk.requeued", "counter", "{conversation}",
    "Agent desk: conversations put back in the queue, per cause: agent_left (away, offline, silent past the grace"
    " period, disabled or deleted), transfer.",
    (CAUSE,))
DESK_QUEUED: Final = MetricSpec(
    "threadline.desk.queued", "observable_gauge", "{conversation}",
    "Agent desk: conversations waiting for an agent, all apps (every desk replica reports the same count: take"
    " the max).",
    ())
DESK_COPIES_LOST: Final = MetricSpec(
    "threadline.desk.copies.lost", "counter", "{event}",
    "Conversation events whose copy for the agent desk could not be stored after its original was (the desk"
    " misses them; their error is logged).",
    ())

METRICS: Final = (MESSAGES_IN, MESSAGES_OUT, WEBHOOK_DELIVERY_LATENCY, WEBHOOK_POST_DURATION, WEBHOOK_ATTEMPTS,
                  WEBHOOK_EVENTS, CONSUMER_PENDING, CONSUMER_REDELIVERIES, STORE_DURATION, WEBSOCKETS_OPEN,
                  MEDIA_COPIES, DESK_ASSIGNMENTS, DESK_WAIT, DESK_REQUEUED, DESK_QUEUED, DESK_COPIES_LOST)


def exported_series() -> dict[str, MetricSpec]:
    """Every sample name in the exposition, with the metric it belongs to."""
    return {series: spec for spec in METRICS for series in spec.series}


# --- consumer pending: written by background tasks, read by the gauge's callback ------------------


class PendingCounts:
    """The last pending count each consumer of this process read, per group. A callback of an
    observable gauge cannot await: `shared.bus.Bus.consume` refreshes the counts in the background
    and the gauge reports the sum per group over the consumers (replicas) in this process."""

    def __init__(self) -> None:
        self._counts: dict[object, tuple[str, int]] = {}

    def set(self, owner: object, group: str, count: int) -> None:
        """`owner` (one consumer of `group`) has `count` messages waiting."""
        self._counts[owner] = (group, count)

    def drop(self, owner: object) -> None:
        """`owner` stopped consuming: its count no longer shows."""
        self._counts.pop(owner, None)

    def totals(self) -> dict[str, int]:
        """The pending count per group."""
        totals: dict[str, int] = {}
        for group, count in self._counts.values():
            totals[group] = totals.get(group, 0) + count
        return totals

    def observe(self, _options: CallbackOptions) -> Iterable[Observation]:
        return [Observation(count, {GROUP: group}) for group, count in self.totals().items()]


PENDING: Final = PendingCounts()


# --- instruments ------------------------------------------------------------------------------

_meter = otel_metrics.get_meter("threadline")


class LocalCounter:
    """A counter whose totals are kept in this process and reported by an observable counter
    at each collection: adding is a dict update (a fraction of a microsecond), where a
    synchronous OpenTelemetry `Counter.add` goes through the SDK's measurement pipeline (~5 µs,
    4 % of a channel service's CPU per message). Exported exactly as a counter (`<name>_total`)."""

    def __init__(self, spec: MetricSpec) -> None:
        self._totals: dict[tuple[str, ...], int] = {}
        _meter.create_observable_counter(spec.name, callbacks=[self._observe], unit=spec.unit,
                                         description=spec.description)

    def add(self, amount: int, *pairs: str) -> None:
        """Count `amount` under the labels (name, value, name, value, …)."""
        self._totals[pairs] = self._totals.get(pairs, 0) + amount

    def _observe(self, _options: CallbackOptions) -> Iterable[Observation]:
        return [Observation(total, _labels(*pairs)) for pairs, total in list(self._totals.items())]


def _counter(spec: MetricSpec) -> LocalCounter:
    return LocalCounter(spec)


def _histogram(spec: MetricSpec) -> otel_metrics.Histogram:
    return _meter.create_histogram(spec.name, unit=spec.unit, description=spec.description,
                                   explicit_bucket_boundaries_advisory=list(spec.buckets))


_messages_in = _counter(MESSAGES_IN)
_messages_out = _counter(MESSAGES_OUT)
_webhook_latency = _histogram(WEBHOOK_DELIVERY_LATENCY)
_webhook_post = _histogram(WEBHOOK_POST_DURATION)
_webhook_attempts = _counter(WEBHOOK_ATTEMPTS)
_webhook_events = _counter(WEBHOOK_EVENTS)
_meter.create_observable_gauge(CONSUMER_PENDING.name, callbacks=[PENDING.observe], unit=CONSUMER_PENDING.unit,
                               description=CONSUMER_PENDING.description)
_redeliveries = _counter(CONSUMER_REDELIVERIES)
_store = _histogram(STORE_DURATION)
_media_copies = _counter(MEDIA_COPIES)
_desk_assignments = _counter(DESK_ASSIGNMENTS)
_desk_wait = _histogram(DESK_WAIT)
_desk_requeued = _counter(DESK_REQUEUED)
_desk_copies_lost = _counter(DESK_COPIES_LOST)
_desk_queued: list[int] = []
_meter.create_observable_gauge(DESK_QUEUED.name, unit=DESK_QUEUED.unit, description=DESK_QUEUED.description,
                               callbacks=[lambda _options: [Observation(_desk_queued[-1])] if _desk_queued else []])
_websockets = _meter.create_up_down_counter(WEBSOCKETS_OPEN.name, unit=WEBSOCKETS_OPEN.unit,
                                            description=WEBSOCKETS_OPEN.description)

# Attribute sets built once (an instrument call copies nothing it is given).
_attributes: dict[tuple[str, ...], dict[str, str]] = {}


def _labels(*pairs: str) -> dict[str, str]:
    """The attribute dict of (name, value, name, value, …), cached."""
    found = _attributes.get(pairs)
    if found is None:
        found = _attributes[pairs] = dict(zip(pairs[::2], pairs[1::2], strict=True))
    return found


# --- call sites: one line each ------------------------------------------------------------------


def message_in(channel: str, result: str, count: int = 1) -> None:
    """`count` customer messages of `channel` were accepted, rejected or duplicates."""
    if count:
        _messages_in.add(count, CHANNEL, channel, RESULT, result)


def message_in_acked(channel: str, duplicate: bool | None) -> None:
    """One customer message of `channel` is durable: accepted, or a duplicate JetStream already had."""
    _messages_in.add(1, CHANNEL, channel, RESULT, "duplicate" if duplicate else "accepted")


def message_out(channel: str, result: str) -> None:
    """A send command of `channel` ended in `result` (sent, delivered, failed) or is retried."""
    _messages_out.add(1, CHANNEL, channel, RESULT, result)


def webhook_attempt(outcome: str, seconds: float) -> None:
    """One business webhook POST took `seconds` and ended in `outcome`."""
    attributes = _labels(OUTCOME, outcome)
    _webhook_attempts.add(1, OUTCOME, outcome)
    _webhook_post.record(seconds, attributes)


def webhook_events(delivered_created_at: Sequence[float], retried: int, failed: int, now: float) -> None:
    """What one attempt did to its events: the creation times of those delivered (their latency
    ends `now`), how many will be retried, how many were given up."""
    for created_at in delivered_created_at:
        _webhook_latency.record(max(0.0, now - created_at))
    for outcome, count in (("delivered", len(delivered_created_at)), ("retried", retried), ("failed", failed)):
        if count:
            _webhook_events.add(count, OUTCOME, outcome)


def media_copied(channel: str, outcome: str) -> None:
    """One platform file of `channel` was copied into the object store, or not (`outcome`)."""
    _media_copies.add(1, CHANNEL, channel, OUTCOME, outcome)


def consumer_group(durable: str) -> str:
    """The consumer group of a durable: `<group>-p<n>` → `<group>`; another durable is its own group."""
    group, sep, partition = durable.rpartition("-p")
    return group if sep and partition.isdecimal() else durable


def redelivered(durable: str) -> None:
    """A message of `durable` came again (its delivery count is above 1)."""
    _redeliveries.add(1, GROUP, consumer_group(durable))


def store_attributes(engine: str, operation: str) -> dict[str, str]:
    """The attributes of one store operation on one engine (for `store_elapsed`)."""
    return _labels(ENGINE, engine, OPERATION, operation)


def store_elapsed(started: float, attributes: dict[str, str]) -> None:
    """A store operation (`store_attributes`) that began at `time.perf_counter()` == `started` ended."""
    _store.record(time.perf_counter() - started, attributes)


def websocket_opened(service: str) -> None:
    """`service` accepted a realtime socket."""
    _websockets.add(1, _labels(SERVICE, service))


def websocket_closed(service: str) -> None:
    """A realtime socket of `service` closed."""
    _websockets.add(-1, _labels(SERVICE, service))


def desk_assigned(reason: str, waited: float) -> None:
    """The desk gave a conversation to an agent (`reason`) after it waited `waited` seconds."""
    _desk_assignments.add(1, REASON, reason)
    _desk_wait.record(max(0.0, waited))


def desk_copy_lost() -> None:
    """An event's copy for the desk was given up (`conversations`)."""
    _desk_copies_lost.add(1)


def desk_requeued(cause: str, count: int = 1) -> None:
    """`count` conversations went back to the desk's queue (`cause`: agent_left, transfer)."""
    if count:
        _desk_requeued.add(count, CAUSE, cause)


def desk_queue_length(count: int) -> None:
    """How many conversations wait for an agent now (read by the sweeper)."""
    _desk_queued[:] = [count]


# --- the process's MeterProvider and the exposition ---------------------------------------------

REGISTRY: Final = CollectorRegistry(auto_describe=False)
# The classic text format (every name here is a legacy-valid one), which every Prometheus reads.
CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"
_installed = False


def install(service_name: str) -> None:
    """Install the process's MeterProvider with the Prometheus reader (idempotent: the first call
    wins, later ones — other services in the same process — share it)."""
    global _installed
    if _installed:
        return
    from opentelemetry.exporter.prometheus import PrometheusMetricReader
    from opentelemetry.sdk.metrics import AlwaysOffExemplarFilter, MeterProvider
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource

    # No target_info and no scope labels: the exposition is exactly `METRICS`; Prometheus's own
    # target labels (job, instance, pod) say which service and replica a series is from.
    reader = PrometheusMetricReader(disable_target_info=True, scope_info_enabled=False, registry=REGISTRY)
    provider = MeterProvider(metric_readers=[reader], resource=Resource.create({SERVICE_NAME: service_name}),
                             exemplar_filter=AlwaysOffExemplarFilter())
    otel_metrics.set_meter_provider(provider)
    _installed = True


def exposition() -> bytes:
    """The process's metrics in the Prometheus text format."""
    return generate_latest(REGISTRY)
