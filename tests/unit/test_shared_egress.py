"""The egress policy's pure decisions (`shared.egress`): address and host classification, URL
checks per purpose, the allow-list and its parsing."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shared.config import CommonConfig, ConfigError
from shared.egress import (
    GRAPH_HOSTS,
    TWILIO_HOSTS,
    EgressPolicy,
    EgressRefused,
    Origin,
    address_refusal,
    classify_host,
    parse_rules,
    same_origin,
)
from threadline.cli import loopback_egress_allow

STRICT = EgressPolicy()
SANDBOX = EgressPolicy.from_env({}, sandbox=True, public_base_url="http://127.0.0.1:8080")

# Every spelling of an internal destination a business once got accepted.
INTERNAL_URLS = [
    "https://127.0.0.1/hook", "https://127.8.9.10:9000/hook", "https://[::1]/hook", "https://localhost/hook",
    "https://LOCALHOST./hook", "https://api.localhost/hook", "https://ip6-localhost/hook",
    "https://2130706433/hook", "https://0x7f000001/hook", "https://0x7f.1/hook", "https://0177.0.0.1/hook",
    "https://127.1/hook", "https://017700000001/hook", "https://1.2.3.0x4/hook",
    "https://169.254.169.254/latest/meta-data/", "https://169.254.1.1/", "https://[fe80::1]/",
    "https://10.0.0.5/", "https://172.16.3.4/", "https://192.168.1.1/", "https://[fd00::1]/", "https://[fc12::1]/",
    "https://100.64.0.1/", "https://0.0.0.0/", "https://[::]/", "https://224.0.0.1/", "https://[ff02::1]/",
    "https://240.0.0.1/", "https://255.255.255.255/", "https://192.0.2.1/",
    "https://[::ffff:127.0.0.1]/", "https://[::ffff:7f00:1]/", "https://[::ffff:169.254.169.254]/",
    "https://[64:ff9b::7f00:1]/", "https://[2002:7f00:1::]/", "https://[2002:a9fe:a9fe::]/",
    "https://[fe80::1%25eth0]/",
    "https://metadata.google.internal/computeMetadata/v1/", "https://printer.local/", "https://router.lan/",
    "https://nats/", "https://conversations:8082/v2",
]
SCHEMES = ["file:///etc/passwd", "ftp://example.com/x", "gopher://example.com/", "javascript:alert(1)",
           "dict://example.com:11211/", "/relative/path", "example.com/hook"]


@pytest.mark.parametrize("url", INTERNAL_URLS)
def test_internal_destinations_are_refused_in_every_spelling(url: str) -> None:
    for purpose in ("business", "platform"):
        with pytest.raises(EgressRefused):
            STRICT.check_url(url, purpose=purpose, hosts=GRAPH_HOSTS)  # type: ignore[arg-type]
        with pytest.raises(EgressRefused):
            SANDBOX.check_url(url.replace("https:", "http:"), purpose=purpose, hosts=GRAPH_HOSTS)  # type: ignore[arg-type]


@pytest.mark.parametrize("url", SCHEMES)
def test_other_schemes_and_relative_urls_are_refused(url: str) -> None:
    with pytest.raises(EgressRefused, match=r"not allowed|no host|not a valid"):
        SANDBOX.check_url(url, purpose="business")


@pytest.mark.parametrize("url", ["https://hooks.example.com/threadline", "https://8.8.8.8/", "https://[2606:4700::1]/",
                                 "https://exämple.com/x", "https://example.com:8443/x"])
def test_public_business_targets_pass(url: str) -> None:
    assert STRICT.check_url(url, purpose="business").host


def test_http_only_in_the_sandbox_or_when_allowed() -> None:
    with pytest.raises(EgressRefused, match="plain http"):
        STRICT.check_url("http://hooks.example.com/", purpose="business")
    SANDBOX.check_url("http://hooks.example.com/", purpose="business")
    EgressPolicy(allow_http=True).check_url("http://hooks.example.com/", purpose="business")
    explicit = EgressPolicy.from_env({"THREADLINE_EGRESS_ALLOW_HTTP": "1"}, sandbox=False, public_base_url="")
    assert explicit.allow_http and not explicit.trusted_origins
    assert not EgressPolicy.from_env({"THREADLINE_EGRESS_ALLOW_HTTP": "0"}, sandbox=True,
                                     public_base_url="http://127.0.0.1:8080").allow_http


def test_urls_with_spaces_backslashes_or_control_characters_are_refused() -> None:
    for url in ("https://evil.com\\@127.0.0.1/", "https://exa mple.com/", "https://example.com/\r\nX: y"):
        with pytest.raises(EgressRefused):
            STRICT.check_url(url, purpose="business")


def test_platform_base_urls_are_the_platforms_own_the_sandbox_origin_or_allow_listed() -> None:
    STRICT.check_url("https://graph.facebook.com/v23.0/123/messages", purpose="platform", hosts=GRAPH_HOSTS)
    STRICT.check_url("https://api.dublin.ie1.twilio.com/2010-04-01", purpose="platform", hosts=TWILIO_HOSTS)
    for url in ("https://graph.facebook.com.evil.example/", "https://evil.example/graph", "https://facebook.com/"):
        with pytest.raises(EgressRefused, match="not the platform's API host"):
            STRICT.check_url(url, purpose="platform", hosts=GRAPH_HOSTS)
    with pytest.raises(EgressRefused, match="https only"):
        SANDBOX.check_url("http://graph.facebook.com/", purpose="platform", hosts=GRAPH_HOSTS)
    # The sandbox's origin is trusted for platform calls (its fakes), never for business targets.
    SANDBOX.check_url("http://127.0.0.1:8080/sandbox/graph/v23.0/1/messages", purpose="platform", hosts=GRAPH_HOSTS)
    with pytest.raises(EgressRefused, match="loopback"):
        SANDBOX.check_url("http://127.0.0.1:8080/v2/apps", purpose="business")
    with pytest.raises(EgressRefused):
        SANDBOX.check_url("http://127.0.0.1:8081/sandbox/graph", purpose="platform", hosts=GRAPH_HOSTS)
    with pytest.raises(EgressRefused):
        STRICT.check_url("http://127.0.0.1:8080/sandbox/graph", purpose="platform", hosts=GRAPH_HOSTS)
    proxy = EgressPolicy(rules=parse_rules("graph-proxy.corp.example,10.9.0.0/16"))
    proxy.check_url("https://graph-proxy.corp.example/", purpose="platform", hosts=GRAPH_HOSTS)
    proxy.check_url("https://10.9.1.2:8443/", purpose="platform", hosts=GRAPH_HOSTS)
    with pytest.raises(EgressRefused):
        proxy.check_url("https://10.8.1.2/", purpose="platform", hosts=GRAPH_HOSTS)


def test_allow_list_entries_ports_and_denials() -> None:
    policy = EgressPolicy(allow_http=True, rules=parse_rules(
        "!127.0.0.0/8:4222, ![::1]:4222, 127.0.0.0/8, [::1], hooks.corp.internal, *.svc.example:9000-9100, "
        "!10.0.0.7, 10.0.0.0/24"))
    policy.check_url("http://127.0.0.1:9000/hook", purpose="business")
    policy.check_url("http://localhost:9000/hook", purpose="business")
    policy.check_url("http://[::ffff:127.0.0.1]:9000/hook", purpose="business")
    policy.check_url("http://hooks.corp.internal/x", purpose="business")
    policy.check_url("http://a.svc.example:9050/x", purpose="business")
    policy.check_url("http://10.0.0.8/x", purpose="business")
    for url in ("http://127.0.0.1:4222/", "http://[::1]:4222/", "http://localhost:4222/", "http://10.0.0.7/",
                "http://10.0.1.1/", "http://other.internal/"):
        with pytest.raises(EgressRefused):
            policy.check_url(url, purpose="business")
    # At connect time too: a denied port stays denied whatever the name resolved to.
    with pytest.raises(EgressRefused, match="denied"):
        policy.check_addresses("nats.example.com", 4222, ["127.0.0.1"], purpose="business")
    policy.check_addresses("hooks.corp.internal", 443, ["10.200.0.1"], purpose="business")
    policy.check_addresses("anything.example.com", 443, ["10.0.0.9"], purpose="business")


@pytest.mark.parametrize("raw", ["10.0.0.0/33", "[::1", "host:0", "host:9-1", "host:x", "2130706433", "0x7f.1",
                                 "bad_host!", "*.", "[::1]x"])
def test_bad_allow_list_entries_stop_the_service_at_start(raw: str) -> None:
    with pytest.raises(ValueError):
        parse_rules(raw)
    with pytest.raises(ConfigError, match="THREADLINE_EGRESS_ALLOW"):
        CommonConfig.from_env(8080, {"THREADLINE_EGRESS_ALLOW": raw})


def test_common_config_carries_the_policy() -> None:
    config = CommonConfig.from_env(8080, {"THREADLINE_SANDBOX": "1", "THREADLINE_PUBLIC_BASE_URL": "http://127.0.0.1:9090/",
                                          "THREADLINE_EGRESS_ALLOW": "10.0.0.0/8:25"})
    assert config.egress.allow_http
    assert config.egress.trusted_origins == (Origin("http", "127.0.0.1", 9090),)
    assert len(config.egress.rules) == 1
    production = CommonConfig.from_env(8080, {})
    assert production.egress == EgressPolicy()
    with pytest.raises(ConfigError):
        CommonConfig.from_env(8080, {"THREADLINE_EGRESS_ALLOW_HTTP": "maybe"})


def test_connect_time_check_refuses_any_internal_answer() -> None:
    STRICT.check_addresses("hooks.example.com", 443, ["93.184.215.14", "2606:2800:21f:cb07:6820:80da:af6b:8b2c"],
                           purpose="business")
    for answer in (["93.184.215.14", "127.0.0.1"], ["::1"], ["169.254.169.254"], ["::ffff:10.0.0.1"],
                   ["fe80::1%eth0"], [], ["not-an-ip"]):
        with pytest.raises(EgressRefused):
            STRICT.check_addresses("hooks.example.com", 443, answer, purpose="business")
    # The sandbox's origin, for platform calls only.
    SANDBOX.check_addresses("127.0.0.1", 8080, ["127.0.0.1"], purpose="platform")
    with pytest.raises(EgressRefused):
        SANDBOX.check_addresses("127.0.0.1", 8080, ["127.0.0.1"], purpose="business")


def test_smtp_hosts() -> None:
    STRICT.check_host("smtp.mailgun.org", 587)
    for host in ("127.0.0.1", "localhost", "10.1.1.1", "2130706433", "[::1]", "mail", "smtp.internal"):
        with pytest.raises(EgressRefused):
            STRICT.check_host(host, 587)
    EgressPolicy(rules=parse_rules("127.0.0.1:2525")).check_host("127.0.0.1", 2525)
    with pytest.raises(EgressRefused):
        EgressPolicy(rules=parse_rules("127.0.0.1:2525")).check_host("127.0.0.1", 25)


def test_same_origin() -> None:
    assert same_origin("https://graph.facebook.com/v1/x", "https://GRAPH.facebook.com:443/")
    assert not same_origin("https://graph.facebook.com/", "http://graph.facebook.com/")
    assert not same_origin("http://127.0.0.1:8080/", "http://127.0.0.1:8081/")
    assert not same_origin("file:///etc/passwd", "file:///etc/passwd")


# --- properties --------------------------------------------------------------------------------------

_INTERNAL_V4 = st.sampled_from(["127.0.0.0/8", "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "169.254.0.0/16",
                                "100.64.0.0/10", "0.0.0.0/8", "224.0.0.0/4", "240.0.0.0/4"])


@st.composite
def internal_v4(draw: st.DrawFn) -> ipaddress.IPv4Address:
    network = ipaddress.IPv4Network(draw(_INTERNAL_V4))
    return network[draw(st.integers(0, network.num_addresses - 1))]


def _spellings(address: ipaddress.IPv4Address) -> list[str]:
    value = int(address)
    octets = [int(o) for o in str(address).split(".")]
    return [
        str(address), str(value), hex(value), "0" + oct(value)[2:],
        ".".join(hex(o) for o in octets), ".".join("0" + oct(o)[2:] for o in octets),
        f"{octets[0]}.{(value & 0xFFFFFF)}", f"{octets[0]}.{octets[1]}.{value & 0xFFFF}",
        f"[::ffff:{address}]", f"[{ipaddress.IPv6Address((0xFFFF << 32) | value)}]",
        f"[64:ff9b::{address}]", f"[2002:{value >> 16:x}:{value & 0xFFFF:x}::1]",
    ]


@given(internal_v4())
def test_every_spelling_of_an_internal_ipv4_address_is_refused(address: ipaddress.IPv4Address) -> None:
    assert address_refusal(address) is not None
    for spelling in _spellings(address):
        with pytest.raises(EgressRefused):
            STRICT.check_url(f"https://{spelling}/x", purpose="business")


@given(st.ip_addresses(v=4))
def test_ipv4_decisions_agree_with_the_address_class(address: ipaddress.IPv4Address) -> None:
    accepted = address_refusal(address) is None
    if accepted:  # stricter than the standard library, never looser
        assert address.is_global and not address.is_multicast
    mapped = ipaddress.IPv6Address((0xFFFF << 32) | int(address))
    assert (address_refusal(mapped) is None) == accepted
    try:
        STRICT.check_url(f"https://{address}/", purpose="business")
        url_accepted = True
    except EgressRefused:
        url_accepted = False
    assert url_accepted == accepted


@given(st.ip_addresses(v=6))
def test_ipv6_internal_ranges_are_never_accepted(address: ipaddress.IPv6Address) -> None:
    if address_refusal(address) is None:
        assert address.is_global and not address.is_multicast and not address.is_private
        assert classify_host(f"[{address}]").addresses == (address,)


def test_threadline_up_allows_loopback_except_its_own_ports() -> None:
    raw = loopback_egress_allow([8080, 4222, 8081, 8081], "hooks.corp.example")
    policy = EgressPolicy(allow_http=True, rules=parse_rules(raw))
    for url in ("http://127.0.0.1:9000/hook", "http://[::1]:9000/hook", "http://localhost:9000/hook",
                "http://hooks.corp.example/x"):
        policy.check_url(url, purpose="business")
    policy.check_host("127.0.0.1", 2525)  # the sandbox's SMTP sink
    for port in (8080, 4222, 8081):
        for host in ("127.0.0.1", "[::1]", "localhost", "127.0.0.2"):
            with pytest.raises(EgressRefused, match="denied"):
                policy.check_url(f"http://{host}:{port}/", purpose="business")
    with pytest.raises(EgressRefused):
        policy.check_url("http://10.0.0.1:9000/", purpose="business")
    # Loopback is for business destinations only: a platform base URL there would receive the
    # integration's credentials (and the media proxy would stream back what it answers).
    for url in ("http://127.0.0.1:9999/", "http://[::1]:9999/", "http://localhost:9999/"):
        with pytest.raises(EgressRefused):
            policy.check_url(url, purpose="platform", hosts=GRAPH_HOSTS)
        with pytest.raises(EgressRefused):
            policy.check_addresses("127.0.0.1", 9999, ["127.0.0.1"], purpose="platform")
