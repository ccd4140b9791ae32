"""The e-mail channel's pure core: reply addresses, hostile MIME, reply extraction, sender
authentication, Mailgun/SendGrid inbound fields and outbound threading."""

from __future__ import annotations

import base64
import email
import email.policy
import hashlib
import hmac
import json
import random
import time
from collections.abc import Callable
from pathlib import Path

import dkim
import msgspec
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.mailparse import (
    AuthVerdict,
    InboundMail,
    MailAttachment,
    MailLimits,
    MailRejected,
    clean_filename,
    conversation_for_mail,
    decode_text,
    domains_aligned,
    html_to_text,
    inbound_from_mailgun,
    inbound_from_sendgrid,
    is_spoofed,
    mailgun_signature_valid,
    parse_address_list,
    parse_authentication_results,
    parse_mail,
    parse_reply_address,
    reply_address,
    reply_headers,
    reply_subject,
    strip_reply,
    verdict_from_mailgun,
    verdict_from_sendgrid,
    verify_dkim,
)

SECRET = b"0123456789abcdef0123456789abcdef"
APP = "65f1c0de0123456789abcdef"
CONVERSATION = "65f1c0de00000000000000ff"
SENDGRID_SAMPLES = Path(__file__).parent / "data" / "sendgrid"
BASE32 = "abcdefghijklmnopqrstuvwxyz234567"


def mime(*lines: str) -> bytes:
    return ("\r\n".join(lines) + "\r\n").encode()


def nested_multiparts(depth: int, newline: bytes = b"\r\n") -> bytes:
    opening = b"".join(b"Content-Type: multipart/mixed; boundary=b%d%s%s--b%d%s" % (level, newline, newline, level,
                                                                                   newline) for level in range(depth))
    closing = b"".join(b"%s--b%d--%s" % (newline, level, newline) for level in reversed(range(depth)))
    return (b"From: a@example.com" + newline + b"MIME-Version: 1.0" + newline + opening
            + b"Content-Type: text/plain" + newline + newline + b"innermost" + closing)


def many_parts(count: int) -> bytes:
    parts = b"".join(b"--sep\r\nContent-Type: text/plain\r\n\r\npart %d\r\n" % number for number in range(count))
    return (b"From: a@example.com\r\nContent-Type: multipart/mixed; boundary=sep\r\n\r\n" + parts + b"--sep--\r\n")


# --------------------------------------------------------------------------------------------
# Reply addresses


def test_reply_address_round_trips_and_fits_a_local_part() -> None:
    address = reply_address(SECRET, APP, CONVERSATION, "reply", "Mail.Acme.TEST")
    local, _, domain = address.partition("@")
    assert domain == "mail.acme.test"
    assert local.startswith("reply+") and len(local) <= 64
    token = local.removeprefix("reply+")
    assert len(token) == 55 and set(token) <= set(BASE32)
    assert parse_reply_address(SECRET, address) == (APP, CONVERSATION)


def test_reply_address_survives_case_folding_and_display_names() -> None:
    address = reply_address(SECRET, APP, CONVERSATION, "reply", "mail.acme.test")
    assert parse_reply_address(SECRET, address.upper()) == (APP, CONVERSATION)
    assert parse_reply_address(SECRET, address.lower()) == (APP, CONVERSATION)
    assert parse_reply_address(SECRET, f'"Acme Support" <{address.swapcase()}>') == (APP, CONVERSATION)


def test_reply_address_ids_come_back_lower_case() -> None:
    address = reply_address(SECRET, APP.upper(), CONVERSATION, "r", "x.test")
    assert parse_reply_address(SECRET, address) == (APP, CONVERSATION)


def test_every_flipped_token_character_is_refused() -> None:
    address = reply_address(SECRET, APP, CONVERSATION, "reply", "mail.acme.test")
    local, _, domain = address.partition("@")
    token = local.removeprefix("reply+")
    for position, char in enumerate(token):
        for replacement in {BASE32[(BASE32.index(char) + 1) % 32], BASE32[(BASE32.index(char) + 17) % 32]}:
            forged = token[:position] + replacement + token[position + 1:]
            assert parse_reply_address(SECRET, f"reply+{forged}@{domain}") is None, (position, replacement)


def test_reply_address_refuses_other_secrets_and_spliced_tokens() -> None:
    first = reply_address(SECRET, APP, CONVERSATION, "reply", "x.test")
    other = reply_address(SECRET, APP, "65f1c0de0000000000000001", "reply", "x.test")
    assert parse_reply_address(b"another secret of 32 bytes......", first) is None
    raw_first = base64.b32decode(first[6:61].upper() + "=")
    raw_other = base64.b32decode(other[6:61].upper() + "=")
    spliced = base64.b32encode(raw_other[:24] + raw_first[24:]).decode().rstrip("=").lower()
    assert parse_reply_address(SECRET, f"reply+{spliced}@x.test") is None


def test_reply_tag_uses_a_derived_key_not_the_secret_itself() -> None:
    address = reply_address(SECRET, APP, CONVERSATION, "reply", "x.test")
    raw = base64.b32decode(address[6:61].upper() + "=")
    ids, tag = raw[:24], raw[24:]
    assert ids == bytes.fromhex(APP + CONVERSATION) and len(tag) == 10
    assert tag != hmac.new(SECRET, ids, hashlib.sha256).digest()[:10]


@pytest.mark.parametrize("address", [
    "", "reply@x.test", "reply+@x.test", "reply+abc@x.test", "no-at-sign", "reply+" + "a" * 55,
    "reply+" + "1" * 55 + "@x.test", "reply+" + "é" * 55 + "@x.test", "reply+" + "a" * 56 + "@x.test",
    "<>", "reply+" + "a" * 55 + "@x.test",
])
def test_reply_address_parsing_refuses_garbage(address: str) -> None:
    assert parse_reply_address(SECRET, address) is None


@pytest.mark.parametrize(("secret", "app_id", "conversation_id", "local_part", "domain"), [
    (SECRET, "not-hex", CONVERSATION, "reply", "x.test"),
    (SECRET, APP, CONVERSATION[:-1], "reply", "x.test"),
    (SECRET, APP, CONVERSATION, "replies-to", "x.test"),
    (SECRET, APP, CONVERSATION, "re ply", "x.test"),
    (SECRET, APP, CONVERSATION, "reply", "a@x.test"),
    (SECRET, APP, CONVERSATION, "reply", ""),
    (b"short", APP, CONVERSATION, "reply", "x.test"),
])
def test_reply_address_refuses_bad_arguments(secret: bytes, app_id: str, conversation_id: str, local_part: str,
                                             domain: str) -> None:
    with pytest.raises(ValueError):
        reply_address(secret, app_id, conversation_id, local_part, domain)


def test_conversation_is_found_among_any_recipient() -> None:
    address = reply_address(SECRET, APP, CONVERSATION, "reply", "x.test")
    mail = InboundMail(to=["support@acme.test"], cc=[address.upper()])
    assert conversation_for_mail(SECRET, mail) == (APP, CONVERSATION)
    assert conversation_for_mail(SECRET, InboundMail(envelope_to=[address])) == (APP, CONVERSATION)
    assert conversation_for_mail(SECRET, InboundMail(to=["support@acme.test"])) is None


# --------------------------------------------------------------------------------------------
# Parsing: the normal cases

