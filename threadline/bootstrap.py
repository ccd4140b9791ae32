"""Create (or find again) the sandbox app, its key and integrations through the business API."""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import dataclass
from typing import Any

import aiohttp
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from shared.files import private_dir, write_private
from shared.http import basic_auth_header
from shared.routes import SANDBOX_SMTP_PORT

SANDBOX_PHONE_NUMBER = "+15550001111"
SANDBOX_PHONE_NUMBER_ID = "1122334455667"
SANDBOX_SMS_NUMBER = "+15550002222"
SANDBOX_PAGE_ID = "102290129340398"
SANDBOX_FCM_PROJECT = "threadline-sandbox"
SANDBOX_BUNDLE_ID = "com.threadline.demo"
SANDBOX_MAIL_FROM = "notifications@demo-shop.threadline.test"
SANDBOX_MAIL_INBOX = "support@demo-shop.threadline.test"


def _pem(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> str:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption()).decode()


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


def sandbox_integrations(base_url: str) -> dict[str, dict[str, Any]]:
    """The body of each sandbox integration (credentials are made up; the fakes accept them)."""
    return {
        "web": {"type": "web", "displayName": "Web messenger", "businessName": "Threadline Demo Shop",
                "brandColor": "2b6cb0"},
        "whatsapp": {
            "type": "whatsapp", "displayName": "WhatsApp (sandbox)", "phoneNumber": SANDBOX_PHONE_NUMBER,
            "phoneNumberId": SANDBOX_PHONE_NUMBER_ID, "accessToken": "EAA" + secrets.token_urlsafe(24),
            "appSecret": secrets.token_hex(16), "verifyToken": secrets.token_urlsafe(12), "apiVersion": "v23.0",
            "baseUrl": f"{base_url}/sandbox/graph",
        },
        "messenger": {
            "type": "messenger", "displayName": "Messenger (sandbox)", "appId": "5551212", "pageId": SANDBOX_PAGE_ID,
            "pageName": "Threadline Demo Shop", "pageAccessToken": "EAAG" + secrets.token_urlsafe(24),
            "appSecret": secrets.token_hex(16), "verifyToken": secrets.token_urlsafe(12), "apiVersion": "v23.0",
            "baseUrl": f"{base_url}/sandbox/messenger-graph",
        },
        "telegram": {
            "type": "telegram", "displayName": "Telegram (sandbox)", "username": "threadline_demo_bot",
            "token": f"{secrets.randbelow(10**9) + 10**9}:{secrets.token_urlsafe(26)}",
            "baseUrl": f"{base_url}/sandbox/telegram-api",
        },
        "twilio": {
            "type": "twilio", "displayName": "SMS (sandbox)", "accountSid": "AC" + secrets.token_hex(16),
            "authToken": secrets.token_hex(16), "phoneNumber": SANDBOX_SMS_NUMBER,
            "baseUrl": f"{base_url}/sandbox/twilio-api",
        },
        # Push credentials are real keys (the fakes verify the signed JWTs), made up per data dir.
        "android": {
            "type": "android", "displayName": "Threadline Demo Shop", "projectId": SANDBOX_FCM_PROJECT,
            "clientEmail": f"threadline@{SANDBOX_FCM_PROJECT}.iam.gserviceaccount.com",
            "privateKey": _pem(rsa.generate_private_key(public_exponent=65537, key_size=2048)),
            "tokenUri": f"{base_url}/sandbox/google-oauth/token", "baseUrl": f"{base_url}/sandbox/fcm",
        },
        "ios": {
            "type": "ios", "displayName": "Threadline Demo Shop", "keyId": secrets.token_hex(5).upper(),
            "teamId": secrets.token_hex(5).upper(), "bundleId": SANDBOX_BUNDLE_ID,
            "signingKey": _pem(ec.generate_private_key(ec.SECP256R1())), "baseUrl": f"{base_url}/sandbox/apns",
        },
        # E-mail notifications go to the sandbox's SMTP sink (its port is asked at bootstrap). The
        # kind stays `email` (sandbox.json's key); the integration is SunCo's e-mail type, `mailgun`.
        "email": {
            "type": "mailgun", "displayName": "E-mail (sandbox)", "smtpHost": "127.0.0.1",
            "smtpPort": SANDBOX_SMTP_PORT,
            "security": "none", "fromAddress": SANDBOX_MAIL_FROM, "fromName": "Threadline Demo Shop",
            # Where customers write; replies to any mail of a conversation go to reply+…@ its domain.
            "incomingAddress": SANDBOX_MAIL_INBOX,
        },
    }


async def sandbox_smtp_server(session: aiohttp.ClientSession, base_url: str) -> tuple[str, int] | None:
    """(host, port) the sandbox's SMTP sink listens on, or None when it does not (yet)."""
    try:
        async with session.get(f"{base_url}/sandbox/mail/server") as resp:
            if resp.status != 200:
                return None
            info = await resp.json()
    except (aiohttp.ClientError, ValueError):
        return None
    port = info.get("port") if isinstance(info, dict) else None
    if not isinstance(port, int) or not port:
        return None
    host = str(info.get("host") or "")
    return ("127.0.0.1" if host in ("", "0.0.0.0", "::") else host), port


