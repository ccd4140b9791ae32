"""The hot path's own helpers give what the library calls they replace give."""

from __future__ import annotations

import pytest
from multidict import CIMultiDict
from nats.aio.msg import Msg
from nats.errors import NotJSMessageError
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from shared import bus as bus_module
from shared import telemetry
from shared.bus import Delivery, FromNewerVersion, Poison, Retry, refusal
from shared.ingress import publish_all
from shared.messages import channel as chan
from shared.telemetry import RecordWhenExported, Tracer, extract_context, inject_headers

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
SPAN = "00f067aa0ba902b7"

HEADER_VALUES = [
    f"00-{TRACE}-{SPAN}-01",
    f"00-{TRACE}-{SPAN}-00",
    f"00-{TRACE}-{SPAN}-03",
    f"00-{TRACE.upper()}-{SPAN}-01",  # uppercase hex is not W3C
    f"00-{'0' * 32}-{SPAN}-01",
    f"00-{TRACE}-{'0' * 16}-01",
    f"ff-{TRACE}-{SPAN}-01",
    f"01-{TRACE}-{SPAN}-01-extra",
    f"00-{TRACE}-{SPAN}-01-extra",
    f" 00-{TRACE}-{SPAN}-01",
    f"00-{TRACE[:-1]}_-{SPAN}-01",
    "00-" + "a" * 600,
    "garbage",
    "",
    "\u00e9t\u00e9",
]


def _described(context: otel_context.Context) -> tuple[int, int, int, bool, str | None]:
    span_context = trace.get_current_span(context).get_span_context()
    state = span_context.trace_state.to_header() if span_context.trace_state is not None else None
    return (span_context.trace_id, span_context.span_id, span_context.trace_flags, span_context.is_remote,
            state or None)


@pytest.mark.parametrize("value", HEADER_VALUES)
def test_extract_context_reads_a_traceparent_as_the_w3c_propagator_does(value: str) -> None:
    expected = _described(TraceContextTextMapPropagator().extract({"traceparent": value}))
    assert _described(extract_context({"traceparent": value})) == expected
    state = {"traceparent": value, "tracestate": "vendor=abc,other=1"}
    assert _described(extract_context(state)) == _described(TraceContextTextMapPropagator().extract(state))


def test_extract_context_finds_http_headers_whatever_their_case() -> None:
    headers = CIMultiDict({"Traceparent": f"00-{TRACE}-{SPAN}-01"})
    span_context = trace.get_current_span(extract_context(headers)).get_span_context()
    assert format(span_context.trace_id, "032x") == TRACE and span_context.is_remote
    assert not trace.get_current_span(extract_context({})).get_span_context().is_valid
    assert not trace.get_current_span(extract_context(None)).get_span_context().is_valid


@pytest.fixture
def nothing_exported(monkeypatch: pytest.MonkeyPatch) -> None:
    # Another test of this process may have attached an exporter (setup_telemetry is global).
    monkeypatch.setattr(telemetry._SAMPLER, "exporting", False)


@pytest.mark.usefixtures("nothing_exported")
def test_a_dropped_span_continues_the_trace_is_current_inside_and_is_gone_after() -> None:
    lean = Tracer("t")
    parent = extract_context({"traceparent": f"00-{TRACE}-{SPAN}-03"})
    before = trace.get_current_span()
    with lean.start_as_current_span("work", context=parent, kind=SpanKind.CONSUMER) as span:
        assert trace.get_current_span() is span and not span.is_recording()
        span_context = span.get_span_context()
        assert format(span_context.trace_id, "032x") == TRACE
        assert span_context.span_id not in (0, int(SPAN, 16)) and not span_context.is_remote
        span.set_attribute("ignored", 1)
        outgoing = inject_headers({"x": "1"})
        assert outgoing["traceparent"] == f"00-{TRACE}-{span_context.span_id:016x}-02"
        with lean.start_as_current_span("child") as child:
            assert child.get_span_context().trace_id == span_context.trace_id
    assert trace.get_current_span() is before
    with pytest.raises(ValueError), lean.start_as_current_span("fails"):
        raise ValueError("boom")
    assert trace.get_current_span() is before


@pytest.mark.usefixtures("nothing_exported")
def test_a_dropped_span_carries_what_the_sdk_would_give_it() -> None:
    sdk = TracerProvider(sampler=RecordWhenExported()).get_tracer("sdk")
    lean = Tracer("t")
    for parent in (otel_context.Context(), extract_context({"traceparent": f"00-{TRACE}-{SPAN}-01"}),
                   extract_context({"traceparent": f"00-{TRACE}-{SPAN}-01", "tracestate": "v=1"})):
        with sdk.start_as_current_span("x", context=parent) as theirs, \
                lean.start_as_current_span("x", context=parent) as ours:
            a, b = theirs.get_span_context(), ours.get_span_context()
            assert a.is_valid and b.is_valid and not theirs.is_recording() and not ours.is_recording()
            assert (a.trace_flags, a.trace_state, a.is_remote) == (b.trace_flags, b.trace_state, b.is_remote)
            if trace.get_current_span(parent).get_span_context().is_valid:
                assert a.trace_id == b.trace_id == int(TRACE, 16)
            else:
                assert a.trace_id != b.trace_id


