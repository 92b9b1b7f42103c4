"""lib_ti/preflight.py without a host: the cross-platform name rule, the embedding size guard
(before anything is loaded) and the before-the-run checks on a tiny real SD1 model."""

from __future__ import annotations

import io
import json
import struct

import pytest
import torch
from api_cases import zip_bomb  # tests/ (beside this file)
from safetensors.torch import save_file
from ui_harness import make_dataset

from lib_ti import preflight
from lib_ti.config import TrainConfig


@pytest.mark.parametrize("name", ["a\nb", "\x1f", "a\x7f", ".x", "CON", "con.txt", "Aux", "COM9", "LPT1.tar.gz",
                                  "com¹", "x.", "x ", "a" * 201, "é" * 101, "a<b", "a>b", 'a"b', "a|b", "a?b",
                                  "a*b", "a:b", "a/b", "a\\b", "", "\ud800"])
def test_bad_names(name):
    assert preflight.name_problem(name)


@pytest.mark.parametrize("name", ["mytok", "my-tok_2.v1", "a" * 200, "é" * 100, "CONSOLE", "nul-ti", "com10",
                                  "über", "名前"])
def test_good_names(name):
    assert preflight.name_problem(name) is None


def test_size_guard_reads_headers_not_tensors(tmp_path):
    small = tmp_path / "ok.safetensors"
    save_file({"emb_params": torch.zeros(75, 2048)}, str(small))  # the largest real embedding
    assert preflight.embedding_file_problem(str(small)) is None
    bomb = tmp_path / "bomb.pt"
    bomb.write_bytes(zip_bomb(5_000_000))
    assert bomb.stat().st_size < 200_000
    assert "uncompressed" in preflight.embedding_file_problem(str(bomb))
    header = json.dumps({"emb_params": {"dtype": "F32", "shape": [10**6, 4096], "data_offsets": [0, 4]}}).encode()
    huge = tmp_path / "huge.safetensors"
    huge.write_bytes(struct.pack("<Q", len(header)) + header + bytes(4))
    assert "declares" in preflight.embedding_file_problem(str(huge))
    lying = tmp_path / "lying.safetensors"
    lying.write_bytes(struct.pack("<Q", 2**62) + b"{}")
    assert "header" in preflight.embedding_file_problem(str(lying))
    plain = tmp_path / "big.pt"
    plain.write_bytes(b"\x80\x02" + bytes(preflight.MAX_EMBEDDING_BYTES))
    assert "bytes" in preflight.embedding_file_problem(str(plain))
    buf = io.BytesIO()
    torch.save({"string_to_param": {"*": torch.zeros(2, 768)}}, buf)
    (tmp_path / "fine.pt").write_bytes(buf.getvalue())
    assert preflight.embedding_file_problem(str(tmp_path / "fine.pt")) is None


def test_run_problems_on_a_tiny_model(tiny_sd1, tmp_path):
    images = make_dataset(tmp_path / "imgs", n=2)
    (tmp_path / "empty").mkdir()
    good = TrainConfig.from_dict(dict(token_string="xqzpre-ti", init_word="ball", train_data_dir=str(images),
                                      resolution="64", use_object_template=True, validation_every_n_steps=0))
    assert preflight.run_problems(good, tiny_sd1) == {}
    width = next(iter(tiny_sd1.slots().values()))
    save_file({"emb_params": torch.zeros(2, width + 8)}, str(tmp_path / "narrow.safetensors"))
    cases = {
        "init_word": good.replace(init_word="a castle on a hill"),
        "optimizer_args": good.replace(optimizer_args=["nonsense=1"]),
        "optimizer_type": good.replace(optimizer_type="Prodigy") if not _has("prodigyopt") else None,
        "weights": good.replace(weights=str(tmp_path / "narrow.safetensors")),
        "train_data_dir": good.replace(train_data_dir=str(tmp_path / "empty")),
        "output_name": good.replace(output_name="CON"),
        "token_string": good.replace(token_string="ab" * 150),
    }
    for field, cfg in cases.items():
        if cfg is not None:
            assert field in preflight.run_problems(cfg, tiny_sd1), field
    # without a model only the model-free checks run
    assert preflight.run_problems(good.replace(init_word="a castle on a hill"), None) == {}


def _has(module: str) -> bool:
    try:
        __import__(module)
        return True
    except ImportError:
        return False
