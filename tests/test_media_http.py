"""fetch_media / afetch_media over http(s) against real servers on 127.0.0.1. Nothing leaves the
machine: hosts are IP literals or "localhost", and RouteToLoopback fails a test that would reach
any non-loopback address."""
import asyncio
import http.server
import ipaddress
import shutil
import ssl
import subprocess
import threading
import time

import httpx
import pytest

from hark.media import (MediaError, MediaFetchError, MediaNotAllowedError, MediaPolicy, MediaTooLargeError,
                        afetch_media, fetch_media)
from hark.media.addresses import is_public_address

PUBLIC_IP = "93.184.216.34"  # a public address, never contacted: RouteToLoopback delivers it to 127.0.0.1
AUDIO = b"RIFF" + bytes(range(256)) * 40


class RouteToLoopback(httpx.BaseTransport, httpx.AsyncBaseTransport):
    """Stands in for the internet: a request to PUBLIC_IP lands on 127.0.0.1, loopback stays loopback,
    anything else fails the test. Records where each request was sent."""

    def __init__(self, verify: ssl.SSLContext | bool = True):
        self.sent_to = []
        self.sync, self.async_ = httpx.HTTPTransport(verify=verify), httpx.AsyncHTTPTransport(verify=verify)

    def route(self, request: httpx.Request) -> None:
        host = request.url.host
        self.sent_to.append(host)
        ip = ipaddress.ip_address(host)  # a name here would mean the client resolves it again itself
        if host == PUBLIC_IP:
            request.url = request.url.copy_with(host="127.0.0.1")
        else:
            assert ip.is_loopback, f"the test would reach {host}"

    def handle_request(self, request):
        self.route(request)
        return self.sync.handle_request(request)

    async def handle_async_request(self, request):
        self.route(request)
        return await self.async_.handle_async_request(request)

    def close(self):
        self.sync.close()

    async def aclose(self):
        await self.async_.aclose()


class LocalServer:
    """An HTTP/1.0 server on 127.0.0.1 in a thread; routes maps a path to a function(handler)."""

    def __init__(self, routes: dict, tls: ssl.SSLContext | None = None):
        self.requests = []  # (path, Host header) of each request received
        received = self.requests

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                received.append((self.path, self.headers.get("Host")))
                routes[self.path](self)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads, self.httpd.block_on_close = True, False
        self.httpd.handle_error = lambda request, address: None  # the client hung up: expected here
        if tls is not None:
            self.httpd.socket = tls.wrap_socket(self.httpd.socket, server_side=True)
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def send(body: bytes, status: int = 200, headers: dict = None, content_length: bool = True):
    def respond(handler):
        handler.send_response(status)
        for name, value in (headers or {}).items():
            handler.send_header(name, value)
        if content_length:
            handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)
    return respond


def redirect(location: str):
    return send(b"", 302, {"Location": location})


def endless(handler):
    """A body with no Content-Length that goes on until the client hangs up (at most 10 s)."""
    handler.send_response(200)
    handler.end_headers()
    end = time.monotonic() + 10
    while time.monotonic() < end:
        handler.wfile.write(bytes(64 * 1024))


def trickle(handler):
    """Answers at once, then sends a byte every 0.1 s for 5 s."""
    handler.send_response(200)
    handler.send_header("Content-Length", "50")
    handler.end_headers()
    for _ in range(50):
        handler.wfile.write(b"x")
        handler.wfile.flush()
        time.sleep(0.1)


def silent(handler):
    time.sleep(3)
    send(AUDIO)(handler)


@pytest.fixture
def serve():
    servers = []

    def start(routes, tls=None):
        servers.append(LocalServer(routes, tls))
        return servers[-1]
    yield start
    for server in servers:
        server.close()


@pytest.fixture(params=["sync", "async"])
def fetch(request):
    if request.param == "sync":
        return fetch_media
    return lambda url, policy: asyncio.run(afetch_media(url, policy))


