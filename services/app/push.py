"""Push senders for the in-app channel: FCM HTTP v1 (Android) and APNs token auth (iOS).

`push_sender(integration.type, integration.config)` builds the sender for an `android` or `ios`
integration (platform reference §6). A sender owns its `httpx.AsyncClient`, signs its own JWTs
with `cryptography` (RS256 for Google's OAuth2 assertion, ES256 for APNs provider tokens) and never
raises for a platform or network error: `send` returns a `PushOutcome` whose status tells the
caller what to do with the device token — keep it ("sent"), drop it ("unregistered"), give up on
this push ("failed") or try again later ("retry", with `retry_after` when the platform gave one).

Integration config (camelCase, as the business API stores it):
- android: `projectId`, `clientEmail`, `privateKey` (PEM RSA, from the service-account JSON),
  optional `privateKeyId`, `tokenUri` (default Google's), `baseUrl` (default FCM's).
- ios: `keyId`, `teamId`, `bundleId`, `signingKey` (PEM EC P-256, the .p8), `production`
  (default false: APNs' sandbox host), `baseUrl` (overrides both hosts).

APNs is HTTP/2 only; the client negotiates it through ALPN over TLS. The sandbox's fake is plain
`http://`, where httpx speaks HTTP/1.1 (it does not do h2c), which the fake accepts.

Every request goes through the egress policy (`shared.egress`): `tokenUri` and `baseUrl` must be
Google's / Apple's hosts, the sandbox's origin or allow-listed, and connections go to checked
addresses only. A refusal is the outcome "failed" with code `egress_refused`.
"""

from __future__ import annotations

import asyncio
import base64
import email.utils
import hashlib
import json
import logging
import re
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, Protocol
from urllib.parse import quote, urlsplit

import httpx
import msgspec
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from opentelemetry.trace import SpanKind, Status, StatusCode

from shared.egress import APNS_HOSTS, FCM_HOSTS, GOOGLE_OAUTH_HOSTS, REFUSED_CODE, EgressPolicy, EgressRefused
from shared.telemetry import inject_headers, tracer
from shared.untrusted import decode_json

log = logging.getLogger(__name__)
_tracer = tracer(__name__)

BODY_MAX_CHARS = 1000
ELLIPSIS = "…"
FCM_SCOPE = "https://www.googleapis.com/auth/firebase.messaging"
GOOGLE_TOKEN_URI = "https://oauth2.googleapis.com/token"
FCM_BASE_URL = "https://fcm.googleapis.com"
JWT_BEARER_GRANT = "urn:ietf:params:oauth:grant-type:jwt-bearer"
APNS_PRODUCTION_URL = "https://api.push.apple.com"
APNS_SANDBOX_URL = "https://api.sandbox.push.apple.com"
# Refresh an OAuth2 access token this long before Google says it expires.
TOKEN_REFRESH_MARGIN = 60.0
# APNs refuses provider tokens older than an hour and throttles ones regenerated too often
# (TooManyProviderTokenUpdates): reuse one for half an hour, as aioapns does.
APNS_TOKEN_LIFETIME = 30 * 60
APNS_PAYLOAD_MAX_BYTES = 4096
APNS_COLLAPSE_ID_MAX_BYTES = 64
# A push about a message older than a day is noise: both platforms drop it after that.
PUSH_TTL_SECONDS = 24 * 3600
REQUEST_TIMEOUT = httpx.Timeout(10.0, connect=5.0)

FCM_RETRY_CODES = frozenset({"QUOTA_EXCEEDED", "UNAVAILABLE", "INTERNAL", "RESOURCE_EXHAUSTED"})
APNS_UNREGISTERED_REASONS = frozenset({"BadDeviceToken", "DeviceTokenNotForTopic", "Unregistered",
                                       "ExpiredToken"})
RETRY_HTTP_STATUSES = frozenset({429, 500, 502, 503, 504})
_HEX_TOKEN = re.compile(r"^[0-9a-fA-F]{64,200}$")
_INVALID_FCM_TOKEN = re.compile(r"not a valid FCM registration token|invalid registration token", re.I)


