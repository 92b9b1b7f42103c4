"""Opt-in: the adversarial table of tests/api_cases.py against a real A1111 WebUI with the extension.

Skipped unless TI_TRAINER_HOST_DIR names a WebUI root (see tests/host/README.md). Two hosts on the
tiny SD1 checkpoint, each with --data-dir in a temporary folder (the extension is linked into its
extensions/, so nothing is written into the install):

  1. without --api: /ti-trainer/v1/* answer exactly as the host's own absent /sdapi/v1/* routes;
  2. with --api --cors-allow-origins=http://good.example and Settings -> TI Trainer -> "Folders the
     API may read" set to one scratch folder (in config.json before start): every case of the table
     gets its status and names its field, nothing is written or started, no secret and no absolute
     server folder appears in an answer, and outside paths answer alike whether they exist or not.
"""

from __future__ import annotations

import http.client
import json
import os
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
for p in (HERE, HERE.parent):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import api_cases  # noqa: E402  (tests/)
import host_server  # noqa: E402  (beside this file)

HOST = os.environ.get("TI_TRAINER_HOST_DIR", "")
ALLOWED = "http://good.example"
pytestmark = [
    pytest.mark.host,
    pytest.mark.skipif(not HOST, reason="set TI_TRAINER_HOST_DIR to a WebUI root (tests/host/README.md)"),
]


class IsolatedHost(host_server.Host):
    """A host whose data folder is its workdir (settings, extensions, logs), optionally without --api."""

    def __init__(self, *a, api: bool = True, **kw):
        super().__init__(*a, **kw)
        self.api = api
        link = self.workdir / "extensions" / host_server.EXTENSION_NAME
        link.parent.mkdir(exist_ok=True)
        if not os.path.lexists(link):
            os.symlink(ROOT, link, target_is_directory=True)

    def command(self) -> list[str]:
        cmd = [a for a in super().command() if self.api or a != "--api"]
        return [*cmd, "--data-dir", str(self.workdir)]

    def _answers(self, path: str) -> bool:
        return super()._answers(path if self.api else "/internal/ping")

    def send(self, req: api_cases.Req) -> tuple[int, object]:
        """Exactly these headers (urllib would add a form Content-Type to a body without one)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        try:
            conn.request(req.method, req.path, body=req.body, headers=req.headers)
            resp = conn.getresponse()
            status, raw = resp.status, resp.read().decode(errors="replace")
        finally:
            conn.close()
        try:
            return status, json.loads(raw)
        except ValueError:
            return status, raw


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    py = host_server.find_host_python(HOST)
    ckpt = os.environ.get("TI_TRAINER_HOST_CKPT_DIR")
    if not py or not ckpt:
        pytest.skip("set TI_TRAINER_HOST_PYTHON and TI_TRAINER_HOST_CKPT_DIR (tests/host/README.md)")
    return py, Path(ckpt), tmp_path_factory


def test_routes_absent_without_api(setup):
    py, ckpt, tmp = setup
    host = IsolatedHost(Path(HOST), py, ckpt, "sd1", tmp.mktemp("noapi"), api=False)
    try:
        host.start()
        ours, theirs = host.send(api_cases.Req("GET", "/ti-trainer/v1/tasks")), \
            host.send(api_cases.Req("GET", "/sdapi/v1/options"))
        assert ours == theirs and ours[0] == 404, (ours, theirs)
        posted = host.send(api_cases.train()(api_cases.Ctx("", "", "", "", "")))
        assert posted[0] == 404 or posted[0] == 405, posted  # the host's answer to an unknown POST
        assert posted == host.send(api_cases.Req("POST", "/sdapi/v1/txt2img", b"{}",
                                                 {"Content-Type": "application/json"}))
    finally:
        host.stop()


@pytest.fixture(scope="module")
def api_host(setup):
    py, ckpt, tmp = setup
    work = tmp.mktemp("api")
    readable = work / "readable"
    (readable / "scratch").mkdir(parents=True)
    (work / "config.json").write_text(json.dumps({"ti_trainer_api_read_folders": str(readable)}))
    host = IsolatedHost(Path(HOST), py, ckpt, "sd1", work, extra_args=("--cors-allow-origins", ALLOWED))
    sys.path.insert(0, str(HERE.parent))
    from ui_harness import make_dataset

    ctx = api_cases.Ctx(images=str(make_dataset(readable / "imgs", n=2)), inside=str(readable / "scratch"),
                        outside=str(tmp.mktemp("outside")), emb_dir=str(host.embeddings_dir), own_origin=host.url,
                        allowed_origin=ALLOWED)
    os.environ["TI_PWNED"] = str(work / "PWNED")
    api_cases.prepare_files(ctx, width_ok=host_server.context_dim(host.checkpoint.with_suffix(".yaml")))
    try:
        host.start()
        yield host, ctx
    finally:
        host.stop()


@pytest.mark.parametrize("case", api_cases.CASES, ids=lambda c: c.id)
def test_adversarial_in_real_host(api_host, case):
    host, ctx = api_host
    tasks = host.send(api_cases.Req("GET", "/ti-trainer/v1/tasks"))
    before = api_cases.snapshot(ctx, str(host.workdir))
    status, body = host.send(case.make(ctx))
    api_cases.check_answer(case, status, body, server_paths=(str(host.workdir),))
    assert host.send(api_cases.Req("GET", "/ti-trainer/v1/tasks")) == tasks, case.id
    assert api_cases.snapshot(ctx, str(host.workdir)) == before, case.id
    assert not before[1], "an unsafe pickle ran"


def test_no_existence_oracle_in_real_host(api_host):
    host, ctx = api_host
    for key, existing, missing in api_cases.ORACLE_PAIRS:
        answers = []
        for path in (existing(ctx), missing(ctx)):
            body = api_cases.base(ctx, **{key: path, "use_object_template": key != "template_file"})
            status, got = host.send(api_cases.Req("POST", f"{api_cases.V1}/train", json.dumps(body).encode(),
                                                  {"Content-Type": "application/json"}))
            assert status == 422, got
            answers.append(got)
        assert answers[0] == answers[1], (key, answers)


def test_a_valid_run_still_trains_in_real_host(api_host):
    """The checks let a good request through: 202, done, `output` relative to the embeddings folder,
    inspect gives a norm summary; and a browser page of the server's own origin may submit."""
    import time

    host, ctx = api_host
    body = api_cases.base(ctx, token_string="xqzok-ti", output_name="xqzok-ti")
    status, got = host.send(api_cases.Req("POST", f"{api_cases.V1}/train", json.dumps(body).encode(),
                                          {"Content-Type": "application/json", "Origin": host.url}))
    assert status == 202, got
    end = time.time() + 300
    while True:
        status, info = host.send(api_cases.Req("GET", f"{api_cases.V1}/tasks/{got['task_id']}"))
        if info["status"] in ("done", "failed", "interrupted") or time.time() > end:
            break
        time.sleep(0.5)
    assert info["status"] == "done" and info["output"] == "xqzok-ti.safetensors", info
    assert (Path(ctx.emb_dir) / info["output"]).is_file()
    status, summary = host.send(api_cases.Req("GET", f"{api_cases.V1}/inspect/xqzok-ti"))
    assert status == 200 and summary["path"] == "xqzok-ti.safetensors", summary
    assert summary["norms"]["count"] == 2 and summary["step"] == 2, summary
