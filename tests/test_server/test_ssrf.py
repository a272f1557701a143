"""Server-side request forgery guard of image URL fetching: no spelling of a non-public address is ever connected to.

A local listener on 127.0.0.1 (and 127.0.0.2 and ::1 where it can bind, on the same port) serves a valid PNG and
counts the requests reaching each of its addresses, so a fetch that slipped through would be seen. Each spelling of
loopback (Unicode digits and full stops that IDNA maps to ASCII, IPv4 literals in every ``inet_aton`` notation,
IPv6 forms embedding loopback) and of the metadata address 169.254.169.254 must be refused, with a 4xx, on the
native and the OpenAI route, before any connection. For redirects the test makes 127.0.0.2 count as public: the
first hop is served, and its redirect to loopback is refused by the per-hop check and, with that check switched
off, by the connector's socket factory. Oracles: the listener's hit counts, the documented 4xx statuses.
"""

from __future__ import annotations

import errno
import io
import re
import socket
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import quote

import aiohttp
import pytest
from aiohttp import web
from PIL import Image

from rtp_mm import LLM, ModelConfig
from rtp_mm.errors import InvalidRequest
from rtp_mm.server import url_guard
from rtp_mm.server.app import create_app
from rtp_mm.server.errors import describe_error
from rtp_mm.server.images import ImageIntake, ImageLimits, make_fetch_connector
from rtp_mm_testing.oracle import tiny_bpe_tokenizer, tiny_llama
from rtp_mm_testing.serving import server_settings

PUBLIC_FOR_TEST = "127.0.0.2"  # counted as public where a test needs a "public" first hop
# Host spellings that all mean loopback (the listener) once normalised; yarl maps the Unicode ones (IDNA/UTS #46).
LOOPBACK_SPELLINGS = {
    "fullwidth-digits": "１２７.０.０.１",
    "circled-digits": "①②⑦.⓪.⓪.①",
    "ideographic-full-stop": "127。0。0。1",
    "fullwidth-full-stop": "127．0．0．1",
    "halfwidth-ideographic-full-stop": "127｡0｡0｡1",
    "decimal-integer": "2130706433",
    "octal": "0177.0.0.1",
    "hex": "0x7f.0.0.1",
    "hex-integer": "0x7f000001",
    "short-form": "127.1",
    "trailing-dot": "127.0.0.1.",
    "plain": "127.0.0.1",
    "ipv6-loopback": "[::1]",
    "ipv6-loopback-long": "[0:0:0:0:0:0:0:1]",
    "ipv4-mapped-ipv6": "[::ffff:127.0.0.1]",
    "ipv4-mapped-ipv6-hex": "[::ffff:7f00:1]",
    "ipv4-compatible-ipv6": "[::127.0.0.1]",
    "nat64": "[64:ff9b::7f00:1]",
    "6to4": "[2002:7f00:1::]",
    "localhost-fullwidth": "ｌｏｃａｌｈｏｓｔ",
}
METADATA_SPELLINGS = {"metadata-circled-digits": "①⑥⑨.②⑤④.①⑥⑨.②⑤④", "metadata-hex": "0xa9fea9fe"}
SPELLINGS = {**LOOPBACK_SPELLINGS, **METADATA_SPELLINGS}
ROUTE_SPELLINGS = ["fullwidth-digits", "circled-digits", "ideographic-full-stop", "fullwidth-full-stop"]
ROUTE_SPELLINGS += ["halfwidth-ideographic-full-stop", "decimal-integer", "octal", "hex", "short-form"]
ROUTE_SPELLINGS += ["ipv6-loopback", "ipv4-mapped-ipv6", "metadata-circled-digits"]
_LEAK = re.compile(r"0x[0-9a-f]{6,}|object at|<\w[^>]*>|\bURL\(")


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 200, 30)).save(buf, format="PNG")
    return buf.getvalue()


class Listener:
    """A PNG server on one port of several loopback addresses, counting requests per local address."""

    def __init__(self) -> None:
        self.hits: dict[str, int] = {}
        self.port = 0
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        png = _png()

        async def image(request: web.Request) -> web.Response:
            return web.Response(body=png, content_type="image/png")

        async def redirect(request: web.Request) -> web.Response:
            # Not HTTPFound: it would re-encode the target through yarl; the client must see the raw spelling.
            return web.Response(status=302, headers={"Location": request.query["to"]})

        @web.middleware
        async def count(request: web.Request, handler):
            address = request.transport.get_extra_info("sockname")[0]
            self.hits[address] = self.hits.get(address, 0) + 1
            return await handler(request)

        app = web.Application(middlewares=[count])
        app.router.add_get("/img.png", image)
        app.router.add_get("/redirect", redirect)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        first = web.TCPSite(self._runner, "127.0.0.1", 0)
        await first.start()
        self.port = first._server.sockets[0].getsockname()[1]
        for host in (PUBLIC_FOR_TEST, "::1"):
            try:
                await web.TCPSite(self._runner, host, self.port).start()
            except OSError:  # no IPv6 here: IPv6 spellings are still refused, just without a target
                pass

    async def close(self) -> None:
        assert self._runner is not None
        await self._runner.cleanup()

    @property
    def total(self) -> int:
        return sum(self.hits.values())

    def url(self, host: str, path: str = "/img.png") -> str:
        return f"http://{host}:{self.port}{path}"


