"""Handoff logic without NATS: code shapes, deep links per channel, redemption rules and limits."""

from __future__ import annotations

import asyncio
import re
from urllib.parse import parse_qs, unquote, urlsplit

import pytest

from services.handoff.config import HandoffConfig
from services.handoff.handlers import (
    REFUSAL_MESSAGES,
    HandoffHandlers,
    LinkError,
    business_name_of,
    deep_link,
    mint_code,
    normalize_code,
    with_query,
)
from services.handoff.store import Entry
from shared.config import ConfigError
from shared.messages.handoff import (
    CODE_PATTERN,
    VISIBLE_CODE_ALPHABET,
    CodeRedeemed,
    CodeRefused,
    HandoffError,
    IssueLinks,
    LinksIssued,
    RedeemCode,
    customer_text,
    is_visible_code,
    redemption_code,
)
from shared.records import IntegrationRecord

BASE = "https://chat.example.com"
APP = "app1"


class MemoryKv:
    """The KvStore contract in memory: create-if-absent and compare-and-set on revisions."""

    def __init__(self) -> None:
        self.data: dict[str, Entry] = {}
        self.revision = 0

    async def get(self, key: str) -> Entry | None:
        await asyncio.sleep(0)  # let concurrent callers interleave as they would over the network
        return self.data.get(key)

    async def create(self, key: str, value: bytes) -> bool:
        await asyncio.sleep(0)
        if key in self.data:
            return False
        self.revision += 1
        self.data[key] = Entry(value, self.revision)
        return True

    async def update(self, key: str, value: bytes, revision: int) -> bool:
        await asyncio.sleep(0)
        current = self.data.get(key)
        if current is None or current.revision != revision:
            return False
        self.revision += 1
        self.data[key] = Entry(value, self.revision)
        return True


def integration(id_: str, type_: str, app_id: str = APP, status: str = "active", **config: object) -> IntegrationRecord:
    return IntegrationRecord(id=id_, app_id=app_id, type=type_, status=status, config=dict(config))  # type: ignore[arg-type]


INTEGRATIONS = {
    r.id: r for r in (
        integration("wa", "whatsapp", phoneNumber="+1 (555) 000-1111"),
        integration("ms", "messenger", pageId="102290129340398"),
        integration("tg", "telegram", username="@demo_bot"),
        integration("sms", "twilio", phoneNumber="+15550002222"),
        integration("and", "android"),
        integration("ios", "ios", universalLink="https://shop.example.com/continue?src=chat#top"),
        integration("web", "web", businessName="Acme Shop"),
        integration("web2", "web", linkUrl="https://shop.example.com/help?lang=en"),
        integration("off", "telegram", status="inactive", username="x"),
        integration("other", "telegram", app_id="app2", username="y"),
        integration("line", "line"),
    )
}


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


def make(env: dict[str, str] | None = None, sandbox: bool = False) -> tuple[HandoffHandlers, MemoryKv, Clock]:
    config = HandoffConfig.from_env({"THREADLINE_PUBLIC_BASE_URL": BASE, "THREADLINE_SANDBOX": "1" if sandbox else "0",
                                     **(env or {})})
    store = MemoryKv()
    clock = Clock()

    async def lookup(integration_id: str) -> IntegrationRecord | None:
        return INTEGRATIONS.get(integration_id)

    handlers = HandoffHandlers(store, config, lookup, lambda app: business_name_of(app, INTEGRATIONS.values()), clock)
    return handlers, store, clock


async def issue(handlers: HandoffHandlers, *ids: str) -> LinksIssued:
    result = await handlers.issue(IssueLinks(app_id=APP, user_id="u1", conversation_id="c1",
                                             integration_ids=list(ids), source_integration_id="web"))
    assert isinstance(result, LinksIssued), result
    return result


def redeem(code: str, integration_id: str, sender: str = "s1", app_id: str = APP) -> RedeemCode:
    return RedeemCode(app_id=app_id, integration_id=integration_id, channel="x", channel_user_id=sender, code=code)


def test_code_shapes() -> None:
    for _ in range(50):
        visible = mint_code("whatsapp")
        assert re.fullmatch(r"TL[0-9A-HJKMNP-TV-Z]{8}", visible)
        assert all(c in VISIBLE_CODE_ALPHABET for c in visible[2:])
        assert redemption_code(customer_text("us", visible)) == visible
        assert is_visible_code(visible) and is_visible_code(visible.lower())
        assert normalize_code(visible.lower()) == visible
        hidden = mint_code("telegram")
        assert len(hidden) == 24 and CODE_PATTERN.match(hidden) and not is_visible_code(hidden)
        assert normalize_code(hidden) == hidden
    assert len({mint_code("messenger") for _ in range(200)}) == 200


