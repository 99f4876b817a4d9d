"""What every example backend service shares: accepting a call, and serving the app."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from aiohttp import WSMsgType, web

from voxrelay.engine.processes import HEAP_TRIM_INTERVAL, trim_heap_every
from voxrelay.proto.backend_wire import (
    MAX_MESSAGE_BYTES,
    SUBPROTOCOL,
    BackendProtocolError,
    CloseCode,
    SessionStarted,
    parse_transceiver_event,
)

__all__ = ["accept_call", "serve_app"]

CallHandler = Callable[[web.Request], Awaitable[web.WebSocketResponse]]


async def accept_call(
    request: web.Request, *, codecs: tuple[str, ...] = ("opus", "pcm16")
) -> tuple[web.WebSocketResponse, SessionStarted | None]:
    """Accept the WebSocket and read ``session.started`` (always the first message).

    Returns the socket and the event, or the (closed) socket and None when the first
    message is not a valid ``session.started`` in one of ``codecs`` (close code 1002).
    """
    ws = web.WebSocketResponse(protocols=(SUBPROTOCOL,), max_msg_size=MAX_MESSAGE_BYTES)
    await ws.prepare(request)
    first = await ws.receive()
    try:
        started = parse_transceiver_event(first.data) if first.type is WSMsgType.TEXT else None
    except BackendProtocolError as error:
        await ws.close(code=error.close_code)
        return ws, None
    if not isinstance(started, SessionStarted) or started.codec not in codecs:
        await ws.close(code=CloseCode.PROTOCOL_ERROR)
        return ws, None
    return ws, started


async def serve_app(
    handler: CallHandler,
    host: str,
    port: int,
    *,
    name: str,
    ready: asyncio.Event | None = None,
) -> None:
    """Serve ``handler`` at ``/`` and ``/call`` until cancelled."""
    app = web.Application()
    app.router.add_get("/", handler)
    app.router.add_get("/call", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    logging.getLogger(f"voxrelay.backends.{name}").info(
        f"{name} backend listening", extra={"url": f"ws://{host}:{port}/call"}
    )
    if ready is not None:
        ready.set()
    # Calls come and go in bursts; give their freed memory back, as a transceiver does.
    trimmer = asyncio.create_task(trim_heap_every(HEAP_TRIM_INTERVAL))
    try:
        await asyncio.Event().wait()
    finally:
        trimmer.cancel()
        await runner.cleanup()
