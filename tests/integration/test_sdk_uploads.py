"""Files a customer sends from the web widget (`web`, /sdk) or the app (`app`, /app): the SDK's
`POST …/attachments` streams the file into the object store `conversations` serves from, and an
image or file message with the URL it answered attaches the file to the conversation. Run with
the files on local disk (the data directory every service shares) and SQLite, and in a real
S3-compatible server with PostgreSQL; what is refused runs on disk."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from shared.objectstore import ObjectStoreError
from tests.harness import System, new_postgres_database
from tests.integration.test_app_service import APP_ENV, android_integration
from tests.integration.test_sdk_rich_messages import Customer
from tests.integration.test_web_conversation import ACCOUNT, create_app_with_web
from tests.s3server import S3Server
from threadline.natsserver import NatsServer

PNG = b"\x89PNG\r\n\x1a\n" + b"\x00\x00\x00\rIHDR" + bytes(range(64))
PDF = b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<<>>\nendobj\n%%EOF\n"
# The SDK's own limit, far under the 50 MB of any attachment (and small enough to send quickly).
SDK_LIMIT = 64 * 1024
# Every upload counts against the client's budget, refused ones too: room for the refusals below.
ENV = {**APP_ENV, "THREADLINE_SDK_MAX_UPLOAD_BYTES": str(SDK_LIMIT), "THREADLINE_SDK_UPLOADS_PER_CLIENT": "100/m"}


async def start_stack(system: System, env: dict[str, str] | None = None) -> System:
    await system.start("identity", "conversations", "web", "app", "sandbox", env={**ENV, **(env or {})})
    return system


@pytest.fixture(params=["sqlite-disk", "postgres-s3"])
async def stack(request: pytest.FixtureRequest, nats_server: NatsServer, tmp_path: Path) -> AsyncIterator[System]:
    env: dict[str, str] = {}
    if request.param == "postgres-s3":
        s3: S3Server = request.getfixturevalue("s3_server")
        env = {"THREADLINE_DATABASE_URL": await new_postgres_database(request.getfixturevalue("postgres_server")),
               **s3.environ(s3.new_bucket(), prefix="media")}
    system = System(nats_server.url, tmp_path / "data", env=env)
    try:
        yield await start_stack(system)
    finally:
        await system.close()


@pytest.fixture
async def disk_stack(system: System) -> System:
    return await start_stack(system)


async def new_customer(http: aiohttp.ClientSession, system: System, root: str) -> tuple[Customer, str]:
    """A customer of a new app on `root` (`sdk`: the web widget, `app`: the app) with a pending
    session; and the integration id."""
    app_id, web_id = await create_app_with_web(http, system.base_url)
    integration_id = web_id if root == "sdk" else (await android_integration(http, system.base_url, app_id))["id"]
    customer = Customer(http, system.base_url, root, app_id)
    async with http.post(f"{customer.sdk}/integrations/{integration_id}/sessions") as resp:
        assert resp.status == 201, await resp.text()
        customer.session = await resp.json()
    return customer, integration_id


async def upload(customer: Customer, data: bytes, media_type: str, filename: str = "photo.png", *,
                 field: str = "source", headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
    form = aiohttp.FormData()
    form.add_field(field, data, filename=filename, content_type=media_type)
    async with customer.http.post(f"{customer.sdk}/attachments", data=form,
                                  headers=customer.auth if headers is None else headers) as resp:
        return resp.status, await resp.json()


async def served(http: aiohttp.ClientSession, url: str) -> tuple[int, bytes, str]:
    async with http.get(url) as resp:
        return resp.status, await resp.read(), resp.headers.get("Content-Type", "")


async def stored_keys(system: System, app_id: str) -> list[str]:
    files = system.service("web").files
    return sorted([key async for batch in files.older_than(f"{app_id}/", float("inf")) for key in batch])


@pytest.mark.parametrize("root", ["sdk", "app"])
async def test_a_customer_sends_an_image_and_a_file(stack: System, root: str) -> None:
    async with aiohttp.ClientSession() as http:
        customer, _integration_id = await new_customer(http, stack, root)
        # A pending session may upload: its first message may be the picture.
        status, body = await upload(customer, PNG, "image/png", "../../My photo.png")
        assert status == 201, body
        image = body["attachment"]
        assert image["mediaType"] == "image/png"
        assert image["mediaUrl"].startswith(f"{stack.base_url}/attachments/v1/{customer.app_id}/")
        assert image["mediaUrl"].endswith("/My%20photo.png")
        # Kept, but served only once a message of the conversation carries it.
        assert len(await stored_keys(stack, customer.app_id)) == 1
        assert (await served(http, image["mediaUrl"]))[0] == 404

        first: dict[str, Any] = {"image": {**image, "altText": "My photo.png"}}
        if root == "app":
            first["device"] = {"guid": "install-1", "appVersion": "1.0"}
        async with http.post(f"{customer.sdk}/conversations", headers=customer.auth,
                             json={"clientMessageId": str(uuid.uuid4()), **first}) as resp:
            assert resp.status == 201, await resp.text()
            customer.session = await resp.json()
        [sent] = await customer.history(1)
        assert sent["author"]["type"] == "user"
        assert sent["content"] == {"type": "image", "mediaUrl": image["mediaUrl"], "mediaType": "image/png",
                                   "altText": "My photo.png"}
        # conversations serves what web or app stored: the same bytes, as what they are.
        assert await served(http, image["mediaUrl"]) == (200, PNG, "image/png")

        # A document, with a caption, in the started conversation.
        status, body = await upload(customer, PDF, "application/pdf", "invoice.pdf")
        assert status == 201, body
        document = body["attachment"]
        await customer.post({"text": "my invoice", "file": {**document, "altText": "invoice.pdf"}})
        history = await customer.history(2)
        assert history[1]["content"] == {"type": "file", "mediaUrl": document["mediaUrl"],
                                         "mediaType": "application/pdf", "altText": "invoice.pdf",
                                         "text": "my invoice"}
        async with http.get(document["mediaUrl"]) as resp:
            assert resp.status == 200 and await resp.read() == PDF
            assert resp.headers["Content-Disposition"].startswith("attachment")
        # The business reads the same history.
        async with http.get(f"{stack.base_url}/v2/apps/{customer.app_id}/conversations/"
                            f"{customer.session['conversationId']}/messages",
                            headers=ACCOUNT) as resp:
            assert resp.status == 200, await resp.text()
            contents = [m["content"] for m in (await resp.json())["messages"]]
        assert [(c["type"], c["mediaUrl"]) for c in contents] == [("image", image["mediaUrl"]),
                                                                  ("file", document["mediaUrl"])]


@pytest.mark.parametrize("root", ["sdk", "app"])
async def test_what_an_upload_may_not_be(disk_stack: System, root: str) -> None:
    stack = disk_stack
    async with aiohttp.ClientSession() as http:
        customer, _integration_id = await new_customer(http, stack, root)
        for data, media_type, filename, expected, why in (
                (b"<html><script>alert(1)</script></html>", "text/html", "x.html", 415, "text/html"),
                (b"<svg onload=alert(1)></svg>", "image/svg+xml", "x.svg", 415, "image/svg+xml"),
                (b"<html>not a png at all</html>", "image/png", "fake.png", 400, "not a image/png"),
                (b"", "image/png", "empty.png", 400, "empty"),
                (PNG + b"\x00" * SDK_LIMIT, "image/png", "huge.png", 413, "at most 64 KB"),
                # Declared far larger than the limit: refused before it is read.
                (PNG + b"\x00" * 4 * SDK_LIMIT, "image/png", "huger.png", 413, "at most 64 KB")):
            status, body = await upload(customer, data, media_type, filename)
            assert status == expected, (media_type, body)
            assert why in body["errors"][0]["title"], body
        # Larger than the limit, sent in pieces of unknown total length: refused as it streams in.
        async def pieces() -> AsyncIterator[bytes]:
            yield PNG
            for _ in range(4):
                yield b"\x00" * SDK_LIMIT

        with aiohttp.MultipartWriter("form-data") as writer:
            part = writer.append(pieces(), {"Content-Type": "image/png"})
            part.set_content_disposition("form-data", name="source", filename="stream.png")
        async with http.post(f"{customer.sdk}/attachments", data=writer, headers=customer.auth) as resp:
            assert resp.status == 413, await resp.text()
            assert resp.request_info.headers.get("Content-Length") is None  # it was chunked
        # No `source`, no multipart.
        status, body = await upload(customer, PNG, "image/png", field="file")
        assert status == 400 and "`source`" in body["errors"][0]["title"]
        async with http.post(f"{customer.sdk}/attachments", headers=customer.auth, json={"source": "x"}) as resp:
            assert resp.status == 415
        for content_type in ("multipart/form-data", "multipart/form-data; boundary=xyz"):
            async with http.post(f"{customer.sdk}/attachments", data=b"garbage",
                                 headers={**customer.auth, "Content-Type": content_type}) as resp:
                assert resp.status == 400 and "Malformed" in (await resp.json())["errors"][0]["title"]
        # No session, a forged one, another app's.
        assert (await upload(customer, PNG, "image/png", headers={}))[0] == 401
        assert (await upload(customer, PNG, "image/png", headers={"Authorization": "Bearer forged"}))[0] == 401
        other, _ = await new_customer(http, stack, root)
        status, body = await upload(other, PNG, "image/png", headers=customer.auth)
        assert status == 401, body
        # Nothing was kept of any of them.
        assert await stored_keys(stack, customer.app_id) == []
        assert await stored_keys(stack, other.app_id) == []


async def test_a_web_integration_takes_uploads_from_its_own_sites_only(disk_stack: System) -> None:
    async with aiohttp.ClientSession() as http:
        app_id, web_id = await create_app_with_web(http, disk_stack.base_url, originWhitelist=["https://shop.example"])
        customer = Customer(http, disk_stack.base_url, "sdk", app_id)
        shop = {"Origin": "https://shop.example"}
        async with http.post(f"{customer.sdk}/integrations/{web_id}/sessions", headers=shop) as resp:
            assert resp.status == 201, await resp.text()
            customer.session = await resp.json()
        status, body = await upload(customer, PNG, "image/png", headers={**customer.auth, "Origin": "https://evil.example"})
        assert status == 403, body
        assert await stored_keys(disk_stack, app_id) == []
        status, body = await upload(customer, PNG, "image/png", headers={**customer.auth, **shop})
        assert status == 201, body


async def test_a_message_carries_only_its_apps_uploads(disk_stack: System) -> None:
    stack = disk_stack
    async with aiohttp.ClientSession() as http:
        customer, integration_id = await new_customer(http, stack, "sdk")
        await customer.start(integration_id, {"text": "hi"})
        status, body = await upload(customer, PNG, "image/png")
        assert status == 201
        url = body["attachment"]["mediaUrl"]
        other, other_integration = await new_customer(http, stack, "sdk")
        await other.start(other_integration, {"text": "hello"})
        status, body = await upload(other, PNG, "image/png")
        foreign = body["attachment"]["mediaUrl"]
        for media, why in (
                ({"mediaUrl": "https://example.com/cat.png", "mediaType": "image/png"}, "mediaUrl"),
                ({"mediaUrl": foreign, "mediaType": "image/png"}, "mediaUrl"),  # another app's
                ({"mediaUrl": url + "?x=1", "mediaType": "image/png"}, "mediaUrl"),
                ({"mediaUrl": url.rsplit("/", 1)[0] + "/..", "mediaType": "image/png"}, "mediaUrl"),
                ({"mediaUrl": url, "mediaType": "text/html"}, "mediaType"),
                ({"mediaUrl": url, "mediaType": "application/pdf"}, "image/"),  # an image is an image
                ({"mediaUrl": url, "mediaType": "image/png", "altText": "x" * 513}, "altText")):
            async with http.post(f"{customer.sdk}/conversations/{customer.session['conversationId']}/messages",
                                 headers=customer.auth,
                                 json={"clientMessageId": str(uuid.uuid4()), "image": media}) as resp:
                assert resp.status == 400, media
                assert why in (await resp.json())["errors"][0]["title"], media
        both = {"clientMessageId": str(uuid.uuid4()), "location": {"lat": 1, "long": 2},
                "image": {"mediaUrl": url, "mediaType": "image/png"}}
        async with http.post(f"{customer.sdk}/conversations/{customer.session['conversationId']}/messages",
                             headers=customer.auth, json=both) as resp:
            assert resp.status == 400 and "not location and image" in (await resp.json())["errors"][0]["title"]
        # None of it reached the conversation, and the file is still unclaimed.
        assert [m["content"]["text"] for m in await customer.history(1)] == ["hi"]
        assert (await served(http, url))[0] == 404


async def test_uploads_are_limited_per_client_and_wait_for_the_store(system: System) -> None:
    stack = await start_stack(system, {"THREADLINE_SDK_UPLOADS_PER_CLIENT": "2/h"})
    async with aiohttp.ClientSession() as http:
        customer, _ = await new_customer(http, stack, "sdk")
        for _ in range(2):
            assert (await upload(customer, PNG, "image/png"))[0] == 201
        form = aiohttp.FormData()
        form.add_field("source", PNG, filename="third.png", content_type="image/png")
        async with http.post(f"{customer.sdk}/attachments", headers=customer.auth, data=form) as resp:
            assert resp.status == 429 and int(resp.headers["Retry-After"]) > 0
            assert (await resp.json())["errors"][0]["code"] == "too_many_requests"
        # Another client of the app has its own budget; with the store down, a 503.
        second, _ = await new_customer(http, stack, "sdk")

        class Unavailable:
            async def put(self, key: str, chunks: AsyncIterator[bytes], media_type: str) -> int:
                async for _chunk in chunks:
                    raise ObjectStoreError("the bucket is unreachable")
                return 0

        stack.service("web").files = Unavailable()
        status, body = await upload(second, PNG, "image/png")
        assert status == 503 and "unavailable" in body["errors"][0]["title"]