def test_only_the_prefilled_text_or_a_code_alone_is_a_redemption() -> None:
    code = "TLABCD2345"
    for text in (customer_text("Threadline Demo Shop", code), customer_text("Ünïcode Café & Co", code),
                 f"  continue my conversation with us - code {code.lower()}. ", code, f" {code.lower()}\n",
                 f"code: {code}", f"Continue my conversation with a shop -- code {code}!"):
        assert redemption_code(text) == code, text
    # A code-shaped word inside the customer's own words is their message, never a redemption.
    for text in ("My tracking number is TL12345678", "Also TLXPRESS12 order", f"is {code} my code?",
                 f"{code} {code}", f"Continue my conversation with us — code {code} please call me",
                 f"hello\n{code}", "TL1234567", "TL12345678X", "TLI2345678",  # I is not in the alphabet
                 customer_text("x" * 400, code)):
        assert redemption_code(text) is None, text


def test_with_query_keeps_parameters_and_fragment() -> None:
    url = with_query("https://a.example/p?x=1&threadline_code=old#frag", "threadline_code", "abc")
    parts = urlsplit(url)
    assert parse_qs(parts.query) == {"x": ["1"], "threadline_code": ["abc"]} and parts.fragment == "frag"
    with pytest.raises(LinkError):
        with_query("javascript:alert(1)", "code", "x")


def test_deep_links_per_channel() -> None:
    def link(id_: str, code: str, sandbox: bool = False) -> str:
        return deep_link(INTEGRATIONS[id_], code, business_name="Acme Shop", public_base_url=BASE, sandbox=sandbox)

    wa = urlsplit(link("wa", "TL12345678"))
    assert (wa.scheme, wa.netloc, wa.path) == ("https", "wa.me", "/15550001111")
    assert parse_qs(wa.query) == {"text": ["Continue my conversation with Acme Shop — code TL12345678"]}
    assert link("ms", "abc_-1") == "https://m.me/102290129340398?ref=abc_-1"
    assert link("tg", "abc_-1") == "https://t.me/demo_bot?start=abc_-1"
    sms = link("sms", "TL12345678")
    assert sms.startswith("sms:+15550002222?body=") and "&body" not in sms
    assert unquote(sms.split("?body=", 1)[1]) == "Continue my conversation with Acme Shop — code TL12345678"
    assert link("and", "abc") == f"{BASE}/handoff/v1/open?code=abc"
    ios = urlsplit(link("ios", "abc"))
    assert (ios.netloc, ios.path, ios.fragment) == ("shop.example.com", "/continue", "top")
    assert parse_qs(ios.query) == {"src": ["chat"], "code": ["abc"]}
    web2 = urlsplit(link("web2", "abc"))
    assert parse_qs(web2.query) == {"lang": ["en"], "threadline_code": ["abc"]}
    assert link("web", "abc", sandbox=True) == f"{BASE}/sandbox/?threadline_code=abc"
    with pytest.raises(LinkError) as no_link:
        link("web", "abc")
    assert no_link.value.status == 400 and "linkUrl" in no_link.value.title
    with pytest.raises(LinkError):
        deep_link(integration("x", "whatsapp"), "TL12345678", business_name="us", public_base_url=BASE, sandbox=True)


def test_business_name() -> None:
    assert business_name_of(APP, INTEGRATIONS.values()) == "Acme Shop"
    assert business_name_of("app2", INTEGRATIONS.values()) == "us"


async def test_issue_binds_codes_and_answers_every_target() -> None:
    handlers, _, clock = make()
    issued = await issue(handlers, "wa", "tg", "sms", "wa")
    assert [link.integration_id for link in issued.links] == ["wa", "tg", "sms"]
    wa, tg, sms = issued.links
    assert is_visible_code(wa.code) and is_visible_code(sms.code) and len(tg.code) == 24
    assert all(link.expires_at == clock.now + 600 for link in issued.links)
    assert tg.qr_code_url == f"{BASE}/handoff/v1/qr/{tg.code}.svg"
    # A short code never appears in its QR URL (that endpoint has no attempt limit).
    assert wa.code not in wa.qr_code_url and wa.qr_code_url.startswith(f"{BASE}/handoff/v1/qr/")
    assert await handlers.qr_target(wa.qr_code_url.rsplit("/", 1)[1].removesuffix(".svg")) == wa.url
    assert await handlers.qr_target(wa.code) is None
    assert await handlers.qr_target(tg.code) == tg.url


@pytest.mark.parametrize(("ids", "status"), [
    (["nope"], 404), (["other"], 404), (["off"], 404), (["line"], 400), ([], 400), (["web"], 400),
    (["tg", "nope"], 404), ([f"i{n}" for n in range(21)], 400),
])
async def test_issue_refusals_store_nothing(ids: list[str], status: int) -> None:
    handlers, store, _ = make()
    result = await handlers.issue(IssueLinks(app_id=APP, user_id="u1", conversation_id="c1", integration_ids=ids))
    assert isinstance(result, HandoffError) and result.status == status
    assert store.data == {}


