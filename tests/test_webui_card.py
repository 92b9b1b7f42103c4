"""lib_ti/webui/card.py against the stand-in host: after a run the Textual Inversion card shows a
picture (`<name>.preview.png`: the last preview, else a fresh render) and the training facts (the
user-metadata `<name>.json` the host's card editor reads), and the user's own files are never
replaced."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import fake_host_modules
from PIL import Image

TESTS = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    with fake_host_modules() as fakehost:
        modules = fakehost.install(data_dir=str(tmp_path_factory.mktemp("webui")), family="sd1")
        norm = modules.shared.sd_model.cond_stage_model.wrapped.transformer.text_model.final_layer_norm
        with torch.no_grad():  # zero-mean conditioning would make the host's emphasis step divide 0 by 0
            norm.bias.copy_(torch.linspace(0.0, 0.5, norm.bias.numel()))
        from modules import ui_extra_networks

        ui_extra_networks.initialize()  # as the host's UI does at startup
        ui_extra_networks.register_default_pages()
        yield modules


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    sys.path.insert(0, str(TESTS))
    try:
        from ui_harness import make_dataset
    finally:
        sys.path.remove(str(TESTS))
    return str(make_dataset(tmp_path_factory.mktemp("data") / "imgs", n=2))


def train(images: str, token: str, preview: dict | None = None, **kw):
    from lib_ti.webui import job
    from lib_ti.webui.tasks import REGISTRY

    values = {**dict(token_string=token, init_word="ball", num_vectors_per_token=2, train_data_dir=images,
                     resolution="64", max_train_steps=4, learning_rate="0.05", validation_every_n_steps=0,
                     seed=3, use_object_template=True), **kw}
    task = job.api_submit(values, preview)
    end = time.time() + 240  # a bound only
    while REGISTRY.get(task.id).status in ("queued", "running"):
        assert time.time() < end, "the run did not finish"
        time.sleep(0.05)
    assert task.status == "done", (task.status, task.error)
    return task


def page():
    from modules import ui_extra_networks

    return next(p for p in ui_extra_networks.extra_pages if p.name == "textual inversion")


def emb_dir() -> Path:
    from lib_ti.webui import host_model

    return Path(host_model.embeddings_dir())


def test_a_run_without_previews_gets_a_fresh_picture_and_its_facts_on_the_card(host, images):
    pg = page()
    train(images, "cardtok0")
    assert "cardtok0" in pg.create_html("txt2img")  # the page listed the folder before the run: cached
    task = train(images, "cardtok1")
    png, meta = emb_dir() / "cardtok1.preview.png", emb_dir() / "cardtok1.json"
    with Image.open(png) as im:
        assert im.size == (64, 64) and "fresh render" in im.text["ti_trainer"]  # at the training size
    data = json.loads(meta.read_text())
    ckpt_hash, ckpt_name = host.shared.sd_model.sd_checkpoint_info.shorthash, \
        host.shared.sd_model.sd_checkpoint_info.model_name
    assert data["ti_trainer"]["step"] == 4 and data["ti_trainer"]["vectors"] == 2
    assert data["ti_trainer"]["token"] == "cardtok1" and data["ti_trainer"]["sd_checkpoint"] == ckpt_hash
    for part in ("cardtok1", "2 vectors", "4 training steps", ckpt_name, ckpt_hash):
        assert part in data["description"], data["description"]
    assert "step: 4" in data["notes"]
    assert any("card picture: a fresh render" in n for n in task.notes), task.notes
    # the single-card refresh (what the card editor triggers) sees both files: the listing was dropped
    item = __import__("modules.ui_extra_networks").ui_extra_networks.get_single_card(
        "textual inversion", "txt2img", "cardtok1")
    assert item["preview"] and item["preview"].endswith("cardtok1.preview.png")
    assert item["description"] == data["description"]
    # and a full refresh of the page too
    assert pg.create_html("txt2img")["cardtok1"]["user_metadata"]["ti_trainer"]["step"] == 4


def test_the_card_shows_the_runs_last_preview(host, images):
    task = train(images, "cardtok2", preview={"prompt": "a photo of cardtok2", "steps": 2, "width": 64,
                                              "height": 64, "seed": 5},
                 max_train_steps=6, sample_every_n_steps=3)
    assert [s for s, _ in task.previews] == [3, 6]
    with Image.open(task.previews[-1][1]) as last, Image.open(emb_dir() / "cardtok2.preview.png") as card:
        assert card.tobytes() == last.tobytes() and card.text["ti_trainer"] == "the preview of step 6"


def test_the_users_own_picture_and_metadata_are_kept_ours_are_renewed(host, images):
    d = emb_dir()
    train(images, "cardtok3")
    ours = json.loads((d / "cardtok3.json").read_text())
    # the user edits the description in the card editor (which keeps the other keys)
    ours["description"] = "my own words"
    (d / "cardtok3.json").write_text(json.dumps(ours))
    train(images, "cardtok3", overwrite=True, max_train_steps=5, seed=4)
    again = json.loads((d / "cardtok3.json").read_text())
    assert again["description"] == "my own words" and again["ti_trainer"]["step"] == 5
    assert "step: 5" in again["notes"]  # notes not edited: ours, renewed
    with Image.open(d / "cardtok3.preview.png") as im:  # ours: rendered again for the new vectors
        assert "fresh render" in im.text["ti_trainer"]

    # files the user made: a picture in another allowed form and a metadata file without our mark
    (d / "cardtok3.preview.png").unlink()
    Image.new("RGB", (8, 8), (9, 9, 9)).save(d / "cardtok3.jpg")
    (d / "cardtok3.json").write_text('{"description": "mine", "notes": ""}')
    user_jpg, user_json = (d / "cardtok3.jpg").read_bytes(), (d / "cardtok3.json").read_bytes()
    task = train(images, "cardtok3", overwrite=True, max_train_steps=4)
    assert (d / "cardtok3.jpg").read_bytes() == user_jpg and (d / "cardtok3.json").read_bytes() == user_json
    assert not (d / "cardtok3.preview.png").exists()
    assert any("kept the existing cardtok3.jpg" in n for n in task.notes), task.notes
    assert any("kept the user's cardtok3.json" in n for n in task.notes), task.notes

    # a preview.png the user set with "Replace preview" (no mark) is kept too
    (d / "cardtok3.jpg").unlink()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(d / "cardtok3.preview.png")
    user_png = (d / "cardtok3.preview.png").read_bytes()
    train(images, "cardtok3", overwrite=True, max_train_steps=4)
    assert (d / "cardtok3.preview.png").read_bytes() == user_png
