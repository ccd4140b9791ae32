"""Agent authentication for the desk: passwords, sessions, cookies, CSRF, login throttling, roles.

Pure logic plus small aiohttp pieces; the store is whatever implements `SessionStore`, the
throttle's shared state a JetStream KV bucket (`ThrottleKV`, which nats' `KeyValue` satisfies).

**Passwords.** argon2id through argon2-cffi (`PASSWORD_HASHER`): time_cost 3, 64 MiB, two lanes
(RFC 9106's second recommended profile, with parallelism fitted to the 2-core box Threadline is
sized for: two lanes run on two threads, so a login takes ~0.13 s there instead of ~0.35 s with
one lane; more lanes than cores buy nothing and the parallelism is fixed into every hash). The
password is NFKC-normalized before hashing, so the same password typed on two keyboards (a
full-width digit, a precomposed accent) is the same password. Each hash holds 64 MiB while it
runs: the service runs them through `Kdf` (a thread per hash, at most `KDF_CONCURRENCY` at once,
so a burst of logins costs at most 128 MiB and never blocks the event loop).

**Sessions.** A session token is 256 random bits (`secrets.token_urlsafe(32)`, 43 characters),
handed to the browser only, in the cookie. The store keeps `SessionRecord`s keyed by the token's
SHA-256 (`session_token_hash`), so a leaked database or backup holds no live session. A session
ends `idle_timeout` after its last use or `absolute_timeout` after it started, whichever is first.
The service must **rotate** (`rotate_session`: drop the old token, issue a new one):
- on every successful sign-in (password or SSO), whatever session cookie the browser already had:
  a token planted before sign-in (session fixation) must never become a signed-in session;
- when the signed-in agent's own privileges change within their session (a re-authentication
  step-up, an agent changing their own role or password); on a password change it also drops
  the agent's other sessions (`SessionStore.delete_agent_sessions(agent_id, keep=...)`);
- and when an admin changes *another* agent's role, or disables or deletes them, it drops all of
  that agent's sessions (`delete_agent_sessions(agent_id)`): they sign in again, which rotates.
The role is never cached in the session: the service reads the agent's current role per request.
The CSRF token is derived from the session token, so it changes with each rotation: the sign-in
answer carries the new one. A WebSocket outlives requests: the service re-checks
`session_valid` on the socket periodically (and on the session's deletion) and closes it.

**Cookies.** `__Host-tl_desk` when the public base URL is https (Secure, Path=/, no Domain: the
`__Host-` prefix makes browsers refuse the cookie otherwise, so no sibling subdomain or plain
http page can plant or overwrite it), `tl_desk` on plain http (the sandbox on 127.0.0.1, where a
Secure cookie would never come back). Whether https is decided from `THREADLINE_PUBLIC_BASE_URL`
(`cookie_secure`), never from the request: behind the TLS-terminating front door every request
arrives as http. HttpOnly (no script reads it), SameSite=Lax, Max-Age = what is left of the
absolute timeout. Lax, not Strict: Strict withholds the cookie on every navigation that starts
on another site, so a link into a desk conversation from the notification e-mail, a chat tool,
the business's CRM or the sandbox page (`make up`'s "Reply as the business" step opens the desk)
would land a signed-in agent on the sign-in page. Lax sends the cookie on those top-level GET
navigations only, never on a cross-site POST, fetch, iframe or WebSocket; GETs change nothing
(every other method needs the CSRF header), so Lax loses nothing Strict would protect.

**CSRF.** `csrf_token` is an HMAC of the session token under a server key (nothing extra stored;
a leaked database yields no CSRF token). The page gets it in a `<meta name="csrf-token">` tag
(`csrf_meta_tag`) or the sign-in / bootstrap JSON and sends it as `X-CSRF-Token` on every request
whose method is not GET/HEAD/OPTIONS; `csrf_middleware` compares it in constant time and, as
defence in depth, refuses any such request whose `Origin` is not one of the desk's own origins or
whose `Sec-Fetch-Site` is not `same-origin`. Same-site is not enough: other ports on the same
host (the sandbox's fakes, the widget) are "same site" to SameSite but not the same origin. The
sign-in endpoint has no session yet, so it is allow-listed from the token check and must instead
carry a matching `Origin` (or `Sec-Fetch-Site: same-origin`): that stops login CSRF (signing the
victim into the attacker's account). WebSocket handshakes (GET) need a matching `Origin` too
(cross-site WebSocket hijacking).

**Login throttling.** Failed sign-ins are counted per (app, e-mail) and per client address
(`source_key`: an IPv6 client counts as its /64): after `free_failures` (5 per account, 20 per
address: an office shares one) each further attempt waits exponentially longer, up to 15
minutes; a success clears the account's count. The state must be shared by every replica: it
lives in a JetStream KV bucket (`SharedLoginThrottle`, compare-and-set like
`shared.ratelimit.SharedLimiter`, keys are keyed hashes, so no address or e-mail is stored in
plaintext; the bucket's TTL should be `THROTTLE_TTL_SECONDS`). `SharedLimiter` itself cannot
hold this state (it has no reset on success, no way to look without counting, and paces
linearly), but it is reused as is for the plain attempt rate per address in front of the KDF
(`LOGIN_ATTEMPT_RATES`), which bounds the CPU a flood of sign-ins (even successful ones) costs.
The sign-in handler, in order: `limiter.take("desk-login", source_key(ip), LOGIN_ATTEMPT_RATES)`
→ 429; `await throttle.attempt(app_id, email, ip)` → 429 with Retry-After (nothing is verified);
`await kdf.verify(agent.password_hash if agent else None, password)` (an unknown e-mail costs the
same KDF, so timing does not reveal which accounts exist); on failure 401 "Invalid e-mail or
password" (the same text for an unknown e-mail); on success `throttle.succeeded(...)`, rehash if
`needs_rehash`, `rotate_session`, `set_session_cookie`, answer with the CSRF token. The account
count can be driven up by anyone who knows an agent's e-mail: the back-off is bounded (15
minutes, never a lock-out) for that reason, and SSO agents are not exposed to it.

**Roles and apps.** `require_role` answers 403 to an agent without the role. `require_same_app`
answers **404**, not 403, when an agent of app A names anything of app B: a 403 would confirm that
the id exists (and belongs to some other business), turning every id into an oracle; 404 is what
a truly absent id gets, so another app's ids are indistinguishable from nonexistent ones. The
store's queries should be scoped by app id in the first place; this check guards anything loaded
by id alone.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import hashlib
import hmac
import html
import re
import secrets
import time
import unicodedata
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from typing import Literal, Protocol
from urllib.parse import urlsplit

import argon2
import msgspec
import nats.js.errors
from aiohttp import web
from aiohttp.typedefs import Middleware
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from shared.clientip import source_key
from shared.config import Rate
from shared.http import ApiError, Handler, error_response, is_websocket_upgrade
from shared.ratelimit import CasStore, update_with_cas
from shared.retry import backoff_delay
from shared.untrusted import secrets_equal

# --- passwords -------------------------------------------------------------------------------

ARGON2_TIME_COST = 3
ARGON2_MEMORY_KIB = 64 * 1024  # 64 MiB per hash
ARGON2_PARALLELISM = 2  # lanes = threads: the cores of the smallest box we size for
PASSWORD_HASHER = PasswordHasher(time_cost=ARGON2_TIME_COST, memory_cost=ARGON2_MEMORY_KIB,
                                 parallelism=ARGON2_PARALLELISM, hash_len=32, salt_len=16,
                                 type=argon2.Type.ID)
# What a stored hash may ask for before it is refused unverified (a tampered row must not make
# one sign-in allocate gigabytes or run for minutes).
MAX_STORED_MEMORY_KIB = 256 * 1024
MAX_STORED_TIME_COST = 10
MAX_STORED_PARALLELISM = 8
# Hashes run at once in a process (each holds ARGON2_MEMORY_KIB).
KDF_CONCURRENCY = 2

MIN_PASSWORD_LENGTH = 12
MAX_PASSWORD_LENGTH = 256


class PasswordRejected(ValueError):
    """A new password the policy refuses; `reason` says why, in words for the person choosing it."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def normalize_password(password: str) -> str:
    """The password as it is hashed: NFKC, so compatibility forms (full-width letters and digits,
    ligatures, precomposed or combining accents) compare equal."""
    return unicodedata.normalize("NFKC", password)


