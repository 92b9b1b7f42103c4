"""The tab in headless Chromium, served by tests/ui_harness.py (gradio 3.41, stand-in host, tiny
SD1 model): a short run shows progress and a growing loss plot and writes the embedding, a bad
token is named in the tab and outlined in the form, Interrupt stops a long run and keeps its work.

Screenshots go to artifacts/ (git-ignored). TI_UPDATE_DOCS=1 also refreshes docs/tab.png.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.browser
ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--no-first-run"]
ARTIFACTS = ROOT / "artifacts"

if not os.path.exists(CHROMIUM):
    pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("harness")
    port = free_port()
    # Output goes to a file: an unread pipe fills up and then blocks the server mid-run.
    log_path = workdir / "harness.log"
    log = open(log_path, "w")  # noqa: SIM115 (closed in finally; the child writes to it)
    proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "ui_harness.py"), "--port", str(port),
                             "--workdir", str(workdir)], stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    deadline = time.time() + 300
    ready = []
    try:
        while time.time() < deadline and proc.poll() is None:
            ready = [ln for ln in log_path.read_text().splitlines() if ln.startswith("READY ")]
            if ready:
                break
            time.sleep(0.3)
        if not ready:
            pytest.fail("harness did not start:\n" + log_path.read_text()[-4000:])
        yield ready[0].split()[1], workdir
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
        ARTIFACTS.mkdir(exist_ok=True)
        (ARTIFACTS / "harness.log").write_text(log_path.read_text())


@pytest.fixture(scope="module")
def page(server):
    url, _ = server
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        pg = browser.new_page(viewport={"width": 1000, "height": 1400})
        external = []  # the harness is offline: anything not from it is a bug in the page or the test
        pg.route("**/*", lambda route: route.continue_() if route.request.url.startswith(url)
                 else (external.append(route.request.url), route.abort()))
        pg.goto(url)
        pg.set_default_timeout(120_000)  # generous bounds: a busy 2-core CI machine is slow, never wrong
        pg.wait_for_selector("#ti_trainer_token_string", timeout=180_000)
        yield pg
        browser.close()
    assert not external, external


def fill(page, name: str, value) -> None:
    page.fill(f"#ti_trainer_{name} textarea, #ti_trainer_{name} input", str(value))


def status(page) -> tuple[str | None, int]:
    got = page.evaluate("""() => { const s = document.querySelector('#ti_trainer_status [data-status]');
        return s ? [s.getAttribute('data-status'), +s.getAttribute('data-step')] : [null, 0]; }""")
    return got[0], got[1]


# points of the smoothed training-loss line (0 before the plot has one)
PLOT_POINTS_JS = ("(p => p ? p.getAttribute('points').trim().split(/\\s+/).length : 0)"
                  "(document.querySelector('#ti_trainer_plot polyline.ti-smooth'))")


def plot_points(page) -> int:
    return page.evaluate(f"() => {PLOT_POINTS_JS}")


def wait_status(page, want: set, timeout: float = 240) -> tuple[str | None, int]:
    deadline = time.time() + timeout
    while time.time() < deadline:
        st = status(page)
        if st[0] in want:
            return st
        time.sleep(0.2)
    shot(page, "failure.png")
    raise AssertionError(f"status {status(page)} never became one of {want}")


def shot(page, name: str) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / name
    page.screenshot(path=str(path), full_page=True)
    return path


def test_a_short_run_shows_progress_and_the_plot_and_writes_the_embedding(page, server):
    _url, workdir = server
    fill(page, "token_string", "mytok123")
    fill(page, "train_data_dir", workdir / "data")
    fill(page, "resolution", "64")
    fill(page, "max_train_steps", 300)
    fill(page, "validation_every_n_steps", 10)
    fill(page, "validation_batch_size", 2)
    fill(page, "save_every_n_steps", 100)
    fill(page, "sample_every_n_steps", 100)
    page.check("#ti_trainer_use_txt2img input")  # the txt2img tab's prompt and 64x64 size
    page.click("#ti_trainer_train")
    # how the plot and progress text look while a run goes: the interrupt test (a run that cannot end first)
    st, step = wait_status(page, {"done"})
    assert step == 300
    # the train button's own output says "done"; the refresh after it brings the whole curve
    page.wait_for_function("""() => { const p = document.querySelector('#ti_trainer_plot polyline.ti-smooth');
        return p && p.getAttribute('points').trim().split(/\\s+/).length === 300; }""", timeout=60_000)
    page.wait_for_function("() => document.querySelectorAll('#ti_trainer_plot circle.ti-val').length >= 30")
    assert any(workdir.rglob("mytok123.safetensors"))
    page.wait_for_function("() => document.querySelectorAll('#ti_trainer_gallery img').length >= 3")
    assert "step 300" in page.inner_text("#ti_trainer_gallery")
    page.wait_for_function("() => document.querySelector('#ti_trainer_load_check').textContent.includes('load')")
    assert shot(page, "tab_done.png").stat().st_size > 10_000


def test_a_bad_token_is_named_and_outlined(page):
    fill(page, "token_string", "cat")
    page.click("#ti_trainer_train")
    page.wait_for_selector("#ti_trainer_error li[data-field='token_string']", timeout=120_000)
    assert "already the known word" in page.inner_text("#ti_trainer_error")
    page.wait_for_selector("#ti_trainer_token_string.ti-trainer-bad", timeout=5_000)
    shot(page, "tab_bad_token.png")


def test_what_the_run_would_find_is_named_at_submit_and_nothing_starts(page, server):
    """The API's submit checks run in the tab too: an init word of several tokens is named before
    the queue, and the host's progress bar ends with the refusal (no wait for a run never queued)."""
    _url, workdir = server
    init_word = page.input_value("#ti_trainer_init_word textarea, #ti_trainer_init_word input")
    fill(page, "token_string", "mytok321")
    fill(page, "train_data_dir", workdir / "data")
    fill(page, "init_word", "a castle on a hill")
    page.click("#ti_trainer_train")
    page.wait_for_selector("#ti_trainer_error li[data-field='init_word']", timeout=120_000)
    page.wait_for_selector("#ti_trainer_init_word.ti-trainer-bad", timeout=5_000)
    page.wait_for_function("() => !document.querySelector('#ti_trainer_run .progressDiv')", timeout=20_000)
    assert "Initialization word" in page.inner_text("#ti_trainer_error")
    assert not any(workdir.rglob("mytok321*"))
    shot(page, "tab_bad_init_word.png")
    fill(page, "init_word", init_word)