@pytest.fixture
async def listener():
    server = Listener()
    await server.start()
    yield server
    await server.close()


@pytest.fixture
def public_test_address(monkeypatch):
    """127.0.0.2 counts as public for every layer (per-hop check, resolver, socket factory)."""
    real = url_guard.is_public_address
    monkeypatch.setattr(url_guard, "is_public_address", lambda a: str(a) == PUBLIC_FOR_TEST or real(a))


def _limits(*hosts: str) -> ImageLimits:
    return ImageLimits(2, 2**20, 64 * 64, hosts, "", 5.0)


@pytest.fixture
async def intake():
    """An intake allowing any host, with the server's fetch connector."""
    with ThreadPoolExecutor(1) as pool:
        async with aiohttp.ClientSession(connector=make_fetch_connector()) as session:
            yield ImageIntake(_limits("*"), pool, session)


async def _refused(intake: ImageIntake, url: str) -> tuple[int, str]:
    with pytest.raises(InvalidRequest) as info:
        await intake.load([url], {})
    status, body = describe_error(info.value)
    assert 400 <= status < 500, body
    assert not _LEAK.search(body["message"]), body
    return status, body["message"]


@pytest.mark.parametrize("case", list(SPELLINGS))
async def test_every_spelling_is_refused_before_connecting(intake, listener, case):
    status, message = await _refused(intake, listener.url(SPELLINGS[case]))
    assert "non-public" in message, message  # the guard fired, not a failed connect
    assert listener.total == 0


@pytest.mark.parametrize("host", ["127%2e0%2e0%2e1", "1.2.3.09", "256.0.0.1", "foo.123", "[fe80::1%25lo]", "a..b"])
async def test_malformed_hosts_are_refused(intake, listener, host):
    status, message = await _refused(intake, listener.url(host))
    assert status in (400, 422), message
    assert listener.total == 0


async def test_the_listener_serves_a_public_host(intake, listener, public_test_address):
    # The control: a host counted as public is fetched, so the refusals above are the guard's doing.
    (image,) = await intake.load([listener.url(PUBLIC_FOR_TEST)], {})
    assert image.size == (8, 8) and listener.hits == {PUBLIC_FOR_TEST: 1}


@pytest.mark.parametrize("target", ["127.0.0.1", "①②⑦.⓪.⓪.①", "2130706433", "[::1]", "localhost"])
async def test_redirect_to_loopback_is_refused_per_hop(intake, listener, public_test_address, target):
    url = listener.url(PUBLIC_FOR_TEST, "/redirect?to=" + quote(listener.url(target), safe=""))
    status, message = await _refused(intake, url)
    assert status == 422 and "non-public" in message, message
    assert listener.hits == {PUBLIC_FOR_TEST: 1}  # the redirect was served, its target never reached


@pytest.mark.parametrize("target", ["127.0.0.1", "①②⑦.⓪.⓪.①", "0x7f.1", "[::1]", "localhost"])
async def test_socket_layer_refuses_without_the_host_check(intake, listener, public_test_address, monkeypatch, target):
    # Defence in depth: with the per-hop check gone, the resolver (names) and the socket factory (every address,
    # IP literals included: aiohttp resolves no literal) still refuse loopback, on the first hop and after a redirect.
    monkeypatch.setattr(url_guard, "check_public_host", lambda host: None)
    for url in (listener.url(target), listener.url(PUBLIC_FOR_TEST, "/redirect?to=" + quote(listener.url(target)))):
        status, message = await _refused(intake, url)
        assert status == 422 and "non-public" in message, message
    assert listener.hits == {PUBLIC_FOR_TEST: 1}


@pytest.mark.parametrize(
    "address,public",
    [
        ("127.0.0.1", False),
        ("169.254.169.254", False),
        ("0.0.0.0", False),
        ("::", False),
        ("::1", False),
        ("::ffff:127.0.0.1", False),
        ("::ffff:0:7f00:1", False),
        ("::127.0.0.1", False),
        ("::8.8.8.8", False),
        ("64:ff9b::a9fe:a9fe", False),
        ("64:ff9b:1::808:808", False),
        ("2002:c0a8:1::", False),
        ("fe80::1%eth0", False),
        ("not an address", False),
        ("8.8.8.8", True),
        ("::ffff:8.8.8.8", True),
        ("64:ff9b::808:808", True),
        ("2002:808:808::1", True),
        ("2001:4860:4860::8888", True),
    ],
)
def test_public_address_predicate(address, public):
    assert url_guard.is_public_address(address) is public


