"""The browser harness works against a WebRTC peer nobody here wrote: aiortc.

A tiny aiohttp WHIP endpoint answers with aiortc and echoes the browser's audio back. If
Chromium connects and counts inbound audio packets from it, a failing browser test against
voxrelay points at voxrelay, not at the harness.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import threading
from collections.abc import Iterator
from typing import Any

import aioice.ice
import aiortc
import pytest
from aiohttp import web
from aiortc.contrib.media import MediaRelay
from browser import (
    browser_whip_call,
    browser_whip_call_async,
    chromium_available,
    playwright_available,
)

if chromium_available() is None:
    pytest.skip("no Chromium binary (apt-get install chromium)", allow_module_level=True)
if not playwright_available():
    pytest.skip(
        "Playwright's Python package is missing (pip install playwright)", allow_module_level=True
    )

CALL_SECONDS = 3.0
BEARER = "harness-token"
CORS_HEADERS = {
    "Access-Control-Allow-Origin": "*",
    "Access-Control-Allow-Methods": "POST, DELETE, OPTIONS",
    "Access-Control-Allow-Headers": "Content-Type, Authorization",
    "Access-Control-Expose-Headers": "Location",
}


class EchoWhipServer:
    """WHIP over aiohttp on 127.0.0.1; each session is an aiortc peer echoing its audio."""

    def __init__(self) -> None:
        self.sessions: dict[str, aiortc.RTCPeerConnection] = {}
        self.deleted: list[str] = []
        self.authorizations: list[str | None] = []
        self._relay = MediaRelay()
        self._session_ids = itertools.count(1)
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def start(self) -> None:
        app = web.Application(middlewares=[self._cors])
        app.router.add_route("OPTIONS", "/{tail:.*}", self._preflight)
        app.router.add_post("/whip", self._offer)
        app.router.add_delete("/whip/{session}", self._delete)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}/whip"

    async def close(self) -> None:
        for pc in self.sessions.values():
            await pc.close()
        if self._runner is not None:
            await self._runner.cleanup()

    @web.middleware
    async def _cors(self, request: web.Request, handler: Any) -> web.StreamResponse:
        response = await handler(request)
        response.headers.update(CORS_HEADERS)
        return response

    async def _preflight(self, request: web.Request) -> web.Response:
        return web.Response(status=204)

    async def _offer(self, request: web.Request) -> web.Response:
        self.authorizations.append(request.headers.get("Authorization"))
        if request.headers.get("Authorization") != f"Bearer {BEARER}":
            return web.Response(status=401, text="bad token")
        offer = aiortc.RTCSessionDescription(sdp=await request.text(), type="offer")
        pc = aiortc.RTCPeerConnection()
        session = str(next(self._session_ids))
        self.sessions[session] = pc

        @pc.on("track")
        def echo(track: Any) -> None:
            pc.addTrack(self._relay.subscribe(track))

        await pc.setRemoteDescription(offer)
        await pc.setLocalDescription(await pc.createAnswer())
        return web.Response(
            status=201,
            body=pc.localDescription.sdp,
            content_type="application/sdp",
            headers={"Location": f"/whip/{session}"},
        )

    async def _delete(self, request: web.Request) -> web.Response:
        session = request.match_info["session"]
        pc = self.sessions.pop(session, None)
        if pc is None:
            return web.Response(status=404)
        self.deleted.append(session)
        await pc.close()
        return web.Response(status=200)


@contextlib.contextmanager
def echo_server_in_thread() -> Iterator[EchoWhipServer]:
    """The echo server on its own event loop, for the blocking ``browser_whip_call``."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    server = EchoWhipServer()
    asyncio.run_coroutine_threadsafe(server.start(), loop).result(timeout=10)
    try:
        yield server
    finally:
        asyncio.run_coroutine_threadsafe(server.close(), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()


async def _call_echo_server() -> tuple[dict[str, Any], EchoWhipServer]:
    server = EchoWhipServer()
    await server.start()
    try:
        result = await browser_whip_call_async(server.url, bearer=BEARER, seconds=CALL_SECONDS)
    finally:
        await server.close()
    return result, server


@pytest.fixture
def aiortc_on_loopback(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make aiortc gather 127.0.0.1 only: it skips loopback by design and has no setting.

    Its sockets stay real; this only picks the interface, so no ICE check in the test
    targets the machine's LAN address.
    """

    def loopback_only(use_ipv4: bool, use_ipv6: bool) -> list[str]:
        return ["127.0.0.1"] if use_ipv4 else []

    monkeypatch.setattr(aioice.ice, "get_host_addresses", loopback_only)


def test_chromium_connects_to_aiortc_and_receives_echoed_audio(aiortc_on_loopback: None) -> None:
    result, server = asyncio.run(_call_echo_server())
    context = {key: result[key] for key in ("error", "status", "states", "console")}

    assert result["error"] is None, context
    assert result["status"] == 201
    assert result["location"] == "/whip/1"
    assert server.authorizations == [f"Bearer {BEARER}"]
    assert "connected" in [state["connectionState"] for state in result["states"]], context
    inbound = [row["inbound_packets"] for row in result["samples"] if row["inbound_packets"]]
    assert len(inbound) >= 2 and inbound[-1] > inbound[0], result["samples"]
    assert result["delete_status"] == 200
    assert server.deleted == ["1"]


def test_refused_offer_is_reported_not_raised(aiortc_on_loopback: None) -> None:
    with echo_server_in_thread() as server:
        result = browser_whip_call(server.url, bearer="wrong-token", seconds=0.5)

    assert result["status"] == 401
    assert result["error"] == "Error: WHIP POST answered 401: bad token"
    assert result["location"] is None
    assert result["samples"] == []
    assert server.authorizations == ["Bearer wrong-token"]
    assert server.sessions == {}
