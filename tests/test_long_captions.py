"""Issue 13 items 1 and 8 through the CLI: a token past position 75 of its caption trains, and so
do all 75 vectors of num_vectors_per_token = 75 next to other words (75-token chunks, as A1111)."""

from __future__ import annotations

import pytest
import torch
from single_file_fixture import images

from lib_ti import cli, formats
from lib_ti.diffusers_backend.load import load_diffusers_model

pytestmark = pytest.mark.slow
TOKEN = "mytok123"


def run(model_dir, tmp_path, caption: str, capsys, **opts) -> torch.Tensor:
    data = images(tmp_path / "data", caption)
    sets = {"pretrained_model_name_or_path": model_dir, "train_data_dir": data, "output_dir": tmp_path / "out",
            "token_string": TOKEN, "init_word": "ball", "resolution": 64, "max_train_steps": 3,
            "learning_rate": 0.05, "seed": 5, **opts}
    argv = ["train"] + [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]
    code = cli.main(argv)
    out = capsys.readouterr()
    assert code == 0, out.err + out.out
    return formats.read_embedding(str(tmp_path / "out" / f"{TOKEN}.safetensors")).vectors["emb"]


def test_token_past_position_75_trains(tiny_sd1_dir, tmp_path, capsys):
    caption = " ".join(["cat"] * 80) + f", {TOKEN}"
    model = load_diffusers_model(tiny_sd1_dir)
    assert len(model.tokenize(caption)) > 80
    learned = run(tiny_sd1_dir, tmp_path, caption, capsys)
    start = model.token_embeddings("ball")["emb"]
    assert (learned - start).abs().max() > 1e-3  # it moved: the chunk holding it reached the UNet


def test_75_vectors_beside_other_words_all_train(tiny_sd1_dir, tmp_path, capsys):
    learned = run(tiny_sd1_dir, tmp_path, f"a photo of {TOKEN}, red disc", capsys, num_vectors_per_token=75,
                  init_word="")
    assert learned.shape[0] == 75
    moved = learned.abs().amax(dim=1)  # init_word '' starts every vector at zero
    assert bool((moved > 1e-3).all()), moved
