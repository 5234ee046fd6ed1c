"""The review app end to end in a real browser: Debian's chromium, driven by Playwright."""

import os
import shutil
import threading

import pytest
from sqlalchemy import text

from pipeline import review as R
from pipeline.masks import load_masks
from tests.test_review import pretend_labelled

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
REQUIRED = os.environ.get("CXRLABEL_REQUIRE_BROWSER") == "1"  # CI: a missing browser fails, not skips


def _browser_or_skip():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        if REQUIRED:
            raise
        pytest.skip("playwright is not installed")
    if not CHROMIUM:
        if REQUIRED:
            pytest.fail("chromium is not installed (apt-get install chromium)")
        pytest.skip("chromium is not installed")
    return sync_playwright


@pytest.fixture
def app_url(annotated_engine):
    from werkzeug.serving import make_server

    from pipeline.webapp import create_app
    uids = pretend_labelled(annotated_engine, 3, model="default")
    server = make_server("127.0.0.1", 0, create_app(annotated_engine, "default", reviewer=""), threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}", annotated_engine, uids
    server.shutdown()
    thread.join()


def test_review_in_a_real_browser(app_url, tmp_path):
    url, engine, uids = app_url
    sync_playwright = _browser_or_skip()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1300, "height": 850})
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(url + "/")
        assert "3 images · 0 reviewed" in page.inner_text("#counts")
        # the worklist starts with the least trusted: no trust here, so the worst estimated quality
        page.click("table.worklist tbody tr:first-child a")
        page.wait_for_selector("body[data-ready=yes]")
        assert page.inner_text("#uid") == uids[0]
        page.fill("#reviewer", "Dr. Test")
        page.click("#accept")  # accepted, then on to the next image
        page.wait_for_url(f"**/image/{uids[1]}")
        page.wait_for_selector("body[data-ready=yes]")
        # drag the heart's first vertex 40 screen pixels outward, and save the correction
        x, y = page.evaluate("() => { const r = canvas.getBoundingClientRect();"
                             " const [x, y] = toScreen(polygons.heart[0][0]); return [x + r.left, y + r.top]; }")
        before = page.evaluate("() => polygons.heart[0][0]")
        page.mouse.move(x, y)
        page.mouse.down()
        page.mouse.move(x - 20, y, steps=4)
        page.mouse.move(x - 40, y, steps=4)
        page.mouse.up()
        assert page.evaluate("() => polygons.heart[0][0]") != before
        assert page.is_enabled("#save")
        page.keyboard.press("s")
        page.wait_for_function("() => document.getElementById('message').textContent.includes('correction saved')")
        assert "drawn by person" in page.inner_text("#structures")
        page.screenshot(path=str(tmp_path / "review.png"))
        # next image, rejected from the keyboard
        page.keyboard.press("n")
        page.wait_for_url(f"**/image/{uids[2]}")
        page.wait_for_selector("body[data-ready=yes]")
        page.keyboard.press("r")
        page.wait_for_function("() => document.getElementById('state').textContent === 'rejected'")
        browser.close()
    assert errors == []
    with engine.connect() as c:
        decisions = c.execute(text("SELECT uid, structure, decision, reviewer FROM reviews ORDER BY id")).all()
        predicted = load_masks(c, [uids[1]], kind="predicted", model="default")[uids[1]]["heart"]
        reviewed = load_masks(c, [uids[1]], kind="reviewed", model="default")[uids[1]]["heart"]
        results = dict(c.execute(text("SELECT uid, review FROM label_results")).all())
    assert decisions == [(uids[0], "", "accepted", "Dr. Test"), (uids[1], "heart", "corrected", "Dr. Test"),
                         (uids[2], "", "rejected", "Dr. Test")]
    assert reviewed.shape == predicted.shape and (reviewed != predicted).sum() > 0
    assert results == {uids[0]: "accepted", uids[1]: "corrected", uids[2]: "rejected"}


def test_the_app_refuses_what_it_must(app_url):
    """Writes from other pages, bad bodies and unknown images are refused; nothing is stored."""
    url, engine, uids = app_url
    from urllib.error import HTTPError
    from urllib.request import Request, urlopen

    def post(path, body: bytes, headers: dict) -> int:
        try:
            with urlopen(Request(url + path, data=body, headers=headers, method="POST")) as r:
                return r.status
        except HTTPError as e:
            return e.code

    ok_body = b'{"decision": "accepted", "version": 0, "reviewer": "x"}'
    target = f"/api/review/{uids[0]}"
    assert post(target, ok_body, {"Content-Type": "application/json", "Origin": "http://evil.example"}) == 403
    assert post(target, ok_body, {"Content-Type": "text/plain"}) == 415
    assert post(target, b'{"decision": "accepted", "version": "0", "reviewer": "x"}',
                {"Content-Type": "application/json"}) == 400
    assert post("/api/review/../../etc/passwd", ok_body, {"Content-Type": "application/json"}) in (400, 404)
    with engine.connect() as c:
        assert c.execute(text("SELECT COUNT(*) FROM reviews")).scalar() == 0
    assert post(target, ok_body, {"Content-Type": "application/json"}) == 200
    assert post(target, ok_body, {"Content-Type": "application/json"}) == 409  # the same version again


def test_binding_elsewhere_needs_a_token_and_every_request_carries_it(annotated_engine):
    from pipeline.webapp import check_binding, create_app
    with pytest.raises(R.ReviewError, match="--token"):
        check_binding("0.0.0.0", None)
    assert check_binding("127.0.0.1", None) is None
    token = check_binding("0.0.0.0", "s3cret-token")
    pretend_labelled(annotated_engine, 1, model="default")
    client = create_app(annotated_engine, "default", token=token).test_client()
    assert client.get("/").status_code == 401
    assert client.get("/?token=wrong-token").status_code == 401
    first = client.get("/?token=s3cret-token")
    assert first.status_code == 200 and "cxrlabel_review_token" in first.headers.get("Set-Cookie", "")
    assert client.get("/").status_code == 200  # the cookie carries it now
    assert create_app(annotated_engine, "default", token=token).test_client().get(
        "/", headers={"X-Review-Token": "s3cret-token"}).status_code == 200


def test_review_command_refuses_an_open_binding_without_a_token(tmp_path):
    from click.testing import CliRunner

    from pipeline.cli import cli
    assert CliRunner().invoke(cli, ["--db", f"sqlite:///{tmp_path / 'c.db'}", "db", "init"]).exit_code == 0
    r = CliRunner().invoke(cli, ["--db", f"sqlite:///{tmp_path / 'c.db'}", "review", "--host", "0.0.0.0"],
                           env={"CXRLABEL_REVIEW_TOKEN": ""})
    assert r.exit_code != 0 and "--token" in r.output and len(r.output.strip().splitlines()) == 1
    r = CliRunner().invoke(cli, ["--db", f"sqlite:///{tmp_path / 'c.db'}", "review"])
    assert r.exit_code != 0 and "`cxrlabel label" in r.output  # nothing labelled: the way on is to label
