"""The browser chat UI of `web.py` in headless Chromium (Debian's, driven by Playwright): ask, see the
answer stream in, ask again (multi-turn), switch to the base model, clear; a screenshot is saved to
test-artifacts/web_ui.png. Uses the embedded model so the answer is real English."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from after_training_helpers import PYTHON, REPO, env, free_port, run_folder

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ARTIFACTS = REPO / "test-artifacts"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def web(embedded_dir, tmp_path_factory):
    """`web.py` on a run folder over the embedded model (a LoRA adapter nudged off zero), one process."""
    run = run_folder(embedded_dir, tmp_path_factory.mktemp("web") / "smol-run", "lora", perturb=0.002)
    port = free_port()
    log = tmp_path_factory.mktemp("web-log") / "server.log"
    with open(log, "w") as sink:
        proc = subprocess.Popen([PYTHON, "web.py", "--lora_dir", str(run), "--port", str(port),
                                 "--preset", "greedy", "--max_new_tokens", "40"],
                                cwd=REPO, env=env(), stdout=sink, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while True:
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "web.py did not start"
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="module")
def page(web):
    if not Path(CHROMIUM).exists():
        pytest.skip("needs Debian's chromium (apt-get install -y chromium)")
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="needs playwright (requirements-dev.txt: pip install playwright)")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_page(viewport={"width": 1100, "height": 1000})
        page.goto(web + "/", wait_until="load")
        page.wait_for_selector("#prompt textarea", timeout=60_000)
        yield page
        browser.close()


def bot_messages(page) -> list[str]:
    return [m.inner_text().strip() for m in page.locator('#chatbot [data-testid="bot"]').all()]


def ask(page, question: str, answers_before: int, timeout: float = 120) -> str:
    """Type a question, press Enter, wait until the new answer has stopped growing."""
    box = page.locator("#prompt textarea")
    box.fill(question)
    box.press("Enter")
    deadline = time.monotonic() + timeout
    last, stable_since = None, time.monotonic()
    while True:
        assert time.monotonic() < deadline, f"no answer to {question!r}: {bot_messages(page)}"
        answers = bot_messages(page)
        current = answers[answers_before] if len(answers) > answers_before else None
        if current != last:
            last, stable_since = current, time.monotonic()
        elif current and time.monotonic() - stable_since > 2 and box.input_value() == "":
            return current
        time.sleep(0.2)


def test_chat_in_the_browser(web, page):
    first = ask(page, "What is the capital of France?", 0)
    assert "Paris" in first  # the run's chat template is applied: the model answers the question
    second = ask(page, "And what is the capital of Italy?", 1)
    assert second and len(bot_messages(page)) == 2  # multi-turn: the conversation stays on screen
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "web_ui.png"), full_page=True)

    page.get_by_label("base").check()  # the base model, adapter switched off
    assert ask(page, "Name a colour.", 2)
    page.locator("#clear").click()
    page.wait_for_function("document.querySelectorAll('#chatbot [data-testid=\"bot\"]').length === 0",
                           timeout=30_000)


def test_api_on_the_same_port(web):
    models = httpx.get(web + "/v1/models", timeout=10).json()
    assert [m["id"] for m in models["data"]] == ["smol-run", "smol-run:base"]
