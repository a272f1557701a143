"""Server-side request forgery guard of the image fetcher: which URLs and addresses it may connect to.

Three layers (aiohttp never resolves IP literals, so those meet the first and the last only):

* ``normalise_url`` judges the host exactly as the HTTP client will see it: yarl (which aiohttp uses) applies IDNA /
  UTS #46 mapping, so ``１２７.０.０.１``, ``①②⑦.⓪.⓪.①`` or ``127。0。0。1`` become ``127.0.0.1``; the result must be
  ASCII, and an IPv4 literal in any notation ``inet_aton`` accepts (``2130706433``, ``0177.0.0.1``, ``0x7f.1``,
  ``127.1``) is parsed as the address the resolver would connect to;
* ``PublicAddressResolver`` refuses names that resolve to any non-public address (aiohttp skips it for IP literals);
* ``public_socket`` (the connector's socket factory) refuses every non-public address actually connected to, on every
  hop, whatever the layers above missed.
"""

from __future__ import annotations

import errno
import ipaddress
import re
import socket

import aiohttp
from aiohappyeyeballs import AddrInfoType
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver
from yarl import URL

from rtp_mm.server.errors import UnprocessableImage

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# Ranges that carry an IPv4 address in their low 32 bits: mapped, SIIT-translated, NAT64 well-known prefix.
_EMBEDDED_V4 = tuple(ipaddress.ip_network(n) for n in ("::ffff:0:0/96", "::ffff:0:0:0/96", "64:ff9b::/96"))
# Never public: IPv4-compatible (deprecated, incl. :: and ::1) and the local-use NAT64 prefix (RFC 8215).
_NEVER_PUBLIC_V6 = tuple(ipaddress.ip_network(n) for n in ("::/96", "64:ff9b:1::/48"))
_NUMBER = re.compile(r"0x[0-9a-f]*|[0-9]+")
_NAME = re.compile(r"[a-z0-9_-]+(\.[a-z0-9_-]+)*")


class BadUrl(ValueError):
    """Not an http(s) URL with a well-formed ASCII host after normalisation."""


class NonPublicHost(ValueError):
    """The host is (or names) a loopback, private, link-local, reserved or otherwise non-public address."""


class NonPublicAddressError(PermissionError):
    """Raised by the socket factory; an OSError, so aiohttp fails the connection attempt cleanly."""


