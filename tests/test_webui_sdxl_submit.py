"""With the stand-in host's SDXL model loaded, `save_model_as = "pt"` is refused at submit: A1111's
.pt layout holds one tensor, an SDXL embedding two (clip_l + clip_g). The API answers 422 naming
the field, the tab marks it; nothing is queued or written."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from conftest import fake_host_modules

pytestmark = pytest.mark.slow
TESTS = Path(__file__).resolve().parent
V1 = "/ti-trainer/v1"
TOKEN = "xltok123"


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    with fake_host_modules() as fakehost:
        modules = fakehost.install(data_dir=str(tmp_path_factory.mktemp("webui")), family="sdxl")
        modules.shared.cmd_opts.api = True  # the routes exist only with --api or --nowebui
        try:
            yield modules
        finally:
            modules.shared.cmd_opts.api = False


@pytest.fixture(scope="module")
def images(host):
    """A dataset inside the WebUI data folder, which the API may read by default."""
    sys.path.insert(0, str(TESTS))
    try:
        from ui_harness import make_dataset
    finally:
        sys.path.remove(str(TESTS))
    return str(make_dataset(Path(host.paths_internal.data_path) / "datasets" / "imgs", n=2))


def values(images: str, **kw) -> dict:
    return dict(token_string=TOKEN, init_word="ball", train_data_dir=images, resolution="64",
                max_train_steps=2, validation_every_n_steps=0, save_model_as="pt", **kw)


def nothing_written(host) -> bool:
    from lib_ti.webui import host_model

    return not [p for p in Path(host_model.embeddings_dir()).rglob("*") if TOKEN in p.name]


def test_api_refuses_pt_for_sdxl_with_422(host, images):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from lib_ti.webui import entry, host_model, tasks

    assert host_model.family_of(host_model.sd_model()) == "sdxl"
    app = FastAPI()
    entry.on_app_started(None, app)
    before = [t.id for t in tasks.REGISTRY.all()]
    with TestClient(app) as client:
        r = client.post(f"{V1}/train", json=values(images))
    assert r.status_code == 422, r.text
    errors = {tuple(d["loc"][1:]): d["msg"] for d in r.json()["detail"]}
    assert list(errors) == [("save_model_as",)] and "SDXL" in errors[("save_model_as",)], errors
    assert "safetensors" in errors[("save_model_as",)]
    assert [t.id for t in tasks.REGISTRY.all()] == before  # nothing queued
    assert nothing_written(host)


def test_tab_marks_save_model_as_for_sdxl(host, images):
    sys.path.insert(0, str(TESTS))
    try:
        from test_webui_tab import Tab
    finally:
        sys.path.remove(str(TESTS))
    t = Tab()
    _status, error = t.train("task(tab-xl-pt)", **values(images))
    assert 'data-field="save_model_as"' in error and "SDXL" in error and "safetensors" in error, error
    assert nothing_written(host)
