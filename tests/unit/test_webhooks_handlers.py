"""Pure delivery logic of the `webhooks` service: matching, envelope, headers, retry policy, ordering."""

from __future__ import annotations

import json

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.webhooks.config import WebhooksConfig
from services.webhooks.handlers import (
    NO_RETRY_STATUSES,
    PendingDelivery,
    RetryPolicy,
    WebhookQueue,
    build_envelope,
    classify,
    deliveries_for,
    matching_webhooks,
    request_headers,
)
from shared.config import ConfigError
from shared.encryption import KEY_ENV
from shared.messages.conversation import ConversationCreated, MessageCreated, SwitchboardControlled
from shared.records import SwitchboardIntegrationRecord, SwitchboardRecord, WebhookRecord
from shared.signing import webhook_signature_ok
from shared.sunco import Author, ConversationRef, Message, SwitchboardIntegrationRef, TextContent
from tests.harness import SECRETS_KEY

APP = "a" * 24
OTHER_APP = "b" * 24


def hook(webhook_id: str, app_id: str = APP, triggers: tuple[str, ...] = ("conversation:message",),
         integration_id: str = "i" * 24) -> WebhookRecord:
    return WebhookRecord(id=webhook_id, app_id=app_id, integration_id=integration_id, target="http://127.0.0.1:1/hook",
                         triggers=list(triggers), secret="s3cret-webhook-key-0123456789")


def message_event(event_id: str = "e" * 24, conversation_id: str = "c" * 24, text: str = "hi") -> MessageCreated:
    return MessageCreated(
        id=event_id, app_id=APP, conversation_id=conversation_id, created_at=1_700_000_000.0,
        conversation=ConversationRef(id=conversation_id, type="personal"),
        message=Message(id="m" * 24, received="2023-11-14T22:13:20.000Z", author=Author(type="user", user_id="u" * 24),
                        content=TextContent(text=text)),
        cursor=1, user_id="u" * 24,
    )


def row(seq: int, conversation: str, now: float = 0.0) -> PendingDelivery:
    return PendingDelivery(seq=seq, webhook_id="w1", app_id=APP, event_id=f"ev{seq}", conversation_id=conversation,
                           body=b"{}", traceparent=None, tracestate=None, created_at=now, next_attempt_at=now)


def test_matching_filters_by_app_and_trigger() -> None:
    records = [hook("w2"), hook("w1"), hook("w3", triggers=("conversation:create",)), hook("w4", app_id=OTHER_APP),
               hook("w5", triggers=("*",))]
    assert [r.id for r in matching_webhooks(records, APP, "conversation:message")] == ["w1", "w2", "w5"]
    assert [r.id for r in matching_webhooks(records, APP, "conversation:create")] == ["w3", "w5"]
    assert matching_webhooks(records, "z" * 24, "conversation:message") == []


def test_deliveries_for_builds_one_row_per_matching_webhook() -> None:
    event = message_event()
    rows = deliveries_for(event, [hook("w1"), hook("w2", triggers=("client:add",))],
                          {"traceparent": "00-" + "1" * 32 + "-" + "2" * 16 + "-01"}, now=5.0)
    assert [r.webhook_id for r in rows] == ["w1"]
    only = rows[0]
    assert (only.event_id, only.conversation_id, only.trigger, only.created_at) == (
        event.id, event.conversation_id, "conversation:message", 5.0)
    assert only.traceparent is not None and only.traceparent.startswith("00-1111")
    body = json.loads(only.body)
    assert body["id"] == event.id
    assert body["type"] == "conversation:message"
    assert body["payload"]["message"]["content"] == {"type": "text", "text": "hi"}


def test_deliveries_for_other_trigger_is_empty() -> None:
    created = ConversationCreated(id="f" * 24, app_id=APP, conversation_id="c" * 24, created_at=1.0,
                                  conversation=ConversationRef(id="c" * 24, type="personal"))
    assert deliveries_for(created, [hook("w1")], {}, now=1.0) == []


def test_envelope_and_headers() -> None:
    record = hook("w1")
    body = build_envelope(APP, "w1", "v2", [b'{"id":"e1","type":"conversation:message"}', b'{"id":"e2"}'])
    assert json.loads(body) == {"app": {"id": APP}, "webhook": {"id": "w1", "version": "v2"},
                                "events": [{"id": "e1", "type": "conversation:message"}, {"id": "e2"}]}
    headers = request_headers(record, body, now=1_700_000_000)
    assert headers["X-API-Key"] == record.secret
    assert headers["Content-Type"] == "application/json"
    assert headers["User-Agent"] == "Threadline-Webhooks/0.1"
    assert headers["X-Threadline-Webhook-Id"] == "w1"
    signature = headers["X-Threadline-Signature"]
    assert signature.startswith("t=1700000000,v1=")
    assert webhook_signature_ok(record.secret, body, signature, now=1_700_000_000)
    assert not webhook_signature_ok(record.secret, body + b" ", signature, now=1_700_000_000)


