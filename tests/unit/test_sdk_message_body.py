"""The SDK's customer message body (`shared.sdk.PostMessage`): a text, a button tap, a shared
location or a form answer; its validation and the inbound message each becomes."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from shared import sdk_service
from shared.http import ApiError
from shared.messages.channel import Postback
from shared.render import form_response_text
from shared.sdk import PostMessage, SessionClaims
from shared.sunco import FileContent, FormResponseContent, ImageContent, LocationContent, TextContent
from shared.uploads import describe_size

NOW = 1_800_000_000
CLAIMS = SessionClaims(typ="session", app="app1", user="u1", client="c1", integration="i1", channel_user_id="cu1",
                       conversation="conv1", iat=NOW, exp=NOW + 3600, sst=NOW)
CMID = "3f1c2a9e-1b2c-4d5e-8f90-123456789abc"
FORM_ID = "65f1c2a9e1b2c4d5e8f90123"
FIELDS: list[dict[str, Any]] = [
    {"type": "text", "name": "name", "label": "Your name", "text": "Ada"},
    {"type": "email", "name": "email", "label": "E-mail", "email": "ada@example.com"},
    {"type": "select", "name": "size", "label": "Size", "select": [{"name": "m", "label": "Medium"}]},
]


def body(**fields: Any) -> PostMessage:
    """A body as the web service decodes it from JSON (camelCase keys)."""
    return msgspec.convert({"clientMessageId": CMID, **fields}, PostMessage)


def refused(raw: PostMessage) -> str:
    with pytest.raises(ApiError) as exc:
        sdk_service.validate_post_message(raw)
    assert exc.value.status == 400
    return exc.value.title


def test_a_plain_text_is_what_it_was() -> None:
    raw = msgspec.json.decode(b'{"clientMessageId": "%s", "text": "hi"}' % CMID.encode(), type=PostMessage)
    assert sdk_service.validate_post_message(raw) is raw
    msg = sdk_service.inbound_message(CLAIMS, "conv1", raw, 1.0, "web")
    assert msg.content == TextContent(text="hi") and msg.postback is None


def test_a_tap_carries_the_label_and_the_payload() -> None:
    raw = sdk_service.validate_post_message(body(text="Yes please", payload="CONFIRM_YES"))
    msg = sdk_service.inbound_message(CLAIMS, "conv1", raw, 1.0, "web")
    assert msg.content == TextContent(text="Yes please", payload="CONFIRM_YES")
    assert msg.postback == Postback(payload="CONFIRM_YES", text="Yes please")
    assert msg.provider_message_id == CMID
    assert "payload must be 1-1000" in refused(body(text="Yes", payload="p" * 1001))
    assert "payload must be" in refused(body(text="Yes", payload=""))
    assert "text must not be empty" in refused(body(text="  ", payload="CONFIRM_YES"))
    assert "button tap" in refused(body(payload="P", location={"lat": 1, "long": 2}))


def test_a_location_becomes_location_content() -> None:
    raw = sdk_service.validate_post_message(
        body(location={"lat": 52.52, "long": 13.405, "name": "Office", "address": "Main St 1"}))
    content = sdk_service.inbound_message(CLAIMS, "conv1", raw, 1.0, "web").content
    assert isinstance(content, LocationContent)
    assert (content.coordinates.lat, content.coordinates.long) == (52.52, 13.405)
    assert content.location is not None and (content.location.name, content.location.address) == (
        "Office", "Main St 1")
    bare = sdk_service.message_content(body(location={"lat": -90, "long": 180}))
    assert isinstance(bare, LocationContent) and bare.location is None
    assert msgspec.json.decode(msgspec.json.encode(bare)) == {"type": "location",
                                                              "coordinates": {"lat": -90.0, "long": 180.0}}


@pytest.mark.parametrize(("location", "why"), [
    ({"lat": 90.5, "long": 0}, "location.lat"),
    ({"lat": 0, "long": -180.01}, "location.long"),
    ({"lat": float("nan"), "long": 0}, "location.lat"),
    ({"lat": 0, "long": float("inf")}, "location.long"),
    ({"lat": 0, "long": 0, "name": "n" * 257}, "location.name"),
])
def test_a_location_out_of_range_is_refused(location: dict[str, Any], why: str) -> None:
    assert why in refused(body(location=location))


def test_unusable_json_coordinates_are_refused_at_decoding() -> None:
    for raw in (b'{"clientMessageId": "%s", "location": {"lat": 1e400, "long": 0}}' % CMID.encode(),
                b'{"clientMessageId": "%s", "location": {"lat": "1", "long": 0}}' % CMID.encode(),
                b'{"clientMessageId": "%s", "location": {"long": 0}}' % CMID.encode()):
        with pytest.raises(msgspec.ValidationError):
            msgspec.json.decode(raw, type=PostMessage)


def test_a_form_response_names_its_form_in_every_field_and_has_the_text_fallback() -> None:
    raw = sdk_service.validate_post_message(body(formResponse={"quotedMessageId": FORM_ID, "fields": FIELDS}))
    content = sdk_service.inbound_message(CLAIMS, "conv1", raw, 1.0, "web").content
    assert isinstance(content, FormResponseContent)
    assert [f.quoted_message_id for f in content.fields] == [FORM_ID] * 3
    assert [(f.type, f.name, f.text, f.email) for f in content.fields] == [
        ("text", "name", "Ada", None), ("email", "email", None, "ada@example.com"), ("select", "size", None, None)]
    assert content.fields[2].select is not None and content.fields[2].select[0].label == "Medium"
    assert content.text_fallback == form_response_text(content) == (
        "Your name: Ada\nE-mail: ada@example.com\nSize: Medium")


def _form(*fields: dict[str, Any], quoted: str = FORM_ID) -> PostMessage:
    return body(formResponse={"quotedMessageId": quoted, "fields": list(fields)})


@pytest.mark.parametrize(("raw", "why"), [
    (_form(FIELDS[0], quoted=""), "quotedMessageId"),
    (_form(FIELDS[0], quoted="not an id!"), "quotedMessageId"),
    (_form(), "1-20 fields"),
    (_form(*[{**FIELDS[0], "name": f"f{i}"} for i in range(21)]), "1-20 fields"),
    (_form(FIELDS[0], FIELDS[0]), "unique"),
    (_form({**FIELDS[0], "name": " "}), ".name must be 1-128"),
    (_form({**FIELDS[0], "label": "l" * 129}), ".label must be 1-128"),
    (_form({**FIELDS[0], "text": "t" * 257}), ".text must be 1-256"),
    (_form({**FIELDS[0], "text": ""}), ".text must be 1-256"),
    (_form({"type": "text", "name": "n", "label": "N"}), "nothing else"),
    (_form({**FIELDS[0], "email": "a@b.c"}), "nothing else"),
    (_form({**FIELDS[1], "email": "not-an-address"}), "e-mail address"),
    (_form({**FIELDS[1], "email": "a" * 60 + "@" + "b" * 68}), "e-mail address"),
    (_form({**FIELDS[2], "select": []}), "exactly one option"),
    (_form({**FIELDS[2], "select": [{"name": "s", "label": "S"}, {"name": "m", "label": "M"}]}), "exactly one"),
    (_form({**FIELDS[2], "select": [{"name": "", "label": "S"}]}), "select[0].name"),
])
def test_a_malformed_form_response_is_refused(raw: PostMessage, why: str) -> None:
    assert why in refused(raw)


def test_a_message_is_exactly_one_kind() -> None:
    location = {"lat": 1.0, "long": 2.0}
    form = {"quotedMessageId": FORM_ID, "fields": FIELDS}
    assert "not text and location" in refused(body(text="here", location=location))
    assert "not location and formResponse" in refused(body(location=location, formResponse=form))
    assert "text must not be empty" in refused(body())
    assert "at most 4096" in refused(body(text="x" * 4097, location=location))
    # Blank text beside a location or a form is no text.
    assert sdk_service.validate_post_message(body(text=" ", location=location))


# --- images and files (uploaded with POST …/attachments) ------------------------------------------

BASE = "https://threadline.example.com"
APP = "0123456789abcdef01234567"
UPLOADED = f"{BASE}/attachments/v1/{APP}/{'t' * 32}/My%20photo.png"


def test_an_image_or_a_file_becomes_media_content_with_its_caption() -> None:
    raw = sdk_service.validate_post_message(body(image={"mediaUrl": UPLOADED, "mediaType": "Image/PNG; q=1",
                                                        "altText": "My photo.png"}))
    content = sdk_service.message_content(raw)
    assert content == ImageContent(media_url=UPLOADED, media_type="image/png", alt_text="My photo.png")
    raw = sdk_service.validate_post_message(body(text="my invoice", file={"mediaUrl": UPLOADED,
                                                                         "mediaType": "application/pdf"}))
    assert sdk_service.message_content(raw) == FileContent(media_url=UPLOADED, media_type="application/pdf",
                                                           text="my invoice")
    # Blank text beside a file is no caption.
    raw = sdk_service.validate_post_message(body(text="  ", file={"mediaUrl": UPLOADED, "mediaType": "text/csv"}))
    content = sdk_service.message_content(raw)
    assert isinstance(content, FileContent) and content.text is None


@pytest.mark.parametrize(("fields", "why"), [
    ({"image": {"mediaUrl": "", "mediaType": "image/png"}}, "image.mediaUrl"),
    ({"image": {"mediaUrl": UPLOADED + "x" * 2048, "mediaType": "image/png"}}, "image.mediaUrl"),
    ({"image": {"mediaUrl": UPLOADED, "mediaType": "image/svg+xml"}}, "image.mediaType"),
    ({"image": {"mediaUrl": UPLOADED, "mediaType": "application/pdf"}}, "an image/"),
    ({"file": {"mediaUrl": UPLOADED, "mediaType": "text/html"}}, "file.mediaType"),
    ({"file": {"mediaUrl": UPLOADED, "mediaType": "application/pdf", "altText": "a" * 513}}, "file.altText"),
    ({"image": {"mediaUrl": UPLOADED, "mediaType": "image/png"}, "file": {"mediaUrl": UPLOADED,
                                                                          "mediaType": "image/png"}},
     "not image and file"),
    ({"location": {"lat": 1, "long": 2}, "file": {"mediaUrl": UPLOADED, "mediaType": "image/png"}},
     "not location and file"),
    ({"text": "Yes", "payload": "P", "image": {"mediaUrl": UPLOADED, "mediaType": "image/png"}}, "button tap"),
])
def test_a_malformed_image_or_file_is_refused(fields: dict[str, Any], why: str) -> None:
    assert why in refused(body(**fields))


def test_only_the_apps_own_upload_urls_may_be_sent() -> None:
    assert sdk_service.is_own_upload(BASE, APP, UPLOADED)
    token = "t" * 32
    for url in (UPLOADED.replace(APP, "f" * 24),  # another app's
                "https://cdn.example.com/attachments/v1/" + f"{APP}/{token}/a.png",  # elsewhere
                UPLOADED + "?download=1", UPLOADED + "#x",
                f"{BASE}/attachments/v1/{APP}/{token}/My photo.png",  # not as Threadline writes it
                f"{BASE}/attachments/v1/{APP}/{token}/..", f"{BASE}/attachments/v1/{APP}/{token}/a%2Fb.png",
                f"{BASE}/attachments/v1/{APP}/short/a.png", f"{BASE}/attachments/v1/{APP}/{token}"):
        assert not sdk_service.is_own_upload(BASE, APP, url), url


def test_sizes_are_said_as_they_are_set() -> None:
    assert [describe_size(n) for n in (25 * 1024 * 1024, 64 * 1024, 1536, 1000, 3 * 1024 * 1024 // 2,
                                       2 * 1024 * 1024 - 1)] == [
        "25 MB", "64 KB", "1.5 KB", "1000 bytes", "1.5 MB", "1.9 MB"]
