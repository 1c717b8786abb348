"""The page at ``GET /`` in a real headless browser (Debian's chromium through selenium and chromedriver): type a
text, press play, and the ``<audio>`` element ends up holding the streamed speech (a duration > 0, equal to the audio
the endpoint gives for the same request). A screenshot is saved under pytest's temporary directory (CI's artefact) and
its path printed."""

from __future__ import annotations

import math
import shutil

import httpx
import pytest

pytest.importorskip("transformers")
pytest.importorskip("fastapi", reason="the server's extra is not installed: pip install -e '.[serve]'")
pytest.importorskip("uvicorn", reason="the server's extra is not installed: pip install -e '.[serve]'")
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (the test extra has it)")

from serve_support import VOICE, pcm_of, serving, tiny_checkpoint, tiny_model  # noqa: E402

CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
CHROMEDRIVER = shutil.which("chromedriver")
TEXT = "Hello from the page. This is the second sentence."


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None or CHROMEDRIVER is None:
        pytest.skip("no chromium/chromedriver on PATH (scripts/setup.sh installs Debian's chromium and "
                    "chromium-driver where apt-get is there and it runs as root)")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--autoplay-policy=no-user-gesture-required", "--window-size=1000,700", "--mute-audio"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def test_the_page_speaks_into_the_audio_element(browser, tmp_path_factory):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    path = tmp_path_factory.mktemp("tiny_page")
    tiny_checkpoint(path)
    with serving(tiny_model(path), max_batch=8) as s:
        browser.get(s.url + "/")
        wait = WebDriverWait(browser, 60)
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#voice option")) == 2)  # (default) + the voice
        browser.find_element(By.CSS_SELECTOR, f"#voice option[value='{VOICE}']").click()
        browser.find_element(By.ID, "greedy").click()
        browser.find_element(By.ID, "text").send_keys(TEXT)
        browser.find_element(By.ID, "play").click()
        wait.until(lambda d: d.find_element(By.ID, "status").text.startswith(("done", "failed")))
        status = browser.find_element(By.ID, "status").text
        assert status.startswith("done"), status
        duration = wait.until(lambda d: d.execute_script(
            "const a = document.getElementById('player'); return a.readyState >= 1 && isFinite(a.duration) "
            "&& a.duration > 0 ? a.duration : null;"))
        shot = tmp_path_factory.getbasetemp() / "serve_page.png"
        browser.save_screenshot(str(shot))
        print(f"\nscreenshot of the page: {shot}")
        expected = httpx.post(f"{s.url}/v1/audio/speech", timeout=60, json={
            "input": TEXT, "voice": VOICE, "greedy": True, "response_format": "pcm"})
        samples = pcm_of(expected.content, "pcm").shape[0]
        assert samples > 0
        assert math.isclose(duration, samples / 24_000, abs_tol=1e-3), (duration, samples / 24_000)
        assert shot.stat().st_size > 0
