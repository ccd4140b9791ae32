"""The sandbox's FCM and APNs fakes, served on loopback, against the gateway's push senders
(`services.app.push`) and against firebase-admin 7.7.0 (platform reference §6, §9)."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import firebase_admin
import httpx
import pytest
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from firebase_admin import credentials, messaging
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from services.app.push import ApnsSender, FcmSender, PushMessage, push_sender
from services.sandbox.channels import build_channel_fakes
from services.sandbox.push_fake import (
    FCM_TOKEN_RE,
    FakeApns,
    FakeFcm,
    apns_points_at_sandbox,
    fcm_points_at_sandbox,
    sandbox_android_config,
    sandbox_ios_config,
)
from shared import records, subjects
from shared.bus import Bus
from shared.ids import new_id
from shared.records import IntegrationRecord
from shared.telemetry import setup_telemetry, tracer
from tests.fakes.whatsapp_env import eventually
from tests.harness import LOOPBACK_EGRESS, System
from threadline.natsserver import free_port

APP_ID = new_id()
# firebase-admin 7.7 marks Message.token deprecated in favour of fid; FCM still takes token.
pytestmark = pytest.mark.filterwarnings("ignore:Message.token is deprecated")
MESSAGE = PushMessage(title="Threadline Shop", body="Your order has shipped",
                      data={"conversationId": "c0ffee", "messageId": "m1", "appId": APP_ID},
                      collapse_id="c0ffee", badge=2)


def _pem(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> str:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption()).decode()


OTHER_RSA = _pem(rsa.generate_private_key(public_exponent=65537, key_size=2048))
OTHER_EC = _pem(ec.generate_private_key(ec.SECP256R1()))


@dataclass
class Served:
    fcm: FakeFcm
    apns: FakeApns
    port: int
    android: IntegrationRecord
    ios: IntegrationRecord
    ios_other: IntegrationRecord  # a second app (another bundle id) of the same team
    seen: list[tuple[str, dict[str, str]]] = field(default_factory=list)  # (path, headers) of every request

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def sync(self) -> None:
        self.fcm.sync([self.android])
        self.apns.sync([self.ios, self.ios_other])


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[Served]:
    """Both fakes on loopback, synced from one android and two ios integration records."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    fcm, apns = FakeFcm(f"{base}/sandbox"), FakeApns(f"{base}/sandbox")
    android = IntegrationRecord(id=new_id(), app_id=APP_ID, type="android", config=sandbox_android_config(base))
    ios = IntegrationRecord(id=new_id(), app_id=APP_ID, type="ios", config=sandbox_ios_config(base))
    other_cfg = {**sandbox_ios_config(base, bundle_id="com.threadline.other"),
                 "keyId": ios.config["keyId"] + "B", "teamId": ios.config["teamId"]}
    ios_other = IntegrationRecord(id=new_id(), app_id=APP_ID, type="ios", config=other_cfg)
    state = Served(fcm, apns, port, android, ios, ios_other)
    state.sync()

    @web.middleware
    async def record(request: web.Request, handler: Any) -> web.StreamResponse:
        state.seen.append((request.path, dict(request.headers)))
        response: web.StreamResponse = await handler(request)
        return response

    app = web.Application(middlewares=[record])
    app.router.add_routes(fcm.routes("/sandbox"))
    app.router.add_routes(apns.routes("/sandbox"))
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield state
    finally:
        await fcm.close()
        await apns.close()
        await runner.cleanup()


async def _device(served: Served, channel: str, integration_id: str) -> str:
    async with httpx.AsyncClient() as client:
        response = await client.post(f"{served.base}/sandbox/{channel}/{integration_id}/devices", json={})
    assert response.status_code == 201
    token: str = response.json()["token"]
    return token


async def _outbox(served: Served, channel: str, integration_id: str, token: str) -> list[dict[str, Any]]:
    async with httpx.AsyncClient() as client:
        response = await client.get(f"{served.base}/sandbox/{channel}/{integration_id}/outbox",
                                    params={"to": token})
    assert response.status_code == 200
    messages: list[dict[str, Any]] = response.json()["messages"]
    return messages