GMAIL_REPLY = mime(
    "Delivered-To: reply+abc@mail.acme.test",
    "Return-Path: <jane.doe@Example.COM>",
    "MIME-Version: 1.0",
    "Date: Mon, 3 Jun 2024 10:05:00 +0200",
    "References: <first@acme.test>",
    " <second@acme.test>",
    "In-Reply-To: <second@acme.test>",
    "Message-ID: <CAF=abc123@mail.gmail.com>",
    "Subject: =?UTF-8?Q?Re=3A_Votre_commande_=E2=84=961234?=",
    "From: =?UTF-8?Q?Jane_Do=C3=A9?= <Jane.Doe@Example.COM>",
    "To: Acme Support <reply+abc@mail.acme.test>",
    "Cc: \"Smith, John\" <john@Contoso.TEST>, boss@contoso.test",
    "Authentication-Results: mx.acme.test; dkim=pass header.d=example.com",
    'Content-Type: multipart/alternative; boundary="000000000000b1c2"',
    "",
    "--000000000000b1c2",
    'Content-Type: text/plain; charset="UTF-8"',
    "Content-Transfer-Encoding: quoted-printable",
    "",
    "Thanks, that works for me. Can you ship it on Friday?",
    "",
    "Best,",
    "Jan=C3=A9",
    "",
    "On Mon, Jun 3, 2024 at 10:00=E2=80=AFAM Acme Support <reply+abc@mail.acme.test>",
    "wrote:",
    "",
    "> Hi Jane,",
    ">",
    "> Your order is ready.",
    "",
    "--000000000000b1c2",
    'Content-Type: text/html; charset="UTF-8"',
    "",
    "<div>Thanks, that works for me.</div>",
    "--000000000000b1c2--",
)


def test_parse_mail_reads_headers_and_new_text() -> None:
    mail = parse_mail(GMAIL_REPLY)
    assert mail.from_address == "Jane.Doe@example.com" and mail.from_domain == "example.com"
    assert mail.from_name == "Jane Doé"
    assert mail.to == ["reply+abc@mail.acme.test"]
    assert mail.cc == ["john@contoso.test", "boss@contoso.test"]
    assert mail.envelope_to == ["reply+abc@mail.acme.test"]
    assert mail.envelope_from == "jane.doe@example.com"
    assert mail.subject == "Re: Votre commande №1234"
    assert mail.message_id == "<CAF=abc123@mail.gmail.com>"
    assert mail.in_reply_to == "<second@acme.test>"
    assert mail.references == ["<first@acme.test>", "<second@acme.test>"]
    assert mail.text == "Thanks, that works for me. Can you ship it on Friday?\n\nBest,\nJané"
    assert "> Your order is ready." in mail.full_text and "<div>" not in mail.full_text
    assert mail.attachments == [] and mail.auto_submitted is False
    assert mail.authentication_results == ["mx.acme.test; dkim=pass header.d=example.com"]


def test_inbound_mail_travels_on_the_bus() -> None:
    mail = parse_mail(GMAIL_REPLY)
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(mail), type=InboundMail) == mail


GMAIL_HTML = (
    '<div dir="ltr">Thanks, see you <b>Friday</b>!<br><br>Jane</div><br>'
    '<div class="gmail_quote"><div dir="ltr" class="gmail_attr">On Mon, Jun 3, 2024 at 10:00 AM Acme Support '
    '&lt;<a href="mailto:support@acme.test">support@acme.test</a>&gt; wrote:<br></div>'
    '<blockquote class="gmail_quote" style="margin:0px 0px 0px 0.8ex"><div dir="ltr">Hi Jane,'
    '<div>Your order is ready.</div></div></blockquote></div>'
)


def test_html_only_mail_is_read_as_text_and_stripped() -> None:
    raw = mime("From: jane@example.com", "Content-Type: text/html; charset=utf-8", "", GMAIL_HTML)
    mail = parse_mail(raw)
    assert mail.text == "Thanks, see you Friday!\n\nJane"
    assert "> Hi Jane," in mail.full_text and "> Your order is ready." in mail.full_text


def test_html_to_text_drops_scripts_and_keeps_structure() -> None:
    html = (
        "<html><head><title>T</title><style>p {color: red}</style></head><body>"
        "<script>alert('x')</script><h1>Order&nbsp;status</h1><p>Caf&eacute; &amp; th&#233;</p>"
        "<ul><li>one</li><li>two</li></ul><table><tr><td>a</td><td>b</td></tr></table>"
        '<p>Track it <a href="https://track.test/1">here</a>.</p><pre>  keep\n  this</pre></body></html>'
    )
    assert html_to_text(html) == ("Order status\n\nCafé & thé\n\none\ntwo\n\na b\n\n"
                                  "Track it here <https://track.test/1>.\n\n  keep\n  this")


def test_html_with_an_unclosed_head_still_shows_the_body() -> None:
    assert html_to_text("<html><head><meta charset=utf-8><body>Hello <i>there</i></body>") == "Hello there"


def test_html_text_over_the_limit_is_cut() -> None:
    text = html_to_text("<p>" + "word " * 100 + "</p>", max_chars=50)
    assert len(text) == 50 and text.startswith("word word") and text.endswith("[…]")


APPLE_WITH_ATTACHMENTS = mime(
    "From: Jane <jane@example.com>",
    "To: reply+abc@mail.acme.test",
    "Subject: photo",
    "Content-Type: multipart/mixed; boundary=outer",
    "",
    "--outer",
    "Content-Type: multipart/alternative; boundary=alt",
    "",
    "--alt",
    "Content-Type: text/plain; charset=us-ascii; format=flowed; delsp=no",
    "",
    "Here is the photo of the damaged ",
    "box, as you asked.",
    "",
    "--alt",
    "Content-Type: multipart/related; boundary=rel",
    "",
    "--rel",
    "Content-Type: text/html; charset=us-ascii",
    "",
    '<p>Here is the photo <img src="cid:logo@x"></p>',
    "--rel",
    "Content-Type: image/png; name=logo.png",
    "Content-ID: <logo@x>",
    "Content-Transfer-Encoding: base64",
    "",
    base64.b64encode(b"\x89PNG-inline").decode(),
    "--rel--",
    "--alt--",
    "--outer",
    "Content-Type: image/jpeg",
    'Content-Disposition: attachment; filename="../../etc/passwd\x01.jpg"',
    "Content-Transfer-Encoding: base64",
    "",
    base64.b64encode(b"\xff\xd8JPEG").decode(),
    "--outer",
    "Content-Type: application/pdf",
    "Content-Disposition: attachment; filename*=utf-8''%E2%80%AEfdp.exe%00",
    "Content-Transfer-Encoding: base64",
    "",
    base64.b64encode(b"%PDF-1.7").decode(),
    "--outer",
    "Content-Type: text/plain; charset=utf-8",
    'Content-Disposition: attachment; filename="=?utf-8?q?notes_=C3=A9t=C3=A9.txt?="',
    "",
    "attached text, not the body",
    "--outer--",
)


def test_attachments_keep_their_names_less_control_characters() -> None:
    mail = parse_mail(APPLE_WITH_ATTACHMENTS)
    assert mail.text == "Here is the photo of the damaged box, as you asked."
    assert [(a.filename, a.media_type, a.data, a.content_id) for a in mail.attachments] == [
        ("logo.png", "image/png", b"\x89PNG-inline", "logo@x"),
        ("../../etc/passwd.jpg", "image/jpeg", b"\xff\xd8JPEG", None),
        ("fdp.exe", "application/pdf", b"%PDF-1.7", None),
        ("notes été.txt", "text/plain", b"attached text, not the body", None),
    ]


