"""The egress policy: where Threadline may open an outbound HTTP or SMTP connection.

Every outbound call (business webhooks, platform APIs, push token endpoints, media, mail) goes
through one `EgressPolicy`:

- `https` only, unless `THREADLINE_EGRESS_ALLOW_HTTP` (default: on in the sandbox) allows `http`.
- Loopback, private (RFC 1918, ULA), link-local (cloud metadata included), multicast,
  unspecified, reserved, shared (CGNAT) and documentation addresses are refused — in any
  spelling (IPv4-mapped IPv6, NAT64, 6to4, decimal/octal/hex IPv4) — when the URL is checked
  (`check_url`) and again on the addresses DNS gave, right before connecting
  (`check_addresses`): a client resolves once, checks every address and connects only to
  checked ones, so a DNS answer that changes between the two (rebinding) gains nothing.
- Names that only resolve inside a network (`localhost`, single labels, `.local`,
  `.internal`, …) are refused without asking DNS.
- Redirects are never followed: every call here is credentialed or signed, and a credential
  goes only to the host it was configured for.
- A platform's API base URL (Graph, Bot API, Twilio, FCM, APNs) must be the platform's own
  host, the sandbox's origin (sandbox mode: `THREADLINE_PUBLIC_BASE_URL`, trusted for platform
  calls only) or an allow-listed host: it is an operator setting, not a business's.
- `THREADLINE_EGRESS_ALLOW` lists self-hosted destinations to let through anyway: host names
  (`hooks.corp.example`, `*.corp.example`), addresses and CIDRs (`10.1.2.3`, `10.0.0.0/8`,
  `[fd00::/8]`), each optionally with a port or port range (`:9000`, `:9000-9100`). An entry
  prefixed with `!` denies instead, and a deny wins over everything (used by `threadline up` to
  keep Threadline's own loopback ports out of reach).

The HTTP clients built here (`EgressSession` for aiohttp, `egress_transport` for httpx) and
`EgressPolicy.connect_smtp` enforce all of this; callers report `EgressRefused` as a permanent
failure (`REFUSED_CODE`).
"""

from __future__ import annotations

import asyncio
import collections
import ipaddress
import logging
import re
import socket
from collections.abc import Iterable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any, Literal

import aiohttp
import httpcore
import httpx
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.tracing import Trace
from yarl import URL

from shared.telemetry import log_fields

log = logging.getLogger(__name__)

REFUSED_CODE = "egress_refused"
ALLOW_ENV = "THREADLINE_EGRESS_ALLOW"
ALLOW_HTTP_ENV = "THREADLINE_EGRESS_ALLOW_HTTP"

Purpose = Literal["platform", "business"]
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# Each platform's own API hosts (a leading dot: any subdomain). A base URL elsewhere needs the
# operator (sandbox origin or THREADLINE_EGRESS_ALLOW).
GRAPH_HOSTS = ("graph.facebook.com",)
WHATSAPP_MEDIA_HOSTS = ("lookaside.fbsbx.com",)  # Meta's media CDN (the `url` a media lookup returns)
MESSENGER_MEDIA_HOSTS = (".fbcdn.net", ".fbsbx.com")  # where Messenger's attachment URLs point
TELEGRAM_HOSTS = ("api.telegram.org",)
TWILIO_HOSTS = ("api.twilio.com", ".twilio.com")  # regional edges: api.dublin.ie1.twilio.com
TWILIO_MEDIA_HOSTS = (".twiliocdn.com", ".twilio.com")  # where an MMS media URL redirects
FCM_HOSTS = ("fcm.googleapis.com",)
GOOGLE_OAUTH_HOSTS = ("oauth2.googleapis.com", "www.googleapis.com", "accounts.google.com")
APNS_HOSTS = ("api.push.apple.com", "api.sandbox.push.apple.com", "api.development.push.apple.com")

