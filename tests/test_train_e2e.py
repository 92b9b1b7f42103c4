"""End to end on tiny real models (random weights, real CLIP vocabulary): training moves only the
vectors, the fixed-batch validation loss falls, files load back, resume continues, NaN and
interrupts keep what was learned."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from lib_ti import cli, formats
from lib_ti.config import TrainConfig
from lib_ti.prepare import PrepareError
from lib_ti.tokens import init_vectors
from lib_ti.train import Callbacks, run_training

pytestmark = pytest.mark.slow
TOKEN = "mytok123"


def make_images(folder, n=4, size=64, caption=True):
    """A concept the tiny model can latch on to: a red disc on a blue ground, jittered."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        img = Image.new("RGB", (size, size), (20, 40, 200))
        d = ImageDraw.Draw(img)
        x, y = rng.integers(8, size // 2, 2)
        d.ellipse([x, y, x + size // 3, y + size // 3], fill=(220, 30, 30))
        img.save(folder / f"img{i}.png")
        if caption:
            (folder / f"img{i}.txt").write_text(f"a photo of {TOKEN}, red disc")
    return folder


def named_weights(model):
    """Every parameter of every torch module the model object holds (UNet, VAE, text encoders)."""
    seen = set()
    for attr, mod in sorted(vars(model).items()):
        if isinstance(mod, torch.nn.Module) and id(mod) not in seen:
            seen.add(id(mod))
            for name, p in mod.named_parameters():
                yield f"{attr}.{name}", p


def weights_snapshot(model):
    return {name: p.detach().clone() for name, p in named_weights(model)}


def config(tmp_path, **kw):
    base = dict(token_string=TOKEN, init_word="ball", num_vectors_per_token=2,
                train_data_dir=str(make_images(tmp_path / "data")), resolution="64", max_train_steps=40,
                learning_rate="0.05", train_batch_size=2, validation_every_n_steps=10, validation_batch_size=4,
                seed=7, output_dir=str(tmp_path / "out"))
    base.update(kw)
    return TrainConfig.from_dict(base)


def saving_callbacks(tmp_path, saved):
    def on_checkpoint(emb, final):
        path = tmp_path / "out" / (f"{TOKEN}.safetensors" if final else f"{TOKEN}-{emb.step}.safetensors")
        path.parent.mkdir(parents=True, exist_ok=True)
        formats.save_embedding(emb, str(path), "safetensors", overwrite=True)
        saved.append((emb.step, str(path), emb))
        return str(path)

    return on_checkpoint


@pytest.mark.parametrize("family", ["tiny_sd1", "tiny_sd2v", "tiny_sdxl"])
def test_training_moves_only_the_vectors_and_learns(family, request, tmp_path):
    model = request.getfixturevalue(family)
    before = weights_snapshot(model)
    assert len(before) > 10
    flags = {name: p.requires_grad for name, p in named_weights(model)}
    saved: list = []
    cfg = config(tmp_path)
    result = run_training(cfg, model, Callbacks(on_checkpoint=saving_callbacks(tmp_path, saved)))

    assert result.status == "done" and result.step == 40
    after = weights_snapshot(model)
    assert all(torch.equal(before[k], after[k]) for k in before), "a model weight changed"
    assert {n: p.requires_grad for n, p in named_weights(model)} == flags
    assert all(p.grad is None for _, p in named_weights(model)), "a weight got a gradient"

    init = init_vectors(model, "ball", 2)
    assert set(result.embedding.vectors) == set(model.slots())
    for k, v in result.embedding.vectors.items():
        assert not torch.equal(v, init[k]), f"slot {k} did not move"

    vals = [v for _, v in result.val_losses]
    assert vals[-1] < 0.85 * vals[0], f"validation loss did not fall clearly: {vals}"

    step, path, emb = saved[-1]
    back = formats.read_embedding(path)
    assert back.step == 40
    for k in emb.vectors:
        assert torch.equal(back.vectors[k], emb.vectors[k])


def test_resume_continues_from_saved_step(tiny_sd1, tmp_path):
    saved: list = []
    cfg = config(tmp_path, max_train_steps=6, save_every_n_steps=3, validation_every_n_steps=0)
    run_training(cfg, tiny_sd1, Callbacks(on_checkpoint=saving_callbacks(tmp_path, saved)))
    assert [s for s, _, _ in saved] == [3, 6]
    losses_seen = []
    resumed = run_training(cfg.replace(weights=saved[0][1], max_train_steps=6), tiny_sd1,
                           Callbacks(progress=lambda p: losses_seen.append(p.step) if p.phase == "training" else None))
    assert losses_seen[0] == 4 and resumed.step == 6


def test_nan_keeps_last_good_vectors(tiny_sd1, tmp_path):
    cfg = config(tmp_path, learning_rate="1e30", max_train_steps=20, validation_every_n_steps=0,
                 optimizer_type="SGD")
    result = run_training(cfg, tiny_sd1)
    assert result.status == "nan"
    assert all(torch.isfinite(v).all() for v in result.embedding.vectors.values())


def test_guard_keeps_a_good_update_and_rolls_back_an_overflowing_one():
    from lib_ti.train import guard_update

    good = {"clip_l": torch.zeros(2, 4), "clip_g": torch.zeros(2, 8)}
    vectors = {"clip_l": torch.ones(2, 4), "clip_g": torch.ones(2, 8)}
    assert guard_update(vectors, good) and all(torch.equal(good[k], vectors[k]) for k in good)
    vectors["clip_g"][1, 0] = 1e30  # finite, but its norm overflows float16 (and float32 squares)
    assert not guard_update(vectors, good)
    assert all(torch.equal(vectors[k], torch.ones_like(vectors[k])) for k in vectors)  # both slots rolled back
    vectors["clip_l"][0, 0] = float("nan")
    assert not guard_update(vectors, good) and torch.isfinite(vectors["clip_l"]).all()


def test_interrupt_saves_what_it_has(tiny_sd1, tmp_path):
    saved: list = []
    steps = []

    def progress(p):
        if p.phase == "training":
            steps.append(p.step)

    cb = Callbacks(progress=progress, should_stop=lambda: len(steps) >= 3,
                   on_checkpoint=saving_callbacks(tmp_path, saved))
    result = run_training(config(tmp_path, validation_every_n_steps=0), tiny_sd1, cb)
    assert result.status == "interrupted" and result.step == 3
    assert saved[-1][0] == 3


def test_bad_token_and_init_word_are_clear(tiny_sd1, tmp_path):
    with pytest.raises(PrepareError, match="already the known word") as e:
        run_training(config(tmp_path, token_string="cat"), tiny_sd1)
    assert e.value.field == "token_string"
    with pytest.raises(PrepareError, match="tokens") as e:
        run_training(config(tmp_path, init_word="teddy bear"), tiny_sd1)
    assert e.value.field == "init_word" and "teddy" in str(e.value)


def cli_config(model_dir, tmp_path, extra: str) -> tuple:
    """An args.toml for `python -m lib_ti train` on a tiny model folder; returns (toml, out)."""
    data = make_images(tmp_path / "data")
    out = tmp_path / "out"
    toml = tmp_path / "args.toml"
    toml.write_text(f"""
pretrained_model_name_or_path = "{model_dir}"
train_data_dir = "{data}"
output_dir = "{out}"
token_string = "{TOKEN}"
init_word = "ball"
resolution = 64
""" + extra)
    return toml, out


def test_cli_train_and_inspect(tiny_sd1_dir, tmp_path, capsys):
    toml, out = cli_config(tiny_sd1_dir, tmp_path, f"""
max_train_steps = 4
save_every_n_steps = 2
validation_every_n_steps = 2
sample_every_n_steps = 2
sample_prompts = "a photo of {TOKEN} --s 2"
xformers = true
""")
    run = subprocess.run([sys.executable, "-m", "lib_ti", "train", "--config_file", str(toml)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr + run.stdout
    assert "xformers" in run.stdout  # accepted and explained
    assert (out / f"{TOKEN}.safetensors").exists() and (out / f"{TOKEN}-2.safetensors").exists()
    assert sorted(p.name for p in (out / "sample").iterdir()) == [f"{TOKEN}-000002-0.png", f"{TOKEN}-000004-0.png"]
    # the rest through the same entry in this process: an interpreter start each would only cost time
    capsys.readouterr()
    assert cli.main(["inspect", str(out / f"{TOKEN}.safetensors"), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["num_vectors"] == 1 and d["step"] == 4
    # a second run must not overwrite the finished embedding
    assert cli.main(["train", "--config_file", str(toml)]) == 2 and "already exists" in capsys.readouterr().err


def test_cli_two_processes_average_gradients(tiny_sd1_dir, tmp_path):
    """What `accelerate launch` / torchrun does on several GPUs, here as two CPU processes (gloo):
    both draw their own batches, gradients are averaged, only rank 0 writes."""
    toml, out = cli_config(tiny_sd1_dir, tmp_path, """
max_train_steps = 3
validation_every_n_steps = 0
""")
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_port", "29561", "-m", "lib_ti", "train", "--config_file", str(toml)],
                         capture_output=True, text=True, timeout=400)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("done: trained 3 steps") == 2  # both processes ran every step
    assert run.stdout.count(f"saved {out / TOKEN}.safetensors") == 1  # and rank 0 alone wrote
    assert formats.read_embedding(str(out / f"{TOKEN}.safetensors")).step == 3


def test_captions_that_never_name_the_token_are_refused(tiny_sd1, tmp_path):
    data = make_images(tmp_path / "plain")
    for txt in data.glob("*.txt"):
        txt.write_text("a red disc")
    with pytest.raises(PrepareError, match="no caption contains") as e:
        run_training(config(tmp_path, train_data_dir=str(data)), tiny_sd1)
    assert e.value.field == "token_string"
    # half of them naming it is enough to train; the rest only add a warning
    for txt in sorted(data.glob("*.txt"))[:2]:
        txt.write_text(f"a photo of {TOKEN}")
    result = run_training(config(tmp_path, train_data_dir=str(data), max_train_steps=4,
                                 validation_every_n_steps=0), tiny_sd1)
    assert result.step == 4 and any("captions lack" in w for w in result.warnings)


def test_prompt_source_auto_per_image_and_explicit_captions(tiny_sd1, tmp_path):
    """auto (the default): captioned images train on their captions, bare ones on the object
    template, and the log says how many of each; explicit captions keep refusing a bare folder."""
    data = make_images(tmp_path / "mixed")
    for txt in sorted(data.glob("*.txt"))[:1]:
        txt.unlink()
    result = run_training(config(tmp_path, train_data_dir=str(data), max_train_steps=2,
                                 validation_every_n_steps=0), tiny_sd1)
    assert result.step == 2
    assert "prompt source auto: 3 images have captions, 1 use the object template" in " ".join(result.warnings)
    bare = make_images(tmp_path / "bare", caption=False)
    with pytest.raises(PrepareError, match="no caption contains") as e:
        run_training(config(tmp_path, train_data_dir=str(bare), prompt_source="captions"), tiny_sd1)
    assert e.value.field == "token_string"
    # auto with captions that never name the token is refused as captions are: no prompt would name it
    for i in range(4):
        (data / f"img{i}.txt").write_text("a red disc")
    with pytest.raises(PrepareError, match="no caption contains"):
        run_training(config(tmp_path, train_data_dir=str(data)), tiny_sd1)
