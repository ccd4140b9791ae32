"""Wire-accurate fakes of FCM HTTP v1 (with Google's OAuth2 token endpoint) and of APNs, plus a
scriptable phone per in-app integration (platform reference §6).

`FakeFcm` (integration type `android`) and `FakeApns` (`ios`) need no NATS: they take their
accounts from the integration records whose `baseUrl` is `…/sandbox/fcm` / `…/sandbox/apns`
(`sync`), keeping the public half of the record's `privateKey` / `signingKey`, so only a sender
holding the integration's private key gets through. Mount `routes(prefix)` and they behave like
Google and Apple towards a gateway:

- `POST {prefix}/google-oauth/token` (form `grant_type=urn:ietf:params:oauth:grant-type:jwt-bearer`
  and `assertion`): the RS256 assertion must verify with a synced account's key (iss = its
  clientEmail, aud = this endpoint or Google's, a scope, iat/exp at most an hour apart) →
  `{"access_token", "expires_in": 3599, "token_type": "Bearer"}`; otherwise 400
  `{"error": "invalid_grant", "error_description": "Invalid JWT Signature."}` as Google answers.
- `POST {prefix}/fcm/v1/projects/{projectId}/messages:send`: a Bearer token from above for that
  project (else 401/403 google.rpc.Status), the message validated (exactly one target, string
  data values, known fields, `validate_only` dry run) → `{"name": "projects/{p}/messages/0:…%…"}`;
  a token this fake never issued for the project, or one revoked, → 404 `UNREGISTERED` exactly
  as §6.1. firebase-admin 7.7.0 `messaging.send` is accepted (tests prove it).
- `POST {prefix}/apns/3/device/{token}`: the ES256 provider token must verify with the account
  whose `keyId` is its `kid` and whose `teamId` is its `iss` (403 MissingProviderToken /
  InvalidProviderToken / ExpiredProviderToken past an hour), `apns-topic` the bundle id (else 400
  TopicDisallowed; a device of another app → DeviceTokenNotForTopic), the token 64 hex chars this
  fake issued (else 400 BadDeviceToken), revoked → 410 `{"reason": "Unregistered", "timestamp"}`;
  200 with `apns-id`. The fake is plain HTTP/1.1 (real APNs is HTTP/2 only).
- scripting (`{prefix}/{android|ios}/{integrationId}/...`, errors in SunCo's shape): `POST devices`
  → `{"token": …}` (a fresh device: FCM `<22>:APA91b<…>`, APNs 64 hex), `GET devices`,
  `POST devices/{token}/revoke` (the app was uninstalled), `POST errors`
  `{"status": 503, "code": "UNAVAILABLE", "count": 1, "retryAfter"?: s}` (the next sends fail so),
  `GET outbox?to=<token>` → `{"messages": [push bodies as received + "receivedAt"]}` (FCM: the
  request body plus `name`; APNs: the payload plus `apnsHeaders` and `deviceToken`), and
  `GET` the account itself.

With a `store_path` devices, revocations, the outbox and unexpired access tokens survive a
restart (JSON lines, replayed and compacted when the fake is created).
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import re
import secrets
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs

from aiohttp import web
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from services.sandbox.scripting import read_json_object, sunco_errors
from shared.http import ApiError
from shared.records import IntegrationRecord
from shared.untrusted import decode_json

from .journal import Journal

log = logging.getLogger(__name__)

MAX_SCRIPT_BODY = 64 * 1024
MAX_FCM_BODY = 256 * 1024
APNS_PAYLOAD_MAX_BYTES = 4096
OUTBOX_KEEP = 200  # pushes kept per device
JWT_BEARER_GRANT = "urn:ietf:params:oauth:grant-type:jwt-bearer"
GOOGLE_TOKEN_URI = "https://oauth2.googleapis.com/token"
FCM_SCOPES = frozenset({"https://www.googleapis.com/auth/firebase.messaging",
                        "https://www.googleapis.com/auth/cloud-platform"})
ACCESS_TOKEN_SECONDS = 3599
APNS_TOKEN_MAX_AGE = 3600
CLOCK_SKEW = 300
FCM_ERROR_TYPE = "type.googleapis.com/google.firebase.fcm.v1.FcmError"
FCM_ERROR_CODES = frozenset({"UNSPECIFIED_ERROR", "INVALID_ARGUMENT", "UNREGISTERED", "SENDER_ID_MISMATCH",
                             "QUOTA_EXCEEDED", "UNAVAILABLE", "INTERNAL", "THIRD_PARTY_AUTH_ERROR",
                             "APNS_AUTH_ERROR"})
RPC_STATUS = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "NOT_FOUND",
              409: "ALREADY_EXISTS", 429: "RESOURCE_EXHAUSTED", 500: "INTERNAL", 501: "NOT_IMPLEMENTED",
              503: "UNAVAILABLE", 504: "DEADLINE_EXCEEDED"}
FCM_DEFAULT_CODE = {400: "INVALID_ARGUMENT", 401: "THIRD_PARTY_AUTH_ERROR", 403: "SENDER_ID_MISMATCH",
                    404: "UNREGISTERED", 429: "QUOTA_EXCEEDED", 500: "INTERNAL", 503: "UNAVAILABLE"}
FCM_MESSAGES = {"UNREGISTERED": "Requested entity was not found.",
                "QUOTA_EXCEEDED": "Quota exceeded for quota metric 'Sent messages' and limit 'Sent messages "
                                  "per minute' of service 'fcm.googleapis.com'.",
                "UNAVAILABLE": "The service is currently unavailable.",
                "INTERNAL": "Internal error encountered.",
                "SENDER_ID_MISMATCH": "SenderId mismatch",
                "THIRD_PARTY_AUTH_ERROR": "Auth error from APNS or Web Push Service",
                "INVALID_ARGUMENT": "Request contains an invalid argument."}
APNS_DEFAULT_REASON = {400: "BadDeviceToken", 403: "ExpiredProviderToken", 405: "MethodNotAllowed",
                       410: "Unregistered", 413: "PayloadTooLarge", 429: "TooManyRequests",
                       500: "InternalServerError", 503: "ServiceUnavailable"}
UNAUTHENTICATED_MESSAGE = ("Request had invalid authentication credentials. Expected OAuth 2 access token, login "
                           "cookie or other valid authentication credential. See "
                           "https://developers.google.com/identity/sign-in/web/devconsole-project.")
BAD_TIMEFRAME = ("Invalid JWT: Token must be a short-lived token (60 minutes) and in a reasonable timeframe. "
                 "Check your iat and exp values in the JWT claim.")
MESSAGE_FIELDS = frozenset({"name", "data", "notification", "android", "webpush", "apns", "fcm_options",
                            "fcmOptions", "token", "topic", "condition", "fid"})
TARGETS = ("token", "topic", "condition", "fid")
# Keys FCM refuses in `data` (it uses them itself).
RESERVED_DATA_KEYS = frozenset({"from", "message_type", "collapse_key"})
FCM_TOKEN_RE = re.compile(r"^[A-Za-z0-9_-]{22}:APA91b[A-Za-z0-9_-]{100,200}$")
APNS_TOKEN_RE = re.compile(r"^[0-9a-f]{64}$")
DURATION_RE = re.compile(r"^\d{1,10}(\.\d{1,9})?s$")
PUSH_TYPES = frozenset({"alert", "background", "voip", "complication", "fileprovider", "mdm", "liveactivity",
                        "location", "pushtotalk", "widgets", "controls"})
_FCM_PATH = re.compile(r"/sandbox/fcm/?$")
_APNS_PATH = re.compile(r"/sandbox/apns/?$")


def fcm_points_at_sandbox(base_url: str) -> bool:
    """True when an android integration's FCM base URL is the sandbox's fake (`…/sandbox/fcm`)."""
    return bool(_FCM_PATH.search(base_url))


def apns_points_at_sandbox(base_url: str) -> bool:
    """True when an ios integration's APNs base URL is the sandbox's fake (`…/sandbox/apns`)."""
    return bool(_APNS_PATH.search(base_url))


def sandbox_android_config(gateway_base: str, project_id: str = "threadline-sandbox") -> dict[str, Any]:
    """A fresh android integration config (new RSA key) whose FCM and token endpoint are the fakes."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption()).decode()
    base = gateway_base.rstrip("/")
    return {"projectId": project_id, "clientEmail": f"firebase-adminsdk@{project_id}.iam.gserviceaccount.com",
            "privateKey": pem, "privateKeyId": secrets.token_hex(20),
            "tokenUri": f"{base}/sandbox/google-oauth/token", "baseUrl": f"{base}/sandbox/fcm"}


