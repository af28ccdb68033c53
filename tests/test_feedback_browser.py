"""The feedback app in a real headless Chromium (Debian's ``chromium``, driven by Playwright through its
executable path): sign in with a token, answer pairwise, ranking and thumbs items with the keyboard and
with the mouse, reload mid-task, and check that model text containing ``<script>`` renders as text.
Screenshots of every task page go to ``$RLHF_JAX_TEST_ARTIFACTS/feedback`` (default ``test-artifacts/``).

Without a Chromium this module is skipped, unless ``RLHF_JAX_REQUIRE_BROWSER=1`` (``.ci/run`` sets it
after installing ``chromium``), when it fails.
"""
from __future__ import annotations

import json
import os
import pathlib
import shutil
import urllib.request

import pytest
from feedback_server import ROOT, Server, add_annotator

CANDIDATES = [("/usr/lib/chromium/chromium"), shutil.which("chromium") or "", shutil.which("chromium-browser") or ""]
CHROMIUM = next((c for c in CANDIDATES if c and os.path.exists(c)), None)
if CHROMIUM is None:
    if os.environ.get("RLHF_JAX_REQUIRE_BROWSER") == "1":
        raise RuntimeError("RLHF_JAX_REQUIRE_BROWSER=1 but no chromium found: apt-get install -y chromium")
    pytest.skip("no chromium on this machine (apt-get install -y chromium)", allow_module_level=True)

from playwright.sync_api import expect, sync_playwright

ARTIFACTS = pathlib.Path(os.environ.get("RLHF_JAX_TEST_ARTIFACTS", ROOT / "test-artifacts")) / "feedback"
EVIL = '<script>window.__injected = 1</script><img src=x onerror="window.__injected = 2">'
ROWS = [  # tasks alternate pairwise, ranked, thumbs
    {"prompt": f"Customer: my order is late {EVIL}\nAgent:", "responses": [f" Sorry! {EVIL}", " Not my problem."]},
    {"prompt": "Customer: can I get a refund?\nAgent:", "responses": [" Yes, within 30 days.", " No.", " Maybe, ask later.", " <b>Bold</b> yes."]},
    {"prompt": [{"role": "user", "content": "Say hi <i>politely</i>."}], "responses": [" Hello there <u>friend</u>!"]},
    {"prompt": "Customer: where is my parcel?\nAgent:", "responses": [" It is on its way.", " I do not know."]},
    {"prompt": "Customer: the app crashes.\nAgent:", "responses": [" Try reinstalling.", " Update the app.", " Restart the phone.", " Call us."]},
    {"prompt": "Customer: thanks!\nAgent:", "responses": [" You are welcome."]},
]


