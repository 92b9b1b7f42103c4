"""The /ti-trainer/v1 routes on a FastAPI app inside the stand-in host (tests/fakehost) with a tiny
SD1 model: the route contract, 422s that name every bad field, auth as --api-auth asks, interrupt,
path rules, and two requests queueing one behind the other on the host's queue lock."""

from __future__ import annotations

import base64
import os
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import fake_host_modules

pytestmark = pytest.mark.slow
TESTS = Path(__file__).resolve().parent
V1 = "/ti-trainer/v1"


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    """The stand-in host in sys.modules (tiny SD1 model loaded) for this module's tests, then the
    module table and sys.path exactly as before, so no fake `modules` leaks into other tests."""
    with fake_host_modules() as fakehost:
        modules = fakehost.install(data_dir=str(tmp_path_factory.mktemp("webui")), family="sd1")
        _nonzero_final_norm(modules.shared.sd_model)
        modules.shared.cmd_opts.api = True  # the routes exist only with --api or --nowebui
        try:
            yield modules
        finally:
            modules.shared.cmd_opts.api = False


def _nonzero_final_norm(sd_model) -> None:
    """A random tiny CLIP whose final LayerNorm is the identity (bias 0) gives zero-mean prompt
    conditioning, and the host's emphasis step `z * (mean / z.mean())` then divides 0 by 0 (NaN).
    Real checkpoints have a bias; give the tiny one a small one if the stand-in left it at zero."""
    norm = sd_model.cond_stage_model.wrapped.transformer.text_model.final_layer_norm
    if not norm.bias.detach().abs().sum():
        with torch.no_grad():
            norm.bias.copy_(torch.linspace(0.0, 0.5, norm.bias.numel()))


@pytest.fixture(scope="module")
def client(host):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from lib_ti.webui import api, entry

    app = FastAPI()
    entry.on_app_started(None, app)  # what the host calls (--nowebui: no gradio demo)
    n = len(app.routes)
    api.register(app)  # a second call for the same app adds nothing
    assert len(app.routes) == n
    with TestClient(app) as c:
        yield c


@pytest.fixture(scope="module")
def images(host):
    """A dataset inside the WebUI data folder, which the API may read by default."""
    sys.path.insert(0, str(TESTS))
    try:
        from ui_harness import make_dataset
    finally:
        sys.path.remove(str(TESTS))
    return str(make_dataset(Path(host.paths_internal.data_path) / "datasets" / "imgs", n=2))


@pytest.fixture(autouse=True)
def no_auth(host):
    host.shared.cmd_opts.api_auth = None
    yield
    host.shared.cmd_opts.api_auth = None


def emb_dir() -> Path:
    from lib_ti.webui import host_model

    return Path(host_model.embeddings_dir())


def body(images: str, token: str, **kw) -> dict:
    base = dict(token_string=token, init_word="ball", num_vectors_per_token=2, train_data_dir=images,
                resolution="64", max_train_steps=4, learning_rate="0.05", validation_every_n_steps=0,
                seed=3, use_object_template=True)
    base.update(kw)
    return base


def poll(client, task_id: str, until=("done", "failed", "interrupted"), timeout: float = 240.0) -> dict:
    end = time.time() + timeout
    while time.time() < end:
        r = client.get(f"{V1}/tasks/{task_id}")
        assert r.status_code == 200, r.text
        info = r.json()
        if info["status"] in until:
            return info
        time.sleep(0.05)
    raise AssertionError(f"task {task_id} still {info['status']} after {timeout}s")


def init_vectors_of(word: str, n: int) -> torch.Tensor:
    from lib_ti.tokens import init_vectors
    from lib_ti.webui import host_model

    return next(iter(init_vectors(host_model.borrow(), word, n, False).values()))


def save_embedding(path: Path, step: int) -> Path:
    from lib_ti import formats
    from lib_ti.embedding import Embedding
    from lib_ti.model import SINGLE_SLOT

    emb = Embedding({SINGLE_SLOT: init_vectors_of("dog", 2) + 0.01}, step=step, name=path.stem)
    formats.save_embedding(emb, str(path), "safetensors", overwrite=True)
    return path


def vectors_of(path: str) -> torch.Tensor:
    from lib_ti import formats

    return next(iter(formats.read_embedding(path).vectors.values())).float()


def errors_of(r) -> dict:
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    assert all(d["type"] == "value_error" and d["loc"][0] == "body" for d in detail), detail
    return {tuple(d["loc"][1:]): d["msg"] for d in detail}