def _password_bytes(password: str) -> bytes:
    # `surrogatepass`: a lone surrogate (undecodable input) is still bytes, never an exception.
    return normalize_password(password).encode("utf-8", "surrogatepass")


def hash_password(password: str, hasher: PasswordHasher = PASSWORD_HASHER) -> str:
    """The argon2id hash of `password` (NFKC-normalized) in PHC form, salt included."""
    return hasher.hash(_password_bytes(password))


def _acceptable_hash(stored_hash: str) -> bool:
    try:
        params = argon2.extract_parameters(stored_hash)
    except (InvalidHashError, ValueError, TypeError):
        return False
    return (params.type is argon2.Type.ID and params.memory_cost <= MAX_STORED_MEMORY_KIB
            and params.time_cost <= MAX_STORED_TIME_COST and params.parallelism <= MAX_STORED_PARALLELISM)


@functools.lru_cache(maxsize=4)
def _dummy_hash(hasher: PasswordHasher) -> str:
    return hasher.hash(secrets.token_bytes(16))


def verify_password(stored_hash: str | None, password: str, hasher: PasswordHasher = PASSWORD_HASHER) -> bool:
    """Whether `password` matches `stored_hash` (constant time: libargon2 compares the digests so).

    Never raises: a malformed, foreign or over-costly hash is False. Without a usable hash (None:
    no such agent) a dummy hash of the same cost is verified anyway, so the answer takes as long
    as for a real account and timing does not tell which e-mails have one.
    """
    candidate = _password_bytes(password) if isinstance(password, str) else b""
    try:
        if (not isinstance(stored_hash, str) or not _acceptable_hash(stored_hash)
                or len(candidate) > 4 * MAX_PASSWORD_LENGTH):
            hasher.verify(_dummy_hash(hasher), candidate)
            return False
        return hasher.verify(stored_hash, candidate)
    except (VerificationError, InvalidHashError, argon2.exceptions.Argon2Error, ValueError, TypeError):
        return False


