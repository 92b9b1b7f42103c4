"""Issue 8's cases in the stand-in host (tests/fakehost, tiny SD1): names taken in any layout or
subfolder, a file appearing during the queue wait, no ghost tasks, lr 1e30, failures at the preview
and the reload keeping the vectors, permissions, stale temps, caption-less folders, the .pt layout
through A1111's safe check, and an exact resume from a tab checkpoint."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import fake_host_modules

from lib_ti import formats, resume
from lib_ti.config import ConfigError

pytestmark = pytest.mark.slow
TESTS = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    with fake_host_modules() as fakehost:
        yield fakehost.install(data_dir=str(tmp_path_factory.mktemp("webui")), family="sd1")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    sys.path.insert(0, str(TESTS))
    try:
        from ui_harness import make_dataset
    finally:
        sys.path.remove(str(TESTS))
    return str(make_dataset(tmp_path_factory.mktemp("data") / "imgs", n=3))


def values(images: str, token: str, **kw) -> dict:
    base = dict(token_string=token, init_word="ball", train_data_dir=images, resolution="64", max_train_steps=4,
                learning_rate="0.05", validation_every_n_steps=0, seed=3, train_batch_size=2, flip_aug=True,
                use_object_template=True)
    base.update(kw)
    return base


def emb_dir() -> Path:
    from lib_ti.webui import host_model

    return Path(host_model.embeddings_dir())


def train(images, token, **kw):
    from lib_ti.webui import job

    return job.ui_train(f"task({token}-{time.monotonic_ns()})", values(images, token, **kw), None)


def test_a_name_taken_in_any_layout_or_subfolder_is_refused(host, images):
    from lib_ti.webui import job

    save = formats.Embedding({"emb": torch.ones(1, 32)})
    formats.save_embedding(save, emb_dir() / "twinpt.pt", "a1111-pt")
    (emb_dir() / "sub").mkdir(exist_ok=True)
    formats.save_embedding(save, emb_dir() / "sub" / "TwinSub.safetensors", "safetensors")
    for token in ("twinpt", "twinsub"):
        with pytest.raises(ConfigError) as e:
            job.make_config(values(images, token))
        assert "already exists" in e.value.errors["token_string"]
        with pytest.raises(ConfigError):  # overwrite replaces our own file only, never a twin
            job.make_config(values(images, token, overwrite=True))


def test_a_file_appearing_during_the_queue_wait_is_untouched(host, images):
    from modules import call_queue

    from lib_ti.webui import job
    from lib_ti.webui.tasks import REGISTRY

    target = emb_dir() / "waittok.safetensors"
    with call_queue.queue_lock:  # a txt2img holds the queue: the API run waits
        task = job.api_submit(values(images, "waittok"))
        with pytest.raises(ConfigError, match="already queued or running"):  # reserved across tab and API
            job.ui_train("task(same-name)", values(images, "waittok"), None)
        target.write_bytes(b"the user's own copy")
    end = time.time() + 120
    while REGISTRY.get(task.id).status in ("queued", "running"):
        assert time.time() < end
        time.sleep(0.05)
    done = REGISTRY.get(task.id)
    assert target.read_bytes() == b"the user's own copy"
    assert done.status == "done" and done.output and Path(done.output).parent != emb_dir(), done.error
    assert any("not published" in n and done.output in n for n in done.notes), done.notes


def test_no_ghost_tasks(host, images, monkeypatch):
    from lib_ti.webui import host_model, job
    from lib_ti.webui.tasks import REGISTRY

    with pytest.raises(ConfigError, match="200"):  # a name too long for a file: refused at submit
        job.make_config(values(images, "x" * 250))

    def broken(**_kw):
        raise OSError(36, "File name too long")

    monkeypatch.setattr(host_model, "borrow", broken)
    cfg = job.make_config(values(images, "ghosttok"))
    task = REGISTRY.create(cfg.name)
    job.execute(task, cfg)
    assert REGISTRY.get(task.id).status == "failed"
    monkeypatch.undo()
    assert job.make_config(values(images, "ghosttok"))  # the name is free again

    state = host.shared.state
    queued = REGISTRY.create("other")
    state.begin(job="task(someone-elses-txt2img)")
    try:
        assert job.interrupt(queued.id) is True
        assert not state.interrupted  # another job's run is never interrupted
    finally:
        state.end()
        REGISTRY.update(queued.id, status="interrupted")  # as its queue wait would end it; no leftover


def test_an_overflowing_learning_rate_writes_no_infinite_embedding(host, images):
    task = train(images, "hugelr", learning_rate="1e30", optimizer_type="SGD")
    assert task.status == "failed" and "overflow" in task.error
    for p in emb_dir().rglob("hugelr*"):
        assert all(torch.isfinite(v.norm()) for v in formats.read_embedding(p).vectors.values())


@pytest.mark.parametrize("hook", ["preview", "reload"])
def test_a_failing_preview_or_reload_keeps_the_vectors(host, images, monkeypatch, hook):
    from lib_ti.webui import host as host_api
    from lib_ti.webui import host_model

    def fail(*_a, **_k):
        raise RuntimeError("NansException: A tensor with all NaNs was produced in Unet.")

    monkeypatch.setattr(*(host_api, "render_preview") if hook == "preview" else (host_model, "reload_embeddings"),
                        fail)
    # small previews: the host's default (512 px, 20 steps) costs minutes on CPU and proves nothing more here
    task = train(images, f"fail{hook}", sample_every_n_steps=2, sample_prompts=f"a photo of fail{hook} --w 64 --h 64 --s 2")
    assert task.status == "failed" and task.recovery and task.recovery in task.error
    assert task.public()["recovery"] == task.recovery
    from lib_ti.webui import ui_handlers

    assert task.recovery in ui_handlers.status_html(task)  # the tab shows where
    assert formats.read_embedding(task.recovery).step >= 2


def test_published_files_are_0644_and_stale_temps_are_cleaned(host, images):
    stale = emb_dir() / ".old.safetensors.abc123.ti-tmp"
    stale.write_bytes(b"left by a killed run")
    os.utime(stale, (time.time() - 3600, time.time() - 3600))
    old = os.umask(0o022)
    try:
        task = train(images, "permtok")
    finally:
        os.umask(old)
    assert task.status == "done", task.error
    assert os.stat(task.output).st_mode & 0o777 == 0o644 and not stale.exists()
    assert not [p for p in emb_dir().rglob("*") if p.name.endswith((".tmp", ".ti-tmp"))]


def test_a_caption_less_folder_trains_with_the_defaults(host, images, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    for p in Path(images).glob("*.png"):
        (bare / p.name).write_bytes(p.read_bytes())
    task = train(str(bare), "baretok", use_object_template=False)  # the default prompt source: auto
    assert task.status == "done", task.error
    assert any("0 images have captions" in n and "use the object template" in n for n in task.notes), task.notes


def test_pt_is_published_and_loads_through_the_hosts_safe_check(host, images):
    task = train(images, "pttok", save_model_as="pt")
    assert task.status == "done" and task.output == str(emb_dir() / "pttok.pt"), task.error
    assert task.load_check.startswith("ok"), task.load_check
    host.safe.check_pt(task.output)


def test_resume_from_a_tab_checkpoint_continues_exactly(host, images):
    straight = train(images, "restok", max_train_steps=8, save_every_n_steps=3)
    assert straight.status == "done", straight.error
    (step, ckpt), *_ = straight.checkpoints
    assert step == 3 and Path(resume.state_path(ckpt)).is_file()
    from lib_ti.webui import job, ui_handlers

    assert ckpt in ui_handlers.embedding_choices()  # offered for resuming in the tab
    published, _card = job.publish_checkpoint(ckpt)  # the state travels with a published checkpoint
    assert Path(resume.state_path(published)).is_file() and os.stat(published).st_mode & 0o077 != 0o000
    again = train(images, "restok", max_train_steps=8, weights=ckpt, output_name="restok2")
    assert again.status == "done" and any("resuming exactly" in n for n in again.notes), again.notes
    a, b = formats.read_embedding(straight.output), formats.read_embedding(again.output)
    assert b.step == 8 and torch.allclose(a.vectors["emb"], b.vectors["emb"], atol=1e-6, rtol=0)


def test_preview_prompt_lines_reach_txt2img_as_options(host, images, monkeypatch):
    from lib_ti.webui import host as host_api

    seen = []
    monkeypatch.setattr(host_api, "render_preview", lambda **kw: seen.append(kw))  # records, renders nothing
    task = train(images, "prevtok", max_train_steps=2, sample_every_n_steps=2,
                 sample_prompts="prevtok on a table --w 96 --h 64 --s 3 --n blurry")
    assert task.status == "done", task.error
    assert seen[0] == {"prompt": "prevtok on a table", "width": 96, "height": 64, "steps": 3,
                       "negative_prompt": "blurry"}  # (the card may render its own picture after)


def test_invokeai_layout_is_refused_in_the_webui_and_its_bin_passes_the_safe_check(host, images, tmp_path):
    from lib_ti.webui import job

    with pytest.raises(ConfigError) as e:
        job.make_config(values(images, "invtok", save_model_as="invokeai"))
    assert "CLI" in e.value.errors["save_model_as"]
    path = tmp_path / "invtok" / "learned_embeds.bin"  # what the CLI's invokeai layout writes
    path.parent.mkdir()
    formats.save_embedding(formats.Embedding({"emb": torch.ones(1, 32)}), path, "diffusers", token="<invtok>")
    host.safe.check_pt(str(path))
