"""Headless Chromium calls the echo bot through the whole fleet (relay -> transceiver).

The browser runs its own ICE, DTLS 1.2 (offering 1.3 and a post-quantum key share first)
and SRTP stacks, so reaching ``connected`` with inbound audio growing proves our ICE-lite,
DTLS and SRTP against the client that matters most. CI installs Chromium and Playwright;
only a machine without them skips these tests, and CI (``CI`` set) never does.
"""

from __future__ import annotations

import asyncio
import os

import pytest
from browser import browser_whip_call, chromium_available, playwright_available
from localfleet import LocalFleet

pytestmark = pytest.mark.timeout(180)

_missing = (
    "no Chromium binary (apt-get install chromium)"
    if chromium_available() is None
    else None
    if playwright_available()
    else "Playwright's Python package is missing (pip install playwright)"
)
if _missing and not os.environ.get("CI"):
    pytest.skip(_missing, allow_module_level=True)

TOKEN = "browser-test-bearer-token"


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    local = LocalFleet(
        tmp_path_factory.mktemp("browser"),
        transceivers=1,
        extra=f'signaling_token = "{TOKEN}"\n',
    )
    local.cli("up", "--detach")
    try:
        yield local
    finally:
        local.cli("down", "--now", check=False)


def _inbound(samples: list[dict]) -> list[int]:
    return [s["inbound_packets"] for s in samples if s.get("inbound_packets") is not None]


def test_chromium_call_through_the_relay_connects_and_receives_echoed_audio(fleet):
    status = fleet.status()
    whip = status["signaling_url"] + "whip"
    result = browser_whip_call(whip, bearer=TOKEN, seconds=4.0)
    assert result["error"] is None, (result["error"], result["console"], fleet.log())
    assert result["status"] == 201
    assert f" {status['relay']['port']} typ host" in result["answer_sdp"]
    assert any(s.get("connectionState") == "connected" for s in result["states"]), (
        result["states"],
        fleet.log(),
    )
    inbound = _inbound(result["samples"])
    assert inbound and inbound[-1] > 100, result["samples"][-3:]
    assert inbound[-1] > inbound[len(inbound) // 2] > 0  # still growing late in the call
    assert result["delete_status"] == 200
    after = fleet.status()
    workers = after["relay"]["workers"]
    assert sum(w["counters"]["routes_created"] for w in workers) >= 1
    assert sum(w["counters"]["tx_internal"] for w in workers) > 100  # audio went via the relay
    transceiver = fleet.transceiver_status(after["local_transceivers"][0])
    assert transceiver["calls_ended"].get("ended by client (DELETE)") == 1


def test_chromium_without_the_bearer_token_is_refused(fleet):
    whip = fleet.status()["signaling_url"] + "whip"
    result = browser_whip_call(whip, seconds=0.5)
    assert result["status"] == 401


def test_demo_page_click_to_talk_connects_and_counts_packets(fleet):
    from browser import CHROMIUM_FLAGS
    from playwright.async_api import async_playwright

    url = fleet.status()["signaling_url"]

    async def scenario() -> tuple[str, int]:
        import tempfile

        with tempfile.TemporaryDirectory() as profile:
            async with async_playwright() as playwright:
                context = await playwright.chromium.launch_persistent_context(
                    profile,
                    executable_path=chromium_available(),
                    headless=True,
                    args=list(CHROMIUM_FLAGS),
                    permissions=["local-network-access", "microphone"],
                )
                try:
                    page = context.pages[0] if context.pages else await context.new_page()
                    await page.goto(url)
                    await page.fill("#token", TOKEN)
                    await page.click("#talk")
                    await page.wait_for_function(
                        "document.getElementById('state').textContent === 'connected'",
                        timeout=15_000,
                    )
                    await page.wait_for_function(
                        "Number(document.getElementById('received').textContent) > 50",
                        timeout=15_000,
                    )
                    rtt = await page.text_content("#rtt")
                    received = int(await page.text_content("#received"))
                    await page.click("#hangup")
                    await page.wait_for_function(
                        "document.getElementById('state').textContent === 'idle'"
                    )
                    return rtt or "", received
                finally:
                    await context.close()

    rtt, received = asyncio.run(scenario())
    assert received > 50
    assert rtt.endswith(" ms")
