"""WHIP signaling (RFC 9725) for a transceiver, with CORS, bearer tokens and a demo page.

aiohttp serves it on the transceiver's own event loop, so answering an offer is a direct
call into :meth:`~voxrelay.engine.transceiver.Transceiver.create_call` (no locks, no
queues). Endpoints:

* ``POST /whip`` with an SDP offer (``application/sdp``): ``201 Created``, the answer,
  and ``Location: /whip/<transceiver id>/<call id>``.
* ``DELETE <Location>``: ends the call (``200``); ``PATCH`` with a trickled
  ``application/trickle-ice-sdpfrag`` is accepted (``204``) and needs no work, because an
  ICE-lite agent never checks the client's candidates, the client checks ours.
* ``OPTIONS``: CORS preflight (browsers on other origins), ``Accept-Post``.
* ``GET /``: a page that calls the echo bot; ``/status`` (JSON), ``/metrics``
  (Prometheus), ``/healthz``.

Several transceivers on one host may share the port (``SO_REUSEPORT``); the kernel spreads
connections among them, so a DELETE may reach a sibling that does not own the call. The
Location names the owner, and a sibling forwards the request to the owner's private
loopback listener, found in the runtime directory (``transceiver-<id>.json``).
"""

from __future__ import annotations

import hmac
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import orjson
from aiohttp import ClientError, ClientSession, ClientTimeout, web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, SummaryMetricFamily

from voxrelay.proto.errors import ProtocolError

if TYPE_CHECKING:
    from voxrelay.engine.transceiver import Transceiver

log = logging.getLogger("voxrelay.signaling")

__all__ = ["MAX_OFFER_BYTES", "SignalingServer"]

MAX_OFFER_BYTES = 64 * 1024
"""Largest SDP body accepted; real offers are 2-10 KiB."""

_CORS = {
    "Access-Control-Allow-Origin": "*",
    "Access-Control-Allow-Methods": "GET, POST, PATCH, DELETE, OPTIONS",
    "Access-Control-Allow-Headers": "Authorization, Content-Type, If-Match",
    "Access-Control-Expose-Headers": "Location, Link, ETag, Accept-Patch, Accept-Post",
    "Access-Control-Max-Age": "86400",
}
_DEMO_PAGE = Path(__file__).with_name("demo.html")


