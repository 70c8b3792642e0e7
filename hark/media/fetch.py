"""fetch_media / afetch_media: read a media URL (http(s), data:, file:) under a MediaPolicy.

An http(s) fetch checks each hop before any byte is sent: the scheme, the host against the
allow-list, and every address the host resolves to. It then connects to the address it checked
(the URL's host is replaced by that IP; the Host header and TLS SNI keep the name, so certificates
are still verified against the name), so a second DNS answer cannot redirect the connection.
Requests go straight to an httpx transport: the client's redirect machinery is not involved, and
redirects are followed here, each hop checked again. The body is streamed under the byte cap,
and the whole fetch, redirects included, is bounded by policy.timeout_s (sync: checked between
reads, each read bounded by the time left; DNS resolution itself is bounded only by the system
resolver there). The sync and async paths share every check; they differ only in their I/O calls.
"""
import asyncio
import contextlib
import time

import httpx

import hark
from hark.media.addresses import resolve, vetted_address
from hark.media.errors import MediaError, MediaFetchError, MediaNotAllowedError, MediaTooLargeError
from hark.media.inline import decode_data_url, read_local_file
from hark.media.policy import TIMEOUT_ENV, MediaPolicy

DEFAULT_PORTS = {"http": 80, "https": 443}


def fetch_media(url: str, policy: MediaPolicy) -> bytes:
    scheme = _scheme(url)
    if scheme == "data":
        return decode_data_url(url, policy.max_bytes)
    if scheme == "file":
        return read_local_file(url, policy)
    return _fetch_http(_parse_http_url(url), policy)


async def afetch_media(url: str, policy: MediaPolicy) -> bytes:
    scheme = _scheme(url)
    if scheme == "data":
        return decode_data_url(url, policy.max_bytes)
    if scheme == "file":
        return await asyncio.to_thread(read_local_file, url, policy)
    http_url = _parse_http_url(url)
    try:
        return await asyncio.wait_for(_afetch_http(http_url, policy), policy.timeout_s)
    except asyncio.TimeoutError:  # TimeoutError itself from Python 3.11 on
        raise _timeout_error(http_url, policy) from None


def _fetch_http(url: httpx.URL, policy: MediaPolicy) -> bytes:
    deadline = _Deadline(url, policy)
    with _translate_httpx_errors(url, policy), policy.transport or httpx.HTTPTransport() as transport:
        for _ in range(policy.max_redirects + 1):
            _check_hop(url, policy)
            address = vetted_address(url.host, resolve(*_host_port(url)), policy)
            response = transport.handle_request(_pinned_request(url, address, deadline))
            try:
                next_url = _redirect_target(response, url, policy)
                if next_url is None:
                    body = _Body(url, policy, deadline)
                    for chunk in response.iter_bytes():
                        body.add(chunk)
                    return bytes(body.data)
            finally:
                response.close()
            url = next_url
    raise MediaFetchError(f"media URL redirected more than {policy.max_redirects} times")


async def _afetch_http(url: httpx.URL, policy: MediaPolicy) -> bytes:
    deadline = _Deadline(url, policy)
    with _translate_httpx_errors(url, policy):
        async with policy.transport or httpx.AsyncHTTPTransport() as transport:
            for _ in range(policy.max_redirects + 1):
                _check_hop(url, policy)
                addresses = await asyncio.to_thread(resolve, *_host_port(url))
                address = vetted_address(url.host, addresses, policy)
                response = await transport.handle_async_request(_pinned_request(url, address, deadline))
                try:
                    next_url = _redirect_target(response, url, policy)
                    if next_url is None:
                        body = _Body(url, policy, deadline)
                        async for chunk in response.aiter_bytes():
                            body.add(chunk)
                        return bytes(body.data)
                finally:
                    await response.aclose()
                url = next_url
    raise MediaFetchError(f"media URL redirected more than {policy.max_redirects} times")


def _scheme(url: str) -> str:
    scheme, colon, _ = url[:16].partition(":")  # only the head: a data: URL may be megabytes
    scheme = scheme.lower()
    if not colon or scheme not in ("http", "https", "data", "file"):
        raise MediaNotAllowedError("a media URL must start with http://, https://, data: or file:")
    return scheme


