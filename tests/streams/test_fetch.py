"""Image fetching against a real loopback HTTP server: limits, timeouts, redirects, addresses."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web

from streams.fetch import FetchProblem, ImageFetcher
from streams.settings import FetchSettings

HITS = web.AppKey("hits", dict)
JPEG = b"\xff\xd8\xff\xe0" + b"0" * 2000


async def _app() -> web.Application:
    hits: dict[str, int] = {}

    async def image(request: web.Request) -> web.Response:
        hits[request.path] = hits.get(request.path, 0) + 1
        return web.Response(body=JPEG, content_type="image/jpeg")

    async def big(_request: web.Request) -> web.Response:
        return web.Response(body=b"x" * 50_000, content_type="image/jpeg")

    async def big_chunked(_request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        response.enable_chunked_encoding()
        await response.prepare(_request)
        for _ in range(50):
            await response.write(b"x" * 1000)
        return response

    async def trickle(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        response.content_length = 100
        await response.prepare(request)
        for _ in range(100):
            await response.write(b"x")
            await asyncio.sleep(0.1)
        return response

    async def redirect_private(_request: web.Request) -> web.Response:
        raise web.HTTPFound("http://10.1.2.3/secret.jpg")

    async def redirect_file(_request: web.Request) -> web.Response:
        raise web.HTTPFound("file:///etc/passwd")

    async def redirect_ok(_request: web.Request) -> web.Response:
        raise web.HTTPFound("/image.jpg")

    async def loop(_request: web.Request) -> web.Response:
        raise web.HTTPFound("/loop")

    async def error(_request: web.Request) -> web.Response:
        return web.Response(status=503)

    app = web.Application()
    app[HITS] = hits
    app.router.add_get("/image.jpg", image)
    app.router.add_get("/listing.jpg", image)
    app.router.add_get("/big.jpg", big)
    app.router.add_get("/big-chunked.jpg", big_chunked)
    app.router.add_get("/trickle.jpg", trickle)
    app.router.add_get("/redirect-private.jpg", redirect_private)
    app.router.add_get("/redirect-file.jpg", redirect_file)
    app.router.add_get("/redirect-ok.jpg", redirect_ok)
    app.router.add_get("/loop", loop)
    app.router.add_get("/error.jpg", error)
    return app


@pytest.fixture
async def server() -> AsyncIterator[tuple[str, web.Application]]:
    app = await _app()
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield f"http://127.0.0.1:{port}", app
    await runner.cleanup()


def fetcher(**overrides: object) -> ImageFetcher:
    base = {"allow_private": True, "max_bytes": 10_000, "read_timeout_s": 2.0, "connect_timeout_s": 1.0}
    return ImageFetcher(FetchSettings(**{**base, **overrides}))


async def problem(f: ImageFetcher, url: str | None, data: str | None = None) -> FetchProblem:
    with pytest.raises(FetchProblem) as caught:
        await f.fetch("EV-1", url, data)
    await f.close()
    return caught.value


async def test_fetches_and_caches_reference_images(server: tuple[str, web.Application]) -> None:
    base, app = server
    f = fetcher()
    wanted = [("LS-1", f"{base}/listing.jpg", None, True)] * 3 + [("EV-1", f"{base}/image.jpg", None, False)]
    got = await f.fetch_all(wanted)
    await f.close()
    assert all(not isinstance(g, FetchProblem) and g.data == JPEG for g in got)
    assert app[HITS]["/image.jpg"] == 1
    assert app[HITS]["/listing.jpg"] <= 3  # concurrent first fetches may race; later ones hit the cache
    f2 = fetcher()
    await f2.fetch("LS-1", f"{base}/listing.jpg", None, cacheable=True)
    before = app[HITS]["/listing.jpg"]
    again = await f2.fetch("LS-1", f"{base}/listing.jpg", None, cacheable=True)
    await f2.close()
    assert again.cached and app[HITS]["/listing.jpg"] == before


async def test_not_found_error_and_connection_refused(server: tuple[str, web.Application]) -> None:
    base, _ = server
    assert (await problem(fetcher(), f"{base}/nope.jpg")).code == "IMAGE_NOT_FOUND"
    assert (await problem(fetcher(), f"{base}/error.jpg")).code == "IMAGE_HTTP_ERROR"
    assert (await problem(fetcher(), "http://127.0.0.1:1/x.jpg")).code == "IMAGE_FETCH_FAILED"


async def test_byte_limit_with_and_without_content_length(server: tuple[str, web.Application]) -> None:
    base, _ = server
    assert (await problem(fetcher(), f"{base}/big.jpg")).code == "IMAGE_TOO_BIG"
    assert (await problem(fetcher(), f"{base}/big-chunked.jpg")).code == "IMAGE_TOO_BIG"


async def test_a_server_that_trickles_bytes_times_out(server: tuple[str, web.Application]) -> None:
    base, _ = server
    found = await problem(fetcher(read_timeout_s=1.0), f"{base}/trickle.jpg")
    assert found.code == "IMAGE_FETCH_TIMEOUT"


async def test_private_addresses_are_refused_unless_allowed(server: tuple[str, web.Application]) -> None:
    base, _ = server
    strict = fetcher(allow_private=False)
    assert (await problem(strict, f"{base}/image.jpg")).code == "IMAGE_URL_FORBIDDEN"
    assert (await problem(fetcher(allow_private=False), "http://localhost:9/x.jpg")).code == "IMAGE_URL_FORBIDDEN"


async def test_redirects_are_followed_but_rechecked(server: tuple[str, web.Application]) -> None:
    base, _ = server
    f = fetcher()
    assert (await f.fetch("EV-1", f"{base}/redirect-ok.jpg", None)).data == JPEG
    await f.close()
    assert (await problem(fetcher(), f"{base}/redirect-file.jpg")).code == "IMAGE_URL_FORBIDDEN"
    assert (await problem(fetcher(), f"{base}/loop")).code == "IMAGE_FETCH_FAILED"
    # Loopback is allowed in this fetcher, a private 10.x address is not reachable either way:
    strict = fetcher(allow_private=False)
    assert (await problem(strict, f"{base}/redirect-private.jpg")).code == "IMAGE_URL_FORBIDDEN"


async def test_schemes_inline_data_and_files(tmp_path: Path) -> None:
    encoded = base64.b64encode(JPEG).decode()
    f = fetcher()
    assert (await f.fetch("EV-1", None, encoded)).data == JPEG
    assert (await problem(fetcher(), None, "not base64!!")).code == "IMAGE_DATA_INVALID"
    assert (await problem(fetcher(), "ftp://example.com/x.jpg")).code == "IMAGE_URL_FORBIDDEN"
    assert (await problem(fetcher(), f"file://{tmp_path}/x.jpg")).code == "IMAGE_URL_FORBIDDEN"
    (tmp_path / "x.jpg").write_bytes(JPEG)
    files = fetcher(schemes=frozenset({"file"}), file_root=tmp_path)
    assert (await files.fetch("EV-1", f"file://{tmp_path}/x.jpg", None)).data == JPEG
    assert (await problem(files, "file:///etc/passwd")).code == "IMAGE_URL_FORBIDDEN"
    assert (await problem(fetcher(schemes=frozenset({"file"}), file_root=tmp_path),
                          f"file://{tmp_path}/missing.jpg")).code == "IMAGE_NOT_FOUND"