def test_allowed_host_is_fetched_from_the_address_that_was_checked(fetch, serve):
    server = serve({"/a.wav": send(AUDIO)})
    route = RouteToLoopback()
    policy = MediaPolicy(allowed_domains=("localhost",), allow_private_addresses=True, transport=route)
    assert fetch(server.url("/a.wav", host="localhost"), policy) == AUDIO
    assert route.sent_to == ["127.0.0.1"]  # connected to the resolved IP...
    assert server.requests == [("/a.wav", f"localhost:{server.port}")]  # ...asking for the name


def test_public_host_is_fetched(fetch, serve):
    server = serve({"/a.wav": send(AUDIO)})
    policy = MediaPolicy(allowed_domains=(PUBLIC_IP,), transport=RouteToLoopback())
    assert fetch(server.url("/a.wav", host=PUBLIC_IP), policy) == AUDIO


def test_plain_httpx_transport_fetches_localhost(fetch, serve):
    server = serve({"/a.wav": send(AUDIO)})
    policy = MediaPolicy(allowed_domains=("localhost",), allow_private_addresses=True)
    assert fetch(server.url("/a.wav", host="localhost"), policy) == AUDIO


@pytest.mark.parametrize("allowed", [(), ("media.example", "*.localhost.example")])
def test_host_not_in_allow_list_is_refused(fetch, serve, allowed):
    server = serve({"/a.wav": send(AUDIO)})
    policy = MediaPolicy(allowed_domains=allowed, allow_private_addresses=True)
    with pytest.raises(MediaNotAllowedError, match="--allowed-media-domains"):
        fetch(server.url("/a.wav", host="localhost"), policy)
    assert server.requests == []


def test_allow_list_matching():
    policy = MediaPolicy(allowed_domains=("Media.Example", "*.cdn.example"))
    assert policy.allows_host("media.example") and policy.allows_host("media.example.")
    assert policy.allows_host("a.cdn.example") and policy.allows_host("a.b.cdn.example")
    assert not policy.allows_host("cdn.example")  # "*." means subdomains only
    assert not policy.allows_host("evilmedia.example") and not policy.allows_host("media.example.evil")
    assert not policy.allows_host("xcdn.example")
    assert MediaPolicy(allowed_domains=("*",)).allows_host("anything.example")


def test_allowed_host_resolving_to_loopback_is_refused_by_default(fetch, serve):
    server = serve({"/a.wav": send(AUDIO)})
    policy = MediaPolicy(allowed_domains=("localhost",))
    with pytest.raises(MediaNotAllowedError, match="--allow-private-media-addresses"):
        fetch(server.url("/a.wav", host="localhost"), policy)
    assert server.requests == []


@pytest.mark.parametrize("host", ["127.0.0.1", "127.8.9.10", "[::1]", "[::ffff:127.0.0.1]", "[::ffff:10.0.0.1]",
                                  "10.1.2.3", "172.16.0.1", "192.168.1.1", "169.254.169.254", "100.64.0.1",
                                  "0.0.0.0", "[::]", "224.0.0.1", "[ff02::1]", "[fe80::1]", "[fc00::1]",
                                  "240.0.0.1", "255.255.255.255"])
def test_non_public_address_literals_are_refused_before_connecting(fetch, host):
    route = RouteToLoopback()
    policy = MediaPolicy(allowed_domains=("*",), transport=route)
    with pytest.raises(MediaNotAllowedError, match="--allow-private-media-addresses"):
        fetch(f"http://{host}:9/a.wav", policy)
    assert route.sent_to == []


def test_public_addresses():
    for address in [PUBLIC_IP, "8.8.8.8", "2606:4700:4700::1111", "::ffff:8.8.8.8"]:
        assert is_public_address(address), address
    for address in ["127.0.0.1", "::1", "::ffff:127.0.0.1", "::ffff:192.168.0.1", "fe80::1%eth0", "::"]:
        assert not is_public_address(address), address