def _parse_http_url(url: str) -> httpx.URL:
    try:
        return httpx.URL(url)  # the parser the HTTP client itself uses
    except httpx.InvalidURL:
        raise MediaError("the media URL is not a valid http(s) URL") from None


def _check_hop(url: httpx.URL, policy: MediaPolicy) -> None:
    if url.scheme not in DEFAULT_PORTS:
        raise MediaNotAllowedError(f"media redirect to a {url.scheme}: URL refused; only http(s) redirects are followed")
    if not url.host:
        raise MediaError("the media URL has no host")
    if not policy.allowed_domains:
        raise MediaNotAllowedError("http(s) media URLs are disabled; allow hosts with --allowed-media-domains")
    if not policy.allows_host(url.host):
        raise MediaNotAllowedError(f"media host {url.host!r} is not allowed; add it to --allowed-media-domains")


def _host_port(url: httpx.URL) -> tuple[str, int]:
    return url.raw_host.decode("ascii"), url.port or DEFAULT_PORTS[url.scheme]


def _pinned_request(url: httpx.URL, address: str, deadline: "_Deadline") -> httpx.Request:
    """A GET sent to `address`, the vetted IP, that the server sees as a request for `url`."""
    headers = {"Host": url.netloc.decode("ascii"), "User-Agent": f"hark/{hark.__version__}",
               "Accept-Encoding": "identity"}
    extensions = {"timeout": httpx.Timeout(deadline.remaining()).as_dict()}
    if url.scheme == "https":
        extensions["sni_hostname"] = url.raw_host.decode("ascii")
    return httpx.Request("GET", url.copy_with(host=address), headers=headers, extensions=extensions)


def _redirect_target(response: httpx.Response, url: httpx.URL, policy: MediaPolicy) -> httpx.URL | None:
    """Where a redirect points; None for a success whose announced size fits the cap."""
    if response.is_redirect:
        try:
            return url.join(response.headers["location"])
        except httpx.InvalidURL:
            raise MediaFetchError(f"media host {url.host!r} redirected to an invalid URL") from None
    if not response.is_success:
        raise MediaFetchError(f"media host {url.host!r} answered HTTP {response.status_code}",
                              status_code=response.status_code)
    length = response.headers.get("content-length", "")
    if length.isdigit() and int(length) > policy.max_bytes:
        raise MediaTooLargeError(f"media at {url.host!r} is {length} bytes, over the limit of {policy.max_bytes}")
    return None


class _Body:
    """The response body so far, refused as soon as it passes the cap or the deadline."""

    def __init__(self, url: httpx.URL, policy: MediaPolicy, deadline: "_Deadline"):
        self.url, self.policy, self.deadline = url, policy, deadline
        self.data = bytearray()

    def add(self, chunk: bytes) -> None:
        self.data += chunk
        if len(self.data) > self.policy.max_bytes:
            raise MediaTooLargeError(f"media at {self.url.host!r} is over the limit of {self.policy.max_bytes} bytes")
        self.deadline.remaining()


class _Deadline:
    def __init__(self, url: httpx.URL, policy: MediaPolicy):
        self.url, self.policy = url, policy
        self.end = time.monotonic() + policy.timeout_s

    def remaining(self) -> float:
        left = self.end - time.monotonic()
        if left <= 0:
            raise _timeout_error(self.url, self.policy)
        return left


def _timeout_error(url: httpx.URL, policy: MediaPolicy) -> MediaFetchError:
    return MediaFetchError(f"fetching media from {url.host!r} timed out after {policy.timeout_s:g} s; "
                           f"raise the limit with the {TIMEOUT_ENV} environment variable")


@contextlib.contextmanager
def _translate_httpx_errors(url: httpx.URL, policy: MediaPolicy):
    try:
        yield
    except httpx.TimeoutException:
        raise _timeout_error(url, policy) from None
    except (httpx.HTTPError, httpx.InvalidURL):  # InvalidURL: an address httpx cannot put in a URL
        raise MediaFetchError(f"fetching media from {url.host!r} failed: the connection could not be "
                              "made or broke off") from None
