"""Opt-in: the extension in a real reForge (Panchovix/stable-diffusion-webui-reForge, main 3b56b268
or newer) on the CPU. reForge keeps A1111's model shell, embedding db, API, infotext and Train tab
over a Forge-1 backend (ldm_patched), so the A1111 adapter runs there; these tests prove it.

Skipped unless TI_TRAINER_REFORGE_DIR names a reForge root. Its python: TI_TRAINER_REFORGE_PYTHON,
else DIR/venv or DIR/../venv. Tiny checkpoints: TI_TRAINER_REFORGE_CKPT_DIR (a folder with
models/Stable-diffusion/tiny-sd1.safetensors, optionally tiny-sdxl.safetensors, and hf-home/), else
make_tiny_reforge_checkpoint.py writes the SD1 one (SDXL is ~2.6 GB: only when given).

  1. check_adapter.py in-process (reForge boots through its initialize_forge): SD1 with gradient
     checkpointing (the ldm_patched blocks; same gradient as without) and --medvram (a flag reForge
     ignores), SDXL with checkpointing when its checkpoint exists; both after a generation and with
     the weights made inference tensors first, as a GPU load under inference_mode leaves them.
  2. reForge as a server, this checkout linked into <data-dir>/extensions: POST /ti-trainer/v1/train
     ends done, /sdapi/v1/embeddings lists it (vectors, width), the next txt2img names it in
     `TI hashes` without a refresh, a prompt without it is bit-identical before and after (SD1;
     SDXL when its checkpoint exists).
  3. The tab (Train -> TI Trainer) trains in headless Chromium (SD1).
  Afterwards `git status --ignored` of the install is as before.

    TI_TRAINER_REFORGE_DIR=/path/to/reforge .venv/bin/python -m pytest -q -s tests/host/test_reforge_host.py
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

REFORGE = os.environ.get("TI_TRAINER_REFORGE_DIR", "")
# --always-cpu: reForge's device choice (ldm_patched); --use-cpu all only covers the A1111 side
CPU_ARGS = ("--always-cpu",)
WIDTH = {"sd1": 768, "sdxl": 2048}  # reForge detects full-size text encoders only (CLIP-L, + CLIP-G)

pytestmark = [
    pytest.mark.host,
    pytest.mark.skipif(not REFORGE, reason="set TI_TRAINER_REFORGE_DIR to a reForge root (tests/host/README.md)"),
]


@pytest.fixture(scope="module")
def reforge_python() -> str:
    explicit = os.environ.get("TI_TRAINER_REFORGE_PYTHON")
    for exe in ([Path(explicit)] if explicit else
                [Path(REFORGE) / "venv" / "bin" / "python", Path(REFORGE).parent / "venv" / "bin" / "python"]):
        if exe.is_file():
            return str(exe)
    pytest.skip(f"no python for reForge at {REFORGE} (set TI_TRAINER_REFORGE_PYTHON)")
    return ""


@pytest.fixture(scope="module")
def tiny(reforge_python, tmp_path_factory) -> Path:
    given = os.environ.get("TI_TRAINER_REFORGE_CKPT_DIR")
    if given:
        if not (Path(given) / "models" / "Stable-diffusion" / "tiny-sd1.safetensors").is_file():
            pytest.fail(f"TI_TRAINER_REFORGE_CKPT_DIR={given} has no models/Stable-diffusion/tiny-sd1.safetensors")
        return Path(given)
    out = tmp_path_factory.mktemp("reforge-tiny")
    r = subprocess.run([reforge_python, str(HERE / "make_tiny_reforge_checkpoint.py"), "--reforge-dir", REFORGE,
                        "--out", str(out)], capture_output=True, text=True, timeout=900,
                       env={**os.environ, **host_server.OFFLINE_ENV})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def install_before():
    return host_e2e.install_state(REFORGE)


@pytest.fixture(scope="module")
def hosts(reforge_python, tiny, install_before, tmp_path_factory):
    # live previews off: with --data-dir, reForge downloads its preview decoder (VAE-approx) for SD1 too
    pool = host_e2e.Hosts(REFORGE, reforge_python, tiny, tmp_path_factory.mktemp("reforge-hosts"), label="reforge",
                          extra_args=CPU_ARGS, settings={"live_previews_enable": False})
    try:
        yield pool
    finally:
        pool.stop()
        print("\ntimings:", json.dumps({k: round(v, 1) for k, v in pool.timings.items()}))
    after = host_e2e.install_state(REFORGE)
    assert after == install_before, f"the tests wrote into the install: {sorted(set(after) - set(install_before))}"


# --inference-weights: as after a generation on a GPU (reForge moves weights under inference_mode)
@pytest.mark.parametrize(("family", "options"), [
    ("sd1", ["--checkpointing", "--host-arg=--medvram", "--inference-weights"]),
    ("sdxl", ["--checkpointing", "--inference-weights"]),
], ids=["sd1-checkpointing-medvram-inference-weights", "sdxl-checkpointing-inference-weights"])
def test_adapter_in_reforge(reforge_python, tiny, install_before, tmp_path, family, options):
    if not (tiny / "models" / "Stable-diffusion" / f"tiny-{family}.safetensors").is_file():
        pytest.skip(f"no tiny {family} checkpoint in {tiny}")
    r = subprocess.run([reforge_python, str(HERE / "check_adapter.py"), "--host-dir", REFORGE, "--tiny-dir", str(tiny),
                        "--family", family, "--data-dir", str(tmp_path / "data"),
                        *(f"--host-arg={a}" for a in CPU_ARGS), *options],
                       capture_output=True, text=True, timeout=1800, env={**os.environ, **host_server.OFFLINE_ENV})
    failed = [line for line in r.stdout.splitlines() if line.startswith("[FAIL]")]
    print("\n" + "\n".join(line for line in r.stdout.splitlines() if line.startswith(("[", "=="))))
    assert r.returncode == 0 and not failed, "\n".join(failed) or (r.stdout + r.stderr)[-5000:]
    assert "checks passed" in r.stdout
    assert host_e2e.install_state(REFORGE) == install_before, "check_adapter.py wrote into the install"


def test_sd1_api_train_then_reforge_uses_it(hosts, tmp_path):
    out = host_e2e.api_round_trip(hosts, "sd1", tmp_path, width=WIDTH["sd1"])
    print(f"\nreforge sd1 api: {json.dumps(out, default=str)}")


def test_sd1_tab_trains_in_reforge(hosts, tmp_path):
    if not os.path.exists(host_e2e.CHROMIUM):
        pytest.skip(f"{host_e2e.CHROMIUM} is missing (apt-get install chromium)")
    pytest.importorskip("playwright.sync_api")
    host = hosts.get("sd1")
    name = host_e2e.new_name(hosts, "sd1tab")
    data = host_e2e.image_folder(tmp_path / "data", name)
    steps = 8
    small = {"preview_width": 64, "preview_height": 64, "preview_steps": 2}  # the card's picture after the run
    shown = host_e2e.tab_train(host, name, data, steps, "reforge-tab.png", hosts.timings, preview=small)
    print(f"\nreforge sd1 tab: {shown}")
    host_e2e.check_tab_result(host, name, steps, shown, WIDTH["sd1"])
    _, infotext, _ = host_e2e.txt2img(host, f"a photo of {name}")
    assert {e.split(":")[0] for e in host_e2e.ti_hash_entries(infotext)} == {name}, infotext


def test_sdxl_api_train_then_reforge_uses_it(hosts, tmp_path):
    out = host_e2e.api_round_trip(hosts, "sdxl", tmp_path, width=WIDTH["sdxl"])
    print(f"\nreforge sdxl api: {json.dumps(out, default=str)}")
