"""The OpenAPI 3 document of the business API, generated from the operations table and the
msgspec structs that define the bodies (no hand-written schema literal)."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import msgspec
from aiohttp import web

from services.conversations import models

Scope = Literal["account", "app", "public"]
# An unbound method of the API's handler class, called with the instance and the request.
HandlerFn = Callable[[Any, web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True)
class Operation:
    """One API operation: routing, auth scope and its OpenAPI description."""

    method: str
    path: str
    operation_id: str
    tag: str
    summary: str
    handler: HandlerFn
    status: int = 200
    scope: Scope = "app"
    request: type[Any] | None = None
    response: type[Any] | None = None
    query: tuple[str, ...] = ()

REF_TEMPLATE = "#/components/schemas/{name}"
_PATH_PARAM = re.compile(r"{([^}]+)}")

QUERY_PARAMETERS: dict[str, dict[str, Any]] = {
    "page": {
        "name": "page", "in": "query", "required": False, "style": "deepObject", "explode": True,
        "description": "Cursor paging: `page[after]`, `page[before]` (24-char ids; the app-wide conversation "
                       "listing's are opaque 24-char cursors: take them from `meta` or `links`), `page[size]` "
                       "(1-100). URL-encoded JSON (`page={\"after\":\"...\"}`) is accepted too.",
        "schema": {"type": "object", "properties": {
            "after": {"type": "string", "minLength": 24, "maxLength": 24},
            "before": {"type": "string", "minLength": 24, "maxLength": 24},
            "size": {"type": "integer", "minimum": 1, "maximum": 100}}},
    },
    "filter": {
        "name": "filter", "in": "query", "required": False, "style": "deepObject", "explode": True,
        "description": "`filter[userId]`, `filter[userExternalId]` (conversations) or `filter[types]` "
                       "(integrations, comma-separated). URL-encoded JSON is accepted too.",
        "schema": {"type": "object", "additionalProperties": {"type": "string"}},
    },
    "conversationFilter": {
        "name": "filter", "in": "query", "required": False, "style": "deepObject", "explode": True,
        "description": "`filter[userId]` or `filter[userExternalId]`: the user's conversations, oldest first "
                       "(SunCo). Without them: every conversation of the app, most recent activity "
                       "(`lastUpdatedAt`) first (Threadline). Either narrowed by (Threadline): `type` "
                       "(personal, sdkGroup), `activeSwitchboardIntegrationId` (a member of the app's switchboard), "
                       "`activeSwitchboardIntegrationType` (e.g. `desk`: the conversations such a member controls), "
                       "`channel` (an integration or client type with a client in the conversation, e.g. "
                       "`whatsapp`; `sdk`: any SDK client), `updatedAfter`, `createdAfter` (ISO 8601, strictly "
                       "after; no offset means UTC). An unknown filter or value is a 400. URL-encoded JSON is "
                       "accepted too.",
        "schema": {"type": "object", "properties": {
            "userId": {"type": "string"}, "userExternalId": {"type": "string"},
            "type": {"type": "string", "enum": ["personal", "sdkGroup"]},
            "activeSwitchboardIntegrationId": {"type": "string", "minLength": 24, "maxLength": 24},
            "activeSwitchboardIntegrationType": {"type": "string", "maxLength": 64},
            "channel": {"type": "string", "enum": sorted(models.CHANNEL_TYPES)},
            "updatedAfter": {"type": "string", "format": "date-time"},
            "createdAfter": {"type": "string", "format": "date-time"}},
            "additionalProperties": False},
    },
    "access": {
        "name": "access", "in": "query", "required": True, "description": "Only `public`.",
        "schema": {"type": "string", "enum": ["public"]},
    },
    "for": {
        "name": "for", "in": "query", "required": False, "description": "Only `message`.",
        "schema": {"type": "string", "enum": ["message"]},
    },
    "conversationId": {
        "name": "conversationId", "in": "query", "required": False,
        "description": "The conversation the attachment is for (of this app).", "schema": {"type": "string"},
    },
    "integrationIds": {
        "name": "integrationIds", "in": "query", "required": True,
        "description": "Comma-separated ids of the integrations to link to (SunCo v1.1).",
        "schema": {"type": "string"},
    },
}


def openapi_document(operations: Sequence[Operation], server_url: str) -> dict[str, Any]:
    """Build the document: one path item per operation, schemas from the structs they use."""
    types: list[Any] = [models.ErrorResponse]
    for op in operations:
        types.extend(t for t in (op.request, op.response) if t is not None)
    unique = list(dict.fromkeys(types))
    _, components = msgspec.json.schema_components(unique, ref_template=REF_TEMPLATE)
    paths: dict[str, dict[str, Any]] = {}
    for op in operations:
        item: dict[str, Any] = {
            "operationId": op.operation_id,
            "tags": [op.tag],
            "summary": op.summary,
            "parameters": [
                {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
                for name in _PATH_PARAM.findall(op.path)
            ] + [QUERY_PARAMETERS[q] for q in op.query],
            "responses": {
                str(op.status): {
                    "description": "Success",
                    "content": {"application/json": {"schema": (
                        {"$ref": REF_TEMPLATE.format(name=op.response.__name__)} if op.response is not None
                        else {"type": "object"})}},
                },
                **{str(code): {"$ref": f"#/components/responses/{name}"} for code, name in _error_refs(op)},
            },
        }
        if op.scope == "public":
            item["security"] = []
        elif op.scope == "account":
            item["description"] = "Requires the account key (Basic or a JWT with scope `account`)."
        if op.request is not None:
            item["requestBody"] = {"required": True, "content": {"application/json": {
                "schema": {"$ref": REF_TEMPLATE.format(name=op.request.__name__)}}}}
        paths.setdefault(op.path, {})[op.method.lower()] = item
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "Threadline business API",
            "version": "2.0.0",
            "description": "A Sunshine Conversations v2 compatible subset (the official "
                           "sunshine-conversations-client works against it) plus Threadline extensions.",
        },
        "servers": [{"url": server_url}],
        "security": [{"basicAuth": []}, {"bearerAuth": []}],
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {
                "basicAuth": {"type": "http", "scheme": "basic",
                              "description": "API key id and secret (app key or the account key)."},
                "bearerAuth": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT",
                               "description": "HS256 JWT signed with a key secret, `kid` = key id, "
                                              "`scope` = app (app keys) or account (the account key)."},
            },
            "responses": {name: {"description": description, "content": {"application/json": {
                "schema": {"$ref": REF_TEMPLATE.format(name="ErrorResponse")}}}}
                for name, description in _ERRORS.items()},
        },
    }


_ERRORS = {
    "BadRequest": "Invalid request (malformed JSON, invalid enum value, validation error)",
    "Unauthorized": "Missing or wrong credentials",
    "Forbidden": "The key does not grant this app or operation",
    "NotFound": "No such resource in this app",
    "PayloadTooLarge": "Body over 100 KB",
    "UnsupportedMediaType": "Body is not application/json",
    "ServiceUnavailable": "A dependency (bus, identity) is unavailable; retry",
}


def _error_refs(op: Operation) -> list[tuple[int, str]]:
    refs = [] if op.scope == "public" else [(401, "Unauthorized"), (403, "Forbidden")]
    if "{" in op.path:
        refs.append((404, "NotFound"))
    if op.request is not None:
        refs.extend([(400, "BadRequest"), (413, "PayloadTooLarge"), (415, "UnsupportedMediaType")])
    elif {"page", "filter", "conversationFilter"} & set(op.query):
        refs.append((400, "BadRequest"))  # a malformed cursor, page size or filter
    if op.method != "GET" or "users" in op.path:
        refs.append((503, "ServiceUnavailable"))
    return refs