def test_clean_filename_strips_controls_and_bidi_overrides_only() -> None:
    assert clean_filename("a\x00b\r\n\tc\x7f\x85\u202egpj.exe") == "abcgpj.exe"
    assert clean_filename("../x/ y.txt") == "../x/ y.txt"


def test_images_beside_an_unchosen_html_alternative_are_kept() -> None:
    raw = mime(
        "From: a@example.com",
        "Content-Type: multipart/alternative; boundary=a",
        "",
        "--a",
        "Content-Type: text/plain",
        "",
        "plain text",
        "--a",
        "Content-Type: multipart/mixed; boundary=m",
        "",
        "--m",
        "Content-Type: text/html",
        "",
        "<p>one</p>",
        "--m",
        "Content-Type: image/png; name=x.png",
        "Content-Disposition: inline; filename=x.png",
        "",
        "PNG",
        "--m",
        "Content-Type: text/html",
        "",
        "<p>two</p>",
        "--m--",
        "--a--",
    )
    mail = parse_mail(raw)
    assert mail.text == "plain text"
    assert [(a.filename, a.media_type, a.data) for a in mail.attachments] == [("x.png", "image/png", b"PNG")]


def test_single_part_files_and_signatures() -> None:
    image = parse_mail(mime("From: a@example.com", "Content-Type: image/png", "Content-Transfer-Encoding: base64",
                            "", base64.b64encode(b"PNG").decode()))
    assert image.text == "" and image.attachments == [MailAttachment("", "image/png", b"PNG")]
    signed = parse_mail(mime(
        "From: a@example.com",
        'Content-Type: multipart/signed; protocol="application/pkcs7-signature"; boundary=s',
        "",
        "--s",
        "Content-Type: text/plain",
        "",
        "signed text",
        "--s",
        "Content-Type: application/pkcs7-signature; name=smime.p7s",
        "",
        "SIG",
        "--s--",
    ))
    assert signed.text == "signed text" and signed.attachments == []


def test_forwarded_message_attachment_is_one_attachment() -> None:
    raw = mime(
        "From: jane@example.com",
        "Content-Type: multipart/mixed; boundary=b",
        "",
        "--b",
        "Content-Type: text/plain",
        "",
        "See the mail below.",
        "--b",
        "Content-Type: message/rfc822",
        "",
        "From: bob@example.org",
        "Subject: original",
        "",
        "Original body",
        "--b--",
    )
    mail = parse_mail(raw)
    assert mail.text == "See the mail below."
    [forwarded] = mail.attachments
    assert forwarded.media_type == "message/rfc822"
    assert b"Subject: original" in forwarded.data and b"Original body" in forwarded.data


@pytest.mark.parametrize("header", [
    "Auto-Submitted: auto-replied", "Auto-Submitted: auto-generated", "Precedence: bulk", "Precedence: junk",
    "Precedence: list", "X-Autoreply: yes", "X-Autorespond: Out of office", "Return-Path: <>",
])
def test_auto_replies_are_flagged(header: str) -> None:
    raw = mime("From: jane@example.com", header, "Subject: Out of office", "", "I am away.")
    assert parse_mail(raw).auto_submitted is True


def test_bounces_are_flagged_and_ordinary_mail_is_not() -> None:
    bounce = mime(
        "From: MAILER-DAEMON@mx.example.com",
        "Content-Type: multipart/report; report-type=delivery-status; boundary=r",
        "",
        "--r",
        "Content-Type: text/plain",
        "",
        "Delivery failed.",
        "--r",
        "Content-Type: message/delivery-status",
        "",
        "Reporting-MTA: dns; mx.example.com",
        "",
        "Final-Recipient: rfc822; nobody@example.com",
        "Action: failed",
        "--r--",
    )
    assert parse_mail(bounce).auto_submitted is True
    assert parse_mail(mime("From: a@example.com", "Auto-Submitted: no", "", "hi")).auto_submitted is False


# --------------------------------------------------------------------------------------------
# Parsing: charsets


@pytest.mark.parametrize(("charset", "encoded", "expected"), [
    ("iso-8859-1", "Café".encode("latin-1"), "Café"),
    ("windows-1252", "“quoted” – €".encode("cp1252"), "“quoted” – €"),
    ("shift_jis", "こんにちは".encode("shift_jis"), "こんにちは"),
    ("koi8-r", "Привет".encode("koi8-r"), "Привет"),
    ("gb2312", "你好".encode("gb2312"), "你好"),
    ("utf-8", b"caf\xc3\xa9 \xff broken", "café \ufffd broken"),
    ("x-no-such-charset", b"caf\xc3\xa9", "café"),
    ("zlib", b"plain", "plain"),
    ("idna", b"plain", "plain"),
    ("", "naïve".encode(), "naïve"),
    ("us-ascii", "naïve".encode("cp1252"), "naïve"),
])
def test_body_charsets_are_decoded_and_bad_ones_never_raise(charset: str, encoded: bytes, expected: str) -> None:
    content_type = f"Content-Type: text/plain; charset={charset}".encode() if charset else b"Content-Type: text/plain"
    raw = b"From: a@example.com\r\n" + content_type + b"\r\nContent-Transfer-Encoding: 8bit\r\n\r\n" + encoded
    assert parse_mail(raw).text == expected


def test_base64_utf16_body_is_decoded() -> None:
    body = base64.b64encode("Grüße".encode("utf-16")).decode()
    raw = mime("From: a@example.com", "Content-Type: text/plain; charset=utf-16",
               "Content-Transfer-Encoding: base64", "", body)
    assert parse_mail(raw).text == "Grüße"


def test_broken_headers_and_8bit_bytes_never_raise() -> None:
    raw = (b"From: \xc3\xa9milie <emilie@example.com>\r\n"
           b"Subject: =?x-unknown?q?caf=E9?= \xc3\xa9t\xc3\xa9 \xff\r\n"
           b"To: <<<@@@>>>, \"unterminated <x@y\r\n"
           b"Content-Type: text/plain; charset=\"utf-8\r\n"
           b"Message-ID: no-brackets@example.com\r\n"
           b"\r\nhello\x00 world\r\n")
    mail = parse_mail(raw)
    assert mail.from_address == "emilie@example.com" and mail.from_name == "émilie"
    assert "été" in mail.subject
    assert mail.message_id == "<no-brackets@example.com>"
    assert mail.text == "hello world"


def test_decode_text_falls_back_rather_than_raising() -> None:
    assert decode_text(b"\xe9t\xe9", None) == "été"
    assert decode_text(b"abc", "hex") == "abc"
    assert decode_text(b"\xff", "utf-8") == "\ufffd"


# --------------------------------------------------------------------------------------------
# Parsing: limits and hostile input


def test_ten_thousand_nested_multiparts_are_refused_quickly() -> None:
    for newline in (b"\r\n", b"\n", b"\r"):
        started = time.monotonic()
        with pytest.raises(MailRejected) as refused:
            parse_mail(nested_multiparts(10_000, newline))
        assert refused.value.reason == "MIME nesting deeper than 10 levels"
        assert time.monotonic() - started < 2


def test_nesting_at_the_limit_is_accepted() -> None:
    assert parse_mail(nested_multiparts(10)).text == "innermost"
    with pytest.raises(MailRejected, match="deeper than 10 levels"):
        parse_mail(nested_multiparts(11))


