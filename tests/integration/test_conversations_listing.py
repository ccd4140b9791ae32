"""The app-wide conversation listing (`GET /v2/apps/{appId}/conversations` without a user filter,
a Threadline extension): most recent activity first, cursor paging both ways that neither repeats
nor skips a conversation while others are created or get messages between pages, the filters
(type, switchboard control, channel, updatedAfter/createdAfter, also on a user's listing), 400s for
bad filters and cursors, and one app's key never listing another app's conversations. Real
identity + conversations services and nats-server, the store on SQLite, then on PostgreSQL."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote

import pytest
import sunshine_conversations_client as sc
from sunshine_conversations_client.exceptions import ApiException

from shared.bus import Bus
from shared.messages import channel as chan
from shared.sunco import TextContent
from tests.integration.test_conversations_api import ACCOUNT, Tenant, create_tenant, eventually
from tests.integration.test_conversations_api import system as system  # on SQLite, then on PostgreSQL
from tests.integration.test_conversations_api import tenant as tenant


async def new_conversation(t: Tenant, external_id: str) -> str:
    """A user and a conversation of theirs, through the API; the conversation's id."""
    status, body = await t.request("POST", f"/v2/apps/{t.app_id}/users", body={"externalId": external_id})
    assert status == 201, body
    status, body = await t.request("POST", f"/v2/apps/{t.app_id}/conversations", body={
        "type": "personal", "participants": [{"userId": body["user"]["id"]}]})
    assert status == 201, body
    return str(body["conversation"]["id"])


async def say(t: Tenant, conversation_id: str, text: str = "news") -> None:
    """A business message: the conversation's activity is now."""
    status, body = await t.request("POST", f"/v2/apps/{t.app_id}/conversations/{conversation_id}/messages", body={
        "author": {"type": "business"}, "content": {"type": "text", "text": text}})
    assert status == 201, body


async def listing(t: Tenant, query: str = "", headers: dict[str, str] | None = None,
                  app_id: str | None = None) -> dict[str, Any]:
    status, body = await t.request("GET", f"/v2/apps/{app_id or t.app_id}/conversations{query}", headers=headers)
    assert status == 200, body
    return dict(body)


async def follow(t: Tenant, link: str) -> dict[str, Any]:
    """GET a `links.next/prev` URL as it is."""
    assert link.startswith(t.base)
    async with t.http.get(link, headers=t.auth) as resp:
        assert resp.status == 200, await resp.text()
        return dict(await resp.json())


def ids(body: dict[str, Any]) -> list[str]:
    return [c["id"] for c in body["conversations"]]


async def refused(t: Tenant, query: str, status: int = 400, app_id: str | None = None,
                  headers: dict[str, str] | None = None) -> str:
    """The listing answers `status` with SunCo's error body; its title."""
    got, body = await t.request("GET", f"/v2/apps/{app_id or t.app_id}/conversations{query}", headers=headers)
    assert got == status, (query, got, body)
    [error] = body["errors"]
    assert error["code"] == {400: "bad_request", 403: "forbidden"}[status] and error["title"]
    return str(error["title"])


# --- paging ----------------------------------------------------------------------------------

