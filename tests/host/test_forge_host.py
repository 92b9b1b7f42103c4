"""Opt-in checks in a real Forge 2 (lllyasviel/stable-diffusion-webui-forge, dfdcbab6 or newer) on
the CPU with a tiny SD1.5-shaped checkpoint (make_tiny_forge_checkpoint.py). Skipped unless
TI_TRAINER_FORGE_DIR points at a Forge root whose python (TI_TRAINER_FORGE_PYTHON, default
FORGE/venv or FORGE/../venv) has Forge's requirements. Nothing here installs Forge.

  1. check_forge_adapter.py in-process: gradients vs an out-of-place reference and a finite
     difference, every weight object / flag / value and db back afterwards, txt2img bit-identical,
     the weights held once during the run; the same on an SD2 v-prediction checkpoint (~1 GB,
     built unless TI_TRAINER_FORGE_SD2_CKPT names one); an inpainting (9-channel) one is refused.
  2. Over HTTP, the extension installed in Forge's extensions folder: POST /ti-trainer/v1/train ends
     done, /sdapi/v1/embeddings lists it, the next txt2img with the token names it (`TI: name`) and
     changes, a prompt without it is bit-identical.
  3. The top-level TI Trainer tab trains in headless Chromium (if chromium and playwright exist).

    TI_TRAINER_FORGE_DIR=/work/forge/webui .venv/bin/python -m pytest -q tests/host/test_forge_host.py
"""

from __future__ import annotations

import base64
import io
import json
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path.insert(0, str(HERE))
import host_server  # noqa: E402

FORGE = os.environ.get("TI_TRAINER_FORGE_DIR", "")
CHROMIUM = "/usr/bin/chromium"
TRAIN = {"init_word": "ball", "num_vectors_per_token": 2, "resolution": "64", "max_train_steps": 10,
         "learning_rate": "0.05", "validation_every_n_steps": 0, "sample_every_n_steps": 0, "seed": 3}
TXT2IMG = {"steps": 4, "width": 64, "height": 64, "seed": 1234, "sampler_name": "Euler", "cfg_scale": 7.0}
PLAIN_PROMPT = "a photo of a red cat"

pytestmark = [
    pytest.mark.host,
    pytest.mark.skipif(not FORGE, reason="set TI_TRAINER_FORGE_DIR to a Forge root (tests/host/README.md)"),
]


def forge_python() -> str:
    explicit = os.environ.get("TI_TRAINER_FORGE_PYTHON")
    found = explicit or host_server.find_host_python(FORGE)
    if not found:
        pytest.skip(f"no python for Forge at {FORGE} (set TI_TRAINER_FORGE_PYTHON)")
    return found


class ForgeHost(host_server.Host):
    """Forge as a subprocess: --data-dir in the work folder (settings, and extensions/ with this
    checkout linked in), CPU only, offline. Forge builds the model at the first generation."""

    def __init__(self, python: str, ckpt: Path, workdir: Path):
        super().__init__(Path(FORGE), python, ckpt.parent, "sd1", workdir)
        self.ckpt = ckpt
        ext = self.workdir / "extensions"
        ext.mkdir(exist_ok=True)
        (ext / host_server.EXTENSION_NAME).symlink_to(REPO, target_is_directory=True)

    @property
    def checkpoint(self) -> Path:
        return self.ckpt

    def command(self) -> list[str]:
        # Forge's default CPU attention (sub-quadratic, in place), so the adapter's swap is exercised
        return [self.python, "launch.py", "--skip-prepare-environment", "--skip-install",
                "--skip-python-version-check", "--skip-version-check", "--skip-torch-cuda-test", "--always-cpu",
                "--api", "--server-name", "127.0.0.1", "--port", str(self.port), "--no-download-sd-model",
                "--data-dir", str(self.workdir), "--embeddings-dir", str(self.embeddings_dir),
                # with --data-dir elsewhere, gradio 4 answers 403 for Forge's own javascript/ unless allowed
                "--gradio-allowed-path", str(self.host_dir),
                "--ckpt-dir", str(self.ckpt.parent), "--ckpt", str(self.ckpt)]

    def start(self, timeout: float = 240) -> ForgeHost:
        env = {k: v for k, v in os.environ.items() if k != "COMMANDLINE_ARGS"}
        env.update(host_server.OFFLINE_ENV)
        self._log_file = open(self.log_path, "w")  # noqa: SIM115 (closed in stop)
        t0 = time.time()
        self.proc = subprocess.Popen(self.command(), cwd=self.host_dir, env=env, stdout=self._log_file,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        while time.time() < t0 + timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"Forge exited with {self.proc.returncode}:\n{self.log()[-6000:]}")
            if "Startup time:" in self.log() and self._answers("/ti-trainer/v1/tasks"):
                self.startup_s = time.time() - t0
                return self
            time.sleep(0.5)
        raise TimeoutError(f"Forge did not come up in {timeout:.0f} s:\n{self.log()[-6000:]}")


