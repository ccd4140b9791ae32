"""Pure logic of SDK session tokens (expiry, refresh tokens, strict claim types), the shared rate
limiter's arithmetic (GCRA), the limits' configuration, and the JWT time-claim policy."""

from __future__ import annotations

import msgspec
import pytest

from services.conversations.config import jwt_policy_from_env
from shared.config import CommonConfig, ConfigError, Rate
from shared.http import ApiError
from shared.ids import iso
from shared.ratelimit import SharedLimiter, gcra
from shared.sdk import SessionClaims
from shared.sdk_service import SdkLimits, SdkSettings, authenticate, issue_tokens, new_session_claims
from shared.signing import JwtError, JwtPolicy, check_time_claims, jwt_decode, jwt_encode, sign_token

SECRET = "unit-test-sdk-secret-0123456789"
NOW = 1_800_000_000.0
SETTINGS = SdkSettings(token_secret=SECRET, ping_interval=20, socket_queue_size=256, request_timeout=5)
CLAIMS = new_session_claims("app1", "int1", "cu1", NOW, user="u1", client="c1", conversation="conv1")


# --- session and refresh tokens ---------------------------------------------------------------

def test_a_session_token_lives_its_ttl_and_then_asks_for_a_refresh() -> None:
    tokens = issue_tokens(SETTINGS, CLAIMS, NOW)
    claims = authenticate(SECRET, tokens.session_token, "app1", NOW + 24 * 3600 - 1)
    assert (claims.user, claims.conversation, claims.exp) == ("u1", "conv1", int(NOW) + 24 * 3600)
    assert tokens.expires_at == iso(NOW + 24 * 3600)
    with pytest.raises(ApiError) as exc:
        authenticate(SECRET, tokens.session_token, "app1", NOW + 24 * 3600)
    assert (exc.value.status, exc.value.code) == (401, "session_expired")
    # The refresh token lives 30 days, and only renews: it is no session token, nor the reverse.
    refreshed = authenticate(SECRET, tokens.refresh_token, "app1", NOW + 29 * 86400, typ="refresh")
    assert refreshed.sst == int(NOW)
    for token, typ in ((tokens.refresh_token, "session"), (tokens.session_token, "refresh")):
        with pytest.raises(ApiError) as exc:
            authenticate(SECRET, token, "app1", NOW, typ=typ)  # type: ignore[arg-type]
        assert (exc.value.status, exc.value.code) == (401, "unauthorized")
    with pytest.raises(ApiError) as exc:
        authenticate(SECRET, tokens.refresh_token, "app1", NOW + 30 * 86400, typ="refresh")
    assert exc.value.code == "session_expired"


def test_a_refresh_keeps_the_session_start_and_the_absolute_age_caps_every_token() -> None:
    later = issue_tokens(SETTINGS, CLAIMS, NOW + 10 * 86400)
    claims = SessionClaims.from_token(SECRET, later.refresh_token)
    assert claims is not None and claims.sst == int(NOW) and claims.iat == int(NOW) + 10 * 86400
    capped = SdkSettings(token_secret=SECRET, ping_interval=20, socket_queue_size=256, request_timeout=5,
                         session_max_age=12 * 86400)
    tokens = issue_tokens(capped, CLAIMS, NOW + 11.5 * 86400)
    session = SessionClaims.from_token(SECRET, tokens.session_token)
    refresh = SessionClaims.from_token(SECRET, tokens.refresh_token)
    assert session is not None and refresh is not None
    assert session.exp == refresh.exp == int(NOW) + 12 * 86400