# ---------------------------------------------------------------- the contract


def test_train_returns_202_then_polling_ends_done_with_the_file(client, images):
    from modules import progress

    r = client.post(f"{V1}/train", json=body(images, "apitok1", preview={"prompt": "a apitok1", "steps": 4}))
    assert r.status_code == 202, r.text
    task_id = r.json()["task_id"]
    assert set(r.json()) == {"task_id"}
    info = poll(client, task_id)
    assert info["status"] == "done", info
    assert set(info) >= {"task_id", "status", "step", "max_steps", "loss", "val_loss", "eta_s", "output", "error"}
    assert info["step"] == info["max_steps"] == 4 and info["error"] is None and info["loss"] is not None
    assert info["output"] == "apitok1.safetensors"  # relative to the embeddings folder
    out = emb_dir() / info["output"]
    assert out.is_file()
    got = vectors_of(str(out))
    assert got.shape[0] == 2
    assert not torch.allclose(got, init_vectors_of("ball", 2))
    # the host's progress saw it: /internal/progress works for API-started runs
    assert task_id in progress.finished_tasks and progress.current_task != task_id
    listed = client.get(f"{V1}/tasks").json()
    assert listed[0]["task_id"] == task_id  # newest first
    # inspect finds it by name, with or without the extension
    for name in ("apitok1", "apitok1.safetensors", "APITOK1"):
        r = client.get(f"{V1}/inspect/{name}")
        assert r.status_code == 200, r.text
        assert r.json()["num_vectors"] == 2 and r.json()["step"] == 4


def test_openapi_schema_builds(client):
    schema = client.get("/openapi.json").json()
    assert {f"{V1}/train", f"{V1}/tasks", f"{V1}/tasks/{{task_id}}", f"{V1}/tasks/{{task_id}}/interrupt",
            f"{V1}/inspect/{{name}}"} <= set(schema["paths"])


def test_models_use_no_pydantic_version_specific_api():
    src = "".join(p.read_text() for p in (TESTS.parent / "lib_ti" / "webui").glob("api*.py"))
    for v1_or_v2 in ("parse_obj", ".dict(", "orm_mode", "model_dump", "model_validate", "ConfigDict", "validator"):
        assert v1_or_v2 not in src, v1_or_v2


# ---------------------------------------------------------------- validation


def test_invalid_input_is_422_naming_every_bad_field(client, images, tmp_path):
    bad = body(images, "apitok2", max_train_steps=-1, learning_rate="fast", resolution="63",
               optimizer_type="Nope", output_dir=str(tmp_path), reg_data_dir=str(tmp_path / "missing"),
               preview={"steps": "many", "width": 65, "colour": "red"})
    errors = errors_of(client.post(f"{V1}/train", json=bad))
    assert set(errors) >= {("max_train_steps",), ("learning_rate",), ("resolution",), ("optimizer_type",),
                           ("output_dir",), ("reg_data_dir",), ("preview", "steps"), ("preview", "width"),
                           ("preview", "colour")}, errors
    assert "host" in errors[("output_dir",)]
    assert not os.listdir(tmp_path)  # nothing ran, nothing was written


def test_unknown_field_is_422(client, images):
    errors = errors_of(client.post(f"{V1}/train", json=body(images, "apitok3", max_train_step=10)))
    assert list(errors) == [("max_train_step",)] and "max_train_steps" in errors[("max_train_step",)]


def test_body_must_be_an_object(client):
    assert client.post(f"{V1}/train", json=[1, 2]).status_code == 422
    assert client.post(f"{V1}/train", content=b"{nope", headers={"content-type": "application/json"}).status_code == 422


def test_unknown_ids_and_names_are_404(client):
    assert client.get(f"{V1}/tasks/ti-nope").status_code == 404
    assert client.post(f"{V1}/tasks/ti-nope/interrupt").status_code == 404
    assert client.get(f"{V1}/inspect/no_such_embedding").status_code == 404


def test_existing_name_is_422_unless_overwrite(client, images):
    save_embedding(emb_dir() / "taken-ti7.safetensors", step=1)
    errors = errors_of(client.post(f"{V1}/train", json=body(images, "taken-ti7")))
    assert "already exists" in errors[("token_string",)]


# ---------------------------------------------------------------- auth