def make_ckpt(tmp_path_factory, env_var: str, name: str, *args: str) -> Path:
    given = os.environ.get(env_var)
    if given:
        return Path(given)
    out = tmp_path_factory.mktemp("forge-ckpt") / name
    subprocess.run([forge_python(), str(HERE / "make_tiny_forge_checkpoint.py"), "--forge-dir", FORGE, "--out",
                    str(out), *args], cwd=FORGE, check=True, env={**os.environ, **host_server.OFFLINE_ENV})
    return out


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> Path:
    return make_ckpt(tmp_path_factory, "TI_TRAINER_FORGE_CKPT", "tiny-forge-sd15.safetensors")


@pytest.fixture(scope="module")
def forge(tiny_ckpt, tmp_path_factory):
    host = ForgeHost(forge_python(), tiny_ckpt, tmp_path_factory.mktemp("forge-host"))
    try:
        yield host.start()
    finally:
        host.stop()


def image_folder(path: Path, token: str, n: int = 3) -> Path:
    from PIL import Image, ImageDraw

    path.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        img = Image.new("RGB", (80, 80), (235, 235, 230))
        ImageDraw.Draw(img).ellipse((12 + 3 * i, 14, 66, 68 - 2 * i), fill=(200, 40 + 40 * i, 40))
        img.save(path / f"img{i}.png")
        (path / f"img{i}.txt").write_text(f"a photo of {token}, a ball")
    return path


def txt2img(host: ForgeHost, prompt: str) -> tuple[bytes, str]:
    from PIL import Image

    r = host.post("/sdapi/v1/txt2img", {**TXT2IMG, "prompt": prompt})
    img = Image.open(io.BytesIO(base64.b64decode(r["images"][0].split(",", 1)[-1]))).convert("RGB")
    return img.tobytes(), json.loads(r["info"])["infotexts"][0]


def wait_task(host: ForgeHost, task_id: str, timeout: float = 300) -> dict:
    deadline, info = time.time() + timeout, {}
    while time.time() < deadline:
        info = host.get(f"/ti-trainer/v1/tasks/{task_id}")
        if info["status"] in ("done", "failed", "interrupted"):
            return info
        time.sleep(0.5)
    raise AssertionError(f"task {task_id} did not finish in {timeout} s: {info}\n{host.log()[-4000:]}")