@pytest.mark.parametrize(("status", "outcome"), [
    (200, "delivered"), (204, "delivered"), (299, "delivered"), (None, "retry"), (500, "retry"), (503, "retry"),
    (429, "retry"), (302, "retry"), (408, "retry"), (410, "retry"),
    *((s, "failed") for s in sorted(NO_RETRY_STATUSES)),
])
def test_classify(status: int | None, outcome: str) -> None:
    assert classify(status) == outcome


def test_default_retry_schedule_spans_the_window() -> None:
    policy = RetryPolicy(base=2.0, window=900.0, jitter=lambda: 1.0)
    now, attempts, times = 0.0, 0, [0.0]
    while True:
        attempts += 1
        next_at = policy.next_attempt_at(attempts, failing_since=0.0, now=now)
        if next_at is None:
            break
        assert next_at > now
        now = next_at
        times.append(now)
    assert 8 <= len(times) <= 10
    assert times[:5] == [0.0, 2.0, 6.0, 14.0, 30.0]
    assert times[-1] == 900.0  # the last attempt happens at the end of the 15 minutes


def test_retry_jitter_stays_near_the_doubling() -> None:
    policy = RetryPolicy(base=2.0, window=900.0)
    for attempts in range(1, 8):
        delay = policy.next_attempt_at(attempts, failing_since=100.0, now=100.0)
        assert delay is not None
        expected = 2.0 * 2 ** (attempts - 1)
        assert 0.75 * expected <= delay - 100.0 <= 1.25 * expected


def test_queue_batches_conversations_and_keeps_their_order() -> None:
    queue = WebhookQueue("w1", APP)
    for seq, conv in enumerate(["A", "B", "A", "C", "B"], start=1):
        queue.add(row(seq, conv), now=0.0)
    batch = queue.take_batch(now=0.0, max_events=50)
    assert [(r.conversation_id, r.seq) for r in batch] == [("A", 1), ("A", 3), ("B", 2), ("B", 5), ("C", 4)]
    # While A is in flight its new rows wait.
    queue.add(row(6, "A"), now=0.0)
    queue.add(row(7, "D"), now=0.0)
    assert [r.seq for r in queue.take_batch(now=0.0, max_events=50)] == [7]
    assert queue.take_batch(now=0.0, max_events=50) == []


def test_queue_retry_goes_alone_and_others_flow() -> None:
    policy = RetryPolicy(base=1.0, window=100.0, jitter=lambda: 1.0)
    queue = WebhookQueue("w1", APP)
    queue.add(row(1, "A"), now=0.0)
    queue.add(row(2, "B"), now=0.0)
    first = queue.take_batch(now=0.0, max_events=50)
    result = queue.complete(first, "retry", now=0.0, policy=policy)
    assert [r.seq for r in result.retried] == [1, 2] and not result.delivered
    assert queue.next_due() == 1.0
    assert queue.take_batch(now=0.5, max_events=50) == []
    queue.add(row(3, "B"), now=0.5)
    queue.add(row(4, "C"), now=0.5)
    # C is fresh and flows; B's new row waits behind B's retry.
    assert [r.seq for r in queue.take_batch(now=0.5, max_events=50)] == [4]
    # At t=1 the retries go out one conversation per batch, each with its conversation's due rows.
    assert [r.seq for r in queue.take_batch(now=1.0, max_events=50)] == [1]
    assert [r.seq for r in queue.take_batch(now=1.0, max_events=50)] == [2, 3]


def test_queue_gives_up_after_window_then_gives_followers_one_attempt() -> None:
    policy = RetryPolicy(base=1.0, window=10.0, jitter=lambda: 1.0)
    queue = WebhookQueue("w1", APP)
    queue.add(row(1, "A"), now=0.0)
    now, follower_added = 0.0, False
    while True:
        batch = queue.take_batch(now=now, max_events=1)
        assert [r.seq for r in batch] == [1]
        result = queue.complete(batch, "retry", now=now, policy=policy)
        if result.failed:
            break
        now = result.retried[0].next_attempt_at
        if now >= 5.0 and not follower_added:
            queue.add(row(2, "A", now=now), now=now)
            follower_added = True
    assert now == 10.0 and [r.seq for r in result.failed] == [1]
    # Row 2 arrived while A was failing: after the head is given up it gets one attempt only.
    batch = queue.take_batch(now=now, max_events=1)
    assert [r.seq for r in batch] == [2]
    result = queue.complete(batch, "retry", now=now + 0.1, policy=policy)
    assert [r.seq for r in result.failed] == [2]
    assert queue.is_idle()