def test_nesting_without_blank_lines_or_through_attached_messages_is_refused() -> None:
    no_blank_lines = (b"From: a@example.com\nContent-Type: multipart/mixed; boundary=b0\n\n"
                      + b"".join(b"--b%d\nContent-Type: multipart/mixed; boundary=b%d\n" % (n, n + 1)
                                 for n in range(10_000)) + b"--b10000\n\nhi\n")
    attached_messages = b"From: a@example.com\n" + b"Content-Type: message/rfc822\n\n" * 10_000 + b"hi\n"
    for raw in (no_blank_lines, attached_messages):
        with pytest.raises(MailRejected, match="MIME nesting deeper than 10 levels"):
            parse_mail(raw)


def test_parser_recursion_is_refused_even_when_the_limits_allow_it() -> None:
    lax = MailLimits(max_depth=1_000_000, max_parts=1_000_000)
    with pytest.raises(MailRejected, match="too deep to parse"):
        parse_mail(nested_multiparts(3_000), lax)


def test_a_thousand_parts_are_refused() -> None:
    with pytest.raises(MailRejected) as refused:
        parse_mail(many_parts(1_000))
    assert refused.value.reason == "more than 100 MIME parts"
    assert len(parse_mail(many_parts(90)).full_text.split("\n\n")) == 90


def test_a_delivery_status_of_many_blocks_counts_as_many_parts() -> None:
    blocks = b"\n\n".join(b"Final-Recipient: rfc822; r%d@example.com" % n for n in range(5_000))
    raw = b"From: a@example.com\nContent-Type: message/delivery-status\n\n" + blocks
    with pytest.raises(MailRejected, match="more than 100 MIME parts"):
        parse_mail(raw)


def test_a_thirty_megabyte_mail_is_refused_before_parsing() -> None:
    raw = b"From: a@example.com\r\nContent-Type: text/plain\r\n\r\n" + b"x" * (30 * 1024 * 1024)
    started = time.monotonic()
    with pytest.raises(MailRejected) as refused:
        parse_mail(raw)
    assert refused.value.reason == f"message larger than {25 * 1024 * 1024} bytes"
    assert time.monotonic() - started < 1


@pytest.mark.parametrize("headers", [
    b"".join(b"X-Spam-%d: %s\r\n" % (n, b"y" * 60) for n in range(2_000)),
    b"Subject: " + b"z" * (1024 * 1024) + b"\r\n",
    b"Subject: start\r\n" + b" folded continuation line\r\n" * 5_000,
])
def test_header_bombs_are_refused(headers: bytes) -> None:
    raw = b"From: a@example.com\r\n" + headers + b"\r\nbody\r\n"
    with pytest.raises(MailRejected, match="header section larger than 65536 bytes"):
        parse_mail(raw)


def test_a_header_bomb_in_a_part_is_refused() -> None:
    raw = (b"From: a@example.com\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n"
           + b"X-Junk: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n" * 3_000 + b"\r\nbody\r\n--b--\r\n")
    with pytest.raises(MailRejected, match="header section larger"):
        parse_mail(raw)


def test_too_many_attachments_are_refused() -> None:
    parts = b"".join(b"--b\r\nContent-Type: application/octet-stream\r\n"
                     b"Content-Disposition: attachment; filename=f%d.bin\r\n\r\nx\r\n" % n for n in range(21))
    raw = b"From: a@example.com\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n" + parts + b"--b--\r\n"
    with pytest.raises(MailRejected) as refused:
        parse_mail(raw)
    assert refused.value.reason == "more than 20 attachments"


def test_too_much_text_is_cut_never_refused() -> None:
    """A short reply above a very long quoted history is still the customer's message."""
    raw = (b"From: a@example.com\r\n\r\nThanks, that fixed it!\r\n\r\nOn Mon, 1 Jan 2026, Bo <b@example.com>"
           b" wrote:\r\n" + (b"> word word word word word word word word word word\r\n") * 3_000)
    mail = parse_mail(raw)
    assert len(mail.full_text) == 100_000 and mail.full_text.endswith("[…]")
    assert mail.text == "Thanks, that fixed it!"
    assert not parse_mail(raw, MailLimits(max_text_chars=200_000)).full_text.endswith("[…]")


def test_smaller_limits_are_honoured() -> None:
    with pytest.raises(MailRejected, match="message larger than 100 bytes"):
        parse_mail(GMAIL_REPLY, MailLimits(max_bytes=100))
    with pytest.raises(MailRejected, match="MIME nesting deeper than 0 levels"):
        parse_mail(GMAIL_REPLY, MailLimits(max_depth=0))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=3_000))
def test_arbitrary_bytes_parse_or_are_refused(raw: bytes) -> None:
    try:
        assert isinstance(parse_mail(raw), InboundMail)
    except MailRejected as refused:
        assert refused.reason


def test_mutated_mails_parse_or_are_refused() -> None:
    rng = random.Random(20240603)
    samples = [GMAIL_REPLY, APPLE_WITH_ATTACHMENTS, nested_multiparts(12)]
    for _ in range(400):
        raw = bytearray(rng.choice(samples))
        for _ in range(rng.randint(1, 20)):
            position = rng.randrange(len(raw))
            raw[position:position + 1] = rng.choice([b"", b"\x00", b"\xff", b"\r\n", b"--", b"=?", b";", b'"', b"<"])
        try:
            parse_mail(bytes(raw))
        except MailRejected as refused:
            assert refused.reason


# --------------------------------------------------------------------------------------------
# Reply extraction

OUTLOOK_WEB = """Yes, please cancel it.

Regards,
John Smith
Contoso Ltd.

________________________________
From: Acme Support <support@acme.test>
Sent: Monday, June 3, 2024 10:00 AM
To: John Smith <john@contoso.test>
Subject: Your order #1234

Hi John,

Your order #1234 has shipped.
"""

OUTLOOK_DESKTOP = """Please call me back on my mobile.

John

-----Original Message-----
From: Acme Support [mailto:support@acme.test]
Sent: Monday, June 3, 2024 10:00 AM
To: John Smith
Subject: RE: Your order #1234

We tried to reach you.
"""

OUTLOOK_NEW = """Thanks, received.

From: Acme Support <support@acme.test>
Sent: Monday, June 3, 2024 10:00
To: John Smith <john@contoso.test>
Cc: Billing <billing@contoso.test>
Subject: Invoice

Please find the invoice attached.
"""

OUTLOOK_GERMAN = """Danke für die schnelle Antwort.

Von: Acme Support <support@acme.test>
Gesendet: Montag, 3. Juni 2024 10:00
An: Max Mustermann <max@example.de>
Betreff: Ihre Bestellung
"""

APPLE_IPHONE = """Perfect, see you then!

Sent from my iPhone

> On 3 Jun 2024, at 10:00, Acme Support <support@acme.test> wrote:
>\x20
> Hi Jane, your appointment is confirmed for Friday.
"""

APPLE_MAC = """Works for me.
Jane

> On Jun 3, 2024, at 10:00 AM, Acme Support <support@acme.test> wrote:
>
> Would Friday work?
> --
> Acme Support
"""

THUNDERBIRD_BOTTOM_POST = """On 03/06/2024 10:00, Acme Support wrote:
> Hi Jane,
> Could you confirm your delivery address?

Yes: 12 Rue de la Paix, Paris.

--\x20
Jane Doe
+33 1 23 45 67 89
"""

