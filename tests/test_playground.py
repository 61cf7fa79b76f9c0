"""The browser playground at / in a real browser: Debian's chromium driven by selenium through
/usr/bin/chromedriver (given explicitly: selenium's driver manager would try to download one),
against a live `python -m server`. The page loads, the loops slider moves, a prompt streams out the
same text the API gives at that depth, the compare view fills one column per depth (and "auto"), model output that
holds HTML shows as text, and a server with --api-key works once the key is typed in.

Skips (with the reason) only where chromium or its driver is not installed: `.ci/run` installs them.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import httpx
import pytest

from server import __main__ as cli

CHROMIUM, DRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
WAIT_S = 180  # generous: a busy 2-core machine runs the server, the browser and the test together
KEY = "playground-key-123456"

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is a dev dependency: pip install -e '.[dev]'")
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402


@pytest.fixture(scope="module")
def browser():
    if not (CHROMIUM.exists() and DRIVER.exists()):
        pytest.skip("chromium / chromium-driver are not installed (apt-get install chromium chromium-driver; .ci/run does)")
    profile = tempfile.mkdtemp(prefix="playground-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                "--window-size=1400,1000", f"--user-data-dir={profile}"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(str(DRIVER)), options=options)
    driver.set_page_load_timeout(WAIT_S)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


def wait(driver, condition, what: str):
    return WebDriverWait(driver, WAIT_S, poll_frequency=0.2).until(lambda d: condition(d), message=what)


def by_id(driver, name: str):
    return driver.find_element(By.ID, name)


def fill(driver, name: str, value: str) -> None:
    box = by_id(driver, name)
    box.clear()
    box.send_keys(value)


def content(element) -> str:
    """The element's exact text (selenium's .text trims and follows layout)."""
    return element.get_property("textContent")


def generate(driver, button: str = "generate") -> None:
    by_id(driver, button).click()
    wait(driver, lambda d: not by_id(d, "generate").get_attribute("disabled"), f"{button} to finish")


def api_text(url: str, prompt: str, loops: int, max_tokens: int, headers: dict | None = None) -> str:
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "loops": loops}
    r = httpx.post(url + "/v1/completions", json=body, headers=headers, timeout=WAIT_S)
    return r.json()["choices"][0]["text"]


def test_slider_stream_compare_and_html_as_text(browser, serve, ckpt):
    server = serve(["--model", str(ckpt)])
    browser.get(server.url + "/")
    wait(browser, lambda d: "loops 1..4" in by_id(d, "model-info").text, "the model card")
    slider = by_id(browser, "loops")
    assert slider.get_attribute("value") == "2" and by_id(browser, "loops-value").text == "2"  # the default depth
    slider.send_keys(Keys.ARROW_RIGHT)  # the slider moves: 2 -> 3
    assert by_id(browser, "loops-value").text == "3"
    fill(browser, "prompt", "First Citizen:")
    fill(browser, "temperature", "0")
    fill(browser, "max-tokens", "8")
    generate(browser)
    output = by_id(browser, "output")
    assert output.get_attribute("data-state") == "done", by_id(browser, "status").text
    assert content(output) and content(output) == api_text(server.url, "First Citizen:", 3, 8)
    assert by_id(browser, "used-loops").text == "3" and by_id(browser, "tokens").text == "8"
    assert by_id(browser, "mean-loops").text == "3.00", "usage.loop_steps / tokens at a fixed depth"
    assert by_id(browser, "ttft").text.endswith(" ms") and float(by_id(browser, "tps").text) > 0

    generate(browser, "compare")  # one prompt at every depth, and "auto", one column each
    columns = browser.find_elements(By.CSS_SELECTOR, "#compare-view .column")
    assert [c.get_attribute("data-loops") for c in columns] == ["1", "2", "3", "4", "auto"]
    texts = [content(c.find_element(By.CLASS_NAME, "column-output")) for c in columns]
    assert all(texts) and len(set(texts)) > 1, texts
    assert texts[2] == api_text(server.url, "First Citizen:", 3, 8), "the loops=3 column is the single run's text"
    assert all(float(c.find_element(By.CLASS_NAME, "column-tps").text) > 0 for c in columns)
    depth = [float(c.find_element(By.CLASS_NAME, "column-depth").text) for c in columns]
    assert depth[:4] == [1.0, 2.0, 3.0, 4.0] and 1.0 <= depth[4] <= 4.0, depth

    by_id(browser, "loops-auto").click()  # adaptive depth: the slider is off, the response says "auto"
    assert by_id(browser, "loops").get_attribute("disabled")
    generate(browser)
    assert by_id(browser, "used-loops").text == "auto" and content(by_id(browser, "output")) == texts[4]
    by_id(browser, "loops-auto").click()

    hostile = "<script>window.pwned = 1</script><img src=x onerror=\"window.pwned = 2\"><b>bold</b>"
    fill(browser, "prompt", hostile)
    by_id(browser, "echo").click()  # the output then starts with the prompt, as the server streams it back
    generate(browser)
    shown = by_id(browser, "output")
    assert content(shown).startswith(hostile), content(shown)
    assert shown.find_elements(By.CSS_SELECTOR, "*") == [], "no element was made from the output"
    assert browser.execute_script("return window.pwned") is None


def test_a_server_with_a_key(browser, serve, ckpt):
    server = serve(["--model", str(ckpt), "--api-key", KEY])
    assert httpx.get(server.url + "/").status_code == 200, "the page itself needs no key"
    browser.get(server.url + "/")
    wait(browser, lambda d: "API key" in by_id(d, "status").text, "the key prompt")
    fill(browser, "prompt", "All:")
    fill(browser, "temperature", "0")
    fill(browser, "max-tokens", "6")
    fill(browser, "api-key", "wrong-key-000")
    generate(browser)
    assert by_id(browser, "output").get_attribute("data-state") == "error" and "API key" in by_id(browser, "status").text
    fill(browser, "api-key", KEY)
    by_id(browser, "api-key").send_keys(Keys.TAB)  # `change`: the model card loads with the key
    wait(browser, lambda d: "loops 1..4" in by_id(d, "model-info").text, "the model card with the key")
    generate(browser)
    want = api_text(server.url, "All:", 2, 6, headers={"Authorization": f"Bearer {KEY}"})
    assert content(by_id(browser, "output")) == want and by_id(browser, "status").text == ""
    by_id(browser, "mode").send_keys("chat")  # chat mode: the same prompt as one user message
    generate(browser)
    assert by_id(browser, "output").get_attribute("data-state") == "done" and content(by_id(browser, "output"))
    assert browser.execute_script("return window.localStorage.length + document.cookie.length") == 0, "the key is not stored"


def test_no_ui_turns_the_playground_off(monkeypatch, serve, ckpt):
    assert cli.parse_args(["--no-ui"]).no_ui and not cli.parse_args([]).no_ui
    monkeypatch.setenv("MESH_NO_UI", "1")
    assert cli.parse_args([]).no_ui
    monkeypatch.delenv("MESH_NO_UI")
    server = serve(["--model", str(ckpt), "--no-ui"])
    assert httpx.get(server.url + "/").status_code == 404 and httpx.get(server.url + "/static/app.js").status_code == 404
    assert httpx.get(server.url + "/docs").status_code == 200, "/docs stays"
