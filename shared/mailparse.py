"""The pure core of the e-mail channel: reply addresses, inbound parsing, reply extraction,
sender authentication verdicts, Mailgun and SendGrid inbound fields, and outbound threading.

Nothing here touches the network. Everything an inbound mail brings is hostile until checked:
size, MIME nesting, part and attachment counts, header sizes and charsets are bounded before or
while parsing, and a message over a limit is refused with `MailRejected` (a ValueError whose
`reason` is a sentence for logs and the 406/550 answer), never with a RecursionError or by
exhausting memory.

A customer replies to `reply+<token>@<domain>`; the token carries the app and conversation ids
and a MAC, so the address alone routes the reply and a forged or altered one is refused.
"""

from __future__ import annotations

import base64
import binascii
import email.message
import email.parser
import email.policy
import email.utils
import hashlib
import hmac
import re
import unicodedata
from collections.abc import Callable, Iterable, Mapping
from html.parser import HTMLParser
from typing import Any

import dkim
import msgspec

from shared.untrusted import decode_json, secrets_equal

# --------------------------------------------------------------------------------------------
# Types


class MailRejected(ValueError):
    """The message is refused (too large, too deeply nested, too many parts, unreadable, …).

    `reason` is a human sentence fit for a log line and for the SMTP/webhook refusal.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class MailLimits(msgspec.Struct, frozen=True, kw_only=True):
    """Bounds applied to one inbound message; exceeding any raises `MailRejected`."""

    max_bytes: int = 25 * 1024 * 1024
    max_parts: int = 100
    max_depth: int = 10
    max_attachments: int = 20
    max_text_chars: int = 100_000
    max_header_bytes: int = 64 * 1024


class MailAttachment(msgspec.Struct, frozen=True):
    """One attached (or inline) file. `filename` is as the sender gave it, less control
    characters ("" when none was given): make it safe before using it as a path."""

    filename: str
    media_type: str
    data: bytes
    content_id: str | None = None


class InboundMail(msgspec.Struct, frozen=True, kw_only=True):
    """One received e-mail, normalized whichever way it arrived (raw MIME, Mailgun, SendGrid).

    Addresses keep their local part as sent and have a lower-cased domain. Message ids keep
    their angle brackets. `text` is the new text of the reply (`strip_reply` of `full_text`).
    """

    from_address: str = ""
    from_name: str = ""
    to: list[str] = msgspec.field(default_factory=list)
    cc: list[str] = msgspec.field(default_factory=list)
    envelope_to: list[str] = msgspec.field(default_factory=list)
    envelope_from: str = ""
    subject: str = ""
    message_id: str = ""
    in_reply_to: str = ""
    references: list[str] = msgspec.field(default_factory=list)
    text: str = ""
    full_text: str = ""
    attachments: list[MailAttachment] = msgspec.field(default_factory=list)
    auto_submitted: bool = False
    authentication_results: list[str] = msgspec.field(default_factory=list)

    @property
    def from_domain(self) -> str:
        """The domain of `from_address` ("" without one)."""
        return _domain_of(self.from_address)

    @property
    def recipients(self) -> list[str]:
        """Every address the mail was delivered or addressed to: envelope first, then To, Cc."""
        return _unique([*self.envelope_to, *self.to, *self.cc])


class AuthVerdict(msgspec.Struct, frozen=True):
    """What the receiving side concluded about the sender: SPF, DKIM and DMARC results
    (`pass`, `fail`, `softfail`, `neutral`, `none`, `temperror`, `permerror`, …) and whether a
    passing SPF or DKIM result is aligned with the From domain."""

    spf: str = "none"
    dkim: str = "none"
    dmarc: str = "none"
    aligned: bool = False


# --------------------------------------------------------------------------------------------
# Signed per-conversation reply addresses

_ID_BYTES = 12
_TAG_BYTES = 10
_TOKEN_CHARS = 55  # base32 of 12 + 12 + 10 bytes, unpadded
_BASE32_ALPHABET = frozenset("abcdefghijklmnopqrstuvwxyz234567")
_HEX_ID = re.compile(r"[0-9a-fA-F]{24}")
_LOCAL_PART = re.compile(r"[A-Za-z0-9._-]{1,8}")
_REPLY_KEY_LABEL = b"threadline mail reply address v1"
_MIN_SECRET_BYTES = 16


def _reply_tag(secret: bytes, ids: bytes) -> bytes:
    if len(secret) < _MIN_SECRET_BYTES:
        raise ValueError(f"the reply address secret must be at least {_MIN_SECRET_BYTES} bytes")
    # A key of its own, so the same deployment secret can sign other things without a token
    # minted here ever being valid there (or the reverse).
    key = hmac.new(secret, _REPLY_KEY_LABEL, hashlib.sha256).digest()
    return hmac.new(key, ids, hashlib.sha256).digest()[:_TAG_BYTES]


def reply_address(secret: bytes, app_id: str, conversation_id: str, local_part: str, domain: str) -> str:
    """`<local_part>+<token>@<domain>`, the address a customer replies to for one conversation.

    The token is lower-case unpadded base32 of the two 12-byte ids and an 80-bit HMAC-SHA256
    tag, 55 characters, so it survives mail systems that case-fold local parts and keeps the
    local part within RFC 5321's 64 octets (`local_part` is at most 8 characters for that).
    Raises ValueError for ids that are not 24-hex, a bad local part or domain, or a short secret.
    """
    if not _HEX_ID.fullmatch(app_id) or not _HEX_ID.fullmatch(conversation_id):
        raise ValueError("app_id and conversation_id must be 24-hex ids")
    if not _LOCAL_PART.fullmatch(local_part):
        raise ValueError("local_part must be 1-8 characters of letters, digits, '.', '_' or '-'")
    if not domain or any(ch in domain for ch in "@<> \t\r\n"):
        raise ValueError("domain must be a bare domain name")
    ids = bytes.fromhex(app_id) + bytes.fromhex(conversation_id)
    token = base64.b32encode(ids + _reply_tag(secret, ids)).decode().rstrip("=").lower()
    return f"{local_part}+{token}@{domain.lower()}"


def parse_reply_address(secret: bytes, address: str) -> tuple[str, str] | None:
    """`(app_id, conversation_id)` of a reply address made by `reply_address`, or None when the
    address carries no token or a forged or altered one (the tag is compared in constant time).

    Any case change is accepted, as is a display-name form (`Name <reply+…@domain>`). The
    domain is not checked: the tag alone says the token was minted here.
    """
    _name, addr_spec = email.utils.parseaddr(address)
    local, at, _domain = (addr_spec or address).strip().rpartition("@")
    if not at:
        return None
    _prefix, plus, token = local.rpartition("+")
    token = token.lower()
    if not plus or len(token) != _TOKEN_CHARS or not set(token) <= _BASE32_ALPHABET:
        return None
    try:
        raw = base64.b32decode(token.upper() + "=")
    except (binascii.Error, ValueError):
        return None
    # The last character carries 3 unused bits: insisting on the canonical spelling makes any
    # changed character a refusal rather than an alias of the same token.
    if base64.b32encode(raw).decode().rstrip("=").lower() != token:
        return None
    ids, tag = raw[: 2 * _ID_BYTES], raw[2 * _ID_BYTES:]
    if not hmac.compare_digest(_reply_tag(secret, ids), tag):
        return None
    return ids[:_ID_BYTES].hex(), ids[_ID_BYTES:].hex()


def conversation_for_mail(secret: bytes, mail: InboundMail) -> tuple[str, str] | None:
    """`(app_id, conversation_id)` from the first genuine reply address among the mail's
    recipients (envelope, To, Cc), or None when it was sent to none."""
    for address in mail.recipients:
        found = parse_reply_address(secret, address)
        if found is not None:
            return found
    return None


# --------------------------------------------------------------------------------------------
# Text helpers

_BIDI_CONTROLS = frozenset("\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def _repair(text: str) -> str:
    # Undecodable header bytes arrive as lone surrogates (surrogateescape); read them as the
    # UTF-8 they almost always are. NULs are dropped: PostgreSQL text cannot hold them.
    if any("\udc80" <= ch <= "\udcff" for ch in text):
        text = text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    if any("\ud800" <= ch <= "\udfff" for ch in text):
        text = text.encode("utf-8", "replace").decode("utf-8")
    return text.replace("\x00", "")


def _one_line(text: str) -> str:
    return " ".join(_repair(text).split())


def clean_filename(name: str) -> str:
    """`name` less its control characters (NUL, CR, LF, C1, …) and bidirectional overrides,
    which disguise names in a file list; nothing else changes, path tricks included."""
    return "".join(ch for ch in _repair(name) if unicodedata.category(ch) != "Cc" and ch not in _BIDI_CONTROLS)


def _domain_of(address: str) -> str:
    return address.rpartition("@")[2].lower() if "@" in address else ""


def _normal_address(username: str, domain: str) -> str:
    username, domain = _one_line(username), _one_line(domain).lower()
    if not username or not domain:
        return username
    return f"{username}@{domain}"


def _unique(items: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(item for item in items if item))


_UNDECLARED_CHARSETS = ("", "us-ascii", "ascii", "unknown-8bit", "x-unknown", "unknown", "default")


def decode_text(data: bytes, charset: str | None) -> str:
    """`data` as text in `charset`, never raising: an unknown or unusable charset falls back to
    UTF-8, an undeclared or ASCII one reads UTF-8 first and Windows-1252 when that fails, and
    undecodable bytes become U+FFFD."""
    name = (charset or "").strip().strip('"').lower()
    if name in _UNDECLARED_CHARSETS:
        try:
            return _repair(data.decode("utf-8"))
        except UnicodeDecodeError:
            return _repair(data.decode("cp1252", "replace"))
    try:
        return _repair(data.decode(name, "replace"))
    except (LookupError, UnicodeError, ValueError, TypeError):
        # LookupError for unknown names and for bytes-to-bytes codecs (hex, zlib, …);
        # UnicodeError for codecs that refuse the "replace" handler (idna).
        return _repair(data.decode("utf-8", "replace"))


def _normal_newlines(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _unflow(text: str, delsp: bool) -> str:
    """RFC 3676 format=flowed text joined back into paragraphs."""
    out: list[str] = []
    paragraph: str | None = None
    paragraph_depth = 0

    def flush() -> None:
        nonlocal paragraph
        if paragraph is not None:
            out.append(("> " * paragraph_depth if paragraph_depth else "") + paragraph)
            paragraph = None

    for line in text.split("\n"):
        depth = len(line) - len(line.lstrip(">"))
        content = line[depth:]
        if content.startswith(" "):
            content = content[1:]
        if content == "-- ":
            flush()
            out.append(("> " * depth if depth else "") + content)
            continue
        soft = content.endswith(" ")
        if soft and delsp:
            content = content[:-1]
        if paragraph is not None and depth == paragraph_depth:
            paragraph += content
        else:
            flush()
            paragraph, paragraph_depth = content, depth
        if not soft:
            flush()
    flush()
    return "\n".join(out)


# --------------------------------------------------------------------------------------------
# HTML to text

_BLOCK_TAGS = frozenset({
    "address", "article", "aside", "blockquote", "center", "dd", "div", "dl", "dt", "fieldset",
    "figcaption", "figure", "footer", "form", "h1", "h2", "h3", "h4", "h5", "h6", "header", "hr",
    "li", "main", "nav", "ol", "p", "pre", "section", "table", "tbody", "thead", "tfoot", "tr", "ul",
})
_PARAGRAPH_TAGS = frozenset({"p", "h1", "h2", "h3", "h4", "h5", "h6", "blockquote", "pre", "table", "ul", "ol"})
_HIDDEN_TAGS = frozenset({"script", "style", "title", "template", "head"})
_HTML_CHUNK = 64 * 1024


class _TextFromHtml(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.lines: list[str] = []
        self.chars = 0
        self._line: list[str] = []
        self._line_quote = 0
        self._quote = 0
        self._hidden = 0
        self._pre = 0
        self._blank_pending = False
        self._href: str | None = None

    def _flush(self, keep_empty: bool = False) -> None:
        text = "".join(self._line).rstrip()
        if text or keep_empty:
            depth = self._line_quote if text else self._quote
            prefix = "> " * depth
            line = (prefix + text) if text else prefix.rstrip()
            self.lines.append(line)
            self.chars += 1
        self._line = []

    def _paragraph(self) -> None:
        self._flush()
        self._blank_pending = True

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "body":
            # Mail HTML often never closes its <head>; the body is shown all the same.
            self._hidden = 0
        if tag in _HIDDEN_TAGS:
            self._hidden += 1
            return
        if tag == "br":
            self._flush(keep_empty=True)
        elif tag in _PARAGRAPH_TAGS:
            self._paragraph()
        elif tag in _BLOCK_TAGS:
            self._flush()
        elif tag in ("td", "th") and self._line:
            self._line.append(" ")
        if tag == "blockquote":
            self._quote += 1
        elif tag == "pre":
            self._pre += 1
        elif tag == "a":
            self._href = dict(attrs).get("href")

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _HIDDEN_TAGS:
            return
        self.handle_starttag(tag, attrs)

    def handle_endtag(self, tag: str) -> None:
        if tag in _HIDDEN_TAGS:
            self._hidden = max(0, self._hidden - 1)
            return
        if tag == "blockquote":
            self._paragraph()
            self._quote = max(0, self._quote - 1)
        elif tag == "pre":
            self._paragraph()
            self._pre = max(0, self._pre - 1)
        elif tag in _PARAGRAPH_TAGS:
            self._paragraph()
        elif tag in _BLOCK_TAGS:
            self._flush()
        elif tag == "a":
            href, self._href = self._href, None
            # A link's text often hides where it goes ("click here"): keep the address.
            if href and href.lower().startswith(("http://", "https://")) and href not in "".join(self._line):
                self._append(f" <{href}>")

    def handle_data(self, data: str) -> None:
        if self._hidden:
            return
        if self._pre:
            pieces = data.split("\n")
            for index, piece in enumerate(pieces):
                if index:
                    self._flush(keep_empty=True)
                self._append(piece)
            return
        text = re.sub(r"\s+", " ", data)
        if not self._line:
            text = text.lstrip()
        self._append(text)

    def _append(self, text: str) -> None:
        if not text:
            return
        if not self._line:
            if self._blank_pending and self.lines and self.lines[-1].strip("> "):
                self.lines.append(("> " * self._quote).rstrip())
            self._blank_pending = False
            self._line_quote = self._quote
        self._line.append(text)
        self.chars += len(text)

    def finish(self) -> str:
        self.close()
        self._flush()
        text = "\n".join(line.rstrip() for line in self.lines)
        return re.sub(r"\n{3,}", "\n\n", text).strip("\n")


TRUNCATION_MARK = "\n[…]"


def truncated(text: str, max_chars: int) -> str:
    """`text`, cut to at most `max_chars` characters with a mark when it is longer."""
    if len(text) <= max_chars:
        return text
    return text[:max(0, max_chars - len(TRUNCATION_MARK))] + TRUNCATION_MARK


def new_text(full_text: str) -> str:
    """What the sender wrote (`strip_reply`) of a possibly `truncated` text: the cut mark stays
    only when the cut fell in their own words."""
    whole = full_text.removesuffix(TRUNCATION_MARK)
    stripped = strip_reply(whole)
    return full_text if stripped == whole.strip() and whole != full_text else stripped


def html_to_text(html: str, max_chars: int | None = None) -> str:
    """Readable plain text of an HTML mail body: scripts, styles and the head dropped, a line
    break for each block element and `<br>`, entities unescaped, `<blockquote>` lines prefixed
    with "> " (so `strip_reply` recognises quoted history), link targets kept after their text.

    Stops reading once the text grows past `max_chars` (when given) and cuts it there (`truncated`).
    """
    parser = _TextFromHtml()
    for start in range(0, len(html), _HTML_CHUNK):
        parser.feed(html[start:start + _HTML_CHUNK])
        if max_chars is not None and parser.chars > max_chars:
            break
    text = parser.finish()
    return text if max_chars is None else truncated(text, max_chars)


# --------------------------------------------------------------------------------------------
# Reply extraction

_MAX_MARKER_LINE = 400
_ATTRIBUTION = re.compile(
    r"^\s*(?:"
    r"on\s.{1,300}?\swrote\s*:"
    r"|le\s.{1,300}?\sa\s+écrit\s*:"
    r"|am\s.{1,300}?\sschrieb\s.{1,300}:"
    r"|.{1,300}?\sschrieb\s+am\s.{1,300}:"
    r"|el\s.{1,300}?\sescribió\s*:"
    r"|op\s.{1,300}?\sschreef\s.{1,300}:"
    r"|em\s.{1,300}?\sescreveu\s*:"
    r")\s*$",
    re.IGNORECASE,
)
_ATTRIBUTION_OPENER = re.compile(r"^\s*(?:on|le|am|el|op|em)\s", re.IGNORECASE)
_ORIGINAL_MESSAGE = re.compile(
    r"^\s*-{2,}\s*(?:original message|ursprüngliche nachricht|originalnachricht|message d'origine"
    r"|mensaje original|oorspronkelijk bericht|mensagem original)\s*-{2,}\s*$",
    re.IGNORECASE,
)
_FORWARD_MARKER = re.compile(
    r"^\s*(?:-{3,}\s*(?:forwarded message|weitergeleitete nachricht|message transféré|mensaje reenviado"
    r"|doorgestuurd bericht|mensagem encaminhada)\s*-{3,}|begin forwarded message\s*:)\s*$",
    re.IGNORECASE,
)
_UNDERSCORE_RULE = re.compile(r"^\s*_{10,}\s*$")
_MOBILE_TRAILER = re.compile(
    r"^\s*(?:sent from my\s.{1,60}|sent from (?:mail|outlook|yahoo mail)\b.{0,60}|get outlook for\s.{1,40}"
    r"|sent with proton\s?mail.{0,40}|envoyé de mon\s.{1,60}|envoyé depuis\s.{1,60}"
    r"|von meinem\s.{1,60}\sgesendet\.?|gesendet von meinem\s.{1,60}|enviado desde mi\s.{1,60}"
    r"|verzonden (?:vanaf|met) mijn\s.{1,60}|enviado do meu\s.{1,60}|enviado de meu\s.{1,60})\s*$",
    re.IGNORECASE,
)
_HEADER_BLOCK_START = re.compile(r"^\s*\*?(?:from|de|von|van|da)\s?\*?:\*?\s*\S", re.IGNORECASE)
_HEADER_BLOCK_FIELD = re.compile(
    r"^\s*\*?(?:sent|date|to|cc|subject|envoyé|à|objet|gesendet|datum|an|betreff|enviado(?: el)?"
    r"|enviada em|fecha|para|asunto|verzonden|aan|onderwerp|assunto|data)\s?\*?:",
    re.IGNORECASE,
)


def _is_attribution(line: str) -> bool:
    # A real attribution always carries a date or time; "On second thought, I wrote:" does not.
    return (len(line) <= 2 * _MAX_MARKER_LINE and bool(_ATTRIBUTION.match(line))
            and any(ch.isdigit() for ch in line))


def _attribution_span(lines: list[str], index: int) -> int:
    line = lines[index]
    if len(line) > _MAX_MARKER_LINE:
        return 0
    if _is_attribution(line):
        return 1
    if index + 1 >= len(lines) or len(lines[index + 1]) > _MAX_MARKER_LINE or _is_attribution(lines[index + 1]):
        # The next line is an attribution on its own: this one is the customer's.
        return 0
    joined = f"{line.rstrip()} {lines[index + 1].strip()}"
    if (_ATTRIBUTION_OPENER.match(line) or "schrieb" in joined.lower()) and _is_attribution(joined):
        return 2
    return 0


def _starts_header_block(lines: list[str], index: int) -> bool:
    if not _HEADER_BLOCK_START.match(lines[index]):
        return False
    following = lines[index + 1:index + 6]
    return sum(1 for line in following if _HEADER_BLOCK_FIELD.match(line)) >= 2


def _starts_history(lines: list[str], index: int) -> bool:
    line = lines[index]
    if line in ("-- ", "--"):
        return True
    if len(line) > _MAX_MARKER_LINE:
        return False
    return bool(_ORIGINAL_MESSAGE.match(line) or _UNDERSCORE_RULE.match(line) or _MOBILE_TRAILER.match(line)
                or _starts_header_block(lines, index))


def _is_quoted(line: str) -> bool:
    return line.lstrip().startswith(">")


def strip_reply(text: str) -> str:
    """The new text of a reply: quoted history, attributions ("On … wrote:" and its French,
    German, Spanish, Dutch and Portuguese forms, also wrapped over two lines), Outlook's
    "-----Original Message-----" and "From:/Sent:" blocks, underscore rules, signatures after
    "-- " and mobile "Sent from my iPhone" trailers removed; trailing blank lines trimmed.

    Text with none of these comes back unchanged but for blank lines at its ends; text that is
    nothing but quotation comes back whole, trimmed, never empty; a forwarded message ("----
    Forwarded message ----", "Begin forwarded message:") is kept from the marker on.
    """
    lines = _normal_newlines(text).split("\n")
    cut = len(lines)
    # What a customer forwards is their message, quotes and headers included.
    forward = next((number for number, line in enumerate(lines)
                    if len(line) <= _MAX_MARKER_LINE and _FORWARD_MARKER.match(line)), len(lines))
    attribution_lines: set[int] = set()
    index = 0
    while index < min(cut, forward):
        if _starts_history(lines, index):
            cut = index
            break
        span = _attribution_span(lines, index)
        if span:
            after = next((line for line in lines[index + span:] if line.strip()), None)
            # History quoted with ">" goes line by line below, which keeps answers written
            # between the quotes; history that is not quoted is everything from here on.
            if after is not None and not _is_quoted(after):
                cut = index
                break
            attribution_lines.update(range(index, index + span))
            index += span
            continue
        index += 1
    kept: list[str] = []
    removed_since_kept = False
    for number, line in enumerate(lines[:cut]):
        if number in attribution_lines or (number < forward and _is_quoted(line)):
            removed_since_kept = True
            continue
        if not line.strip() and kept and not kept[-1].strip() and removed_since_kept:
            continue
        kept.append(line)
        removed_since_kept = False
    while kept and not kept[-1].strip():
        kept.pop()
    while kept and not kept[0].strip():
        kept.pop(0)
    if not kept:
        return _normal_newlines(text).strip()
    return "\n".join(kept)


# --------------------------------------------------------------------------------------------
# Inbound MIME: structure pre-scan

_HEADER_LINE = re.compile(rb"^(?:From |[\x21-\x39\x3b-\x7e]*:|[ \t])")
_CONTENT_TYPE_LINE = re.compile(rb"^content-type[ \t]*:", re.IGNORECASE)
_DELIMITER_CANDIDATE = re.compile(rb"^--[^\n]*$", re.MULTILINE)


class _Frame(msgspec.Struct):
    boundary: bytes | None
    subtype: str
    # An inner multipart may reuse an enclosing one's boundary; closing it must hand the
    # boundary back to the enclosing level.
    shadows: int | None = None


def _content_type_of(header_lines: list[bytes], default: str) -> tuple[str, bytes | None]:
    value: bytes | None = None
    for number, line in enumerate(header_lines):
        if _CONTENT_TYPE_LINE.match(line):
            unfolded = [line.split(b":", 1)[1]]
            for continuation in header_lines[number + 1:]:
                if continuation[:1] not in (b" ", b"\t"):
                    break
                unfolded.append(continuation)
            value = b" ".join(part.strip() for part in unfolded)
            break
    if value is None:
        return default, None
    holder = email.message.Message()
    holder.set_default_type(default)
    try:
        holder["Content-Type"] = value.decode("ascii", "surrogateescape")
        media_type = holder.get_content_type()
        boundary = holder.get_boundary()
        return media_type, boundary.encode("utf-8", "surrogateescape") if boundary else None
    except (ValueError, TypeError, LookupError, IndexError, UnicodeError):
        return default, None


def _prescan(raw: bytes, limits: MailLimits) -> None:
    """Refuse a message whose MIME structure is over the limits before the recursive stdlib
    parser sees it: an iterative walk over header blocks and boundary lines, mirroring
    `email.feedparser` closely enough to bound nesting, part count and header size."""
    data = raw.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    stack: list[_Frame] = []
    levels: dict[bytes, int] = {}
    parts = 1
    pos = 0

    def count_part(more: int = 1) -> None:
        nonlocal parts
        parts += more
        if parts > limits.max_parts:
            raise MailRejected(f"more than {limits.max_parts} MIME parts")

    def delimiter_of(line: bytes) -> tuple[int, bool] | None:
        # Like feedparser, any enclosing boundary ends the current part, the innermost first.
        rest = line[2:].rstrip(b" \t")
        level = levels.get(rest)
        if level is not None:
            return level, False
        if rest.endswith(b"--") and (level := levels.get(rest[:-2])) is not None:
            return level, True
        return None

    def read_headers(start: int) -> tuple[list[bytes], int]:
        lines: list[bytes] = []
        size = 0
        at = start
        while at < len(data):
            end = data.find(b"\n", at)
            end = len(data) if end < 0 else end
            line = data[at:end]
            if not line:
                return lines, end + 1
            if (line.startswith(b"--") and delimiter_of(line)) or not _HEADER_LINE.match(line):
                return lines, at
            size += len(line) + 1
            if size > limits.max_header_bytes:
                raise MailRejected(f"a header section larger than {limits.max_header_bytes} bytes")
            lines.append(line)
            at = end + 1
        return lines, len(data)

    def next_delimiter(start: int) -> tuple[int, bool, int] | None:
        for found in _DELIMITER_CANDIDATE.finditer(data, start):
            delimiter = delimiter_of(found.group(0))
            if delimiter is not None:
                return delimiter[0], delimiter[1], found.end() + 1
        return None

    def push(frame: _Frame) -> None:
        stack.append(frame)
        if len(stack) > limits.max_depth:
            raise MailRejected(f"MIME nesting deeper than {limits.max_depth} levels")
        if frame.boundary is not None:
            frame.shadows = levels.get(frame.boundary)
            levels[frame.boundary] = len(stack) - 1

    def pop_to(level: int) -> None:
        while len(stack) > level:
            frame = stack.pop()
            if frame.boundary is not None:
                if frame.shadows is None:
                    levels.pop(frame.boundary, None)
                else:
                    levels[frame.boundary] = frame.shadows

    expecting_headers = True
    while True:
        if expecting_headers:
            default = "message/rfc822" if stack and stack[-1].subtype == "digest" else "text/plain"
            header_lines, pos = read_headers(pos)
            media_type, boundary = _content_type_of(header_lines, default)
            maintype, _, subtype = media_type.partition("/")
            if maintype == "multipart" and boundary:
                push(_Frame(boundary, subtype))
            elif maintype == "message" and subtype != "delivery-status":
                push(_Frame(None, subtype))
                count_part()
                continue
            elif maintype == "message":
                # feedparser makes one sub-message of every blank-line separated block.
                following = next_delimiter(pos) if levels else None
                count_part(data.count(b"\n\n", pos, following[2] if following else len(data)))
        if not levels:
            return
        following = next_delimiter(pos)
        if following is None:
            return
        level, closing, pos = following
        if closing:
            pop_to(level)
            expecting_headers = False
        else:
            pop_to(level + 1)
            count_part()
            expecting_headers = True


# --------------------------------------------------------------------------------------------
# Inbound MIME: headers

_MESSAGE_ID = re.compile(r"<[^<>\s]{1,900}>")
_MAX_MESSAGE_ID = 998


def _raw_values(message: email.message.Message, name: str) -> list[str]:
    wanted = name.lower()
    return [str(value) for key, value in message.raw_items() if key.lower() == wanted]


def _first_raw(message: email.message.Message, name: str) -> str:
    values = _raw_values(message, name)
    return values[0] if values else ""


def _unstructured(name: str, raw: str) -> str:
    try:
        return _one_line(str(email.policy.default.header_fetch_parse(name, raw)))
    except Exception:
        # The header parser has raised on hostile input in past releases; the raw text is
        # still the best reading there is.
        return _one_line(raw)


def parse_address_list(value: str) -> list[tuple[str, str]]:
    """`(display name, address)` pairs of an address header value (encoded words decoded,
    domain lower-cased); unparseable entries are skipped, never raised."""
    pairs: list[tuple[str, str]] = []
    try:
        header = email.policy.default.header_factory("to", " ".join(_normal_newlines(value).split("\n")))
        for address in header.addresses:
            normal = _normal_address(address.username, address.domain)
            if "@" in normal:
                pairs.append((_one_line(address.display_name), normal))
        return pairs
    except Exception:
        # Same as above: fall back to the permissive compat32 reading.
        pairs = []
    for name, addr in email.utils.getaddresses([value]):
        local, at, domain = addr.rpartition("@")
        if at and local and domain:
            pairs.append((_unstructured("subject", name), _normal_address(local, domain)))
    return pairs


def _addresses(message: email.message.Message, *names: str) -> list[str]:
    found: list[str] = []
    for name in names:
        for raw in _raw_values(message, name):
            found.extend(address for _display, address in parse_address_list(raw))
    return _unique(found)


def _message_ids(value: str) -> list[str]:
    ids = _MESSAGE_ID.findall(value)
    if not ids and value.strip():
        # Some senders forget the angle brackets; threading still wants the id.
        ids = [f"<{word}>" for word in value.split() if "@" in word and "<" not in word and ">" not in word]
    return [_repair(found) for found in ids if len(found) <= _MAX_MESSAGE_ID]


def _is_auto_submitted(message: email.message.Message) -> bool:
    auto = _first_raw(message, "Auto-Submitted").strip().lower()
    if auto.startswith("auto-"):
        return True
    if _first_raw(message, "Precedence").strip().lower() in ("bulk", "junk", "list"):
        return True
    if any(_raw_values(message, name) for name in ("X-Autoreply", "X-Autorespond")):
        return True
    if _first_raw(message, "Return-Path").strip() == "<>":
        return True
    content_type = _first_raw(message, "Content-Type").strip().lower()
    return content_type.startswith("multipart/report")


def _header_fields(message: email.message.Message) -> dict[str, Any]:
    from_pairs = [pair for raw in _raw_values(message, "From") for pair in parse_address_list(raw)]
    # Exactly one author, or none at all: with two, a verifier may vouch for one and the reader
    # believe the other (the mail is then refused for having no From).
    from_name, from_address = from_pairs[0] if len(from_pairs) == 1 else ("", "")
    return_path = _addresses(message, "Return-Path")
    references = [found for raw in _raw_values(message, "References") for found in _message_ids(raw)]
    message_ids = _message_ids(_first_raw(message, "Message-ID"))
    in_reply_to = _message_ids(_first_raw(message, "In-Reply-To"))
    return {
        "from_address": from_address,
        "from_name": from_name,
        "to": _addresses(message, "To"),
        "cc": _addresses(message, "Cc"),
        "envelope_to": _addresses(message, "Delivered-To", "X-Original-To", "Envelope-To"),
        "envelope_from": return_path[0] if return_path else "",
        "subject": _unstructured("subject", _first_raw(message, "Subject")),
        "message_id": message_ids[0] if message_ids else "",
        "in_reply_to": in_reply_to[0] if in_reply_to else "",
        "references": _unique(references),
        "auto_submitted": _is_auto_submitted(message),
        "authentication_results": [_one_line(raw) for raw in _raw_values(message, "Authentication-Results")],
    }


# --------------------------------------------------------------------------------------------
# Inbound MIME: bodies and attachments


def _media_type(part: email.message.Message) -> str:
    try:
        return part.get_content_type()
    except Exception:
        # A Content-Type the header parser chokes on is read as RFC 2045's default.
        return "text/plain"


def _disposition(part: email.message.Message) -> str:
    try:
        return (part.get_content_disposition() or "").lower()
    except Exception:
        # As above: an unreadable disposition is no disposition.
        return ""


def _filename(part: email.message.Message) -> str:
    try:
        name = part.get_filename()
    except Exception:
        # As above: an unreadable filename is no filename.
        name = None
    return clean_filename(str(name)) if name else ""


def _is_body_text(part: email.message.Message) -> bool:
    return (_media_type(part) in ("text/plain", "text/html") and _disposition(part) != "attachment"
            and not _filename(part))


def _contains_media_type(part: email.message.Message, media_type: str) -> bool:
    pending = [part]
    while pending:
        current = pending.pop()
        if current.is_multipart():
            if _media_type(current).startswith("multipart/"):
                pending.extend(_children(current))
        elif _media_type(current) == media_type and _is_body_text(current):
            return True
    return False


def _children(part: email.message.Message) -> list[email.message.Message]:
    payload = part.get_payload()
    return [child for child in payload if isinstance(child, email.message.Message)] if isinstance(payload, list) else []


def _best_alternative(children: list[email.message.Message]) -> email.message.Message | None:
    for media_type in ("text/plain", "text/html"):
        for child in children:
            if _contains_media_type(child, media_type):
                return child
    return children[-1] if children else None


def _part_text(part: email.message.Message, limits: MailLimits) -> str:
    payload = part.get_payload(decode=True)
    data = payload if isinstance(payload, bytes) else b""
    try:
        charset = part.get_content_charset()
    except Exception:
        # An unreadable charset parameter is no charset: decode_text then guesses.
        charset = None
    text = _normal_newlines(decode_text(data, charset))
    if _media_type(part) == "text/html":
        return html_to_text(text, limits.max_text_chars)
    if _param(part, "format") == "flowed":
        return _unflow(text, _param(part, "delsp") == "yes")
    return text


def _param(part: email.message.Message, name: str) -> str:
    try:
        value = part.get_param(name)
    except Exception:
        # An unreadable Content-Type parameter is an absent one.
        return ""
    # RFC 2231 parameters come back as tuples; the ones read here are plain tokens.
    return value.strip().lower() if isinstance(value, str) else ""


def _content_id(part: email.message.Message) -> str | None:
    raw = _one_line(_first_raw(part, "Content-ID")).strip("<>")
    return raw or None


def _message_bytes(part: email.message.Message) -> bytes:
    inner = _children(part)
    if not inner:
        payload = part.get_payload(decode=True)
        return payload if isinstance(payload, bytes) else b""
    for policy in (email.policy.SMTP, email.policy.compat32):
        try:
            return inner[0].as_bytes(policy=policy)
        except Exception:
            # The modern generator refuses some hostile headers; compat32 writes them as read.
            continue
    return b""


def _attachment(part: email.message.Message) -> MailAttachment:
    media_type = _media_type(part)
    if media_type.startswith("message/") and part.is_multipart():
        data = _message_bytes(part)
    else:
        payload = part.get_payload(decode=True)
        data = payload if isinstance(payload, bytes) else b""
    return MailAttachment(_filename(part), media_type, data, _content_id(part))


_SIGNATURE_TYPES = frozenset({"application/pgp-signature", "application/pkcs7-signature",
                              "application/x-pkcs7-signature"})


def _walk(root: email.message.Message, limits: MailLimits) -> tuple[list[str], list[MailAttachment]]:
    """Body texts and attachments of a parsed message, iteratively, re-checking the limits on
    the tree the parser actually built."""
    texts: list[str] = []
    attachments: list[MailAttachment] = []
    text_chars = 0
    parts = 0
    # Text inside an alternative that was not chosen is a duplicate of the body, not an
    # attachment, but its images and files are the customer's all the same.
    pending: list[tuple[email.message.Message, int, bool]] = [(root, 0, True)]
    while pending:
        part, depth, wants_text = pending.pop()
        parts += 1
        if parts > limits.max_parts:
            raise MailRejected(f"more than {limits.max_parts} MIME parts")
        media_type = _media_type(part)
        if part.is_multipart() and media_type.startswith("multipart/"):
            if depth + 1 > limits.max_depth:
                raise MailRejected(f"MIME nesting deeper than {limits.max_depth} levels")
            children = _children(part)
            chosen = _best_alternative(children) if media_type == "multipart/alternative" and wants_text else None
            pending.extend((child, depth + 1, wants_text and (chosen is None or child is chosen))
                           for child in reversed(children))
            continue
        if part.is_multipart():
            # An attached message: one attachment, but its insides still count for the limits.
            if depth + 1 > limits.max_depth:
                raise MailRejected(f"MIME nesting deeper than {limits.max_depth} levels")
            inner = [(child, depth + 1) for child in _children(part)]
            while inner:
                current, level = inner.pop()
                parts += 1
                if parts > limits.max_parts:
                    raise MailRejected(f"more than {limits.max_parts} MIME parts")
                children = _children(current)
                if children and level + 1 > limits.max_depth:
                    raise MailRejected(f"MIME nesting deeper than {limits.max_depth} levels")
                inner.extend((child, level + 1) for child in children)
        elif media_type in _SIGNATURE_TYPES:
            # PGP and S/MIME signatures say nothing to an agent; verifying them is not this layer's job.
            continue
        elif _is_body_text(part):
            if wants_text:
                # A long mail (most often a long quoted history) is cut, never refused: what the
                # customer wrote comes first.
                budget = limits.max_text_chars - text_chars
                if budget > 0:
                    text = truncated(_part_text(part, limits), budget)
                    text_chars += len(text)
                    texts.append(text)
            continue
        attachments.append(_attachment(part))
        if len(attachments) > limits.max_attachments:
            raise MailRejected(f"more than {limits.max_attachments} attachments")
    return texts, attachments


def _join_texts(texts: list[str]) -> str:
    return "\n\n".join(text.strip("\n") for text in texts if text.strip()).strip("\n")


def parse_mail(raw: bytes, limits: MailLimits = MailLimits()) -> InboundMail:
    """An `InboundMail` from raw RFC 5322 bytes.

    The body is the text/plain alternative, else the text/html one as text; every other leaf
    part is an attachment. Any charset the `email` package knows is decoded and a bad one
    never raises. Raises `MailRejected` with a readable reason when the message is over
    `limits` (size first, then structure before parsing, then the parsed tree) or unreadable.
    """
    if len(raw) > limits.max_bytes:
        raise MailRejected(f"message larger than {limits.max_bytes} bytes")
    _prescan(raw, limits)
    try:
        message = email.parser.BytesParser(policy=email.policy.default).parsebytes(raw)
    except RecursionError:
        raise MailRejected("MIME nesting too deep to parse") from None
    try:
        fields = _header_fields(message)
        texts, attachments = _walk(message, limits)
    except MailRejected:
        raise
    except RecursionError:
        raise MailRejected("MIME nesting too deep to parse") from None
    except Exception as error:
        # Whatever else the stdlib trips over in a hostile message, the answer is a refusal
        # the sender can read, not a crash of the channel.
        raise MailRejected(f"unreadable message ({type(error).__name__})") from None
    full_text = _join_texts(texts)
    return InboundMail(text=new_text(full_text), full_text=full_text, attachments=attachments, **fields)


# --------------------------------------------------------------------------------------------
# Authentication verdicts

_MAX_AUTH_RESULTS_CHARS = 16 * 1024
_TOKEN = re.compile(r'(?:[^\s"]|"(?:[^"\\]|\\.)*")+')


def _without_comments(value: str) -> str:
    out: list[str] = []
    depth = 0
    quoted = False
    escaped = False
    for ch in value:
        if escaped:
            escaped = False
            if not depth:
                out.append(ch)
        elif ch == "\\":
            escaped = True
            if not depth:
                out.append(ch)
        elif quoted:
            out.append(ch)
            quoted = ch != '"'
        elif ch == "(":
            depth += 1
        elif ch == ")" and depth:
            depth -= 1
        elif not depth:
            out.append(ch)
            quoted = ch == '"'
    return "".join(out)


def _split_outside_quotes(value: str, separator: str) -> list[str]:
    pieces: list[str] = []
    current: list[str] = []
    quoted = False
    escaped = False
    for ch in value:
        if escaped:
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch == '"':
            quoted = not quoted
        elif ch == separator and not quoted:
            pieces.append("".join(current))
            current = []
            continue
        current.append(ch)
    pieces.append("".join(current))
    return pieces


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] == '"':
        return re.sub(r"\\(.)", r"\1", value[1:-1])
    return value


def _authserv_id(value: str) -> str:
    """The authserv-id an Authentication-Results value starts with, lower-cased ("" if none)."""
    head = _without_comments(_normal_newlines(value[:_MAX_AUTH_RESULTS_CHARS])).split(";", 1)[0].split()
    return head[0].lower() if head else ""


def _auth_results(value: str, trusted_authserv_ids: set[str]) -> list[tuple[str, str, dict[str, str]]]:
    if len(value) > _MAX_AUTH_RESULTS_CHARS:
        return []
    segments = _split_outside_quotes(_without_comments(_normal_newlines(value)), ";")
    authserv = segments[0].split()
    trusted = {server.lower() for server in trusted_authserv_ids}
    if not authserv or authserv[0].lower() not in trusted:
        return []
    results: list[tuple[str, str, dict[str, str]]] = []
    for segment in segments[1:]:
        tokens = _TOKEN.findall(re.sub(r"\s*=\s*", "=", segment.strip()))
        if not tokens or "=" not in tokens[0]:
            continue
        method, _, result = tokens[0].partition("=")
        properties: dict[str, str] = {}
        for token in tokens[1:]:
            key, equals, prop_value = token.partition("=")
            if equals and "." in key:
                properties.setdefault(key.lower(), _unquote(prop_value))
        results.append((method.split("/")[0].lower(), _unquote(result).lower(), properties))
    return results


def domains_aligned(domain: str, from_domain: str) -> bool:
    """Relaxed alignment, simply: `domain` (a DKIM `d=` or SPF MAIL FROM domain) is the From
    domain or a parent of it (`example.com` aligns with `mail.example.com`). A single label
    never aligns, so a signature for a top-level domain cannot vouch for everything under it."""
    domain, from_domain = domain.strip().strip(".").lower(), from_domain.strip().strip(".").lower()
    if not domain or not from_domain or "." not in domain:
        return False
    return from_domain == domain or from_domain.endswith("." + domain)


def parse_authentication_results(header_values: list[str], trusted_authserv_ids: set[str],
                                 from_domain: str | None = None) -> AuthVerdict:
    """The verdict in the topmost RFC 8601 `Authentication-Results` header whose authserv-id is
    trusted (`header_values` top first). Only that one counts: the trusted MTA adds its header
    above everything the sender wrote, and a sender can write a header claiming the MTA's id
    lower down (an MTA that does not strip those would otherwise let it vouch for itself).

    DKIM is `pass` when any signature in it passed. Alignment is judged against `from_domain`
    (the From header's domain), or the DMARC result's `header.from` when it is not given.
    """
    topmost = next((value for value in header_values if _authserv_id(value) in
                    {server.lower() for server in trusted_authserv_ids}), None)
    results = _auth_results(topmost, trusted_authserv_ids) if topmost is not None else []
    first = {method: (result, properties) for method, result, properties in reversed(results)}
    spf, spf_properties = first.get("spf", ("none", {}))
    dmarc, dmarc_properties = first.get("dmarc", ("none", {}))
    from_domain = (from_domain or dmarc_properties.get("header.from", "")).lower()
    dkim_results = [(result, properties) for method, result, properties in results if method == "dkim"]
    dkim_verdict = "pass" if any(result == "pass" for result, _ in dkim_results) else (
        dkim_results[0][0] if dkim_results else "none")
    dkim_aligned = any(
        result == "pass" and domains_aligned(properties.get("header.d") or _domain_of(properties.get("header.i", "")),
                                             from_domain)
        for result, properties in dkim_results)
    mailfrom = spf_properties.get("smtp.mailfrom", "")
    spf_aligned = spf == "pass" and domains_aligned(_domain_of(mailfrom) if "@" in mailfrom else mailfrom, from_domain)
    return AuthVerdict(spf=spf, dkim=dkim_verdict, dmarc=dmarc, aligned=dkim_aligned or spf_aligned)


_DKIM_DOMAIN_TAG = re.compile(r"(?:^|;)\s*d\s*=\s*([^;\s]+)")


def _mailgun_header_pairs(fields: Mapping[str, str], limits: MailLimits) -> list[tuple[str, str]]:
    raw = fields.get("message-headers")
    if not raw:
        return []
    try:
        decoded = decode_json(raw, max_bytes=limits.max_header_bytes)
    except ValueError:
        raise MailRejected("Mailgun message-headers is not JSON within the header size limit") from None
    if not isinstance(decoded, list):
        raise MailRejected("Mailgun message-headers is not a list of [name, value] pairs")
    return [(pair[0], pair[1]) for pair in decoded
            if isinstance(pair, list) and len(pair) == 2 and isinstance(pair[0], str) and isinstance(pair[1], str)]


def verdict_from_mailgun(fields: Mapping[str, str], limits: MailLimits = MailLimits()) -> AuthVerdict:
    """The verdict Mailgun reached on a forwarded inbound mail: `X-Mailgun-Spf` and
    `X-Mailgun-Dkim-Check-Result` from `message-headers` (topmost occurrence; a top-level field
    of the same name when the headers lack them). Mailgun reports no DMARC result.

    SPF counts as aligned when the envelope `sender` is in the From domain; DKIM only when every
    `DKIM-Signature` present is for a domain aligned with From, since Mailgun's single DKIM
    result does not say which signature passed.
    """
    pairs = _mailgun_header_pairs(fields, limits)

    def header(name: str) -> str:
        values = [value for key, value in pairs if key.lower() == name.lower()]
        return (values[0] if values else fields.get(name, "")).strip().lower()

    spf = header("X-Mailgun-Spf") or "none"
    dkim_result = header("X-Mailgun-Dkim-Check-Result") or "none"
    from_value = fields.get("from") or next((value for key, value in pairs if key.lower() == "from"), "")
    from_pairs = parse_address_list(from_value)
    from_domain = _domain_of(from_pairs[0][1]) if from_pairs else ""
    signing_domains = [match.group(1).lower() for key, value in pairs if key.lower() == "dkim-signature"
                       for match in [_DKIM_DOMAIN_TAG.search(" ".join(value.split()))] if match]
    dkim_aligned = (dkim_result == "pass" and bool(signing_domains)
                    and all(domains_aligned(domain, from_domain) for domain in signing_domains))
    spf_aligned = spf == "pass" and domains_aligned(_domain_of(fields.get("sender", "")), from_domain)
    return AuthVerdict(spf=spf, dkim=dkim_result, dmarc="none", aligned=dkim_aligned or spf_aligned)


_SENDGRID_DKIM = re.compile(r"@?([A-Za-z0-9.-]+)\s*:\s*([A-Za-z]+)")


def verdict_from_sendgrid(spf_field: str, dkim_field: str, from_domain: str,
                          envelope_from: str | None = None) -> AuthVerdict:
    """The verdict in SendGrid Inbound Parse's `SPF` field (`pass`, `fail`, …) and `dkim` field
    (`{@example.com : pass}`, possibly several comma-separated domains). SendGrid reports no
    DMARC result. SPF is about the envelope sender, so it counts as aligned only when
    `envelope_from` (the `envelope` field's `from`) is given and in the From domain.
    """
    spf = spf_field.strip().lower() or "none"
    results = [(domain.lower(), result.lower()) for domain, result in _SENDGRID_DKIM.findall(dkim_field)]
    dkim_result = "pass" if any(result == "pass" for _, result in results) else (results[0][1] if results else "none")
    dkim_aligned = any(result == "pass" and domains_aligned(domain, from_domain) for domain, result in results)
    spf_aligned = spf == "pass" and envelope_from is not None and domains_aligned(_domain_of(envelope_from),
                                                                                 from_domain)
    return AuthVerdict(spf=spf, dkim=dkim_result, dmarc="none", aligned=dkim_aligned or spf_aligned)


def is_spoofed(verdict: AuthVerdict) -> bool:
    """Whether a reply must be refused as not from its From address: DMARC failed, or neither
    SPF nor DKIM passed aligned with the From domain."""
    return verdict.dmarc == "fail" or not verdict.aligned


_MAX_DKIM_SIGNATURES = 5


def verify_dkim(raw: bytes, dnsfunc: Callable[..., bytes | None]) -> list[str]:
    """The `d=` domains of the DKIM signatures on `raw` that verify (at most the first five
    are tried), with `dnsfunc(name: bytes, timeout=…) -> TXT record bytes | None` doing the key
    lookup. Signatures with a body length (`l=`) are ignored: text appended after the signed
    length would pass as signed."""
    try:
        verifier = dkim.DKIM(raw)
    except Exception:
        # Same as below: a message dkimpy cannot read carries no signature that verifies.
        return []
    count = sum(1 for name, _value in verifier.headers if name.lower() == b"dkim-signature")
    domains: list[str] = []
    for index in range(min(count, _MAX_DKIM_SIGNATURES)):
        try:
            valid = verifier.verify(idx=index, dnsfunc=dnsfunc)
        except Exception:
            # dkimpy raises DKIMException for bad signatures and keys, and has raised others on
            # malformed input; every one of them means "this signature does not verify".
            continue
        if valid and b"l" not in verifier.signature_fields:
            domains.append(verifier.domain.decode("ascii", "replace").lower())
    return _unique(domains)


# --------------------------------------------------------------------------------------------
# Mailgun and SendGrid inbound webhooks


def mailgun_signature_valid(signing_key: str, timestamp: str, token: str, signature: str, now: float,
                            max_age: float = 300) -> bool:
    """Whether a Mailgun webhook's `signature` is hex HMAC-SHA256 of `timestamp + token` under
    the webhook signing key, and `timestamp` is within `max_age` seconds of `now`.

    Replays inside that window are the caller's to refuse: remember each accepted `token`
    (Mailgun's are 50 random characters) for at least `max_age` and refuse one seen before.
    """
    if not timestamp.isascii() or not timestamp.isdigit() or len(timestamp) > 12:
        return False
    if abs(now - int(timestamp)) > max_age:
        return False
    expected = hmac.new(signing_key.encode(), (timestamp + token).encode("utf-8", "surrogatepass"),
                        hashlib.sha256).hexdigest()
    return secrets_equal(expected, signature)


def _check_webhook_size(fields: Mapping[str, str], files: list[MailAttachment], limits: MailLimits) -> None:
    size = sum(len(value.encode("utf-8", "surrogatepass")) for value in fields.values())
    size += sum(len(attachment.data) for attachment in files)
    if size > limits.max_bytes:
        raise MailRejected(f"message larger than {limits.max_bytes} bytes")
    if len(files) > limits.max_attachments:
        raise MailRejected(f"more than {limits.max_attachments} attachments")


def _headers_message(pairs: Iterable[tuple[str, str]]) -> email.message.Message:
    lines = [f"{name}: {' '.join(_normal_newlines(value).split())}" for name, value in pairs
             if re.fullmatch(r"[\x21-\x39\x3b-\x7e]{1,100}", name)]
    return email.parser.Parser(policy=email.policy.default).parsestr("\n".join(lines) + "\n\n", headersonly=True)


def _with_content_ids(files: list[MailAttachment], content_ids: Mapping[str, str], field_prefix: str,
                      ) -> list[MailAttachment]:
    by_field = {field: cid.strip().strip("<>") for cid, field in content_ids.items()}
    result: list[MailAttachment] = []
    for number, attachment in enumerate(files, start=1):
        content_id = attachment.content_id or by_field.get(f"{field_prefix}{number}") or None
        result.append(MailAttachment(clean_filename(attachment.filename), attachment.media_type, attachment.data,
                                     content_id))
    return result


def _json_object(raw: str | None, limits: MailLimits) -> dict[str, Any]:
    if not raw:
        return {}
    try:
        decoded = decode_json(raw, max_bytes=limits.max_header_bytes)
    except ValueError:
        return {}
    return decoded if isinstance(decoded, dict) else {}


def _body_texts(plain: str, html: str, limits: MailLimits) -> str:
    full_text = _normal_newlines(_repair(plain)).strip("\n")
    if not full_text.strip() and html.strip():
        full_text = html_to_text(_repair(html), limits.max_text_chars)
    return truncated(full_text, limits.max_text_chars)


def inbound_from_mailgun(fields: Mapping[str, str], files: list[MailAttachment],
                         limits: MailLimits = MailLimits()) -> InboundMail:
    """An `InboundMail` from a Mailgun Routes `forward()` POST (check the signature first).

    `files` are the `attachment-1…N` parts in that order (`content-id-map` gives them their
    Content-IDs). A route ending in `mime` sends `body-mime`, which is parsed as raw MIME.
    The new text is `strip_reply` of `body-plain` (not Mailgun's `stripped-text`), so every
    way in strips alike. Raises `MailRejected` over `limits`.
    """
    _check_webhook_size(fields, files, limits)
    envelope_to = _unique(address for _name, address in parse_address_list(fields.get("recipient", "")))
    sender = parse_address_list(fields.get("sender", ""))
    envelope_from = sender[0][1] if sender else ""
    if fields.get("body-mime"):
        mail = parse_mail(fields["body-mime"].encode("utf-8", "surrogateescape"), limits)
        return msgspec.structs.replace(mail, envelope_to=envelope_to or mail.envelope_to,
                                       envelope_from=envelope_from or mail.envelope_from)
    header_fields = _header_fields(_headers_message(_mailgun_header_pairs(fields, limits)))
    from_pairs = parse_address_list(fields.get("from", ""))
    if from_pairs:
        header_fields["from_name"], header_fields["from_address"] = from_pairs[0]
    if fields.get("subject"):
        header_fields["subject"] = _one_line(fields["subject"])
    header_fields["envelope_to"] = envelope_to or header_fields["envelope_to"]
    header_fields["envelope_from"] = envelope_from or header_fields["envelope_from"]
    full_text = _body_texts(fields.get("body-plain", ""), fields.get("body-html", ""), limits)
    attachments = _with_content_ids(files, _json_object(fields.get("content-id-map"), limits), "attachment-")
    return InboundMail(text=new_text(full_text), full_text=full_text, attachments=attachments, **header_fields)


def inbound_from_sendgrid(fields: Mapping[str, str], files: list[MailAttachment],
                          limits: MailLimits = MailLimits()) -> InboundMail:
    """An `InboundMail` from a SendGrid Inbound Parse POST (unsigned: the caller protects the
    URL). In raw mode the `email` field holds the MIME, parsed with `parse_mail`; otherwise
    `headers`, `text`, `html`, `from`, `to`, `cc`, `subject` are read and `files` are the
    `attachment1…N` parts in that order (`content-ids` gives them their Content-IDs). The
    `envelope` field supplies the envelope sender and recipients. Text fields must already be
    decoded with the charsets in the `charsets` field. Raises `MailRejected` over `limits`.
    """
    _check_webhook_size(fields, files, limits)
    envelope = _json_object(fields.get("envelope"), limits)
    envelope_to_raw = envelope.get("to")
    envelope_to = _unique(address for value in (envelope_to_raw if isinstance(envelope_to_raw, list) else [])
                          if isinstance(value, str) for _name, address in parse_address_list(value))
    envelope_from_raw = envelope.get("from")
    sender = parse_address_list(envelope_from_raw) if isinstance(envelope_from_raw, str) else []
    envelope_from = sender[0][1] if sender else ""
    if fields.get("email"):
        mail = parse_mail(fields["email"].encode("utf-8", "surrogateescape"), limits)
        extra = _with_content_ids(files, {}, "attachment")
        if len(mail.attachments) + len(extra) > limits.max_attachments:
            raise MailRejected(f"more than {limits.max_attachments} attachments")
        return msgspec.structs.replace(mail, envelope_to=envelope_to or mail.envelope_to,
                                       envelope_from=envelope_from or mail.envelope_from,
                                       attachments=[*mail.attachments, *extra])
    headers_text = fields.get("headers", "")
    if len(headers_text.encode("utf-8", "surrogatepass")) > limits.max_header_bytes:
        raise MailRejected(f"a header section larger than {limits.max_header_bytes} bytes")
    header_fields = _header_fields(
        email.parser.Parser(policy=email.policy.default).parsestr(_normal_newlines(headers_text).strip("\n") + "\n\n",
                                                                  headersonly=True))
    from_pairs = parse_address_list(fields.get("from", ""))
    if from_pairs:
        header_fields["from_name"], header_fields["from_address"] = from_pairs[0]
    for key in ("to", "cc"):
        if fields.get(key):
            header_fields[key] = _unique(address for _name, address in parse_address_list(fields[key]))
    if fields.get("subject"):
        header_fields["subject"] = _one_line(fields["subject"])
    header_fields["envelope_to"] = envelope_to or header_fields["envelope_to"]
    header_fields["envelope_from"] = envelope_from or header_fields["envelope_from"]
    full_text = _body_texts(fields.get("text", ""), fields.get("html", ""), limits)
    content_ids = {cid: field for cid, field in _json_object(fields.get("content-ids"), limits).items()
                   if isinstance(field, str)}
    attachments = _with_content_ids(files, content_ids, "attachment")
    return InboundMail(text=new_text(full_text), full_text=full_text, attachments=attachments, **header_fields)


# --------------------------------------------------------------------------------------------
# Outbound threading

_REPLY_PREFIX = re.compile(r"^\s*(?:(?:re|aw|sv|vs|antw|res|rif|odp)\s*(?:\[\d+\]|\(\d+\))?\s*:\s*)+", re.IGNORECASE)
_MAX_REFERENCES = 10


def _clean_message_ids(ids: Iterable[str]) -> list[str]:
    cleaned: list[str] = []
    for value in ids:
        found = _message_ids(value)
        if len(found) == 1 and len(found[0]) <= _MAX_MESSAGE_ID // 4:
            cleaned.append(found[0])
    return _unique(cleaned)


def reply_subject(subject: str) -> str:
    """`Re: <subject>` with any existing reply prefixes ("Re:", "RE:", "AW:", "Re[2]:", …)
    folded into one, on one line."""
    base = _REPLY_PREFIX.sub("", _one_line(subject))
    return f"Re: {base}" if base else "Re:"


def reply_headers(conversation_subject: str | None, last_inbound: InboundMail | None,
                  previous_message_ids: list[str]) -> dict[str, str]:
    """`Subject`, `In-Reply-To` and `References` for a business reply, so that mail clients
    thread it under the customer's last mail.

    The subject is the customer's (else the conversation's) with one "Re: "; a mail that starts
    a thread keeps the conversation subject as it is. References follow RFC 5322 (the parent's
    References, then the parent's id), merged with `previous_message_ids` (the conversation's
    ids, oldest first) and bounded to the first id and the last nine. Ids that are not a single
    `<…>` are dropped, so no header can be injected; headers without a value are left out.
    """
    inbound_references = list(last_inbound.references) if last_inbound else []
    parent = _clean_message_ids([last_inbound.message_id]) if last_inbound and last_inbound.message_id else []
    history = _clean_message_ids([*inbound_references, *previous_message_ids])
    if not parent and history:
        parent = [history[-1]]
    chain = [found for found in history if found not in parent] + parent
    if len(chain) > _MAX_REFERENCES:
        chain = [chain[0], *chain[-(_MAX_REFERENCES - 1):]]
    headers: dict[str, str] = {}
    subject = (last_inbound.subject if last_inbound and last_inbound.subject else conversation_subject) or ""
    if _one_line(subject):
        headers["Subject"] = reply_subject(subject) if chain else _one_line(subject)
    if parent:
        headers["In-Reply-To"] = parent[0]
    if chain:
        headers["References"] = " ".join(chain)
    return headers