def needs_rehash(stored_hash: str, hasher: PasswordHasher = PASSWORD_HASHER) -> bool:
    """Whether `stored_hash` was made with other parameters than `hasher`'s (or is unusable): the
    sign-in that just verified the password should store `hash_password(password)` instead."""
    try:
        return hasher.check_needs_rehash(stored_hash)
    except (InvalidHashError, ValueError, TypeError):
        return True


class Kdf:
    """Runs hashes off the event loop, at most `concurrency` at once (each holds 64 MiB and a core;
    more at once would only queue on the cores while holding the memory)."""

    def __init__(self, concurrency: int = KDF_CONCURRENCY, hasher: PasswordHasher = PASSWORD_HASHER) -> None:
        self.hasher = hasher
        self._slots = asyncio.Semaphore(concurrency)

    async def hash(self, password: str) -> str:
        """`hash_password` in a worker thread."""
        async with self._slots:
            return await asyncio.to_thread(hash_password, password, self.hasher)

    async def verify(self, stored_hash: str | None, password: str) -> bool:
        """`verify_password` in a worker thread."""
        async with self._slots:
            return await asyncio.to_thread(verify_password, stored_hash, password, self.hasher)


# The most common passwords (from the public breach-corpus top lists), casefolded. Most are
# shorter than 12 characters and so refused by length anyway; they matter as the *core* of a
# longer password ("Password1234!", "p@ssw0rd2024", "dragondragon"), which `check_new_password`
# finds by stripping leading/trailing digits and symbols, undoing common letter substitutions and
# folding repetitions.
COMMON_PASSWORDS = frozenset("""
123456 password 12345678 qwerty 123456789 12345 1234 111111 1234567 dragon 123123 baseball
abc123 football monkey letmein 696969 shadow master 666666 qwertyuiop 123321 mustang 1234567890
michael 654321 superman 1qaz2wsx 7777777 121212 000000 qazwsx 123qwe killer trustno1 jordan
jennifer zxcvbnm asdfgh hunter buster soccer harley batman andrew tigger sunshine iloveyou 2000
charlie robert thomas hockey ranger daniel starwars klaster 112233 george computer michelle
jessica pepper 1111 zxcvbn 555555 11111111 131313 freedom 777777 pass maggie 159753 aaaaaa
ginger princess joshua cheese amanda summer love ashley nicole chelsea biteme matthew access
yankees 987654321 dallas austin thunder taylor matrix minecraft william corvette hello martin
heather secret merlin diamond 1234qwer gfhjkm hammer silver 222222 88888888 anthony justin test
bailey q1w2e3r4t5 patrick internet scooter orange 11111 golfer cookie richard samantha bigdog
guitar jackson whatever mickey chicken sparky snoopy maverick phoenix camaro peanut morgan
welcome falcon cowboy ferrari samsung andrea smokey steelers joseph mercedes dakota arsenal
eagles melissa boomer booboo spider nascar monster tigers yellow xxxxxx 123123123 gateway
marina diablo bulldog qwer1234 compaq purple hardcore banana junior hannah 123654 porsche
lakers iceman money cowboys 987654 london tennis 999999 ncc1701 coffee scooby 0000 miller
boston q1w2e3r4 brandon yamaha chester mother forever johnny edward 333333 oliver redsox player
nikita knight fender barney midnight please brandy chicago badboy slayer rangers charles angel
flower bigdaddy rabbit wizard bigdick jasper enter rachel chris steven winner adidas victoria
natasha 1q2w3e4r jasmine winter prince panties marine ghbdtn fishing cocacola casper james
232323 raiders 888888 marlboro gandalf asdfasdf crystal 87654321 12344321 golden 8675309 dragons
hello123 qwerty123 password1 password12 password123 admin admin123 administrator root toor
changeme letmein1 welcome1 welcome123 passw0rd p@ssw0rd p@ssword iloveyou1 abcd1234 qwertyui
asdfghjkl zaq12wsx 1qaz2wsx3edc qazwsxedc 1q2w3e4r5t 1q2w3e4r5t6y zaq1zaq1 zaq1xsw2 qwe123
football1 baseball1 monkey1 dragon1 master1 shadow1 sunshine1 princess1 superman1 trustno1
starwars1 pokemon pikachu naruto liverpool chelsea1 barcelona realmadrid juventus manchester
arsenal1 flamingo butterfly lovely loveme iloveu babygirl sweetheart angel1 jesus christ
blessed god123 trinity heaven secret1 private security default guest user login logon
system server database oracle mysql postgres test123 testing demo sample example support
helpdesk service office business company threadline desk agent manager operator
summer2024 winter2024 spring2024 autumn2024 summer2025 winter2025 spring2025 autumn2025
january february march april june july august september october november december
monday tuesday wednesday thursday friday saturday sunday
qwertz qwertzuiop azerty azertyuiop asdf asdf1234 zxcv zxcvbnm1 1qazxsw2 2wsx3edc
abcdef abcdefg abcdefgh abcdefghi abcdefghij 123abc abc12345 a1b2c3 a1b2c3d4 aa123456
whatever1 nothing somebody someone anything everything password! letmein! welcome!
correcthorsebatterystaple thequickbrownfox thequickbrownfoxjumpsoverthelazydog
iloveyouiloveyou passwordpassword qwertyqwerty letmeinletmein welcomewelcome
""".split())