def basic(user: str, password: str) -> dict:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def test_auth_on_every_route(client, host, images):
    host.shared.cmd_opts.api_auth = "alice:s3cret,bob:pa:ss"
    calls = [("get", f"{V1}/tasks", None), ("get", f"{V1}/tasks/ti-nope", None),
             ("post", f"{V1}/tasks/ti-nope/interrupt", None), ("get", f"{V1}/inspect/nothing", None),
             ("post", f"{V1}/train", {"max_train_step": 1})]
    for method, url, payload in calls:
        for headers in ({}, basic("alice", "wrong"), basic("eve", "s3cret"), {"Authorization": "Bearer x"}):
            r = client.request(method, url, json=payload, headers=headers)
            assert r.status_code == 401, (url, headers, r.text)
            assert r.headers["www-authenticate"] == "Basic"
        r = client.request(method, url, json=payload, headers=basic("alice", "s3cret"))
        assert r.status_code not in (401, 403), (url, r.text)
    assert client.get(f"{V1}/tasks", headers=basic("alice", "s3cret")).status_code == 200
    assert client.get(f"{V1}/tasks", headers=basic("bob", "pa:ss")).status_code == 200  # ':' in a password
    for odd in ("Basic !!!", "Basic " + base64.b64encode(b"no-colon").decode(), "Basic"):
        assert client.get(f"{V1}/tasks", headers={"Authorization": odd}).status_code == 401
    host.shared.cmd_opts.api_auth = ""
    assert client.get(f"{V1}/tasks").status_code == 200  # off: open, like the host's own routes
    assert client.get(f"{V1}/tasks", headers={"Authorization": "Basic !!!"}).status_code == 200


# ---------------------------------------------------------------- path rules


def test_template_names_resolve_in_the_host_templates_folder(host, images, tmp_path):
    from lib_ti.webui import api_paths as api

    host.shared.cmd_opts.textual_inversion_templates_dir = str(tmp_path)
    try:
        (tmp_path / "mine.txt").write_text("a photo of [name]\n")
        values, errors = api.check_paths({"template_file": "mine.txt", "train_data_dir": images})
        assert not errors and values["template_file"] == str(tmp_path / "mine.txt")
        values, errors = api.check_paths({"template_file": "subject_filewords", "train_data_dir": images})
        assert not errors and values["template_file"] == "subject_filewords"  # built in
        values, errors = api.check_paths({"template_file": str(tmp_path / "mine.txt"), "train_data_dir": images})
        assert not errors  # a path into the host's templates folder is fine too
    finally:
        host.shared.cmd_opts.textual_inversion_templates_dir = None


