"""The run layer on tiny real models, without a host: exact resume, recovery at every hook, the
name and overwrite rules at submit and at save, NaN/overflow rollback, file permissions."""

from __future__ import annotations

import errno
import os
import time

import pytest
import torch
from test_train_e2e import TOKEN, make_images

from lib_ti import files, formats, resume, run
from lib_ti.config import ConfigError, TrainConfig
from lib_ti.train import Callbacks

pytestmark = pytest.mark.slow


def cfg_for(tmp_path, **kw):
    base = dict(token_string=TOKEN, init_word="ball", train_data_dir=str(make_images(tmp_path / "data", n=3)),
                resolution="64", max_train_steps=6, learning_rate="0.05", train_batch_size=2, seed=11,
                validation_every_n_steps=4, validation_batch_size=2, flip_aug=True, shuffle_caption=True,
                output_dir=str(tmp_path / "out"))
    base.update(kw)
    return TrainConfig.from_dict(base)


def vectors(path):
    return formats.read_embedding(path).vectors


def close(a, b, tol=1e-6):
    return set(a) == set(b) and all(torch.allclose(a[k], b[k], atol=tol, rtol=0) for k in a)


# ---------------------------------------------------------------- exact resume

def test_resume_from_a_checkpoint_continues_exactly(tiny_sd1, tmp_path):
    """10 steps in one go == resume at step 5 (mid-epoch) to 10 == 5 steps, then resume 5 more."""
    straight = run.run(cfg_for(tmp_path, max_train_steps=10, save_every_n_steps=5), tiny_sd1,
                       run.FolderOutputs(str(tmp_path / "out")))
    assert straight.status == "done", straight.error
    ckpt = tmp_path / "out" / f"{TOKEN}-5.safetensors"
    assert ckpt.is_file() and (tmp_path / "out" / f"{TOKEN}-5.safetensors{resume.SUFFIX}").is_file()

    notes = []
    again = run.run(cfg_for(tmp_path, max_train_steps=10, weights=str(ckpt), output_name="again"), tiny_sd1,
                    run.FolderOutputs(str(tmp_path / "out")), Callbacks(log=notes.append))
    assert again.status == "done" and any("resuming exactly from step 5" in n for n in notes), notes
    assert close(vectors(straight.output), vectors(again.output))

    five = run.run(cfg_for(tmp_path, max_train_steps=5, output_name="five"), tiny_sd1,
                   run.FolderOutputs(str(tmp_path / "out")))
    more = run.run(cfg_for(tmp_path, max_train_steps=10, weights=five.output, output_name="five", overwrite=True),
                   tiny_sd1, run.FolderOutputs(str(tmp_path / "out")))
    assert more.status == "done" and formats.read_embedding(more.output).step == 10
    assert close(vectors(straight.output), vectors(more.output))


def test_peer_file_or_other_data_resumes_from_the_vectors_with_a_note(tiny_sd1, tmp_path):
    first = run.run(cfg_for(tmp_path, max_train_steps=3), tiny_sd1, run.FolderOutputs(str(tmp_path / "out")))
    peer = tmp_path / "peer.pt"  # what another trainer would hand over: vectors and step, no state
    formats.save_embedding(formats.read_embedding(first.output), peer, "a1111-pt")
    notes = []
    res = run.run(cfg_for(tmp_path, max_train_steps=5, weights=str(peer), output_name="p"), tiny_sd1,
                  run.FolderOutputs(str(tmp_path / "out")), Callbacks(log=notes.append))
    assert res.status == "done" and any("vectors only" in n and "no resume state" in n for n in notes)

    notes.clear()
    other = cfg_for(tmp_path, max_train_steps=5, weights=first.output, output_name="q", train_batch_size=1)
    res = run.run(other, tiny_sd1, run.FolderOutputs(str(tmp_path / "out")), Callbacks(log=notes.append))
    assert res.status == "done" and any("vectors only" in n and "differ" in n for n in notes), notes


