"""Opt-in: the whole extension inside a real A1111 WebUI, end to end.

Skipped unless TI_TRAINER_HOST_DIR names a WebUI root (see tests/host/README.md). The host's
python comes from TI_TRAINER_HOST_PYTHON or HOST/venv or HOST/../venv; the tiny checkpoints from
TI_TRAINER_HOST_CKPT_DIR (the --out folder of make_tiny_checkpoint.py) or are written here by it.

Each host runs on a free port on 127.0.0.1 with `--data-dir` in a temporary folder and this
checkout linked into that folder's extensions/ (tests/host/host_server.py): nothing is written into
the install, which the module checks (`git status --ignored` before and after).

  1. the host starts with the extension and its log has no traceback that involves it;
  2. SD1 over HTTP: POST /ti-trainer/v1/train on a generated image folder, poll to done; the host
     lists the embedding (vectors, width); txt2img with the token names it in the infotext, and
     a prompt without it gives the very same pixels as before training; the card's picture and
     facts are beside the file and in the host's own card;
  3. SD1 in the browser: Train -> TI Trainer, fill the form, Train, wait for the tab to say done
     and that the host loaded the file; screenshot to artifacts/real-host-tab.png;
  4. SDXL (when its tiny checkpoint exists) over HTTP as in 2.
  5. SD2 768-v style (v-prediction, OpenCLIP text encoder, penultimate layer; when its tiny
     checkpoint exists) over HTTP as in 2.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import host_e2e  # noqa: E402  (beside this file)
import host_server  # noqa: E402
from host_e2e import (  # noqa: E402,F401
    CHROMIUM,
    TRAIN,
    Hosts,
    api_round_trip,
    image_folder,
    new_name,
    wait_task,
)

HOST = os.environ.get("TI_TRAINER_HOST_DIR", "")

pytestmark = [
    pytest.mark.host,
    pytest.mark.skipif(not HOST, reason="set TI_TRAINER_HOST_DIR to a WebUI root (tests/host/README.md)"),
]


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def host_python() -> str:
    py = host_server.find_host_python(HOST)
    if not py:
        pytest.skip("no host python found: set TI_TRAINER_HOST_PYTHON")
    return py


@pytest.fixture(scope="module")
def tiny(host_python, tmp_path_factory) -> Path:
    """The tiny checkpoints + offline HF cache: TI_TRAINER_HOST_CKPT_DIR, else written now."""
    given = os.environ.get("TI_TRAINER_HOST_CKPT_DIR")
    if given:
        if not (Path(given) / "models" / "Stable-diffusion" / "tiny-sd1.safetensors").is_file():
            pytest.fail(f"TI_TRAINER_HOST_CKPT_DIR={given} has no models/Stable-diffusion/tiny-sd1.safetensors")
        return Path(given)
    out = tmp_path_factory.mktemp("tiny")
    env = {**os.environ, **host_server.OFFLINE_ENV}
    r = subprocess.run([host_python, str(HERE / "make_tiny_checkpoint.py"), "--out", str(out), "--host-dir", HOST,
                        "--family", "sd1", "sd2", "sdxl"], capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return out


def install_state() -> list[str]:
    """git's view of the install (test_install_from_url.py compares it too)."""
    return host_e2e.install_state(HOST)


@pytest.fixture(scope="module")
def hosts(host_python, tiny, tmp_path_factory):
    pool = Hosts(HOST, host_python, tiny, tmp_path_factory.mktemp("hosts"))
    before = install_state()
    try:
        yield pool
    finally:
        pool.stop()
        print("\ntimings:", json.dumps({k: round(v, 1) for k, v in pool.timings.items()}))
    after = install_state()
    assert after == before, f"the tests wrote into the install: {sorted(set(after) - set(before))}"


# ---------------------------------------------------------------- tests


def test_sd1_api_train_then_the_host_uses_it(hosts, tmp_path):
    out = api_round_trip(hosts, "sd1", tmp_path)
    print(f"\nsd1 api: {json.dumps(out, default=str)}")


def test_sd1_tab_train_in_the_browser(hosts, tmp_path):
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium)")
    pytest.importorskip("playwright.sync_api")
    host = hosts.get("sd1")
    name = new_name(hosts, "sd1tab")
    data = image_folder(tmp_path / "data", name)
    steps = 8
    shown = host_e2e.tab_train(host, name, data, steps, "real-host-tab.png", hosts.timings)
    print(f"\nsd1 tab: {shown}")
    host_e2e.check_tab_result(host, name, steps, shown, host_server.context_dim(host.checkpoint.with_suffix(".yaml")))


def test_sdxl_api_train_then_the_host_uses_it(hosts, tmp_path):
    out = api_round_trip(hosts, "sdxl", tmp_path)
    print(f"\nsdxl api: {json.dumps(out, default=str)}")


def test_sd2_v_api_train_then_the_host_uses_it(hosts, tmp_path):
    out = api_round_trip(hosts, "sd2", tmp_path)
    print(f"\nsd2 api: {json.dumps(out, default=str)}")