async def test_pages_both_ways_while_conversations_come_and_move(tenant: Tenant) -> None:
    t = tenant
    c = [await new_conversation(t, f"customer-{i}") for i in range(7)]
    await say(t, c[0])  # the oldest conversation is the most recently active one now
    everything = await listing(t)
    assert ids(everything) == [c[0], c[6], c[5], c[4], c[3], c[2], c[1]]
    assert everything["meta"]["hasMore"] is False and everything["links"] == {}
    stamps = [conversation["lastUpdatedAt"] for conversation in everything["conversations"]]
    assert stamps == sorted(stamps, reverse=True)

    # Forward, 3 a page, following links.next; between pages a conversation is created and the
    # conversation whose cursor we hold gets a message: neither shows, nothing is skipped.
    first = await listing(t, "?page[size]=3")
    assert ids(first) == [c[0], c[6], c[5]] and first["meta"]["hasMore"] is True
    assert "prev" not in first["links"]
    cursor = first["meta"]["afterCursor"]
    assert len(cursor) == 24 and cursor != c[5] and first["meta"]["beforeCursor"] != cursor
    assert "page%5Bsize%5D=3" in first["links"]["next"] and "page%5Bafter%5D" in first["links"]["next"]
    new_1 = await new_conversation(t, "newcomer-1")
    await say(t, c[5])  # the last of the page (its cursor) moves to the top
    second = await follow(t, first["links"]["next"])
    assert ids(second) == [c[4], c[3], c[2]] and second["meta"]["hasMore"] is True
    new_2 = await new_conversation(t, "newcomer-2")
    await say(t, c[6])
    third = await follow(t, second["links"]["next"])
    assert ids(third) == [c[1]] and third["meta"]["hasMore"] is False
    assert "next" not in third["links"] and "prev" in third["links"]
    forward = ids(first) + ids(second) + ids(third)
    assert sorted(forward) == sorted(c) and len(set(forward)) == len(forward)

    # Backwards from the last page: the newer rows as they stand now, each once, newest first
    # within a page, until nothing is newer.
    now_order = [c[6], new_2, c[5], new_1, c[0], c[4], c[3], c[2], c[1]]
    assert ids(await listing(t)) == now_order
    back, pages = third, []
    while "prev" in back["links"]:
        back = await follow(t, back["links"]["prev"])
        pages.append(ids(back))
        assert back["meta"]["hasMore"] is (len(pages) < 3) and "next" in back["links"]
    assert pages == [now_order[5:8], now_order[2:5], now_order[:2]]
    # A page's next link leads back down.
    again = await follow(t, back["links"]["next"])
    assert ids(again) == now_order[2:5]

    # A cursor whose conversation is deleted still pages on (it is a position, not a row).
    assert (await t.request("DELETE", f"/v2/apps/{t.app_id}/users/customer-0"))[0] == 200
    assert ids(await follow(t, again["links"]["next"])) == now_order[5:8]
    now_order.remove(c[0])

    # The official client (17.0.1) lists without a user given an empty filter, and its Page takes
    # the cursors (it checks they are 24 characters).
    conversations = sc.ConversationsApi(t.client())
    listed = await t.call(conversations.list_conversations, t.app_id, sc.ConversationListFilter(),
                          page=sc.Page(size=4))
    assert [x.id for x in listed.conversations] == now_order[:4] and listed.meta.has_more
    rest = await t.call(conversations.list_conversations, t.app_id, sc.ConversationListFilter(),
                        page=sc.Page(after=listed.meta.after_cursor, size=4))
    assert [x.id for x in rest.conversations] == now_order[4:] and rest.meta.has_more is False
    newer = await t.call(conversations.list_conversations, t.app_id, sc.ConversationListFilter(),
                         page=sc.Page(before=rest.meta.before_cursor, size=2))
    assert [x.id for x in newer.conversations] == now_order[2:4] and newer.meta.has_more


async def test_a_user_listing_is_as_before(tenant: Tenant) -> None:
    """With a user filter: creation order and id cursors, and now links that keep the filter."""
    t = tenant
    first = await new_conversation(t, "dora")
    status, body = await t.request("POST", f"/v2/apps/{t.app_id}/conversations", body={
        "type": "personal", "participants": [{"userExternalId": "dora"}]})
    assert status == 201
    second = body["conversation"]["id"]
    await new_conversation(t, "someone-else")
    await say(t, first)
    page = await listing(t, "?filter[userExternalId]=dora&page[size]=1")
    assert ids(page) == [first] and page["meta"]["afterCursor"] == first
    nxt = await follow(t, page["links"]["next"])
    assert ids(nxt) == [second] and nxt["meta"]["hasMore"] is False
    assert "filter%5BuserExternalId%5D=dora" in page["links"]["next"]
    # An activity cursor is not an id cursor, nor the other way round.
    await refused(t, f"?filter[userExternalId]=dora&page[after]={(await listing(t))['meta']['afterCursor']}")
    await refused(t, f"?page[after]={first}")


# --- filters ---------------------------------------------------------------------------------

@pytest.fixture
async def bus(tenant: Tenant) -> AsyncIterator[Bus]:
    connected = await Bus.connect(tenant.system.nats_url, "test-whatsapp")
    try:
        yield connected
    finally:
        await connected.close()


async def whatsapp_conversation(t: Tenant, bus: Bus) -> str:
    """A customer writes on WhatsApp (as the whatsapp service publishes it): their conversation."""
    status, body = await t.request("POST", f"/v2/apps/{t.app_id}/integrations", body={
        "type": "whatsapp", "phoneNumberId": "100", "accessToken": "token-0123456789", "appSecret": "s" * 20})
    assert status == 201, body
    message = chan.InboundMessage(
        app_id=t.app_id, integration_id=body["integration"]["id"], channel="whatsapp", client_type="whatsapp",
        channel_user_id="15551234", provider_message_id="wamid.1", received_at=time.time(),
        content=TextContent(text="hello"), display_name="Zoe", client_info={"phoneNumber": "+15551234"})
    await bus.publish(chan.subject_of(message), chan.encode(message))

    async def arrived() -> list[str]:
        return ids(await listing(t, "?filter[channel]=whatsapp"))

    [conversation_id] = await eventually(arrived)
    return conversation_id