# --- FCM -------------------------------------------------------------------------------------------


async def test_fcm_sender_exchanges_a_token_then_sends_and_reuses_the_token(served: Served) -> None:
    token = await _device(served, "android", served.android.id)
    assert FCM_TOKEN_RE.match(token)
    sender = push_sender("android", served.android.config, LOOPBACK_EGRESS)
    try:
        first = await sender.send(token, MESSAGE)
        second = await sender.send(token, PushMessage(title="Shop", body="and again"))
    finally:
        await sender.close()
    project = served.android.config["projectId"]
    assert first.status == "sent" and second.status == "sent"
    assert re.fullmatch(rf"projects/{project}/messages/0:\d+%[0-9a-f]{{16}}", first.provider_id)
    assert served.fcm.token_requests == [served.android.id]  # one exchange for both sends
    [pushed, again] = await _outbox(served, "android", served.android.id, token)
    assert pushed["name"] == first.provider_id and isinstance(pushed["receivedAt"], float)
    message = pushed["message"]
    assert message["token"] == token
    assert message["notification"] == {"title": "Threadline Shop", "body": "Your order has shipped"}
    assert message["data"] == {"conversationId": "c0ffee", "messageId": "m1", "appId": APP_ID}
    assert message["android"]["priority"] == "high" and message["android"]["collapse_key"] == "c0ffee"
    assert message["android"]["notification"]["tag"] == "c0ffee"
    assert again["message"]["notification"]["body"] == "and again"


async def test_fcm_revoked_or_unknown_token_is_unregistered(served: Served) -> None:
    token = await _device(served, "android", served.android.id)
    async with httpx.AsyncClient() as client:
        revoked = await client.post(f"{served.base}/sandbox/android/{served.android.id}/devices/{token}/revoke")
        unknown = await client.post(f"{served.base}/sandbox/android/{served.android.id}/devices/nope/revoke")
    assert revoked.status_code == 200 and revoked.json()["revoked"] is True
    assert unknown.status_code == 404 and unknown.json()["errors"][0]["code"] == "not_found"
    sender = FcmSender(served.android.config, policy=LOOPBACK_EGRESS)
    try:
        gone = await sender.send(token, MESSAGE)
        never = await sender.send(served.fcm.new_token(), MESSAGE)
    finally:
        await sender.close()
    assert (gone.status, gone.code, gone.reason) == ("unregistered", "UNREGISTERED", "Requested entity was not found.")
    assert never.status == "unregistered"
    assert await _outbox(served, "android", served.android.id, token) == []


async def test_fcm_scripted_503_is_retry_with_retry_after_then_sends(served: Served) -> None:
    token = await _device(served, "android", served.android.id)
    async with httpx.AsyncClient() as client:
        bad = await client.post(f"{served.base}/sandbox/android/{served.android.id}/errors", json={"status": 99})
        scripted = await client.post(f"{served.base}/sandbox/android/{served.android.id}/errors",
                                     json={"status": 503, "code": "UNAVAILABLE", "count": 1, "retryAfter": 7})
    assert bad.status_code == 400 and "status" in bad.json()["errors"][0]["title"]
    assert scripted.status_code == 200 and scripted.json() == {"queued": 1}
    sender = FcmSender(served.android.config, policy=LOOPBACK_EGRESS)
    try:
        transient = await sender.send(token, MESSAGE)
        later = await sender.send(token, MESSAGE)
    finally:
        await sender.close()
    assert (transient.status, transient.code, transient.retry_after) == ("retry", "UNAVAILABLE", 7.0)
    assert later.status == "sent"


