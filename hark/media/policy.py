"""MediaPolicy: what media URLs hark may read. Secure by default: only data: URLs pass."""
import os
from dataclasses import dataclass, field

import httpx

TIMEOUT_ENV = "HARK_MEDIA_FETCH_TIMEOUT"


def default_timeout_s() -> float:
    value = os.environ.get(TIMEOUT_ENV, "10")
    try:
        timeout_s = float(value)
    except ValueError:
        timeout_s = 0.0
    if not timeout_s > 0:
        raise ValueError(f"{TIMEOUT_ENV}={value!r} is not a positive number of seconds")
    return timeout_s


@dataclass(frozen=True)
class MediaPolicy:
    # Hosts http(s) URLs may name. "example.com" matches that host only, "*.example.com" its
    # subdomains (not example.com itself), "*" any host. Empty: http(s) is refused.
    allowed_domains: tuple[str, ...] = ()
    # Let allowed hosts resolve to loopback, private, link-local, multicast, reserved or
    # unspecified addresses (IPv4 and IPv6). Off by default: a URL must not reach internal services.
    allow_private_addresses: bool = False
    # Folder whose files file: URLs may read (after resolving symlinks). None: file: is refused.
    allowed_local_root: str | None = None
    timeout_s: float = field(default_factory=default_timeout_s)  # whole fetch, redirects included
    max_bytes: int = 25 * 2**20
    max_redirects: int = 5
    # Replaces httpx's network transport; only tests set it, to route a public address to a
    # local server. It must implement handle_request (sync) or handle_async_request (async).
    transport: httpx.BaseTransport | httpx.AsyncBaseTransport | None = None

    def __post_init__(self):
        if isinstance(self.allowed_domains, str):
            raise ValueError("allowed_domains must be a tuple of host names, not a string")
        object.__setattr__(self, "allowed_domains", tuple(self.allowed_domains))
        if self.allowed_local_root is not None and not os.path.isdir(self.allowed_local_root):
            raise ValueError(f"allowed local media path {self.allowed_local_root!r} is not a folder")
        if not self.timeout_s > 0 or self.max_bytes < 1 or self.max_redirects < 0:
            raise ValueError("timeout_s and max_bytes must be positive and max_redirects >= 0")

    def allows_host(self, host: str) -> bool:
        host = host.lower().rstrip(".")
        for pattern in self.allowed_domains:
            pattern = pattern.lower().rstrip(".")
            if pattern == "*" or pattern == host:
                return True
            if pattern.startswith("*.") and host.endswith(pattern[1:]):
                return True
        return False