async def test_filters(tenant: Tenant, bus: Bus) -> None:
    t = tenant
    # A switchboard: a bot (the default) and the desk (an integration type of its own).
    status, body = await t.request("POST", f"/v2/apps/{t.app_id}/switchboards")
    assert status == 201
    switchboard_id = body["switchboard"]["id"]
    members = f"/v2/apps/{t.app_id}/switchboards/{switchboard_id}/switchboardIntegrations"
    status, body = await t.request("POST", members, body={"name": "bot", "integrationType": "zd:answerBot"})
    assert status == 201
    bot = body["switchboardIntegration"]["id"]
    status, body = await t.request("POST", members, body={"name": "desk", "integrationType": "desk"})
    assert status == 201
    desk = body["switchboardIntegration"]["id"]
    status, _ = await t.request("PATCH", f"/v2/apps/{t.app_id}/switchboards/{switchboard_id}", body={
        "enabled": True, "defaultSwitchboardIntegrationId": bot})
    assert status == 200

    a = await new_conversation(t, "a")
    b = await new_conversation(t, "b")
    c = await new_conversation(t, "c")
    status, body = await t.request("POST", f"/v2/apps/{t.app_id}/conversations/{b}/passControl",
                                   body={"switchboardIntegration": "desk"})
    assert status == 200, body
    wa = await whatsapp_conversation(t, bus)
    assert ids(await listing(t)) == [wa, c, b, a]

    # Who is in control: by integration type (the desk's queue) and by member id.
    desk_queue = await listing(t, "?filter[activeSwitchboardIntegrationType]=desk")
    assert ids(desk_queue) == [b]
    assert desk_queue["conversations"][0]["activeSwitchboardIntegration"]["name"] == "desk"
    assert ids(await listing(t, f"?filter[activeSwitchboardIntegrationId]={bot}")) == [wa, c, a]
    assert ids(await listing(t, f"?filter[activeSwitchboardIntegrationId]={desk}"
                                "&filter[activeSwitchboardIntegrationType]=desk")) == [b]
    assert ids(await listing(t, f"?filter[activeSwitchboardIntegrationId]={bot}"
                                "&filter[activeSwitchboardIntegrationType]=desk")) == []
    # Paged, with the filter kept in the links.
    page = await listing(t, f"?filter[activeSwitchboardIntegrationId]={bot}&page[size]=2")
    assert ids(page) == [wa, c] and quote(bot) in page["links"]["next"]
    assert ids(await follow(t, page["links"]["next"])) == [a]

    # Type, channel.
    assert ids(await listing(t, "?filter[type]=personal")) == [wa, c, b, a]
    assert ids(await listing(t, "?filter[type]=sdkGroup")) == []
    assert ids(await listing(t, "?filter[channel]=whatsapp")) == [wa]
    assert ids(await listing(t, "?filter[channel]=telegram")) == []
    assert ids(await listing(t, "?filter[channel]=web")) == []

    # updatedAfter / createdAfter: strictly after the time as the API shows it (milliseconds).
    got = {x["id"]: x for x in (await listing(t))["conversations"]}
    await say(t, a)
    assert ids(await listing(t, f"?filter[updatedAfter]={got[wa]['lastUpdatedAt']}")) == [a]
    assert ids(await listing(t, f"?filter[createdAfter]={got[a]['createdAt']}")) == [wa, c, b]
    assert ids(await listing(t, f"?filter[createdAfter]={got[b]['createdAt']}&filter[type]=personal"
                                f"&filter[activeSwitchboardIntegrationType]=zd:answerBot")) == [wa, c]
    assert ids(await listing(t, "?filter[createdAfter]=2000-01-01")) == [a, wa, c, b]
    assert ids(await listing(t, "?filter[updatedAfter]=2999-01-01T00:00:00%2B02:00")) == []
    # The 17.x client's style: the filter as URL-encoded JSON.
    as_json = quote('{"activeSwitchboardIntegrationType": "desk", "type": "personal"}')
    assert ids(await listing(t, f"?filter={as_json}")) == [b]

    # The filters narrow a user's listing too.
    status, body = await t.request("GET", f"/v2/apps/{t.app_id}/conversations/{wa}/participants")
    wa_user = body["participants"][0]["userId"]
    assert ids(await listing(t, f"?filter[userId]={wa_user}&filter[channel]=whatsapp")) == [wa]
    assert ids(await listing(t, "?filter[userExternalId]=b&filter[channel]=whatsapp")) == []
    assert ids(await listing(t, "?filter[userExternalId]=b&filter[activeSwitchboardIntegrationType]=desk")) == [b]