# ---------------------------------------------------------------- nothing lost

class Faulty(run.FolderOutputs):
    """The CLI's folder output with one hook failing the way disks and hosts fail."""

    def __init__(self, folder, where):
        super().__init__(folder)
        self.where = where

    def write(self, emb, path, cfg, overwrite):
        final = os.path.basename(path).startswith(f"{cfg.name}.")
        if (self.where == "checkpoint" and not final) or (self.where == "save" and final):
            raise OSError(errno.ENOSPC, "No space left on device", path)
        return super().write(emb, path, cfg, overwrite)

    def saved(self, path, emb, cfg, final, published):
        if self.where == "reload" and final:
            raise RuntimeError("the host failed to reload its embeddings")


@pytest.mark.parametrize("where", ["preview", "checkpoint", "save", "reload"])
def test_a_failure_at_any_hook_keeps_the_vectors(tiny_sd1, tmp_path, where):
    def preview(step, emb):
        raise RuntimeError("NansException: a tensor with all NaNs was produced in Unet")

    cfg = cfg_for(tmp_path, max_train_steps=4, save_every_n_steps=2, sample_every_n_steps=3 if where == "preview" else 0)
    res = run.run(cfg, tiny_sd1, Faulty(str(tmp_path / "out"), where), Callbacks(on_sample=preview))
    assert res.status == "failed" and res.recovery and res.recovery in res.error
    assert os.path.dirname(res.recovery) == str(tmp_path / "out")  # the run's log folder
    kept = formats.read_embedding(res.recovery)
    assert kept.step == res.step >= 2 and all(torch.isfinite(v).all() for v in kept.vectors.values())


def test_recovery_falls_back_to_the_temp_folder(tiny_sd1, tmp_path):
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    out = Faulty(str(blocked / "out"), "save")  # neither the output nor the log folder can be made
    res = run.run(cfg_for(tmp_path, max_train_steps=2), tiny_sd1, out)
    assert res.status == "failed" and res.recovery and os.path.dirname(res.recovery) == os.path.realpath(
        __import__("tempfile").gettempdir())
    assert formats.read_embedding(res.recovery).step == 2
    os.remove(res.recovery)


def test_an_overflowing_update_rolls_back_and_nothing_infinite_is_written(tiny_sd1, tmp_path):
    res = run.run(cfg_for(tmp_path, learning_rate="1e30", optimizer_type="SGD"), tiny_sd1,
                  run.FolderOutputs(str(tmp_path / "out")))
    assert res.status == "failed" and "overflow" in res.error
    for p in (tmp_path / "out").glob("*.safetensors") if (tmp_path / "out").exists() else []:
        assert all(torch.isfinite(v.norm()) for v in formats.read_embedding(p).vectors.values())
    # 1e30 elements are finite one by one; their norm is not, and such a file is never written
    big = formats.Embedding({"emb": torch.full((1, 768), 1e30)})
    with pytest.raises(formats.FormatError, match="not finite or overflow"):
        formats.save_embedding(big, tmp_path / "big.safetensors", "safetensors")
    assert not (tmp_path / "big.safetensors").exists()


def test_files_get_the_umask_permissions_and_stale_temps_go(tmp_path):
    emb = formats.Embedding({"emb": torch.ones(1, 8)})
    old = os.umask(0o022)
    try:
        formats.save_embedding(emb, tmp_path / "a.safetensors", "safetensors")
        os.umask(0o027)
        formats.save_embedding(emb, tmp_path / "b.pt", "a1111-pt")
    finally:
        os.umask(old)
    assert (tmp_path / "a.safetensors").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "b.pt").stat().st_mode & 0o777 == 0o640
    stale, fresh = tmp_path / ".x.safetensors.abc123.ti-tmp", tmp_path / ".y.safetensors.def456.ti-tmp"
    stale.write_bytes(b"half")
    fresh.write_bytes(b"being written")
    os.utime(stale, (time.time() - 3600, time.time() - 3600))
    assert files.clean_stale_temps(str(tmp_path)) == [str(stale)] and fresh.exists()


