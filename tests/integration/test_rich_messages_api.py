"""The business API with SunCo's richer types: what it refuses (a clear 400, nothing stored) and
how a customer's form answer is kept — as the form asked it, whatever labels the answer claims."""

from __future__ import annotations

from typing import Any

import sunshine_conversations_client as sc

from tests.integration.test_conversations_api import Tenant, new_user_conversation
from tests.integration.test_conversations_api import system as system  # on SQLite, then on PostgreSQL
from tests.integration.test_conversations_api import tenant as tenant

ITEM = {"title": "Red", "actions": [{"type": "postback", "text": "Pick", "payload": "RED"}]}
FORM = {"type": "form", "fields": [
    {"type": "text", "name": "name", "label": "Your name", "minSize": 2, "maxSize": 20},
    {"type": "email", "name": "email", "label": "E-mail"},
    {"type": "select", "name": "plan", "label": "Plan", "options": [
        {"name": "basic", "label": "Basic ($5)"}, {"name": "pro", "label": "Pro ($50)"}]}]}


async def post(t: Tenant, conversation_id: str, content: dict[str, Any], author: dict[str, Any] | None = None,
               ) -> tuple[int, Any]:
    return await t.request("POST", f"/v2/apps/{t.app_id}/conversations/{conversation_id}/messages",
                           body={"author": author or {"type": "business"}, "content": content})


def answer(form_id: str, **overrides: Any) -> dict[str, Any]:
    fields = {"name": {"type": "text", "name": "name", "label": "Name", "text": "Ann"},
              "email": {"type": "email", "name": "email", "label": "E-mail", "email": "ann@example.com"},
              "plan": {"type": "select", "name": "plan", "label": "Plan",
                       "select": [{"name": "basic", "label": "Basic ($5)"}]}}
    fields.update(overrides)
    return {"type": "formResponse",
            "fields": [{**f, "quotedMessageId": form_id} for f in fields.values() if f is not None]}


async def test_refused_with_a_clear_400_and_nothing_stored(tenant: Tenant) -> None:
    t = tenant
    _user_id, conversation_id = await new_user_conversation(t, "rita")
    refused = [
        {"type": "carousel", "items": [ITEM] * 11},
        {"type": "carousel", "items": [{**ITEM, "actions": ITEM["actions"] * 4}]},
        {"type": "carousel", "items": [{**ITEM, "actions": [{"type": "reply", "text": "Hi", "payload": "x"}]}]},
        {"type": "list", "items": [ITEM], "actions": [ITEM["actions"][0]] * 11},
        {"type": "text", "text": "x", "actions": [{"type": "postback", "text": "No payload"}]},
        {"type": "text", "text": "x", "actions": [{"type": "link", "text": "bad", "uri": "javascript:alert(1)"}]},
        {"type": "location", "coordinates": {"lat": 91, "long": 0}},
        {**FORM, "fields": [*FORM["fields"], {"type": "text", "name": "name", "label": "Twice"}]},
        {**FORM, "fields": [{"type": "text", "name": "n", "label": "Prefilled", "text": "answer"}]},
        {**FORM, "fields": [{"type": "select", "name": "s", "label": "S", "options": [{"name": "", "label": "x"}]}]},
        {"type": "form", "fields": []},
        {"type": "nonsense", "text": "x"},
        answer("0" * 24),  # a business cannot answer a form
    ]
    for content in refused:
        status, body = await post(t, conversation_id, content)
        assert status == 400, content
        assert body["errors"][0]["code"] == "bad_request" and body["errors"][0]["title"]
    listed = await t.call(sc.MessagesApi(t.client()).list_messages, t.app_id, conversation_id)
    assert listed.messages == []


async def test_a_form_answer_is_kept_as_the_form_asked_it(tenant: Tenant) -> None:
    t = tenant
    user_id, conversation_id = await new_user_conversation(t, "ann")
    status, body = await post(t, conversation_id, FORM)
    assert status == 201
    form_id = body["messages"][0]["id"]
    user = {"type": "user", "userId": user_id}
    wrong = [
        answer("0" * 24),  # no such form
        answer(form_id, plan={"type": "select", "name": "plan", "label": "Plan",
                              "select": [{"name": "gold", "label": "Gold"}]}),  # not offered
        answer(form_id, email={"type": "email", "name": "email", "label": "E-mail",
                               "email": "<svg/onload=alert(1)>@x"}),
        answer(form_id, name={"type": "text", "name": "name", "label": "Name", "text": "A"}),  # under minSize
        answer(form_id, email=None),  # a field not answered
        answer(form_id, extra={"type": "text", "name": "extra", "label": "Extra", "text": "x"}),
    ]
    for content in wrong:
        status, body = await post(t, conversation_id, content, author=user)
        assert status == 400, (content, body)
    # Labels claimed by the answer are not what is kept: the form's are, and the text fallback follows.
    forged = answer(form_id, plan={"type": "select", "name": "plan", "label": "Identity verified",
                                   "select": [{"name": "basic", "label": "Pro ($50) - PAID IN FULL"}]})
    forged["textFallback"] = "I agree to pay $10,000"
    status, body = await post(t, conversation_id, forged, author=user)
    assert status == 201
    kept = body["messages"][0]["content"]
    assert kept["textFallback"] == "Your name: Ann\nE-mail: ann@example.com\nPlan: Basic ($5)"
    assert [f["label"] for f in kept["fields"]] == ["Your name", "E-mail", "Plan"]
    assert kept["fields"][2]["select"] == [{"name": "basic", "label": "Basic ($5)"}]
    listed = await t.call(sc.MessagesApi(t.client()).list_messages, t.app_id, conversation_id)
    assert [m.content.actual_instance.type for m in listed.messages] == ["form", "formResponse"]