@pytest.mark.parametrize("target_host", ["127.0.0.1", "localhost"])
def test_redirect_to_a_loopback_address_is_refused_and_never_sent(fetch, serve, target_host):
    target = serve({"/secret": send(b"internal")})
    start = serve({"/a.wav": redirect(target.url("/secret", host=target_host))})
    allowed = (PUBLIC_IP, target_host)
    with pytest.raises(MediaNotAllowedError, match="--allow-private-media-addresses"):
        fetch(start.url("/a.wav", host=PUBLIC_IP), MediaPolicy(allowed_domains=allowed, transport=RouteToLoopback()))
    assert len(start.requests) == 1 and target.requests == []
    # The same redirect, private addresses allowed, does reach the target: the refusal above is the check's.
    opted_in = MediaPolicy(allowed_domains=allowed, allow_private_addresses=True, transport=RouteToLoopback())
    assert fetch(start.url("/a.wav", host=PUBLIC_IP), opted_in) == b"internal"
    assert len(target.requests) == 1


@pytest.mark.parametrize("location", ["http://localhost:{port}/a.wav", "file:///etc/passwd", "data:audio/wav;base64,AAAA",
                                      "ftp://{public}/a.wav"])
def test_redirect_off_the_allow_list_is_refused(fetch, serve, location):
    target = serve({"/a.wav": send(AUDIO)})
    start = serve({"/r": redirect(location.format(port=target.port, public=PUBLIC_IP))})
    policy = MediaPolicy(allowed_domains=(PUBLIC_IP,), allow_private_addresses=True, transport=RouteToLoopback())
    with pytest.raises(MediaNotAllowedError):
        fetch(start.url("/r", host=PUBLIC_IP), policy)
    assert target.requests == []


def test_at_most_max_redirects_are_followed(fetch, serve):
    routes = {f"/hop/{n}": redirect(f"/hop/{n - 1}") for n in range(1, 8)}  # relative Locations
    server = serve({**routes, "/hop/0": send(AUDIO)})
    policy = MediaPolicy(allowed_domains=(PUBLIC_IP,), transport=RouteToLoopback())
    assert fetch(server.url("/hop/5", host=PUBLIC_IP), policy) == AUDIO
    server.requests.clear()
    with pytest.raises(MediaFetchError, match="more than 5"):
        fetch(server.url("/hop/6", host=PUBLIC_IP), policy)
    assert len(server.requests) == 6


def test_silent_server_times_out(fetch, serve):
    server = serve({"/a.wav": silent})
    policy = MediaPolicy(allowed_domains=(PUBLIC_IP,), timeout_s=0.4, transport=RouteToLoopback())
    start = time.monotonic()
    with pytest.raises(MediaFetchError, match="timed out after 0.4 s") as error:
        fetch(server.url("/a.wav", host=PUBLIC_IP), policy)
    assert time.monotonic() - start < 1.5 and error.value.status_code is None


def test_trickling_body_times_out_on_the_whole_fetch(fetch, serve):
    server = serve({"/a.wav": trickle})  # each read is quick; the whole body takes 5 s
    policy = MediaPolicy(allowed_domains=(PUBLIC_IP,), timeout_s=0.5, transport=RouteToLoopback())
    start = time.monotonic()
    with pytest.raises(MediaFetchError, match="timed out"):
        fetch(server.url("/a.wav", host=PUBLIC_IP), policy)
    assert time.monotonic() - start < 1.5


def test_timeout_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("HARK_MEDIA_FETCH_TIMEOUT", "2.5")
    assert MediaPolicy().timeout_s == 2.5
    monkeypatch.setenv("HARK_MEDIA_FETCH_TIMEOUT", "soon")
    with pytest.raises(ValueError, match="HARK_MEDIA_FETCH_TIMEOUT"):
        MediaPolicy()


def test_announced_oversize_body_is_refused_before_reading(fetch, serve):
    server = serve({"/a.wav": send(bytes(5000))})
    policy = MediaPolicy(allowed_domains=(PUBLIC_IP,), max_bytes=4096, transport=RouteToLoopback())
    with pytest.raises(MediaTooLargeError, match="is 5000 bytes"):
        fetch(server.url("/a.wav", host=PUBLIC_IP), policy)


