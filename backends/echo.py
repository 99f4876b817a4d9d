"""An out-of-process echo backend: every caller frame goes straight back.

The in-process :class:`voxrelay.engine.backends.EchoBackend` is the default of
``voxrelay up``; this one does the same over the backend protocol, so the whole path
(WebSocket, frames, playout) can be exercised and measured with a trivial backend.
"""

from __future__ import annotations

import asyncio
import logging

from aiohttp import WSMsgType, web

from voxrelay.backends.service import accept_call, serve_app
from voxrelay.proto.backend_wire import (
    AudioFrame,
    BackendProtocolError,
    decode_audio_frame,
    encode_audio_frame,
)

log = logging.getLogger("voxrelay.backends.echo")

__all__ = ["serve"]


async def _call(request: web.Request) -> web.WebSocketResponse:
    ws, started = await accept_call(request)
    if started is None:
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


async def serve(host: str, port: int, ready: asyncio.Event | None = None) -> None:
    """Serve until cancelled."""
    await serve_app(_call, host, port, name="echo", ready=ready)