async def test_fcm_forged_key_fails_at_the_token_exchange(served: Served) -> None:
    token = await _device(served, "android", served.android.id)
    forged = {**served.android.config, "privateKey": OTHER_RSA}
    sender = FcmSender(forged, policy=LOOPBACK_EGRESS)
    try:
        outcome = await sender.send(token, MESSAGE)
    finally:
        await sender.close()
    assert (outcome.status, outcome.code, outcome.reason) == ("failed", "invalid_grant", "Invalid JWT Signature.")
    assert served.fcm.token_requests == [] and served.fcm.requests == 0
    assert await _outbox(served, "android", served.android.id, token) == []


async def test_fcm_401_forces_one_token_refresh_and_one_retry(served: Served) -> None:
    token = await _device(served, "android", served.android.id)
    sender = FcmSender(served.android.config, policy=LOOPBACK_EGRESS)
    try:
        assert (await sender.send(token, MESSAGE)).status == "sent"
        served.fcm.revoke_access_tokens()  # Google revoked it early
        outcome = await sender.send(token, MESSAGE)
    finally:
        await sender.close()
    assert outcome.status == "sent"
    assert len(served.fcm.token_requests) == 2 and served.fcm.requests == 3  # 200, 401, 200


async def test_fcm_concurrent_first_sends_share_one_token_exchange(served: Served) -> None:
    tokens = [await _device(served, "android", served.android.id) for _ in range(5)]
    sender = FcmSender(served.android.config, policy=LOOPBACK_EGRESS)
    try:
        outcomes = await asyncio.gather(*(sender.send(t, MESSAGE) for t in tokens))
    finally:
        await sender.close()
    assert [o.status for o in outcomes] == ["sent"] * 5
    assert served.fcm.token_requests == [served.android.id]


async def test_fcm_network_error_is_retry(served: Served) -> None:
    config = {**served.android.config, "tokenUri": f"http://127.0.0.1:{free_port()}/token"}
    sender = FcmSender(config, policy=LOOPBACK_EGRESS)
    try:
        outcome = await sender.send(served.fcm.new_token(), MESSAGE)
    finally:
        await sender.close()
    assert outcome.status == "retry" and outcome.code == "network"


async def test_fcm_fake_validates_the_message(served: Served) -> None:
    """What FCM refuses with INVALID_ARGUMENT, the fake refuses too (and the sender reports "failed")."""
    token = await _device(served, "android", served.android.id)
    sender = FcmSender(served.android.config, policy=LOOPBACK_EGRESS)
    try:
        access = await sender._access()
        assert isinstance(access, str)
        url = sender.settings.send_url
        async with httpx.AsyncClient(headers={"authorization": f"Bearer {access}"}) as client:
            two_targets = await client.post(url, json={"message": {"token": token, "topic": "news"}})
            number_data = await client.post(url, json={"message": {"token": token, "data": {"n": 1}}})
            unknown = await client.post(url, json={"message": {"token": token}, "priority": "high"})
            nested = await client.post(url, content=b"[" * 50_000 + b"]" * 50_000)
            dry = await client.post(url, json={"message": {"token": token}, "validate_only": True})
            other_project = await client.post(url.replace(served.android.config["projectId"], "someone-else"),
                                              json={"message": {"token": token}})
            anonymous = await client.post(url, json={"message": {"token": token}}, headers={"authorization": ""})
    finally:
        await sender.close()
    for response in (two_targets, number_data, unknown, nested):
        error = response.json()["error"]
        assert response.status_code == 400 and error["status"] == "INVALID_ARGUMENT"
        assert error["details"][0] == {"@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError",
                                       "errorCode": "INVALID_ARGUMENT"}
    assert "message.data[0].value" in number_data.json()["error"]["message"]
    assert dry.status_code == 200 and dry.json()["name"].endswith("/messages/fake_message_id")
    assert other_project.status_code == 403 and other_project.json()["error"]["status"] == "PERMISSION_DENIED"
    assert anonymous.status_code == 401 and anonymous.json()["error"]["status"] == "UNAUTHENTICATED"
    assert await _outbox(served, "android", served.android.id, token) == []  # nothing delivered


