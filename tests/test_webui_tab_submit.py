"""The tab's Train button against the stand-in host: every problem the HTTP API reports at submit is
listed in the tab at once, under the tab's own labels, and nothing is queued; a second click, or a
run of the same name the API queued, is refused at once instead of after the first run ends; a
published checkpoint gets the card a final save gets. Clicks run the wired event function as
gradio does, in threads where a click has to wait for the host's queue lock."""

from __future__ import annotations

import concurrent.futures
import json
import time
from pathlib import Path

import pytest
import torch
from conftest import fake_host_modules
from PIL import Image
from test_webui_tab import TOKEN, Tab

TESTS = Path(__file__).resolve().parent
BOUND_S = 120  # a bound only: a refused click answers in well under a second


@pytest.fixture
def host(tmp_path):
    with fake_host_modules() as fakehost:
        yield fakehost.install(data_dir=str(tmp_path / "webui"), family="sd1")


@pytest.fixture
def images(tmp_path):
    import sys

    sys.path.insert(0, str(TESTS))
    try:
        from ui_harness import make_dataset
    finally:
        sys.path.remove(str(TESTS))
    return make_dataset(tmp_path / "data", n=3)


def small_tab() -> Tab:
    """Previews (and the card's one render after a run) at 64x64 in 2 steps: tiny-model fast."""
    t = Tab()
    for key, value in {"steps": 2, "width": 64, "height": 64}.items():
        t.values[t.ui.preview[key]._id] = value
    return t


def click(t: Tab, task_id: str, **values):
    """The Train event with the form as it is plus `values`, on a copy (safe from threads)."""
    current = dict(t.values)
    for name, v in values.items():
        current[t.ui.form[name]._id] = v
    current[t.ui.parts["task_id"]._id] = task_id
    for i, dep in enumerate(t.demo.dependencies):
        if t.ui.parts["train"]._id in dep["targets"] and dep["trigger"] == "click":
            return t.demo.fns[i].fn(*[current[j] for j in dep["inputs"]])
    raise AssertionError("no Train event")


def quick(folder, **kw):
    """A two-step run's form; the object template, as the captions name another token."""
    return {**dict(train_data_dir=str(folder), resolution="64", max_train_steps=2, validation_every_n_steps=0,
                   sample_every_n_steps=0, prompt_source="object template"), **kw}


def wait_until(predicate, what: str):
    end = time.time() + BOUND_S
    while not predicate():
        assert time.time() < end, what
        time.sleep(0.02)


def refused_before_the_queue(task_id: str) -> None:
    from modules import progress

    from lib_ti.webui.tasks import REGISTRY

    assert REGISTRY.get(task_id) is None  # no run was created, so none failed later
    assert task_id not in progress.pending_tasks and task_id in progress.finished_tasks  # the bar ends now


def test_problems_the_api_finds_are_all_listed_at_submit_and_nothing_is_queued(host, images):
    t = Tab()
    _st, error = click(t, "task(sub-many)", **quick(images, token_string=TOKEN, optimizer_args="nonsense=1",
                                                       sample_every_n_steps=2, sample_prompts="a photo --w 99999",
                                                       clip_skip=12))
    assert 'data-field="optimizer_args"' in error and "Optimizer arguments" in error, error
    assert 'data-field="sample_prompts"' in error and "Preview prompts" in error and "line 1" in error
    assert 'data-field="clip_skip"' in error and "Clip skip" in error and "layers" in error
    refused_before_the_queue("task(sub-many)")


def test_the_tabs_own_preview_settings_are_checked_with_the_options(host, images):
    t = Tab()
    for key, value in {"steps": 0, "width": 100, "cfg_scale": 99.0}.items():
        t.values[t.ui.preview[key]._id] = value
    _st, error = click(t, "task(sub-prev)", **quick(images, token_string="", sample_every_n_steps=5))
    for field, label in (("preview_steps", "Preview sampling steps"), ("preview_width", "Preview width"),
                         ("preview_cfg_scale", "Preview CFG scale"), ("token_string", "Token string")):
        assert f'data-field="{field}"' in error and label in error, (field, error)
    assert "multiple of 8" in error
    refused_before_the_queue("task(sub-prev)")


@pytest.mark.parametrize("case", ["init_word", "weights", "train_data_dir"])
def test_what_the_run_would_find_later_is_named_at_submit(host, images, tmp_path, case):
    from lib_ti import formats
    from lib_ti.webui import host_model

    form = quick(images, token_string=TOKEN)
    if case == "init_word":
        form["init_word"] = "a castle on a hill"  # several tokens, one vector
    elif case == "weights":  # a file of the wrong width, picked in the resume list
        narrow = Path(host_model.embeddings_dir()) / "narrow.safetensors"
        formats.save_embedding(formats.Embedding({"emb": torch.ones(1, 7)}), str(narrow), "safetensors")
        form["weights"] = "narrow.safetensors"
    else:  # a folder without one usable image
        (tmp_path / "empty").mkdir()
        (tmp_path / "empty" / "notes.txt").write_text("no images here")
        form["train_data_dir"] = str(tmp_path / "empty")
    _st, error = click(Tab(), f"task(sub-{case})", **form)
    assert f'data-field="{case}"' in error, error
    refused_before_the_queue(f"task(sub-{case})")


