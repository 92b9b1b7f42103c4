"""Install from URL in a real A1111 host, the way a user does it (opt-in, like the rest of tests/host):

1. the host's own `install_extension_from_url` (modules/ui_extensions.py, the Extensions tab's
   "Install" button) clones this repository from a local git URL into `<data-dir>/extensions/`
   of a temporary --data-dir (the install's own extensions/ is left alone);
2. the host is started WITHOUT --skip-prepare-environment, so its launcher runs our install.py
   among the extension installers, as on every start;
3. the TI Trainer tab is in the UI, the API trains a tiny run to `done`;
4. `pip freeze` of the host's python is the same before and after: nothing we do moves a pin.

What is cloned is the checkout's committed HEAD (a clone sees no uncommitted change).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import host_server  # noqa: E402  (beside this file)
from test_real_host_e2e import TRAIN, image_folder, install_state, tiny, wait_task  # noqa: E402,F401

HOST = os.environ.get("TI_TRAINER_HOST_DIR", "")
pytestmark = [
    pytest.mark.host,
    pytest.mark.skipif(not HOST, reason="set TI_TRAINER_HOST_DIR to a WebUI root (tests/host/README.md)"),
]


@pytest.fixture(scope="module")
def host_python() -> str:
    py = host_server.find_host_python(HOST)
    if not py:
        pytest.skip("no host python found: set TI_TRAINER_HOST_PYTHON")
    return py


def freeze(python: str) -> list[str]:
    r = subprocess.run([python, "-m", "pip", "freeze", "--all"], capture_output=True, text=True, check=True)
    return sorted(r.stdout.splitlines())


def requirements_without_setuptools_pin(out: Path) -> Path:
    """The host's requirements_versions.txt minus its `setuptools==69.5.1` pin, which torch >= 2.6
    cannot live with (tests/host/README.md). The launcher checks this file (REQS_FILE) on start
    and would otherwise pip-install the whole list again."""
    lines = (Path(HOST) / "requirements_versions.txt").read_text().splitlines()
    out.write_text("\n".join(ln for ln in lines if not ln.lower().startswith("setuptools")) + "\n")
    return out


def test_install_from_url_then_the_launcher_installs_and_the_tab_trains(host_python, tiny, tmp_path):  # noqa: F811
    pins_before, install_before = freeze(host_python), install_state()
    url_repo = tmp_path / "remote" / f"{host_server.EXTENSION_NAME}.git"
    subprocess.run(["git", "clone", "-q", "--bare", str(ROOT), str(url_repo)], check=True)
    data = tmp_path / "data"
    r = subprocess.run([host_python, str(HERE / "install_from_url.py"), "--host-dir", HOST, "--data-dir", str(data),
                        "--url", url_repo.as_uri()], capture_output=True, text=True, timeout=600,
                       env={**os.environ, **host_server.OFFLINE_ENV})
    assert r.returncode == 0 and "INSTALLED" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]
    installed = data / "extensions" / host_server.EXTENSION_NAME
    head = subprocess.run(["git", "-C", str(installed), "rev-parse", "HEAD"], capture_output=True, text=True)
    assert head.stdout.strip() == subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"],
                                                 capture_output=True, text=True).stdout.strip()

    host = host_server.Host(Path(HOST), host_python, tiny, "sd1", data, extension=None, prepare=True,
                            extra_args=("--log-startup",),
                            env={"REQS_FILE": str(requirements_without_setuptools_pin(tmp_path / "reqs.txt"))})
    try:
        host.start(timeout=300)
        log = host.log()
        # --log-startup lists each extension installer the launcher ran
        installers = log.split("run extensions installers:", 1)
        assert len(installers) == 2 and f"{host_server.EXTENSION_NAME}: done in" in installers[1], log[-4000:]
        config = host.get("/config")
        ids = {c.get("props", {}).get("elem_id") for c in config["components"]}
        assert "ti_trainer_tab" in ids and "ti_trainer_train" in ids
        name = "urltok"
        images = image_folder(data / "imgs", name)  # the API reads only the data folder by default
        submitted = host.post("/ti-trainer/v1/train", {**TRAIN, "token_string": name, "train_data_dir": str(images)},
                              expect=202)
        info = wait_task(host, submitted["task_id"])
        assert info["status"] == "done" and info["output"] == f"{name}.safetensors", info  # in the embeddings folder
        assert (data / "embeddings" / info["output"]).is_file()
        problems, _ = host_server.our_problems(host.log())
        assert not problems, "\n\n".join(problems)
    finally:
        host.stop()
    assert freeze(host_python) == pins_before, "the host's packages changed"
    assert install_state() == install_before, "something was written into the install"