def sandbox_ios_config(gateway_base: str, bundle_id: str = "com.threadline.sandbox") -> dict[str, Any]:
    """A fresh ios integration config (new P-256 key) whose APNs is the fake."""
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption()).decode()
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
    return {"keyId": "".join(secrets.choice(alphabet) for _ in range(10)),
            "teamId": "".join(secrets.choice(alphabet) for _ in range(10)),
            "bundleId": bundle_id, "signingKey": pem, "production": False,
            "baseUrl": f"{gateway_base.rstrip('/')}/sandbox/apns"}


# --- JWT verification (independent of the gateway's signer) ----------------------------------------


class JwtInvalid(ValueError):
    """A JWT that is malformed or not signed as claimed."""


def _b64url_decode(text: str) -> bytes:
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError) as exc:
        raise JwtInvalid("bad base64url") from exc


def split_jwt(token: str) -> tuple[dict[str, Any], dict[str, Any], bytes, bytes]:
    """(header, claims, signing input, signature) of a compact JWS; JwtInvalid when malformed."""
    parts = token.split(".")
    if len(parts) != 3 or not all(parts):
        raise JwtInvalid("a JWT has three parts")
    try:
        header, claims = decode_json(_b64url_decode(parts[0])), decode_json(_b64url_decode(parts[1]))
    except ValueError as exc:
        raise JwtInvalid("header and claims must be JSON") from exc
    if not isinstance(header, dict) or not isinstance(claims, dict):
        raise JwtInvalid("header and claims must be JSON objects")
    return header, claims, f"{parts[0]}.{parts[1]}".encode(), _b64url_decode(parts[2])