THUNDERBIRD_INTERLEAVED = """On 6/3/24 10:00 AM, Acme Support wrote:
> Which size?

M, please.

> Which colour?

Blue.

> Gift wrap?
"""

GMAIL_WRAPPED = """Thanks!

On Mon, Jun 3, 2024 at 10:00 AM Acme Support Team <support-team-notifications@acme.test>
wrote:

> Hello Jane,
"""

GMAIL_UNQUOTED_HISTORY = """Ok, done.

On Mon, Jun 3, 2024 at 10:00 AM Acme Support <support@acme.test> wrote:
Hello Jane, please reset your password.
"""


@pytest.mark.parametrize(("sample", "expected"), [
    (OUTLOOK_WEB, "Yes, please cancel it.\n\nRegards,\nJohn Smith\nContoso Ltd."),
    (OUTLOOK_DESKTOP, "Please call me back on my mobile.\n\nJohn"),
    (OUTLOOK_NEW, "Thanks, received."),
    (OUTLOOK_GERMAN, "Danke für die schnelle Antwort."),
    (APPLE_IPHONE, "Perfect, see you then!"),
    (APPLE_MAC, "Works for me.\nJane"),
    (THUNDERBIRD_BOTTOM_POST, "Yes: 12 Rue de la Paix, Paris."),
    (THUNDERBIRD_INTERLEAVED, "M, please.\n\nBlue."),
    (GMAIL_WRAPPED, "Thanks!"),
    (GMAIL_UNQUOTED_HISTORY, "Ok, done."),
    ("Sure, Tuesday.\n\nGet Outlook for iOS\n________________________________\nFrom: x", "Sure, Tuesday."),
    ("Thanks\n--\nJane\nAcme fan", "Thanks"),
    ("Merci !\n\nEnvoyé de mon iPhone", "Merci !"),
    ("Danke!\n\nVon meinem iPhone gesendet\n\n> Am 03.06.2024 um 10:00 schrieb Acme <s@acme.test>:", "Danke!"),
])
def test_strip_reply_on_client_samples(sample: str, expected: str) -> None:
    assert strip_reply(sample) == expected


@pytest.mark.parametrize("attribution", [
    "On Mon, Jun 3, 2024 at 10:00 AM Acme Support <support@acme.test> wrote:",
    "Le lun. 3 juin 2024 à 10:00, Acme Support <support@acme.test> a écrit\u00a0:",
    "Le 3 juin 2024 à 10:00, Acme Support <support@acme.test> a écrit :",
    "Am 03.06.2024 um 10:00 schrieb Acme Support <support@acme.test>:",
    "Am Mo., 3. Juni 2024 um 10:00 Uhr schrieb Acme Support <support@acme.test>:",
    "Acme Support <support@acme.test> schrieb am 03.06.2024 um 10:00:",
    "El lun, 3 jun 2024 a las 10:00, Acme Support (<support@acme.test>) escribió:",
    "Op ma 3 jun. 2024 om 10:00 schreef Acme Support <support@acme.test>:",
    "Em seg., 3 de jun. de 2024 às 10:00, Acme Support <support@acme.test> escreveu:",
])
def test_attributions_in_six_languages(attribution: str) -> None:
    assert strip_reply(f"New text here.\n\n{attribution}\n\n> old text\n> more old text\n") == "New text here."
    # Wrapped over two lines, as Gmail does with long names.
    middle = attribution.index(" ", len(attribution) // 2)
    wrapped = attribution[:middle] + "\n" + attribution[middle + 1:]
    assert strip_reply(f"New text here.\n\n{wrapped}\n> old text\n") == "New text here."


def test_strip_reply_keeps_text_that_only_looks_like_markers() -> None:
    text = ("On second thought, here is what I wrote:\nthe parcel never arrived.\n"
            "From: my address\nthe one on file\n\n\n")
    assert strip_reply(text) == text.rstrip("\n")


def test_strip_reply_keeps_plain_text_untouched() -> None:
    text = "Hello,\n\n  indented line\nLast line   \n"
    assert strip_reply(text) == "Hello,\n\n  indented line\nLast line   "


def test_quoted_only_mail_comes_back_whole() -> None:
    quoted = "\n> On Mon, Jun 3, 2024 at 10:00 AM Acme wrote:\n> Hello\n>\n> Bye\n\n"
    assert strip_reply(quoted) == quoted.strip()
    assert strip_reply("-- \nJane Doe\n") == "-- \nJane Doe"
    assert strip_reply("") == ""


def test_forwarded_mail_is_kept() -> None:
    forward = ("FYI, see below.\n\n---------- Forwarded message ---------\nFrom: Bob <bob@example.org>\n"
               "Date: Mon, Jun 3, 2024 at 9:00 AM\nSubject: Broken\nTo: <jane@example.com>\n\n"
               "> quoted in the forward\nThe device is broken.\n")
    assert strip_reply(forward) == forward.rstrip("\n")
    apple = "Begin forwarded message:\n\nFrom: Bob <bob@example.org>\nSubject: Broken\nDate: 3 June 2024\n\nHi"
    assert strip_reply(apple) == apple


def test_windows_newlines_are_normalized() -> None:
    assert strip_reply("Yes\r\n\r\nOn Mon, 3 Jun 2024, Acme wrote:\r\n> q\r\n") == "Yes"


# --------------------------------------------------------------------------------------------
# Authentication verdicts

GOOGLE_RESULTS = ("mx.google.com;\r\n       dkim=pass header.i=@example.com header.s=20230601 header.b=AbCd;\r\n"
                  "       spf=pass (google.com: domain of jane@example.com designates 192.0.2.1 as permitted sender;"
                  " see \"x\") smtp.mailfrom=jane@example.com;\r\n"
                  "       dmarc=pass (p=NONE sp=NONE dis=NONE) header.from=example.com")


def test_trusted_results_pass_and_align() -> None:
    verdict = parse_authentication_results([GOOGLE_RESULTS], {"MX.Google.com"})
    assert verdict == AuthVerdict(spf="pass", dkim="pass", dmarc="pass", aligned=True)
    assert is_spoofed(verdict) is False


def test_forged_results_from_an_untrusted_server_are_ignored() -> None:
    forged = "mx.acme.test.evil; spf=pass smtp.mailfrom=ceo@acme.test; dkim=pass header.d=acme.test; dmarc=pass"
    ours = "mx.acme.test; spf=fail smtp.mailfrom=ceo@acme.test; dkim=none; dmarc=fail header.from=acme.test"
    verdict = parse_authentication_results([forged, ours], {"mx.acme.test"}, from_domain="acme.test")
    assert verdict == AuthVerdict(spf="fail", dkim="none", dmarc="fail", aligned=False)
    assert is_spoofed(verdict) is True
    only_forged = parse_authentication_results([forged], {"mx.acme.test"}, from_domain="acme.test")
    assert only_forged == AuthVerdict() and is_spoofed(only_forged) is True


def test_passes_for_other_domains_do_not_align() -> None:
    value = ("mx.acme.test; dkim=pass header.d=sendgrid.net; spf=pass smtp.mailfrom=bounces+123@em.sendgrid.net;"
             " dmarc=none header.from=example.com")
    verdict = parse_authentication_results([value], {"mx.acme.test"})
    assert (verdict.spf, verdict.dkim, verdict.aligned) == ("pass", "pass", False)
    assert is_spoofed(verdict) is True


def test_relaxed_alignment_with_parent_domains() -> None:
    value = "mx.acme.test 1; dkim=pass header.d=Example.com; spf=softfail smtp.mailfrom=example.net"
    assert parse_authentication_results([value], {"mx.acme.test"}, from_domain="mail.example.com").aligned is True
    spf_only = "mx.acme.test; spf=pass smtp.mailfrom=bounce.example.com; dkim=fail header.d=example.com"
    verdict = parse_authentication_results([spf_only], {"mx.acme.test"}, from_domain="example.com")
    assert verdict.aligned is False and verdict.dkim == "fail"
    spf_parent = "mx.acme.test; spf = pass smtp.mailfrom = \"x@example.com\""
    assert parse_authentication_results([spf_parent], {"mx.acme.test"}, from_domain="shop.example.com").aligned


def test_dmarc_failure_is_spoofed_even_when_aligned() -> None:
    assert is_spoofed(AuthVerdict(spf="pass", dkim="pass", dmarc="fail", aligned=True)) is True
    assert is_spoofed(AuthVerdict(spf="pass", dkim="none", dmarc="none", aligned=True)) is False


def test_any_passing_dkim_signature_counts() -> None:
    value = "mx.acme.test; dkim=fail header.d=example.com; dkim=pass header.d=example.com; none"
    verdict = parse_authentication_results([value], {"mx.acme.test"}, from_domain="example.com")
    assert verdict.dkim == "pass" and verdict.aligned is True


def test_none_and_malformed_results_are_harmless() -> None:
    values = ["mx.acme.test; none", "mx.acme.test", "", ";;;", "mx.acme.test; (unterminated comment",
              "mx.acme.test; " + "x" * 20_000 + "=pass"]
    assert parse_authentication_results(values, {"mx.acme.test"}, from_domain="example.com") == AuthVerdict()


@pytest.mark.parametrize(("domain", "from_domain", "aligned"), [
    ("example.com", "example.com", True),
    ("example.com", "mail.example.com", True),
    ("mail.example.com", "example.com", False),
    ("com", "example.com", False),
    ("ample.com", "example.com", False),
    ("", "example.com", False),
])
def test_domains_aligned(domain: str, from_domain: str, aligned: bool) -> None:
    assert domains_aligned(domain, from_domain) is aligned


def mailgun_headers(*pairs: tuple[str, str]) -> str:
    return json.dumps([list(pair) for pair in pairs])


def test_mailgun_verdicts() -> None:
    passing = {"from": "Jane <jane@example.com>", "sender": "bounce@example.com",
               "message-headers": mailgun_headers(("X-Mailgun-Spf", "Pass"), ("X-Mailgun-Dkim-Check-Result", "Fail"),
                                                  ("X-Mailgun-Spf", "Fail"))}
    assert verdict_from_mailgun(passing) == AuthVerdict(spf="pass", dkim="fail", dmarc="none", aligned=True)
    dkim_signed = {"from": "jane@example.com", "sender": "bounces@esp.test",
                   "message-headers": mailgun_headers(
                       ("X-Mailgun-Spf", "Pass"), ("X-Mailgun-Dkim-Check-Result", "Pass"),
                       ("DKIM-Signature", "v=1; a=rsa-sha256; c=relaxed/relaxed;\r\n d=example.com; s=s1; b=x"))}
    assert verdict_from_mailgun(dkim_signed).aligned is True
    two_signatures = {**dkim_signed, "message-headers": mailgun_headers(
        ("X-Mailgun-Dkim-Check-Result", "Pass"), ("DKIM-Signature", "v=1; d=example.com; b=x"),
        ("DKIM-Signature", "v=1; d=esp.test; b=y"))}
    assert verdict_from_mailgun(two_signatures).aligned is False
    failing = {"from": "jane@example.com", "sender": "jane@example.com", "X-Mailgun-Spf": "Fail"}
    assert verdict_from_mailgun(failing) == AuthVerdict(spf="fail", dkim="none", dmarc="none", aligned=False)
    assert is_spoofed(verdict_from_mailgun(failing)) is True


def test_sendgrid_verdicts() -> None:
    assert verdict_from_sendgrid("pass", "{@example.com : pass}", "example.com") == AuthVerdict(
        spf="pass", dkim="pass", dmarc="none", aligned=True)
    several = verdict_from_sendgrid("pass", "{@sendgrid.net : pass, @example.com : fail}", "example.com")
    assert (several.dkim, several.aligned) == ("pass", False)
    assert verdict_from_sendgrid("pass", "none", "example.com", envelope_from="jane@example.com").aligned is True
    assert verdict_from_sendgrid("pass", "none", "example.com", envelope_from="x@evil.test").aligned is False
    assert verdict_from_sendgrid("softfail", "{@example.com : fail}", "example.com") == AuthVerdict(
        spf="softfail", dkim="fail", dmarc="none", aligned=False)


# --------------------------------------------------------------------------------------------
# DKIM verification with a key made here


@pytest.fixture(scope="module")
def dkim_key() -> tuple[bytes, bytes]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.DER,
                                           serialization.PublicFormat.SubjectPublicKeyInfo)
    return private, b"v=DKIM1; k=rsa; p=" + base64.b64encode(public)


