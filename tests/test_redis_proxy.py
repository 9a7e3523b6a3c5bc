"""The link-fault proxy itself: each mode does what the coordination tests rely on."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis
from redis.exceptions import RedisError

from app.coordination.client import connect
from tests.support.procs import RedisServer
from tests.support.redis_proxy import Proxy


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(1024):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


Conn = tuple[asyncio.StreamReader, asyncio.StreamWriter]
_opened: list[asyncio.StreamWriter] = []


@pytest.fixture
async def proxy() -> AsyncIterator[Proxy]:
    """A proxy in front of an echo server on loopback; the test's connections are closed."""
    server = await asyncio.start_server(_echo, "127.0.0.1", 0)
    proxy = Proxy(server.sockets[0].getsockname()[1])
    await proxy.start()
    yield proxy
    for writer in _opened:
        writer.transport.abort()
    _opened.clear()
    await proxy.close()
    server.close()
    await server.wait_closed()


async def connect_to(proxy: Proxy) -> Conn:
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    _opened.append(writer)
    return reader, writer


async def echo(conn: Conn, data: bytes, within_s: float = 2.0) -> bytes:
    """Send `data` and read as many bytes back; what came before the link closed (b"" for
    nothing), or TimeoutError if the link stayed open and nothing came within `within_s`."""
    reader, writer = conn
    try:
        writer.write(data)
        await writer.drain()
        async with asyncio.timeout(within_s):
            return await reader.readexactly(len(data))
    except asyncio.IncompleteReadError as exc:
        return exc.partial
    except ConnectionError:
        return b""


async def test_pass_forwards_both_ways_and_records_what_the_client_sent(proxy: Proxy) -> None:
    conn = await connect_to(proxy)
    assert await echo(conn, b"SUBSCRIBE x") == b"SUBSCRIBE x"
    assert len(proxy.links_sending(b"SUBSCRIBE")) == 1
    assert proxy.links_sending(b"PING") == []


async def test_cut_closes_open_links_and_refuses_new_ones_until_restored(proxy: Proxy) -> None:
    conn = await connect_to(proxy)
    assert await echo(conn, b"a") == b"a"
    proxy.cut()
    assert await echo(conn, b"b") == b"", "the open link is closed"
    refused_conn = await connect_to(proxy)
    assert await echo(refused_conn, b"c") == b"", "a new link is closed at once"
    assert proxy.refused == 1
    proxy.restore()
    assert await echo(await connect_to(proxy), b"d") == b"d"


async def test_delay_holds_each_chunk_and_keeps_the_order(proxy: Proxy) -> None:
    conn = await connect_to(proxy)
    proxy.delay(0.3)
    started = time.monotonic()
    reader, writer = conn
    for part in (b"1", b"2", b"3"):
        writer.write(part)
        await writer.drain()
    async with asyncio.timeout(3):
        got = await reader.readexactly(3)
    elapsed = time.monotonic() - started
    assert got == b"123"
    assert elapsed >= 0.6 - 0.05, "0.3 s out and 0.3 s back"
    proxy.restore()
    started = time.monotonic()
    assert await echo(conn, b"4") == b"4"
    assert time.monotonic() - started < 0.3


async def test_silencing_one_link_leaves_it_open_and_the_others_working(proxy: Proxy) -> None:
    quiet, loud = await connect_to(proxy), await connect_to(proxy)
    assert await echo(quiet, b"SUBSCRIBE") == b"SUBSCRIBE"
    assert await echo(loud, b"GET") == b"GET"
    [subscriber] = proxy.links_sending(b"SUBSCRIBE")
    proxy.silence(subscriber)
    with pytest.raises(TimeoutError):
        await echo(quiet, b"PING", within_s=0.5)
    assert not quiet[1].is_closing(), "a silent link raises nothing on the client"
    assert await echo(loud, b"still") == b"still"
    proxy.restore()
    with pytest.raises(TimeoutError):
        await echo(quiet, b"PING", within_s=0.3)  # a dropped flow stays dropped


async def test_a_link_can_be_silenced_from_the_chunk_that_carries_a_marker(
    proxy: Proxy,
) -> None:
    conn = await connect_to(proxy)
    assert await echo(conn, b"HELLO") == b"HELLO"
    proxy.silence_when(b"SUBSCRIBE")
    assert await echo(conn, b"GET") == b"GET"
    with pytest.raises(TimeoutError):
        await echo(conn, b"SUBSCRIBE", within_s=0.3)
    other = await connect_to(proxy)
    assert await echo(other, b"PING") == b"PING"
    proxy.restore()
    assert await echo(await connect_to(proxy), b"SUBSCRIBE") == b"SUBSCRIBE"


async def test_a_link_can_be_delayed_from_the_chunk_that_carries_a_marker(
    proxy: Proxy,
) -> None:
    conn = await connect_to(proxy)
    proxy.delay_when(b"EVALSHA", 0.4)
    started = time.monotonic()
    assert await echo(conn, b"GET") == b"GET"
    assert time.monotonic() - started < 0.3
    started = time.monotonic()
    assert await echo(conn, b"EVALSHA") == b"EVALSHA"
    assert await echo(conn, b"GET") == b"GET"
    assert time.monotonic() - started >= 2 * 0.8 - 0.1, "that chunk and the next, both ways"
    proxy.restore()
    started = time.monotonic()
    assert await echo(conn, b"GET") == b"GET"
    assert time.monotonic() - started < 0.3


async def test_silencing_every_link_includes_new_ones(proxy: Proxy) -> None:
    old = await connect_to(proxy)
    proxy.silence()
    new = await connect_to(proxy)
    for conn in (old, new):
        with pytest.raises(TimeoutError):
            await echo(conn, b"x", within_s=0.3)
    proxy.restore()
    assert await echo(await connect_to(proxy), b"y") == b"y"


async def test_a_redis_client_through_the_proxy_sees_each_fault(
    redis_server: RedisServer,
) -> None:
    proxy = Proxy(redis_server.port)
    await proxy.start()
    client: Redis = connect(proxy.url, 0.5)
    try:
        assert await client.ping()
        proxy.cut()
        with pytest.raises(RedisError):
            await client.ping()
        proxy.restore()
        assert await client.ping()
        proxy.silence()
        with pytest.raises((RedisError, TimeoutError)):
            async with asyncio.timeout(2):
                await client.ping()
    finally:
        await client.aclose()
        await proxy.close()
