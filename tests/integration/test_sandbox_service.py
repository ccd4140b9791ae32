"""The sandbox service: accounts from the integrations KV, the demo page, the scripting API over HTTP."""

from __future__ import annotations

import json
import os
from pathlib import Path

import httpx
import pytest

from services.sandbox.app import create
from shared import records, subjects
from shared.bus import Bus
from shared.config import ConfigError
from tests.fakes.whatsapp import FakeWhatsApp
from tests.fakes.whatsapp_env import CUSTOMER, eventually, start_whatsapp, whatsapp_record
from tests.harness import System
from tests.integration.test_sandbox_channel_persistence import channel_records


async def test_page_loads_widget_with_ids_from_sandbox_json(system: System, bus: Bus) -> None:
    wa = await start_whatsapp(system, bus)
    async with httpx.AsyncClient(base_url=system.base_url) as http:
        empty = await http.get("/sandbox/")
        assert empty.status_code == 200
        assert empty.text.count('<script src="/widget/threadline.js"></script>') == 1
        assert '"appId": null' in empty.text
        Path(system.data_dir).mkdir(parents=True, exist_ok=True)
        (Path(system.data_dir) / "sandbox.json").write_text(json.dumps({
            "appId": "app</script>1", "integrations": {"web": {"id": "web-int-1"},
                                                       "whatsapp": {"id": wa.integration_id}}}))
        page = await http.get("/sandbox/")  # read per request: no restart needed
        assert "Threadline.init({appId, integrationId, baseUrl: location.origin})" in page.text
        assert '"webIntegrationId": "web-int-1"' in page.text
        assert "app</script>1" not in page.text and "app\\u003c/script\\u003e1" in page.text
        assert '"whatsappNumber": "+15550001111"' in page.text
        config = (await http.get("/sandbox/config.json")).json()
        assert config["whatsappIntegrationId"] == wa.integration_id
        script = await http.get("/sandbox/static/phone.js")
        assert script.status_code == 200 and "/inbound" in script.text
        redirect = await http.get(f"{system.service_url('sandbox')}/sandbox", follow_redirects=False)
        assert redirect.status_code == 302 and redirect.headers["location"] == "/sandbox/"


async def test_accounts_follow_the_integrations_bucket(system: System, bus: Bus) -> None:
    wa = await start_whatsapp(system, bus)
    kv = await bus.key_value(subjects.INTEGRATIONS_BUCKET)
    real = whatsapp_record(system.base_url, baseUrl="https://graph.facebook.com", phoneNumberId="999")
    await kv.put(real.id, records.ENCODER.encode(real))

    async def mirrored() -> bool:
        return wa.sandbox.integrations is not None and wa.sandbox.integrations.get(real.id) is not None

    await eventually(mirrored)
    async with httpx.AsyncClient(base_url=f"{system.base_url}/sandbox/whatsapp") as http:
        assert (await http.get(f"/{wa.integration_id}")).json()["webhookUrl"] == wa.webhook_url
        assert (await http.get(f"/{real.id}")).status_code == 404  # not ours to fake
        await kv.delete(wa.integration_id)

        async def gone() -> bool:
            return (await http.get(f"/{wa.integration_id}")).status_code == 404

        await eventually(gone)