class PushMessage(msgspec.Struct, kw_only=True, frozen=True):
    """What one push shows on the device, platform-neutral."""

    title: str  # e.g. the business's display name
    body: str  # the message text (senders cut it to BODY_MAX_CHARS with "…")
    data: dict[str, str] = {}  # e.g. {"conversationId": …, "messageId": …, "appId": …}
    collapse_id: str | None = None  # conversation id: a newer push replaces an older one on the device
    badge: int | None = None


PushStatus = Literal["sent", "unregistered", "failed", "retry"]


class PushOutcome(msgspec.Struct, kw_only=True, frozen=True):
    """How one send went. "unregistered": drop the token; "retry": transient, try again later."""

    status: PushStatus
    code: str = ""  # the platform's code: "UNREGISTERED", "BadDeviceToken", "QUOTA_EXCEEDED", "http_503", …
    reason: str = ""  # the platform's human text
    retry_after: float | None = None  # seconds, from Retry-After when given
    provider_id: str = ""  # FCM message `name` / APNs `apns-id`


class PushSender(Protocol):
    """Sends pushes for one integration; never raises for platform or network errors."""

    async def send(self, token: str, message: PushMessage) -> PushOutcome:
        """Push `message` to one device token."""
        ...

    async def close(self) -> None:
        """Close the HTTP client."""
        ...


def push_sender(integration_type: str, config: Mapping[str, Any], policy: EgressPolicy) -> PushSender:
    """The sender for an `android` (FCM) or `ios` (APNs) integration; ValueError naming the bad field."""
    if integration_type == "android":
        return FcmSender(config, policy=policy)
    if integration_type == "ios":
        return ApnsSender(config, policy=policy)
    raise ValueError(f"no push sender for integration type {integration_type!r}")


# --- small helpers ---------------------------------------------------------------------------------


def truncate_body(text: str, limit: int = BODY_MAX_CHARS) -> str:
    """`text` cut to `limit` characters, the last one an ellipsis when anything was cut."""
    return text if len(text) <= limit else text[: limit - 1] + ELLIPSIS


def token_suffix(token: str) -> str:
    """What logs and spans may show of a device token: its last 6 characters."""
    return "…" + token[-6:]


def retry_after_seconds(value: str | None, now: float | None = None) -> float | None:
    """A Retry-After header (seconds or an HTTP date) as seconds from now; None when absent or bad."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def b64url(data: bytes) -> str:
    """Unpadded base64url, as JWTs use."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _json_segment(value: Mapping[str, Any]) -> str:
    return b64url(json.dumps(value, separators=(",", ":")).encode())


def sign_rs256(header: Mapping[str, Any], claims: Mapping[str, Any], key: rsa.RSAPrivateKey) -> str:
    """A compact JWS: RS256 = RSASSA-PKCS1-v1_5 with SHA-256."""
    signing_input = f"{_json_segment({'alg': 'RS256', 'typ': 'JWT', **header})}.{_json_segment(claims)}"
    signature = key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
    return f"{signing_input}.{b64url(signature)}"


def sign_es256(header: Mapping[str, Any], claims: Mapping[str, Any], key: ec.EllipticCurvePrivateKey) -> str:
    """A compact JWS: ES256 = ECDSA P-256 with SHA-256, the signature as raw r||s (64 bytes), not DER."""
    signing_input = f"{_json_segment({'alg': 'ES256', **header})}.{_json_segment(claims)}"
    r, s = decode_dss_signature(key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256())))
    return f"{signing_input}.{b64url(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"


def _pem_bytes(value: str) -> bytes:
    # Keys pasted out of a service-account JSON often keep their escaped newlines.
    if "\n" not in value and "\\n" in value:
        value = value.replace("\\n", "\n")
    return value.strip().encode()