async def test_bad_filters_and_cursors_are_400(tenant: Tenant) -> None:
    t = tenant
    await new_conversation(t, "a")
    for query in ("?filter[type]=group", "?filter[channel]=fax", "?filter[channel]=",
                  "?filter[updatedAfter]=yesterday", "?filter[createdAfter]=2024-13-01", "?filter[createdAfter]=",
                  "?filter[activeSwitchboardIntegrationId]=not-an-id",
                  "?filter[activeSwitchboardIntegrationType]=no%20spaces",
                  "?filter[bogus]=1", "?filter[userID]=x", "?filter={nope", "?filter=[1]",
                  "?filter=" + quote('{"type": 5}'),
                  "?page[size]=0", "?page[size]=101", "?page[size]=ten", "?page[after]=short",
                  "?page[after]=" + "a" * 24, "?page[after]=" + "t" * 25, "?page[before]=" + "t" + "_" * 23,
                  "?page[before]=t" + "%2B" * 23,
                  "?page[after]=a&page[before]=b"):
        await refused(t, query)
    # No switchboard (yet): no member to be in control.
    title = await refused(t, "?filter[activeSwitchboardIntegrationType]=desk")
    assert "desk" in title
    await refused(t, "?filter[activeSwitchboardIntegrationId]=" + "a" * 24)
    status, _ = await t.request("POST", f"/v2/apps/{t.app_id}/switchboards")
    assert status == 201
    await refused(t, "?filter[activeSwitchboardIntegrationType]=desk")
    # An unknown user is still the 404 it was.
    status, body = await t.request("GET", f"/v2/apps/{t.app_id}/conversations?filter[userExternalId]=nobody")
    assert status == 404 and body["errors"][0]["code"] == "user_not_found"


# --- isolation -------------------------------------------------------------------------------

async def test_an_app_key_lists_only_its_own_app(tenant: Tenant) -> None:
    t = tenant
    mine = [await new_conversation(t, f"mine-{i}") for i in range(2)]
    other_app, other_key, other_secret = await create_tenant(t.system, t.http, "Other")
    other = Tenant(t.system, t.http, other_app, other_key, other_secret)
    theirs = [await new_conversation(other, f"theirs-{i}") for i in range(3)]

    assert ids(await listing(t)) == mine[::-1]
    assert ids(await listing(other)) == theirs[::-1]
    # A key of one app on the other's path: 403, whatever the filter.
    await refused(t, "", 403, app_id=other_app)
    await refused(t, "?filter[channel]=whatsapp&page[size]=1", 403, app_id=other_app)
    await refused(other, "", 403, app_id=t.app_id)
    with pytest.raises(ApiException) as exc:
        await t.call(sc.ConversationsApi(t.client()).list_conversations, other_app, sc.ConversationListFilter())
    assert exc.value.status == 403
    # Another app's cursor is only a position: it pages through this app's conversations alone.
    their_cursor = (await listing(other, "?page[size]=1"))["meta"]["afterCursor"]
    for direction in ("after", "before"):
        assert set(ids(await listing(t, f"?page[{direction}]={their_cursor}"))) <= set(mine)
    # The account key lists each app's own.
    assert ids(await listing(t, headers=ACCOUNT)) == mine[::-1]
    assert ids(await listing(t, headers=ACCOUNT, app_id=other_app)) == theirs[::-1]
    # A user id of the other app names nobody here.
    status, body = await t.request("GET", f"/v2/apps/{other_app}/conversations/{theirs[0]}/participants",
                                   headers=ACCOUNT)
    their_user = body["participants"][0]["userId"]
    status, body = await t.request("GET", f"/v2/apps/{t.app_id}/conversations?filter[userId]={their_user}")
    assert status == 200 and body["conversations"] == []


async def test_many_pages_with_inserts_between_each(tenant: Tenant) -> None:
    """25 conversations, 4 a page forward then back, one new conversation before every page."""
    t = tenant
    original = [await new_conversation(t, f"bulk-{i}") for i in range(25)]
    seen: list[str] = []
    body = await listing(t, "?page[size]=4")
    pages = 1
    seen += ids(body)
    while "next" in body["links"]:
        await new_conversation(t, f"late-{pages}")
        body = await follow(t, body["links"]["next"])
        pages += 1
        seen += ids(body)
    assert seen == original[::-1] and pages == 7
    newer: list[str] = []
    while "prev" in body["links"]:
        await new_conversation(t, f"later-{pages}")
        body = await follow(t, body["links"]["prev"])
        pages += 1
        newer = ids(body) + newer
    # Back to the top: everything above the last page, the conversations created meanwhile
    # included (they sort above it), each once.
    total = ids(await listing(t, "?page[size]=100"))
    assert len(total) == 25 + 6 + (pages - 7) and [*newer, original[0]] == total

