"""A real A1111 or reForge WebUI as a subprocess, for the tests in tests/host/.

Nothing here installs or builds the host: it starts an install that already exists
(TI_TRAINER_HOST_DIR, TI_TRAINER_REFORGE_DIR) with that install's python, on a tiny checkpoint,
offline, on the CPU, bound to 127.0.0.1 on a free port, the way tests/host/README.md describes.
The host runs with `--data-dir` in a temporary folder, and the extension is linked into that
folder's `extensions/` (the host reads extensions from `<data-dir>/extensions`): settings,
params.txt, cache, embeddings, models/ and the trainer's textual_inversion/ logs all land there,
and nothing is written into the install. Plain stdlib: urllib for HTTP, so the test needs no extra
package.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

EXTENSION_NAME = "sd-webui-ti-trainer"
REPO = Path(__file__).resolve().parent.parent.parent  # this checkout
# What marks a traceback as ours: the extension's folder, its package, its entry script.
OUR_MARKERS = (EXTENSION_NAME, "lib_ti", "ti_trainer.py", "ti_trainer")
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
               "GRADIO_ANALYTICS_ENABLED": "False", "DO_NOT_TRACK": "1"}


def find_host_python(host_dir: str | Path) -> str | None:
    """TI_TRAINER_HOST_PYTHON, else the venv webui.sh makes (HOST/venv) or one beside HOST."""
    explicit = os.environ.get("TI_TRAINER_HOST_PYTHON")
    if explicit:
        return explicit
    for venv in (Path(host_dir) / "venv", Path(host_dir).parent / "venv"):
        for exe in (venv / "bin" / "python", venv / "Scripts" / "python.exe"):
            if exe.is_file():
                return str(exe)
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def context_dim(yaml_path: Path) -> int:
    """The UNet's cross-attention width from a checkpoint's .yaml: the text width the host reports
    as an embedding's `shape` (SD1: CLIP-L; SDXL: CLIP-L + CLIP-G)."""
    m = re.search(r"^\s*context_dim:\s*(\d+)", yaml_path.read_text(), re.M)
    if not m:
        raise ValueError(f"no context_dim in {yaml_path}")
    return int(m.group(1))


# The host reports its own failures as `*** <what>` + an indented traceback + `---`
# (modules/errors.py: report). This one is the host's Extensions tab reading git metadata of a
# checkout that has no 'origin' remote (a local clone or a symlinked working tree): harmless, and
# not the extension's code. A checkout cloned from GitHub does not print it.
HOST_NOISE = ("Failed reading extension data from Git repository",)


def incidents(log: str) -> list[str]:
    """The log's error reports: each `*** ...` block up to its `---`, and each bare
    `Traceback ...` block up to its exception line (the first unindented line after it)."""
    found, lines, i = [], log.splitlines(), 0
    while i < len(lines):
        line = lines[i]
        if "*** " in line:
            j = i + 1
            while j < len(lines) and j < i + 400 and lines[j].strip() != "---":
                j += 1
            found.append("\n".join(lines[i:j + 1]))
            i = j + 1
            continue
        if "Traceback (most recent call last)" in line:
            j = i + 1
            while j < len(lines) and j < i + 400:
                nxt = lines[j]
                j += 1
                if nxt and not nxt.startswith((" ", "\t")) and "Traceback" not in nxt:
                    break
            found.append("\n".join(lines[i:j]))
            i = j
            continue
        i += 1
    return found


def our_problems(log: str) -> tuple[list[str], list[str]]:
    """(problems, tolerated): error reports that mention the extension, split into real ones and
    the known host noise above; plus any other log line that names us next to 'error'."""
    problems, tolerated = [], []
    for block in incidents(log):
        if any(m in block for m in OUR_MARKERS):
            (tolerated if any(n in block for n in HOST_NOISE) else problems).append(block)
    for line in log.splitlines():
        low = line.lower()
        if ("error" in low or "exception" in low) and any(m in line for m in OUR_MARKERS) \
                and not any(n in line for n in HOST_NOISE) and not any(line in b for b in problems):
            problems.append(line)
    return problems, tolerated


# A1111: "Model loaded in 2.1s"; reForge: "Model tiny-sd1.safetensors [abc123] loaded in 9.8s"
MODEL_LOADED = re.compile(r"^Model (.+ )?loaded in ", re.M)


class HttpError(AssertionError):
    def __init__(self, status: int, body: str, url: str):
        super().__init__(f"HTTP {status} from {url}: {body[:2000]}")
        self.status, self.body = status, body


