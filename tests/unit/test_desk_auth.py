"""The desk's agent authentication: argon2id passwords and their policy, sessions stored hashed,
cookies, the CSRF middleware over real HTTP, the shared sign-in throttle, roles and app scoping."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import AsyncIterator
from types import SimpleNamespace

import msgspec
import nats.js.errors
import pytest
from aiohttp import ClientResponse, WSMsgType, web
from aiohttp.test_utils import TestClient, TestServer, make_mocked_request
from argon2 import PasswordHasher
from multidict import CIMultiDict

from services.desk import auth
from services.desk.auth import (
    CSRF_HEADER,
    LOGIN_ATTEMPT_RATES,
    PasswordRejected,
    SessionRecord,
    SharedLoginThrottle,
    ThrottlePolicy,
    ThrottleState,
    check_new_password,
    csrf_middleware,
    csrf_token,
    hash_password,
    needs_rehash,
    new_session,
    require_role,
    require_same_app,
    session_valid,
    verify_password,
)
from shared.http import ApiError, error_middleware
from shared.ratelimit import SharedLimiter

CHEAP = PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)  # only to make a stale hash

# --- passwords -------------------------------------------------------------------------------


def test_hash_is_argon2id_with_the_documented_parameters_and_verifies() -> None:
    stored = hash_password("tangerine kayak orbit")
    assert stored.startswith("$argon2id$v=19$m=65536,t=3,p=2$")
    assert verify_password(stored, "tangerine kayak orbit") is True
    assert verify_password(stored, "tangerine kayak orbiT") is False
    assert verify_password(stored, "") is False
    assert hash_password("tangerine kayak orbit") != stored  # salted
    assert needs_rehash(stored) is False


@pytest.mark.parametrize("stored", [
    "", "not a hash", "$argon2id$", "$argon2id$v=19$m=65536,t=3,p=2$AAAA$",
    "$2b$12$abcdefghijklmnopqrstuuJ8o0K0n3S5l6oY2XyF5Kq1eC3bEoG7W",  # bcrypt
    "$argon2id$v=19$m=4194304,t=3,p=2$c2FsdHNhbHRzYWx0$aGFzaGhhc2hoYXNoaGFzaGhhc2hoYXNoaGFzaGhhc2g",  # 4 GiB
    "$argon2id$v=19$m=65536,t=1000,p=2$c2FsdHNhbHRzYWx0$aGFzaGhhc2hoYXNoaGFzaGhhc2hoYXNoaGFzaGhhc2g",
    "\ud800", None,
])
def test_verify_never_raises_on_a_malformed_or_absent_hash(stored: str | None) -> None:
    # An over-costly hash (a tampered row) is refused unverified, not run for 4 GiB or minutes
    # (pytest-timeout would stop a test that did).
    assert verify_password(stored, "tangerine kayak orbit") is False


def test_an_argon2i_hash_is_refused_even_with_the_right_password() -> None:
    argon2i = PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1, type=auth.argon2.Type.I)
    assert verify_password(argon2i.hash("tangerine kayak orbit"), "tangerine kayak orbit") is False


def test_unknown_account_costs_a_real_verification() -> None:
    """Without an account, a dummy hash of the very same parameters is verified (the cost, not a
    timing, is what is checked: tests never depend on timing)."""
    assert verify_password(None, "wrong password here") is False
    dummy = auth._dummy_hash(auth.PASSWORD_HASHER)
    assert not needs_rehash(dummy)
    assert dummy.split("$")[3] == hash_password("tangerine kayak orbit").split("$")[3]


def test_passwords_are_nfkc_normalized() -> None:
    stored = hash_password("Ｐａｓｓ ｗｏｒｄ　１２３ café")  # full-width letters, ideographic space
    assert verify_password(stored, "Pass word 123 café")  # precomposed é
    assert verify_password(stored, "Pass word 123 cafe\u0301")  # e + combining acute
    assert not verify_password(stored, "pass word 123 café")
    assert not verify_password(hash_password("ﬁsh and chips!"), "fish and chips?")
    assert verify_password(hash_password("ﬁsh and chips!"), "fish and chips!")


def test_lone_surrogates_hash_and_verify_without_raising() -> None:
    stored = hash_password("odd \udc80 input here")
    assert verify_password(stored, "odd \udc80 input here")
    assert not verify_password(stored, "odd \udc81 input here")


def test_needs_rehash_for_other_parameters_and_garbage() -> None:
    assert needs_rehash(CHEAP.hash("x")) is True
    assert needs_rehash("garbage") is True


async def test_kdf_runs_off_the_loop() -> None:
    kdf = auth.Kdf(concurrency=1)
    stored = await kdf.hash("tangerine kayak orbit")
    results = await asyncio.gather(kdf.verify(stored, "tangerine kayak orbit"), kdf.verify(stored, "nope"),
                                   kdf.verify(None, "nope"))
    assert results == [True, False, False]


@pytest.mark.parametrize(("password", "reason"), [
    ("short pass1", "at least 12"),
    ("x" * 200 + "yz0123456789" * 5, "at most 256"),
    ("my name is Jane.Doe ok", "e-mail"),
    ("jane.doe-is-here-2024", "e-mail"),
    ("passwordpassword", "common"),
    ("Password1234!", "common"),
    ("P@ssw0rd2024!!", "common"),
    ("!!Iloveyou2025", "common"),
    ("Dr@g0n!2024!!", "common"),
    ("$unsh1ne_1987_", "common"),
    ("dragondragondragon", "common"),
    ("Summer2025!!!!", "common"),
    ("aaaaaaaaaaaaaa", "repetitive"),
    ("abcabcabcabc", "repetitive"),
    ("qwertyuiopasdf", "run of keys"),
    ("123456789012", "run of keys"),
    ("210987654321", "run of keys"),
    ("ABCDEFGHIJKLMN", "run of keys"),
    ("1qaz2wsx3edc4rfv", "run of keys"),
    ("valid \ud800 except the surrogate", "not valid text"),
])
def test_policy_refuses(password: str, reason: str) -> None:
    with pytest.raises(PasswordRejected) as caught:
        check_new_password(password, "Jane.Doe+desk@example.com")
    assert reason in caught.value.reason
    assert isinstance(caught.value, ValueError)


@pytest.mark.parametrize("password", [
    "tangerine kayak orbit",
    "Tangerine-Kayak-Orbit-91",
    "мой пароль очень длинный",
    "パスワードは長いですよね本当に",
    "ﬁsh and chips for 4",  # 19 characters after NFKC
    "x" * 200 + "yz0123456789" * 4 + "abcdefgh",  # exactly 256
])
def test_policy_accepts(password: str) -> None:
    check_new_password(password, "jane.doe@example.com")  # raises when refused


def test_policy_measures_length_after_nfkc() -> None:
    # "㎏" (one character) is "kg" after NFKC: 6 × "㎏" are 12 characters but 2 distinct.
    with pytest.raises(PasswordRejected, match="repetitive"):
        check_new_password("㎏" * 6, "a@example.com")
    with pytest.raises(PasswordRejected, match="at least 12"):
        check_new_password("ＡｂＣｄ１２", "a@example.com")  # 6 full-width = 6


def test_a_short_local_part_does_not_forbid_its_letters() -> None:
    check_new_password("Jo likes tangerine kayaks", "jo@example.com")


# --- sessions --------------------------------------------------------------------------------


def test_session_token_is_256_bits_urlsafe_and_stored_only_hashed() -> None:
    token, record = new_session("agent1", "app1", 1000.0, 600, 3600)
    other, _ = new_session("agent1", "app1", 1000.0, 600, 3600)
    assert token != other and len(token) == 43
    assert set(token) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
    assert record.token_hash == hashlib.sha256(token.encode()).hexdigest()
    stored = msgspec.json.encode(record)
    assert token.encode() not in stored
    assert (record.agent_id, record.app_id, record.created_at, record.last_seen_at, record.expires_at) == (
        "agent1", "app1", 1000.0, 1000.0, 4600.0)


def test_session_idle_expiry() -> None:
    _, record = new_session("a", "app", 0.0, idle_timeout=600, absolute_timeout=36000)
    assert session_valid(record, 599.0)
    assert not session_valid(record, 600.0)
    touched = msgspec.structs.replace(record, last_seen_at=500.0)
    assert session_valid(touched, 1099.0) and not session_valid(touched, 1100.0)


def test_session_absolute_expiry_whatever_the_activity() -> None:
    _, record = new_session("a", "app", 0.0, idle_timeout=600, absolute_timeout=3600)
    active = msgspec.structs.replace(record, last_seen_at=3599.0)
    assert session_valid(active, 3599.5)
    assert not session_valid(active, 3600.0)


def test_session_timeouts_must_be_positive() -> None:
    with pytest.raises(ValueError):
        new_session("a", "app", 0.0, idle_timeout=0, absolute_timeout=10)


class MemoryStore:
    def __init__(self) -> None:
        self.sessions: dict[str, SessionRecord] = {}
        self.touches: list[tuple[str, float]] = []

    async def create_session(self, record: SessionRecord) -> None:
        self.sessions[record.token_hash] = record

    async def get_session(self, token_hash: str) -> SessionRecord | None:
        return self.sessions.get(token_hash)

    async def touch_session(self, token_hash: str, last_seen_at: float) -> None:
        self.touches.append((token_hash, last_seen_at))
        self.sessions[token_hash] = msgspec.structs.replace(self.sessions[token_hash], last_seen_at=last_seen_at)

    async def delete_session(self, token_hash: str) -> None:
        self.sessions.pop(token_hash, None)

    async def delete_agent_sessions(self, agent_id: str, keep: str | None = None) -> int:
        doomed = [h for h, r in self.sessions.items() if r.agent_id == agent_id and h != keep]
        for h in doomed:
            del self.sessions[h]
        return len(doomed)


async def test_rotation_drops_the_old_session_and_stores_the_new_one_hashed() -> None:
    store = MemoryStore()
    planted, planted_record = new_session("attacker", "app", 0.0)
    await store.create_session(planted_record)
    token, record = await auth.rotate_session(store, planted, "agent1", "app", 10.0)
    assert token != planted
    assert list(store.sessions) == [auth.session_token_hash(token)]
    assert store.sessions[record.token_hash].agent_id == "agent1"
    assert token not in store.sessions  # keyed by hash, never by token
    # Garbage in place of an old token is ignored, not looked up.
    await auth.rotate_session(store, "not a token", "agent1", "app", 11.0)
    assert len(store.sessions) == 2


def _request_with_cookie(name: str, value: str) -> web.Request:
    return make_mocked_request("GET", "/desk/api/me", headers={"Cookie": f"{name}={value}"})


async def test_current_session_reads_checks_and_touches() -> None:
    store = MemoryStore()
    token, record = new_session("agent1", "app", 1000.0, idle_timeout=600, absolute_timeout=3600)
    await store.create_session(record)
    found = await auth.current_session(_request_with_cookie("tl_desk", token), store, secure=False, now=1010.0)
    assert found.agent_id == "agent1" and store.touches == []  # too soon to write
    found = await auth.current_session(_request_with_cookie("tl_desk", token), store, secure=False, now=1200.0)
    assert found.last_seen_at == 1200.0 and store.touches == [(record.token_hash, 1200.0)]
    # Over https only the __Host- cookie counts.
    with pytest.raises(ApiError) as caught:
        await auth.current_session(_request_with_cookie("tl_desk", token), store, secure=True, now=1200.0)
    assert caught.value.status == 401
    found = await auth.current_session(_request_with_cookie("__Host-tl_desk", token), store, secure=True,
                                       now=1201.0)
    assert found.agent_id == "agent1"
    # Idle past the timeout: refused and deleted.
    with pytest.raises(ApiError) as caught:
        await auth.current_session(_request_with_cookie("tl_desk", token), store, secure=False, now=1800.0)
    assert caught.value.status == 401 and store.sessions == {}
    for value in ("", "x" * 43, token[:-1], token + "A"):
        with pytest.raises(ApiError):
            await auth.current_session(_request_with_cookie("tl_desk", value), store, secure=False, now=1000.0)


# --- cookies ---------------------------------------------------------------------------------


def _parse_set_cookie(header: str) -> tuple[str, str, dict[str, str]]:
    first, *attrs = [part.strip() for part in header.split(";")]
    name, _, value = first.partition("=")
    parsed = {}
    for attr in attrs:
        key, _, val = attr.partition("=")
        parsed[key.lower()] = val
    return name, value, parsed


@pytest.fixture
async def cookie_client() -> AsyncIterator[TestClient]:
    token, record = new_session("agent1", "app", 1000.0, idle_timeout=600, absolute_timeout=3600)

    async def set_cookie(request: web.Request) -> web.Response:
        response = web.Response(text=token)
        auth.set_session_cookie(response, token, record, secure=request.query["secure"] == "1", now=1100.0)
        return response

    async def clear_cookie(request: web.Request) -> web.Response:
        response = web.Response()
        auth.clear_session_cookie(response, secure=request.query["secure"] == "1")
        return response

    app = web.Application()
    app.router.add_get("/set", set_cookie)
    app.router.add_get("/clear", clear_cookie)
    async with TestClient(TestServer(app)) as client:
        yield client


async def test_cookie_over_https_is_host_prefixed_secure_httponly_lax(cookie_client: TestClient) -> None:
    response = await cookie_client.get("/set", params={"secure": "1"})
    headers = response.headers.getall("Set-Cookie")
    assert len(headers) == 1
    name, value, attrs = _parse_set_cookie(headers[0])
    assert name == "__Host-tl_desk" and value == await response.text()
    assert "secure" in attrs and "httponly" in attrs
    assert attrs["samesite"] == "Lax" and attrs["path"] == "/" and "domain" not in attrs
    assert attrs["max-age"] == "3500"  # what is left of the absolute timeout


async def test_cookie_on_plain_http_is_not_secure(cookie_client: TestClient) -> None:
    response = await cookie_client.get("/set", params={"secure": "0"})
    name, _, attrs = _parse_set_cookie(response.headers["Set-Cookie"])
    assert name == "tl_desk"
    assert "secure" not in attrs and "httponly" in attrs
    assert attrs["samesite"] == "Lax" and attrs["path"] == "/" and "domain" not in attrs
    assert attrs["max-age"] == "3500"


@pytest.mark.parametrize(("secure", "name"), [("1", "__Host-tl_desk"), ("0", "tl_desk")])
async def test_clearing_keeps_the_attributes(cookie_client: TestClient, secure: str, name: str) -> None:
    response = await cookie_client.get("/clear", params={"secure": secure})
    got, value, attrs = _parse_set_cookie(response.headers["Set-Cookie"])
    assert got == name and value in ("", '""') and attrs["max-age"] == "0"
    assert attrs["path"] == "/" and "domain" not in attrs and ("secure" in attrs) == (secure == "1")


def test_cookie_security_follows_the_public_base_url() -> None:
    assert auth.cookie_secure("https://desk.example.com") is True
    assert auth.cookie_secure("HTTPS://desk.example.com:8443/x") is True
    assert auth.cookie_secure("http://127.0.0.1:8080") is False


# --- CSRF ------------------------------------------------------------------------------------

KEY = b"k" * 32
BASE = "http://127.0.0.1:8080"
LOGIN = "/desk/api/login"


def _csrf_app(secure: bool) -> web.Application:
    async def ok(request: web.Request) -> web.Response:
        return web.json_response({"ok": True, "method": request.method})

    async def socket(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await ws.send_str("hello")
        await ws.close()
        return ws

    app = web.Application(middlewares=[
        error_middleware,
        csrf_middleware(key=KEY, secure=secure, allowed_origins=[BASE + "/"], exempt_paths=[LOGIN]),
    ])
    app.router.add_route("*", "/desk/api/thing", ok)
    app.router.add_post(LOGIN, ok)
    app.router.add_post(LOGIN + "/", ok)
    app.router.add_get("/desk/ws", socket)
    return app


@pytest.fixture
async def csrf_client() -> AsyncIterator[TestClient]:
    async with TestClient(TestServer(_csrf_app(secure=False))) as client:
        yield client


TOKEN, _ = new_session("agent1", "app", time.time())
OTHER, _ = new_session("agent2", "app", time.time())


def _headers(cookie_token: str | None = TOKEN, csrf: str | None = None, **extra: str) -> dict[str, str]:
    headers = dict(extra)
    if cookie_token is not None:
        headers["Cookie"] = f"tl_desk={cookie_token}"
    if csrf is not None:
        headers[CSRF_HEADER] = csrf
    return headers


async def _refused(response: ClientResponse) -> None:
    assert response.status == 403
    body = await response.json()
    assert body["errors"][0]["code"] == "forbidden" and body["errors"][0]["title"]


@pytest.mark.parametrize("method", ["POST", "PUT", "PATCH", "DELETE", "PROPFIND"])
async def test_state_changing_requests_need_the_session_csrf_token(csrf_client: TestClient, method: str) -> None:
    path = "/desk/api/thing"
    await _refused(await csrf_client.request(method, path, headers=_headers()))
    await _refused(await csrf_client.request(method, path, headers=_headers(csrf="wrong")))
    await _refused(await csrf_client.request(method, path, headers=_headers(csrf=csrf_token(KEY, OTHER))))
    await _refused(await csrf_client.request(method, path, headers=_headers(csrf=csrf_token(b"x" * 32, TOKEN))))
    await _refused(await csrf_client.request(method, path, headers=_headers(None, csrf=csrf_token(KEY, TOKEN))))
    await _refused(await csrf_client.request(method, path, headers=_headers(csrf="é" * 43)))
    response = await csrf_client.request(method, path, headers=_headers(csrf=csrf_token(KEY, TOKEN)))
    assert response.status == 200 and (await response.json())["method"] == method


async def test_cross_origin_is_refused_even_with_the_right_token(csrf_client: TestClient) -> None:
    right = csrf_token(KEY, TOKEN)
    for extra in ({"Origin": "https://evil.example"}, {"Origin": "http://127.0.0.1:9999"},
                  {"Origin": "https://127.0.0.1:8080"}, {"Origin": "null"},
                  {"Sec-Fetch-Site": "cross-site"}, {"Sec-Fetch-Site": "same-site"},
                  {"Origin": BASE, "Sec-Fetch-Site": "same-site"}):
        await _refused(await csrf_client.post("/desk/api/thing", headers=_headers(csrf=right, **extra)))
    for extra in ({"Origin": BASE}, {"Origin": "HTTP://127.0.0.1:8080"}, {"Sec-Fetch-Site": "same-origin"},
                  {"Origin": BASE, "Sec-Fetch-Site": "same-origin"}, {}):
        response = await csrf_client.post("/desk/api/thing", headers=_headers(csrf=right, **extra))
        assert response.status == 200, extra


async def test_two_origin_headers_are_refused(csrf_client: TestClient) -> None:
    headers = CIMultiDict(_headers(csrf=csrf_token(KEY, TOKEN)))
    headers.add("Origin", BASE)
    headers.add("Origin", "https://evil.example")
    await _refused(await csrf_client.post("/desk/api/thing", headers=headers))


@pytest.mark.parametrize("method", ["GET", "HEAD", "OPTIONS"])
async def test_safe_methods_pass_without_token(csrf_client: TestClient, method: str) -> None:
    response = await csrf_client.request(method, "/desk/api/thing",
                                         headers=_headers(None, Origin="https://evil.example"))
    assert response.status == 200


async def test_login_is_allow_listed_but_needs_a_same_origin(csrf_client: TestClient) -> None:
    for extra in ({"Origin": BASE}, {"Sec-Fetch-Site": "same-origin"}):
        response = await csrf_client.post(LOGIN, headers=_headers(None, **extra))
        assert response.status == 200, extra
    for extra in ({}, {"Origin": "https://evil.example"}, {"Sec-Fetch-Site": "cross-site"}, {"Origin": "null"}):
        await _refused(await csrf_client.post(LOGIN, headers=_headers(None, **extra)))
    # The allow-list is exact: a look-alike path still needs the token.
    await _refused(await csrf_client.post(LOGIN + "/", headers=_headers(None, Origin=BASE)))


async def test_websocket_handshake_needs_a_same_origin(csrf_client: TestClient) -> None:
    ws = await csrf_client.ws_connect("/desk/ws", origin=BASE)
    message = await ws.receive()
    assert message.type is WSMsgType.TEXT and message.data == "hello"
    await ws.close()
    response = await csrf_client.get("/desk/ws", headers={"Connection": "Upgrade", "Upgrade": "websocket",
                                                          "Sec-WebSocket-Version": "13",
                                                          "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
                                                          "Origin": "https://evil.example"})
    await _refused(response)
    response = await csrf_client.get("/desk/ws", headers={"Connection": "Upgrade", "Upgrade": "websocket",
                                                          "Sec-WebSocket-Version": "13",
                                                          "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="})
    await _refused(response)


async def test_secure_mode_reads_only_the_host_cookie() -> None:
    right = csrf_token(KEY, TOKEN)
    async with TestClient(TestServer(_csrf_app(secure=True))) as client:
        await _refused(await client.post("/desk/api/thing", headers=_headers(csrf=right)))  # tl_desk ignored
        response = await client.post("/desk/api/thing", headers={"Cookie": f"__Host-tl_desk={TOKEN}",
                                                                 CSRF_HEADER: right})
        assert response.status == 200


def test_csrf_token_is_bound_to_session_and_key() -> None:
    assert csrf_token(KEY, TOKEN) == csrf_token(KEY, TOKEN)
    assert csrf_token(KEY, TOKEN) != csrf_token(KEY, OTHER)
    assert csrf_token(KEY, TOKEN) != csrf_token(b"j" * 32, TOKEN)
    assert auth.csrf_token_ok(KEY, TOKEN, csrf_token(KEY, TOKEN))
    assert not auth.csrf_token_ok(KEY, TOKEN, None)
    assert TOKEN not in csrf_token(KEY, TOKEN)
    assert auth.csrf_meta_tag(KEY, TOKEN) == f'<meta name="csrf-token" content="{csrf_token(KEY, TOKEN)}">'


def test_middleware_needs_an_origin() -> None:
    with pytest.raises(ValueError):
        csrf_middleware(key=KEY, secure=False, allowed_origins=[])
    with pytest.raises(ValueError):
        csrf_middleware(key=KEY, secure=False, allowed_origins=["not a url"])
    assert auth.origin_of("https://Desk.Example.com:443/desk/") == "https://desk.example.com"
    assert auth.origin_of("http://[::1]:8080") == "http://[::1]:8080"


# --- login throttling ------------------------------------------------------------------------


def test_failure_delay_grows_exponentially_to_fifteen_minutes() -> None:
    policy = ThrottlePolicy()
    delays = [auth.failure_delay(n, policy) for n in range(12)]
    assert delays == [0, 0, 0, 0, 0, 30, 60, 120, 240, 480, 900, 900]


def test_throttle_wait_and_forgetting() -> None:
    policy = ThrottlePolicy()
    state = None
    for t in range(5):
        assert auth.throttle_wait(state, float(t), policy) == 0
        state = auth.record_failure(state, float(t), policy)
    assert state == ThrottleState(5, 4.0)
    assert auth.throttle_wait(state, 4.0, policy) == 30
    assert auth.throttle_wait(state, 20.0, policy) == 14
    assert auth.throttle_wait(state, 34.0, policy) == 0
    new, wait = auth.throttle_attempt(state, 10.0, policy)
    assert new is None and wait == 24
    new, wait = auth.throttle_attempt(state, 34.0, policy)
    assert new == ThrottleState(6, 34.0) and wait == 0
    assert auth.throttle_wait(new, 34.0 + 59, policy) == 1
    # A day without failures: the count starts over.
    assert auth.throttle_wait(new, 34.0 + 86400, policy) == 0
    assert auth.record_failure(new, 34.0 + 86400, policy) == ThrottleState(1, 34.0 + 86400)
    assert auth.throttle_forgive(new) == ThrottleState(5, 34.0)
    assert auth.throttle_forgive(ThrottleState(1, 0.0)) is None
    assert auth.decode_throttle_state(auth.encode_throttle_state(new)) == new
    assert auth.decode_throttle_state(b"garbage") is None and auth.decode_throttle_state(b"") is None


class FakeKV:
    """JetStream KV semantics the throttle relies on: revisions, create-if-absent, compare-and-set."""

    def __init__(self) -> None:
        self.data: dict[str, tuple[bytes, int]] = {}
        self.seq = 0

    async def get(self, key: str) -> SimpleNamespace:
        await asyncio.sleep(0)  # let concurrent callers interleave, as over the network
        if key not in self.data:
            raise nats.js.errors.KeyNotFoundError()
        value, revision = self.data[key]
        return SimpleNamespace(value=value, revision=revision)

    async def create(self, key: str, value: bytes) -> int:
        await asyncio.sleep(0)
        if key in self.data:
            raise nats.js.errors.KeyWrongLastSequenceError()
        return self._put(key, value)

    async def update(self, key: str, value: bytes, last: int | None = None) -> int:
        await asyncio.sleep(0)
        if key not in self.data or self.data[key][1] != last:
            raise nats.js.errors.KeyWrongLastSequenceError()
        return self._put(key, value)

    async def delete(self, key: str) -> bool:
        self.data.pop(key, None)
        return True

    def _put(self, key: str, value: bytes) -> int:
        self.seq += 1
        self.data[key] = (value, self.seq)
        return self.seq


async def test_shared_throttle_backs_off_per_account_and_clears_on_success() -> None:
    now = [1000.0]
    kv = FakeKV()
    throttle = SharedLoginThrottle(kv, b"h" * 32, clock=lambda: now[0])
    for _ in range(5):
        assert await throttle.attempt("app1", "Jane@Example.com", "203.0.113.7") == 0
    assert await throttle.attempt("app1", "jane@example.com", "198.51.100.1") == 30  # same account
    assert await throttle.wait("app1", "jane@example.com", "198.51.100.1") == 30
    assert await throttle.attempt("app2", "jane@example.com", "198.51.100.1") == 0  # another app's account
    now[0] += 30
    assert await throttle.attempt("app1", "jane@example.com", "203.0.113.7") == 0
    assert await throttle.attempt("app1", "jane@example.com", "203.0.113.7") == 60
    now[0] += 60
    assert await throttle.attempt("app1", "jane@example.com", "203.0.113.7") == 0
    await throttle.succeeded("app1", "jane@example.com", "203.0.113.7")
    assert await throttle.wait("app1", "jane@example.com", "203.0.113.7") == 0
    for _ in range(5):
        assert await throttle.attempt("app1", "jane@example.com", "203.0.113.7") == 0
    # No e-mail or address in the keys or values.
    stored = repr(kv.data)
    assert "jane" not in stored.lower() and "203.0.113" not in stored and "app1" not in stored


async def test_shared_throttle_backs_off_per_address_across_accounts() -> None:
    now = [1000.0]
    throttle = SharedLoginThrottle(FakeKV(), b"h" * 32, clock=lambda: now[0])
    for n in range(20):
        assert await throttle.attempt("app1", f"user{n}@example.com", "2001:db8::1") == 0
    # Another address in the same /64 is the same source; another account does not help.
    assert await throttle.attempt("app1", "fresh@example.com", "2001:db8::ffff") == 10
    assert await throttle.attempt("app1", "fresh@example.com", "2001:db9::1") == 0
    # A refused account attempt takes back the address's count.
    throttle2 = SharedLoginThrottle(FakeKV(), b"h" * 32, clock=lambda: now[0])
    for _ in range(5):
        await throttle2.attempt("app1", "x@example.com", "192.0.2.1")
    for _ in range(20):
        assert await throttle2.attempt("app1", "x@example.com", "192.0.2.1") == 30
    assert await throttle2.attempt("app1", "y@example.com", "192.0.2.1") == 0  # address count is 6


async def test_concurrent_attempts_cannot_share_a_free_slot() -> None:
    throttle = SharedLoginThrottle(FakeKV(), b"h" * 32, clock=lambda: 1000.0)
    waits = await asyncio.gather(*(throttle.attempt("app1", "jane@example.com", f"192.0.2.{n}")
                                   for n in range(12)))
    assert sorted(waits) == [0] * 5 + [30] * 7


async def test_shared_limiter_is_reused_for_the_attempt_rate() -> None:
    now = [1000.0]
    limiter = SharedLimiter(FakeKV(), b"h" * 32, clock=lambda: now[0])  # type: ignore[arg-type]
    waits = [await limiter.take("desk-login", "192.0.2.1", LOGIN_ATTEMPT_RATES) for _ in range(11)]
    assert waits[:10] == [0] * 10 and waits[10] > 0
    assert await limiter.take("desk-login", "192.0.2.2", LOGIN_ATTEMPT_RATES) == 0


# --- roles and apps --------------------------------------------------------------------------


def test_require_role() -> None:
    require_role("admin", "admin")
    require_role("admin", "agent")
    require_role("agent", "agent")
    for role in ("agent", "owner", "", "Admin"):
        with pytest.raises(ApiError) as caught:
            require_role(role, "admin")
        assert caught.value.status == 403 and caught.value.code == "forbidden"
    with pytest.raises(ApiError):
        require_role("superuser", "agent")


def test_require_same_app_answers_not_found() -> None:
    require_same_app("app_a", "app_a")
    with pytest.raises(ApiError) as caught:
        require_same_app("app_a", "app_b", "Conversation")
    assert (caught.value.status, caught.value.code, caught.value.title) == (404, "not_found",
                                                                            "Conversation not found")
