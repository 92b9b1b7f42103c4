"""What the end-to-end tests in a real A1111 and a real reForge share (test_real_host_e2e.py,
test_reforge_host.py): one running host at a time, a tiny image folder, the API round trip
(train -> done -> the host lists it -> txt2img names it, a prompt without it unchanged) and the tab
driven in headless Chromium. Both hosts keep A1111's API, infotext (`TI hashes`) and Train tab.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import re
import secrets
import shutil
import subprocess
import time
import urllib.parse
from pathlib import Path

import host_server

ROOT = Path(__file__).resolve().parent.parent.parent
ARTIFACTS = ROOT / "artifacts"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--no-first-run"]
STEPS = 20
TRAIN = {  # small and quick: 64 px, no validation, no previews
    "init_word": "ball", "num_vectors_per_token": 2, "resolution": "64", "max_train_steps": STEPS,
    "learning_rate": "0.05", "validation_every_n_steps": 0, "sample_every_n_steps": 0, "seed": 3,
}
TXT2IMG = {"steps": 4, "width": 64, "height": 64, "seed": 1234, "sampler_name": "Euler", "cfg_scale": 7.0}
PLAIN_PROMPT = "a photo of a red cat"


def install_state(host_dir: str | Path) -> list[str]:
    """What git sees in the install (bytecode caches aside): equal before and after, so the tests
    wrote nothing into it (everything went to the temporary --data-dir)."""
    r = subprocess.run(["git", "-C", str(host_dir), "status", "--porcelain", "--ignored", "--untracked-files=all"],
                       capture_output=True, text=True, check=True)
    return sorted(ln for ln in r.stdout.splitlines() if "__pycache__" not in ln and not ln.endswith(".pyc"))


class Hosts:
    """At most one running host at a time (the machine may have two cores): asking for another
    family stops the one that runs. Records the names trained. `label` prefixes the saved logs."""

    def __init__(self, host_dir: str | Path, python: str, tiny: Path, workdir: Path, label: str = "real-host",
                 extra_args: tuple[str, ...] = (), settings: dict | None = None):
        self.host_dir, self.python, self.tiny, self.workdir = Path(host_dir), python, tiny, workdir
        self.label, self.extra_args, self.settings = label, tuple(extra_args), dict(settings or {})
        self.current: host_server.Host | None = None
        self.names: list[str] = []
        self.timings: dict[str, float] = {}

    def get(self, family: str) -> host_server.Host:
        import pytest

        if self.current is not None and self.current.family == family:
            return self.current
        self.stop()
        host = host_server.Host(self.host_dir, self.python, self.tiny, family, self.workdir / family,
                                extra_args=self.extra_args)
        # the API reads datasets only from the folders this setting lists (README: Security)
        settings = {"ti_trainer_api_read_folders": str(self.workdir.parent), **self.settings}
        (host.workdir / "config.json").write_text(json.dumps(settings))
        if not host.checkpoint.is_file():
            pytest.skip(f"no tiny {family} checkpoint at {host.checkpoint}")
        self.current = host
        host.start()
        self.timings[f"{family} startup"] = host.startup_s
        return host

    def stop(self) -> None:
        host, self.current = self.current, None
        if host is not None:
            host.stop()
            ARTIFACTS.mkdir(exist_ok=True)
            shutil.copyfile(host.log_path, ARTIFACTS / f"{self.label}-{host.family}.log")


def new_name(hosts: Hosts, family: str) -> str:
    name = f"e2e{family}-{secrets.token_hex(3)}"
    hosts.names.append(name)
    return name


def image_folder(path: Path, token: str, n: int = 3) -> Path:
    """n small images with captions naming the token (the default prompt source is captions)."""
    from PIL import Image, ImageDraw

    path.mkdir(parents=True, exist_ok=True)
    colours = [(200, 40, 40), (40, 160, 60), (50, 70, 200), (220, 200, 40)]
    for i in range(n):
        img = Image.new("RGB", (80, 80), (235, 235, 230))
        ImageDraw.Draw(img).ellipse((12 + 3 * i, 14, 66, 68 - 2 * i), fill=colours[i % len(colours)])
        img.save(path / f"img{i}.png")
        (path / f"img{i}.txt").write_text(f"a photo of {token}, a ball")
    return path


def wait_task(host: host_server.Host, task_id: str, timeout: float = 180) -> dict:
    deadline, info = time.time() + timeout, {}
    while time.time() < deadline:
        info = host.get(f"/ti-trainer/v1/tasks/{task_id}")
        if info["status"] in ("done", "failed", "interrupted"):
            return info
        time.sleep(0.5)
    raise AssertionError(f"task {task_id} did not finish in {timeout} s: {info}\n{host.log()[-4000:]}")


def txt2img(host: host_server.Host, prompt: str) -> tuple[bytes, str, dict]:
    """(raw RGB pixels, infotext, info) of one image."""
    from PIL import Image

    r = host.post("/sdapi/v1/txt2img", {**TXT2IMG, "prompt": prompt})
    img = Image.open(io.BytesIO(base64.b64decode(r["images"][0].split(",", 1)[-1]))).convert("RGB")
    info = json.loads(r["info"])
    return img.tobytes(), info["infotexts"][0], info


def ti_hash_entries(infotext: str) -> set[str]:
    """The `name: hash` entries of the infotext's `TI hashes: "..."` field."""
    m = re.search(r'TI hashes: "([^"]*)"', infotext)
    return {e.strip() for e in m.group(1).split(",")} if m else set()