_V4 = ipaddress.IPv4Network
_V6 = ipaddress.IPv6Network
# First match wins (the metadata address before its link-local range).
_REFUSED_NETWORKS: tuple[tuple[IPNetwork, str], ...] = (
    (_V4("0.0.0.0/8"), "an unspecified address"),
    (_V4("10.0.0.0/8"), "a private address"),
    (_V4("100.64.0.0/10"), "a shared (CGNAT) address"),
    (_V4("127.0.0.0/8"), "a loopback address"),
    (_V4("169.254.169.254/32"), "the cloud metadata address"),
    (_V4("169.254.0.0/16"), "a link-local address"),
    (_V4("172.16.0.0/12"), "a private address"),
    (_V4("192.0.0.0/24"), "a reserved address"),
    (_V4("192.0.2.0/24"), "a documentation address"),
    (_V4("192.88.99.0/24"), "a reserved address"),
    (_V4("192.168.0.0/16"), "a private address"),
    (_V4("198.18.0.0/15"), "a reserved address"),
    (_V4("198.51.100.0/24"), "a documentation address"),
    (_V4("203.0.113.0/24"), "a documentation address"),
    (_V4("224.0.0.0/4"), "a multicast address"),
    (_V4("240.0.0.0/4"), "a reserved address"),
    (_V6("::/128"), "an unspecified address"),
    (_V6("::1/128"), "a loopback address"),
    (_V6("::/8"), "a reserved address"),
    (_V6("64:ff9b:1::/48"), "a private address"),
    (_V6("100::/64"), "a reserved address"),
    (_V6("2001::/23"), "a reserved address"),
    (_V6("2001:db8::/32"), "a documentation address"),
    (_V6("fc00::/7"), "a private address"),
    (_V6("fe80::/10"), "a link-local address"),
    (_V6("fec0::/10"), "a link-local address"),
    (_V6("ff00::/8"), "a multicast address"),
)
_NAT64 = _V6("64:ff9b::/96")
_LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"})
_PRIVATE_SUFFIXES = (".local", ".localdomain", ".internal", ".home.arpa", ".lan")
_LABEL = r"[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?"
_HOST_NAME = re.compile(rf"^(?=.{{1,253}}$){_LABEL}(\.{_LABEL})*$")
_EXCEPTIONS = f" ({ALLOW_ENV} lists exceptions)"
_NUMERIC_LABEL = re.compile(r"^(0x[0-9a-f]*|[0-9]+)$")
# Refusals of this process by (purpose, stage), besides the `egress_refused` log lines.
REFUSALS: collections.Counter[tuple[str, str]] = collections.Counter()


class EgressRefused(Exception):
    """A destination the egress policy refuses. `reason` names the host, never the URL (a URL
    may carry a credential, e.g. a Telegram bot token)."""

    code = REFUSED_CODE

    def __init__(self, host: str, reason: str) -> None:
        super().__init__(f"Refused by the egress policy: {reason}")
        self.host = host
        self.reason = reason


# --- classification (pure) -------------------------------------------------------------------------


def unwrap(address: IPAddress) -> IPAddress:
    """The IPv4 address an IPv6 address stands for (IPv4-mapped, NAT64, 6to4), else itself."""
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return address.ipv4_mapped
        if address in _NAT64:
            return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
        if address.sixtofour is not None:
            return address.sixtofour
    return address


def address_refusal(address: IPAddress) -> str | None:
    """Why `address` is not a public destination ("a loopback address", …), or None when it is."""
    address = unwrap(address)
    for network, reason in _REFUSED_NETWORKS:
        if address.version == network.version and address in network:
            return reason
    if address.is_multicast:
        return "a multicast address"
    if not address.is_global:
        return "not a public address"
    return None


def parse_address(text: str) -> IPAddress | None:
    """An IP address written canonically (brackets and an IPv6 zone stripped), else None."""
    text = text.strip("[]").split("%", 1)[0]
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def normalize_host(host: str) -> str:
    """A host as compared here: lower case, no brackets, no trailing dot."""
    return host.strip().strip("[]").lower().rstrip(".")


@dataclass(frozen=True)
class HostKind:
    """What a host is before DNS: literal `addresses`, a `private_name` (reason), or a public name."""

    addresses: tuple[IPAddress, ...] = ()
    private_name: str | None = None


