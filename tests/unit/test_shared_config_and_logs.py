"""Pure logic of shared/: config validation, JSON logs with trace ids, signatures, ids."""

from __future__ import annotations

import json
import logging

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from shared.config import CommonConfig, ConfigError, env_secret
from shared.ids import is_sunco_id, iso, new_id, parse_iso
from shared.signing import (
    JwtError,
    jwt_decode,
    jwt_encode,
    meta_signature,
    meta_signature_ok,
    sign_token,
    verify_token,
    webhook_signature,
    webhook_signature_ok,
)
from shared.telemetry import JsonFormatter, RecordWhenExported, setup_telemetry


def test_placeholder_secrets_are_refused_outside_the_sandbox() -> None:
    for bad in ("changeme", "secret", "", "short"):
        with pytest.raises(ConfigError):
            env_secret("X_SECRET", sandbox=False, environ={"X_SECRET": bad})
    assert env_secret("X_SECRET", sandbox=False, environ={"X_SECRET": "a-real-secret-of-32-characters!!"})
    assert env_secret("X_SECRET", sandbox=True, default="dev", environ={}) == "dev"


def test_common_config_validates() -> None:
    with pytest.raises(ConfigError):
        CommonConfig.from_env(8081, {"THREADLINE_HTTP_PORT": "nope"})
    with pytest.raises(ConfigError):
        CommonConfig.from_env(8081, {"THREADLINE_STREAM_REPLICAS": "2"})
    config = CommonConfig.from_env(8081, {"THREADLINE_PUBLIC_BASE_URL": "https://chat.example.com/"})
    assert config.http_port == 8081 and config.public_base_url == "https://chat.example.com"


def test_json_log_lines_carry_the_trace_id() -> None:
    setup_telemetry("unit")
    record = logging.LogRecord("t", logging.INFO, __file__, 1, "hello %s", ("world",), None)
    formatter = JsonFormatter("unit")
    with trace.get_tracer("t").start_as_current_span("work") as span:
        line = json.loads(formatter.format(record))
        expected = format(span.get_span_context().trace_id, "032x")
    assert line["msg"] == "hello world" and line["service"] == "unit" and line["level"] == "info"
    assert line["trace_id"] == expected
    assert "trace_id" not in json.loads(formatter.format(record))


def test_spans_are_recorded_only_when_exported_and_keep_their_trace_ids_either_way() -> None:
    sampler = RecordWhenExported()
    provider = TracerProvider(sampler=sampler)
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("t")
    with tracer.start_as_current_span("dropped") as dropped, tracer.start_as_current_span("child") as child:
        assert not dropped.is_recording() and dropped.get_span_context().is_valid
        assert child.get_span_context().trace_id == dropped.get_span_context().trace_id
    assert exporter.get_finished_spans() == ()
    sampler.exporting = True
    with tracer.start_as_current_span("kept") as kept:
        assert kept.is_recording()
    assert [span.name for span in exporter.get_finished_spans()] == ["kept"]


def test_signatures_and_tokens() -> None:
    body = b'{"object":"whatsapp_business_account","entry":[]}'
    assert meta_signature("appsecret", body) == (
        "sha256=09eceea024af6e6343b760cc9bd3ae7c056938dd636e24e92109eb8219500384")  # platforms.md §1.3 vector
    assert meta_signature_ok("appsecret", body, meta_signature("appsecret", body))
    assert not meta_signature_ok("appsecret", body + b" ", meta_signature("appsecret", body))
    assert not meta_signature_ok("appsecret", body, None)
    header = webhook_signature("s3cret", b"{}", timestamp=1_700_000_000)
    assert webhook_signature_ok("s3cret", b"{}", header, now=1_700_000_100)
    assert not webhook_signature_ok("s3cret", b"{}", header, now=1_700_001_000)  # too old
    assert not webhook_signature_ok("other", b"{}", header, now=1_700_000_100)
    token = jwt_encode({"scope": "app"}, "key", kid="app_1")
    assert jwt_decode(token, "key") == {"scope": "app"}
    with pytest.raises(JwtError):
        jwt_decode(token, "wrong")
    with pytest.raises(JwtError):
        jwt_decode(jwt_encode({"exp": 1}, "key"), "key")
    signed = sign_token("k", {"user": "u1"})
    assert verify_token("k", signed) == {"user": "u1"}
    assert verify_token("k", signed[:-2] + "xx") is None


def test_ids_and_timestamps() -> None:
    ids = {new_id() for _ in range(1000)}
    assert len(ids) == 1000 and all(is_sunco_id(i) for i in ids)
    assert iso(1717000000.5) == "2024-05-29T16:26:40.500Z"
    assert parse_iso(iso(1717000000.5)) == 1717000000.5
