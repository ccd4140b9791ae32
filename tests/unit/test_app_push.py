"""Pure logic of the push senders (`services.app.push`): JWTs (decoded by PyJWT, an independent
implementation), the FCM body, the APNs headers and payload, and the error classification tables."""

from __future__ import annotations

import base64
import json
import time
from email.utils import formatdate
from typing import Any

import jwt as pyjwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from services.app.push import (
    APNS_PAYLOAD_MAX_BYTES,
    APNS_SANDBOX_URL,
    FCM_SCOPE,
    ApnsSender,
    ApnsSettings,
    FcmSender,
    FcmSettings,
    PushMessage,
    apns_collapse_id,
    apns_headers,
    apns_payload,
    apns_provider_token,
    classify_apns,
    classify_fcm,
    classify_token_error,
    fcm_assertion,
    fcm_request_body,
    push_sender,
    retry_after_seconds,
    truncate_body,
)
from shared.egress import EgressPolicy

RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_KEY = ec.generate_private_key(ec.SECP256R1())


def _pem(key: Any) -> str:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption()).decode()


ANDROID = {"projectId": "demo-proj", "clientEmail": "fcm@demo-proj.iam.gserviceaccount.com",
           "privateKey": _pem(RSA_KEY), "privateKeyId": "abc123"}
IOS = {"keyId": "ABC123DEFG", "teamId": "TEAM123456", "bundleId": "com.example.app", "signingKey": _pem(EC_KEY)}
MESSAGE = PushMessage(title="Shop", body="Hello there", data={"conversationId": "c1", "messageId": "m1"},
                      collapse_id="c1", badge=3)


def _fcm_error(status: int, rpc: str, code: str | None, message: str = "") -> bytes:
    error: dict[str, Any] = {"code": status, "message": message, "status": rpc}
    if code:
        error["details"] = [{"@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError", "errorCode": code}]
    return json.dumps({"error": error}).encode()


# --- JWTs ------------------------------------------------------------------------------------------


def test_fcm_assertion_is_an_rs256_jwt_with_googles_claims() -> None:
    settings = FcmSettings.from_config(ANDROID)
    assertion = fcm_assertion(settings, 1_700_000_000.7)
    assert pyjwt.get_unverified_header(assertion) == {"alg": "RS256", "typ": "JWT", "kid": "abc123"}
    claims = pyjwt.decode(assertion, RSA_KEY.public_key(), algorithms=["RS256"],
                          audience="https://oauth2.googleapis.com/token", options={"verify_exp": False})
    assert claims == {"iss": ANDROID["clientEmail"], "scope": FCM_SCOPE,
                      "aud": "https://oauth2.googleapis.com/token", "iat": 1_700_000_000, "exp": 1_700_003_600}


def test_apns_provider_token_is_an_es256_jwt_with_kid_and_team() -> None:
    settings = ApnsSettings.from_config(IOS)
    token = apns_provider_token(settings, 1_700_000_000.2)
    assert pyjwt.get_unverified_header(token) == {"alg": "ES256", "kid": "ABC123DEFG"}
    assert pyjwt.decode(token, EC_KEY.public_key(), algorithms=["ES256"]) == {"iss": "TEAM123456",
                                                                            "iat": 1_700_000_000}
    signature = token.split(".")[2]
    assert len(base64.urlsafe_b64decode(signature + "=" * (-len(signature) % 4))) == 64  # raw r||s, not DER


def test_apns_provider_token_is_reused_for_30_minutes_then_regenerated() -> None:
    now = [1_700_000_000.0]
    sender = ApnsSender(IOS, clock=lambda: now[0])
    first = sender.provider_token()
    now[0] += 29 * 60
    assert sender.provider_token() == first
    now[0] += 2 * 60
    second = sender.provider_token()
    assert second != first and pyjwt.decode(second, EC_KEY.public_key(), algorithms=["ES256"])["iat"] == now[0]
    forced = sender.provider_token(force=True)  # ECDSA signatures are randomised: a new token, same claims
    assert forced != second and forced.split(".")[:2] == second.split(".")[:2]