def rs256_valid(key: rsa.RSAPublicKey, signing_input: bytes, signature: bytes) -> bool:
    """RSASSA-PKCS1-v1_5 SHA-256 check."""
    try:
        key.verify(signature, signing_input, padding.PKCS1v15(), hashes.SHA256())
    except InvalidSignature:
        return False
    return True


def es256_valid(key: ec.EllipticCurvePublicKey, signing_input: bytes, signature: bytes) -> bool:
    """ECDSA P-256 SHA-256 check of a JOSE signature (raw r||s, 64 bytes)."""
    if len(signature) != 64:
        return False
    der = encode_dss_signature(int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big"))
    try:
        key.verify(der, signing_input, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        return False
    return True


def _public_key(pem: Any) -> Any:
    if not isinstance(pem, str):
        raise ValueError("no key")
    if "\n" not in pem and "\\n" in pem:
        pem = pem.replace("\\n", "\n")
    try:
        return serialization.load_pem_private_key(pem.strip().encode(), password=None).public_key()
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise ValueError(str(exc)) from exc


# --- shared parts of both fakes -------------------------------------------------------------------


@dataclass
class Device:
    """A simulated phone with the app installed (one push token)."""

    integration_id: str
    token: str
    created_at: float
    name: str = ""
    revoked_at: float | None = None

    def view(self, pushes: int) -> dict[str, Any]:
        """JSON shape for the scripting API."""
        return {"token": self.token, "name": self.name, "createdAt": self.created_at,
                "revoked": self.revoked_at is not None, "pushes": pushes}


@dataclass
class ScriptedError:
    """The next `remaining` sends of an integration fail with this."""

    status: int
    code: str
    message: str
    remaining: int
    retry_after: int | None = None


@dataclass
class _Account:
    integration_id: str
    fingerprint: tuple[str, ...]
    public_key: Any
    fields: dict[str, str] = field(default_factory=dict)


class _PushFake(ABC):
    """Devices, outbox, scripted errors and the journal, common to the FCM and APNs fakes."""

    integration_type = ""
    channel_name = ""

    def __init__(self, public_url: str = "", *, store_path: str | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.public_url = public_url.rstrip("/")
        self.clock = clock
        self.accounts: dict[str, _Account] = {}
        self.devices: dict[str, Device] = {}
        self.pushes: dict[str, list[dict[str, Any]]] = {}  # device token → bodies as received
        self.injected: dict[str, list[ScriptedError]] = {}
        self.requests = 0  # platform API calls received (any outcome)
        self.store_path = store_path
        self._journal = Journal(store_path)
        lines = self._journal.replay(self._apply)
        self._journal.compact(self._snapshot(), lines)

    # persistence

    def _apply(self, record: dict[str, Any]) -> None:
        kind = record["kind"]
        if kind == "device":
            self.devices[str(record["token"])] = Device(str(record["integrationId"]), str(record["token"]),
                                                        float(record["createdAt"]), str(record.get("name") or ""))
        elif kind == "revoke":
            self.devices[str(record["token"])].revoked_at = float(record["at"])
        elif kind == "push":
            self._keep(str(record["token"]), dict(record["body"]))
        else:
            self._apply_extra(record)

    def _apply_extra(self, record: dict[str, Any]) -> None:
        """Replay a record kind a subclass journals (none by default)."""
        return

    def _snapshot(self) -> list[dict[str, Any]]:
        records: list[dict[str, Any]] = []
        for device in self.devices.values():
            records.append({"kind": "device", "integrationId": device.integration_id, "token": device.token,
                            "createdAt": device.created_at, "name": device.name})
            if device.revoked_at is not None:
                records.append({"kind": "revoke", "token": device.token, "at": device.revoked_at})
        for token, bodies in self.pushes.items():
            records += [{"kind": "push", "token": token, "body": body} for body in bodies]
        return records + self._extra_snapshot()

    def _extra_snapshot(self) -> list[dict[str, Any]]:
        return []

    def _keep(self, token: str, body: dict[str, Any]) -> None:
        kept = self.pushes.setdefault(token, [])
        kept.append(body)
        del kept[:-OUTBOX_KEEP]

    def _record_push(self, token: str, body: dict[str, Any]) -> None:
        self._keep(token, body)
        self._journal.append({"kind": "push", "token": token, "body": body})

    # accounts

    @abstractmethod
    def _account_fields(self, record: IntegrationRecord) -> dict[str, str] | None:
        """The record's fields this fake needs, or None when it is not one of the sandbox's."""
        ...

    @abstractmethod
    def _key_field(self) -> str:
        ...

    @abstractmethod
    def _key_ok(self, key: Any) -> bool:
        ...

    def sync(self, records: Sequence[IntegrationRecord]) -> None:
        """Keep one account per integration of this type that points at the sandbox (cheap when unchanged)."""
        seen: set[str] = set()
        for record in records:
            if record.type != self.integration_type:
                continue
            fields = self._account_fields(record)
            if fields is None:
                continue
            pem = record.config.get(self._key_field())
            fingerprint = (*(f"{k}={v}" for k, v in sorted(fields.items())), str(pem))
            current = self.accounts.get(record.id)
            if current is not None and current.fingerprint == fingerprint:
                seen.add(record.id)
                continue
            try:
                key = _public_key(pem)
            except ValueError as exc:
                log.warning("sandbox %s integration %s: unusable %s (%s)", self.integration_type, record.id,
                            self._key_field(), exc)
                continue
            if not self._key_ok(key):
                log.warning("sandbox %s integration %s: %s has the wrong key type", self.integration_type,
                            record.id, self._key_field())
                continue
            seen.add(record.id)
            self.accounts[record.id] = _Account(record.id, fingerprint, key, fields)
        for integration_id in [i for i in self.accounts if i not in seen]:
            del self.accounts[integration_id]

    async def close(self) -> None:
        """Nothing runs in the background."""
        return

    # scripting (Python API)

    @abstractmethod
    def new_token(self) -> str:
        """A fresh, well-formed device token for this platform."""
        ...

    def add_device(self, integration_id: str, name: str = "") -> Device:
        """Install the app on a new simulated phone: returns its device (with its push token)."""
        device = Device(integration_id, self.new_token(), self.clock(), name)
        self.devices[device.token] = device
        self._journal.append({"kind": "device", "integrationId": integration_id, "token": device.token,
                              "createdAt": device.created_at, "name": name})
        return device

    def revoke(self, token: str) -> None:
        """The app was uninstalled: later sends to this token are refused as unregistered."""
        device = self.devices[token]
        if device.revoked_at is None:
            device.revoked_at = self.clock()
            self._journal.append({"kind": "revoke", "token": token, "at": device.revoked_at})

    def fail_next(self, integration_id: str, status: int, code: str | None = None, count: int = 1,
                  retry_after: int | None = None, message: str | None = None) -> None:
        """Make the next `count` sends of an integration fail with `status` and the platform `code`."""
        code = code or self._default_code(status)
        self.injected.setdefault(integration_id, []).append(ScriptedError(
            status, code, message or self._default_message(code), count, retry_after))

    @abstractmethod
    def _default_code(self, status: int) -> str:
        ...

    def _default_message(self, code: str) -> str:
        return code

    def _take_injected(self, integration_id: str) -> ScriptedError | None:
        queue = self.injected.get(integration_id)
        if not queue:
            return None
        error = queue[0]
        error.remaining -= 1
        if error.remaining <= 0:
            queue.pop(0)
        return error

    def outbox(self, integration_id: str, token: str | None = None) -> list[dict[str, Any]]:
        """What was pushed to one device (or to every device of the integration), oldest first."""
        if token is not None:
            device = self.devices.get(token)
            if device is None or device.integration_id != integration_id:
                return []
            return list(self.pushes.get(token, []))
        bodies = [b for t, kept in self.pushes.items() if (d := self.devices.get(t))
                  and d.integration_id == integration_id for b in kept]
        return sorted(bodies, key=lambda b: float(b.get("receivedAt") or 0))

    # scripting routes

    def scripting_routes(self, prefix: str) -> list[web.RouteDef]:
        """`{prefix}/{channel}/{integrationId}/…` (SunCo-shaped errors)."""
        base = f"{prefix.rstrip('/')}/{self.channel_name}/{{integration_id}}"
        s = sunco_errors
        return [
            web.post(f"{base}/devices", s(self._script_add_device)),
            web.get(f"{base}/devices", s(self._script_devices)),
            web.post(f"{base}/devices/{{token}}/revoke", s(self._script_revoke)),
            web.post(f"{base}/errors", s(self._script_errors)),
            web.get(f"{base}/outbox", s(self._script_outbox)),
            web.get(base, s(self._script_account)),
        ]

    def _account_or_404(self, request: web.Request) -> _Account:
        account = self.accounts.get(request.match_info["integration_id"])
        if account is None:
            raise ApiError(404, f"Unknown {self.integration_type} integration in the sandbox")
        return account

    async def _script_add_device(self, request: web.Request) -> web.Response:
        account = self._account_or_404(request)
        spec = await read_json_object(request, MAX_SCRIPT_BODY)
        name = spec.get("name", "")
        if not isinstance(name, str) or len(name) > 200:
            raise ApiError(400, "name must be a short string")
        device = self.add_device(account.integration_id, name)
        return web.json_response({"token": device.token}, status=201)

    async def _script_devices(self, request: web.Request) -> web.Response:
        account = self._account_or_404(request)
        return web.json_response({"devices": [d.view(len(self.pushes.get(d.token, []))) for d in
                                              self.devices.values() if d.integration_id == account.integration_id]})

    async def _script_revoke(self, request: web.Request) -> web.Response:
        account = self._account_or_404(request)
        device = self.devices.get(request.match_info["token"])
        if device is None or device.integration_id != account.integration_id:
            raise ApiError(404, "Unknown device token for this integration")
        self.revoke(device.token)
        return web.json_response(device.view(len(self.pushes.get(device.token, []))))

    async def _script_errors(self, request: web.Request) -> web.Response:
        account = self._account_or_404(request)
        spec = await read_json_object(request, MAX_SCRIPT_BODY)
        status, code, count = spec.get("status"), spec.get("code"), spec.get("count", 1)
        retry_after, message = spec.get("retryAfter"), spec.get("message")
        if isinstance(status, bool) or not isinstance(status, int) or not 400 <= status <= 599:
            raise ApiError(400, "need status (400-599)")
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ApiError(400, "count must be an integer >= 1")
        if code is not None and (not isinstance(code, str) or not re.fullmatch(r"[A-Za-z_]{1,64}", code)):
            raise ApiError(400, "code must be a platform error code such as UNAVAILABLE or BadDeviceToken")
        if retry_after is not None and (isinstance(retry_after, bool) or not isinstance(retry_after, int)
                                        or retry_after < 0):
            raise ApiError(400, "retryAfter must be a non-negative integer")
        if message is not None and not isinstance(message, str):
            raise ApiError(400, "message must be a string")
        self.fail_next(account.integration_id, status, code, count, retry_after, message)
        return web.json_response({"queued": sum(e.remaining for e in self.injected[account.integration_id])})

    async def _script_outbox(self, request: web.Request) -> web.Response:
        account = self._account_or_404(request)
        return web.json_response({"messages": self.outbox(account.integration_id, request.query.get("to"))})

    async def _script_account(self, request: web.Request) -> web.Response:
        account = self._account_or_404(request)
        devices = [d for d in self.devices.values() if d.integration_id == account.integration_id]
        return web.json_response({"integrationId": account.integration_id, **account.fields,
                                  "devices": len(devices)})


# --- FCM -------------------------------------------------------------------------------------------


@dataclass
class AccessToken:
    """An OAuth2 access token the fake issued."""

    token: str
    integration_id: str
    project_id: str
    scopes: tuple[str, ...]
    expires_at: float


def _rpc_error(status: int, message: str, fcm_code: str | None = None,
               extra_details: list[dict[str, Any]] | None = None,
               headers: dict[str, str] | None = None) -> web.Response:
    """A google.rpc.Status error body, with the FcmError detail when there is an FCM code."""
    error: dict[str, Any] = {"code": status, "message": message, "status": RPC_STATUS.get(status, "UNKNOWN")}
    details = [{"@type": FCM_ERROR_TYPE, "errorCode": fcm_code}] if fcm_code else []
    details += extra_details or []
    if details:
        error["details"] = details
    return web.json_response({"error": error}, status=status, headers=headers)


def _invalid_argument(message: str, field_path: str | None = None) -> web.Response:
    extra = [{"@type": "type.googleapis.com/google.rpc.BadRequest",
              "fieldViolations": [{"field": field_path, "description": message}]}] if field_path else None
    return _rpc_error(400, message, "INVALID_ARGUMENT", extra)


class FakeFcm(_PushFake):
    """FCM HTTP v1 and Google's OAuth2 token endpoint; see the module docstring."""

    integration_type = "android"
    channel_name = "android"

    def __init__(self, public_url: str = "", *, store_path: str | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.access_tokens: dict[str, AccessToken] = {}
        self.token_requests: list[str] = []  # integration id of each access token issued
        self._sequence = 0
        super().__init__(public_url, store_path=store_path, clock=clock)

    def _apply_extra(self, record: dict[str, Any]) -> None:
        if record["kind"] == "accessToken":
            token = AccessToken(str(record["token"]), str(record["integrationId"]), str(record["projectId"]),
                                tuple(record.get("scopes") or ()), float(record["expiresAt"]))
            self.access_tokens[token.token] = token

    def _extra_snapshot(self) -> list[dict[str, Any]]:
        now = self.clock()
        return [self._token_record(t) for t in self.access_tokens.values() if t.expires_at > now]

    @staticmethod
    def _token_record(token: AccessToken) -> dict[str, Any]:
        return {"kind": "accessToken", "token": token.token, "integrationId": token.integration_id,
                "projectId": token.project_id, "scopes": list(token.scopes), "expiresAt": token.expires_at}

    def _account_fields(self, record: IntegrationRecord) -> dict[str, str] | None:
        cfg = record.config
        if not fcm_points_at_sandbox(str(cfg.get("baseUrl") or "")):
            return None
        project_id, client_email = cfg.get("projectId"), cfg.get("clientEmail")
        if not isinstance(project_id, str) or not project_id or not isinstance(client_email, str) or not client_email:
            return None
        return {"projectId": project_id, "clientEmail": client_email,
                "privateKeyId": str(cfg.get("privateKeyId") or "")}

    def _key_field(self) -> str:
        return "privateKey"

    def _key_ok(self, key: Any) -> bool:
        return isinstance(key, rsa.RSAPublicKey)

    def new_token(self) -> str:
        """`<22 chars>:APA91b<134 chars>`, the shape of an FCM registration token."""
        def chunk(n: int) -> str:
            return secrets.token_urlsafe(n)[:n]
        return f"{chunk(22)}:APA91b{chunk(134)}"

    def _default_code(self, status: int) -> str:
        return FCM_DEFAULT_CODE.get(status, RPC_STATUS.get(status, "UNSPECIFIED_ERROR"))

    def _default_message(self, code: str) -> str:
        return FCM_MESSAGES.get(code, "Request failed.")

    def routes(self, prefix: str = "/sandbox") -> list[web.RouteDef]:
        """The token endpoint, `messages:send` and the scripting API, under `prefix`."""
        p = prefix.rstrip("/")
        return [web.post(f"{p}/google-oauth/token", self._token_endpoint),
                web.post(f"{p}/fcm/v1/projects/{{project_id}}/messages:send", self._send),
                *self.scripting_routes(p)]

    # OAuth2

    async def _token_endpoint(self, request: web.Request) -> web.Response:
        def refuse(error: str, description: str) -> web.Response:
            return web.json_response({"error": error, "error_description": description}, status=400)

        raw = await request.content.read(MAX_SCRIPT_BODY + 1)
        if len(raw) > MAX_SCRIPT_BODY:
            return refuse("invalid_request", "Request too large.")
        form = {k: v[0] for k, v in parse_qs(raw.decode("utf-8", "replace")).items()}
        if form.get("grant_type") != JWT_BEARER_GRANT:
            return refuse("unsupported_grant_type", f"Invalid grant_type: {form.get('grant_type', '')}")
        try:
            header, claims, signing_input, signature = split_jwt(form.get("assertion", ""))
        except JwtInvalid:
            return refuse("invalid_grant", "Invalid JWT Signature.")
        issuer = claims.get("iss")
        candidates = [a for a in self.accounts.values() if a.fields["clientEmail"] == issuer]
        if header.get("alg") != "RS256" or not candidates:
            return refuse("invalid_grant", "Invalid grant: account not found" if not candidates
                          else "Invalid JWT Signature.")
        account = next((a for a in candidates if rs256_valid(a.public_key, signing_input, signature)), None)
        if account is None:
            return refuse("invalid_grant", "Invalid JWT Signature.")
        audience = claims.get("aud")
        if not isinstance(audience, str) or not (audience == GOOGLE_TOKEN_URI or
                                                 audience.rstrip("/").endswith("/google-oauth/token")):
            return refuse("invalid_grant", "Invalid JWT: Failed audience check. The expected audience is the "
                                           "token endpoint.")
        now = self.clock()
        iat, exp = claims.get("iat"), claims.get("exp")
        if (not isinstance(iat, int | float) or not isinstance(exp, int | float) or exp <= iat
                or exp - iat > 3600 or iat > now + CLOCK_SKEW or exp < now - CLOCK_SKEW):
            return refuse("invalid_grant", BAD_TIMEFRAME)
        scope = claims.get("scope")
        if not isinstance(scope, str) or not scope.strip():
            return refuse("invalid_scope", "Empty or missing scope not allowed.")
        issued = AccessToken("ya29.c." + secrets.token_urlsafe(60), account.integration_id,
                             account.fields["projectId"], tuple(scope.split()), now + ACCESS_TOKEN_SECONDS)
        self.access_tokens[issued.token] = issued
        self.token_requests.append(account.integration_id)
        self._journal.append(self._token_record(issued))
        return web.json_response({"access_token": issued.token, "expires_in": ACCESS_TOKEN_SECONDS,
                                  "token_type": "Bearer"})

    def revoke_access_tokens(self, integration_id: str | None = None) -> None:
        """Forget issued access tokens (all, or one integration's): the next send gets 401."""
        for token in [t for t, a in self.access_tokens.items()
                      if integration_id is None or a.integration_id == integration_id]:
            del self.access_tokens[token]

    # messages:send

    def _message_id(self) -> str:
        self._sequence += 1
        return f"0:{int(self.clock() * 1000) * 1000 + self._sequence % 1000}%{secrets.token_hex(8)}"

    async def _send(self, request: web.Request) -> web.Response:
        self.requests += 1
        project_id = request.match_info["project_id"]
        scheme, _, presented = request.headers.get("Authorization", "").partition(" ")
        access = self.access_tokens.get(presented.strip()) if scheme.lower() == "bearer" else None
        if access is None or access.expires_at <= self.clock():
            return _rpc_error(401, UNAUTHENTICATED_MESSAGE, headers={"WWW-Authenticate": 'Bearer realm="https://'
                                                                     'accounts.google.com/"'})
        account = self.accounts.get(access.integration_id)
        if access.project_id != project_id or account is None:
            return _rpc_error(403, f"Permission 'cloudmessaging.messages.create' denied on resource "
                                   f"'//cloudresourcemanager.googleapis.com/projects/{project_id}' "
                                   f"(or it may not exist).")
        if not FCM_SCOPES.intersection(access.scopes):
            return _rpc_error(403, "Request had insufficient authentication scopes.")
        raw = await request.content.read(MAX_FCM_BODY + 1)
        if len(raw) > MAX_FCM_BODY:
            return _invalid_argument("Request payload size exceeds the limit.")
        try:
            body = decode_json(raw)
        except ValueError:
            return _invalid_argument("Invalid JSON payload received.")
        problem = self._invalid(body)
        if problem is not None:
            return _invalid_argument(*problem)
        message: dict[str, Any] = body["message"]
        if body.get("validate_only") is True or body.get("validateOnly") is True:
            return web.json_response({"name": f"projects/{project_id}/messages/fake_message_id"})
        scripted = self._take_injected(account.integration_id)
        if scripted is not None:
            headers = {"Retry-After": str(scripted.retry_after)} if scripted.retry_after is not None else None
            return _rpc_error(scripted.status, scripted.message,
                              scripted.code if scripted.code in FCM_ERROR_CODES else None, headers=headers)
        target = message.get("token")
        if isinstance(target, str):
            device = self.devices.get(target)
            if device is None or device.revoked_at is not None:
                return _rpc_error(404, FCM_MESSAGES["UNREGISTERED"], "UNREGISTERED")
            owner = self.accounts.get(device.integration_id)
            if owner is None or owner.fields["projectId"] != project_id:
                return _rpc_error(403, FCM_MESSAGES["SENDER_ID_MISMATCH"], "SENDER_ID_MISMATCH")
        name = f"projects/{project_id}/messages/{self._message_id()}"
        if isinstance(target, str):
            self._record_push(target, {**body, "name": name, "receivedAt": self.clock()})
        return web.json_response({"name": name})

    @staticmethod
    def _invalid(body: Any) -> tuple[str, str | None] | None:
        """Why FCM would refuse this request body (message, field path), or None."""
        if not isinstance(body, dict):
            return "Invalid JSON payload received. Expected an object.", None
        for name in body:
            if name not in ("message", "validate_only", "validateOnly"):
                return f'Invalid JSON payload received. Unknown name "{name}": Cannot find field.', name
        message = body.get("message")
        if not isinstance(message, dict):
            return "Request contains an invalid argument.", "message"
        for name in message:
            if name not in MESSAGE_FIELDS:
                return (f'Invalid JSON payload received. Unknown name "{name}" at \'message\': Cannot find '
                        f'field.', f"message.{name}")
        targets = [t for t in TARGETS if t in message]
        if len(targets) != 1:
            return "Exactly one of token, topic, condition or fid must be specified.", "message"
        target = message[targets[0]]
        if not isinstance(target, str) or not target:
            return f"Invalid value at 'message.{targets[0]}' (TYPE_STRING)", f"message.{targets[0]}"
        data = message.get("data", {})
        if not isinstance(data, dict):
            return "Invalid value at 'message.data' (type.googleapis.com/google.firebase.fcm.v1.Message.DataEntry)", \
                "message.data"
        for index, (key, value) in enumerate(data.items()):
            if not isinstance(value, str):
                return f"Invalid value at 'message.data[{index}].value' (TYPE_STRING), {json.dumps(value)}", \
                    f"message.data[{index}].value"
            if key in RESERVED_DATA_KEYS or key.startswith(("google.", "gcm.")):
                return f"Invalid data payload key: {key}", f"message.data[{index}].key"
        notification = message.get("notification", {})
        if not isinstance(notification, dict) or any(
                not isinstance(notification.get(k, ""), str) for k in ("title", "body", "image")):
            return "Invalid value at 'message.notification' (TYPE_STRING)", "message.notification"
        android = message.get("android", {})
        if not isinstance(android, dict):
            return "Invalid value at 'message.android'", "message.android"
        if android.get("priority", "normal") not in ("normal", "high", "NORMAL", "HIGH"):
            return f"Invalid value at 'message.android.priority' ({android.get('priority')})", \
                "message.android.priority"
        ttl = android.get("ttl")
        if ttl is not None and (not isinstance(ttl, str) or not DURATION_RE.match(ttl)):
            return "Invalid value at 'message.android.ttl' (type.googleapis.com/google.protobuf.Duration)", \
                "message.android.ttl"
        apns = message.get("apns", {})
        if not isinstance(apns, dict) or not isinstance(apns.get("headers", {}), dict) or any(
                not isinstance(v, str) for v in apns.get("headers", {}).values()) \
                or not isinstance(apns.get("payload", {}), dict):
            return "Invalid value at 'message.apns'", "message.apns"
        return None


# --- APNs ------------------------------------------------------------------------------------------


class FakeApns(_PushFake):
    """APNs token-based auth over HTTP/1.1; see the module docstring."""

    integration_type = "ios"
    channel_name = "ios"

    def _account_fields(self, record: IntegrationRecord) -> dict[str, str] | None:
        cfg = record.config
        if not apns_points_at_sandbox(str(cfg.get("baseUrl") or "")):
            return None
        fields = {k: cfg.get(k) for k in ("keyId", "teamId", "bundleId")}
        if not all(isinstance(v, str) and v for v in fields.values()):
            return None
        return {k: str(v) for k, v in fields.items()}

    def _key_field(self) -> str:
        return "signingKey"

    def _key_ok(self, key: Any) -> bool:
        return isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1)

    def new_token(self) -> str:
        """64 lowercase hex characters, the shape of an APNs device token."""
        return secrets.token_hex(32)

    def _default_code(self, status: int) -> str:
        return APNS_DEFAULT_REASON.get(status, "InternalServerError")

    def routes(self, prefix: str = "/sandbox") -> list[web.RouteDef]:
        """`/3/device/{token}` and the scripting API, under `prefix`."""
        p = prefix.rstrip("/")
        return [web.post(f"{p}/apns/3/device/{{token}}", self._push), *self.scripting_routes(p)]

    def _authenticate(self, request: web.Request) -> _Account | str:
        """The account whose key signed the provider token, or the APNs reason for refusing it."""
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return "MissingProviderToken"
        try:
            header, claims, signing_input, signature = split_jwt(token.strip())
        except JwtInvalid:
            return "InvalidProviderToken"
        if header.get("alg") != "ES256":
            return "InvalidProviderToken"
        account = next((a for a in self.accounts.values() if a.fields["keyId"] == header.get("kid")
                        and a.fields["teamId"] == claims.get("iss")
                        and es256_valid(a.public_key, signing_input, signature)), None)
        if account is None:
            return "InvalidProviderToken"
        iat, now = claims.get("iat"), self.clock()
        if not isinstance(iat, int | float) or iat > now + CLOCK_SKEW:
            return "InvalidProviderToken"
        if now - iat > APNS_TOKEN_MAX_AGE:
            return "ExpiredProviderToken"
        return account

    async def _push(self, request: web.Request) -> web.Response:
        self.requests += 1
        apns_id = request.headers.get("apns-id") or str(uuid.uuid4())

        def refuse(status: int, reason: str, **extra: Any) -> web.Response:
            return web.json_response({"reason": reason, **extra}, status=status, headers={"apns-id": apns_id})

        try:
            uuid.UUID(apns_id)
        except ValueError:
            return refuse(400, "BadMessageId")
        account = self._authenticate(request)
        if isinstance(account, str):
            return refuse(403, account)
        headers = request.headers
        topic = headers.get("apns-topic")
        if not topic:
            return refuse(400, "MissingTopic")
        if topic != account.fields["bundleId"]:
            return refuse(400, "TopicDisallowed")
        if headers.get("apns-push-type", "alert") not in PUSH_TYPES:
            return refuse(400, "InvalidPushType")
        if headers.get("apns-priority", "10") not in ("1", "5", "10"):
            return refuse(400, "BadPriority")
        if not re.fullmatch(r"\d{1,12}", headers.get("apns-expiration", "0")):
            return refuse(400, "BadExpirationDate")
        if len(headers.get("apns-collapse-id", "").encode()) > 64:
            return refuse(400, "BadCollapseId")
        raw = await request.content.read(APNS_PAYLOAD_MAX_BYTES + 1)
        if len(raw) > APNS_PAYLOAD_MAX_BYTES:
            return refuse(413, "PayloadTooLarge")
        try:
            payload = decode_json(raw) if raw else None
        except ValueError:
            payload = None
        if not isinstance(payload, dict) or not isinstance(payload.get("aps"), dict):
            return refuse(400, "PayloadEmpty")
        scripted = self._take_injected(account.integration_id)
        if scripted is not None:
            extra = {"timestamp": int(self.clock() * 1000)} if scripted.status == 410 else {}
            response = refuse(scripted.status, scripted.code, **extra)
            if scripted.retry_after is not None:
                response.headers["Retry-After"] = str(scripted.retry_after)
            return response
        token = request.match_info["token"]
        device = self.devices.get(token)
        if not APNS_TOKEN_RE.match(token) or device is None:
            return refuse(400, "BadDeviceToken")
        owner = self.accounts.get(device.integration_id)
        if owner is None or owner.fields["bundleId"] != topic:
            return refuse(400, "DeviceTokenNotForTopic")
        if device.revoked_at is not None:
            return refuse(410, "Unregistered", timestamp=int(device.revoked_at * 1000))
        apns_headers = {k.lower(): v for k, v in headers.items() if k.lower().startswith("apns-")}
        apns_headers["apns-id"] = apns_id
        self._record_push(token, {**payload, "apnsHeaders": apns_headers, "deviceToken": token,
                                  "receivedAt": self.clock()})
        return web.Response(status=200, headers={"apns-id": apns_id})
