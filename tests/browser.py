"""Headless Chromium as a real WHIP client, for tests that need the browser's own WebRTC stack.

A test hands ``browser_whip_call`` (or ``browser_whip_call_async`` from async code) a WHIP URL;
Chromium captures its fake microphone (a beep), offers audio, POSTs the offer, applies the
answer, watches the connection for ``seconds``, then DELETEs the session. What comes back is
what the browser saw: state transitions, ``getStats()`` samples every 250 ms, the HTTP status
and ``Location``, and any JavaScript error text. The call never raises for a failed exchange;
tests assert on the returned dict.

Chromium is Debian's ``chromium`` package driven by Playwright's Python package with
``executable_path`` (never ``playwright install``: no browser downloads here). Import this
module explicitly (``from browser import browser_whip_call``); call ``chromium_available()``
and ``playwright_available()`` to skip when either is missing.

The page is a blank one at ``HARNESS_PAGE_URL`` unless ``page_url`` is given. ``about:blank``
will not do: in Chromium 156 it is not a secure context, so ``navigator.mediaDevices`` is
undefined. ``*.localhost`` origins are secure, and Playwright answers that URL itself, so no
request leaves the browser. The WHIP endpoint is therefore cross-origin and must answer CORS:
a preflight ``OPTIONS`` with ``Access-Control-Allow-Origin`` (``*`` or the page's origin),
``-Allow-Methods: POST, DELETE, OPTIONS``, ``-Allow-Headers: Content-Type, Authorization``,
and ``Access-Control-Expose-Headers: Location`` on the 201, or the script cannot read where to
DELETE. A ``page_url`` on the WHIP server's own origin needs no CORS.

The context is granted two permissions, as a user would: ``microphone``, because with only
the fake-UI flag Chromium still hides host addresses behind mDNS ``.local`` names and offers
no 127.0.0.1 candidate; and ``local-network-access``, because Chromium 156 blocks a fetch
from the harness page (served without an IP, so "public") to 127.0.0.1 otherwise.

Only loopback ICE candidates (127.0.0.0/8, ::1) are kept in the offer sent by default, so the
server under test never sends connectivity checks to any other address of this machine.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from typing import Any

DEFAULT_CHROMIUM = "/usr/bin/chromium"
# Served by Playwright's router, never fetched: a secure-context origin for getUserMedia.
HARNESS_PAGE_URL = "http://whip-harness.localhost/"
_HARNESS_PAGE_HTML = "<!doctype html><title>voxrelay WHIP harness</title>"

# Flags that work as root in this container (see shared/captures/README.md). Without
# --allow-loopback-in-peer-connection Chromium never offers 127.0.0.1 candidates.
# --user-data-dir is not here: Playwright refuses it in ``args`` and takes it as the
# ``user_data_dir`` of a persistent context instead; ``chromium_command`` adds it for raw use.
CHROMIUM_FLAGS: tuple[str, ...] = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--use-fake-ui-for-media-stream",
    "--use-fake-device-for-media-stream",
    "--allow-loopback-in-peer-connection",
)

POLL_INTERVAL_MS = 250
_ICE_GATHERING_WAIT_MS = 2000
_FETCH_TIMEOUT_MS = 10_000
# Launch, page set-up, signaling and teardown on a loaded 2-core machine, beyond ``seconds``.
_OVERHEAD_TIMEOUT_S = 60.0


def chromium_available() -> str | None:
    """Path of a Chromium binary to drive, or None when the machine has none."""
    if os.access(DEFAULT_CHROMIUM, os.X_OK):
        return DEFAULT_CHROMIUM
    return shutil.which("chromium")


def playwright_available() -> bool:
    """Whether Playwright's Python package (with its bundled driver) can be imported."""
    try:
        import playwright.async_api  # noqa: F401
    except ImportError:
        return False
    return True


def chromium_command(user_data_dir: str, *extra: str) -> list[str]:
    """Argv for running Chromium without Playwright (screenshots, ``--dump-dom``)."""
    binary = chromium_available() or DEFAULT_CHROMIUM
    return [binary, *CHROMIUM_FLAGS, f"--user-data-dir={user_data_dir}", *extra]


