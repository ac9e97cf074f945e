"""The playground page in headless Chromium: pick a size, click Generate, see the image and its parameters."""

from __future__ import annotations

import json
import shutil

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(600)]

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


@pytest.fixture
def browser(tmp_path):
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip("chromium and chromium-driver are not installed (apt-get install -y chromium chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed in the venv")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                 f"--user-data-dir={tmp_path / 'chromium-profile'}", "--window-size=1000,1100"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def test_generate_from_the_playground(serve_app, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    browser.get(f"{serve_app['url']}/")
    wait = WebDriverWait(browser, 120)
    wait.until(lambda d: d.find_element(By.ID, "status").text == "ready")

    sizes = [o.get_attribute("value") for o in Select(browser.find_element(By.ID, "size")).options]
    assert "64x256" in sizes  # the bucket table at serve.resolution=128 (aspect 1:4)
    Select(browser.find_element(By.ID, "size")).select_by_value("96x160")
    browser.find_element(By.ID, "refiner").click()
    for field, value in (("steps", "4"), ("seed", "77"), ("refiner_strength", "0.5")):
        element = browser.find_element(By.ID, field)
        element.clear()
        element.send_keys(value)
    # Record the request bodies the page sends (the single-image reply's header leaves the prompts out).
    browser.execute_script("""
        window.sentBodies = [];
        const originalFetch = window.fetch;
        window.fetch = (url, options) => {
            if (options && options.body) window.sentBodies.push(options.body);
            return originalFetch(url, options);
        };""")
    browser.find_element(By.ID, "generate").click()

    wait.until(lambda d: d.find_element(By.ID, "status").text.startswith(("done", "HTTP", "request failed")))
    assert browser.find_element(By.ID, "status").text.startswith("done"), browser.find_element(By.ID, "status").text
    image = browser.find_element(By.CSS_SELECTOR, "#images img.result")
    wait.until(lambda d: d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", image))
    natural = browser.execute_script("return [arguments[0].naturalWidth, arguments[0].naturalHeight]", image)
    assert natural == [160, 96]
    shown = json.loads(browser.find_element(By.ID, "params").text)
    assert shown["parameters"]["seed"] == 77 and shown["parameters"]["refiner"] is True
    assert shown["parameters"]["refiner_strength"] == 0.5
    assert shown["parameters"]["steps"] == 4 and shown["parameters"]["width"] == 160
    # an empty negative-prompt box sends none: the model's unconditional input, not an encoded ""
    sent = [json.loads(body) for body in browser.execute_script("return window.sentBodies")]
    assert len(sent) == 1 and sent[0]["seed"] == 77 and sent[0]["width"] == 160, sent
    assert "negative_prompt" not in sent[0], sent[0]
    screenshot = tmp_path / "playground.png"
    assert browser.save_screenshot(str(screenshot)) and screenshot.stat().st_size > 0
    print(f"playground screenshot: {screenshot}")