# Runs of keys or characters a person types without choosing anything (and their reverses).
_SEQUENCES = (
    "abcdefghijklmnopqrstuvwxyz",
    "0123456789" * 4,
    "qwertyuiopasdfghjklzxcvbnm",
    "qwertzuiopasdfghjklyxcvbnm",
    "azertyuiopqsdfghjklmwxcvbn",
    "1qaz2wsx3edc4rfv5tgb6yhn7ujm8ik,9ol.0p;/",
    "zaq1xsw2cde3vfr4bgt5nhy6mju7,ki8.lo9/;p0",
    "qazwsxedcrfvtgbyhnujmikolp",
    "!@#$%^&*()_+",
    "1q2w3e4r5t6y7u8i9o0p",
    "q1w2e3r4t5y6u7i8o9p0",
)
_SEQUENCES_BOTH_WAYS = (*_SEQUENCES, *(s[::-1] for s in _SEQUENCES))
_LEET = str.maketrans({"@": "a", "4": "a", "0": "o", "1": "i", "!": "i", "3": "e", "$": "s", "5": "s",
                       "7": "t", "+": "t", "8": "b", "9": "g"})
# The symbols alone, for a substitution at the edge ("$unshine…") that stripping would eat.
_LEET_SYMBOLS = str.maketrans({"@": "a", "$": "s", "!": "i", "+": "t"})
_EDGE_NOISE = re.compile(r"^[\W\d_]+|[\W\d_]+$")
MIN_DISTINCT_CHARACTERS = 5