@pytest.fixture
def firebase_app(served: Served, monkeypatch: pytest.MonkeyPatch) -> Any:
    """firebase-admin with the integration's own service-account JSON, token_uri pointed at the fake
    token endpoint and FCM_URL at the fake FCM (reference §9)."""
    cfg = served.android.config
    service_account = {
        "type": "service_account", "project_id": cfg["projectId"], "private_key_id": cfg["privateKeyId"],
        "private_key": cfg["privateKey"], "client_email": cfg["clientEmail"], "client_id": "1234567890",
        "token_uri": cfg["tokenUri"]}
    monkeypatch.setattr(messaging._MessagingService, "FCM_URL",
                        f"{served.base}/sandbox/fcm/v1/projects/{{0}}/messages:send")
    app = firebase_admin.initialize_app(credentials.Certificate(service_account), name=f"push-{new_id()}")
    try:
        yield app
    finally:
        firebase_admin.delete_app(app)


async def test_firebase_admin_sends_through_the_fake_and_sees_unregistered(served: Served, firebase_app: Any) -> None:
    token = await _device(served, "android", served.android.id)
    message = messaging.Message(
        token=token, notification=messaging.Notification(title="Hi", body="You have a message"),
        data={"conversation_id": "c1"}, android=messaging.AndroidConfig(priority="high", ttl=3600),
        apns=messaging.APNSConfig(headers={"apns-priority": "10"},
                                  payload=messaging.APNSPayload(aps=messaging.Aps(badge=1, sound="default"))))
    name = await asyncio.to_thread(messaging.send, message, False, firebase_app)
    assert name.startswith(f"projects/{served.android.config['projectId']}/messages/0:")
    assert served.fcm.token_requests == [served.android.id]  # google-auth did the real JWT-bearer exchange
    dry = await asyncio.to_thread(messaging.send, message, True, firebase_app)
    assert dry.endswith("/messages/fake_message_id")
    [received] = await _outbox(served, "android", served.android.id, token)
    assert received["message"]["android"] == {"priority": "high", "ttl": "3600s"}
    assert received["message"]["apns"]["payload"] == {"aps": {"badge": 1, "sound": "default"}}
    served.fcm.revoke(token)
    with pytest.raises(messaging.UnregisteredError):
        await asyncio.to_thread(messaging.send, message, False, firebase_app)


# --- APNs ------------------------------------------------------------------------------------------


async def test_apns_sender_sends_with_the_headers_apple_expects(served: Served) -> None:
    token = await _device(served, "ios", served.ios.id)
    assert re.fullmatch(r"[0-9a-f]{64}", token)
    sender = push_sender("ios", served.ios.config, LOOPBACK_EGRESS)
    try:
        outcome = await sender.send(token, MESSAGE)
        again = await sender.send(token, MESSAGE)
    finally:
        await sender.close()
    assert outcome.status == "sent" and again.status == "sent"
    assert re.fullmatch(r"[0-9a-f-]{36}", outcome.provider_id) and outcome.provider_id != again.provider_id
    [pushed, _] = await _outbox(served, "ios", served.ios.id, token)
    assert pushed["aps"] == {"alert": {"title": "Threadline Shop", "body": "Your order has shipped"},
                             "sound": "default", "badge": 2}
    assert pushed["conversationId"] == "c0ffee" and pushed["deviceToken"] == token
    headers = pushed["apnsHeaders"]
    assert headers["apns-topic"] == served.ios.config["bundleId"] and headers["apns-push-type"] == "alert"
    assert headers["apns-priority"] == "10" and headers["apns-collapse-id"] == "c0ffee"
    assert headers["apns-id"] == outcome.provider_id
    assert int(headers["apns-expiration"]) > time.time() + 3600


async def test_apns_revoked_device_is_unregistered_and_bad_tokens_too(served: Served) -> None:
    token = await _device(served, "ios", served.ios.id)
    served.apns.revoke(token)
    sender = ApnsSender(served.ios.config, policy=LOOPBACK_EGRESS)
    try:
        gone = await sender.send(token, MESSAGE)
        unknown = await sender.send("ab" * 32, MESSAGE)
        not_hex = await sender.send("../../etc/passwd", MESSAGE)
    finally:
        await sender.close()
    assert (gone.status, gone.code) == ("unregistered", "Unregistered")
    assert (unknown.status, unknown.code) == ("unregistered", "BadDeviceToken")
    assert (not_hex.status, not_hex.code) == ("unregistered", "BadDeviceToken")
    assert served.apns.requests == 2  # the non-hex token never left the gateway