class SignalingServer:
    """The HTTP side of one transceiver."""

    def __init__(self, transceiver: Transceiver) -> None:
        self.transceiver = transceiver
        self.settings = transceiver.settings
        self.url = ""
        """Base URL of the public listener, e.g. ``http://127.0.0.1:8080/``."""
        self.private_url: str | None = None
        self._runner: web.AppRunner | None = None
        self._client: ClientSession | None = None
        self._metrics = CollectorRegistry(auto_describe=False)
        self._metrics.register(_TransceiverCollector(transceiver))

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        app = web.Application(client_max_size=MAX_OFFER_BYTES, middlewares=[_cors_middleware])
        app.add_routes(
            [
                web.get("/", self.demo_page),
                web.post("/whip", self.post_offer),
                web.route("OPTIONS", "/whip", self.options),
                web.route("OPTIONS", "/whip/{tid}/{call}", self.options),
                web.delete("/whip/{tid}/{call}", self.delete_call),
                web.patch("/whip/{tid}/{call}", self.patch_call),
                web.get("/status", self.status),
                web.get("/metrics", self.metrics),
                web.get("/healthz", self.healthz),
            ]
        )
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        settings = self.settings
        site = web.TCPSite(
            self._runner,
            settings.signaling_bind,
            settings.signaling_port,
            reuse_port=settings.signaling_reuse_port or None,
        )
        await site.start()
        host, port = _bound_address(site)
        self.url = f"http://{_url_host(host)}:{port}/"
        if settings.signaling_reuse_port:
            private = web.TCPSite(self._runner, "127.0.0.1", 0)
            await private.start()
            private_host, private_port = _bound_address(private)
            self.private_url = f"http://{private_host}:{private_port}/"

    async def stop(self) -> None:
        if self._client is not None:
            await self._client.close()
        if self._runner is not None:
            await self._runner.cleanup()

    # ------------------------------------------------------------------ WHIP

    async def options(self, request: web.Request) -> web.Response:
        headers = {"Accept-Post": "application/sdp"}
        if "call" in request.match_info:
            headers["Accept-Patch"] = "application/trickle-ice-sdpfrag"
        return web.Response(status=204, headers=headers)

    async def post_offer(self, request: web.Request) -> web.Response:
        if (denied := self._authorize(request)) is not None:
            return denied
        if request.content_type != "application/sdp":
            return _problem(415, "send the offer as Content-Type: application/sdp")
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return _problem(413, f"an SDP offer must be at most {MAX_OFFER_BYTES} bytes")
        from voxrelay.engine.transceiver import TransceiverFull

        try:
            call, answer = self.transceiver.create_call(body)
        except ProtocolError as error:
            return _problem(400, f"cannot accept this offer: {error}")
        except TransceiverFull as error:
            return _problem(503, str(error), {"Retry-After": "1"})
        location = f"/whip/{self.settings.transceiver_id}/{call.id}"
        return web.Response(
            status=201,
            body=answer.encode("ascii"),
            headers={
                "Content-Type": "application/sdp",
                "Location": location,
                "Accept-Patch": "application/trickle-ice-sdpfrag",
            },
        )

    async def delete_call(self, request: web.Request) -> web.Response:
        if (denied := self._authorize(request)) is not None:
            return denied
        owner = _owner(request)
        if owner is None:
            return _problem(404, "no such session")
        if owner != self.settings.transceiver_id:
            return await self._forward(request, owner)
        if not self.transceiver.end_call(request.match_info["call"], "ended by client (DELETE)"):
            return _problem(404, "no such session (it may have ended already)")
        return web.Response(status=200)

    async def patch_call(self, request: web.Request) -> web.Response:
        if (denied := self._authorize(request)) is not None:
            return denied
        owner = _owner(request)
        if owner is None:
            return _problem(404, "no such session")
        if owner != self.settings.transceiver_id:
            return await self._forward(request, owner)
        if request.match_info["call"] not in self.transceiver.calls:
            return _problem(404, "no such session (it may have ended already)")
        if request.content_type != "application/trickle-ice-sdpfrag":
            return _problem(415, "PATCH takes application/trickle-ice-sdpfrag")
        body = await request.text()
        prefix = "a=ice-ufrag:"
        ufrags = {line[len(prefix) :] for line in body.splitlines() if line.startswith(prefix)}
        call = self.transceiver.calls[request.match_info["call"]]
        if ufrags and ufrags != {call.session.answer.remote_ice_ufrag}:
            return _problem(422, "ICE restarts are not supported: start a new session")
        return web.Response(status=204)

    # ------------------------------------------------------------------ other pages

    async def demo_page(self, request: web.Request) -> web.Response:
        return web.Response(
            body=_DEMO_PAGE.read_bytes(),
            content_type="text/html",
            headers={"Cache-Control": "no-store"},
        )

    async def status(self, request: web.Request) -> web.Response:
        status = self.transceiver.status()
        status["signaling_url"] = self.url
        return web.Response(body=orjson.dumps(status), content_type="application/json")

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(self._metrics),
            headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"},
        )

    async def healthz(self, request: web.Request) -> web.Response:
        if self.transceiver.draining:
            return web.Response(status=503, text="draining\n")
        return web.Response(text="ok\n")

    # ------------------------------------------------------------------ helpers

    def _authorize(self, request: web.Request) -> web.Response | None:
        expected = self.settings.signaling_token
        if not expected:
            return None
        given = request.headers.get("Authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(
            token.strip().encode(), expected.encode()
        ):
            return None
        return _problem(
            401, "a valid bearer token is required", {"WWW-Authenticate": 'Bearer realm="whip"'}
        )

    async def _forward(self, request: web.Request, owner: int) -> web.Response:
        """Pass a request for a sibling's call to that sibling's private listener."""
        target = _sibling_url(self.settings.runtime_dir, owner)
        if target is None:
            return _problem(404, "no such session (its transceiver is not running here)")
        if self._client is None:
            self._client = ClientSession(timeout=ClientTimeout(total=5))
        headers = {
            name: value
            for name, value in request.headers.items()
            if name.lower() in ("authorization", "content-type", "if-match")
        }
        try:
            async with self._client.request(
                request.method,
                target.rstrip("/") + request.path,
                data=await request.read(),
                headers=headers,
            ) as response:
                body = await response.read()
                return web.Response(
                    status=response.status,
                    body=body,
                    headers={
                        k: v
                        for k, v in response.headers.items()
                        if k.lower() in ("content-type", "www-authenticate")
                    },
                )
        except (ClientError, TimeoutError) as error:
            log.warning("forwarding to sibling failed", extra={"owner": owner, "error": str(error)})
            return _problem(502, f"the transceiver owning this session did not answer: {error}")