# Runs in the page. Every step that can fail records ``error`` and returns what it has, so a
# test sees how far the call got instead of a bare Playwright exception.
_WHIP_CALL_JS = """
async ({whipUrl, bearer, seconds, pollMs, gatherMs, fetchMs, loopbackOnly}) => {
  const started = performance.now();
  const since = () => Math.round(performance.now() - started);
  const result = {
    status: null, location: null, offer_sdp: null, answer_sdp: null, delete_status: null,
    states: [], samples: [], error: null,
  };
  const authHeaders = bearer ? {Authorization: `Bearer ${bearer}`} : {};
  let pc = null;
  let stream = null;
  const noteState = () => {
    const last = result.states[result.states.length - 1];
    const now = {
      t: since(), connectionState: pc.connectionState,
      iceConnectionState: pc.iceConnectionState,
    };
    if (!last || last.connectionState !== now.connectionState
        || last.iceConnectionState !== now.iceConnectionState) {
      result.states.push(now);
    }
  };
  const isLoopbackCandidate = (line) => {
    // a=candidate:<foundation> <component> <transport> <priority> <address> <port> typ ...
    const address = line.split(' ')[4] || '';
    return address.startsWith('127.') || address === '::1';
  };
  const sample = async () => {
    const row = {
      t: since(), connectionState: pc.connectionState,
      iceConnectionState: pc.iceConnectionState, inbound_packets: null, inbound_bytes: null,
      outbound_packets: null, rtt: null,
    };
    const report = await pc.getStats();
    report.forEach((stat) => {
      if (stat.type === 'inbound-rtp' && stat.kind === 'audio') {
        row.inbound_packets = stat.packetsReceived ?? null;
        row.inbound_bytes = stat.bytesReceived ?? null;
      } else if (stat.type === 'outbound-rtp' && stat.kind === 'audio') {
        row.outbound_packets = stat.packetsSent ?? null;
      } else if (stat.type === 'candidate-pair' && stat.nominated
                 && stat.currentRoundTripTime !== undefined) {
        row.rtt = stat.currentRoundTripTime;
      }
    });
    result.samples.push(row);
  };
  const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
  try {
    stream = await navigator.mediaDevices.getUserMedia({audio: true});
    pc = new RTCPeerConnection();
    pc.addEventListener('connectionstatechange', noteState);
    pc.addEventListener('iceconnectionstatechange', noteState);
    noteState();
    pc.addTransceiver(stream.getAudioTracks()[0], {direction: 'sendrecv', streams: [stream]});
    await pc.setLocalDescription(await pc.createOffer());
    await Promise.race([
      new Promise((resolve) => {
        if (pc.iceGatheringState === 'complete') return resolve();
        pc.addEventListener('icegatheringstatechange', () => {
          if (pc.iceGatheringState === 'complete') resolve();
        });
      }),
      sleep(gatherMs),
    ]);
    let offer = pc.localDescription.sdp;
    if (loopbackOnly) {
      offer = offer.split('\\r\\n').filter(
        (line) => !line.startsWith('a=candidate:') || isLoopbackCandidate(line)).join('\\r\\n');
    }
    result.offer_sdp = offer;
    const response = await fetch(whipUrl, {
      method: 'POST', body: offer, signal: AbortSignal.timeout(fetchMs),
      headers: {'Content-Type': 'application/sdp', ...authHeaders},
    });
    result.status = response.status;
    result.location = response.headers.get('Location');
    const body = await response.text();
    if (response.status !== 201) {
      throw new Error(`WHIP POST answered ${response.status}: ${body.slice(0, 200)}`);
    }
    if (!result.location) {
      throw new Error('201 without a readable Location (missing Access-Control-Expose-Headers?)');
    }
    result.answer_sdp = body;
    await pc.setRemoteDescription({type: 'answer', sdp: body});
    const deadline = performance.now() + seconds * 1000;
    while (performance.now() < deadline) {
      noteState();
      await sample();
      await sleep(pollMs);
    }
    noteState();
    await sample();
  } catch (err) {
    result.error = `${err && err.name ? err.name + ': ' : ''}${err && err.message || err}`;
  }
  if (result.location) {
    try {
      const target = new URL(result.location, whipUrl).href;
      const response = await fetch(target, {
        method: 'DELETE', headers: authHeaders, signal: AbortSignal.timeout(fetchMs),
      });
      result.delete_status = response.status;
    } catch (err) {
      result.error = result.error || `DELETE failed: ${err && err.message || err}`;
    }
  }
  if (pc) pc.close();
  if (stream) stream.getTracks().forEach((track) => track.stop());
  return result;
}
"""


