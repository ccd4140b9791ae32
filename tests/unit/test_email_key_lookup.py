"""DKIM key lookups of the e-mail channel: a DNS failure is remembered (the mail is then put off
with a 451, never refused as a forgery), a missing key is not."""

from __future__ import annotations

from typing import Any

import dns.exception
import dns.resolver
import pytest

from services.email.app import KeyLookup


class _Record:
    strings = (b"v=DKIM1; k=rsa; ", b"p=AAAA")


@pytest.mark.parametrize("error, failed", [(dns.exception.Timeout(), True), (dns.resolver.NoNameservers(), True),
                                           (dns.resolver.NXDOMAIN(), False), (dns.resolver.NoAnswer(), False)])
def test_a_dns_failure_is_told_from_a_missing_key(error: Exception, failed: bool) -> None:
    def resolve(*_args: Any, **_kwargs: Any) -> Any:
        raise error

    lookup = KeyLookup(resolve)
    assert lookup(b"s1._domainkey.customer.example.") is None
    assert lookup.failed is failed


def test_a_key_is_its_txt_strings_joined() -> None:
    asked: list[tuple[Any, ...]] = []

    def resolve(*args: Any, **kwargs: Any) -> Any:
        asked.append((*args, kwargs["lifetime"]))
        return [_Record()]

    lookup = KeyLookup(resolve)
    assert lookup(b"s1._domainkey.customer.example.", timeout=2) == b"v=DKIM1; k=rsa; p=AAAA"
    assert asked == [("s1._domainkey.customer.example", "TXT", 2)] and not lookup.failed