def test_queue_non_retryable_failure_releases_the_conversation() -> None:
    policy = RetryPolicy(base=1.0, window=10.0)
    queue = WebhookQueue("w1", APP)
    queue.add(row(1, "A"), now=0.0)
    batch = queue.take_batch(now=0.0, max_events=1)
    queue.add(row(2, "A"), now=0.0)
    result = queue.complete(batch, "failed", now=0.0, policy=policy)
    assert [r.seq for r in result.failed] == [1] and batch[0].attempts == 1
    assert [r.seq for r in queue.take_batch(now=0.0, max_events=5)] == [2]


@settings(max_examples=150, deadline=None)
@given(
    conversations=st.lists(st.sampled_from("ABCD"), min_size=1, max_size=30),
    outcomes=st.lists(st.sampled_from(["delivered", "retry", "retry", "failed"]), min_size=200, max_size=200),
    max_events=st.integers(min_value=1, max_value=5),
)
def test_queue_never_sends_an_event_before_its_predecessor_finished(
        conversations: list[str], outcomes: list[str], max_events: int) -> None:
    policy = RetryPolicy(base=1.0, window=5.0, jitter=lambda: 1.0)
    queue = WebhookQueue("w1", APP)
    for seq, conv in enumerate(conversations):
        queue.add(row(seq, conv), now=0.0)
    finished: dict[str, list[int]] = {}
    inflight: list[list[PendingDelivery]] = []
    now, step = 0.0, 0
    while not queue.is_idle():
        batch = queue.take_batch(now=now, max_events=max_events)
        if batch:
            for index, sent in enumerate(batch):
                # Earlier events of the conversation are finished, or precede it in this envelope.
                earlier = [s for s, c in enumerate(conversations) if c == sent.conversation_id and s < sent.seq]
                before_in_batch = {r.seq for r in batch[:index] if r.conversation_id == sent.conversation_id}
                settled = set(finished.get(sent.conversation_id, [])) | before_in_batch
                assert set(earlier) <= settled, "sent before its predecessor"
            inflight.append(batch)
        if inflight and (not batch or step % 2):
            answered = inflight.pop(0)
            outcome = outcomes[step % len(outcomes)]
            result = queue.complete(answered, outcome, now=now, policy=policy)  # type: ignore[arg-type]
            for r in result.delivered + result.failed:
                finished.setdefault(r.conversation_id, []).append(r.seq)
        elif not batch:
            due = queue.next_due()
            assert due is not None, "stuck with nothing due"
            now = max(now, due)
        step += 1
        assert step < 10_000
    for conv, seqs in finished.items():
        assert seqs == [s for s, c in enumerate(conversations) if c == conv]


def test_config_defaults_and_validation(tmp_path: object) -> None:
    config = WebhooksConfig.from_env({"THREADLINE_DATA_DIR": "/tmp/tl", KEY_ENV: SECRETS_KEY})
    assert config.retry_base_seconds == 2.0 and config.retry_window_seconds == 900.0
    assert config.timeout_seconds == 20.0 and config.database.sqlite_path == "/tmp/tl/webhooks.db"
    assert config.common.http_port == 8085
    shrunk = WebhooksConfig.from_env({"THREADLINE_WEBHOOK_RETRY_BASE_SECONDS": "0.05",
                                      "THREADLINE_WEBHOOK_RETRY_WINDOW_SECONDS": "3", KEY_ENV: SECRETS_KEY})
    assert (shrunk.retry_base_seconds, shrunk.retry_window_seconds) == (0.05, 3.0)
    for name, value in [("THREADLINE_WEBHOOK_RETRY_BASE_SECONDS", "0"),
                        ("THREADLINE_WEBHOOK_RETRY_WINDOW_SECONDS", "-1"),
                        ("THREADLINE_WEBHOOK_RETRY_BASE_SECONDS", "soon"),
                        ("THREADLINE_WEBHOOK_MAX_BATCH_EVENTS", "0"),
                        ("THREADLINE_WEBHOOK_TIMEOUT_SECONDS", "0")]:
        with pytest.raises(ConfigError):
            WebhooksConfig.from_env({name: value})


