"""An out-of-process echo backend: every caller frame goes straight back.

The in-process :class:`voxrelay.engine.backends.EchoBackend` is the default of
``voxrelay up``; this one does the same over the backend protocol, so the whole path
(WebSocket, frames, playout) can be exercised and measured with a trivial backend.
"""

from __future__ import annotations

import asyncio
import logging

from aiohttp import WSMsgType, web

from voxrelay.proto.backend_wire import (
    SUBPROTOCOL,
    AudioFrame,
    BackendProtocolError,
    SessionStarted,
    decode_audio_frame,
    encode_audio_frame,
    parse_transceiver_event,
)

log = logging.getLogger("voxrelay.backends.echo")

__all__ = ["echo_app", "serve"]


async def _call(request: web.Request) -> web.WebSocketResponse:
    ws = web.WebSocketResponse(protocols=(SUBPROTOCOL,), max_msg_size=65_536)
    await ws.prepare(request)
    first = await ws.receive()
    if first.type is not WSMsgType.TEXT:
        await ws.close(code=1002)
        return ws
    try:
        started = parse_transceiver_event(first.data)
    except BackendProtocolError as error:
        await ws.close(code=error.close_code)
        return ws
    if not isinstance(started, SessionStarted):
        await ws.close(code=1002)
        return ws
    codec, rate = started.codec, started.sample_rate
    sent = 0
    async for message in ws:
        if message.type is WSMsgType.BINARY:
            try:
                frame = decode_audio_frame(message.data, codec=codec, sample_rate=rate)
            except BackendProtocolError:
                continue
            await ws.send_bytes(
                encode_audio_frame(AudioFrame(codec, sent * rate // 50, frame.payload), rate)
            )
            sent += 1
        elif message.type is WSMsgType.TEXT and '"session.ended"' in message.data:
            break
    return ws


def echo_app() -> web.Application:
    app = web.Application()
    app.router.add_get("/", _call)
    app.router.add_get("/call", _call)
    return app


async def serve(host: str, port: int, ready: asyncio.Event | None = None) -> None:
    """Serve until cancelled."""
    runner = web.AppRunner(echo_app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    log.info("echo backend listening", extra={"url": f"ws://{host}:{port}/call"})
    if ready is not None:
        ready.set()
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()
