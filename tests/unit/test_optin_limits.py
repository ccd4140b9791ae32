"""Pure parts of the limits on sends to typed addresses: rate specs, the client address behind
trusted proxies, canonical destinations, Retry-After arithmetic, and the config they come from
(with where the counts are kept)."""

from __future__ import annotations

import pytest

from services.notifications.config import NotificationsConfig
from services.notifications.limits import Refusal, canonical_address, hashed_key, retry_after
from services.web.config import WebConfig
from shared.clientip import client_ip, parse_networks, source_key
from shared.config import ConfigError, Rate, parse_rates

LOOPBACK = parse_networks("127.0.0.1/32,::1/128")
SANDBOX = {"THREADLINE_SANDBOX": "1"}


def test_rates_parse_and_refuse_what_is_not_a_rate() -> None:
    assert parse_rates("10/h,50/d") == (Rate(10, 3600.0), Rate(50, 86400.0))
    assert parse_rates(" 3 / 15m , 1/s") == (Rate(1, 1.0), Rate(3, 900.0))
    for bad in ("", "10", "10/w", "0/h", "-1/h", "10/8d", "ten/h", "10/h;5/d"):
        with pytest.raises(ValueError):
            parse_rates(bad)


def test_forwarded_for_is_believed_only_from_trusted_proxies() -> None:
    # No proxy in between: the peer is the client, whatever it wrote in X-Forwarded-For.
    assert client_ip("203.0.113.9", ["198.51.100.1"], LOOPBACK) == "203.0.113.9"
    # The front door (loopback) appended the address it saw: that one is the client.
    assert client_ip("127.0.0.1", ["198.51.100.1, 203.0.113.9"], LOOPBACK) == "203.0.113.9"
    # Two trusted hops (ingress then front door), headers split over several lines.
    trusted = parse_networks("127.0.0.1/32, 10.0.0.0/8")
    assert client_ip("127.0.0.1", ["6.6.6.6", "203.0.113.9, 10.1.2.3"], trusted) == "203.0.113.9"
    # A client on a trusted address itself: the leftmost trusted hop.
    assert client_ip("127.0.0.1", ["127.0.0.1"], LOOPBACK) == "127.0.0.1"
    assert client_ip("127.0.0.1", [], LOOPBACK) == "127.0.0.1"
    # Nothing trusted: X-Forwarded-For is ignored.
    assert client_ip("127.0.0.1", ["198.51.100.1"], parse_networks("none")) == "127.0.0.1"
    # Ports, brackets and v4-mapped v6 are addresses; garbage where a proxy writes stops the walk.
    assert client_ip("::ffff:127.0.0.1", ["[2001:db8::7]:443"], LOOPBACK) == "2001:db8::7"
    assert client_ip("127.0.0.1", ["198.51.100.1:5555"], LOOPBACK) == "198.51.100.1"
    assert client_ip("127.0.0.1", ["not-an-ip"], LOOPBACK) == "127.0.0.1"
    assert client_ip(None, ["198.51.100.1"], LOOPBACK) is None


def test_a_source_is_an_ipv4_address_or_an_ipv6_slash_64() -> None:
    assert source_key("203.0.113.9") == "203.0.113.9"
    assert source_key("2001:db8:1:2::1") == source_key("2001:db8:1:2:ffff::9") == "2001:db8:1:2::/64"
    assert source_key("2001:db8:1:3::1") != source_key("2001:db8:1:2::1")


def test_spelling_variants_of_one_destination_share_its_limit() -> None:
    assert canonical_address("twilio", "+15551234567") == canonical_address("whatsapp", "+15551234567")
    assert canonical_address("email", "Ada+promo@Example.COM") == canonical_address("email", "ada@example.com")
    assert canonical_address("email", "a.d.a+x@googlemail.com") == canonical_address("email", "ada@gmail.com")
    assert canonical_address("email", "a.da@example.com") != canonical_address("email", "ada@example.com")
    # Keys are stored keyed-hashed: no address in clear, scopes apart.
    key = hashed_key("s" * 32, "address", canonical_address("twilio", "+15551234567"))
    assert "5551234567" not in key and key != hashed_key("s" * 32, "notify_address", "tel:15551234567")


def test_retry_after_is_when_the_oldest_counted_entry_leaves_the_window() -> None:
    assert retry_after(1000.0, 3600.0, 1000.0) == 3600
    assert retry_after(1000.0, 3600.0, 4599.2) == 1
    assert retry_after(1000.0, 3600.0, 9999.0) == 1  # never 0: the client must wait a little
    assert Refusal("address", 5).title == "Too many codes were sent to this address"


def test_limits_and_trusted_proxies_are_validated_at_start() -> None:
    config = NotificationsConfig.from_env(SANDBOX)
    assert config.code_limit_per_address == (Rate(3, 3600.0), Rate(10, 86400.0))
    assert config.longest_limit_window == 86400.0
    tight = NotificationsConfig.from_env({**SANDBOX, "THREADLINE_NOTIFY_CODE_LIMIT_PER_APP": "5/10m"})
    assert tight.code_limit_per_app == (Rate(5, 600.0),)
    for name in ("THREADLINE_NOTIFY_OPTIN_LIMIT_PER_IP", "THREADLINE_NOTIFY_OPTIN_LIMIT_PER_ORIGIN",
                 "THREADLINE_NOTIFY_CODE_LIMIT_PER_ADDRESS", "THREADLINE_NOTIFY_CODE_LIMIT_PER_APP",
                 "THREADLINE_NOTIFY_SEND_LIMIT_PER_ADDRESS", "THREADLINE_NOTIFY_SEND_LIMIT_PER_APP"):
        with pytest.raises(ConfigError, match=name):
            NotificationsConfig.from_env({**SANDBOX, name: "lots"})
    assert WebConfig.from_env({**SANDBOX, "THREADLINE_TRUSTED_PROXIES": "10.0.0.0/8, 127.0.0.1"}).trusted_proxies == \
        parse_networks("10.0.0.0/8,127.0.0.1/32")
    assert WebConfig.from_env(SANDBOX).trusted_proxies == LOOPBACK
    with pytest.raises(ConfigError, match="THREADLINE_TRUSTED_PROXIES"):
        WebConfig.from_env({**SANDBOX, "THREADLINE_TRUSTED_PROXIES": "the ingress"})


def test_the_database_is_a_file_under_the_data_directory_or_the_postgresql_url() -> None:
    config = NotificationsConfig.from_env({**SANDBOX, "THREADLINE_DATA_DIR": "/tmp/tl"})
    assert (config.database.engine, config.database.sqlite_path) == ("sqlite", "/tmp/tl/notifications.db")
    url = "postgresql://threadline@db.internal/threadline"
    on_postgres = NotificationsConfig.from_env({**SANDBOX, "THREADLINE_DATABASE_URL": url,
                                                "THREADLINE_DATABASE_POOL_SIZE": "4"}).database
    assert (on_postgres.engine, on_postgres.url, on_postgres.schema, on_postgres.pool_size) == (
        "postgres", url, "notifications", 4)