def check_log(host: host_server.Host) -> None:
    problems, _ = host_server.our_problems(host.log())
    assert not problems, "the host's log names the extension in an error:\n\n" + "\n\n".join(problems)


def check_startup_log(host: host_server.Host) -> None:
    problems, tolerated = host_server.our_problems(host.log())
    assert not problems, "the host's log names the extension in an error:\n\n" + "\n\n".join(problems)
    for block in tolerated:  # shown with -rA / on failure elsewhere; not the extension's doing
        print(f"[tolerated host noise] {block.splitlines()[0].strip()}")
    paths = host.get("/openapi.json")["paths"]
    assert "/ti-trainer/v1/train" in paths and "/ti-trainer/v1/tasks/{task_id}" in paths


def api_round_trip(hosts: Hosts, family: str, tmp_path: Path, width: int | None = None) -> dict:
    """Train over HTTP, then check what the host itself says about the result. `width`: the
    embedding's expected `shape` (default: the context_dim of the checkpoint's .yaml)."""
    host = hosts.get(family)
    check_startup_log(host)
    if family == "sdxl":  # else txt2img tries to download the SDXL live-preview decoder (offline)
        host.post("/sdapi/v1/options", {"live_previews_enable": False})
    width = width or host_server.context_dim(host.checkpoint.with_suffix(".yaml"))
    name = new_name(hosts, family)
    data = image_folder(tmp_path / "data", name)

    before, before_text, _ = txt2img(host, PLAIN_PROMPT)
    _, token_before_text, _ = txt2img(host, f"a photo of {name}")  # the token as plain words
    assert "TI hashes" not in token_before_text
    assert host.get("/sdapi/v1/embeddings")["loaded"].get(name) is None

    t0 = time.time()
    submitted = host.post("/ti-trainer/v1/train", {**TRAIN, "token_string": name, "train_data_dir": str(data)},
                          expect=202)
    info = wait_task(host, submitted["task_id"], timeout=600 if family == "sdxl" else 180)
    hosts.timings[f"{family} api train {STEPS} steps"] = time.time() - t0
    assert info["status"] == "done", info
    assert info["step"] == STEPS and info["max_steps"] == STEPS, info
    assert info["loss"] is not None, info
    assert info["output"] == f"{name}.safetensors", info  # relative to the embeddings folder
    output = host.embeddings_dir / info["output"]
    assert output.is_file()

    listed = host.get("/sdapi/v1/embeddings")
    got = listed["loaded"].get(name)
    assert got is not None, listed
    assert got["vectors"] == TRAIN["num_vectors_per_token"] and got["shape"] == width, got
    # A1111 reads only the tensors of a .safetensors embedding, so it lists no step or checkpoint
    # for one; the file's header has them (our inspect route reads it).
    assert got["step"] in (None, STEPS), got
    assert name not in listed["skipped"]
    header = host.get(f"/ti-trainer/v1/inspect/{name}")
    # the Extra Networks card: a picture and the training facts beside the file (lib_ti/webui/card.py)
    card = json.loads((host.embeddings_dir / f"{name}.json").read_text())
    assert card["ti_trainer"]["step"] == STEPS and card["ti_trainer"]["sd_checkpoint_name"] == f"tiny-{family}", card
    assert f"{STEPS} training steps" in card["description"], card
    assert (host.embeddings_dir / f"{name}.preview.png").is_file()
    # and the host's own card (what the Extra Networks single-card refresh fetches) shows both
    query = urllib.parse.urlencode({"page": "textual inversion", "tabname": "txt2img", "name": name})
    card_html = host.get(f"/sd_extra_networks/get-single-card?{query}")["html"]
    assert f"{name}.preview.png" in card_html and f"{STEPS} training steps" in card_html, card_html

    with_token, infotext, t2i_info = txt2img(host, f"a photo of {name}")
    file_hash = hashlib.sha256(output.read_bytes()).hexdigest()[:12]
    # one entry per text encoder that saw the token: SDXL's two each append theirs (sd_hijack_clip.py)
    assert ti_hash_entries(infotext) == {f"{name}: {file_hash}"}, infotext
    # (the TI hash above proves the embedding was used; the pixels of a tiny random model are no
    # verdict: uint8 rounding may map different conditionings to the same image)
    after, after_text, _ = txt2img(host, PLAIN_PROMPT)
    assert after == before, "a prompt without the token gives other pixels after training"
    assert "TI hashes" not in after_text and name not in after_text, after_text
    check_log(host)
    assert header["step"] == STEPS and header["sd_checkpoint_name"] == f"tiny-{family}", header
    assert t2i_info["sd_model_hash"] and header["sd_checkpoint"] == t2i_info["sd_model_hash"], (header, t2i_info)
    return {"name": name, "task": info, "embedding": got, "header": header, "infotext": infotext}


