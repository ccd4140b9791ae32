"""The client's address behind proxies: `X-Forwarded-For` believed only from trusted proxies.

A request's peer is either the client or a proxy (the front door of `threadline up`, the
Kubernetes ingress). Each proxy appends the address it saw to `X-Forwarded-For`, so the list is
read from the right: entries added by trusted proxies are skipped, and the first address that is
not a trusted proxy is the client. Anything further left was written by the client itself and
is never believed. Rate limits key on `source_key`, which folds an IPv6 client into its /64 (one
subscriber gets a whole /64 and could otherwise take a fresh address per request).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping, Sequence

from shared.config import ConfigError, env_str

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
# The front door of `threadline up` (and its cluster balancers) reach the services over loopback.
DEFAULT_TRUSTED_PROXIES = "127.0.0.1/32,::1/128"
TRUSTED_PROXIES_VAR = "THREADLINE_TRUSTED_PROXIES"
IPV6_SOURCE_PREFIX = 64


def parse_networks(raw: str) -> tuple[Network, ...]:
    """`"10.0.0.0/8, ::1"` → networks; `"none"` → no network. ValueError when an entry is not one."""
    if raw.strip().lower() == "none":
        return ()
    return tuple(ipaddress.ip_network(part.strip(), strict=False) for part in raw.split(",") if part.strip())


def env_trusted_proxies(environ: Mapping[str, str] | None = None) -> tuple[Network, ...]:
    """`THREADLINE_TRUSTED_PROXIES` (comma-separated addresses or CIDRs, `none` for no proxy)."""
    raw = env_str(TRUSTED_PROXIES_VAR, DEFAULT_TRUSTED_PROXIES, environ)
    try:
        return parse_networks(raw)
    except ValueError as exc:
        raise ConfigError(f"{TRUSTED_PROXIES_VAR} must be addresses or CIDRs separated by commas: {exc}") from exc


def _address(value: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    text = value.strip()
    if text.startswith("[") and "]" in text:  # "[2001:db8::1]:443"
        text = text[1:text.index("]")]
    elif text.count(":") == 1:  # "203.0.113.7:51234"
        text = text.split(":", 1)[0]
    try:
        address = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _trusted(address: ipaddress.IPv4Address | ipaddress.IPv6Address, trusted: Iterable[Network]) -> bool:
    return any(address.version == net.version and address in net for net in trusted)


def client_ip(peer: str | None, forwarded_for: Sequence[str], trusted: Sequence[Network]) -> str | None:
    """The client's address: `peer`, or, when `peer` is a trusted proxy, the rightmost address of
    `forwarded_for` (every `X-Forwarded-For` header, in order) that is not a trusted proxy.

    None when the peer is unknown. A malformed entry where a proxy should have written the
    address ends the walk at the last proxy (a sane proxy never writes one).
    """
    current = _address(peer or "")
    if current is None:
        return None
    hops = [hop for header in forwarded_for for hop in header.split(",") if hop.strip()]
    while _trusted(current, trusted) and hops:
        previous = _address(hops.pop())
        if previous is None:
            break
        current = previous
    return str(current)


def source_key(ip: str) -> str:
    """What one source is counted as: the IPv4 address, or the /64 of an IPv6 address."""
    address = _address(ip)
    if address is None:
        return ip
    if isinstance(address, ipaddress.IPv6Address):
        return str(ipaddress.ip_network(f"{address}/{IPV6_SOURCE_PREFIX}", strict=False))
    return str(address)
