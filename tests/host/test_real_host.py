"""Opt-in: the adapter (lib_ti/webui/host_model.py) inside a real WebUI install.

Skipped unless TI_TRAINER_HOST_DIR names a WebUI root (see tests/host/README.md). Each case runs
tests/host/check_adapter.py with the host's python on tiny checkpoints written by
make_tiny_checkpoint.py, in a fresh process (a host boots once per process).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
HOST = os.environ.get("TI_TRAINER_HOST_DIR", "")

pytestmark = [
    pytest.mark.host,
    pytest.mark.skipif(not HOST, reason="set TI_TRAINER_HOST_DIR to a WebUI root (tests/host/README.md)"),
]


def host_python() -> str:
    """TI_TRAINER_HOST_PYTHON, else the venv webui.sh makes (HOST/venv) or one beside HOST."""
    explicit = os.environ.get("TI_TRAINER_HOST_PYTHON")
    if explicit:
        return explicit
    for venv in (Path(HOST) / "venv", Path(HOST).parent / "venv"):
        for exe in (venv / "bin" / "python", venv / "Scripts" / "python.exe"):
            if exe.is_file():
                return str(exe)
    pytest.skip("no host python found: set TI_TRAINER_HOST_PYTHON")
    return sys.executable


def run(args: list[str], timeout: int = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run([host_python(), *args], capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny")
    r = run([str(HERE / "make_tiny_checkpoint.py"), "--out", str(out), "--host-dir", HOST, "--family", "sd1", "sd2", "sdxl"])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return out


@pytest.mark.parametrize(("family", "options"), [
    ("sd1", []),
    ("sd1", ["--checkpointing", "--host-arg=--medvram"]),
    ("sdxl", ["--checkpointing"]),
    ("sdxl", ["--host-arg=--medvram-sdxl"]),
    ("sd2", []),
    ("sd2", ["--checkpointing", "--host-arg=--medvram"]),
], ids=["sd1", "sd1-checkpointing-medvram", "sdxl-checkpointing", "sdxl-medvram", "sd2-v", "sd2-v-checkpointing-medvram"])
def test_adapter_in_the_real_host(tiny, tmp_path, family, options):
    r = run([str(HERE / "check_adapter.py"), "--host-dir", HOST, "--tiny-dir", str(tiny), "--family", family,
             "--data-dir", str(tmp_path / "data"), *options])
    out = r.stdout + r.stderr
    failed = [line for line in r.stdout.splitlines() if line.startswith("[FAIL]")]
    assert r.returncode == 0 and not failed, "\n".join(failed) or out[-5000:]
    assert "checks passed" in r.stdout
