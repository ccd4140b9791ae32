"""The README's business example runs as written against a sandbox (official client, unchanged)."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import aiohttp
import sunshine_conversations_client as sc

from shared.http import basic_auth_header
from tests.harness import ACCOUNT_KEY_ID, ACCOUNT_KEY_SECRET, System
from threadline.bootstrap import AccountKey, bootstrap_sandbox

README = Path(__file__).resolve().parents[2] / "README.md"


async def test_readme_business_example(system: System, tmp_path: Path) -> None:
    await system.start("identity", "conversations")
    data_dir = tmp_path / "readme"
    info = await bootstrap_sandbox(system.base_url, AccountKey(ACCOUNT_KEY_ID, ACCOUNT_KEY_SECRET), str(data_dir))
    block = re.search(r"```python\n(.*?)```", README.read_text(), re.S)
    assert block is not None, "README has no python example"
    code = block.group(1).replace('".threadline/sandbox.json"', repr(str(data_dir / "sandbox.json")))
    # A conversation to reply into, as the README says a webhook would name it.
    users = sc.UsersApi(sc.ApiClient(sc.Configuration(host=info["baseUrl"], username=info["apiKey"]["id"],
                                                      password=info["apiKey"]["secret"])))
    user = (await asyncio.to_thread(users.create_user, info["appId"], sc.UserCreateBody(external_id="reader"))).user
    conversations = sc.ConversationsApi(users.api_client)
    created = await asyncio.to_thread(conversations.create_conversation, info["appId"], sc.ConversationCreateBody(
        type="personal", participants=[sc.ParticipantSubSchema(sc.ParticipantWithUserId(user_id=user.id))]))
    conversation_id = created.conversation.id
    await asyncio.to_thread(exec, code, {"conversation_id": conversation_id})
    async with aiohttp.ClientSession(headers=basic_auth_header(info["apiKey"]["id"], info["apiKey"]["secret"])) as s:
        async with s.get(f"{info['baseUrl']}/v2/apps/{info['appId']}/conversations/{conversation_id}/messages") as r:
            body = await r.json()
        async with s.get(f"{info['baseUrl']}/v2/apps/{info['appId']}/integrations") as r:
            integrations = await r.json()
    assert [m["content"]["text"] for m in body["messages"]] == ["Hello!"]
    assert body["messages"][0]["author"]["displayName"] == "Sam"
    assert "custom" in [i["type"] for i in integrations["integrations"]]