def classify_host(host: str) -> HostKind:
    """Classify a URL's host without DNS; EgressRefused for hosts no client should try.

    Literal addresses (IPv6 with or without brackets; IPv4 only as a canonical dotted quad —
    `2130706433`, `0x7f.1`, `0177.0.0.1` and `127.1` are refused, as some resolvers turn them
    into 127.0.0.1) come back as `addresses`; the localhost names as loopback addresses.
    """
    name = normalize_host(host)
    if not name:
        raise EgressRefused(host, "the URL has no host")
    if ":" in name:
        if "%" in name:
            raise EgressRefused(name, f"{name}: IPv6 zone identifiers are not allowed")
        address = parse_address(name)
        if address is None:
            raise EgressRefused(name, f"{name} is not a valid IPv6 address")
        return HostKind(addresses=(address,))
    if _NUMERIC_LABEL.match(name.rsplit(".", 1)[-1]):
        # WHATWG URL rule: a host whose last label is a number is an IPv4 address.
        try:
            return HostKind(addresses=(ipaddress.IPv4Address(name),))
        except ValueError:
            raise EgressRefused(name, f"{name} is not an IPv4 address written as four decimal numbers") from None
    if not _HOST_NAME.match(name):
        raise EgressRefused(name, f"{name} is not a valid host name")
    if name in _LOOPBACK_NAMES or name.endswith(".localhost"):
        return HostKind(addresses=(ipaddress.IPv4Address("127.0.0.1"), ipaddress.IPv6Address("::1")))
    if "." not in name:
        return HostKind(private_name="a single-label name, which resolves only inside a network")
    if name.endswith(_PRIVATE_SUFFIXES):
        return HostKind(private_name="a private name, which resolves only inside a network")
    return HostKind()


def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def host_matches(host: str, patterns: Iterable[str]) -> bool:
    """Whether `host` is one of `patterns` (a leading dot: any subdomain of it)."""
    name = normalize_host(host)
    return any(name.endswith(p) if p.startswith(".") else name == p for p in patterns)


# --- the allow-list ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    """One THREADLINE_EGRESS_ALLOW entry: a host name (".x" = any subdomain of x) or a network,
    an optional inclusive port range, allow or (`!`) deny."""

    deny: bool = False
    name: str | None = None
    network: IPNetwork | None = None
    ports: tuple[int, int] | None = None
    # `business=…`: only for business destinations (webhook targets, SMTP), never a platform's
    # base URL, which carries the integration's platform credentials (and the media proxy).
    purpose: Purpose | None = None

    def applies(self, purpose: Purpose) -> bool:
        """Whether this rule speaks for calls of `purpose`."""
        return self.purpose is None or self.purpose == purpose

    def _port_ok(self, port: int) -> bool:
        return self.ports is None or self.ports[0] <= port <= self.ports[1]

    def covers_name(self, host: str, port: int) -> bool:
        """Whether this name rule covers `host`:`port`."""
        return self.name is not None and self._port_ok(port) and host_matches(host, (self.name,))

    def covers_address(self, address: IPAddress, port: int) -> bool:
        """Whether this network rule covers `address`:`port` (IPv4-mapped forms as IPv4)."""
        if self.network is None or not self._port_ok(port):
            return False
        address = unwrap(address)
        return address.version == self.network.version and address in self.network


def _parse_ports(text: str, entry: str) -> tuple[int, int]:
    low, _, high = text.partition("-")
    try:
        ports = (int(low), int(high or low))
    except ValueError:
        raise ValueError(f"{ALLOW_ENV}: bad port in {entry!r}") from None
    if not 1 <= ports[0] <= ports[1] <= 65535:
        raise ValueError(f"{ALLOW_ENV}: ports in {entry!r} must be 1-65535, low to high")
    return ports


def parse_rule(entry: str) -> Rule:
    """One allow-list entry (`10.0.0.0/8`, `[::1]:9000`, `*.corp.example`, `!127.0.0.1:4222`,
    `business=127.0.0.0/8`, …)."""
    text = entry.strip()
    deny = text.startswith("!")
    text = text.removeprefix("!").strip()
    purpose: Purpose | None = None
    if text.startswith("business="):
        purpose, text = "business", text.removeprefix("business=").strip()
    ports: tuple[int, int] | None = None
    if text.startswith("["):
        inner, bracket, rest = text[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise ValueError(f"{ALLOW_ENV}: bad entry {entry!r}")
        target = inner
        if rest:
            ports = _parse_ports(rest[1:], entry)
    elif text.count(":") == 1:
        target, _, port_text = text.partition(":")
        ports = _parse_ports(port_text, entry)
    else:
        target = text
    try:
        return Rule(deny=deny, network=ipaddress.ip_network(target, strict=False), ports=ports, purpose=purpose)
    except ValueError:
        pass
    name = normalize_host(target)
    suffix = name.startswith("*.")
    if suffix:
        name = name[1:]
    if not name or not _HOST_NAME.match(name.lstrip(".")) or _NUMERIC_LABEL.match(name.rsplit(".", 1)[-1]):
        raise ValueError(f"{ALLOW_ENV}: {entry!r} is not a host name, IP address or CIDR")
    return Rule(deny=deny, name=name, ports=ports, purpose=purpose)


def parse_rules(raw: str) -> tuple[Rule, ...]:
    """Every entry of a comma-separated THREADLINE_EGRESS_ALLOW value (ValueError on a bad one)."""
    return tuple(parse_rule(item) for item in raw.split(",") if item.strip())


@dataclass(frozen=True)
class Origin:
    """scheme://host:port of a URL."""

    scheme: str
    host: str
    port: int

    @classmethod
    def of(cls, url: str | URL) -> Origin | None:
        """The origin of an absolute http(s) URL, else None."""
        try:
            parsed = url if isinstance(url, URL) else URL(url)
        except (ValueError, TypeError):
            return None
        if parsed.scheme not in ("http", "https") or not parsed.raw_host or parsed.port is None:
            return None
        return cls(parsed.scheme, normalize_host(parsed.raw_host), parsed.port)


