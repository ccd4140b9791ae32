"""OpenTelemetry tracing and metrics, and structured JSON logs that carry the trace id.

Exporters come from the standard `OTEL_*` variables (`OTEL_TRACES_EXPORTER=otlp|console|none`,
default none). Trace context crosses NATS as W3C `traceparent`/`tracestate` headers. Metrics
(`shared.metrics`) are read by a Prometheus exporter and served on each service's `/metrics`.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import sys
import time
from collections.abc import Mapping, MutableMapping, Sequence
from contextlib import AbstractContextManager
from types import TracebackType
from typing import Any

import msgspec
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter
from opentelemetry.sdk.trace.sampling import Decision, Sampler, SamplingResult
from opentelemetry.trace import Link, NonRecordingSpan, SpanContext, SpanKind, TraceFlags
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from shared import metrics

_PROPAGATOR = TraceContextTextMapPropagator()
# A version-00 `traceparent` as this system writes it (anything else goes to the propagator).
_TRACEPARENT_00 = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
_configured = False


class RecordWhenExported(Sampler):
    """Record spans only when something exports them. Without an exporter a recorded span is
    built (attributes, events, timing) and thrown away: on the hot path that was several percent
    of every service's CPU. A dropped span still carries its trace id — logs keep it, and it
    crosses NATS and HTTP — so a process that does export (another service, or this one once a
    processor is added) joins the same trace."""

    def __init__(self) -> None:
        self.exporting = False

    def should_sample(self, parent_context: Any, trace_id: int, name: str, kind: Any = None,
                      attributes: Any = None, links: Any = None, trace_state: Any = None) -> SamplingResult:
        if not self.exporting:
            return SamplingResult(Decision.DROP, None, _parent_state(parent_context))
        return SamplingResult(Decision.RECORD_AND_SAMPLE, attributes, _parent_state(parent_context))

    def get_description(self) -> str:
        return "RecordWhenExported"


def _parent_state(parent_context: Any) -> trace.TraceState | None:
    parent = trace.get_current_span(parent_context).get_span_context()
    return parent.trace_state if parent.is_valid else None


_SAMPLER = RecordWhenExported()


def setup_telemetry(service_name: str, *, extra_processor: SpanProcessor | None = None) -> None:
    """Install the tracer and meter providers and JSON logging for this process (idempotent:
    the first call installs them, later ones — other services in the same process — share them).

    `extra_processor` lets tests attach an in-memory exporter.
    """
    global _configured
    configure_logging(service_name)
    metrics.install(service_name)
    if _configured:
        if extra_processor is not None:
            provider = trace.get_tracer_provider()
            if isinstance(provider, TracerProvider):
                provider.add_span_processor(extra_processor)
                _SAMPLER.exporting = True
        return
    provider = TracerProvider(resource=Resource.create({SERVICE_NAME: service_name}), sampler=_SAMPLER)
    exporters = os.environ.get("OTEL_TRACES_EXPORTER", "none")
    for name in (e.strip() for e in exporters.split(",")):
        if name == "console":
            provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter(out=sys.stderr)))
            _SAMPLER.exporting = True
        elif name == "otlp":
            try:
                from opentelemetry.exporter.otlp.proto.http.trace_exporter import (  # type: ignore[import-not-found]
                    OTLPSpanExporter,
                )
            except ImportError:
                logging.getLogger(__name__).warning(
                    "OTEL_TRACES_EXPORTER=otlp but opentelemetry-exporter-otlp-proto-http is not installed")
            else:
                provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
                _SAMPLER.exporting = True
    if extra_processor is not None:
        provider.add_span_processor(extra_processor)
        _SAMPLER.exporting = True
    trace.set_tracer_provider(provider)
    propagate.set_global_textmap(_PROPAGATOR)
    _configured = True


class DroppedSpan:
    """A span nobody records, current while the `with` block runs: what the SDK makes of a span
    its sampler drops (a `NonRecordingSpan` with a fresh span id, the parent's trace id or a new
    one), without the SDK's layers of context managers, sampler call and metrics — on the hot
    path those were about a tenth of every service's CPU for spans that were thrown away."""

    __slots__ = ("_parent", "_token")

    def __init__(self, parent: otel_context.Context | None) -> None:
        self._parent = parent
        self._token: object = None

    def __enter__(self) -> trace.Span:
        parent = trace.get_current_span(self._parent).get_span_context()
        if parent.is_valid:
            trace_id, random_id, state = parent.trace_id, parent.trace_flags.random_trace_id, parent.trace_state
        else:
            trace_id, random_id, state = _random_id(128), True, None
        span = NonRecordingSpan(SpanContext(
            trace_id, _random_id(64), is_remote=False,
            trace_flags=TraceFlags(TraceFlags.RANDOM_TRACE_ID if random_id else TraceFlags.DEFAULT),
            trace_state=state))
        self._token = otel_context.attach(trace.set_span_in_context(span))
        return span

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        otel_context.detach(self._token)  # type: ignore[arg-type]