def api(server: Server, token: str, path: str) -> dict:
    req = urllib.request.Request(server.url + path, headers={"Authorization": f"Bearer {token}"})
    return json.loads(urllib.request.urlopen(req, timeout=10).read())


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("browser")
    (tmp / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    db = tmp / "fb.db"
    tokens = {"alice": add_annotator(db, "alice"), "admin": add_annotator(db, "admin", admin=True)}
    server = Server(["--db", str(db), "--candidates", str(tmp / "c.jsonl"), "--tasks", "pairwise", "ranked", "thumbs",
                     "--ranking-size", "4"], tmp / "server.log").start()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
        try:
            yield server, tokens, browser
        finally:
            browser.close()
            server.stop()


def current_item(page) -> tuple[int, str]:
    task = page.locator("#task")
    expect(task).to_be_visible()
    return int(task.get_attribute("data-item-id")), task.get_attribute("data-kind")


def wait_for_item(page, item_id: int) -> None:
    expect(page.locator("#task")).to_have_attribute("data-item-id", str(item_id), timeout=15000)


def sign_in(page, server: Server, token: str) -> None:
    page.goto(server.url + "/")
    page.fill("#token", "wrong-token")
    page.click("#signin")
    expect(page.locator("#error")).to_have_text("This token is not valid.")
    page.fill("#token", token)
    page.click("#signin")
    page.wait_for_url(server.url + "/annotate")


def test_an_annotator_answers_every_task_with_keyboard_and_mouse(served):
    server, tokens, browser = served
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    sign_in(page, server, tokens["alice"])

    # 1. pairwise, keyboard; model text with <script> and an onerror image renders as text
    assert current_item(page) == (1, "pairwise")
    expect(page.locator("#prompt")).to_contain_text("<script>window.__injected = 1</script>")
    expect(page.locator("#response-A .text")).to_contain_text('<img src=x onerror="window.__injected = 2">')
    assert page.locator("#task script, #task img").count() == 0
    page.screenshot(path=ARTIFACTS / "pairwise.png", full_page=True)
    page.reload()  # mid-task: the same item comes back
    assert current_item(page) == (1, "pairwise")
    page.keyboard.press("Shift+A")  # A, much better
    wait_for_item(page, 2)

    # 2. ranked, keyboard: type 3 then reload (the same item, nothing typed), then 4, 1, Backspace, 2, Enter
    assert current_item(page) == (2, "ranked")
    page.keyboard.press("3")
    expect(page.locator("#typed")).to_have_text("typed: 3")
    page.reload()
    assert current_item(page) == (2, "ranked")
    expect(page.locator("#typed")).to_have_text("")
    for key in ("4", "1", "Backspace", "2"):
        page.keyboard.press(key)
    expect(page.locator("#typed")).to_have_text("typed: 4 > 2")
    page.screenshot(path=ARTIFACTS / "ranked.png", full_page=True)
    page.keyboard.press("Enter")  # ranking 4, 2, then the rest in order: 1, 3
    wait_for_item(page, 3)

    # 3. thumbs, keyboard: c focuses the comment (typed keys do not answer), Esc leaves it, d = thumbs down
    assert current_item(page) == (3, "thumbs")
    expect(page.locator("#prompt")).to_contain_text("user: Say hi <i>politely</i>.")
    page.keyboard.press("c")
    page.keyboard.type("too casual <b>x</b> du")
    page.keyboard.press("Escape")
    page.screenshot(path=ARTIFACTS / "thumbs.png", full_page=True)
    page.keyboard.press("d")
    wait_for_item(page, 4)

    # 4. pairwise, mouse
    page.get_by_role("button", name="B better").click()
    wait_for_item(page, 5)

    # 5. ranked, mouse: drag response 4 above response 1, then move response 2 down one
    assert current_item(page) == (5, "ranked")
    page.drag_and_drop("#ranking li[data-index='3']", "#ranking li[data-index='0']",
                       target_position={"x": 20, "y": 2})
    expect(page.locator("#ranking li")).to_have_count(4)
    order = [int(x) for x in page.locator("#ranking li").evaluate_all("els => els.map(e => e.dataset.index)")]
    assert order == [3, 0, 1, 2], order
    page.locator("#ranking li[data-index='1'] button.down").click()
    page.get_by_role("button", name="Submit ranking").click()
    wait_for_item(page, 6)

    # 6. thumbs, mouse
    page.get_by_role("button", name="Good").click()
    expect(page.locator("#done")).to_be_visible()
    expect(page.locator("#progress")).to_have_text("answered 6 · left 0")
    assert page.evaluate("window.__injected") is None and not errors, errors

    answers = {a["item"]["id"]: a["answer"] for a in api(server, tokens["alice"], "/api/answers")["answers"]}
    assert answers == {
        1: {"kind": "pairwise", "choice": "A", "strength": "much_better"},
        2: {"kind": "ranked", "ranking": [3, 1, 0, 2]},
        3: {"kind": "thumbs", "thumb": "down", "comment": "too casual <b>x</b> du"},
        4: {"kind": "pairwise", "choice": "B", "strength": "better"},
        5: {"kind": "ranked", "ranking": [3, 0, 2, 1]},
        6: {"kind": "thumbs", "thumb": "up", "comment": None},
    }
    for name in ("pairwise", "ranked", "thumbs"):
        assert (ARTIFACTS / f"{name}.png").stat().st_size > 10_000


def test_the_admin_page_shows_progress_and_agreement(served):
    server, tokens, browser = served
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    sign_in(page, server, tokens["admin"])
    page.goto(server.url + "/admin")
    expect(page.locator("#annotators tbody tr")).to_have_count(2)
    expect(page.locator("#agreement h3").first).to_be_visible()
    page.screenshot(path=ARTIFACTS / "admin.png", full_page=True)
    # an annotator token on the admin page gets the server's 403, shown as an error
    other = browser.new_page()
    sign_in(other, server, tokens["alice"])
    other.goto(server.url + "/admin")
    expect(other.locator("#error")).to_contain_text("403")