# --- config ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("kind", "config", "field"), [
    ("android", {**ANDROID, "projectId": ""}, "projectId"),
    ("android", {k: v for k, v in ANDROID.items() if k != "clientEmail"}, "clientEmail"),
    ("android", {**ANDROID, "privateKey": "-----BEGIN PRIVATE KEY-----\nnope\n-----END PRIVATE KEY-----"},
     "privateKey"),
    ("android", {**ANDROID, "privateKey": _pem(EC_KEY)}, "privateKey"),
    ("android", {**ANDROID, "baseUrl": "ftp://fcm"}, "baseUrl"),
    ("android", {**ANDROID, "tokenUri": 5}, "tokenUri"),
    ("ios", {**IOS, "keyId": None}, "keyId"),
    ("ios", {k: v for k, v in IOS.items() if k != "teamId"}, "teamId"),
    ("ios", {**IOS, "bundleId": " "}, "bundleId"),
    ("ios", {**IOS, "signingKey": _pem(RSA_KEY)}, "signingKey"),
    ("ios", {**IOS, "signingKey": _pem(ec.generate_private_key(ec.SECP384R1()))}, "signingKey"),
    ("ios", {**IOS, "production": "maybe"}, "production"),
])
def test_push_sender_names_the_bad_config_field(kind: str, config: dict[str, Any], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        push_sender(kind, config, EgressPolicy())


def test_push_sender_defaults_and_overrides() -> None:
    with pytest.raises(ValueError, match="web"):
        push_sender("web", {}, EgressPolicy())
    fcm = FcmSender({**ANDROID, "privateKey": ANDROID["privateKey"].replace("\n", "\\n")})  # escaped newlines
    assert fcm.settings.send_url == "https://fcm.googleapis.com/v1/projects/demo-proj/messages:send"
    assert fcm.settings.token_uri == "https://oauth2.googleapis.com/token"
    assert ApnsSettings.from_config(IOS).base_url == APNS_SANDBOX_URL
    assert ApnsSettings.from_config({**IOS, "production": True}).base_url == "https://api.push.apple.com"
    assert ApnsSettings.from_config({**IOS, "production": True, "baseUrl": "http://gw/sandbox/apns/"}).base_url \
        == "http://gw/sandbox/apns"


# --- FCM body and classification -------------------------------------------------------------------


def test_fcm_request_body_shape() -> None:
    body = fcm_request_body("tok", MESSAGE)
    assert body == {"message": {
        "token": "tok",
        "notification": {"title": "Shop", "body": "Hello there"},
        "data": {"conversationId": "c1", "messageId": "m1"},
        "android": {"priority": "high", "ttl": "86400s", "collapse_key": "c1",
                    "notification": {"tag": "c1", "notification_count": 3}},
        "apns": {"headers": {"apns-priority": "10", "apns-collapse-id": "c1"},
                 "payload": {"aps": {"sound": "default", "badge": 3}}}}}
    plain = fcm_request_body("tok", PushMessage(title="t", body="x" * 1500, data={"n": 1}))  # type: ignore[dict-item]
    message = plain["message"]
    assert message["data"] == {"n": "1"}  # FCM takes string values only
    assert len(message["notification"]["body"]) == 1000 and message["notification"]["body"].endswith("…")
    assert message["android"] == {"priority": "high", "ttl": "86400s"}


def test_truncate_body() -> None:
    assert truncate_body("short") == "short"
    assert truncate_body("x" * 1000) == "x" * 1000
    assert truncate_body("x" * 1001) == "x" * 999 + "…"


@pytest.mark.parametrize(("status", "body", "expected"), [
    (200, b'{"name": "projects/p/messages/0:1%ab"}', ("sent", "")),
    (404, _fcm_error(404, "NOT_FOUND", "UNREGISTERED", "Requested entity was not found."),
     ("unregistered", "UNREGISTERED")),
    (400, _fcm_error(400, "INVALID_ARGUMENT", "INVALID_ARGUMENT",
                     "The registration token is not a valid FCM registration token"),
     ("unregistered", "INVALID_ARGUMENT")),
    (400, _fcm_error(400, "INVALID_ARGUMENT", "INVALID_ARGUMENT", "Invalid value at 'message.data[0].value'"),
     ("failed", "INVALID_ARGUMENT")),
    (403, _fcm_error(403, "PERMISSION_DENIED", "SENDER_ID_MISMATCH", "SenderId mismatch"),
     ("failed", "SENDER_ID_MISMATCH")),
    (401, _fcm_error(401, "UNAUTHENTICATED", "THIRD_PARTY_AUTH_ERROR"), ("failed", "THIRD_PARTY_AUTH_ERROR")),
    (401, _fcm_error(401, "UNAUTHENTICATED", None), ("failed", "UNAUTHENTICATED")),
    (429, _fcm_error(429, "RESOURCE_EXHAUSTED", "QUOTA_EXCEEDED"), ("retry", "QUOTA_EXCEEDED")),
    (503, _fcm_error(503, "UNAVAILABLE", "UNAVAILABLE"), ("retry", "UNAVAILABLE")),
    (500, _fcm_error(500, "INTERNAL", "INTERNAL"), ("retry", "INTERNAL")),
    (502, b"<html>bad gateway</html>", ("retry", "http_502")),
    (404, _fcm_error(404, "NOT_FOUND", None), ("failed", "NOT_FOUND")),
    (418, b"", ("failed", "http_418")),
])
def test_classify_fcm(status: int, body: bytes, expected: tuple[str, str]) -> None:
    outcome = classify_fcm(status, body, {})
    assert (outcome.status, outcome.code) == expected
    if status == 200:
        assert outcome.provider_id == "projects/p/messages/0:1%ab"


def test_classify_fcm_honours_retry_after() -> None:
    outcome = classify_fcm(429, _fcm_error(429, "RESOURCE_EXHAUSTED", "QUOTA_EXCEEDED"), {"retry-after": "30"})
    assert outcome.retry_after == 30.0
    assert classify_fcm(404, _fcm_error(404, "NOT_FOUND", "UNREGISTERED"), {"retry-after": "30"}).retry_after is None


@pytest.mark.parametrize(("status", "body", "expected"), [
    (400, b'{"error": "invalid_grant", "error_description": "Invalid JWT Signature."}',
     ("failed", "invalid_grant", "Invalid JWT Signature.")),
    (401, b'{"error": "invalid_client", "error_description": "The OAuth client was not found."}',
     ("failed", "invalid_client", "The OAuth client was not found.")),
    (503, b"", ("retry", "http_503", "")),
    (429, b'{"error": "rate_limit_exceeded"}', ("retry", "rate_limit_exceeded", "")),
])
def test_classify_token_error(status: int, body: bytes, expected: tuple[str, str, str]) -> None:
    outcome = classify_token_error(status, body, {})
    assert (outcome.status, outcome.code, outcome.reason) == expected


def test_retry_after_seconds_and_http_dates() -> None:
    assert retry_after_seconds("12") == 12.0
    assert retry_after_seconds(None) is None and retry_after_seconds("soon") is None
    now = time.time()
    assert 55 <= (retry_after_seconds(formatdate(now + 60, usegmt=True), now) or 0) <= 61
    assert retry_after_seconds(formatdate(now - 60, usegmt=True), now) == 0.0


# --- APNs headers, payload and classification ------------------------------------------------------


def test_apns_header_set() -> None:
    settings = ApnsSettings.from_config(IOS)
    headers = apns_headers(settings, "jwt", MESSAGE, 1_700_000_000.5, "8e3a9c4e-0000-4000-8000-000000000001")
    assert headers == {"authorization": "bearer jwt", "apns-topic": "com.example.app", "apns-push-type": "alert",
                       "apns-priority": "10", "apns-expiration": str(1_700_000_000 + 86400),
                       "apns-id": "8e3a9c4e-0000-4000-8000-000000000001", "content-type": "application/json",
                       "apns-collapse-id": "c1"}
    assert "apns-collapse-id" not in apns_headers(settings, "jwt", PushMessage(title="t", body="b"), 0, "id")
    long_id = "é" * 40  # 80 bytes
    assert len(apns_collapse_id(long_id).encode()) <= 64 and apns_collapse_id(long_id) == apns_collapse_id(long_id)


def test_apns_payload_shape_and_size_limit() -> None:
    assert json.loads(apns_payload(MESSAGE)) == {
        "aps": {"alert": {"title": "Shop", "body": "Hello there"}, "sound": "default", "badge": 3},
        "conversationId": "c1", "messageId": "m1"}
    no_override = json.loads(apns_payload(PushMessage(title="t", body="b", data={"aps": "x", "k": "v"})))
    assert no_override["aps"]["alert"] == {"title": "t", "body": "b"} and no_override["k"] == "v"
    # 4 bytes a character: 1,000 of them plus the data are over 4 KB before cutting.
    wide = apns_payload(PushMessage(title="t", body="😀" * 1000, data={"conversationId": "c" * 200}))
    assert len(wide) <= APNS_PAYLOAD_MAX_BYTES
    body = json.loads(wide)["aps"]["alert"]["body"]
    assert body.endswith("…") and len(body) > 500


@pytest.mark.parametrize(("status", "reason", "expected"), [
    (200, None, "sent"),
    (410, "Unregistered", "unregistered"),
    (410, "ExpiredToken", "unregistered"),
    (400, "BadDeviceToken", "unregistered"),
    (400, "DeviceTokenNotForTopic", "unregistered"),
    (400, "TopicDisallowed", "failed"),
    (400, "BadCollapseId", "failed"),
    (403, "InvalidProviderToken", "failed"),
    (403, "ExpiredProviderToken", "failed"),
    (413, "PayloadTooLarge", "failed"),
    (429, "TooManyRequests", "retry"),
    (500, "InternalServerError", "retry"),
    (503, "ServiceUnavailable", "retry"),
    (503, "Shutdown", "retry"),
])
def test_classify_apns(status: int, reason: str | None, expected: str) -> None:
    body = json.dumps({"reason": reason}).encode() if reason else b""
    outcome = classify_apns(status, body, {"apns-id": "abc"})
    assert outcome.status == expected and outcome.provider_id == "abc"
    assert outcome.code == (reason or "")


def test_classify_apns_without_a_reason_body_and_sent_id_fallback() -> None:
    outcome = classify_apns(502, b"", {"retry-after": "5"}, sent_id="sent-id")
    assert (outcome.status, outcome.code, outcome.retry_after, outcome.provider_id) == \
        ("retry", "http_502", 5.0, "sent-id")