def check_adapter(ckpt: Path, tmp_path: Path, *args: str) -> dict:
    env = {**os.environ, **host_server.OFFLINE_ENV}
    out = tmp_path / "result.json"
    run = subprocess.run([forge_python(), str(HERE / "check_forge_adapter.py"), "--ckpt", str(ckpt),
                          "--data-dir", str(tmp_path / "data"), "--result", str(out), *args], cwd=FORGE, env=env,
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0 and out.is_file(), (run.stdout[-4000:], run.stderr[-6000:])
    result = json.loads(out.read_text())
    print(f"\nforge adapter: {json.dumps(result)}")
    return result


def test_adapter_inside_forge(tiny_ckpt, tmp_path):
    result = check_adapter(tiny_ckpt, tmp_path, "--prediction", "epsilon")
    assert result["plain_bit_identical"] and result["preview_infotext_ti"]
    assert result["family"] == "sd1" and max(result["memory"]["extra_during_run_mib"]) < 20, result


def test_adapter_inside_forge_sd2_v(tmp_path_factory, tmp_path):
    """An SD2 v-prediction checkpoint (~1 GB, with the .yaml Forge needs to read v, see
    make_tiny_forge_checkpoint.build_sd2): the same checks, in v mode."""
    ckpt = make_ckpt(tmp_path_factory, "TI_TRAINER_FORGE_SD2_CKPT", "tiny-forge-sd2.safetensors", "--family", "sd2")
    result = check_adapter(ckpt, tmp_path, "--prediction", "v_prediction")
    assert result["family"] == "sd2" and result["plain_bit_identical"] and result["preview_infotext_ti"], result


def test_inpainting_model_is_refused_inside_forge(tmp_path_factory, tmp_path):
    ckpt = make_ckpt(tmp_path_factory, "TI_TRAINER_FORGE_INPAINT_CKPT", "tiny-forge-sd15-inpaint.safetensors",
                     "--inpaint")
    result = check_adapter(ckpt, tmp_path, "--refusal", "inpainting model")
    assert result["is_inpaint"], result


def test_api_train_then_forge_uses_it(forge, tmp_path):
    name = f"fgapi{secrets.token_hex(3)}"
    data = image_folder(forge.workdir / "datasets" / name, name)  # inside what the API may read
    plain, _ = txt2img(forge, PLAIN_PROMPT)
    token_before, text_before = txt2img(forge, f"a photo of {name}")
    assert "TI:" not in text_before
    t0 = time.time()
    preview = {"prompt": f"a photo of {name}", "steps": 2, "width": 64, "height": 64, "seed": 1}
    task = forge.post("/ti-trainer/v1/train", {**TRAIN, "token_string": name, "train_data_dir": str(data),
                                               "sample_every_n_steps": 5, "preview": preview}, expect=202)
    info = wait_task(forge, task["task_id"])
    print(f"\nforge api: {TRAIN['max_train_steps']} steps in {time.time() - t0:.1f} s: {info}")
    assert info["status"] == "done" and info["step"] == TRAIN["max_train_steps"], info
    assert Path(info["output"]).name == f"{name}.safetensors", info  # the API names it relative to the folder
    assert (forge.embeddings_dir / f"{name}.safetensors").is_file()
    previews = sorted((forge.workdir / "textual_inversion").rglob(f"{name}-*.png"))
    assert len(previews) == 2, previews  # steps 5 and 10, through Forge's txt2img with the live vectors
    listed = forge.get("/sdapi/v1/embeddings")["loaded"].get(name)  # the API's own db, reloaded
    assert listed is not None and listed["vectors"] == 2 and listed["shape"] == 768, listed
    with_token, infotext = txt2img(forge, f"a photo of {name}")
    assert f"TI: {name}" in infotext, infotext  # Forge's engines use it without a refresh
    assert with_token != token_before
    after, after_text = txt2img(forge, PLAIN_PROMPT)
    assert after == plain, "a prompt without the token gives other pixels after training"
    assert "TI:" not in after_text, after_text
    problems, _ = host_server.our_problems(forge.log())
    assert not problems, "\n\n".join(problems)


def test_tab_trains_in_forge(forge, tmp_path):
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api")
    name = f"fgtab{secrets.token_hex(3)}"
    data = image_folder(forge.workdir / "datasets" / name, name)  # inside what the API may read
    steps = 6
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1600})
            page.route("**/*", lambda route: route.continue_() if route.request.url.startswith(forge.url)
                       else route.abort())  # offline: nothing may leave the machine
            page.goto(forge.url, timeout=120_000)
            page.wait_for_selector("#ti_trainer_token_string", state="attached", timeout=120_000)
            page.click("#tabs > .tab-nav > button:text-is('TI Trainer')")
            page.wait_for_selector("#ti_trainer_token_string", state="visible", timeout=15_000)
            assert page.query_selector("#ti_trainer_fallback") is None

            def fill(field: str, value) -> None:
                page.fill(f"#ti_trainer_{field} textarea, #ti_trainer_{field} input", str(value))

            for field, value in {**TRAIN, "token_string": name, "train_data_dir": data,
                                 "max_train_steps": steps}.items():
                if field != "seed":
                    fill(field, value)
            # small previews: after the run the card renders one with these settings (512 px is minutes on a CPU)
            page.get_by_text("Preview settings", exact=True).click()
            page.wait_for_selector("#ti_trainer_preview_width", state="visible", timeout=15_000)
            for field, value in {"preview_width": 64, "preview_height": 64, "preview_steps": 2}.items():
                fill(field, value)
            page.click("#ti_trainer_train")
            # a second click while the first run holds the name is answered at once (gradio 4 would
            # otherwise queue it silently behind the whole first run)
            page.wait_for_function("() => !!document.querySelector('#ti_trainer_status [data-status]')",
                                   timeout=60_000)
            page.click("#ti_trainer_train")
            page.wait_for_function(
                "() => (document.querySelector('#ti_trainer_error') || {}).textContent?.includes('already queued')",
                timeout=30_000)
            status, deadline = (None, 0), time.time() + 300
            while time.time() < deadline:
                status = page.evaluate("""() => { const s = document.querySelector('#ti_trainer_status [data-status]');
                    return s ? [s.getAttribute('data-status'), +s.getAttribute('data-step')] : [null, 0]; }""")
                if status[0] in ("done", "failed", "interrupted"):
                    break
                time.sleep(0.5)
            page.wait_for_function(
                "() => (document.querySelector('#ti_trainer_load_check') || {}).textContent?.includes('load check')",
                timeout=60_000)
            load_check = page.inner_text("#ti_trainer_load_check")
            error_text = page.inner_text("#ti_trainer_error")
            shots = REPO / "artifacts"
            shots.mkdir(exist_ok=True)
            page.screenshot(path=str(shots / "forge-tab.png"), full_page=True)
        finally:
            browser.close()
    print(f"\nforge tab: status={status} load_check={load_check!r}")
    assert status[0] == "done" and status[1] == steps, (status, error_text)
    assert "ok" in load_check.lower() and "loaded by Forge" in load_check, load_check
    _, infotext = txt2img(forge, f"a photo of {name}")
    assert f"TI: {name}" in infotext, infotext