@pytest.mark.parametrize(
    "addr_info",
    [
        (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", 80)),
        (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("169.254.169.254", 80)),
        (socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("::1", 80, 0, 0)),
        (socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("::ffff:10.0.0.1", 80, 0, 0)),
        (socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("2001:4860:4860::8888", 80, 0, 2)),  # scoped
    ],
)
def test_socket_factory_refuses_non_public_addresses(addr_info):
    with pytest.raises(url_guard.NonPublicAddressError) as info:
        url_guard.public_socket(addr_info)
    assert isinstance(info.value, OSError) and info.value.errno == errno.EACCES


def test_socket_factory_opens_public_addresses():
    url_guard.public_socket((socket.AF_INET, socket.SOCK_STREAM, 6, "", ("8.8.8.8", 80))).close()


def test_allow_list_compares_normalised_hosts():
    intake = ImageIntake(_limits("images.example.org", "8.8.8.8", "bücher.example"), executor=None, session=None)
    assert intake._check_host(0, "https://ｉｍａｇｅｓ.example.org/a.png").raw_host == "images.example.org"
    intake._check_host(0, "http://134744072/a.png")  # 8.8.8.8 in decimal
    intake._check_host(0, "http://xn--bcher-kva.example/a.png")
    with pytest.raises(InvalidRequest, match="not in IMAGE_URL_HOSTS"):
        intake._check_host(0, "http://images.example.org.evil.net/a.png")


# Route level: the real server (a text-only tiny model, which answers 400 "text-only" only after loading images).


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_llama_ssrf")
    tiny_llama(path, seed=4)
    tiny_bpe_tokenizer(path, ["Hi there", "Hello world"], chat_template="{{ messages[0]['content'] }}")
    llm = LLM(ModelConfig(model_type="llama", ckpt_path=path, max_seq_len=128), kv_cache_mem_mb=8)
    yield llm
    llm.shutdown()


async def _post(client, route: str, url: str) -> tuple[int, str]:
    if route == "/":
        body = {"prompt": "Hi", "images": [url], "max_new_tokens": 1}
    else:
        parts = [{"type": "text", "text": "Hi"}, {"type": "image_url", "image_url": {"url": url}}]
        body = {"model": "m", "messages": [{"role": "user", "content": parts}], "max_tokens": 1}
    resp = await client.post(route, json=body)
    data = await resp.json()
    message = data["error"]["message"] if route != "/" else data["message"]
    assert not _LEAK.search(message), data
    return resp.status, message


ROUTES = ["/", "/v1/chat/completions"]


@pytest.fixture
async def client(aiohttp_client, llm):
    return await aiohttp_client(create_app(llm.client, server_settings(llm, image_url_hosts=("*",))))


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("case", ROUTE_SPELLINGS)
async def test_routes_refuse_every_spelling(client, listener, route, case):
    status, message = await _post(client, route, listener.url(SPELLINGS[case]))
    assert status == 422 and "non-public" in message, message
    assert listener.total == 0


@pytest.mark.parametrize("route", ROUTES)
async def test_routes_refuse_redirect_to_loopback(client, listener, public_test_address, route):
    # The control first: the "public" host is fetched (then the text-only model declines the image).
    status, message = await _post(client, route, listener.url(PUBLIC_FOR_TEST))
    assert status == 400 and "text-only" in message, message
    for target in ("127.0.0.1", "①②⑦.⓪.⓪.①"):
        url = listener.url(PUBLIC_FOR_TEST, "/redirect?to=" + quote(listener.url(target), safe=""))
        status, message = await _post(client, route, url)
        assert status == 422 and "non-public" in message, message
    assert listener.hits == {PUBLIC_FOR_TEST: 3}


@pytest.mark.parametrize("route", ROUTES)
async def test_routes_refuse_every_url_without_allow_list(aiohttp_client, llm, listener, public_test_address, route):
    client = await aiohttp_client(create_app(llm.client, server_settings(llm)))
    for host in ["example.com", PUBLIC_FOR_TEST, *(SPELLINGS[c] for c in ROUTE_SPELLINGS)]:
        status, message = await _post(client, route, listener.url(host))
        assert status == 400 and "IMAGE_URL_HOSTS" in message, message
    assert listener.total == 0


async def test_server_session_refuses_at_the_socket(client, listener, monkeypatch):
    # The app's fetch session is built by make_fetch_connector: with the per-hop check gone, an IP literal (which
    # aiohttp never passes to the resolver) is still refused when connecting.
    monkeypatch.setattr(url_guard, "check_public_host", lambda host: None)
    for route in ROUTES:
        status, message = await _post(client, route, listener.url("127.0.0.1"))
        assert status == 422 and "non-public" in message, message
    assert listener.total == 0