def _smallest_period(text: str) -> str:
    for size in range(1, len(text) // 2 + 1):
        if len(text) % size == 0 and text[:size] * (len(text) // size) == text:
            return text[:size]
    return text


def _is_common(candidate: str) -> bool:
    if candidate in COMMON_PASSWORDS:
        return True
    unit = _smallest_period(candidate)
    return unit != candidate and (unit in COMMON_PASSWORDS or len(unit) <= 3)


def check_new_password(password: str, email: str) -> None:
    """Refuse (PasswordRejected) a password an agent may not choose: fewer than 12 or more than 256
    characters (after NFKC), containing the e-mail's local part, one of the common passwords (also
    with digits or symbols around it, common letter substitutions or repeated), a keyboard or
    alphabet run, or fewer than 5 distinct characters. Any other Unicode text is accepted."""
    normalized = normalize_password(password)
    if any(0xD800 <= ord(ch) <= 0xDFFF for ch in normalized):
        raise PasswordRejected("The password contains characters that are not valid text")
    if len(normalized) < MIN_PASSWORD_LENGTH:
        raise PasswordRejected(f"The password must have at least {MIN_PASSWORD_LENGTH} characters")
    if len(normalized) > MAX_PASSWORD_LENGTH:
        raise PasswordRejected(f"The password must have at most {MAX_PASSWORD_LENGTH} characters")
    folded = normalized.casefold()
    local = unicodedata.normalize("NFKC", email).casefold().strip().rpartition("@")[0]
    for part in {local, local.split("+", 1)[0]}:
        if len(part) >= 3 and part in folded:
            raise PasswordRejected("The password must not contain your e-mail address")
    if len(set(folded)) < MIN_DISTINCT_CHARACTERS:
        raise PasswordRejected("The password is too repetitive")
    if any(folded in run for run in _SEQUENCES_BOTH_WAYS):
        raise PasswordRejected("The password is a run of keys or characters")
    core = _EDGE_NOISE.sub("", folded)
    symbol_core = _EDGE_NOISE.sub("", folded.translate(_LEET_SYMBOLS))
    candidates = {folded, core, core.translate(_LEET), symbol_core.translate(_LEET)}
    if any(_is_common(candidate) for candidate in candidates if candidate):
        raise PasswordRejected("The password is one of the most common passwords")


# --- sessions --------------------------------------------------------------------------------

SESSION_TOKEN_BYTES = 32  # 256 bits
_SESSION_TOKEN = re.compile(r"[A-Za-z0-9_-]{43}")
DEFAULT_IDLE_TIMEOUT = 60 * 60.0  # an hour without a request
DEFAULT_ABSOLUTE_TIMEOUT = 12 * 3600.0  # a shift
# `last_seen_at` is written at most this often (a write per request would be one per click).
TOUCH_INTERVAL = 60.0


class SessionRecord(msgspec.Struct, frozen=True, kw_only=True):
    """One signed-in session as the store keeps it: keyed by the token's SHA-256, never the token."""

    token_hash: str
    agent_id: str
    app_id: str
    created_at: float  # unix seconds
    last_seen_at: float
    idle_timeout: float  # seconds
    expires_at: float  # created_at + the absolute timeout


class SessionStore(Protocol):
    """What the auth code needs from the desk's store (an implementation keys sessions by
    `token_hash`, indexes `agent_id`, and may purge rows past `expires_at`)."""

    async def create_session(self, record: SessionRecord) -> None: ...

    async def get_session(self, token_hash: str) -> SessionRecord | None: ...

    async def touch_session(self, token_hash: str, last_seen_at: float) -> None: ...

    async def delete_session(self, token_hash: str) -> None: ...

    async def delete_agent_sessions(self, agent_id: str, keep: str | None = None) -> int:
        """Delete every session of the agent except the one whose hash is `keep`; how many."""
        ...


def session_token_hash(token: str) -> str:
    """The hex SHA-256 under which a session is stored."""
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def is_session_token(value: str | None) -> bool:
    """Whether `value` has a session token's shape (43 urlsafe base64 characters)."""
    return value is not None and _SESSION_TOKEN.fullmatch(value) is not None


def new_session(agent_id: str, app_id: str, now: float, idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
                absolute_timeout: float = DEFAULT_ABSOLUTE_TIMEOUT) -> tuple[str, SessionRecord]:
    """A fresh session: the token for the cookie, and the record for the store."""
    if idle_timeout <= 0 or absolute_timeout <= 0:
        raise ValueError("session timeouts must be positive")
    token = secrets.token_urlsafe(SESSION_TOKEN_BYTES)
    return token, SessionRecord(token_hash=session_token_hash(token), agent_id=agent_id, app_id=app_id,
                                created_at=now, last_seen_at=now, idle_timeout=idle_timeout,
                                expires_at=now + absolute_timeout)


def session_valid(record: SessionRecord, now: float) -> bool:
    """Whether the session is still alive at `now` (neither idle nor absolute timeout passed)."""
    return now < record.expires_at and now - record.last_seen_at < record.idle_timeout


def session_needs_touch(record: SessionRecord, now: float) -> bool:
    """Whether a request at `now` should write `last_seen_at` (at most every `TOUCH_INTERVAL`)."""
    return now - record.last_seen_at >= min(TOUCH_INTERVAL, record.idle_timeout / 4)


async def rotate_session(store: SessionStore, old_token: str | None, agent_id: str, app_id: str, now: float,
                         idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
                         absolute_timeout: float = DEFAULT_ABSOLUTE_TIMEOUT) -> tuple[str, SessionRecord]:
    """Drop the session of `old_token` (if any, whoever's it was) and start a new one: on sign-in
    and on a privilege change (see the module's docstring for when)."""
    if old_token is not None and is_session_token(old_token):
        await store.delete_session(session_token_hash(old_token))
    token, record = new_session(agent_id, app_id, now, idle_timeout, absolute_timeout)
    await store.create_session(record)
    return token, record


async def current_session(request: web.Request, store: SessionStore, *, secure: bool,
                          now: float | None = None) -> SessionRecord:
    """The live session of `request`'s cookie, its `last_seen_at` brought up to date; ApiError(401)
    without one (an expired session is deleted). The service then loads the agent by
    `record.agent_id` and refuses a disabled agent or one no longer in `record.app_id`."""
    at = time.time() if now is None else now
    token = read_session_token(request, secure=secure)
    record = await store.get_session(session_token_hash(token)) if token is not None else None
    if record is None:
        raise ApiError(401, "Sign in to the desk")
    if not session_valid(record, at):
        await store.delete_session(record.token_hash)
        raise ApiError(401, "The desk session has expired; sign in again")
    if session_needs_touch(record, at):
        await store.touch_session(record.token_hash, at)
        record = msgspec.structs.replace(record, last_seen_at=at)
    return record


async def end_session(request: web.Request, response: web.StreamResponse, store: SessionStore, *,
                      secure: bool) -> None:
    """Sign out: delete the request's session (if any) and clear the cookie on `response`."""
    token = read_session_token(request, secure=secure)
    if token is not None:
        await store.delete_session(session_token_hash(token))
    clear_session_cookie(response, secure=secure)


# --- cookies ---------------------------------------------------------------------------------

SECURE_COOKIE_NAME = "__Host-tl_desk"
PLAIN_COOKIE_NAME = "tl_desk"
COOKIE_SAMESITE = "Lax"


def cookie_secure(public_base_url: str) -> bool:
    """Whether the desk is served over https (`THREADLINE_PUBLIC_BASE_URL`): Secure cookie, `__Host-` name."""
    return urlsplit(public_base_url).scheme.lower() == "https"


def session_cookie_name(secure: bool) -> str:
    """`__Host-tl_desk` over https, `tl_desk` on plain http."""
    return SECURE_COOKIE_NAME if secure else PLAIN_COOKIE_NAME


def set_session_cookie(response: web.StreamResponse, token: str, record: SessionRecord, *, secure: bool,
                       now: float | None = None) -> None:
    """Put the session cookie on `response`: HttpOnly, SameSite=Lax, Path=/, no Domain, Secure over
    https, Max-Age = the seconds left before the absolute timeout."""
    at = time.time() if now is None else now
    max_age = max(0, int(record.expires_at - at))
    response.set_cookie(session_cookie_name(secure), token, max_age=max_age, path="/", secure=secure,
                        httponly=True, samesite=COOKIE_SAMESITE)


def clear_session_cookie(response: web.StreamResponse, *, secure: bool) -> None:
    """Expire the session cookie (with the same attributes: browsers ignore a `__Host-` cookie
    without Secure and Path=/, deletions included)."""
    response.del_cookie(session_cookie_name(secure), path="/", secure=secure, httponly=True,
                        samesite=COOKIE_SAMESITE)


def read_session_token(request: web.Request, *, secure: bool) -> str | None:
    """The session token from the request's cookie, or None (absent or not token-shaped). Only the
    name in use is read: over https a plain `tl_desk` cookie (which any sibling subdomain or http
    page could plant) is ignored."""
    value = request.cookies.get(session_cookie_name(secure))
    return value if is_session_token(value) else None


# --- CSRF ------------------------------------------------------------------------------------

CSRF_HEADER = "X-CSRF-Token"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
_CSRF_CONTEXT = b"threadline-desk-csrf\x00"
_DEFAULT_PORTS = {"http": 80, "https": 443}


def csrf_token(key: bytes, session_token: str) -> str:
    """The CSRF token of a session: urlsafe base64 of HMAC-SHA256(key, session token)."""
    digest = hmac.new(key, _CSRF_CONTEXT + session_token.encode("utf-8", "surrogatepass"), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def csrf_token_ok(key: bytes, session_token: str, presented: str | None) -> bool:
    """Constant-time check of a presented `X-CSRF-Token` against the session's."""
    return secrets_equal(csrf_token(key, session_token), presented)


def csrf_meta_tag(key: bytes, session_token: str) -> str:
    """`<meta name="csrf-token" content="…">` for the desk page's head."""
    return f'<meta name="csrf-token" content="{html.escape(csrf_token(key, session_token))}">'


def origin_of(url: str) -> str:
    """The serialized origin of `url` as a browser sends it in `Origin` (lower-case scheme and
    host, default port left out); ValueError when `url` has none."""
    parts = urlsplit(url.strip())
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS or not parts.hostname:
        raise ValueError(f"{url!r} has no http(s) origin")
    host = parts.hostname.lower()
    if ":" in host:
        host = f"[{host}]"
    port = parts.port
    return f"{scheme}://{host}" if port is None or port == _DEFAULT_PORTS[scheme] else f"{scheme}://{host}:{port}"


def same_origin_request(request: web.Request, allowed_origins: Collection[str], *, require: bool) -> bool:
    """Whether the browser says the request comes from one of `allowed_origins`: a
    `Sec-Fetch-Site` other than `same-origin` or an `Origin` not allowed is refused; with
    `require`, so is a request carrying neither (a browser always sends one on such requests)."""
    site = request.headers.get("Sec-Fetch-Site")
    if site is not None and site.lower() != "same-origin":
        return False
    origins = request.headers.getall("Origin", [])
    if len(origins) > 1:
        return False
    if origins:
        try:
            return origin_of(origins[0]) in allowed_origins
        except ValueError:  # "null" (sandboxed frame, file:, some redirects) and anything else
            return False
    return not require or site is not None


def csrf_middleware(*, key: bytes, secure: bool, allowed_origins: Iterable[str],
                    exempt_paths: Iterable[str] = ()) -> Middleware:
    """A middleware refusing (403, SunCo's error body) cross-site requests to the desk.

    Every method but GET/HEAD/OPTIONS needs the session's `X-CSRF-Token` and, when the browser
    names one, a same origin (`same_origin_request`). Paths in `exempt_paths` (exact: the sign-in
    endpoint, which has no session yet) skip the token but must show a same origin. WebSocket
    handshakes must show a same origin. `allowed_origins` are URLs or origins (normally just
    `THREADLINE_PUBLIC_BASE_URL`'s).
    """
    origins = frozenset(origin_of(origin) for origin in allowed_origins)
    exempt = frozenset(exempt_paths)
    if not origins:
        raise ValueError("csrf_middleware needs at least one allowed origin")

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.method in SAFE_METHODS:
            if is_websocket_upgrade(request) and not same_origin_request(request, origins, require=True):
                return error_response(403, "Cross-origin WebSocket refused")
            return await handler(request)
        if not same_origin_request(request, origins, require=request.path in exempt):
            return error_response(403, "Cross-origin request refused")
        if request.path in exempt:
            return await handler(request)
        token = read_session_token(request, secure=secure)
        if token is None or not csrf_token_ok(key, token, request.headers.get(CSRF_HEADER)):
            return error_response(403, f"Missing or invalid {CSRF_HEADER} header")
        return await handler(request)

    return middleware


# --- login throttling ------------------------------------------------------------------------

# Every sign-in attempt per client address (`source_key`), through `shared.ratelimit.SharedLimiter`,
# before the KDF runs.
LOGIN_ATTEMPT_RATES = (Rate(10, 60.0), Rate(100, 3600.0))


@dataclass(frozen=True)
class ThrottlePolicy:
    """`free_failures` failures in a row cost nothing; each one after waits `base_delay`, doubling,
    up to `max_delay`; a count with no failure for `forget_after` seconds starts over."""

    free_failures: int = 5
    base_delay: float = 30.0
    max_delay: float = 15 * 60.0
    forget_after: float = 24 * 3600.0


ACCOUNT_THROTTLE = ThrottlePolicy()
ADDRESS_THROTTLE = ThrottlePolicy(free_failures=20, base_delay=10.0)
THROTTLE_TTL_SECONDS = max(ACCOUNT_THROTTLE.forget_after, ADDRESS_THROTTLE.forget_after)


class ThrottleState(msgspec.Struct, frozen=True):
    """Failed sign-ins counted for one subject: how many, and when the last one was."""

    failures: int
    last_failure_at: float


_THROTTLE_ENCODER = msgspec.json.Encoder()
_THROTTLE_DECODER = msgspec.json.Decoder(ThrottleState)


def encode_throttle_state(state: ThrottleState) -> bytes:
    """The KV value of `state`."""
    return _THROTTLE_ENCODER.encode(state)


def decode_throttle_state(value: bytes | None) -> ThrottleState | None:
    """The state in a KV value (None: empty or unreadable, i.e. nothing counted)."""
    if not value:
        return None
    try:
        return _THROTTLE_DECODER.decode(value)
    except msgspec.DecodeError:
        return None


def failure_delay(failures: int, policy: ThrottlePolicy) -> float:
    """Seconds the next attempt waits after `failures` failures in a row."""
    if failures < policy.free_failures:
        return 0.0
    return backoff_delay(failures - policy.free_failures + 1, policy.base_delay, policy.max_delay)


def throttle_wait(state: ThrottleState | None, now: float, policy: ThrottlePolicy) -> float:
    """Seconds before the subject may try again (0: now)."""
    if state is None or now - state.last_failure_at >= policy.forget_after:
        return 0.0
    return max(0.0, state.last_failure_at + failure_delay(state.failures, policy) - now)


def record_failure(state: ThrottleState | None, now: float, policy: ThrottlePolicy) -> ThrottleState:
    """The state after one more failure at `now`."""
    if state is None or now - state.last_failure_at >= policy.forget_after:
        return ThrottleState(1, now)
    return ThrottleState(state.failures + 1, now)


def throttle_attempt(state: ThrottleState | None, now: float,
                     policy: ThrottlePolicy) -> tuple[ThrottleState | None, float]:
    """One sign-in attempt, counted as a failure until it succeeds (so concurrent attempts cannot
    all slip through one free slot): (new state, 0) when it may go ahead, (None, wait) when not."""
    wait = throttle_wait(state, now, policy)
    if wait > 0:
        return None, wait
    return record_failure(state, now, policy), 0.0


def throttle_forgive(state: ThrottleState | None) -> ThrottleState | None:
    """Take back the failure `throttle_attempt` counted for an attempt that succeeded."""
    if state is None or state.failures <= 1:
        return None
    return ThrottleState(state.failures - 1, state.last_failure_at)


def normalize_email(email: str) -> str:
    """An e-mail as sign-in counts it (NFKC, case-folded, trimmed)."""
    return unicodedata.normalize("NFKC", email).strip().casefold()


class ThrottleKV(CasStore, Protocol):
    """The part of nats' `KeyValue` the throttle uses: compare-and-set, and delete."""

    async def delete(self, key: str) -> bool: ...


class SharedLoginThrottle:
    """The sign-in throttle every replica shares: one `ThrottleState` per (app, e-mail) and per
    client address in a JetStream KV bucket (TTL `THROTTLE_TTL_SECONDS`), written with
    compare-and-set. Keys are keyed hashes of the subjects. The KV being unavailable raises (the
    service answers 503): a throttle that silently stops throttling invites guessing."""

    def __init__(self, kv: ThrottleKV, hash_key: bytes, clock: Callable[[], float] = time.time,
                 account_policy: ThrottlePolicy = ACCOUNT_THROTTLE,
                 address_policy: ThrottlePolicy = ADDRESS_THROTTLE) -> None:
        self.kv = kv
        self.hash_key = hash_key
        self.clock = clock
        self.account_policy = account_policy
        self.address_policy = address_policy

    def key(self, scope: str, subject: str) -> str:
        """The KV key of `subject`'s state (KV keys allow no ':' or '/')."""
        digest = hmac.new(self.hash_key, subject.encode("utf-8", "surrogatepass"), hashlib.sha256).hexdigest()[:40]
        return f"desk-login.{scope}.{digest}"

    def account_key(self, app_id: str, email: str) -> str:
        """The key of an (app, e-mail) pair."""
        return self.key("account", f"{app_id}\n{normalize_email(email)}")

    def address_key(self, address: str | None) -> str:
        """The key of a client address (its /64 for IPv6)."""
        return self.key("address", source_key(address) if address else "unknown")

    async def wait(self, app_id: str, email: str, address: str | None) -> float:
        """Seconds before the next attempt for (app, e-mail) from `address` may go ahead, counting nothing."""
        now = self.clock()
        account = throttle_wait(await self._read(self.account_key(app_id, email)), now, self.account_policy)
        source = throttle_wait(await self._read(self.address_key(address)), now, self.address_policy)
        return max(account, source)

    async def attempt(self, app_id: str, email: str, address: str | None) -> float:
        """Count a sign-in attempt as a failure and return 0, or return the seconds to wait
        (nothing counted): call it before verifying the password."""
        address_key = self.address_key(address)
        wait = await self._change(address_key, lambda s: throttle_attempt(s, self.clock(), self.address_policy))
        if wait > 0:
            return wait
        wait = await self._change(self.account_key(app_id, email),
                                  lambda s: throttle_attempt(s, self.clock(), self.account_policy))
        if wait > 0:
            await self._change(address_key, lambda s: (throttle_forgive(s), 0.0))
        return wait

    async def succeeded(self, app_id: str, email: str, address: str | None) -> None:
        """The attempt's password was right: clear the account's count, take back the address's."""
        try:
            await self.kv.delete(self.account_key(app_id, email))
        except nats.js.errors.KeyNotFoundError:
            pass
        await self._change(self.address_key(address), lambda s: (throttle_forgive(s), 0.0))

    async def _read(self, key: str) -> ThrottleState | None:
        try:
            entry = await self.kv.get(key)
        except nats.js.errors.KeyNotFoundError:
            return None
        return decode_throttle_state(entry.value)

    async def _change(self, key: str,
                      step: Callable[[ThrottleState | None], tuple[ThrottleState | None, float]]) -> float:
        """Apply `step` to the stored state with compare-and-set; its wait (nothing written) or 0."""
        def on_value(current: bytes | None) -> tuple[bytes | None, float]:
            state = decode_throttle_state(current)
            new_state, wait = step(state)
            if wait > 0 or (new_state is None and state is None):
                return None, wait
            return (encode_throttle_state(new_state) if new_state is not None else b""), 0.0

        return await update_with_cas(self.kv, key, on_value)


# --- roles and apps --------------------------------------------------------------------------

Role = Literal["admin", "agent"]
ROLES: tuple[Role, ...] = ("admin", "agent")
_ROLE_RANK: dict[str, int] = {"agent": 0, "admin": 1}


def require_role(agent_role: str, needed: Role) -> None:
    """ApiError(403) unless `agent_role` grants `needed` (admin ⊇ agent; an unknown role grants nothing)."""
    rank = _ROLE_RANK.get(agent_role)
    if rank is None or rank < _ROLE_RANK[needed]:
        raise ApiError(403, f"This action needs the {needed} role")


def require_same_app(agent_app_id: str, target_app_id: str, what: str = "Resource") -> None:
    """ApiError(404, "<what> not found") unless the target belongs to the agent's app: another
    app's ids get the very answer of an id that does not exist (see the module's docstring)."""
    if agent_app_id != target_app_id:
        raise ApiError(404, f"{what} not found")
