"""Client addresses behind reverse proxies (`[http] trusted_proxies`).

Behind nginx or a load balancer every connection comes from the proxy, so per-IP rate
limits, login throttles and audit entries would all see one address. When the peer is
a trusted proxy, the client is the right-most `X-Forwarded-For` hop that is not itself
a trusted proxy (each proxy appends the address it received the request from; hops to
the left of the first untrusted one could be forged by the client). A peer that is not
trusted is the client, whatever headers it sends. An unparsable hop stops the walk at
the last address known good.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from functools import lru_cache

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_network(entry: str) -> Network:
    """`10.0.0.1`, `10.0.0.0/8`, `::1` or `fd00::/8` -> a network; ValueError otherwise."""
    return ipaddress.ip_network(entry.strip(), strict=False)


@lru_cache(maxsize=16)
def trusted_networks(entries: tuple[str, ...]) -> tuple[Network, ...]:
    """The configured trusted proxies as networks (validated at config load)."""
    return tuple(parse_network(e) for e in entries)


def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    text = text.strip()
    if text.startswith("[") and "]" in text:  # "[2001:db8::1]:443"
        text = text[1 : text.index("]")]
    elif text.count(":") == 1:  # "203.0.113.7:51234"
        text = text.split(":", 1)[0]
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def _trusted(addr: ipaddress.IPv4Address | ipaddress.IPv6Address, nets: Iterable[Network]) -> bool:
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return any(addr in net for net in nets)


def client_address(peer: str, forwarded_for: str | None, trusted: tuple[Network, ...]) -> str:
    """The client's address for a connection from `peer` carrying `forwarded_for`."""
    if not trusted or not forwarded_for:
        return peer
    peer_addr = _address(peer)
    if peer_addr is None or not _trusted(peer_addr, trusted):
        return peer
    client = peer
    for hop in reversed(forwarded_for.split(",")):
        addr = _address(hop)
        if addr is None:
            return client
        client = str(addr)
        if not _trusted(addr, trusted):
            return client
    return client  # every hop is a trusted proxy: the left-most one