def same_origin(url: str, other: str) -> bool:
    """Whether two URLs share scheme, host and port."""
    origin = Origin.of(url)
    return origin is not None and origin == Origin.of(other)


# --- the policy --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EgressPolicy:
    """Where outbound calls may go. The default instance is the strictest: https to public
    addresses only, no allow-list, no trusted origin."""

    allow_http: bool = False
    rules: tuple[Rule, ...] = ()
    # Origins trusted for platform calls whatever their address (the sandbox's own).
    trusted_origins: tuple[Origin, ...] = ()

    @classmethod
    def from_env(cls, environ: Mapping[str, str], *, sandbox: bool, public_base_url: str) -> EgressPolicy:
        """Read THREADLINE_EGRESS_ALLOW / _ALLOW_HTTP; ValueError names a bad entry."""
        raw_http = (environ.get(ALLOW_HTTP_ENV) or ("1" if sandbox else "0")).strip().lower()
        if raw_http not in {"1", "true", "yes", "on", "0", "false", "no", "off"}:
            raise ValueError(f"{ALLOW_HTTP_ENV} must be 1 or 0, got {raw_http!r}")
        trusted: tuple[Origin, ...] = ()
        if sandbox:
            origin = Origin.of(public_base_url)
            trusted = (origin,) if origin is not None else ()
        return cls(allow_http=raw_http in {"1", "true", "yes", "on"}, rules=parse_rules(environ.get(ALLOW_ENV, "")),
                   trusted_origins=trusted)

    # -- decisions ----------------------------------------------------------------------------

    def refuse(self, host: str, reason: str, *, purpose: Purpose, stage: str, port: int | None = None) -> EgressRefused:
        """Log and count a refusal; return the exception to raise."""
        REFUSALS[(purpose, stage)] += 1
        log.warning("egress refused: %s: %s", host, reason, extra=log_fields(
            event="egress_refused", egress_host=host, egress_port=port, purpose=purpose, stage=stage, reason=reason))
        return EgressRefused(host, reason)

    def _trusted(self, host: str, port: int, scheme: str | None = None) -> bool:
        name = normalize_host(host)
        return any(o.host == name and o.port == port and (scheme is None or o.scheme == scheme)
                   for o in self.trusted_origins)

    def _denied(self, host: str, port: int, addresses: Sequence[IPAddress]) -> bool:
        return any(rule.deny and (rule.covers_name(host, port) or any(rule.covers_address(a, port) for a in addresses))
                   for rule in self.rules)

    def _allowed_name(self, host: str, port: int, purpose: Purpose) -> bool:
        return any(not rule.deny and rule.applies(purpose) and rule.covers_name(host, port) for rule in self.rules)

    def _allowed_address(self, address: IPAddress, port: int, purpose: Purpose) -> bool:
        return any(not rule.deny and rule.applies(purpose) and rule.covers_address(address, port)
                   for rule in self.rules)

    def _static(self, host: str, port: int, purpose: Purpose, stage: str) -> bool:
        """Check a host before DNS (deny rules, literal addresses, private names); True when
        the allow-list names it (so a platform base URL on it is the operator's choice)."""
        try:
            kind = classify_host(host)
        except EgressRefused as exc:
            raise self.refuse(exc.host, exc.reason, purpose=purpose, stage=stage, port=port) from None
        if self._denied(host, port, kind.addresses):
            raise self.refuse(host, f"{_host_port(host, port)} is denied by {ALLOW_ENV}", purpose=purpose,
                              stage=stage, port=port)
        if self._allowed_name(host, port, purpose):
            return True
        if kind.private_name is not None:
            raise self.refuse(host, f"{host} is {kind.private_name}{_EXCEPTIONS}", purpose=purpose, stage=stage,
                              port=port)
        for address in kind.addresses:
            if self._allowed_address(address, port, purpose):
                continue
            reason = address_refusal(address)
            if reason is not None:
                what = reason if str(address) == host else f"{address}, {reason}"
                raise self.refuse(host, f"{host} is {what}{_EXCEPTIONS}", purpose=purpose, stage=stage, port=port)
        return bool(kind.addresses) and all(self._allowed_address(a, port, purpose) for a in kind.addresses)

    def check_url(self, url: str | URL, *, purpose: Purpose, hosts: Sequence[str] = ()) -> URL:
        """Refuse (EgressRefused) a URL no outbound call may fetch; return it parsed.

        `purpose` "platform" (with the platform's own `hosts`) accepts only those hosts over
        https, a trusted origin (the sandbox's) or an allow-listed host; "business" (webhook
        targets) accepts any public host. DNS is not asked here: `check_addresses` does it at
        connect time.
        """
        text = str(url)
        if any(c.isspace() or ord(c) < 32 or c == "\\" for c in text):
            raise self.refuse("", "the URL contains spaces, control characters or backslashes", purpose=purpose,
                              stage="url")
        try:
            parsed = url if isinstance(url, URL) else URL(text)
        except (ValueError, TypeError):
            raise self.refuse("", "not a valid URL", purpose=purpose, stage="url") from None
        scheme = parsed.scheme.lower()
        if scheme not in ("http", "https"):
            raise self.refuse("", f"a {scheme or 'relative'} URL is not allowed (https only)", purpose=purpose,
                              stage="url")
        host = normalize_host(parsed.raw_host or "")
        if not parsed.absolute or not host or parsed.port is None:
            raise self.refuse(host, "the URL has no host", purpose=purpose, stage="url")
        port = parsed.port
        if purpose == "platform" and self._trusted(host, port, scheme):
            return parsed
        if scheme == "http" and not self.allow_http:
            raise self.refuse(host, f"plain http to {host} is not allowed (https only; {ALLOW_HTTP_ENV})",
                              purpose=purpose, stage="url", port=port)
        listed = self._static(host, port, purpose, "url")
        if purpose == "platform" and not listed:
            if not host_matches(host, hosts):
                own = ", ".join(h.lstrip(".") for h in hosts) or "none configured"
                raise self.refuse(host, f"{host} is not the platform's API host ({own}); another base URL is an "
                                        f"operator setting ({ALLOW_ENV})", purpose=purpose, stage="url", port=port)
            if scheme != "https":
                raise self.refuse(host, f"{host} is a platform API, reached over https only", purpose=purpose,
                                  stage="url", port=port)
        return parsed

    def check_host(self, host: str, port: int, *, purpose: Purpose = "business") -> None:
        """Refuse a host:port (an SMTP server) before DNS: deny rules, literal and private names."""
        self._static(host, port, purpose, "url")

    def check_addresses(self, host: str, port: int, addresses: Sequence[str], *, purpose: Purpose) -> None:
        """Refuse unless every address `host` resolved to may be connected to (connect time)."""
        if purpose == "platform" and self._trusted(host, port):
            return
        parsed: list[IPAddress] = []
        for text in addresses:
            address = parse_address(text)
            if address is None:
                raise self.refuse(host, f"{host} resolves to an unreadable address {text!r}", purpose=purpose,
                                  stage="connect", port=port)
            parsed.append(address)
        if not parsed:
            raise self.refuse(host, f"{host} resolves to no address", purpose=purpose, stage="connect", port=port)
        if self._denied(host, port, parsed):
            raise self.refuse(host, f"{_host_port(host, port)} is denied by {ALLOW_ENV}", purpose=purpose,
                              stage="connect", port=port)
        if self._allowed_name(host, port, purpose):
            return
        for address in parsed:
            if self._allowed_address(address, port, purpose):
                continue
            reason = address_refusal(address)
            if reason is not None:
                raise self.refuse(host, f"{host} resolves to {address}, {reason}{_EXCEPTIONS}", purpose=purpose,
                                  stage="connect", port=port)

    async def resolve(self, host: str, port: int, *, purpose: Purpose, timeout: float | None = None) -> list[str]:
        """Resolve `host` once and return its addresses, all checked (EgressRefused otherwise)."""
        loop = asyncio.get_running_loop()
        try:
            infos = await asyncio.wait_for(loop.getaddrinfo(host, port, type=socket.SOCK_STREAM), timeout)
        except socket.gaierror as exc:
            raise OSError(f"cannot resolve {host}: {exc}") from exc
        addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
        self.check_addresses(host, port, addresses, purpose=purpose)
        return addresses

    async def connect_smtp(self, host: str, port: int, *, timeout: float | None = None) -> socket.socket:
        """A connected socket to a checked address of an SMTP server (give aiosmtplib `sock=` and
        keep `hostname=host`, so TLS still verifies the name). OSError when none answers."""
        self.check_host(host, port)
        loop = asyncio.get_running_loop()
        last: OSError | None = None
        for address in await self.resolve(host, port, purpose="business", timeout=timeout):
            family = socket.AF_INET6 if ":" in address else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.setblocking(False)
            try:
                await asyncio.wait_for(loop.sock_connect(sock, (address, port)), timeout)
            except (OSError, TimeoutError) as exc:
                sock.close()
                last = exc if isinstance(exc, OSError) else OSError(f"timed out connecting to {address}:{port}")
                continue
            return sock
        raise last or OSError(f"cannot connect to {host}:{port}")

    # -- clients ------------------------------------------------------------------------------

    def http_session(self, purpose: Purpose, *, hosts: Sequence[str] = (), timeout: aiohttp.ClientTimeout | None = None,
                     limit: int = 100, ttl_dns_cache: int | None = 10,
                     resolver: AbstractResolver | None = None) -> EgressSession:
        """An aiohttp session under this policy (see `EgressSession`); create it inside a loop."""
        return EgressSession(self, purpose, hosts=hosts, timeout=timeout, limit=limit, ttl_dns_cache=ttl_dns_cache,
                             resolver=resolver)

    def httpx_transport(self, purpose: Purpose, *, http2: bool = False) -> httpx.AsyncHTTPTransport:
        """An httpx transport that resolves, checks and connects only to checked addresses."""
        return _EgressTransport(self, purpose, http2=http2)