async def test_apns_wrong_topic_fails_and_another_apps_device_is_unregistered(served: Served) -> None:
    other_app_device = await _device(served, "ios", served.ios_other.id)
    own_device = await _device(served, "ios", served.ios.id)
    wrong_bundle = ApnsSender({**served.ios.config, "bundleId": "com.example.not-ours"}, policy=LOOPBACK_EGRESS)
    sender = ApnsSender(served.ios.config, policy=LOOPBACK_EGRESS)
    try:
        disallowed = await wrong_bundle.send(own_device, MESSAGE)
        not_for_topic = await sender.send(other_app_device, MESSAGE)
    finally:
        await wrong_bundle.close()
        await sender.close()
    assert (disallowed.status, disallowed.code) == ("failed", "TopicDisallowed")
    assert (not_for_topic.status, not_for_topic.code) == ("unregistered", "DeviceTokenNotForTopic")


async def test_apns_expired_provider_token_is_regenerated_once(served: Served) -> None:
    token = await _device(served, "ios", served.ios.id)
    times = [time.time() - 7200]  # the first JWT is minted two hours ago, as a stale cache would hold

    def clock() -> float:
        return times.pop(0) if times else time.time()

    sender = ApnsSender(served.ios.config, clock=clock, policy=LOOPBACK_EGRESS)
    try:
        outcome = await sender.send(token, MESSAGE)
    finally:
        await sender.close()
    assert outcome.status == "sent"
    assert served.apns.requests == 2  # 403 ExpiredProviderToken, then 200 with a fresh JWT
    assert len(await _outbox(served, "ios", served.ios.id, token)) == 1


async def test_apns_forged_key_and_scripted_errors(served: Served) -> None:
    token = await _device(served, "ios", served.ios.id)
    forged = ApnsSender({**served.ios.config, "signingKey": OTHER_EC}, policy=LOOPBACK_EGRESS)
    sender = ApnsSender(served.ios.config, policy=LOOPBACK_EGRESS)
    async with httpx.AsyncClient() as client:
        scripted = await client.post(f"{served.base}/sandbox/ios/{served.ios.id}/errors",
                                     json={"status": 503, "code": "ServiceUnavailable", "retryAfter": 3})
        assert scripted.status_code == 200
    try:
        refused = await forged.send(token, MESSAGE)
        busy = await sender.send(token, MESSAGE)
        served.apns.fail_next(served.ios.id, 400, "BadTopic")
        bad = await sender.send(token, MESSAGE)
        ok = await sender.send(token, MESSAGE)
    finally:
        await forged.close()
        await sender.close()
    assert (refused.status, refused.code) == ("failed", "InvalidProviderToken")
    assert (busy.status, busy.code, busy.retry_after) == ("retry", "ServiceUnavailable", 3.0)
    assert (bad.status, bad.code) == ("failed", "BadTopic")
    assert ok.status == "sent"


