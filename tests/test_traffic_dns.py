"""The client's DNS cache, the load balancer's DNS view and one client request against real servers."""

from __future__ import annotations

import asyncio
import socket

from aiohttp import web

from lb.dnsview import DnsView
from scenarios.traffic import DnsCache, http_get


def test_dns_cache_keeps_an_answer_for_its_ttl() -> None:
    answers = [("n1", "n2"), ("n1",)]
    calls: list[int] = []

    def resolve() -> tuple[str, ...]:
        calls.append(1)
        return answers[min(len(calls) - 1, 1)]

    cache = DnsCache(resolve, ttl_s=60)
    assert cache.lookup(0) == ("n1", "n2")
    assert cache.lookup(59.9) == ("n1", "n2")  # failover has happened, but this client still has the old answer
    assert cache.lookup(60) == ("n1",)
    assert len(calls) == 2


def test_dns_view_publishes_changes_and_never_empties() -> None:
    view = DnsView({"a": "127.0.0.1:1", "b": "127.0.0.1:2"})
    seen: list[tuple[str, ...]] = []
    view.subscribe(seen.append)
    assert view.update({"a": True, "b": False}) == (["b"], [])
    assert view.addresses() == ("127.0.0.1:1",)
    assert view.update({"a": True, "b": False}) == ([], [])  # no change, no notification
    # No zone published: the name still answers with every node (AWS: all zones failing -> all in).
    assert view.update({"a": False, "b": False}) == ([], ["b"])
    assert view.addresses() == ("127.0.0.1:1", "127.0.0.1:2")
    assert seen == [("127.0.0.1:1", "127.0.0.1:2"), ("127.0.0.1:1",), ("127.0.0.1:1", "127.0.0.1:2")]


async def test_http_get_classifies_answers_and_failures() -> None:
    async def ok(_: web.Request) -> web.Response:
        return web.Response(body=b"x" * 100_000)

    async def bad(_: web.Request) -> web.Response:
        return web.Response(status=503)

    never = asyncio.Event()

    async def hang(_: web.Request) -> web.Response:
        await never.wait()
        return web.Response()

    app = web.Application()
    app.router.add_get("/ok", ok)
    app.router.add_get("/bad", bad)
    app.router.add_get("/hang", hang)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    # A port that is bound but not listening refuses connections.
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    try:
        assert await http_get("127.0.0.1", port, "/ok", 5) == ""
        assert await http_get("127.0.0.1", port, "/bad", 5) == "status_503"
        assert await http_get("127.0.0.1", port, "/hang", 0.2) == "timeout"
        assert await http_get("127.0.0.1", closed.getsockname()[1], "/ok", 5) == "refused"
    finally:
        closed.close()
        await runner.cleanup()