def test_claims_of_the_wrong_type_are_not_a_token() -> None:
    fields = msgspec.to_builtins(CLAIMS)
    for bad in ({"exp": str(int(NOW) + 3600)}, {"exp": True}, {"exp": NOW + 3600.5}, {"iat": None},
                {"typ": "admin"}, {"user": 42}):
        token = sign_token(SECRET, {**fields, "exp": int(NOW) + 3600, **bad})
        assert SessionClaims.from_token(SECRET, token) is None, bad
        with pytest.raises(ApiError) as exc:
            authenticate(SECRET, token, "app1", NOW)
        assert exc.value.status == 401
    legacy = sign_token(SECRET, {"app": "app1", "user": "u1", "client": "c1", "integration": "int1",
                                 "channel_user_id": "cu1", "conversation": "conv1"})  # never expired
    assert SessionClaims.from_token(SECRET, legacy) is None


def test_a_new_session_is_pending_until_its_first_message() -> None:
    claims = new_session_claims("app1", "int1", "cu1", NOW)
    assert claims.pending and not CLAIMS.pending
    tokens = issue_tokens(SETTINGS, claims, NOW)
    assert (tokens.app_user_id, tokens.client_id, tokens.conversation_id) == (None, None, None)
    assert msgspec.json.decode(msgspec.json.encode(tokens)).keys() == {"sessionToken", "refreshToken", "expiresAt"}


def test_token_lifetimes_and_limits_are_validated_at_start() -> None:
    common = CommonConfig.from_env(8083, {"THREADLINE_SANDBOX": "1"})
    env = {"THREADLINE_SANDBOX": "1"}
    settings = SdkSettings.from_env(common, "THREADLINE_WEB", env)
    assert (settings.token_ttl, settings.refresh_ttl, settings.session_max_age) == (86400, 30 * 86400, 0)
    assert settings.limits.sessions_per_ip == (Rate(30, 60.0), Rate(300, 3600.0))
    # Customers' uploads: 25 MB unless set, never over the 50 MB of any attachment.
    assert settings.max_upload_bytes == 25 * 1024 * 1024
    assert settings.limits.uploads_per_client == (Rate(10, 60.0), Rate(100, 3600.0))
    assert SdkSettings.from_env(common, "THREADLINE_APP", {
        **env, "THREADLINE_SDK_MAX_UPLOAD_BYTES": "1048576"}).max_upload_bytes == 1024 * 1024
    for bad in ({"THREADLINE_SDK_TOKEN_TTL_SECONDS": "10"},
                {"THREADLINE_SDK_MAX_UPLOAD_BYTES": "0"},
                {"THREADLINE_SDK_MAX_UPLOAD_BYTES": str(50 * 1024 * 1024 + 1)},
                {"THREADLINE_SDK_MAX_UPLOAD_BYTES": "25MB"},
                {"THREADLINE_SDK_UPLOADS_PER_IP": "many"},
                {"THREADLINE_SDK_TOKEN_TTL_SECONDS": "7200", "THREADLINE_SDK_REFRESH_TTL_SECONDS": "3600"},
                {"THREADLINE_SDK_SESSION_MAX_AGE_SECONDS": "100"},
                {"THREADLINE_SDK_SESSIONS_PER_IP": "lots"},
                {"THREADLINE_SDK_SESSIONS_PER_IP": "10/2d"},  # longer than the limits bucket keeps
                {"THREADLINE_SDK_LINKS_PER_USER": "0/m"},
                {"THREADLINE_TRUSTED_PROXIES": "the ingress"}):
        with pytest.raises(ConfigError):
            SdkSettings.from_env(common, "THREADLINE_WEB", {**env, **bad})
    off = SdkLimits.from_env({"THREADLINE_SDK_SESSIONS_PER_APP": "off", "THREADLINE_SDK_LINKS_PER_IP": "3/15m"})
    assert off.sessions_per_app == () and off.links_per_ip == (Rate(3, 900.0),)


# --- the shared limiter's arithmetic ----------------------------------------------------------