# ---------------------------------------------------------------- names

def test_a_name_collides_with_every_layout_and_case(tmp_path):
    out = run.FolderOutputs(str(tmp_path))
    cfg = TrainConfig.from_dict(dict(token_string=TOKEN, train_data_dir=str(tmp_path)))
    run.check_names(out, cfg)
    for twin in (f"{TOKEN.upper()}.pt", f"{TOKEN}.bin", f"{TOKEN}.png"):
        (tmp_path / twin).write_bytes(b"x")
        with pytest.raises(ConfigError, match="already exists"):
            run.check_names(out, cfg)
        with pytest.raises(ConfigError):  # overwrite replaces the target, never a twin
            run.check_names(out, cfg.replace(overwrite=True))
        (tmp_path / twin).unlink()
    (tmp_path / f"{TOKEN}.preview.png").write_bytes(b"x")  # a card picture, not an embedding
    (tmp_path / f"{TOKEN}.safetensors{resume.SUFFIX}").write_bytes(b"x")
    run.check_names(out, cfg)
    for bad in ("../escaped", "/abs/x", "sub/x", "..mytok", ".hidden", "x" * 250):
        assert run.name_problem(bad), bad


def test_a_file_that_appears_during_the_run_is_never_replaced(tiny_sd1, tmp_path):
    cfg = cfg_for(tmp_path, max_train_steps=3)
    out = run.FolderOutputs(str(tmp_path / "out"))
    run.check_names(out, cfg)  # free at submit
    target = tmp_path / "out" / f"{TOKEN}.safetensors"

    def someone_else(p):
        if p.phase == "training" and p.step == 2:
            target.parent.mkdir(exist_ok=True)
            target.write_bytes(b"the user's own file")

    notes = []
    res = run.run(cfg, tiny_sd1, out, Callbacks(progress=someone_else, log=notes.append))
    assert target.read_bytes() == b"the user's own file"
    assert res.status == "done" and res.output == str(tmp_path / "out" / f"{TOKEN}-3.safetensors")
    assert any("not published" in n and res.output in n for n in notes)


def test_replace_keeps_the_notes_and_host_fields_come_from_the_config():
    cfg = TrainConfig.from_dict(dict(token_string=TOKEN, train_data_dir=".", xformers=True, save_state=True))
    moved = cfg.replace(output_dir="/somewhere", mixed_precision="fp16")
    assert [n.split(":")[0] for n in moved.notes()] == ["xformers", "save_state"]
    assert set(TrainConfig.host_decided()) == {"pretrained_model_name_or_path", "v2", "output_dir", "device",
                                               "debug_dataset", "weighted_captions"}


def test_sample_prompts_are_parsed_once_for_every_front_end(tmp_path):
    from lib_ti import sample_prompts

    cfg = TrainConfig.from_dict(dict(token_string=TOKEN, train_data_dir=".",
                                     sample_prompts=f"{TOKEN} on a table --w 96 --h 64 --s 3 --n blurry, dark --d 9"))
    assert sample_prompts.parse(cfg) == [{"prompt": f"{TOKEN} on a table", "width": 96, "height": 64, "steps": 3,
                                          "negative_prompt": "blurry, dark", "seed": 9}]
    f = tmp_path / "prompts.txt"
    f.write_text(f"# previews\n{TOKEN} --l 5.5\n\n")
    assert sample_prompts.parse(cfg.replace(sample_prompts=str(f))) == [{"prompt": TOKEN, "cfg_scale": 5.5}]
    assert sample_prompts.parse(cfg.replace(sample_prompts="")) == [{"prompt": f"a photo of {TOKEN}"}]
