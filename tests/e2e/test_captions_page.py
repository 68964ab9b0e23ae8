"""The captions page and its session browser in a real browser: Debian's chromium driven by Playwright, against the
whole pipeline (real nats-server, PostgreSQL, the services, tiny.en) and the web process (services/web).

A screenshot of each run is kept in test-artifacts/ ($JETSCRIBE_TEST_ARTIFACTS moves it; gitignored).
Without a browser at /usr/bin/chromium ($JETSCRIBE_CHROMIUM) these tests skip, and fail under CI=true:
`make test` installs Debian's chromium where it is missing (as root).
"""

import asyncio
import os
import re
import uuid
from pathlib import Path

import aiohttp
import nats
import pytest

from jetscribe.cli.formats import render
from jetscribe.client.bot import Audio, stream_audio
from jetscribe.devstack.servers import free_port
from jetscribe.evaluation.speech import SAMPLE_SENTENCES, sample_speech, synthesize, write_wav
from jetscribe.evaluation.wer import wer
from jetscribe.services.ingest.websocket import ApiKeys
from jetscribe.services.persister.store import final_segments, open_engine, wait_until_ended
from jetscribe.services.web.app import key_checker
from jetscribe.services.web.app import run as run_web
from jetscribe.shared.config import WebConfig
from jetscribe.shared.natsauth import env_connect_options

pytestmark = pytest.mark.e2e

CHROMIUM = os.environ.get("JETSCRIBE_CHROMIUM") or "/usr/bin/chromium"
ARTIFACTS = Path(os.environ.get("JETSCRIBE_TEST_ARTIFACTS") or Path(__file__).parents[2] / "test-artifacts")
WER_BOUND = 0.15  # as the NATS path's e2e test: tiny.en on the sample
FAKE_MICROPHONE = ("--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream")
# Each interim text the page shows, in order, with its colour: caught as it changes, not sampled.
WATCH_INTERIMS = """() => {
  window.interimsSeen = [];
  const interim = document.getElementById("interim");
  new MutationObserver(() => {
    if (interim.textContent) window.interimsSeen.push([interim.textContent, getComputedStyle(interim).color]);
  }).observe(interim, { childList: true, characterData: true, subtree: true });
}"""


@pytest.fixture(scope="module")
def chromium() -> str:
    if os.access(CHROMIUM, os.X_OK):
        return CHROMIUM
    reason = f"no browser at {CHROMIUM}: install Debian's chromium (`make test` does, as root)"
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true: {reason}")
    pytest.skip(reason)


@pytest.fixture
async def web(chromium, pipeline, nats_keys):  # no browser: skipped (or failed) before the pipeline starts
    """The web process on the pipeline's database and the session's keyring; yields its URL."""
    stop, port = asyncio.Event(), free_port()
    config = WebConfig(database_url=pipeline.database_url, port=port, gateway_url=pipeline.ws_url)
    task = asyncio.create_task(run_web(config, stop, key_checker(ApiKeys(nats_keys.api_keys_path))))
    url = f"http://127.0.0.1:{port}/"
    async with aiohttp.ClientSession() as http:
        for _ in range(100):
            try:
                async with http.get(url) as response:
                    if response.status == 200:
                        break
            except aiohttp.ClientConnectionError:
                await asyncio.sleep(0.05)
    yield url
    stop.set()
    await task


def api_key(keys, tenant: str) -> str:
    """A new tenant and its API key, made as `jetscribe tenant add` makes them."""
    keys.add_tenant(tenant)
    return keys.new_api_key(tenant)


async def browser_page(playwright, chromium: str, *extra_args: str):
    browser = await playwright.chromium.launch(executable_path=chromium, args=list(extra_args))
    context = await browser.new_context(accept_downloads=True, viewport={"width": 1280, "height": 800})
    return browser, await context.new_page()