def _random_id(bits: int) -> int:
    value = random.getrandbits(bits)
    while value == 0:
        value = random.getrandbits(bits)
    return value


class Tracer:
    """A module's tracer: the SDK's spans while something exports them, `DroppedSpan`s otherwise."""

    __slots__ = ("_sdk",)

    def __init__(self, name: str) -> None:
        self._sdk = trace.get_tracer(name)

    def start_as_current_span(self, name: str, context: otel_context.Context | None = None,
                              kind: SpanKind = SpanKind.INTERNAL, attributes: Mapping[str, Any] | None = None,
                              links: Sequence[Link] | None = None) -> AbstractContextManager[trace.Span]:
        """A span (current inside the `with` block) under `context`'s span, or the current one."""
        if not _SAMPLER.exporting:
            return DroppedSpan(context)
        return self._sdk.start_as_current_span(name, context=context, kind=kind, attributes=attributes,
                                               links=links)


def tracer(name: str) -> Tracer:
    """Return a tracer for a module."""
    return Tracer(name)


def inject_headers(headers: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Return `headers` plus the current trace context (for NATS or HTTP)."""
    carrier: dict[str, str] = dict(headers or {})
    _PROPAGATOR.inject(carrier)
    return carrier


def extract_context(headers: Mapping[str, str] | None) -> otel_context.Context:
    """Return the trace context carried by `headers` (NATS, or HTTP's case-insensitive ones)."""
    if not headers:
        return otel_context.Context()
    value = headers.get("traceparent")
    if value is None:
        return otel_context.Context()
    match = _TRACEPARENT_00.fullmatch(value)
    if match is None or "tracestate" in headers:
        # Other versions, malformed values and trace state: the propagator's full rules.
        carrier = {"traceparent": value}
        state = headers.get("tracestate")
        if state is not None:
            carrier["tracestate"] = state
        return _PROPAGATOR.extract(carrier)
    trace_id, span_id = int(match[1], 16), int(match[2], 16)
    if not trace_id or not span_id:
        return otel_context.Context()
    return trace.set_span_in_context(NonRecordingSpan(SpanContext(
        trace_id, span_id, is_remote=True, trace_flags=TraceFlags(int(match[3], 16)))), otel_context.Context())


def current_trace_id() -> str | None:
    """Hex trace id of the active span, or None."""
    ctx = trace.get_current_span().get_span_context()
    return format(ctx.trace_id, "032x") if ctx.is_valid else None


_PLAIN_LOG_VALUES: frozenset[type] = frozenset({str, int, float, bool, type(None)})


class JsonFormatter(logging.Formatter):
    """One JSON object per line with service, level, message, trace and span ids.

    A line is written for each customer message by several services, so it is built cheaply:
    msgspec encodes it (json.dumps took 5 of a line's 17 µs) and the timestamp's text up to the
    second is kept between lines of the same second. A line with a field of another type than
    text, number, bool or None (whose `str()` may be a redacting repr that msgspec would
    bypass), or with non-ASCII text (which msgspec leaves unescaped: a customer's right-to-left
    override or C1 control must not reach a terminal), is encoded by json.dumps as before."""

    def __init__(self, service_name: str) -> None:
        super().__init__()
        self.service_name = service_name
        self._encoder = msgspec.json.Encoder(enc_hook=str)
        self._second = -1
        self._second_text = ""

    def _timestamp(self, created: float) -> str:
        second = int(created)
        if second != self._second:
            self._second_text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self._second = second
        return f"{self._second_text}.{int((created - second) * 1000):03d}Z"

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": self._timestamp(record.created),
            "level": record.levelname.lower(),
            "service": self.service_name,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        span_ctx = trace.get_current_span().get_span_context()
        if span_ctx.is_valid:
            entry["trace_id"] = format(span_ctx.trace_id, "032x")
            entry["span_id"] = format(span_ctx.span_id, "016x")
        plain = True
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            entry.update(fields)
            plain = all(type(value) in _PLAIN_LOG_VALUES for value in fields.values())
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        if plain:
            try:
                line = self._encoder.encode(entry)
            except (TypeError, ValueError, OverflowError):  # a non-string key, an int beyond 64 bits
                pass
            else:
                if line.isascii():
                    return line.decode("ascii")
        return json.dumps(entry, default=str)


def configure_logging(service_name: str) -> None:
    """Send JSON logs to stderr at THREADLINE_LOG_LEVEL (default INFO)."""
    root = logging.getLogger()
    if any(isinstance(h.formatter, JsonFormatter) for h in root.handlers):
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(service_name))
    root.addHandler(handler)
    root.setLevel(os.environ.get("THREADLINE_LOG_LEVEL", "INFO").upper())
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


def log_fields(**fields: Any) -> dict[str, Any]:
    """`extra=` for a log call that adds structured fields: log.info("x", extra=log_fields(a=1))."""
    return {"fields": fields}