SIGNED_MAIL = b"From: Jane <jane@example.com>\r\nTo: reply@acme.test\r\nSubject: hi\r\n\r\nHello there.\r\n"


def dns_for(record: bytes) -> Callable[..., bytes | None]:
    def lookup(name: bytes, timeout: int = 5) -> bytes | None:
        return record if name == b"sel._domainkey.example.com." else None
    return lookup


def test_verify_dkim_accepts_a_good_signature(dkim_key: tuple[bytes, bytes]) -> None:
    private, record = dkim_key
    signed = dkim.sign(SIGNED_MAIL, b"sel", b"example.com", private) + SIGNED_MAIL
    assert verify_dkim(signed, dns_for(record)) == ["example.com"]


def test_verify_dkim_refuses_tampering_missing_keys_and_length_limits(dkim_key: tuple[bytes, bytes]) -> None:
    private, record = dkim_key
    signed = dkim.sign(SIGNED_MAIL, b"sel", b"example.com", private) + SIGNED_MAIL
    assert verify_dkim(signed.replace(b"Hello there.", b"Send money."), dns_for(record)) == []
    assert verify_dkim(signed, lambda name, timeout=5: None) == []
    assert verify_dkim(signed, dns_for(b"v=DKIM1; k=rsa; p=garbage")) == []
    assert verify_dkim(SIGNED_MAIL, dns_for(record)) == []
    assert verify_dkim(b"\x00\xff not a mail", dns_for(record)) == []
    limited = dkim.sign(SIGNED_MAIL, b"sel", b"example.com", private, length=True) + SIGNED_MAIL
    assert dkim.verify(limited + b"Appended by an attacker.\r\n", dnsfunc=dns_for(record)) is True
    assert verify_dkim(limited + b"Appended by an attacker.\r\n", dns_for(record)) == []


# --------------------------------------------------------------------------------------------
# Mailgun and SendGrid inbound

MAILGUN_KEY = "key-test"
MAILGUN_TIMESTAMP = "1770920772"
MAILGUN_TOKEN = "e0b5477167110d68991efc6b9f89f0a11066af27834600e123"
MAILGUN_SIGNATURE = "097ff1603ce0947833a030fe6b23a46d9597fc9835f074f252b2e662274fb61c"