def is_public_address(address: str | IPAddress) -> bool:
    """Whether ``address`` is a globally reachable unicast address. Malformed or scoped addresses are not."""
    if isinstance(address, str):
        if "%" in address:  # a zone id: link-local by construction
            return False
        try:
            address = ipaddress.ip_address(address)
        except ValueError:
            return False
    if isinstance(address, ipaddress.IPv6Address):
        if address.scope_id or any(address in net for net in _NEVER_PUBLIC_V6):
            return False
        if any(address in net for net in _EMBEDDED_V4):
            return is_public_address(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
        if address.sixtofour is not None and not is_public_address(address.sixtofour):
            return False
    return address.is_global and not address.is_multicast


def _ipv4_number(label: str) -> int | None:
    """One part of an ``inet_aton`` address: decimal, ``0`` octal or ``0x`` hex."""
    try:
        if label.startswith("0x"):
            return int(label[2:] or "0", 16)
        if len(label) > 1 and label.startswith("0"):
            return int(label[1:], 8)
        return int(label, 10) if label.isdigit() else None
    except ValueError:
        return None


def _parse_ipv4(labels: list[str]) -> ipaddress.IPv4Address | None:
    """The address of 1 to 4 numeric parts, the last filling the remaining bytes (``127.1`` is 127.0.0.1)."""
    numbers = [_ipv4_number(label) for label in labels]
    if not 1 <= len(numbers) <= 4 or any(n is None for n in numbers):
        return None
    *head, last = numbers
    if any(n > 255 for n in head) or last >= 256 ** (5 - len(numbers)):  # type: ignore[operator]
        return None
    value = sum(n << (8 * (3 - i)) for i, n in enumerate(head)) + last  # type: ignore[operator]
    return ipaddress.IPv4Address(value)


def normalise_host(raw_host: str) -> str | IPAddress:
    """The canonical form of a host as yarl encoded it: an IP address, or a lower-case ASCII name without the
    trailing dot. Raises BadUrl for anything else (non-ASCII left after IDNA, percent escapes, zone ids, a name
    ending in a number that is no valid IPv4 address: resolvers would read those unpredictably)."""
    host = raw_host.lower()
    if not host.isascii():
        raise BadUrl(f"host {raw_host!r} is not ASCII after IDNA normalisation")
    if ":" in host:
        if "%" in host:
            raise BadUrl(f"host {raw_host!r} is a scoped (link-local) IPv6 address")
        try:
            return ipaddress.IPv6Address(host.strip("[]"))
        except ValueError:
            raise BadUrl(f"host {raw_host!r} is not a valid IPv6 address") from None
    host = host[:-1] if host.endswith(".") else host
    labels = host.split(".")
    if _NUMBER.fullmatch(labels[-1]):
        address = _parse_ipv4(labels)
        if address is None:
            raise BadUrl(f"host {raw_host!r} ends in a number but is not a valid IPv4 address")
        return address
    if not _NAME.fullmatch(host):
        raise BadUrl(f"host {raw_host!r} is not a valid host name")
    return host


def normalise_url(url: str | URL) -> tuple[URL, str | IPAddress]:
    """The URL aiohttp will request (parsed once, by yarl, and passed on as is) and its normalised host."""
    try:
        parsed = url if isinstance(url, URL) else URL(url)
    except (ValueError, TypeError):
        raise BadUrl(f"{str(url)!r} is not a valid URL") from None
    if parsed.scheme not in ("http", "https") or not parsed.raw_host:
        raise BadUrl(f"{str(url)!r} is not an http(s) URL")
    return parsed, normalise_host(parsed.raw_host)


def normalise_allowed_host(entry: str) -> str:
    """An ``IMAGE_URL_HOSTS`` entry in the form ``normalise_url`` gives hosts ("*" stays as is)."""
    if entry == "*":
        return entry
    try:
        return str(normalise_url(f"http://{entry}/")[1])
    except BadUrl:
        return entry.lower()  # matches nothing normalised; kept for the error message only


def check_public_host(host: str | IPAddress) -> None:
    """Refuse IP literals that are not public and names that are local by definition. Other names are checked
    when resolved (PublicAddressResolver) and when connected (public_socket)."""
    if isinstance(host, str):
        if host == "localhost" or host.endswith(".localhost"):  # RFC 6761: always loopback
            raise NonPublicHost(f"{host!r} is a non-public name (loopback by definition)")
        return
    if not is_public_address(host):
        raise NonPublicHost(f"{str(host)!r} is a non-public address")


class PublicAddressResolver(AbstractResolver):
    """Resolves like aiohttp but refuses hosts with any non-public address. The connection uses exactly the addresses
    checked here, so a DNS answer cannot change between the check and the connect (DNS rebinding)."""

    def __init__(self) -> None:
        self._inner = DefaultResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        blocked = sorted({r["host"] for r in results if not is_public_address(r["host"])})
        if blocked:
            shown = ", ".join(blocked)
            raise UnprocessableImage(f"image host {host!r} resolves to non-public address(es) {shown}", "image_url")
        return results

    async def close(self) -> None:
        await self._inner.close()


def public_socket(addr_info: AddrInfoType) -> socket.socket:
    """aiohttp's socket factory: called with the very address about to be connected to (after any resolution)."""
    family, type_, proto, _, address = addr_info
    host = str(address[0])
    scoped = family == socket.AF_INET6 and len(address) > 3 and address[3]
    if family not in (socket.AF_INET, socket.AF_INET6) or scoped or not is_public_address(host):
        raise NonPublicAddressError(errno.EACCES, f"connecting to non-public address {host} refused")
    return socket.socket(family=family, type=type_, proto=proto)


def is_refused_connection(error: BaseException) -> bool:
    """Whether a connection error came from ``public_socket`` (aiohappyeyeballs may merge several into one)."""
    return isinstance(error, NonPublicAddressError) or "non-public address" in str(error)


def make_fetch_connector() -> aiohttp.TCPConnector:
    """The connector of the image-fetch session: public addresses only, checked at resolve and at connect time."""
    return aiohttp.TCPConnector(resolver=PublicAddressResolver(), socket_factory=public_socket)
