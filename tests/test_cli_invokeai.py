"""An InvokeAI user's config, unchanged: its option names and `<token>` syntax train on a tiny
diffusers folder, write InvokeAI's `<name>/learned_embeds.bin`, and resume from "latest". And
kohya's debug_dataset lists what training would see without loading a model."""

from __future__ import annotations

import subprocess

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from lib_ti import cli, formats
from lib_ti.diffusers_backend.load import load_diffusers_model
from lib_ti.model import SINGLE_SLOT
from lib_ti.tokens import init_vectors

pytestmark = pytest.mark.slow


def make_images(folder, n=4, size=64, caption=True):
    """A red disc on a blue ground, jittered; captions name the token."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        img = Image.new("RGB", (size, size), (20, 40, 200))
        x, y = rng.integers(8, size // 2, 2)
        ImageDraw.Draw(img).ellipse([x, y, x + size // 3, y + size // 3], fill=(220, 30, 30))
        img.save(folder / f"img{i}.png")
        if caption:
            (folder / f"img{i}.txt").write_text("a photo of mytok123, red disc")
    return folder


def train(toml, capsys) -> subprocess.CompletedProcess:
    """`python -m lib_ti train`'s entry, in this process: the subprocess path is covered by
    test_train_e2e and test_cli_run; here an interpreter start per run would only cost time."""
    code = cli.main(["train", "--config_file", str(toml)])
    out = capsys.readouterr()
    return subprocess.CompletedProcess(["train", str(toml)], code, out.out, out.err)


def invokeai_toml(tmp_path, model_dir, extra: str = "", steps: int = 4):
    data = make_images(tmp_path / "data", caption=False)  # InvokeAI trains from templates, no captions
    toml = tmp_path / "invokeai.toml"
    toml.write_text(f"""
model = "{model_dir}"
train_data_dir = "{data}"
output_dir = "{tmp_path / 'out'}"
placeholder_token = "<redthing>"
initializer_token = "ball"
learnable_property = "object"
resolution = 64
train_batch_size = 2
max_train_steps = {steps}
learning_rate = 0.05
scale_lr = false
lr_warmup_steps = 0
center_crop = true
only_save_embeds = true
enable_xformers_memory_efficient_attention = false
mixed_precision = "no"
seed = 3
save_model_as = "invokeai"
validation_every_n_steps = 0
""" + extra)
    return toml


def test_invokeai_config_trains_and_writes_learned_embeds_bin(tiny_sd1_dir, tmp_path, capsys):
    toml = invokeai_toml(tmp_path, tiny_sd1_dir, "save_steps = 2\n")
    run = train(toml, capsys)
    assert run.returncode == 0, run.stderr + run.stdout
    assert "InvokeAI prompts type it as <redthing>" in run.stdout and "only_save_embeds" in run.stdout
    out = tmp_path / "out"
    final = out / "redthing" / "learned_embeds.bin"
    assert final.is_file() and (out / "redthing-2.safetensors").is_file()
    model = load_diffusers_model(str(tiny_sd1_dir), device="cpu")
    width = model.slots()[SINGLE_SLOT]
    raw = torch.load(final, weights_only=True)  # InvokeAI's format: a torch dict {"<token>": [width]}
    assert list(raw) == ["<redthing>"] and raw["<redthing>"].shape == (width,)
    emb = formats.read_embedding(str(final))
    assert emb.num_vectors == 1 and emb.widths == {SINGLE_SLOT: width} and emb.name == "<redthing>"
    start = init_vectors(model, "ball", 1)[SINGLE_SLOT]
    assert (emb.vectors[SINGLE_SLOT] - start).abs().max() > 1e-3  # it learned: the vector moved from "ball"

    # InvokeAI's "Resume from last saved checkpoint": continues from the newest checkpoint in output_dir
    final.unlink()
    resumed = train(invokeai_toml(tmp_path, tiny_sd1_dir,
                                  'save_steps = 2\nresume_from_checkpoint = "latest"\n', steps=6), capsys)
    assert resumed.returncode == 0, resumed.stderr + resumed.stdout
    assert f"continuing from {out / 'redthing-2.safetensors'}" in resumed.stdout  # step 4 is the final file
    assert "done: trained 6 steps" in resumed.stdout and (out / "redthing-4.safetensors").is_file()
    assert formats.read_embedding(str(out / "redthing-4.safetensors")).step == 4  # counted on from step 2


def test_debug_dataset_lists_images_and_prompts_without_a_model(tmp_path, capsys):
    data = make_images(tmp_path / "data", n=2)
    toml = tmp_path / "kohya.toml"
    toml.write_text(f"""
pretrained_model_name_or_path = "{tmp_path / 'no-model-here'}"
train_data_dir = "{data}"
token_string = "mytok123"
resolution = 64
caption_prefix = "best"
caption_tag_dropout_rate = 0.5
keep_tokens = 1
debug_dataset = true
""")
    run = train(toml, capsys)
    assert run.returncode == 0, run.stderr + run.stdout
    assert run.stdout.count("img") >= 2 and "64x64" in run.stdout
    assert "prompt 1: 'best a photo of mytok123" in run.stdout
    assert "2 of 2 training captions name 'mytok123'" in run.stdout and "nothing was trained" in run.stdout
    assert not (tmp_path / "out").exists()


def test_debug_dataset_shows_weighted_captions_and_augmentation(tmp_path, capsys):
    data = make_images(tmp_path / "data", n=1)
    for cap in data.glob("*.txt"):
        cap.write_text("a (photo:1.5) of mytok123 BREAK [garden]")
    toml = tmp_path / "kohya.toml"
    toml.write_text(f"""
pretrained_model_name_or_path = "{tmp_path / 'no-model-here'}"
train_data_dir = "{data}"
token_string = "mytok123"
resolution = 64
cache_latents = false
color_aug = true
weighted_captions = true
debug_dataset = true
""")
    run = train(toml, capsys)
    assert run.returncode == 0, run.stderr + run.stdout
    assert ", colour changes" in run.stdout
    assert "weighted: 'a ' x1 | 'photo' x1.5 | ' of mytok123' x1 | BREAK | 'garden' x0.909" in run.stdout, run.stdout