async def test_the_session_browser_lists_opens_and_exports_a_session_of_the_key_s_tenant_only(
    chromium, pipeline, web, nats_keys
):
    from playwright.async_api import async_playwright

    url = web
    tenant, session = f"web-{uuid.uuid4().hex[:6]}", f"browsed-{uuid.uuid4().hex[:8]}"
    key, other_key = api_key(nats_keys, tenant), api_key(nats_keys, f"{tenant}-other")
    speech = sample_speech()
    nc = await nats.connect(pipeline.nats_url, **env_connect_options(pipeline.nats_url))
    try:
        await stream_audio(nc, Audio(speech.audio, speech.sample_rate), tenant=tenant, session_id=session, speed=0)
    finally:
        await nc.close()
    engine = open_engine(pipeline.database_url)
    try:
        await wait_until_ended(engine, tenant, session, timeout_s=30.0)
        stored = await final_segments(engine, tenant, session)
    finally:
        await engine.dispose()

    async with aiohttp.ClientSession() as http:  # the key decides the tenant; a refusal says why
        api = f"{url}api/sessions"
        async with http.get(api) as response:
            assert response.status == 401 and (await response.json())["code"] == "missing_key"
        async with http.get(api, headers={"Authorization": "Token js_not-a-key"}) as response:
            assert response.status == 401 and (await response.json())["code"] == "unknown_key"
        async with http.get(api, headers={"Authorization": f"Token {other_key}"}) as response:
            assert session not in [s["session_id"] for s in await response.json()]
        async with http.get(f"{api}/{session}", params={"token": other_key}) as response:
            assert response.status == 404 and (await response.json())["code"] == "unknown_session"

    async with async_playwright() as playwright:
        browser, page = await browser_page(playwright, chromium)
        try:
            await page.goto(url)
            await page.wait_for_selector("body[data-ready=true]")
            await page.fill("#key", key)
            await page.click("#refresh")
            await page.click(f'#sessions tr[data-session="{session}"]')
            await page.wait_for_selector("#opened-finals li")
            shown = await page.eval_on_selector_all("#opened-finals li", "lis => lis.map(li => li.lastChild.data)")
            assert wer(speech.text, " ".join(shown)) <= WER_BOUND, shown
            assert shown == [s.text for s in stored if s.text]
            times = await page.eval_on_selector_all("#opened-finals .time", "spans => spans.map(s => s.textContent)")
            assert all(re.fullmatch(r"\d\d:\d\d\.\d–\d\d:\d\d\.\d", t) for t in times), times

            async with page.expect_download() as downloading:
                await page.click("button[data-export=vtt]")
            download = await downloading.value
            assert download.suggested_filename == f"{session}.vtt"
            vtt = Path(await download.path()).read_text()
            assert vtt == render(stored, "vtt") + "\n"
            cues = re.findall(r"^(\d\d:\d\d:\d\d\.\d\d\d) --> (\d\d:\d\d:\d\d\.\d\d\d)\n(.+)$", vtt, re.MULTILINE)
            assert vtt.startswith("WEBVTT\n\n") and [c[2] for c in cues] == shown

            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            await page.screenshot(path=str(ARTIFACTS / "captions-session-browser.png"), full_page=True)
        finally:
            await browser.close()