def test_envelope_events_are_spliced_verbatim() -> None:
    raw = msgspec.json.encode({"id": "e1", "payload": {"text": "é \u2028"}})
    body = build_envelope(APP, "w1", "v2", [raw])
    assert raw in body


# --- the switchboard ---------------------------------------------------------------------------

BOT, AGENT, OBSERVER, OUTSIDER = "1" * 24, "2" * 24, "3" * 24, "4" * 24
SWITCHBOARD = SwitchboardRecord(id="s" * 24, enabled=True, default_switchboard_integration_id="sb-bot", integrations=[
    SwitchboardIntegrationRecord(id="sb-bot", name="bot", integration_id=BOT, integration_type="custom"),
    SwitchboardIntegrationRecord(id="sb-agent", name="agent", integration_id=AGENT, integration_type="custom"),
    SwitchboardIntegrationRecord(id="sb-observer", name="observer", integration_id=OBSERVER,
                                 integration_type="custom", deliver_standby_events=True),
])
SWITCHBOARD_HOOKS = [hook(f"w-{i}", integration_id=i, triggers=("*",)) for i in (BOT, AGENT, OBSERVER, OUTSIDER)]


def controlled(event: MessageCreated, active: str | None, pending: str | None = None) -> MessageCreated:
    ref = ConversationRef(
        id=event.conversation_id, type="personal",
        active_switchboard_integration=None if active is None else SwitchboardIntegrationRef(id=active),
        pending_switchboard_integration=None if pending is None else SwitchboardIntegrationRef(id=pending))
    return msgspec.structs.replace(event, conversation=ref)


def test_only_the_integration_in_control_and_standby_listeners_get_conversation_events() -> None:
    event = controlled(message_event(), "sb-agent", pending="sb-bot")
    rows = deliveries_for(event, SWITCHBOARD_HOOKS, {}, now=1.0, switchboard=SWITCHBOARD)
    assert sorted(r.webhook_id for r in rows) == [f"w-{AGENT}", f"w-{OBSERVER}", f"w-{OUTSIDER}"]
    conversation = json.loads(rows[0].body)["payload"]["conversation"]
    assert conversation["activeSwitchboardIntegration"] == {
        "id": "sb-agent", "name": "agent", "integrationId": AGENT, "integrationType": "custom"}
    assert conversation["pendingSwitchboardIntegration"]["name"] == "bot"
    # Nobody in control (released): only those listening in standby, and integrations outside it.
    released = deliveries_for(controlled(message_event(), None), SWITCHBOARD_HOOKS, {}, 1.0, SWITCHBOARD)
    assert sorted(r.webhook_id for r in released) == [f"w-{OBSERVER}", f"w-{OUTSIDER}"]
    # A disabled switchboard (passed as None) filters nothing.
    assert len(deliveries_for(event, SWITCHBOARD_HOOKS, {}, 1.0, None)) == 4


def test_switchboard_events_reach_every_subscriber_with_their_failures_named() -> None:
    ref = ConversationRef(id="c" * 24, type="personal", active_switchboard_integration=SwitchboardIntegrationRef(
        id="sb-bot"))
    passed = SwitchboardControlled(id="e" * 24, app_id=APP, conversation_id="c" * 24, created_at=1.0,
                                   action="passControl", conversation=ref, metadata={"topic": "billing"},
                                   reason="ticketClosed")
    failed = msgspec.structs.replace(passed, id="f" * 24, action="acceptControl", metadata=None, reason=None,
                                     error={"code": "bad_request", "message": "nothing offered"})
    rows = deliveries_for(passed, SWITCHBOARD_HOOKS, {}, 1.0, SWITCHBOARD)
    assert len(rows) == 4 and rows[0].trigger == "switchboard:passControl"
    payload = json.loads(rows[0].body)["payload"]
    assert payload["metadata"] == {"topic": "billing"} and payload["reason"] == "ticketClosed"
    assert payload["conversation"]["activeSwitchboardIntegration"]["name"] == "bot"
    [failure] = deliveries_for(failed, [hook("w", triggers=("switchboard:acceptControl:failure",))], {}, 1.0,
                               SWITCHBOARD)
    assert failure.trigger == "switchboard:acceptControl:failure"
    assert json.loads(failure.body)["payload"]["error"] == {"code": "bad_request", "message": "nothing offered"}