def test_gcra_allows_the_burst_then_one_per_interval_and_says_how_long_to_wait() -> None:
    rate = Rate(5, 60.0)  # 5 at once, then one every 12 s
    tat = None
    for _ in range(5):
        tat, wait = gcra(tat, NOW, rate)
        assert tat is not None and wait == 0
    refused, wait = gcra(tat, NOW, rate)
    assert refused is None and wait == pytest.approx(12.0)
    refused, wait = gcra(tat, NOW + 11.5, rate)
    assert refused is None and wait == pytest.approx(0.5)
    tat, wait = gcra(tat, NOW + 12, rate)
    assert tat is not None and wait == 0
    # A subject quiet for a whole window starts over with its full burst.
    fresh, wait = gcra(tat, NOW + 12 + 61, rate)
    assert fresh == pytest.approx(NOW + 12 + 61 + 12) and wait == 0


def test_limiter_keys_hide_the_subject_and_fit_kv_keys() -> None:
    limiter = SharedLimiter(kv=None, hash_key=b"k1")  # type: ignore[arg-type]
    key = limiter.key("new-sessions-ip", "2001:db8::/64", Rate(30, 60.0))
    assert "2001" not in key and key.startswith("new-sessions-ip.") and key.endswith(".30-60")
    assert all(ch.isalnum() or ch in "-_." for ch in key)
    assert key != limiter.key("new-sessions-ip", "2001:db8::/64", Rate(300, 3600.0))
    other = SharedLimiter(kv=None, hash_key=b"k2")  # type: ignore[arg-type]
    assert key != other.key("new-sessions-ip", "2001:db8::/64", Rate(30, 60.0))


# --- JWT time claims --------------------------------------------------------------------------

def test_jwt_time_claims_must_be_numbers_and_the_lifetime_is_bounded() -> None:
    policy = JwtPolicy(max_lifetime_seconds=3600, leeway_seconds=30)
    accepted = [{}, {"exp": NOW + 3600}, {"iat": NOW - 100, "exp": NOW + 3400}, {"nbf": NOW + 10},
                {"exp": NOW - 10}, {"iat": NOW + 20}]
    for payload in accepted:
        check_time_claims(payload, policy, NOW)
    refused = {
        "string exp": {"exp": "1"}, "numeric-string exp": {"exp": str(int(NOW) + 60)}, "bool exp": {"exp": True},
        "null exp": {"exp": None}, "list nbf": {"nbf": [NOW]}, "string iat": {"iat": "now"},
        "infinite exp": {"exp": float("inf")}, "expired": {"exp": NOW - 31},
        "not yet valid": {"nbf": NOW + 31}, "issued in the future": {"iat": NOW + 31},
        "too long from now": {"exp": NOW + 3601}, "too long from iat": {"iat": NOW - 7200, "exp": NOW + 60},
    }
    for what, payload in refused.items():
        with pytest.raises(JwtError):
            check_time_claims(payload, policy, NOW)
        assert what
    with pytest.raises(JwtError, match="exp is required"):
        check_time_claims({}, JwtPolicy(require_exp=True), NOW)
    # jwt_decode applies it after the signature.
    token = jwt_encode({"scope": "app", "exp": "1"}, "key", kid="app_1")
    with pytest.raises(JwtError, match="exp must be a number"):
        jwt_decode(token, "key")
    assert jwt_decode(jwt_encode({"scope": "app", "exp": NOW + 60}, "key"), "key", policy, NOW)["scope"] == "app"


def test_jwt_policy_is_read_and_validated_at_start() -> None:
    assert jwt_policy_from_env({}) == JwtPolicy(max_lifetime_seconds=86400, require_exp=False)
    assert jwt_policy_from_env({"THREADLINE_JWT_REQUIRE_EXP": "true",
                                "THREADLINE_JWT_MAX_LIFETIME_SECONDS": "600"}) == JwtPolicy(600, True)
    for bad in ({"THREADLINE_JWT_REQUIRE_EXP": "maybe"}, {"THREADLINE_JWT_MAX_LIFETIME_SECONDS": "10"},
                {"THREADLINE_JWT_MAX_LIFETIME_SECONDS": "forever"}):
        with pytest.raises(ConfigError):
            jwt_policy_from_env(bad)