def test_spans_go_through_the_sdk_while_something_exports_them(monkeypatch: pytest.MonkeyPatch) -> None:
    sampler = RecordWhenExported()
    sampler.exporting = True
    provider = TracerProvider(sampler=sampler)
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    lean = Tracer("t")
    monkeypatch.setattr(lean, "_sdk", provider.get_tracer("t"))
    monkeypatch.setattr(telemetry._SAMPLER, "exporting", True)
    parent = extract_context({"traceparent": f"00-{TRACE}-{SPAN}-01"})
    with lean.start_as_current_span("kept", context=parent, kind=SpanKind.PRODUCER) as span:
        assert span.is_recording()
    [finished] = exporter.get_finished_spans()
    assert finished.name == "kept" and finished.kind is SpanKind.PRODUCER
    assert finished.parent is not None and finished.parent.span_id == int(SPAN, 16)


def _message(reply: str) -> Msg:
    return Msg(None, subject="inbound.whatsapp", reply=reply, data=b"{}")  # type: ignore[arg-type]


@pytest.mark.parametrize("reply", [
    "$JS.ACK.INBOUND.conversations.3.1234.1200.1733000000000000000.7",
    "$JS.ACK.hub.ACCHASH.INBOUND.conversations.1.99.98.1733000000000000000.0.abcdef",
])
def test_delivery_facts_read_from_the_ack_subject_match_nats_py(reply: str) -> None:
    msg = _message(reply)
    delivery = Delivery.of(msg)
    meta = msg.metadata
    assert (delivery.subject, delivery.num_delivered, delivery.stream_sequence) == (
        "inbound.whatsapp", meta.num_delivered, meta.sequence.stream)
    assert delivery.published_at == meta.timestamp.timestamp() == 1733000000.0


def test_delivery_facts_fall_back_to_nats_py_for_other_ack_subjects() -> None:
    # Eleven tokens (a v2 subject without its final token): nats-py reads it, so do we.
    eleven = _message("$JS.ACK._.ACC.INBOUND.conversations.2.41.40.1733000000000000000.0")
    assert (Delivery.of(eleven).num_delivered, Delivery.of(eleven).stream_sequence) == (2, 41)
    assert Delivery.of(eleven).published_at == 1733000000.0
    # Not digits where the counts are: whatever nats-py makes of it, not a guess of ours.
    odd = _message("$JS.ACK.INBOUND.conversations.x.1234.1200.1733000000000000000.7")
    with pytest.raises(ValueError):
        odd.metadata  # noqa: B018
    with pytest.raises(ValueError):
        Delivery.of(odd)
    with pytest.raises(NotJSMessageError):
        Delivery.of(_message("_INBOX.not-a-jetstream-reply"))
    assert Delivery.of(_message("$JS.ACK.S.c.0.5.5.1733000000000000000.0")).num_delivered == 1


async def test_publish_all_reports_the_failures_of_one_or_many_publishes() -> None:
    async def ok() -> str:
        return "ok"

    async def fails() -> str:
        raise ConnectionError("bus down")

    assert await publish_all([ok()]) == []
    [only] = await publish_all([fails()])
    assert isinstance(only, ConnectionError)
    failures = await publish_all([ok(), fails(), ok(), fails()])
    assert len(failures) == 2 and all(isinstance(f, ConnectionError) for f in failures)
    assert await publish_all([]) == []


def test_an_undecodable_message_of_an_unknown_type_waits_for_a_newer_version_and_a_malformed_one_is_poison() -> None:
    known = chan.TYPES
    newer = refusal(b'{"type": "channel.inbound.reaction", "emoji": "x"}', ValueError("no"), known, "inbound message")
    assert isinstance(newer, FromNewerVersion) and isinstance(newer, Retry)
    assert newer.delay == bus_module.NEWER_VERSION_RETRY_SECONDS and not newer.let_pass
    # A known type that does not validate, no type, not an object, not JSON: nothing newer will read them.
    for data in (b'{"type": "channel.inbound.message", "app_id": 5}', b'{"id": 1}', b'[1]', b'\xff{',
                 b'{"type": 7}'):
        assert isinstance(refusal(data, ValueError("bad"), known, "inbound message"), Poison), data