def test_path_traversal_is_rejected(client, images, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    secret = save_embedding(outside / "secret.safetensors", step=4)
    save_embedding(emb_dir() / "start.safetensors", step=4)
    (emb_dir() / "linked.safetensors").symlink_to(secret)
    (emb_dir() / "sub").mkdir(exist_ok=True)
    os.symlink(secret, emb_dir() / "sub" / "deep.safetensors")
    prompts = outside / "prompts.txt"
    prompts.write_text("a secret prompt\n")

    # inspect: separators, '..' and links out of the folder
    assert client.get(f"{V1}/inspect/..%5Csecret").status_code == 422
    assert client.get(f"{V1}/inspect/..secret").status_code == 422
    assert client.get(f"{V1}/inspect/..%2Foutside%2Fsecret").status_code in (404, 422)
    assert client.get(f"{V1}/inspect/%2E%2E").status_code in (404, 422)
    assert client.get(f"{V1}/inspect/linked").status_code == 404
    assert client.get(f"{V1}/inspect/deep").status_code == 404

    cases = {
        ("weights",): [123, "a\0b", str(secret), "../outside/secret.safetensors", "linked.safetensors",
                       str(emb_dir() / ".." / "x.safetensors"), "/etc/passwd"],
        ("output_name",): ["a/b", "..", "../evil", "a\\b", "c:evil"],
        ("token_string",): ["to/k", "..tok"],
        ("caption_extension",): ["/../../secret", "..txt"],
        ("template_file",): [str(prompts)],
        ("sample_prompts",): [str(prompts)],
        ("output_dir",): [str(outside)],
        ("pretrained_model_name_or_path",): [str(outside)],
        ("dataset_config",): [str(outside / "nope.toml")],
        ("train_data_dir",): [5, "bad\0dir"],  # numbers would turn into relative paths
    }
    for loc, values in cases.items():
        for value in values:
            errors = errors_of(client.post(f"{V1}/train", json=body(images, "pathtok", **{loc[0]: value})))
            assert loc in errors, (loc, value, errors)
    assert sorted(os.listdir(outside)) == ["prompts.txt", "secret.safetensors"]

    # inside is fine: weights by a name in the embeddings folder, a template in the dataset folder
    (Path(images) / "tpl.txt").write_text("a photo of [name]\n")
    r = client.post(f"{V1}/train", json=body(images, "resumed", weights="start.safetensors", max_train_steps=6,
                                             use_object_template=False,
                                             template_file=str(Path(images) / "tpl.txt")))
    assert r.status_code == 202, r.text
    info = poll(client, r.json()["task_id"])
    assert info["status"] == "done" and info["step"] == 6, info  # resumed from step 4


# ---------------------------------------------------------------- interrupt and the queue


def test_interrupt_ends_interrupted_and_keeps_what_it_had(client, images):
    r = client.post(f"{V1}/train", json=body(images, "longtok", max_train_steps=100_000))
    task_id = r.json()["task_id"]
    end = time.time() + 240
    while client.get(f"{V1}/tasks/{task_id}").json()["step"] < 2:
        assert time.time() < end, "the run never reached step 2"
        time.sleep(0.05)
    # a queued run stopped before it starts: it never runs and writes nothing
    queued = client.post(f"{V1}/train", json=body(images, "waittok")).json()["task_id"]
    r = client.post(f"{V1}/tasks/{queued}/interrupt")
    assert r.json() == {"task_id": queued, "status": "queued", "stop_requested": True}
    r = client.post(f"{V1}/tasks/{task_id}/interrupt")
    assert r.status_code == 200 and r.json()["stop_requested"] is True, r.text
    info = poll(client, task_id)
    waited = poll(client, queued)
    assert waited["status"] == "interrupted" and waited["step"] == 0 and waited["output"] is None
    assert not (emb_dir() / "waittok.safetensors").exists()
    assert info["status"] == "interrupted", info
    assert 2 <= info["step"] < 100_000
    from lib_ti import formats

    assert formats.read_embedding(str(emb_dir() / info["output"])).step == info["step"]
    # a finished task cannot be stopped again
    r = client.post(f"{V1}/tasks/{task_id}/interrupt")
    assert r.status_code == 200 and r.json()["stop_requested"] is False


def test_two_requests_queue_one_behind_the_other(client, images):
    from modules import progress

    first = client.post(f"{V1}/train", json=body(images, "quetok1", max_train_steps=30, init_word="ball"))
    second = client.post(f"{V1}/train", json=body(images, "quetok2", max_train_steps=6, init_word="cat"))
    a, b = first.json()["task_id"], second.json()["task_id"]
    # a third run of a queued name would overwrite its file: refused while that name is busy
    errors = errors_of(client.post(f"{V1}/train", json=body(images, "quetok2")))
    assert "already" in errors[("token_string",)]
    saw_b_pending = saw_a_current = False
    end = time.time() + 240
    while True:
        # b before a: if a still runs after b was seen, both ran at that moment (a started first)
        sb = client.get(f"{V1}/tasks/{b}").json()["status"]
        sa = client.get(f"{V1}/tasks/{a}").json()["status"]
        assert not (sa == "running" and sb == "running")
        if sa in ("queued", "running"):
            assert sb == "queued", (sa, sb)  # the second waits for the whole first run
            saw_b_pending |= sa == "running" and b in progress.pending_tasks
            saw_a_current |= progress.current_task == a  # what /internal/progress calls active
        if sb in ("done", "failed"):
            break
        assert time.time() < end
        time.sleep(0.02)
    assert saw_b_pending and saw_a_current
    assert a in progress.finished_tasks and b in progress.finished_tasks
    ia, ib = poll(client, a), poll(client, b)
    assert ia["status"] == ib["status"] == "done", (ia, ib)
    assert ia["output"] != ib["output"]
    va, vb = vectors_of(str(emb_dir() / ia["output"])), vectors_of(str(emb_dir() / ib["output"]))
    init_a, init_b = init_vectors_of("ball", 2), init_vectors_of("cat", 2)
    assert not torch.allclose(va, init_a) and not torch.allclose(vb, init_b)
    assert not torch.allclose(va, init_b) and not torch.allclose(vb, init_a)
    assert not torch.allclose(va, vb)


def test_known_word_token_is_422_before_anything_runs(client, images):
    """The token is checked against the loaded model's own tokenizer, so the API names the field."""
    r = client.post(f"{V1}/train", json=body(images, "cat"))
    assert r.status_code == 422
    assert "already the known word" in errors_of(r)[("token_string",)]