@web.middleware
async def _cors_middleware(request: web.Request, handler) -> web.StreamResponse:
    try:
        response = await handler(request)
    except web.HTTPException as error:
        response = error
    response.headers.update(_CORS)
    return response


def _problem(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(status=status, text=message + "\n", headers=headers)


def _owner(request: web.Request) -> int | None:
    tid = request.match_info["tid"]
    return int(tid) if tid.isdigit() and len(tid) <= 5 else None


def _sibling_url(runtime_dir: str | None, transceiver_id: int) -> str | None:
    if not runtime_dir:
        return None
    try:
        state = orjson.loads(Path(runtime_dir, f"transceiver-{transceiver_id}.json").read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return None
    url = state.get("private_url") if isinstance(state, dict) else None
    return url if isinstance(url, str) else None


def _bound_address(site: web.TCPSite) -> tuple[str, int]:
    server = site._server  # aiohttp exposes the bound socket only through the server
    assert server is not None and server.sockets
    address = server.sockets[0].getsockname()
    return address[0], address[1]


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


class _TransceiverCollector:
    """Prometheus view of one transceiver's counters, read at scrape time."""

    def __init__(self, transceiver: Transceiver) -> None:
        self.transceiver = transceiver

    def collect(self):
        t = self.transceiver
        tid = str(t.settings.transceiver_id)
        calls = GaugeMetricFamily(
            "voxrelay_transceiver_calls", "Calls held now", labels=["transceiver", "state"]
        )
        connected = sum(1 for call in t.calls.values() if call.session.is_connected)
        calls.add_metric([tid, "connected"], connected)
        calls.add_metric([tid, "connecting"], len(t.calls) - connected)
        yield calls
        started = CounterMetricFamily(
            "voxrelay_transceiver_calls_started", "Calls answered", labels=["transceiver"]
        )
        started.add_metric([tid], t.calls_started)
        yield started
        ended = CounterMetricFamily(
            "voxrelay_transceiver_calls_ended",
            "Calls ended, by reason",
            labels=["transceiver", "reason"],
        )
        for reason, count in t.calls_ended.items():
            ended.add_metric([tid, reason], count)
        yield ended
        datagrams = CounterMetricFamily(
            "voxrelay_transceiver_datagrams", "UDP datagrams", labels=["transceiver", "direction"]
        )
        datagrams.add_metric([tid, "in"], t.datagrams_in)
        datagrams.add_metric([tid, "out"], t.datagrams_out)
        yield datagrams
        drops = CounterMetricFamily(
            "voxrelay_transceiver_drops",
            "Datagrams dropped, by reason",
            labels=["transceiver", "reason"],
        )
        totals = dict(t.drops)
        for call in t.calls.values():
            for reason, count in call.session.drops.items():
                totals[reason] = totals.get(reason, 0) + count
        for reason, count in totals.items():
            drops.add_metric([tid, reason], count)
        yield drops
        for name, values, text in (
            ("voxrelay_transceiver_dtls_handshake_seconds", t.handshake_times, "DTLS handshakes"),
            ("voxrelay_transceiver_connect_seconds", t.connect_times, "Answer to SRTP keyed"),
        ):
            summary = SummaryMetricFamily(name, text + " (latest 1000)", labels=["transceiver"])
            summary.add_metric([tid], count_value=len(values), sum_value=sum(values))
            yield summary
