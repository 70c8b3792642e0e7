"""Which IP addresses a media fetch may connect to, and resolving a host to a vetted one."""
import ipaddress
import socket

from hark.media.errors import MediaFetchError, MediaNotAllowedError
from hark.media.policy import MediaPolicy


def is_public_address(address: str) -> bool:
    """False for loopback, private, link-local, multicast, reserved and unspecified addresses,
    IPv4 or IPv6; an IPv4-mapped IPv6 address (::ffff:a.b.c.d) is judged as its IPv4 address."""
    ip = ipaddress.ip_address(address.split("%")[0])  # drop an IPv6 zone ("fe80::1%eth0")
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not (
        ip.is_loopback or ip.is_private or ip.is_link_local or ip.is_multicast
        or ip.is_reserved or ip.is_unspecified)


def resolve(host: str, port: int) -> list[str]:
    """All addresses `host` resolves to (an IP literal resolves to itself, without DNS)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        raise MediaFetchError(f"media host {host!r} could not be resolved") from None
    return list(dict.fromkeys(info[4][0] for info in infos))


def vetted_address(host: str, addresses: list[str], policy: MediaPolicy) -> str:
    """The address to connect to. Every address the host has must pass, so that which one a
    retry or another resolver would pick cannot matter."""
    if not addresses:
        raise MediaFetchError(f"media host {host!r} could not be resolved")
    if not policy.allow_private_addresses and not all(map(is_public_address, addresses)):
        raise MediaNotAllowedError(
            f"media host {host!r} resolves to a loopback, private or otherwise non-public address; "
            "allow such addresses with --allow-private-media-addresses")
    return addresses[0]