async def browser_whip_call_async(
    whip_url: str,
    *,
    bearer: str | None = None,
    seconds: float,
    page_url: str | None = None,
    loopback_only: bool = True,
    chromium_path: str | None = None,
) -> dict[str, Any]:
    """One WHIP call from headless Chromium; returns what the page recorded.

    Keys: ``status`` and ``location`` of the POST, ``offer_sdp`` (as sent), ``answer_sdp``,
    ``delete_status``, ``states`` (each change of connectionState/iceConnectionState, with
    ``t`` in ms from the start), ``samples`` (every 250 ms: states, inbound audio
    ``inbound_packets``/``inbound_bytes``, outbound ``outbound_packets``, nominated pair
    ``rtt`` in seconds; None until the stat exists), ``error`` (JavaScript error text or
    None) and ``console`` (page console lines). Use this from a running event loop, e.g.
    when the server under test shares it.
    """
    from playwright.async_api import async_playwright

    executable = chromium_path or chromium_available()
    if executable is None:
        raise FileNotFoundError("no Chromium binary: apt-get install chromium")
    console: list[str] = []
    with tempfile.TemporaryDirectory(prefix="voxrelay-chromium-") as user_data_dir:
        async with async_playwright() as playwright:
            context = await playwright.chromium.launch_persistent_context(
                user_data_dir,
                executable_path=executable,
                headless=True,
                args=list(CHROMIUM_FLAGS),
                # Why both: see the module docstring (mDNS candidates; Local Network Access).
                permissions=["local-network-access", "microphone"],
            )
            try:
                page = context.pages[0] if context.pages else await context.new_page()
                page.on("console", lambda line: console.append(f"{line.type}: {line.text}"))
                page.on("pageerror", lambda exc: console.append(f"pageerror: {exc}"))
                if page_url is None:
                    await page.route(
                        HARNESS_PAGE_URL,
                        lambda route: route.fulfill(
                            status=200, content_type="text/html", body=_HARNESS_PAGE_HTML
                        ),
                    )
                await page.goto(page_url or HARNESS_PAGE_URL)
                result: dict[str, Any] = await asyncio.wait_for(
                    page.evaluate(
                        _WHIP_CALL_JS,
                        {
                            "whipUrl": whip_url,
                            "bearer": bearer,
                            "seconds": seconds,
                            "pollMs": POLL_INTERVAL_MS,
                            "gatherMs": _ICE_GATHERING_WAIT_MS,
                            "fetchMs": _FETCH_TIMEOUT_MS,
                            "loopbackOnly": loopback_only,
                        },
                    ),
                    timeout=seconds + _OVERHEAD_TIMEOUT_S,
                )
            finally:
                await context.close()
    result["console"] = console
    return result


def browser_whip_call(
    whip_url: str,
    *,
    bearer: str | None = None,
    seconds: float,
    page_url: str | None = None,
    loopback_only: bool = True,
    chromium_path: str | None = None,
) -> dict[str, Any]:
    """Blocking ``browser_whip_call_async`` for tests whose server runs in another process.

    It blocks the calling thread, so it refuses to run inside an event loop (a server on that
    loop could never answer); call ``browser_whip_call_async`` there instead.
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        pass
    else:
        raise RuntimeError("browser_whip_call blocks; use browser_whip_call_async in async code")
    return asyncio.run(
        browser_whip_call_async(
            whip_url,
            bearer=bearer,
            seconds=seconds,
            page_url=page_url,
            loopback_only=loopback_only,
            chromium_path=chromium_path,
        )
    )