async def test_outbox_over_http_matches_with_or_without_plus(system: System, bus: Bus) -> None:
    wa = await start_whatsapp(system, bus)
    async with httpx.AsyncClient(base_url=system.base_url) as http:
        sent = await http.post(f"/sandbox/graph/v23.0/{wa.record.config['phoneNumberId']}/messages",
                               headers={"Authorization": f"Bearer {wa.record.config['accessToken']}"},
                               json={"messaging_product": "whatsapp", "to": "15551234567", "type": "text",
                                     "text": {"body": "hello"}})
        assert sent.status_code == 200
        assert sent.json()["contacts"] == [{"input": "15551234567", "wa_id": "15551234567"}]
        outbox_url = f"/sandbox/whatsapp/{wa.integration_id}/outbox"
        for to in (CUSTOMER, "15551234567"):
            box = (await http.get(outbox_url, params={"to": to})).json()
            assert box == {"messages": [{"messaging_product": "whatsapp", "to": "15551234567", "type": "text",
                                         "text": {"body": "hello"}}]}
        assert (await http.get(outbox_url, params={"to": "+15550000000"})).json() == {"messages": []}
        unauthorized = await http.post(f"/sandbox/graph/v23.0/{wa.record.config['phoneNumberId']}/messages",
                                       json={"messaging_product": "whatsapp", "to": "1", "type": "text",
                                             "text": {"body": "x"}})
        assert unauthorized.status_code == 401 and unauthorized.json()["error"]["code"] == 190


def test_sandbox_refuses_to_run_outside_sandbox_mode() -> None:
    with pytest.raises(ConfigError):
        create({"THREADLINE_SANDBOX": "0"})


async def test_phone_threads_survive_a_sandbox_restart(system: System, bus: Bus) -> None:
    wa = await start_whatsapp(system, bus)
    async with httpx.AsyncClient(base_url=system.base_url) as http:
        sent = await http.post(f"/sandbox/graph/v23.0/{wa.record.config['phoneNumberId']}/messages",
                               headers={"Authorization": f"Bearer {wa.record.config['accessToken']}"},
                               json={"messaging_product": "whatsapp", "to": "15551234567", "type": "text",
                                     "text": {"body": "kept across restarts"}})
        assert sent.status_code == 200
        await wa.script("/inbound", {"from": CUSTOMER, "name": "Ada", "text": "hi from the phone"})
        await wa.fake.drain()
        before = (await http.get(f"/sandbox/whatsapp/{wa.integration_id}/thread", params={"to": CUSTOMER})).json()
        assert [m["direction"] for m in before["messages"]] == ["out", "in"]
        assert before["messages"][0]["status"] == "delivered"
        assert (Path(system.data_dir) / "sandbox-whatsapp.jsonl").is_file()

        await system.restart_service("sandbox")
        assert wa.sandbox.fake is not None
        wa.sandbox.sync_accounts()

        async def reloaded() -> dict[str, object] | None:
            resp = await http.get(f"/sandbox/whatsapp/{wa.integration_id}/thread", params={"to": CUSTOMER})
            return resp.json() if resp.status_code == 200 else None

        after = await eventually(reloaded)
        assert after["messages"] == before["messages"]
        assert after["customer"] == {"number": "15551234567", "bsuid": before["customer"]["bsuid"], "name": "Ada"}
        outbox = (await http.get(f"/sandbox/whatsapp/{wa.integration_id}/outbox", params={"to": CUSTOMER})).json()
        assert [m["text"]["body"] for m in outbox["messages"]] == ["kept across restarts"]


def test_fake_journal_skips_a_torn_line_and_compacts(tmp_path: Path) -> None:
    path = tmp_path / "wa.jsonl"
    fake = FakeWhatsApp(store_path=str(path))
    fake.customer("+15551234567", "Ada")
    fake.customer("+15551234567", "Ada Lovelace")
    assert len(path.read_text().splitlines()) == 2
    with path.open("a") as fh:
        fh.write('{"kind": "entry", "integrationId": "i1"')  # a crash mid-write
    again = FakeWhatsApp(store_path=str(path))
    assert again.customers["15551234567"].name == "Ada Lovelace"
    assert len(path.read_text().splitlines()) == 1  # compacted to the live record
    assert FakeWhatsApp().store_path is None  # memory only by default