async def test_live_captions_from_a_fake_microphone_then_the_session_in_the_browser(
    chromium, pipeline, web, nats_keys, tmp_path
):
    from playwright.async_api import async_playwright

    speech = synthesize(list(SAMPLE_SENTENCES[:3]))
    wav = tmp_path / "microphone.wav"
    write_wav(wav, speech)
    tenant = f"live-{uuid.uuid4().hex[:6]}"
    key = api_key(nats_keys, tenant)
    async with async_playwright() as playwright:
        microphone = f"--use-file-for-fake-audio-capture={wav}%noloop"
        browser, page = await browser_page(playwright, chromium, *FAKE_MICROPHONE, microphone)
        try:
            await page.goto(web)
            await page.wait_for_selector("body[data-ready=true]")
            assert await page.input_value("#gateway") == pipeline.ws_url
            await page.fill("#key", key)
            await page.evaluate(WATCH_INTERIMS)
            await page.click("#start")
            await page.wait_for_selector("#live[data-session]")
            session = await page.get_attribute("#live", "data-session")
            # The fake microphone plays the file once, in real time; then Stop sends Finalize and CloseStream.
            await page.wait_for_function(
                f"Number(document.getElementById('live').dataset.sentSeconds || 0) >= {speech.duration_s + 0.3}",
                timeout=(speech.duration_s + 30) * 1000,
            )
            await page.click("#stop")
            await page.wait_for_selector("#live[data-closed]", timeout=60_000)
            assert await page.get_attribute("#live", "data-closed") == "ended"

            interims = await page.evaluate("window.interimsSeen")
            finals = await page.eval_on_selector_all("#finals li", "lis => lis.map(li => li.lastChild.data)")
            colours = await page.eval_on_selector_all("#finals li", "lis => lis.map(li => getComputedStyle(li).color)")
            assert interims, "no interim text was shown"
            assert {colour for _, colour in interims} == {"rgb(136, 136, 136)"}  # grey
            assert finals and set(colours) == {"rgb(0, 0, 0)"}  # black
            assert wer(speech.text, " ".join(finals)) <= WER_BOUND, finals
            times = await page.eval_on_selector_all("#finals .time", "spans => spans.map(s => s.textContent)")
            assert len(times) == len(finals) and all(re.fullmatch(r"\d\d:\d\d\.\d–\d\d:\d\d\.\d", t) for t in times)
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            await page.screenshot(path=str(ARTIFACTS / "captions-live.png"), full_page=True)

            engine = open_engine(pipeline.database_url)
            try:
                await wait_until_ended(engine, tenant, session, timeout_s=30.0)
                stored = await final_segments(engine, tenant, session)
            finally:
                await engine.dispose()
            assert [s.text for s in stored if s.text] == finals  # what the page showed live is what was stored

            await page.click("#refresh")
            await page.click(f'#sessions tr[data-session="{session}"]')
            await page.wait_for_selector("#opened-finals li")
            async with page.expect_download() as downloading:
                await page.click("button[data-export=vtt]")
            vtt = Path(await (await downloading.value).path()).read_text()
            assert vtt == render(stored, "vtt") + "\n" and vtt.startswith("WEBVTT\n\n")
            await page.screenshot(path=str(ARTIFACTS / "captions-live-session.png"), full_page=True)
        finally:
            await browser.close()


async def test_a_chosen_file_is_played_and_captioned_until_its_end(chromium, pipeline, web, nats_keys, tmp_path):
    from playwright.async_api import async_playwright

    speech = synthesize(list(SAMPLE_SENTENCES[:1]))
    wav = tmp_path / "chosen.wav"
    write_wav(wav, speech)
    key = api_key(nats_keys, f"file-{uuid.uuid4().hex[:6]}")
    async with async_playwright() as playwright:
        browser, page = await browser_page(playwright, chromium)
        try:
            await page.goto(web)
            await page.wait_for_selector("body[data-ready=true]")
            await page.fill("#key", key)
            await page.check("input[name=source][value=file]")
            await page.set_input_files("#file", str(wav))
            await page.click("#start")
            # The file's end stops the stream by itself (CloseStream), and the socket closes after its last final.
            await page.wait_for_selector("#live[data-closed]", timeout=(speech.duration_s + 60) * 1000)
            assert await page.get_attribute("#live", "data-closed") == "ended"
            assert float(await page.get_attribute("#live", "data-sent-seconds")) >= speech.duration_s - 0.2
            finals = await page.eval_on_selector_all("#finals li", "lis => lis.map(li => li.lastChild.data)")
            assert wer(speech.text, " ".join(finals)) <= WER_BOUND, finals
        finally:
            await browser.close()
