"""Attachments through the official client: upload (multipart `source`), a public URL that serves
the file safely, removal; and what is refused — types a browser would run, files that lie about
their type, oversized files, path tricks in the name, another app's files. Every test runs with
the files on local disk and state on SQLite, then with the files in a real S3-compatible server
and state on PostgreSQL."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import aiohttp
import pytest
import sunshine_conversations_client as sc
from sunshine_conversations_client.rest import ApiException

from services.conversations.attachments import MAX_ATTACHMENT_BYTES
from shared.media import attachment_url, new_token, object_key
from shared.objectstore import put_bytes
from tests.harness import System, new_postgres_database
from tests.integration.test_conversations_api import Tenant, create_tenant, new_user_conversation
from tests.integration.test_conversations_api import tenant as tenant
from tests.s3server import S3Server
from threadline.natsserver import NatsServer

PNG = b"\x89PNG\r\n\x1a\n" + b"\x00\x00\x00\rIHDR" + b"\x00" * 64
PDF = b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<<>>\nendobj\n%%EOF\n"


@pytest.fixture(params=["sqlite-disk", "postgres-s3"])
async def system(request: pytest.FixtureRequest, nats_server: NatsServer, tmp_path: Path) -> AsyncIterator[System]:
    env: dict[str, str] = {}
    if request.param == "postgres-s3":
        s3: S3Server = request.getfixturevalue("s3_server")
        env = {"THREADLINE_DATABASE_URL": await new_postgres_database(request.getfixturevalue("postgres_server")),
               **s3.environ(s3.new_bucket(), prefix="media")}
    sys_ = System(nats_server.url, tmp_path / "data", env=env)
    try:
        yield sys_
    finally:
        await sys_.close()


async def stored_keys(t: Tenant) -> list[str]:
    files = t.system.service("conversations").attachments.files
    return sorted([key async for batch in files.older_than(f"{t.app_id}/", float("inf")) for key in batch])


async def upload(t: Tenant, data: bytes, media_type: str, filename: str = "photo.png",
                 query: str = "access=public&for=message", app_id: str | None = None) -> tuple[int, Any]:
    form = aiohttp.FormData()
    form.add_field("source", data, filename=filename, content_type=media_type)
    async with t.http.post(f"{t.base}/v2/apps/{app_id or t.app_id}/attachments?{query}", data=form,
                           headers=t.auth) as resp:
        return resp.status, await resp.json()


async def test_upload_serve_send_and_remove_with_the_official_client(tenant: Tenant) -> None:
    t = tenant
    _user_id, conversation_id = await new_user_conversation(t, "pat")
    api = sc.AttachmentsApi(t.client())
    uploaded = (await t.call(api.upload_attachment, t.app_id, "public", ("receipt.png", PNG), var_for="message",
                             conversation_id=conversation_id)).attachment
    assert uploaded.media_type == "image/png" and uploaded.media_url.startswith(f"{t.base}/attachments/v1/")
    assert uploaded.media_url.endswith("/receipt.png")
    async with t.http.get(uploaded.media_url) as resp:  # public: no credentials
        assert resp.status == 200 and await resp.read() == PNG
        assert resp.headers["Content-Type"] == "image/png" and resp.headers["X-Content-Type-Options"] == "nosniff"
        assert resp.headers["Content-Disposition"].startswith("inline")
        assert "sandbox" in resp.headers["Content-Security-Policy"]
    # The URL goes in an image message like any other.
    post = sc.MessagePost(author=sc.Author(type="business"), content=sc.Content(sc.ImageMessage(
        type="image", media_url=uploaded.media_url)))
    await t.call(sc.MessagesApi(t.client()).post_message, t.app_id, conversation_id, post)
    # A document is served for download, never rendered.
    status, body = await upload(t, PDF, "application/pdf", filename="invoice.pdf")
    assert status == 201
    async with t.http.get(body["attachment"]["mediaUrl"]) as resp:
        assert resp.status == 200 and resp.headers["Content-Disposition"].startswith("attachment")
    # Removed: gone from its URL, and a second removal is a 404.
    await t.call(api.delete_attachment, t.app_id, sc.AttachmentDeleteBody(media_url=uploaded.media_url))
    async with t.http.get(uploaded.media_url) as resp:
        assert resp.status == 404
    try:
        await t.call(api.delete_attachment, t.app_id, sc.AttachmentDeleteBody(media_url=uploaded.media_url))
        raise AssertionError("removed twice")
    except ApiException as exc:
        assert exc.status == 404


async def test_refused_uploads(tenant: Tenant) -> None:
    t = tenant
    refused = [
        (b"<html><script>alert(1)</script></html>", "text/html", "x.html", 415),
        (b"<svg onload=alert(1)></svg>", "image/svg+xml", "x.svg", 415),
        (b"<html>not a png</html>", "image/png", "fake.png", 400),  # the content says otherwise
        (b"", "image/png", "empty.png", 400),
    ]
    for data, media_type, filename, expected in refused:
        status, body = await upload(t, data, media_type, filename)
        assert status == expected, (media_type, body)
        assert body["errors"][0]["title"]
    status, _ = await upload(t, PNG, "image/png", query="access=private")
    assert status == 400
    status, _ = await upload(t, PNG, "image/png", query="access=public&conversationId=" + "0" * 24)
    assert status == 404
    # Too large: refused while streaming, nothing kept.
    status, body = await upload(t, PNG + b"\x00" * MAX_ATTACHMENT_BYTES, "image/png", "huge.png")
    assert status == 413 and body["errors"][0]["code"] == "payload_too_large"
    # A path trick in the name is only a name.
    for trick, kept in (("../../../etc/passwd.png", "passwd.png"), ("..\\..\\boot.ini.png", "boot.ini.png"),
                        ("<img src=x onerror=alert(1)>.png", "img src_x onerror_alert_1_.png"), ("...", "image")):
        status, body = await upload(t, PNG, "image/png", filename=trick)
        assert status == 201, trick
        url = body["attachment"]["mediaUrl"]
        assert unquote(url.rsplit("/", 1)[1]) == kept and ".." not in url.split("/attachments/v1/")[1]


async def test_another_apps_attachments_are_out_of_reach(tenant: Tenant) -> None:
    t = tenant
    status, body = await upload(t, PNG, "image/png")
    assert status == 201
    media_url = body["attachment"]["mediaUrl"]
    other_app, key_id, secret = await create_tenant(t.system, t.http, "Other")
    other = Tenant(t.system, t.http, other_app, key_id, secret)
    status, _ = await other.request("POST", f"/v2/apps/{other_app}/attachments/remove", body={"mediaUrl": media_url})
    assert status == 404
    status, _ = await other.request("POST", f"/v2/apps/{t.app_id}/attachments/remove", body={"mediaUrl": media_url})
    assert status == 403
    forged = media_url.replace(f"/attachments/v1/{t.app_id}/", f"/attachments/v1/{other_app}/")
    for url in (forged, media_url.rsplit("/", 2)[0] + "/" + "A" * 32 + "/photo.png"):
        async with t.http.get(url) as resp:
            assert resp.status == 404
    async with t.http.get(media_url) as resp:
        assert resp.status == 200
    await asyncio.sleep(0)


async def test_attachments_go_with_their_conversation_and_the_sweep_deletes_their_files(tenant: Tenant) -> None:
    t = tenant
    user_id, _default = await new_user_conversation(t, "lee")
    body = sc.ConversationCreateBody(type="personal", participants=[
        sc.ParticipantSubSchema(sc.ParticipantWithUserId(user_id=user_id))])
    second = (await t.call(sc.ConversationsApi(t.client()).create_conversation, t.app_id, body)).conversation
    status, body = await upload(t, PNG, "image/png", query=f"access=public&for=message&conversationId={second.id}")
    assert status == 201
    kept_status, kept = await upload(t, PNG, "image/png")  # for no conversation: stays
    assert kept_status == 201
    service = t.system.service("conversations")
    assert len(await stored_keys(t)) == 2
    await t.call(sc.ConversationsApi(t.client()).delete_conversation, t.app_id, second.id)
    async with t.http.get(body["attachment"]["mediaUrl"]) as resp:
        assert resp.status == 404
    assert await service.attachments.sweep(older_than=3600) == 0  # too young to be sure of
    assert await service.attachments.sweep(older_than=0) == 1
    [left] = await stored_keys(t)
    assert left.split("/")[1] in kept["attachment"]["mediaUrl"]
    async with t.http.get(kept["attachment"]["mediaUrl"]) as resp:
        assert resp.status == 200


async def test_a_file_a_message_carries_is_claimed_by_its_conversation(tenant: Tenant) -> None:
    """A customer's file (copied from a platform, or sent from the widget) is in the store before
    its message is: the message claims it for its conversation, and it goes with it."""
    t = tenant
    service = t.system.service("conversations")
    files = service.attachments.files
    token = new_token()
    await put_bytes(files, object_key(t.app_id, token), PNG, "image/png")
    url = attachment_url(t.system.base_url, t.app_id, token, "photo.png")
    async with t.http.get(url) as resp:  # unclaimed: not served
        assert resp.status == 404
    user_id, _default = await new_user_conversation(t, "kim")
    created = sc.ConversationCreateBody(type="personal", participants=[
        sc.ParticipantSubSchema(sc.ParticipantWithUserId(user_id=user_id))])
    conversation_id = (await t.call(sc.ConversationsApi(t.client()).create_conversation, t.app_id,
                                    created)).conversation.id
    status, body = await t.request("POST", f"/v2/apps/{t.app_id}/conversations/{conversation_id}/messages", body={
        "author": {"type": "user", "userId": user_id},
        "content": {"type": "image", "mediaUrl": url, "mediaType": "image/svg+xml"}})
    assert status == 201, body
    async with t.http.get(url) as resp:
        assert resp.status == 200 and await resp.read() == PNG
        # A type a browser would run is never served as such.
        assert resp.headers["Content-Type"] == "application/octet-stream"
        assert resp.headers["Content-Disposition"].startswith("attachment")
    await t.call(sc.ConversationsApi(t.client()).delete_conversation, t.app_id, conversation_id)
    async with t.http.get(url) as resp:
        assert resp.status == 404
    assert await service.attachments.sweep(older_than=0) == 1
    assert await stored_keys(t) == []