def load_rsa_key(pem: str, field: str) -> rsa.RSAPrivateKey:
    """The RSA private key in a PEM string; ValueError naming `field` otherwise."""
    try:
        key = serialization.load_pem_private_key(_pem_bytes(pem), password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise ValueError(f"{field} must be a PEM private key (unencrypted): {exc}") from exc
    if not isinstance(key, rsa.RSAPrivateKey):
        raise ValueError(f"{field} must be an RSA private key")
    return key


def load_p256_key(pem: str, field: str) -> ec.EllipticCurvePrivateKey:
    """The EC P-256 private key in a PEM string (an APNs .p8); ValueError naming `field` otherwise."""
    try:
        key = serialization.load_pem_private_key(_pem_bytes(pem), password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise ValueError(f"{field} must be a PEM private key (unencrypted): {exc}") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        raise ValueError(f"{field} must be an EC P-256 private key (the .p8 file)")
    return key


def _required(config: Mapping[str, Any], field: str, kind: str) -> str:
    value = config.get(field)
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{kind} integration config: {field} is required")
    return value.strip()


def _url(config: Mapping[str, Any], field: str, default: str, kind: str) -> str:
    value = config.get(field)
    if value is None or value == "":
        return default
    if not isinstance(value, str):
        raise ValueError(f"{kind} integration config: {field} must be a URL")
    parts = urlsplit(value.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"{kind} integration config: {field} must be an http(s) URL")
    return value.strip().rstrip("/")


def _flag(config: Mapping[str, Any], field: str, kind: str) -> bool:
    value = config.get(field, False)
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false", ""):
        return value.lower() == "true"
    raise ValueError(f"{kind} integration config: {field} must be true or false")


def _json_object(raw: bytes) -> dict[str, Any]:
    try:
        value = decode_json(raw) if raw else {}
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _egress_client(policy: EgressPolicy) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=policy.httpx_transport("platform", http2=True), timeout=REQUEST_TIMEOUT,
                             trust_env=False)


def _refused_outcome(exc: EgressRefused) -> PushOutcome:
    return PushOutcome(status="failed", code=REFUSED_CODE, reason=str(exc)[:300])


def _network_outcome(exc: httpx.HTTPError) -> PushOutcome:
    code = "timeout" if isinstance(exc, httpx.TimeoutException) else "network"
    return PushOutcome(status="retry", code=code, reason=f"{type(exc).__name__}: {exc}"[:300])


# --- FCM HTTP v1 -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class FcmSettings:
    """An android integration's FCM credentials, validated."""

    project_id: str
    client_email: str
    private_key: rsa.RSAPrivateKey
    private_key_id: str
    token_uri: str
    base_url: str

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> FcmSettings:
        """Read and check the config fields; ValueError names the first bad one."""
        project_id = _required(config, "projectId", "android")
        if not re.fullmatch(r"[A-Za-z0-9._:-]{1,100}", project_id):
            raise ValueError("android integration config: projectId has unexpected characters")
        key_id = config.get("privateKeyId") or ""
        if not isinstance(key_id, str):
            raise ValueError("android integration config: privateKeyId must be a string")
        return cls(project_id=project_id,
                   client_email=_required(config, "clientEmail", "android"),
                   private_key=load_rsa_key(_required(config, "privateKey", "android"), "privateKey"),
                   private_key_id=key_id,
                   token_uri=_url(config, "tokenUri", GOOGLE_TOKEN_URI, "android"),
                   base_url=_url(config, "baseUrl", FCM_BASE_URL, "android"))

    @property
    def send_url(self) -> str:
        """`POST` target of `messages:send`."""
        return f"{self.base_url}/v1/projects/{quote(self.project_id, safe='')}/messages:send"


def fcm_assertion(settings: FcmSettings, now: float) -> str:
    """The signed JWT a service account exchanges for an access token (RFC 7523, Google's claims)."""
    iat = int(now)
    header = {"kid": settings.private_key_id} if settings.private_key_id else {}
    claims = {"iss": settings.client_email, "scope": FCM_SCOPE, "aud": settings.token_uri,
              "iat": iat, "exp": iat + 3600}
    return sign_rs256(header, claims, settings.private_key)


def fcm_request_body(token: str, message: PushMessage) -> dict[str, Any]:
    """The `messages:send` body (reference §6.1): notification + string data, high priority on Android."""
    android: dict[str, Any] = {"priority": "high", "ttl": f"{PUSH_TTL_SECONDS}s"}
    android_notification: dict[str, Any] = {}
    if message.collapse_id:
        android["collapse_key"] = message.collapse_id
        android_notification["tag"] = message.collapse_id  # replaces the conversation's older notification
    if message.badge is not None:
        android_notification["notification_count"] = message.badge
    if android_notification:
        android["notification"] = android_notification
    body: dict[str, Any] = {
        "token": token,
        "notification": {"title": message.title, "body": truncate_body(message.body)},
        "android": android,
    }
    if message.data:
        body["data"] = {str(k): str(v) for k, v in message.data.items()}
    # The same FCM project may serve iOS apps through FCM: give APNs what it needs there too.
    apns_headers = {"apns-priority": "10"}
    if message.collapse_id:
        apns_headers["apns-collapse-id"] = apns_collapse_id(message.collapse_id)
    aps: dict[str, Any] = {"sound": "default"}
    if message.badge is not None:
        aps["badge"] = message.badge
    body["apns"] = {"headers": apns_headers, "payload": {"aps": aps}}
    return {"message": body}


def _google_error(raw: bytes) -> tuple[str, str, str]:
    """(FCM errorCode, google.rpc status, message) from an error body (empty strings when absent)."""
    error = _json_object(raw).get("error")
    if not isinstance(error, dict):
        return "", "", ""
    fcm_code = ""
    for detail in error.get("details") or []:
        if isinstance(detail, dict) and str(detail.get("@type", "")).endswith("FcmError"):
            fcm_code = str(detail.get("errorCode") or "")
    return fcm_code, str(error.get("status") or ""), str(error.get("message") or "")


def classify_fcm(status: int, raw: bytes, headers: Mapping[str, str], now: float | None = None) -> PushOutcome:
    """What an FCM `messages:send` answer means for the token (reference §6.1 error table)."""
    if 200 <= status < 300:
        name = _json_object(raw).get("name")
        return PushOutcome(status="sent", provider_id=name if isinstance(name, str) else "")
    fcm_code, rpc_status, text = _google_error(raw)
    code = fcm_code or rpc_status or f"http_{status}"
    retry_after = retry_after_seconds(headers.get("retry-after"), now)
    if fcm_code == "UNREGISTERED":
        return PushOutcome(status="unregistered", code=code, reason=text)
    if status == 400 and _INVALID_FCM_TOKEN.search(text) and code == "INVALID_ARGUMENT":
        # A token FCM cannot parse will never work: drop it like an unregistered one.
        return PushOutcome(status="unregistered", code=code, reason=text)
    if fcm_code in FCM_RETRY_CODES or (not fcm_code and status in RETRY_HTTP_STATUSES):
        return PushOutcome(status="retry", code=code, reason=text, retry_after=retry_after)
    return PushOutcome(status="failed", code=code, reason=text)


def classify_token_error(status: int, raw: bytes, headers: Mapping[str, str], now: float | None = None) -> PushOutcome:
    """What a failed OAuth2 token exchange means: bad credentials fail, Google's hiccups retry."""
    body = _json_object(raw)
    error, description = body.get("error"), body.get("error_description")
    code = error if isinstance(error, str) and error else f"http_{status}"
    reason = description if isinstance(description, str) else ""
    if status in RETRY_HTTP_STATUSES:
        return PushOutcome(status="retry", code=code, reason=reason,
                           retry_after=retry_after_seconds(headers.get("retry-after"), now))
    return PushOutcome(status="failed", code=code, reason=reason or "the OAuth2 token exchange was refused")


class FcmSender:
    """FCM HTTP v1 for one android integration (OAuth2 service-account token, cached)."""

    def __init__(self, config: Mapping[str, Any], *, policy: EgressPolicy | None = None,
                 client: httpx.AsyncClient | None = None, clock: Callable[[], float] = time.time) -> None:
        self.settings = FcmSettings.from_config(config)
        # No policy given: the strictest one (Google's hosts over https only).
        self.policy = policy or EgressPolicy()
        self._client = client or _egress_client(self.policy)
        self._owns_client = client is None
        self._clock = clock
        self._access_token = ""
        self._expires_at = 0.0
        self._lock = asyncio.Lock()
        self.token_requests = 0  # how many exchanges this sender made (for tests and metrics)

    async def close(self) -> None:
        """Close the HTTP client (when this sender created it)."""
        if self._owns_client:
            await self._client.aclose()

    async def _access(self, stale: str = "") -> str | PushOutcome:
        """A valid access token (exchanging a fresh one when none is cached or `stale` was refused)."""
        async with self._lock:  # one exchange at a time; waiters reuse its result
            fresh = self._access_token and self._access_token != stale
            if fresh and self._clock() < self._expires_at - TOKEN_REFRESH_MARGIN:
                return self._access_token
            return await self._exchange()

    async def _exchange(self) -> str | PushOutcome:
        now = self._clock()
        self.policy.check_url(self.settings.token_uri, purpose="platform", hosts=GOOGLE_OAUTH_HOSTS)
        form = {"grant_type": JWT_BEARER_GRANT, "assertion": fcm_assertion(self.settings, now)}
        self.token_requests += 1
        with _tracer.start_as_current_span("oauth2 token", kind=SpanKind.CLIENT, attributes={
                "http.request.method": "POST", "server.address": urlsplit(self.settings.token_uri).hostname or "",
                "url.full": self.settings.token_uri}) as span:
            try:
                response = await self._client.post(self.settings.token_uri, data=form,
                                                   headers=inject_headers({"accept": "application/json"}))
            except httpx.HTTPError as exc:
                span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
                return _network_outcome(exc)
            span.set_attribute("http.response.status_code", response.status_code)
            body = _json_object(response.content)
            token, expires_in = body.get("access_token"), body.get("expires_in", 3600)
            if response.status_code != 200 or not isinstance(token, str) or not token:
                span.set_status(Status(StatusCode.ERROR, f"token exchange {response.status_code}"))
                outcome = classify_token_error(response.status_code, response.content, response.headers)
                log.warning("FCM token exchange for %s refused: %s %s", self.settings.client_email,
                            outcome.code, outcome.reason)
                return outcome
        self._access_token = token
        self._expires_at = now + (float(expires_in) if isinstance(expires_in, int | float) else 3600.0)
        return token

    async def _post(self, access_token: str, body: dict[str, Any], token: str) -> httpx.Response:
        self.policy.check_url(self.settings.send_url, purpose="platform", hosts=FCM_HOSTS)
        with _tracer.start_as_current_span("fcm messages:send", kind=SpanKind.CLIENT, attributes={
                "http.request.method": "POST", "server.address": urlsplit(self.settings.base_url).hostname or "",
                "url.full": self.settings.send_url, "messaging.system": "fcm",
                "messaging.destination.name": token_suffix(token)}) as span:
            try:
                response = await self._client.post(self.settings.send_url, json=body, headers=inject_headers(
                    {"authorization": f"Bearer {access_token}", "accept": "application/json"}))
            except httpx.HTTPError as exc:
                span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
                raise
            span.set_attribute("http.response.status_code", response.status_code)
            if response.status_code >= 400:
                span.set_status(Status(StatusCode.ERROR, f"HTTP {response.status_code}"))
            return response

    async def send(self, token: str, message: PushMessage) -> PushOutcome:
        """Exchange (or reuse) the access token, then `messages:send`; a 401 refreshes it once."""
        body = fcm_request_body(token, message)
        try:
            access = await self._access()
            if isinstance(access, PushOutcome):
                return access
            response = await self._post(access, body, token)
            if response.status_code == 401:
                # Revoked or expired early: one fresh token, one more try.
                access = await self._access(stale=access)
                if isinstance(access, PushOutcome):
                    return access
                response = await self._post(access, body, token)
        except EgressRefused as exc:
            outcome = _refused_outcome(exc)
        except httpx.HTTPError as exc:
            outcome = _network_outcome(exc)
        else:
            outcome = classify_fcm(response.status_code, response.content, response.headers)
        self._log(token, outcome)
        return outcome

    def _log(self, token: str, outcome: PushOutcome) -> None:
        level = logging.DEBUG if outcome.status == "sent" else logging.INFO
        log.log(level, "FCM push to %s: %s %s", token_suffix(token), outcome.status, outcome.code,
                extra={"fields": {"project": self.settings.project_id, "status": outcome.status,
                                  "code": outcome.code}})


# --- APNs ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ApnsSettings:
    """An ios integration's APNs token-auth credentials, validated."""

    key_id: str
    team_id: str
    bundle_id: str
    signing_key: ec.EllipticCurvePrivateKey
    base_url: str

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> ApnsSettings:
        """Read and check the config fields; ValueError names the first bad one."""
        key_id = _required(config, "keyId", "ios")
        team_id = _required(config, "teamId", "ios")
        bundle_id = _required(config, "bundleId", "ios")
        signing_key = load_p256_key(_required(config, "signingKey", "ios"), "signingKey")
        default = APNS_PRODUCTION_URL if _flag(config, "production", "ios") else APNS_SANDBOX_URL
        return cls(key_id=key_id, team_id=team_id, bundle_id=bundle_id, signing_key=signing_key,
                   base_url=_url(config, "baseUrl", default, "ios"))


def apns_provider_token(settings: ApnsSettings, now: float) -> str:
    """The ES256 provider token: header {alg, kid}, claims {iss: team id, iat}."""
    return sign_es256({"kid": settings.key_id}, {"iss": settings.team_id, "iat": int(now)}, settings.signing_key)


def apns_collapse_id(collapse_id: str) -> str:
    """`apns-collapse-id` must fit 64 bytes: longer ids are replaced by a stable digest."""
    if len(collapse_id.encode()) <= APNS_COLLAPSE_ID_MAX_BYTES:
        return collapse_id
    return hashlib.sha256(collapse_id.encode()).hexdigest()


def apns_payload(message: PushMessage) -> bytes:
    """`{"aps": {"alert": {title, body}, "sound", "badge"?}, …data}`, cut to fit APNs' 4 KB."""
    aps: dict[str, Any] = {"alert": {"title": message.title, "body": truncate_body(message.body)},
                           "sound": "default"}
    if message.badge is not None:
        aps["badge"] = message.badge
    extra = {str(k): str(v) for k, v in message.data.items() if k != "aps"}
    payload = {"aps": aps, **extra}
    raw = json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()
    body = aps["alert"]["body"]
    while len(raw) > APNS_PAYLOAD_MAX_BYTES and len(body) > 1:
        # Multi-byte text can exceed the limit well under 1,000 characters: shorten the body.
        overflow = len(raw) - APNS_PAYLOAD_MAX_BYTES
        body = truncate_body(body, max(1, len(body) - max(overflow // 4, 1) - 1))
        aps["alert"]["body"] = body
        raw = json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()
    return raw


def apns_headers(settings: ApnsSettings, provider_token: str, message: PushMessage, now: float,
                 apns_id: str) -> dict[str, str]:
    """The request headers of one alert push."""
    headers = {"authorization": f"bearer {provider_token}", "apns-topic": settings.bundle_id,
               "apns-push-type": "alert", "apns-priority": "10",
               "apns-expiration": str(int(now) + PUSH_TTL_SECONDS), "apns-id": apns_id,
               "content-type": "application/json"}
    if message.collapse_id:
        headers["apns-collapse-id"] = apns_collapse_id(message.collapse_id)
    return headers


def classify_apns(status: int, raw: bytes, headers: Mapping[str, str], now: float | None = None,
                  sent_id: str = "") -> PushOutcome:
    """What an APNs answer means for the token (410 / bad token: drop; 429 and 5xx: retry).

    `sent_id` is the `apns-id` the request carried, used when the answer does not echo it.
    """
    apns_id = headers.get("apns-id", "") or sent_id
    if status == 200:
        return PushOutcome(status="sent", provider_id=apns_id)
    reason = _json_object(raw).get("reason")
    code = reason if isinstance(reason, str) and reason else f"http_{status}"
    if status == 410 or code in APNS_UNREGISTERED_REASONS:
        return PushOutcome(status="unregistered", code=code, reason=code, provider_id=apns_id)
    if status in RETRY_HTTP_STATUSES:
        return PushOutcome(status="retry", code=code, reason=code, provider_id=apns_id,
                           retry_after=retry_after_seconds(headers.get("retry-after"), now))
    return PushOutcome(status="failed", code=code, reason=code, provider_id=apns_id)


class ApnsSender:
    """APNs token-based auth for one ios integration (provider token reused for 30 minutes)."""

    def __init__(self, config: Mapping[str, Any], *, policy: EgressPolicy | None = None,
                 client: httpx.AsyncClient | None = None, clock: Callable[[], float] = time.time) -> None:
        self.settings = ApnsSettings.from_config(config)
        # No policy given: the strictest one (Apple's hosts over https only).
        self.policy = policy or EgressPolicy()
        self._client = client or _egress_client(self.policy)
        self._owns_client = client is None
        self._clock = clock
        self._provider_token = ""
        self._issued_at = 0.0

    async def close(self) -> None:
        """Close the HTTP client (when this sender created it)."""
        if self._owns_client:
            await self._client.aclose()

    def provider_token(self, force: bool = False) -> str:
        """The cached provider token, regenerated when older than 30 minutes or when `force`d."""
        now = self._clock()
        if force or not self._provider_token or not 0 <= now - self._issued_at < APNS_TOKEN_LIFETIME:
            self._provider_token = apns_provider_token(self.settings, now)
            self._issued_at = now
        return self._provider_token

    async def _post(self, token: str, message: PushMessage, payload: bytes,
                    force: bool) -> tuple[httpx.Response, str]:
        url = f"{self.settings.base_url}/3/device/{token}"
        self.policy.check_url(url, purpose="platform", hosts=APNS_HOSTS)
        headers = apns_headers(self.settings, self.provider_token(force), message, self._clock(), str(uuid.uuid4()))
        with _tracer.start_as_current_span("apns push", kind=SpanKind.CLIENT, attributes={
                "http.request.method": "POST", "server.address": urlsplit(url).hostname or "",
                "url.template": "/3/device/{token}", "messaging.system": "apns",
                "messaging.destination.name": token_suffix(token)}) as span:
            try:
                response = await self._client.post(url, content=payload, headers=inject_headers(headers))
            except httpx.HTTPError as exc:
                span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
                raise
            span.set_attribute("http.response.status_code", response.status_code)
            if response.status_code >= 400:
                span.set_status(Status(StatusCode.ERROR, f"HTTP {response.status_code}"))
            return response, headers["apns-id"]

    async def send(self, token: str, message: PushMessage) -> PushOutcome:
        """`POST /3/device/<token>`; an ExpiredProviderToken answer regenerates the JWT and retries once."""
        if not _HEX_TOKEN.match(token):
            # Not an APNs token at all (and never put into a URL path): the device must re-register.
            outcome = PushOutcome(status="unregistered", code="BadDeviceToken", reason="not a hex device token")
            self._log(token, outcome)
            return outcome
        payload = apns_payload(message)
        try:
            response, apns_id = await self._post(token, message, payload, force=False)
            if response.status_code == 403 and _json_object(response.content).get("reason") == "ExpiredProviderToken":
                response, apns_id = await self._post(token, message, payload, force=True)
        except EgressRefused as exc:
            outcome = _refused_outcome(exc)
        except httpx.HTTPError as exc:
            outcome = _network_outcome(exc)
        else:
            outcome = classify_apns(response.status_code, response.content, response.headers, sent_id=apns_id)
        self._log(token, outcome)
        return outcome

    def _log(self, token: str, outcome: PushOutcome) -> None:
        level = logging.DEBUG if outcome.status == "sent" else logging.INFO
        log.log(level, "APNs push to %s: %s %s", token_suffix(token), outcome.status, outcome.code,
                extra={"fields": {"topic": self.settings.bundle_id, "status": outcome.status,
                                  "code": outcome.code}})