def test_a_second_click_and_an_api_run_of_the_same_name_are_refused_at_once(host, images):
    from modules.call_queue import queue_lock

    from lib_ti.webui import job
    from lib_ti.webui.tasks import REGISTRY

    t = small_tab()
    pool = concurrent.futures.ThreadPoolExecutor(4)
    queue_lock.acquire()  # another job (a txt2img, a run) holds the model meanwhile
    try:
        api = job.api_submit(dict(token_string="apitok", train_data_dir=str(images), resolution="64",
                                  max_train_steps=2, validation_every_n_steps=0, use_object_template=True))
        first = pool.submit(click, t, "task(dbl-1)", **quick(images, token_string="tabtok"))
        from modules import progress

        wait_until(lambda: "task(dbl-1)" in progress.pending_tasks or first.done(), "the first click never queued")
        assert not first.done(), first.result()
        second = pool.submit(click, t, "task(dbl-2)", **quick(images, token_string="tabtok"))
        _st, error = second.result(timeout=BOUND_S)  # the old tab waited here for the lock
        assert 'data-field="token_string"' in error and "already queued or running" in error, error
        _st, error = pool.submit(click, t, "task(dbl-3)", **quick(images, token_string="apitok")).result(BOUND_S)
        assert 'data-field="token_string"' in error and api.id in error, error
        refused_before_the_queue("task(dbl-2)")
        refused_before_the_queue("task(dbl-3)")
    finally:
        queue_lock.release()
    status, error = first.result(timeout=600)
    assert 'data-status="done"' in status, (status, error)
    wait_until(lambda: REGISTRY.get(api.id).status not in ("queued", "running"), "the API run did not end")
    assert REGISTRY.get(api.id).status == "done"
    pool.shutdown()


def test_interrupt_while_waiting_for_the_queue_frees_the_name(host, images):
    from modules import progress
    from modules.call_queue import queue_lock

    t = small_tab()
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        queue_lock.acquire()
        try:
            waiting = pool.submit(click, t, "task(wait-1)", **quick(images, token_string="waittok"))
            wait_until(lambda: "task(wait-1)" in progress.pending_tasks or waiting.done(), "the click never queued")
            assert not waiting.done(), waiting.result()
            t.values[t.ui.parts["task_id"]._id] = "task(wait-1)"
            (msg,) = t.fire(t.ui.parts["interrupt"])
            assert "before the run started" in msg
        finally:
            queue_lock.release()
        _st, error = waiting.result(timeout=BOUND_S)
        assert "Interrupted before the run started" in error
    status, error = click(t, "task(wait-2)", **quick(images, token_string="waittok"))  # the name is free again
    assert 'data-status="done"' in status, (status, error)


def test_a_published_checkpoint_gets_the_card_of_a_final_save_and_keeps_the_users_files(host, images):
    from modules.call_queue import queue_lock

    from lib_ti.webui import host_model, job, ui_handlers
    from lib_ti.webui.tasks import REGISTRY

    t = small_tab()
    status, error = click(t, "task(card-1)", **quick(images, token_string="cardtok", init_word="ball",
                                                     max_train_steps=6, save_every_n_steps=2, sample_every_n_steps=4,
                                                     sample_prompts="a photo of cardtok"))
    assert 'data-status="done"' in status, (status, error)
    emb = Path(host_model.embeddings_dir())

    msg = ui_handlers.publish("cardtok-4.safetensors", False)
    assert "Published" in msg and "the preview of step 4" in msg, msg
    with Image.open(emb / "cardtok-4.preview.png") as im:
        assert im.text["ti_trainer"] == "the preview of step 4"
        with Image.open(next(Path(host_model.embeddings_dir()).parent.rglob("images/cardtok-4-0.png"))) as shot:
            assert im.size == shot.size
    meta = json.loads((emb / "cardtok-4.json").read_text(encoding="utf-8"))
    assert meta["ti_trainer"]["step"] == 4 and meta["ti_trainer"]["init_word"] == "ball"
    assert "4 training steps" in meta["description"] and "cardtok" in meta["description"]

    # a run that will write cardtok-2 (here an API run waiting for the queue) holds the name
    queue_lock.acquire()
    try:
        api = job.api_submit(dict(token_string="cardtok-2", train_data_dir=str(images), resolution="64",
                                  max_train_steps=2, validation_every_n_steps=0, use_object_template=True))
        msg = ui_handlers.publish("cardtok-2.safetensors", False)
        assert "queued or running" in msg and api.id in msg, msg
        assert not (emb / "cardtok-2.safetensors").exists()
        job.interrupt(api.id)
    finally:
        queue_lock.release()
    wait_until(lambda: REGISTRY.get(api.id).status not in ("queued", "running"), "the API run did not end")
    msg = ui_handlers.publish("cardtok-2.safetensors", False)  # no preview at step 2: facts only, no render
    assert "Published" in msg and "no preview at step 2" in msg, msg
    assert not (emb / "cardtok-2.preview.png").exists() and (emb / "cardtok-2.json").is_file()

    # the user's own picture and description beside a file published again are never replaced
    Image.new("RGB", (8, 8), (1, 2, 3)).save(emb / "cardtok-4.preview.png")
    (emb / "cardtok-4.json").write_text('{"description": "mine"}', encoding="utf-8")
    before = {p: p.read_bytes() for p in (emb / "cardtok-4.preview.png", emb / "cardtok-4.json")}
    msg = ui_handlers.publish("cardtok-4.safetensors", True)
    assert "Published" in msg and "kept" in msg, msg
    assert {p: p.read_bytes() for p in before} == before