async def test_apns_fake_refuses_what_apple_refuses(served: Served) -> None:
    token = await _device(served, "ios", served.ios.id)
    sender = ApnsSender(served.ios.config, policy=LOOPBACK_EGRESS)
    jwt = sender.provider_token()
    await sender.close()
    url = f"{served.base}/sandbox/apns/3/device/{token}"
    good = {"authorization": f"bearer {jwt}", "apns-topic": served.ios.config["bundleId"]}

    async with httpx.AsyncClient() as client:
        async def reason(headers: dict[str, str], body: bytes = b'{"aps":{"alert":"hi"}}') -> tuple[int, str]:
            response = await client.post(url, headers=headers, content=body)
            return response.status_code, response.json()["reason"]

        assert await reason({"apns-topic": "x"}) == (403, "MissingProviderToken")
        assert await reason({**good, "authorization": "bearer a.b.c"}) == (403, "InvalidProviderToken")
        assert await reason({k: v for k, v in good.items() if k != "apns-topic"}) == (400, "MissingTopic")
        assert await reason({**good, "apns-priority": "7"}) == (400, "BadPriority")
        assert await reason({**good, "apns-collapse-id": "c" * 65}) == (400, "BadCollapseId")
        assert await reason({**good, "apns-id": "not-a-uuid"}) == (400, "BadMessageId")
        assert await reason(good, b"{}") == (400, "PayloadEmpty")
        assert await reason(good, b"[" * 2000 + b"]" * 2000) == (400, "PayloadEmpty")
        assert await reason(good, b'{"aps":{},"x":"' + b"y" * 4100 + b'"}') == (413, "PayloadTooLarge")
        plain = await client.post(url, headers=good, content=b'{"aps":{"alert":"hi"}}')
    assert plain.status_code == 200 and plain.headers["apns-id"]


async def test_push_senders_open_client_spans_and_send_traceparent(served: Served) -> None:
    exporter = InMemorySpanExporter()
    setup_telemetry("tests", extra_processor=SimpleSpanProcessor(exporter))
    android_token = await _device(served, "android", served.android.id)
    ios_token = await _device(served, "ios", served.ios.id)
    fcm = FcmSender(served.android.config, policy=LOOPBACK_EGRESS)
    apns = ApnsSender(served.ios.config, policy=LOOPBACK_EGRESS)
    try:
        with tracer("tests").start_as_current_span("push consumer") as parent:
            trace_id = format(parent.get_span_context().trace_id, "032x")
            assert (await fcm.send(android_token, MESSAGE)).status == "sent"
            assert (await apns.send(ios_token, MESSAGE)).status == "sent"
    finally:
        await fcm.close()
        await apns.close()
    platform_calls = [(path, headers) for path, headers in served.seen if "/devices" not in path]
    assert [path.rsplit("/", 1)[-1] for path, _ in platform_calls] == ["token", "messages:send", ios_token]
    for _, headers in platform_calls:
        assert headers["traceparent"].split("-")[1] == trace_id
    client_spans = {s.name: s for s in exporter.get_finished_spans() if s.kind == SpanKind.CLIENT}
    assert {"oauth2 token", "fcm messages:send", "apns push"} <= set(client_spans)
    apns_span = client_spans["apns push"]
    assert apns_span.attributes is not None and apns_span.attributes["http.response.status_code"] == 200
    assert ios_token not in str(dict(apns_span.attributes))  # only the token's last 6 characters


# --- sandbox wiring and persistence ----------------------------------------------------------------


def test_build_channel_fakes_hosts_both_push_fakes_and_sync_follows_the_records(tmp_path: Path) -> None:
    fakes = build_channel_fakes("http://gw.test/sandbox", str(tmp_path))
    fcm = next(f for f in fakes if isinstance(f, FakeFcm))
    apns = next(f for f in fakes if isinstance(f, FakeApns))
    assert fcm.store_path == str(tmp_path / "sandbox-android.jsonl")
    assert apns.store_path == str(tmp_path / "sandbox-ios.jsonl")
    android_cfg = sandbox_android_config("http://gw.test")
    assert fcm_points_at_sandbox(android_cfg["baseUrl"]) and not fcm_points_at_sandbox("https://fcm.googleapis.com")
    assert apns_points_at_sandbox(sandbox_ios_config("http://gw.test")["baseUrl"])
    real = IntegrationRecord(id=new_id(), app_id=APP_ID, type="android",
                             config={**android_cfg, "baseUrl": "https://fcm.googleapis.com"})
    sandboxed = IntegrationRecord(id=new_id(), app_id=APP_ID, type="android", config=android_cfg)
    broken = IntegrationRecord(id=new_id(), app_id=APP_ID, type="android",
                               config={**android_cfg, "privateKey": "not a key"})
    fcm.sync([real, sandboxed, broken])
    assert list(fcm.accounts) == [sandboxed.id]
    fcm.sync([])
    assert fcm.accounts == {}


