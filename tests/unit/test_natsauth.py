"""shared/natsauth.py: every service has a NATS user, every bucket an owner, nobody the whole API."""

from __future__ import annotations

from pathlib import Path

from shared import subjects
from shared.natsauth import ADMIN_USER, SERVICE_ACCESS, USERS, authorization_config, permissions

REPO = Path(__file__).resolve().parents[2]


def test_every_service_is_a_user_and_every_bucket_has_one_writer() -> None:
    packages = {p.parent.name for p in (REPO / "services").glob("*/__main__.py")}
    assert packages == set(SERVICE_ACCESS)
    assert set(USERS) == packages | {ADMIN_USER}
    buckets = {value for name, value in vars(subjects).items() if name.endswith("_BUCKET")}
    for bucket in buckets:
        writers = [name for name, access in SERVICE_ACCESS.items() if bucket in access.buckets_written]
        # A new bucket must be given to the services that use it, or the server refuses them.
        assert writers, f"{bucket}: no service may write it (add it to shared/natsauth.py)"


def test_no_service_gets_wildcard_jetstream_or_kv_access() -> None:
    for user in SERVICE_ACCESS:
        perms = permissions(user)
        assert perms is not None
        publish = perms["publish"]["allow"]
        assert "$JS.API.>" not in publish and ">" not in publish and "$KV.>" not in publish, user
        subscribe = perms["subscribe"]["allow"]
        assert "_INBOX.>" not in subscribe and ">" not in subscribe, user
    # Only conversations writes the records channel services trust (credentials, base URLs, webhook targets).
    for bucket in (subjects.INTEGRATIONS_BUCKET, subjects.WEBHOOKS_BUCKET, subjects.APPS_BUCKET):
        assert [n for n, a in SERVICE_ACCESS.items() if bucket in a.kv_write] == ["conversations"]
    assert [n for n, a in SERVICE_ACCESS.items() if subjects.WEBHOOKS_BUCKET in a.kv_read] == ["webhooks"]
    assert permissions(ADMIN_USER) is None


def test_the_server_config_lists_only_users_with_a_password() -> None:
    text = authorization_config({"web": "pw-web", "admin": "$NATS_PASSWORD_ADMIN"})
    assert 'user: "web"' in text and 'password: "pw-web"' in text
    assert "password: $NATS_PASSWORD_ADMIN" in text and 'user: "conversations"' not in text