async def test_redeem_rules() -> None:
    handlers, _, clock = make()
    tg, ms = (await issue(handlers, "tg", "ms")).links
    wrong = await handlers.redeem(redeem(tg.code, "ms"))
    assert isinstance(wrong, CodeRefused) and wrong.reason == "wrong_channel"
    foreign = await handlers.redeem(redeem(tg.code, "tg", app_id="app2"))
    assert isinstance(foreign, CodeRefused) and foreign.reason == "foreign"
    ok = await handlers.redeem(redeem(tg.code, "tg", sender="tg-user"))
    assert ok == CodeRedeemed(app_id=APP, user_id="u1", conversation_id="c1", integration_id="tg",
                              source_integration_id="web")
    again = await handlers.redeem(redeem(tg.code, "tg", sender="tg-user"))  # the same sender: a repeat
    assert isinstance(again, CodeRefused) and again.reason == "repeated" and again.message == ""
    other = await handlers.redeem(redeem(tg.code, "tg", sender="someone-else"))
    assert isinstance(other, CodeRefused) and other.reason == "used" and other.message == REFUSAL_MESSAGES["used"]
    assert await handlers.qr_target(tg.code) is None
    unknown = await handlers.redeem(redeem("nope-nope", "tg", sender="s2"))
    assert isinstance(unknown, CodeRefused) and unknown.reason == "unknown"
    clock.now += 601
    expired = await handlers.redeem(redeem(ms.code, "ms", sender="s3"))
    assert isinstance(expired, CodeRefused) and expired.reason == "expired"
    assert expired.message.startswith("This link has expired.") and "Continue on" in expired.message
    assert await handlers.qr_target(ms.code) is None


async def test_visible_codes_are_case_insensitive() -> None:
    handlers, _, _ = make()
    (wa,) = (await issue(handlers, "wa")).links
    ok = await handlers.redeem(redeem(wa.code.lower(), "wa"))
    assert isinstance(ok, CodeRedeemed)


async def test_sender_limit_counts_failures_not_successes() -> None:
    handlers, _, clock = make()
    links = (await issue(handlers, "tg", "tg")).links  # deduplicated: one link
    assert len(links) == 1
    for n in range(3):
        assert isinstance(await handlers.redeem(redeem((await issue(handlers, "tg")).links[0].code, "tg")),
                          CodeRedeemed), n
    for n in range(5):
        result = await handlers.redeem(redeem(f"TL0000000{n}", "tg"))
        assert isinstance(result, CodeRefused) and result.reason == "unknown"
    valid = (await issue(handlers, "tg")).links[0].code
    limited = await handlers.redeem(redeem(valid, "tg"))
    assert isinstance(limited, CodeRefused) and limited.reason == "rate_limited"
    # Another sender (or the same user on another integration) is not affected; the code is intact.
    assert isinstance(await handlers.redeem(redeem(valid, "tg", sender="s2")), CodeRedeemed)
    clock.now += 901
    assert isinstance(await handlers.redeem(redeem((await issue(handlers, "tg")).links[0].code, "tg")), CodeRedeemed)


async def test_concurrent_guesses_cannot_slip_under_the_sender_limit() -> None:
    handlers, _, _ = make()
    results = await asyncio.gather(*(handlers.redeem(redeem(f"guess{n}", "wa")) for n in range(20)))
    reasons = [r.reason for r in results if isinstance(r, CodeRefused)]
    assert reasons.count("unknown") == 5 and reasons.count("rate_limited") == 15


async def test_code_burns_after_failed_attempts() -> None:
    handlers, _, _ = make()
    (wa,) = (await issue(handlers, "wa")).links
    for n in range(5):
        result = await handlers.redeem(redeem(wa.code, "sms", sender=f"attacker{n}"))
        assert isinstance(result, CodeRefused) and result.reason == "wrong_channel"
    burned = await handlers.redeem(redeem(wa.code, "wa", sender="owner"))
    assert isinstance(burned, CodeRefused) and burned.reason == "expired"


async def test_concurrent_redemptions_link_once() -> None:
    handlers, _, _ = make()
    (tg,) = (await issue(handlers, "tg")).links
    results = await asyncio.gather(*(handlers.redeem(redeem(tg.code, "tg", sender=f"s{n}")) for n in range(50)))
    assert sum(isinstance(r, CodeRedeemed) for r in results) == 1
    assert all(isinstance(r, CodeRedeemed) or (isinstance(r, CodeRefused) and r.reason == "used") for r in results)


async def test_bad_redeem_requests() -> None:
    handlers, _, _ = make()
    assert isinstance(await handlers.redeem(redeem("x", "", sender="s")), HandoffError)
    long = await handlers.redeem(redeem("a" * 5000, "tg"))
    assert isinstance(long, CodeRefused) and long.reason == "unknown"
    dotted = await handlers.redeem(redeem("attempts.abc", "tg", sender="s2"))
    assert isinstance(dotted, CodeRefused) and dotted.reason == "unknown"


def test_config_validation() -> None:
    assert HandoffConfig.from_env({}).code_ttl_seconds == 600
    with pytest.raises(ConfigError):
        HandoffConfig.from_env({"THREADLINE_HANDOFF_CODE_TTL_SECONDS": "0"})
    with pytest.raises(ConfigError):
        HandoffConfig.from_env({"THREADLINE_HANDOFF_MAX_SENDER_FAILURES": "0"})