def test_interrupt_stops_a_long_run_and_keeps_its_work(page, server):
    _url, workdir = server
    fill(page, "token_string", "mytok456")
    page.click("#ti_trainer_prompt_source label:has-text('object template')")  # captions name mytok123
    fill(page, "max_train_steps", 100_000)
    fill(page, "validation_every_n_steps", 0)
    fill(page, "sample_every_n_steps", 0)
    page.click("#ti_trainer_train")
    deadline = time.time() + 180
    while status(page)[0] != "running" or status(page)[1] < 3:
        if time.time() > deadline:
            shot(page, "failure.png")
            raise AssertionError(f"no running step >= 3: {status(page)}")
        time.sleep(0.2)
    # while it runs: the host's progress text names the step, and the loss plot is drawn and grows
    page.wait_for_function("() => ((document.querySelector('.ti-trainer-progress-text') || {}).textContent || '')"
                           ".startsWith('Step ')", timeout=120_000)
    page.wait_for_function(f"() => {PLOT_POINTS_JS} > 0", timeout=120_000)
    first = plot_points(page)
    page.wait_for_function(f"() => {PLOT_POINTS_JS} > {first}", timeout=120_000)
    assert status(page)[0] == "running"
    page.click("#ti_trainer_interrupt")
    st, step = wait_status(page, {"interrupted", "done", "failed"}, timeout=180)
    assert st == "interrupted" and 3 <= step < 100_000
    assert not page.query_selector("#ti_trainer_token_string.ti-trainer-bad")  # cleared by the new run
    assert any(workdir.rglob("mytok456.safetensors"))
    shot(page, "tab_interrupted.png")


@pytest.mark.skipif(not os.environ.get("TI_UPDATE_DOCS"), reason="TI_UPDATE_DOCS=1 refreshes docs/tab.png")
def test_docs_screenshot(page, server):
    """The README's picture: a finished run with its loss plot, the rarely changed groups folded."""
    from PIL import Image

    _url, workdir = server
    fill(page, "token_string", "mytok789")
    fill(page, "train_data_dir", workdir / "data")  # the page is the test's own: nothing carried over
    fill(page, "resolution", "64")
    fill(page, "init_word", "disc")
    page.check("#ti_trainer_prompt_source input[value='object template']")  # the captions name another token
    fill(page, "num_vectors_per_token", 2)
    fill(page, "max_train_steps", 200)
    fill(page, "validation_every_n_steps", 10)
    fill(page, "save_every_n_steps", 50)
    fill(page, "sample_every_n_steps", 50)
    page.check("#ti_trainer_use_txt2img input")  # the txt2img tab's 64x64 previews
    page.click("#ti_trainer_train")
    wait_status(page, {"done"}, timeout=240)
    page.wait_for_function("() => document.querySelector('#ti_trainer_load_check').textContent.includes('load')")
    for group in ("saving", "validation"):
        page.click(f"#ti_trainer_group_{group} .label-wrap")
    time.sleep(0.5)
    raw = ARTIFACTS / "docs_tab_raw.png"
    ARTIFACTS.mkdir(exist_ok=True)
    page.locator("#ti_trainer_tab").screenshot(path=str(raw))
    img = Image.open(raw).convert("RGB")
    img = img.resize((860, round(img.height * 860 / img.width)), Image.LANCZOS)
    out = ROOT / "docs" / "tab.png"
    out.parent.mkdir(exist_ok=True)
    img.quantize(colors=128).save(out, optimize=True)
    assert out.stat().st_size < 300_000