def test_unannounced_oversize_body_is_cut_off_at_the_cap(fetch, serve):
    server = serve({"/a.wav": endless})  # read to the end, it would run into the timeout instead
    policy = MediaPolicy(allowed_domains=(PUBLIC_IP,), max_bytes=1_000_000, timeout_s=8, transport=RouteToLoopback())
    start = time.monotonic()
    with pytest.raises(MediaTooLargeError, match="over the limit of 1000000 bytes"):
        fetch(server.url("/a.wav", host=PUBLIC_IP), policy)
    assert time.monotonic() - start < 3


def test_body_exactly_at_the_cap_is_accepted(fetch, serve):
    server = serve({"/a.wav": send(AUDIO, content_length=False)})
    policy = MediaPolicy(allowed_domains=(PUBLIC_IP,), max_bytes=len(AUDIO), transport=RouteToLoopback())
    assert fetch(server.url("/a.wav", host=PUBLIC_IP), policy) == AUDIO


@pytest.mark.parametrize("status", [404, 403, 500])
def test_upstream_error_status_is_reported(fetch, serve, status):
    server = serve({"/a.wav": send(b"nope", status=status)})
    policy = MediaPolicy(allowed_domains=(PUBLIC_IP,), transport=RouteToLoopback())
    with pytest.raises(MediaFetchError, match=f"HTTP {status}") as error:
        fetch(server.url("/a.wav", host=PUBLIC_IP), policy)
    assert error.value.status_code == status


def test_unreachable_host_is_a_fetch_error(fetch, serve):
    server = serve({})
    port = server.port
    server.close()  # nothing listens there any more
    policy = MediaPolicy(allowed_domains=("localhost",), allow_private_addresses=True)
    with pytest.raises(MediaFetchError, match="connection") as error:
        fetch(f"http://localhost:{port}/a.wav", policy)
    assert error.value.status_code is None


@pytest.mark.parametrize("url", ["gopher://x/a.wav", "ftp://x/a.wav", "a.wav", "/tmp/a.wav", "javascript:alert(1)"])
def test_other_schemes_are_refused(fetch, url):
    with pytest.raises(MediaNotAllowedError, match="http://, https://, data: or file:"):
        fetch(url, MediaPolicy(allowed_domains=("*",)))


def test_malformed_http_url_is_a_media_error(fetch):
    with pytest.raises(MediaError):
        fetch("http://exa mple.com:99999/a.wav", MediaPolicy(allowed_domains=("*",)))


def self_signed(tmp_path, name: str) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """A server context with a certificate for DNS name `name` only, and a client context trusting it."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make a certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-days", "1", "-subj", f"/CN={name}", "-addext", f"subjectAltName=DNS:{name}",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True, timeout=30)
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(cert, key)
    return server, ssl.create_default_context(cafile=str(cert))


def test_https_connects_to_the_checked_address_and_verifies_the_name(fetch, serve, tmp_path):
    server_tls, client_tls = self_signed(tmp_path, "localhost")  # no IP in the certificate
    server = serve({"/a.wav": send(AUDIO)}, tls=server_tls)
    route = RouteToLoopback(verify=client_tls)
    policy = MediaPolicy(allowed_domains=("localhost",), allow_private_addresses=True, transport=route)
    assert fetch(f"https://localhost:{server.port}/a.wav", policy) == AUDIO
    assert route.sent_to == ["127.0.0.1"]


def test_https_certificate_for_another_name_is_refused(fetch, serve, tmp_path):
    server_tls, client_tls = self_signed(tmp_path, "other.example")
    server = serve({"/a.wav": send(AUDIO)}, tls=server_tls)
    policy = MediaPolicy(allowed_domains=("localhost",), allow_private_addresses=True,
                         transport=RouteToLoopback(verify=client_tls))
    with pytest.raises(MediaFetchError, match="connection"):
        fetch(f"https://localhost:{server.port}/a.wav", policy)
    assert server.requests == []