# --- aiohttp -----------------------------------------------------------------------------------------


class _EgressConnector(aiohttp.TCPConnector):
    """A TCPConnector that checks every address a host resolved to (or the literal address)
    before any connection is opened to it; cached DNS answers are checked on every use."""

    def __init__(self, policy: EgressPolicy, purpose: Purpose, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._egress_policy = policy
        self._egress_purpose: Purpose = purpose

    async def _resolve_host(self, host: str, port: int, traces: Sequence[Trace] | None = None) -> list[ResolveResult]:
        results = await super()._resolve_host(host, port, traces=traces)
        self._egress_policy.check_addresses(host, port, [r["host"] for r in results], purpose=self._egress_purpose)
        return results


class EgressSession:
    """An aiohttp ClientSession under the egress policy: every request's URL is checked
    (`check_url`, with the session's platform `hosts` unless a call names others), every
    connection goes to checked addresses only, and redirects are never followed."""

    def __init__(self, policy: EgressPolicy, purpose: Purpose, *, hosts: Sequence[str] = (),
                 timeout: aiohttp.ClientTimeout | None = None, limit: int = 100, ttl_dns_cache: int | None = 10,
                 resolver: AbstractResolver | None = None) -> None:
        self.policy = policy
        self.purpose: Purpose = purpose
        self.hosts = tuple(hosts)
        connector = _EgressConnector(policy, purpose, limit=limit, ttl_dns_cache=ttl_dns_cache, resolver=resolver)
        options: dict[str, Any] = {"connector": connector, "cookie_jar": aiohttp.DummyCookieJar(), "trust_env": False}
        if timeout is not None:
            options["timeout"] = timeout
        self._session = aiohttp.ClientSession(**options)

    def request(self, method: str, url: str, *, hosts: Sequence[str] | None = None,
                **kwargs: Any) -> AbstractAsyncContextManager[aiohttp.ClientResponse]:
        """`ClientSession.request` after the URL check; EgressRefused (raised here, or from the
        connection) for a refused destination."""
        self.policy.check_url(url, purpose=self.purpose, hosts=self.hosts if hosts is None else hosts)
        kwargs["allow_redirects"] = False
        return self._session.request(method, url, **kwargs)

    def get(self, url: str, **kwargs: Any) -> AbstractAsyncContextManager[aiohttp.ClientResponse]:
        """A checked GET (see `request`)."""
        return self.request("GET", url, **kwargs)

    def post(self, url: str, **kwargs: Any) -> AbstractAsyncContextManager[aiohttp.ClientResponse]:
        """A checked POST (see `request`)."""
        return self.request("POST", url, **kwargs)

    @property
    def closed(self) -> bool:
        """Whether the session was closed."""
        return self._session.closed

    async def close(self) -> None:
        """Close the session and its connections."""
        await self._session.close()


# --- httpx -------------------------------------------------------------------------------------------


class _EgressBackend(httpcore.AsyncNetworkBackend):
    """httpcore's network backend, resolving once and connecting only to checked addresses
    (TLS still verifies the URL's host name: httpcore passes it as server_hostname)."""

    def __init__(self, policy: EgressPolicy, purpose: Purpose) -> None:
        self._policy = policy
        self._purpose: Purpose = purpose
        self._inner = httpcore.AnyIOBackend()

    async def connect_tcp(self, host: str, port: int, timeout: float | None = None, local_address: str | None = None,
                          socket_options: Iterable[Any] | None = None) -> httpcore.AsyncNetworkStream:
        # httpx maps only httpcore's exceptions to its own: DNS and connect failures must be those.
        try:
            addresses = await self._policy.resolve(host, port, purpose=self._purpose, timeout=timeout)
        except TimeoutError as exc:
            raise httpcore.ConnectTimeout(f"resolving {host} timed out") from exc
        except OSError as exc:
            raise httpcore.ConnectError(str(exc)) from exc
        last: Exception = httpcore.ConnectError(f"cannot connect to {host}:{port}")
        for address in addresses:
            try:
                return await self._inner.connect_tcp(address, port, timeout=timeout, local_address=local_address,
                                                     socket_options=socket_options)
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                last = exc
            except OSError as exc:
                last = httpcore.ConnectError(str(exc))
        raise last

    async def connect_unix_socket(self, path: str, timeout: float | None = None,
                                  socket_options: Iterable[Any] | None = None) -> httpcore.AsyncNetworkStream:
        raise EgressRefused(path, "a unix socket is not an outbound destination")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


class _EgressTransport(httpx.AsyncHTTPTransport):
    """httpx's default transport over `_EgressBackend`, ignoring proxy variables (a proxy
    would connect on our behalf, out of the policy's sight)."""

    def __init__(self, policy: EgressPolicy, purpose: Purpose, *, http2: bool) -> None:
        super().__init__(http2=http2, trust_env=False)
        limits = httpx.Limits(max_connections=100, max_keepalive_connections=20)
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=httpx.create_ssl_context(), max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections, keepalive_expiry=limits.keepalive_expiry,
            http1=True, http2=http2, network_backend=_EgressBackend(policy, purpose))