def tab_train(host: host_server.Host, name: str, data: Path, steps: int, screenshot: str,
              timings: dict[str, float], preview: dict | None = None) -> dict:
    """Train from the tab (Train -> TI Trainer, as in A1111 and reForge) in headless Chromium;
    returns what the page showed at the end. `preview`: values for the Preview settings fields
    (the card's picture is rendered with them after the run; 512 px is minutes with a full-size VAE)."""
    from playwright import sync_api

    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1600})
            page.route("**/*", lambda route: route.continue_() if route.request.url.startswith(host.url)
                       else route.abort())  # the host is offline; nothing should leave the machine
            page_errors: list[str] = []
            page.on("pageerror", lambda e: page_errors.append(str(e)))
            page.goto(host.url, timeout=60_000)
            page.wait_for_selector("#ti_trainer_token_string", state="attached", timeout=60_000)
            page.click("#tabs > .tab-nav > button:text-is('Train')")
            page.click("#train_tabs > .tab-nav > button:text-is('TI Trainer')")
            page.wait_for_selector("#ti_trainer_token_string", state="visible", timeout=15_000)

            def fill(field: str, value) -> None:
                page.fill(f"#ti_trainer_{field} textarea, #ti_trainer_{field} input", str(value))

            fill("token_string", name)
            fill("train_data_dir", data)
            # the API's submit checks run in the tab: named before the queue, the host's bar ends at once
            fill("init_word", "a castle on a hill")
            page.click("#ti_trainer_train")
            page.wait_for_selector("#ti_trainer_error li[data-field='init_word']", timeout=60_000)
            page.wait_for_selector("#tab_train .progressDiv", state="detached", timeout=20_000)
            fill("init_word", "ball")
            fill("num_vectors_per_token", 2)
            fill("train_data_dir", data)
            fill("resolution", "64")
            fill("max_train_steps", steps)
            fill("learning_rate", "0.05")
            fill("validation_every_n_steps", 0)
            fill("sample_every_n_steps", 0)
            if preview:
                page.get_by_text("Preview settings", exact=True).click()
                page.wait_for_selector("#ti_trainer_preview_width", state="visible", timeout=15_000)
                for field, value in preview.items():
                    fill(field, value)
            t0 = time.time()
            page.click("#ti_trainer_train")

            # the status of *this* run (it names the token): the tab may still show an earlier task's
            status, deadline = (None, 0), time.time() + 180
            while time.time() < deadline:
                status = page.evaluate("""(name) => { const s = document.querySelector('#ti_trainer_status [data-status]');
                    return s && s.textContent.includes(name) ? [s.getAttribute('data-status'), +s.getAttribute('data-step')]
                                                             : [null, 0]; }""", name)
                if status[0] in ("done", "failed", "interrupted"):
                    break
                time.sleep(0.5)
            page.wait_for_function(
                """(name) => { const t = (document.querySelector('#ti_trainer_load_check') || {}).textContent || '';
                    return t.includes('Host load check') && t.includes(name); }""", arg=name, timeout=30_000)
            timings[f"tab train {steps} steps"] = time.time() - t0
            # the host's progress bar (javascript/progressbar.js) goes once /internal/progress says
            # the task completed; then our atEnd clears the "Waiting..." line
            page.wait_for_selector("#tab_train .progressDiv", state="detached", timeout=30_000)
            shown = {"status": status, "progress": page.inner_text("#ti_trainer_progress").strip(),
                     "status_text": page.inner_text("#ti_trainer_status"),
                     "load_check": page.inner_text("#ti_trainer_load_check"),
                     "error": page.inner_text("#ti_trainer_error"), "page_errors": page_errors}
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / screenshot), full_page=True)
        finally:
            browser.close()
    return shown


def check_tab_result(host: host_server.Host, name: str, steps: int, shown: dict, width: int) -> None:
    status = shown["status"]
    assert "Waiting" not in shown["progress"], shown["progress"]
    assert status[0] == "done" and status[1] == steps, (status, shown["status_text"], shown["error"])
    assert "Host load check: ok" in shown["load_check"], shown["load_check"]
    got = host.get("/sdapi/v1/embeddings")["loaded"].get(name)
    assert got is not None and got["vectors"] == 2 and got["shape"] == width, got
    assert not [e for e in shown["page_errors"] if "ti_trainer" in e or "tiTrainer" in e], shown["page_errors"]
    check_log(host)