async def test_devices_revocations_and_outbox_survive_a_restart(tmp_path: Path) -> None:
    base = "http://127.0.0.1:1"
    store = str(tmp_path / "sandbox-ios.jsonl")
    record = IntegrationRecord(id=new_id(), app_id=APP_ID, type="ios", config=sandbox_ios_config(base))
    fake = FakeApns(f"{base}/sandbox", store_path=store)
    fake.sync([record])
    kept, gone = fake.add_device(record.id, "iPhone"), fake.add_device(record.id)
    fake.revoke(gone.token)
    fake._record_push(kept.token, {"aps": {"alert": "hi"}, "receivedAt": 1.0})
    restarted = FakeApns(f"{base}/sandbox", store_path=store)
    assert restarted.devices[kept.token].name == "iPhone" and restarted.devices[gone.token].revoked_at is not None
    assert restarted.outbox(record.id, kept.token) == [{"aps": {"alert": "hi"}, "receivedAt": 1.0}]
    fcm_store = str(tmp_path / "sandbox-android.jsonl")
    fcm = FakeFcm(store_path=fcm_store)
    android = IntegrationRecord(id=new_id(), app_id=APP_ID, type="android", config=sandbox_android_config(base))
    fcm.sync([android])
    device = fcm.add_device(android.id)
    assert FakeFcm(store_path=fcm_store).devices[device.token].integration_id == android.id


async def test_sandbox_service_fakes_push_for_integrations_in_the_bucket(system: System, bus: Bus) -> None:
    """Through the running sandbox (front door, KV-synced accounts, journal): both senders deliver,
    and devices plus outbox survive a sandbox restart."""
    await system.start("sandbox")
    android = IntegrationRecord(id=new_id(), app_id=APP_ID, type="android",
                                config=sandbox_android_config(system.base_url))
    ios = IntegrationRecord(id=new_id(), app_id=APP_ID, type="ios", config=sandbox_ios_config(system.base_url))
    kv = await bus.key_value(subjects.INTEGRATIONS_BUCKET)
    for record in (android, ios):
        await kv.put(record.id, records.ENCODER.encode(record))

    async with httpx.AsyncClient(base_url=system.base_url) as http:
        async def device(channel: str, integration_id: str) -> str | None:
            response = await http.post(f"/sandbox/{channel}/{integration_id}/devices", json={"name": "phone"})
            return str(response.json()["token"]) if response.status_code == 201 else None

        android_token = await eventually(lambda: device("android", android.id))
        ios_token = await eventually(lambda: device("ios", ios.id))
        fcm = push_sender("android", android.config, LOOPBACK_EGRESS)
        apns = push_sender("ios", ios.config, LOOPBACK_EGRESS)
        try:
            assert (await fcm.send(android_token, MESSAGE)).status == "sent"
            assert (await apns.send(ios_token, MESSAGE)).status == "sent"
        finally:
            await fcm.close()
            await apns.close()
        assert (Path(system.data_dir) / "sandbox-android.jsonl").is_file()

        await system.restart_service("sandbox")

        async def outbox(channel: str, integration_id: str, token: str) -> list[dict[str, Any]] | None:
            response = await http.get(f"/sandbox/{channel}/{integration_id}/outbox", params={"to": token})
            return response.json()["messages"] if response.status_code == 200 else None

        [fcm_push] = await eventually(lambda: outbox("android", android.id, android_token))
        [apns_push] = await eventually(lambda: outbox("ios", ios.id, ios_token))
        assert fcm_push["message"]["token"] == android_token and apns_push["deviceToken"] == ios_token
        listed = (await http.get(f"/sandbox/ios/{ios.id}/devices")).json()["devices"]
        assert listed == [{"token": ios_token, "name": "phone", "createdAt": listed[0]["createdAt"],
                           "revoked": False, "pushes": 1}]
