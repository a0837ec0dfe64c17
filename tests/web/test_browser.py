"""The app in a real browser: Debian's Chromium driven by Playwright (never ``playwright install``), with every
request that is not to 127.0.0.1 blocked, so the page must render from the server alone (no CDN fonts or scripts).

Uploads ``examples/astronaut.jpg``, checks a prompt without the class word is flagged live and refused with the
CLI's line, then generates, waits for the result image and saves a screenshot (``OMNIPORTRAIT_SCREENSHOT=PATH``
also writes it there, e.g. ``docs/images/web-app.png``); prints the seconds from the click to the image.
"""

import os
import shutil
import time
from pathlib import Path
from urllib.parse import urlparse

import pytest

from .conftest import ASTRONAUT

CHROMIUM = "/usr/bin/chromium"
WAIT_MS = 30_000
STEPS = 10
LOCAL_HOSTS = {"127.0.0.1", "localhost"}


def chromium_path() -> str:
    """Debian's Chromium; the test fails (never skips) without it."""
    found = shutil.which("chromium") or (CHROMIUM if Path(CHROMIUM).exists() else None)
    if found is None:
        pytest.fail(f"Chromium not found ({CHROMIUM}, or chromium on PATH): the browser test needs it; "
                    "install it with apt-get install chromium (never playwright install)")
    return found


def visible(locator):
    """The first visible match (Gradio keeps hidden copies of some elements)."""
    return locator.filter(visible=True).first


@pytest.fixture(scope="module")
def page(server):
    """A page of the app in headless Chromium, every non-local request blocked and recorded in ``page.blocked``."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium_path(), headless=True,
                                             args=["--no-sandbox", "--disable-gpu"])
        try:
            tab = browser.new_page(viewport={"width": 1280, "height": 900})
            tab.blocked = []

            def only_local(route):
                if urlparse(route.request.url).hostname in LOCAL_HOSTS:
                    return route.continue_()
                tab.blocked.append(route.request.url)
                return route.abort()

            tab.route("**/*", only_local)
            tab.set_default_timeout(WAIT_MS)
            tab.goto(server[0], wait_until="load")
            yield tab
        finally:
            browser.close()


def test_the_page_renders_with_nothing_fetched_from_outside(page):
    page.get_by_role("button", name="Generate", exact=True).wait_for(state="visible")
    assert page.get_by_label("Prompt", exact=True).is_visible()
    font = page.evaluate("getComputedStyle(document.querySelector('.gradio-container')).fontFamily")
    assert "system-ui" in font
    assert page.blocked == [], f"the page asked the internet for {page.blocked}"


def test_upload_prompt_generate_in_the_browser(page, tmp_path):
    page.locator("input[type=file]").first.set_input_files(str(ASTRONAUT))
    page.get_by_text("face 0").first.wait_for(state="visible")  # the faces found, boxed
    prompt = page.get_by_label("Prompt", exact=True)
    prompt.fill("a cat on the beach")
    page.get_by_text("✗ identity 1").wait_for(state="visible")  # the live check flags the missing class word
    page.get_by_role("button", name="Generate", exact=True).click()
    visible(page.get_by_text("the prompt names 0 person word(s)")).wait_for(state="visible")
    page.locator(".toast-close").first.click()  # dismissed, so the screenshot shows the result alone
    visible(page.get_by_text("the prompt names 0 person word(s)")).wait_for(state="hidden")
    prompt.fill("a woman on the beach")
    page.get_by_text("✓ identity 1: 'woman' is in the prompt").wait_for(state="visible")
    page.get_by_text("Advanced").click()
    steps = page.get_by_label("number input for Steps")
    steps.fill(str(STEPS))
    steps.press("Enter")
    page.get_by_text("Advanced").click()
    clicked = time.perf_counter()
    page.get_by_role("button", name="Generate", exact=True).click()
    try:
        visible(page.locator("td.filename[aria-label='portrait.json']")).wait_for(state="visible")
    finally:
        page.screenshot(path=str(tmp_path / "web-app.png"), full_page=True)
    # the faces found, the reference crop and the result: three pictures served from the session's files
    page.wait_for_function("document.querySelectorAll(\"img[src*='/image.png']\").length >= 3")
    seconds = time.perf_counter() - clicked
    print(f"\nweb app, tiny-sd15 preset on this CPU: {seconds:.1f} s from the Generate click to the image")
    assert visible(page.get_by_text("SIM to 'woman' reference")).is_visible()
    shot = tmp_path / "web-app.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    if os.environ.get("OMNIPORTRAIT_SCREENSHOT"):
        shutil.copyfile(shot, os.environ["OMNIPORTRAIT_SCREENSHOT"])
    assert page.blocked == [], f"the page asked the internet for {page.blocked}"