def test_mailgun_signature_vector() -> None:
    now = float(MAILGUN_TIMESTAMP) + 10
    assert mailgun_signature_valid(MAILGUN_KEY, MAILGUN_TIMESTAMP, MAILGUN_TOKEN, MAILGUN_SIGNATURE, now) is True
    assert mailgun_signature_valid("key-other", MAILGUN_TIMESTAMP, MAILGUN_TOKEN, MAILGUN_SIGNATURE, now) is False
    assert mailgun_signature_valid(MAILGUN_KEY, MAILGUN_TIMESTAMP, MAILGUN_TOKEN[:-1] + "4", MAILGUN_SIGNATURE,
                                   now) is False


@pytest.mark.parametrize(("timestamp", "signature", "now_offset"), [
    (MAILGUN_TIMESTAMP, MAILGUN_SIGNATURE, 301),
    (MAILGUN_TIMESTAMP, MAILGUN_SIGNATURE, -301),
    (MAILGUN_TIMESTAMP + ".0", MAILGUN_SIGNATURE, 0),
    ("١٧٧٠٩٢٠٧٧٢", MAILGUN_SIGNATURE, 0),
    ("", MAILGUN_SIGNATURE, 0),
    (MAILGUN_TIMESTAMP, "é" + MAILGUN_SIGNATURE[1:], 0),
    (MAILGUN_TIMESTAMP, "", 0),
])
def test_mailgun_signature_refusals(timestamp: str, signature: str, now_offset: float) -> None:
    now = float(MAILGUN_TIMESTAMP) + now_offset
    assert mailgun_signature_valid(MAILGUN_KEY, timestamp, MAILGUN_TOKEN, signature, now) is False


def mailgun_fields(**extra: str) -> dict[str, str]:
    fields = {
        "recipient": "reply+abc@mail.acme.test",
        "sender": "bounce@Example.com",
        "from": "Jane Doe <jane@Example.com>",
        "subject": "Re: Your order",
        "body-plain": ("Ship it Friday.\r\n\r\nOn Mon, Jun 3, 2024 at 10:00 AM Acme <x@acme.test> wrote:\r\n"
                       "> Ready.\r\n"),
        "stripped-text": "Ship it Friday.",
        "message-headers": mailgun_headers(
            ("X-Mailgun-Spf", "Pass"), ("Message-Id", "<m1@example.com>"), ("In-Reply-To", "<o1@acme.test>"),
            ("References", "<o0@acme.test> <o1@acme.test>"), ("To", "Acme <reply+abc@mail.acme.test>"),
            ("Cc", "boss@example.com"), ("From", "Jane Doe <jane@Example.com>"), ("Bad Header\r\nX", "dropped")),
        "content-id-map": json.dumps({"<img1@example.com>": "attachment-2"}),
        "timestamp": MAILGUN_TIMESTAMP, "token": MAILGUN_TOKEN, "signature": MAILGUN_SIGNATURE,
    }
    fields.update(extra)
    return fields


def test_inbound_from_mailgun_maps_fields_and_headers() -> None:
    files = [MailAttachment("inv\x00oice.pdf", "application/pdf", b"%PDF"), MailAttachment("a.png", "image/png", b"P")]
    mail = inbound_from_mailgun(mailgun_fields(), files)
    assert (mail.from_address, mail.from_name) == ("jane@example.com", "Jane Doe")
    assert mail.envelope_to == ["reply+abc@mail.acme.test"] and mail.envelope_from == "bounce@example.com"
    assert mail.to == ["reply+abc@mail.acme.test"] and mail.cc == ["boss@example.com"]
    assert mail.subject == "Re: Your order" and mail.message_id == "<m1@example.com>"
    assert mail.in_reply_to == "<o1@acme.test>" and mail.references == ["<o0@acme.test>", "<o1@acme.test>"]
    assert mail.text == "Ship it Friday." and "> Ready." in mail.full_text and "\r" not in mail.full_text
    assert mail.attachments == [MailAttachment("invoice.pdf", "application/pdf", b"%PDF"),
                                MailAttachment("a.png", "image/png", b"P", "img1@example.com")]
    assert mail.auto_submitted is False


def test_inbound_from_mailgun_flags_auto_replies_and_reads_html() -> None:
    fields = mailgun_fields(**{"body-plain": "", "body-html": "<p>Out of office &amp; away</p>",
                               "message-headers": mailgun_headers(("Auto-Submitted", "auto-replied"))})
    mail = inbound_from_mailgun(fields, [])
    assert mail.auto_submitted is True and mail.text == "Out of office & away"


def test_inbound_from_mailgun_raw_mime() -> None:
    fields = {"recipient": "reply+abc@mail.acme.test", "sender": "jane@example.com",
              "body-mime": GMAIL_REPLY.decode()}
    mail = inbound_from_mailgun(fields, [])
    assert mail.text.startswith("Thanks, that works for me.") and mail.envelope_to == ["reply+abc@mail.acme.test"]
    assert mail.message_id == "<CAF=abc123@mail.gmail.com>"
    with pytest.raises(MailRejected, match="nesting"):
        inbound_from_mailgun({"body-mime": nested_multiparts(10_000).decode()}, [])


def test_inbound_from_mailgun_limits() -> None:
    files = [MailAttachment(f"f{n}", "text/plain", b"x") for n in range(21)]
    with pytest.raises(MailRejected, match="more than 20 attachments"):
        inbound_from_mailgun(mailgun_fields(), files)
    with pytest.raises(MailRejected, match="message larger than 1000 bytes"):
        inbound_from_mailgun(mailgun_fields(), [MailAttachment("big", "x/y", b"x" * 1000)], MailLimits(max_bytes=1000))
    assert len(inbound_from_mailgun(mailgun_fields(), [], MailLimits(max_text_chars=10)).full_text) <= 10
    with pytest.raises(MailRejected, match="message-headers"):
        inbound_from_mailgun(mailgun_fields(**{"message-headers": "[" * 5000}), [])
    with pytest.raises(MailRejected, match="message-headers"):
        inbound_from_mailgun(mailgun_fields(**{"message-headers": json.dumps({"not": "a list"})}), [])


def sendgrid_form(name: str) -> tuple[dict[str, str], list[MailAttachment]]:
    body = (SENDGRID_SAMPLES / f"{name}.txt").read_bytes()
    form = email.message_from_bytes(b"Content-Type: multipart/form-data; boundary=xYzZY\r\n\r\n" + body,
                                    policy=email.policy.default)
    fields: dict[str, str] = {}
    files: list[MailAttachment] = []
    for part in form.iter_parts():
        payload = part.get_payload(decode=True)
        assert isinstance(payload, bytes)
        filename = part.get_filename()
        if filename:
            files.append(MailAttachment(filename, part.get_content_type(), payload))
        else:
            fields[str(part.get_param("name", header="content-disposition"))] = payload.decode()
    return fields, files


def test_sendgrid_default_sample() -> None:
    fields, files = sendgrid_form("default_data")
    assert {"headers", "text", "html", "envelope", "SPF", "dkim"} <= fields.keys() and files == []
    mail = inbound_from_sendgrid(fields, files)
    assert (mail.from_address, mail.from_name) == ("test@example.com", "Example User")
    assert mail.to == ["inbound@inbound.example.com"] and mail.envelope_to == ["inbound@inbound.example.com"]
    assert mail.envelope_from == "test@example.com" and mail.subject == "Testing non-raw"
    assert mail.text == "Hello Twilio SendGrid!" and mail.attachments == []
    verdict = verdict_from_sendgrid(fields["SPF"], fields["dkim"], mail.from_domain, mail.envelope_from)
    assert verdict == AuthVerdict(spf="pass", dkim="pass", dmarc="none", aligned=True)
    assert verdict_from_sendgrid(fields["SPF"], fields["dkim"], mail.from_domain).aligned is False