class Host:
    """One running WebUI. `start()` returns once the API answers, our routes exist and the
    checkpoint has loaded; `stop()` ends the whole process group (always call it)."""

    def __init__(self, host_dir: Path, python: str, ckpt_dir: Path, family: str, workdir: Path,
                 extra_args: tuple[str, ...] = (), extension: Path | None = REPO, prepare: bool = False,
                 env: dict[str, str] | None = None):
        self.host_dir, self.python, self.ckpt_dir, self.family = Path(host_dir), python, Path(ckpt_dir), family
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.embeddings_dir = self.workdir / "embeddings"
        self.embeddings_dir.mkdir(exist_ok=True)
        self.log_path = self.workdir / "host.log"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.extra_args = tuple(extra_args)
        self.extension = extension  # linked into <workdir>/extensions/; None: already installed there
        self.prepare = prepare  # run the launcher's prepare_environment (extension installers) too
        self.env = dict(env or {})
        self.proc: subprocess.Popen | None = None
        self._log_file = None
        self.startup_s: float | None = None

    @property
    def models_dir(self) -> Path:
        return self.ckpt_dir / "models" / "Stable-diffusion"

    @property
    def checkpoint(self) -> Path:
        return self.models_dir / f"tiny-{self.family}.safetensors"

    def command(self) -> list[str]:
        return [
            self.python, "launch.py", *(() if self.prepare else ("--skip-prepare-environment",)),
            "--skip-torch-cuda-test", "--use-cpu", "all", "--data-dir", str(self.workdir),
            "--no-half", "--precision", "full", "--api", "--server-name", "127.0.0.1", "--port", str(self.port),
            "--no-download-sd-model", "--ckpt-dir", str(self.models_dir), "--ckpt", str(self.checkpoint),
            "--embeddings-dir", str(self.embeddings_dir),
            "--ui-settings-file", str(self.workdir / "config.json"),
            "--ui-config-file", str(self.workdir / "ui-config.json"),
            *self.extra_args,
        ]

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def start(self, timeout: float = 180) -> Host:
        env = {k: v for k, v in os.environ.items() if k != "COMMANDLINE_ARGS"}  # launch.py appends those
        env.update(OFFLINE_ENV, HF_HOME=str(self.ckpt_dir / "hf-home"), **self.env)
        if self.extension is not None:
            link = self.workdir / "extensions" / EXTENSION_NAME
            link.parent.mkdir(exist_ok=True)
            if not os.path.lexists(link):
                os.symlink(self.extension, link, target_is_directory=True)
        # Output to a file: an unread pipe fills up and then blocks the server mid-run.
        self._log_file = open(self.log_path, "w")  # noqa: SIM115 (closed in stop)
        t0 = time.time()
        self.proc = subprocess.Popen(self.command(), cwd=self.host_dir, env=env, stdout=self._log_file,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        deadline = t0 + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the host exited with {self.proc.returncode}:\n{self.log()[-6000:]}")
            log = self.log()
            # No request before "Startup time:": an early one makes starlette build its middleware
            # stack, and the host's create_api then dies with "Cannot add middleware after an
            # application has started".
            if MODEL_LOADED.search(log) and "Startup time:" in log and self._answers("/ti-trainer/v1/tasks"):
                self.startup_s = time.time() - t0
                return self
            time.sleep(0.5)
        raise TimeoutError(f"the host did not come up in {timeout:.0f} s:\n{self.log()[-6000:]}")

    def _answers(self, path: str) -> bool:
        try:
            with urllib.request.urlopen(self.url + path, timeout=5) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def stop(self) -> None:
        proc = self.proc
        if proc is not None and proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)  # our own session: launch.py and anything it started
            except ProcessLookupError:
                pass
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait(timeout=10)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    # ------------------------------------------------------------ HTTP

    def request(self, method: str, path: str, body: Any = None, timeout: float = 300) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"} if data else {})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                raw, status = r.read().decode(), r.status
        except urllib.error.HTTPError as e:
            raw, status = e.read().decode(errors="replace"), e.code
        try:
            return status, json.loads(raw) if raw else None
        except json.JSONDecodeError:
            return status, raw

    def get(self, path: str, expect: int = 200, **kw: Any) -> Any:
        status, body = self.request("GET", path, **kw)
        if status != expect:
            raise HttpError(status, json.dumps(body) if not isinstance(body, str) else body, path)
        return body

    def post(self, path: str, body: Any, expect: int = 200, **kw: Any) -> Any:
        status, got = self.request("POST", path, body, **kw)
        if status != expect:
            raise HttpError(status, json.dumps(got) if not isinstance(got, str) else got, path)
        return got
