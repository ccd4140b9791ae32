"""Create (or find again) the sandbox app, its key and integrations through the business API."""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import dataclass
from typing import Any

import aiohttp

from shared.http import basic_auth_header

SANDBOX_PHONE_NUMBER = "+15550001111"
SANDBOX_PHONE_NUMBER_ID = "1122334455667"


@dataclass(frozen=True)
class AccountKey:
    key_id: str
    secret: str


class BootstrapError(RuntimeError):
    """The business API refused a bootstrap call."""


async def _call(session: aiohttp.ClientSession, method: str, url: str, auth: dict[str, str],
                body: dict[str, Any] | None = None) -> tuple[int, dict[str, Any]]:
    async with session.request(method, url, json=body, headers=auth) as resp:
        data = await resp.json(content_type=None) if resp.content_length != 0 else {}
        return resp.status, data or {}


async def bootstrap_sandbox(base_url: str, account: AccountKey, data_dir: str) -> dict[str, Any]:
    """Ensure the sandbox app exists and return the contents of `<data_dir>/sandbox.json`.

    A second run finds the app recorded in sandbox.json and keeps it (history survives).
    """
    path = os.path.join(data_dir, "sandbox.json")
    auth = basic_auth_header(account.key_id, account.secret)
    async with aiohttp.ClientSession() as session:
        if os.path.exists(path):
            with open(path) as fh:
                existing: dict[str, Any] = json.load(fh)
            status, _ = await _call(session, "GET", f"{base_url}/v2/apps/{existing['appId']}", auth)
            if status == 200:
                existing["baseUrl"] = base_url
                _write(path, existing)
                return existing
        status, body = await _call(session, "POST", f"{base_url}/v2/apps", auth, {"displayName": "Sandbox"})
        if status != 201:
            raise BootstrapError(f"create app: {status} {body}")
        app_id = body["app"]["id"]
        status, body = await _call(session, "POST", f"{base_url}/v2/apps/{app_id}/keys", auth,
                                   {"displayName": "Sandbox key"})
        if status != 201:
            raise BootstrapError(f"create key: {status} {body}")
        key = body["key"]
        status, body = await _call(session, "POST", f"{base_url}/v2/apps/{app_id}/integrations", auth, {
            "type": "web", "displayName": "Web messenger", "businessName": "Threadline Demo Shop",
            "brandColor": "2b6cb0",
        })
        if status != 201:
            raise BootstrapError(f"create web integration: {status} {body}")
        web_id = body["integration"]["id"]
        whatsapp = {
            "phoneNumber": SANDBOX_PHONE_NUMBER,
            "phoneNumberId": SANDBOX_PHONE_NUMBER_ID,
            "accessToken": "EAA" + secrets.token_urlsafe(24),
            "appSecret": secrets.token_hex(16),
            "verifyToken": secrets.token_urlsafe(12),
            "apiVersion": "v23.0",
            "baseUrl": f"{base_url}/sandbox/graph",
        }
        status, body = await _call(session, "POST", f"{base_url}/v2/apps/{app_id}/integrations", auth,
                                   {"type": "whatsapp", "displayName": "WhatsApp (sandbox)", **whatsapp})
        if status != 201:
            raise BootstrapError(f"create whatsapp integration: {status} {body}")
        whatsapp_id = body["integration"]["id"]
    info: dict[str, Any] = {
        "baseUrl": base_url,
        "appId": app_id,
        "apiKey": {"id": key["id"], "secret": key["secret"]},
        "integrations": {
            "web": {"id": web_id},
            "whatsapp": {"id": whatsapp_id, **whatsapp,
                         "webhookUrl": f"{base_url}/webhooks/whatsapp/{whatsapp_id}"},
        },
    }
    _write(path, info)
    return info


def _write(path: str, info: dict[str, Any]) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as fh:
        json.dump(info, fh, indent=2)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)
