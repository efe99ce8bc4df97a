"""Fetching evidence and reference images: bounded in time, bytes, addresses and concurrency.

Every failure is a :class:`FetchProblem` with a stable code; the pipeline holds the
refund with that code. Reference images (listing photos) repeat across requests,
so their bytes are cached.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import ipaddress
import socket
import time
import urllib.parse
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult

from streams.settings import FetchSettings

USER_AGENT = "refundguard/0.1 (+image-evidence-fetch)"


class FetchProblem(Exception):
    """An image that could not be fetched. ``code`` goes into the decision's reason."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Fetched:
    image_id: str
    data: bytes
    source: str  # url, or "inline"
    cached: bool = False


def _is_public(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    if ip.version == 6 and ip.ipv4_mapped:  # type: ignore[union-attr]
        ip = ip.ipv4_mapped  # type: ignore[union-attr]
    return ip.is_global and not ip.is_multicast


class _GuardedResolver(AbstractResolver):
    """Resolves names and refuses non-public addresses at connect time.

    Checking here, not only on the URL, closes DNS rebinding: the address that is
    checked is the address that is connected to.
    """

    def __init__(self, allow_private: bool) -> None:
        self._allow_private = allow_private
        self._loop_resolver = aiohttp.ThreadedResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self._loop_resolver.resolve(host, port, family)
        if self._allow_private:
            return results
        allowed = [r for r in results if _is_public(r["host"])]
        if not allowed:
            raise _ForbiddenAddress(f"host {host} resolves only to private, loopback or reserved addresses")
        return allowed

    async def close(self) -> None:
        await self._loop_resolver.close()


class _ForbiddenAddress(OSError):
    pass


class ImageFetcher:
    """One per worker: a shared HTTP session, a global concurrency cap and a reference cache."""

    def __init__(self, settings: FetchSettings) -> None:
        self.settings = settings
        self._session: aiohttp.ClientSession | None = None
        self._all = asyncio.Semaphore(settings.concurrency_total)
        self._cache: OrderedDict[str, bytes] = OrderedDict()
        self._cache_bytes = 0
        self._cache_limit_bytes = 256 * 1024 * 1024

    async def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(
                resolver=_GuardedResolver(self.settings.allow_private),
                limit=self.settings.concurrency_total,
                ttl_dns_cache=60,
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                headers={"User-Agent": USER_AGENT, "Accept": "image/*"},
                auto_decompress=False,  # a gzip bomb must count compressed bytes, not expand in memory
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def fetch_all(
        self, images: Iterable[tuple[str, str | None, str | None, bool]]
    ) -> list[Fetched | FetchProblem]:
        """Fetch (image_id, url, data, cacheable) tuples, at most ``concurrency_per_request`` at once."""
        limit = asyncio.Semaphore(self.settings.concurrency_per_request)

        async def one(image_id: str, url: str | None, data: str | None, cacheable: bool) -> Fetched | FetchProblem:
            async with limit:
                try:
                    return await self.fetch(image_id, url, data, cacheable=cacheable)
                except FetchProblem as problem:
                    return problem

        return list(await asyncio.gather(*(one(*image) for image in images)))

    async def fetch(self, image_id: str, url: str | None, data: str | None, *, cacheable: bool = False) -> Fetched:
        if data is not None:
            return Fetched(image_id, self._inline(image_id, data), "inline")
        assert url is not None  # the contract requires exactly one of url and data
        if cacheable and url in self._cache:
            self._cache.move_to_end(url)
            return Fetched(image_id, self._cache[url], url, cached=True)
        scheme = urllib.parse.urlsplit(url).scheme.lower()
        if scheme not in self.settings.schemes:
            raise FetchProblem(
                "IMAGE_URL_FORBIDDEN",
                f"image {image_id}: scheme {scheme or '(none)'!r} is not allowed "
                f"(allowed: {', '.join(sorted(self.settings.schemes))})",
            )
        async with self._all:
            if scheme == "file":
                body = await asyncio.to_thread(self._read_file, image_id, url)
            elif scheme == "data":
                body = self._data_url(image_id, url)
            else:
                body = await self._get(image_id, url)
        if cacheable:
            self._remember(url, body)
        return Fetched(image_id, body, url)

    # ------------------------------------------------------------ sources

    def _inline(self, image_id: str, data: str) -> bytes:
        if "data" not in self.settings.schemes:
            raise FetchProblem("IMAGE_URL_FORBIDDEN", f"image {image_id}: inline data is not allowed here")
        try:
            body = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise FetchProblem("IMAGE_DATA_INVALID", f"image {image_id}: inline data is not valid base64") from exc
        return self._check_size(image_id, body)

    def _data_url(self, image_id: str, url: str) -> bytes:
        header, sep, payload = url.partition(",")
        if not sep:
            raise FetchProblem("IMAGE_DATA_INVALID", f"image {image_id}: malformed data: URL")
        if header.endswith(";base64"):
            return self._inline(image_id, payload)
        return self._check_size(image_id, urllib.parse.unquote_to_bytes(payload))

    def _read_file(self, image_id: str, url: str) -> bytes:
        root = self.settings.file_root
        if root is None:
            raise FetchProblem("IMAGE_URL_FORBIDDEN", f"image {image_id}: file URLs need REFUNDGUARD_FETCH_FILE_ROOT")
        path = Path(urllib.parse.unquote(urllib.parse.urlsplit(url).path)).resolve()
        if not path.is_relative_to(root.resolve()):
            raise FetchProblem("IMAGE_URL_FORBIDDEN", f"image {image_id}: file is outside the allowed directory")
        try:
            size = path.stat().st_size
            if size > self.settings.max_bytes:
                raise FetchProblem("IMAGE_TOO_BIG", f"image {image_id}: {size} bytes, over {self.settings.max_bytes}")
            return path.read_bytes()
        except FileNotFoundError as exc:
            raise FetchProblem("IMAGE_NOT_FOUND", f"image {image_id}: file not found") from exc
        except OSError as exc:
            raise FetchProblem("IMAGE_FETCH_FAILED", f"image {image_id}: cannot read file: {exc.strerror}") from exc

    async def _get(self, image_id: str, url: str) -> bytes:
        s = self.settings
        deadline = time.monotonic() + s.read_timeout_s
        session = await self._http()
        current = url
        try:
            for _hop in range(s.max_redirects + 1):
                self._check_literal_host(image_id, current)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError
                timeout = aiohttp.ClientTimeout(total=remaining, connect=s.connect_timeout_s, sock_read=remaining)
                async with session.get(current, allow_redirects=False, timeout=timeout) as response:
                    if response.status in (301, 302, 303, 307, 308):
                        location = response.headers.get("Location")
                        if not location:
                            raise FetchProblem("IMAGE_FETCH_FAILED", f"image {image_id}: redirect without Location")
                        current = urllib.parse.urljoin(current, location)
                        scheme = urllib.parse.urlsplit(current).scheme.lower()
                        if scheme not in ("http", "https") or scheme not in s.schemes:
                            raise FetchProblem(
                                "IMAGE_URL_FORBIDDEN", f"image {image_id}: redirect to a {scheme!r} URL is not allowed"
                            )
                        continue
                    if response.status == 404 or response.status == 410:
                        raise FetchProblem("IMAGE_NOT_FOUND", f"image {image_id}: HTTP {response.status}")
                    if response.status >= 400:
                        raise FetchProblem("IMAGE_HTTP_ERROR", f"image {image_id}: HTTP {response.status}")
                    if response.headers.get("Content-Encoding", "identity") not in ("identity", ""):
                        raise FetchProblem("IMAGE_FETCH_FAILED", f"image {image_id}: compressed transfer refused")
                    length = response.content_length
                    if length is not None and length > s.max_bytes:
                        raise FetchProblem("IMAGE_TOO_BIG", f"image {image_id}: {length} bytes, over {s.max_bytes}")
                    return await self._read_capped(image_id, response, deadline)
            raise FetchProblem("IMAGE_FETCH_FAILED", f"image {image_id}: more than {s.max_redirects} redirects")
        except FetchProblem:
            raise
        except TimeoutError as exc:
            raise FetchProblem("IMAGE_FETCH_TIMEOUT", f"image {image_id}: no complete answer within "
                               f"{s.read_timeout_s:g} s") from exc
        except aiohttp.ClientConnectorError as exc:
            if isinstance(exc.os_error, _ForbiddenAddress):
                raise FetchProblem("IMAGE_URL_FORBIDDEN", f"image {image_id}: {exc.os_error}") from exc
            raise FetchProblem("IMAGE_FETCH_FAILED", f"image {image_id}: cannot connect: {_short(exc)}") from exc
        except _ForbiddenAddress as exc:
            raise FetchProblem("IMAGE_URL_FORBIDDEN", f"image {image_id}: {exc}") from exc
        except (aiohttp.ClientError, ValueError, OSError) as exc:
            raise FetchProblem("IMAGE_FETCH_FAILED", f"image {image_id}: {_short(exc)}") from exc

    def _check_literal_host(self, image_id: str, url: str) -> None:
        """aiohttp connects to an IP literal without asking the resolver, so check those here."""
        if self.settings.allow_private:
            return
        host = urllib.parse.urlsplit(url).hostname or ""
        try:
            public = _is_public(host)
        except ValueError:
            return  # a name: the guarded resolver checks what it resolves to
        if not public:
            raise FetchProblem("IMAGE_URL_FORBIDDEN", f"image {image_id}: address {host} is private, loopback "
                               "or reserved")

    async def _read_capped(self, image_id: str, response: aiohttp.ClientResponse, deadline: float) -> bytes:
        limit = self.settings.max_bytes
        chunks: list[bytes] = []
        total = 0
        async for chunk in response.content.iter_chunked(64 * 1024):
            total += len(chunk)
            if total > limit:
                raise FetchProblem("IMAGE_TOO_BIG", f"image {image_id}: more than {limit} bytes")
            if time.monotonic() > deadline:  # a server that trickles bytes
                raise TimeoutError
            chunks.append(chunk)
        return b"".join(chunks)

    def _check_size(self, image_id: str, body: bytes) -> bytes:
        if len(body) > self.settings.max_bytes:
            raise FetchProblem("IMAGE_TOO_BIG", f"image {image_id}: {len(body)} bytes, over {self.settings.max_bytes}")
        return body

    def _remember(self, url: str, body: bytes) -> None:
        if self.settings.reference_cache_entries == 0:
            return
        self._cache[url] = body
        self._cache_bytes += len(body)
        while self._cache and (
            len(self._cache) > self.settings.reference_cache_entries or self._cache_bytes > self._cache_limit_bytes
        ):
            _, dropped = self._cache.popitem(last=False)
            self._cache_bytes -= len(dropped)


def _short(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text[:200]


def describe(problem: FetchProblem) -> dict[str, Any]:
    return {"code": problem.code, "message": problem.message}