def test_sendgrid_raw_samples() -> None:
    fields, files = sendgrid_form("raw_data")
    mail = inbound_from_sendgrid(fields, files)
    assert mail.subject == "Inbound Parse Test Raw Data" and mail.text == "Hello Twilio SendGrid!"
    assert mail.envelope_to == ["inbound@inbound.inbound.com"] and mail.envelope_from == "test@example.com"
    fields, files = sendgrid_form("raw_data_with_attachments")
    mail = inbound_from_sendgrid(fields, files)
    [photo] = mail.attachments
    assert (photo.filename, photo.media_type) == ("SendGrid.jpg", "image/jpeg")
    assert photo.data.startswith(b"\xff\xd8") and photo.data.endswith(b"\xff\xd9")


def test_sendgrid_parsed_fields_with_threading_and_content_ids() -> None:
    fields = {
        "headers": ("Message-ID: <s1@example.com>\nIn-Reply-To: <o1@acme.test>\nReferences: <o1@acme.test>\n"
                    "Precedence: bulk\nFrom: x@example.com\n"),
        "from": "Jane <jane@example.com>", "to": "reply+abc@mail.acme.test", "cc": "a@example.com, b@example.com",
        "subject": "Re: hi", "text": "Yes.\n\n> Are you there?\n", "envelope": "not json",
        "content-ids": json.dumps({"ii_abc": "attachment1"}),
    }
    mail = inbound_from_sendgrid(fields, [MailAttachment("p\r\n.png", "image/png", b"P")])
    assert mail.message_id == "<s1@example.com>" and mail.in_reply_to == "<o1@acme.test>"
    assert mail.references == ["<o1@acme.test>"] and mail.auto_submitted is True
    assert mail.cc == ["a@example.com", "b@example.com"] and mail.text == "Yes."
    assert mail.attachments == [MailAttachment("p.png", "image/png", b"P", "ii_abc")]
    assert mail.envelope_to == [] and mail.from_address == "jane@example.com"


def test_sendgrid_limits() -> None:
    with pytest.raises(MailRejected, match="header section larger"):
        inbound_from_sendgrid({"headers": "X: y\n" * 20_000, "text": "hi"}, [])
    with pytest.raises(MailRejected, match="more than 100 MIME parts"):
        inbound_from_sendgrid({"email": many_parts(1_000).decode()}, [])
    with pytest.raises(MailRejected, match="message larger than 10 bytes"):
        inbound_from_sendgrid({"text": "more than ten bytes"}, [], MailLimits(max_bytes=10))


def test_address_lists_never_raise() -> None:
    assert parse_address_list('"Doe, Jane" <Jane@EXAMPLE.com>, bob@x.test') == [
        ("Doe, Jane", "Jane@example.com"), ("", "bob@x.test")]
    assert parse_address_list("<<<>>>,,,@@@") == []
    assert parse_address_list("undisclosed-recipients:;") == []


# --------------------------------------------------------------------------------------------
# Outbound threading


@pytest.mark.parametrize(("subject", "expected"), [
    ("Your order", "Re: Your order"),
    ("Re: Your order", "Re: Your order"),
    ("RE: Re: re:Your order", "Re: Your order"),
    ("AW: Ihre Bestellung", "Re: Ihre Bestellung"),
    ("Re[2]: Order", "Re: Order"),
    ("Sv: Vs: Order", "Re: Order"),
    ("Fwd: Order", "Re: Fwd: Order"),
    ("Regarding the order", "Re: Regarding the order"),
    ("Line\r\nBcc: victim@x.test", "Re: Line Bcc: victim@x.test"),
])
def test_reply_subject(subject: str, expected: str) -> None:
    assert reply_subject(subject) == expected


def test_reply_headers_thread_under_the_last_inbound() -> None:
    inbound = InboundMail(subject="Re: Re: Your order", message_id="<in2@example.com>",
                          references=["<out1@acme.test>", "<in1@example.com>", "<out2@acme.test>"])
    headers = reply_headers("Your order", inbound, ["<out1@acme.test>", "<in1@example.com>", "<out2@acme.test>",
                                                    "<in2@example.com>"])
    assert headers == {
        "Subject": "Re: Your order",
        "In-Reply-To": "<in2@example.com>",
        "References": "<out1@acme.test> <in1@example.com> <out2@acme.test> <in2@example.com>",
    }


def test_reply_headers_bound_references_to_first_and_last() -> None:
    previous = [f"<m{n}@acme.test>" for n in range(30)]
    inbound = InboundMail(subject="Order", message_id="<last@example.com>", references=previous[:5])
    references = reply_headers(None, inbound, previous)["References"].split(" ")
    assert len(references) == 10
    assert references[0] == "<m0@acme.test>" and references[-1] == "<last@example.com>"
    assert references[1:-1] == previous[-8:]


def test_reply_headers_without_inbound_or_history() -> None:
    assert reply_headers("Welcome", None, []) == {"Subject": "Welcome"}
    assert reply_headers("Welcome", None, ["<a@acme.test>", "<b@acme.test>"]) == {
        "Subject": "Re: Welcome", "In-Reply-To": "<b@acme.test>", "References": "<a@acme.test> <b@acme.test>"}
    assert reply_headers(None, None, []) == {}
    assert reply_headers("  ", InboundMail(), []) == {}


def test_reply_headers_drop_ids_that_could_inject_headers() -> None:
    inbound = InboundMail(subject="Hi\r\nBcc: x@evil.test", message_id="<ok@example.com>\r\nBcc: x@evil.test",
                          references=["<a@b>\r\n<c@d>", "bare@example.com", "<" + "x" * 400 + "@y>"])
    headers = reply_headers(None, inbound, ["<good@acme.test>"])
    assert all("\r" not in value and "\n" not in value for value in headers.values())
    assert headers["Subject"] == "Re: Hi Bcc: x@evil.test"
    assert headers["In-Reply-To"] == "<ok@example.com>"
    assert headers["References"] == "<bare@example.com> <good@acme.test> <ok@example.com>"


def test_a_customer_line_right_above_an_attribution_is_kept() -> None:
    text = ("On my side all is fine.\nOn Mon, Jun 3, 2024 at 10:00 AM Acme <s@acme.test> wrote:\n> q\n"
            "Danke!\nAcme Support <s@acme.test> schrieb am 03.06.2024 um 10:00:\n> q\n")
    assert strip_reply(text) == "On my side all is fine.\nDanke!"


def test_only_the_topmost_trusted_authentication_results_counts() -> None:
    """A sender's own header claiming the trusted MTA's id, below the MTA's, vouches for nothing
    (even when the MTA's says nothing of DKIM at all)."""
    trusted = {"mx.trusted.example"}
    forged = "mx.trusted.example; dkim=pass header.d=victim.example; dmarc=pass header.from=victim.example"
    for genuine in ("mx.trusted.example; spf=softfail smtp.mailfrom=victim.example; dkim=none",
                    "mx.trusted.example; none"):
        verdict = parse_authentication_results([genuine, forged], trusted, "victim.example")
        assert verdict.dkim != "pass" and not verdict.aligned, genuine
    assert parse_authentication_results([forged], trusted, "victim.example").aligned
