"""The offline CLIP tokenizer gives the ids of the real one."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from lib_ti.diffusers_backend import vocab


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    return vocab.make_tokenizer(cache_dir=tokenizer_dir)


def test_known_ids(tok):
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert len(tok) == 49408
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (49406, 49407, 49407)
    assert tok("A PHOTO of a Cat").input_ids == tok("a photo of a cat").input_ids


def test_pad_tokens(tokenizer_dir):
    sd2 = vocab.make_tokenizer(vocab.PAD_OPENCLIP, tokenizer_dir)
    assert sd2.pad_token_id == 0
    ids = sd2("a cat", padding="max_length", max_length=77).input_ids
    assert ids[:4] == [49406, 320, 2368, 49407] and ids[4:] == [0] * 73


def test_matches_open_clips_own_tokenizer(tok):
    # load open_clip/tokenizer.py by path: importing the package would pull in torchvision
    spec = importlib.util.find_spec("open_clip")
    path = Path(next(iter(spec.submodule_search_locations))) / "tokenizer.py"
    mod_spec = importlib.util.spec_from_file_location("_oc_tokenizer", path)
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    ref = mod.SimpleTokenizer(str(vocab._bpe_gz()))
    for text in ["a photo of a cat", "mytok123, watercolor!! by greg rutkowski", "Ünïcode café 東京 🙂",
                 "photograph of a teddy-bear on the moon"]:
        assert tok(text, add_special_tokens=False).input_ids == ref.encode(text), text


def test_cache_dir_is_built_once(tmp_path):
    folder = vocab.tokenizer_dir(tmp_path / "tok")
    stamp = (folder / "vocab.json").stat().st_mtime_ns
    assert vocab.tokenizer_dir(tmp_path / "tok") == folder
    assert (folder / "vocab.json").stat().st_mtime_ns == stamp
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tok"]  # no temp folders left behind