async def test_scripting_errors_use_the_sunco_shape(system: System, bus: Bus) -> None:
    wa = await start_whatsapp(system, bus)
    async with httpx.AsyncClient(base_url=f"{system.base_url}/sandbox/whatsapp") as http:
        unknown = await http.get("/nope/thread", params={"to": CUSTOMER})
        assert unknown.status_code == 404
        assert unknown.json() == {"errors": [{"code": "not_found",
                                              "title": "Unknown WhatsApp integration in the sandbox"}]}
        bad = await http.post(f"/{wa.integration_id}/inbound", content=b"[1]")
        assert bad.status_code == 400
        assert bad.json() == {"errors": [{"code": "bad_request", "title": "body must be a JSON object"}]}
        missing = await http.get(f"/{wa.integration_id}/outbox")
        assert missing.status_code == 400 and missing.json()["errors"][0]["title"] == "need ?to="


async def test_page_is_branded_with_the_web_integration_business_name(system: System, bus: Bus) -> None:
    await start_whatsapp(system, bus)
    web = records.IntegrationRecord(id="web-int-2", app_id="app-2", type="web", display_name="Web",
                                    config={"businessName": "Acme <Tea>"})
    kv = await bus.key_value(subjects.INTEGRATIONS_BUCKET)
    await kv.put(web.id, records.ENCODER.encode(web))
    Path(system.data_dir).mkdir(parents=True, exist_ok=True)
    (Path(system.data_dir) / "sandbox.json").write_text(json.dumps({
        "baseUrl": system.base_url, "appId": "app-2", "apiKey": {"id": "app_key1", "secret": "s3cret-value"},
        "integrations": {"web": {"id": web.id}}}))
    async with httpx.AsyncClient(base_url=system.base_url) as http:

        async def branded() -> str | None:
            page = (await http.get("/sandbox/")).text
            return page if "Acme &lt;Tea&gt;" in page else None

        page = await eventually(branded)
        assert "Northwind" not in page and "Continue on WhatsApp" not in page
        assert "<title>Acme &lt;Tea&gt; — Threadline sandbox</title>" in page
        config = (await http.get("/sandbox/config.json")).json()
        assert config["businessName"] == "Acme <Tea>"
        assert config["keyId"] == "app_key1" and config["baseUrl"] == system.base_url
        assert config["sandboxFile"] == os.path.abspath(os.path.join(system.data_dir, "sandbox.json"))
        assert "s3cret-value" not in page  # the key secret never reaches the unauthenticated page


async def test_page_lists_one_phone_per_channel_in_sandbox_json_without_secrets(system: System, bus: Bus) -> None:
    wa = await start_whatsapp(system, bus)
    messenger, telegram, twilio = channel_records(system.base_url)
    Path(system.data_dir).mkdir(parents=True, exist_ok=True)
    integrations = {"whatsapp": {"id": wa.integration_id, **wa.record.config},
                    "telegram": {"id": telegram.id, **telegram.config},
                    "twilio": {"id": twilio.id, **twilio.config}}
    (Path(system.data_dir) / "sandbox.json").write_text(json.dumps({"integrations": integrations}))
    async with httpx.AsyncClient(base_url=system.base_url) as http:
        config = (await http.get("/sandbox/config.json")).json()
        assert config["channels"] == [
            {"kind": "whatsapp", "integrationId": wa.integration_id, "number": "+15550001111"},
            {"kind": "telegram", "integrationId": telegram.id, "username": "threadline_demo_bot"},
            {"kind": "twilio", "integrationId": twilio.id, "number": "+15550002222"},
        ]  # no messenger: it is not in sandbox.json
        integrations["messenger"] = {"id": messenger.id, **messenger.config}
        (Path(system.data_dir) / "sandbox.json").write_text(json.dumps({"integrations": integrations}))
        page = (await http.get("/sandbox/")).text
        assert f'"kind": "messenger", "integrationId": "{messenger.id}"' in page
        for secret in (wa.record.config["accessToken"], wa.record.config["appSecret"], messenger.config["appSecret"],
                       messenger.config["pageAccessToken"], telegram.config["token"], twilio.config["authToken"]):
            assert secret not in page