async def bootstrap_sandbox(base_url: str, account: AccountKey, data_dir: str,
                            kinds: tuple[str, ...] = ("web", "whatsapp"), *, desk: bool = False) -> dict[str, Any]:
    """Ensure the sandbox app and one integration of each of `kinds` exist; return sandbox.json.

    With `desk`, the app's switchboard (created when it has none) has the agent desk as its default
    member, so every new conversation shows up in the desk (`make up`'s "Reply as the business").

    A second run finds the app recorded in `<data_dir>/sandbox.json` and keeps it (history
    survives); integrations missing from the file (a newer version added a channel) are created.
    """
    path = os.path.join(data_dir, "sandbox.json")
    auth = basic_auth_header(account.key_id, account.secret)
    info: dict[str, Any] = {}
    async with aiohttp.ClientSession() as session:
        if os.path.exists(path):
            with open(path) as fh:
                info = json.load(fh)
            status, _ = await _call(session, "GET", f"{base_url}/v2/apps/{info.get('appId')}", auth)
            if status != 200:
                info = {}
        if not info:
            status, body = await _call(session, "POST", f"{base_url}/v2/apps", auth, {"displayName": "Sandbox"})
            if status != 201:
                raise BootstrapError(f"create app: {status} {body}")
            app_id = body["app"]["id"]
            status, body = await _call(session, "POST", f"{base_url}/v2/apps/{app_id}/keys", auth,
                                       {"displayName": "Sandbox key"})
            if status != 201:
                raise BootstrapError(f"create key: {status} {body}")
            info = {"appId": app_id, "apiKey": {"id": body["key"]["id"], "secret": body["key"]["secret"]},
                    "integrations": {}}
        info["baseUrl"] = base_url
        bodies = sandbox_integrations(base_url)
        for kind in kinds:
            if kind in info["integrations"]:
                if kind == "email":
                    await _follow_smtp_sink(session, base_url, auth, info)
                continue
            if kind == "email":
                smtp = await sandbox_smtp_server(session, base_url)
                if smtp is not None:
                    bodies[kind] = {**bodies[kind], "smtpHost": smtp[0], "smtpPort": smtp[1]}
            status, body = await _call(session, "POST", f"{base_url}/v2/apps/{info['appId']}/integrations", auth,
                                       bodies[kind])
            if status != 201:
                raise BootstrapError(f"create {kind} integration: {status} {body}")
            integration_id = body["integration"]["id"]
            entry = {k: v for k, v in bodies[kind].items() if k not in ("type", "displayName")}
            webhook_path = "twilio" if kind == "twilio" else kind
            if kind not in ("web", "android", "ios"):
                entry["webhookUrl"] = f"{base_url}/webhooks/{webhook_path}/{integration_id}"
            info["integrations"][kind] = {"id": integration_id, **entry}
        if desk:
            await _desk_switchboard(session, base_url, auth, info)
    _write(path, info)
    return info


async def _desk_switchboard(session: aiohttp.ClientSession, base_url: str, auth: dict[str, str],
                            info: dict[str, Any]) -> None:
    """The app's switchboard with the desk as default member (left alone when the app has one)."""
    switchboards = f"{base_url}/v2/apps/{info['appId']}/switchboards"
    status, body = await _call(session, "GET", switchboards, auth)
    if status != 200:
        raise BootstrapError(f"list switchboards: {status} {body}")
    if body["switchboards"]:
        info["switchboardId"] = body["switchboards"][0]["id"]
        return
    status, body = await _call(session, "POST", switchboards, auth)
    if status != 201:
        raise BootstrapError(f"create switchboard: {status} {body}")
    switchboard_id = body["switchboard"]["id"]
    status, body = await _call(session, "POST", f"{switchboards}/{switchboard_id}/switchboardIntegrations", auth,
                               {"name": "desk", "integrationType": "desk"})
    if status != 201:
        raise BootstrapError(f"add the desk to the switchboard: {status} {body}")
    member_id = body["switchboardIntegration"]["id"]
    status, body = await _call(session, "PATCH", f"{switchboards}/{switchboard_id}", auth,
                               {"enabled": True, "defaultSwitchboardIntegrationId": member_id})
    if status != 200:
        raise BootstrapError(f"enable the switchboard: {status} {body}")
    info["switchboardId"] = switchboard_id


async def _follow_smtp_sink(session: aiohttp.ClientSession, base_url: str, auth: dict[str, str],
                            info: dict[str, Any]) -> None:
    """Point the sandbox `email` integration at the sink's port of this run (it may differ)."""
    smtp = await sandbox_smtp_server(session, base_url)
    entry = info["integrations"]["email"]
    if smtp is None or (entry.get("smtpHost"), entry.get("smtpPort")) == smtp:
        return
    status, body = await _call(session, "PATCH", f"{base_url}/v2/apps/{info['appId']}/integrations/{entry['id']}",
                               auth, {"smtpHost": smtp[0], "smtpPort": smtp[1]})
    if status != 200:
        raise BootstrapError(f"update email integration: {status} {body}")
    entry.update(smtpHost=smtp[0], smtpPort=smtp[1])


def _write(path: str, info: dict[str, Any]) -> None:
    private_dir(os.path.dirname(path))
    write_private(path, json.dumps(info, indent=2))
