"""InvokeAI/kohya option names as a careless user or an attacker writes them: each bad value is
refused at config time under the name the user wrote, once; `latest` never trips over odd files."""

from __future__ import annotations

import pytest
import torch

from lib_ti import cli, formats
from lib_ti.config import ConfigError, TrainConfig
from lib_ti.config_compat import latest_checkpoint
from lib_ti.embedding import SINGLE_SLOT, Embedding

BASE = {"train_data_dir": "/d"}


def errors(values: dict) -> dict[str, str]:
    with pytest.raises(ConfigError) as e:
        TrainConfig.from_dict({**BASE, **values})
    return e.value.errors


@pytest.mark.parametrize("values, key", [
    ({"placeholder_token": "<abc1x>", "token_string": "xyz1x"}, "placeholder_token"),
    ({"placeholder_token": "<abc1x>", "trigger_term": "def1x"}, "trigger_term"),
    ({"model": "/a", "pretrained_model_name_or_path": "/b", "token_string": "t1x"}, "model"),
    ({"initializer_token": "cat", "init_word": "dog", "token_string": "t1x"}, "initializer_token"),
])
def test_conflicting_aliases(values, key):
    errs = errors(values)
    assert set(errs) == {key} and "same option as" in errs[key]


def test_the_same_value_under_both_names_is_fine():
    cfg = TrainConfig.from_dict({**BASE, "placeholder_token": "<abc1x>", "token_string": "abc1x"})
    assert cfg.token_string == "abc1x"


@pytest.mark.parametrize("raw", ["<>", "< >", "<my tok>", "<<x>>", "<a/b>", "<../x>", ["a"]])
def test_bad_invokeai_triggers_are_one_error_under_its_name(raw):
    errs = errors({"placeholder_token": raw})
    assert set(errs) == {"placeholder_token"} and "may contain only" in errs["placeholder_token"]


@pytest.mark.parametrize("raw, hint", [("my tok", False), ("../evil", False), ("a\nb", False), ("<xyz>", True)])
def test_bad_token_string_is_refused_at_submit(raw, hint):
    """Before any model or image is read (the CLI, the tab and the API all build a TrainConfig)."""
    errs = errors({"token_string": raw})
    assert set(errs) == {"token_string"} and "may contain only" in errs["token_string"]
    assert ("<brackets>" in errs["token_string"]) == hint


@pytest.mark.parametrize("key, value", [
    ("caption_dropout_rate", 1.5), ("caption_dropout_rate", -0.1), ("caption_dropout_rate", float("nan")),
    ("caption_dropout_rate", "abc"), ("caption_dropout_rate", True), ("caption_tag_dropout_rate", 2),
    ("caption_dropout_every_n_epochs", -1),
])
def test_caption_dropout_out_of_range(key, value):
    errs = errors({"token_string": "t1x", key: value})
    assert set(errs) == {key}


@pytest.mark.parametrize("key", ["save_steps", "checkpointing_steps"])
@pytest.mark.parametrize("value", ["x", -5, 2.5, True])
def test_invokeai_step_counts_are_checked_under_their_own_name(key, value):
    errs = errors({"placeholder_token": "<t1x>", key: value})
    assert set(errs) == {key} and "whole number" in errs[key]


def test_step_counts_as_forms_and_flags_give_them():
    for v in (10, "10", 10.0):
        assert TrainConfig.from_dict({**BASE, "placeholder_token": "<t1x>", "save_steps": v}).save_every_n_steps == 10


def _ckpt(path, step):
    formats.save_embedding(Embedding({SINGLE_SLOT: torch.ones(1, 8) * step}, step=step), str(path), "safetensors")


def test_latest_finds_invokeais_own_checkpoints(tmp_path):
    """learned_embeds-steps-N.bin: the name InvokeAI's trainer saves under, whatever the token."""
    for step in (100, 2000, 300):
        torch.save({"<t1x>": torch.zeros(8)}, tmp_path / f"learned_embeds-steps-{step}.bin")
    assert latest_checkpoint(tmp_path, "t1x") == tmp_path / "learned_embeds-steps-2000.bin"
    cfg = TrainConfig.from_dict({**BASE, "placeholder_token": "<t1x>", "output_dir": str(tmp_path),
                                 "resume_from_checkpoint": "latest"})
    assert cfg.weights == str(tmp_path / "learned_embeds-steps-2000.bin")


def test_latest_ignores_odd_names_and_folders(tmp_path):
    _ckpt(tmp_path / "t1x-20.safetensors", 20)
    (tmp_path / "t1x-500.safetensors").mkdir()  # a folder named like a newer checkpoint
    (tmp_path / "..-900.pt").write_bytes(b"x")  # another "run" with a path-like name
    (tmp_path / "t1x-x9.pt").write_bytes(b"x")
    (tmp_path / "t1x\n-800.pt").write_bytes(b"x")  # a newline in the name: a different run
    (tmp_path / "../t1x-700.pt").resolve().write_bytes(b"x")  # beside output_dir, not in it
    assert latest_checkpoint(tmp_path, "t1x") == tmp_path / "t1x-20.safetensors"
    assert latest_checkpoint(tmp_path / "missing", "t1x") is None
    (tmp_path / "t1x-99999999999999999999999.pt").write_bytes(b"not torch")  # newest by its name
    cfg = TrainConfig.from_dict({**BASE, "placeholder_token": "<t1x>", "output_dir": str(tmp_path),
                                 "resume_from_checkpoint": "latest"})
    assert cfg.weights.endswith("t1x-99999999999999999999999.pt")  # chosen; its format is checked on load


def test_debug_dataset_errors_name_the_option(tmp_path, capsys):
    (tmp_path / "noimg").mkdir()
    (tmp_path / "noimg" / "a.txt").write_text("a caption without an image")
    common = ["--set", "token_string=t1x", "--set", "debug_dataset=true"]
    for extra, field in ((["--set", f"train_data_dir={tmp_path / 'noimg'}"], "train_data_dir"),
                         (["--set", f"train_data_dir={tmp_path / 'missing'}"], "train_data_dir"),
                         (["--set", f"train_data_dir={tmp_path / 'noimg'}", "--set",
                           f"template_file={tmp_path / 'no.txt'}"], "template_file")):
        code = cli.main(["train", *common, *extra])
        err = capsys.readouterr().err.strip()
        assert code == 2 and err.startswith(f"error: {field}: ") and "\n" not in err, err
        assert err.count(f"{field}:") == 1, err  # said once


@pytest.mark.parametrize("ext", ["/../../etc/passwd", "../x", "a/b", ".txt/..", "..txt", "", ".t\0xt"])
def test_caption_extension_is_a_suffix_never_a_path(ext):
    assert set(errors({"token_string": "t1x", "caption_extension": ext})) == {"caption_extension"}


def test_caption_extension_that_kohya_users_write_is_fine():
    for ext in (".txt", ".caption", "txt", ".tags.txt", ".wd14_tags"):
        assert TrainConfig.from_dict({**BASE, "token_string": "t1x", "caption_extension": ext}).caption_extension == ext


def test_dataset_toml_bad_subset_values(tmp_path):
    from lib_ti.data import DataError
    from lib_ti.data.dataset_toml import load_dataset_toml

    (tmp_path / "img").mkdir()
    for extra, match in (("num_repeats = 1000000000000", "up to 10000"),
                         ('caption_extension = "/../../etc/passwd"', "a file extension"),
                         ("caption_dropout_rate = 2", r"0.0..1.0"), ('enable_wildcard = "yes"', "true or false")):
        toml = tmp_path / "ds.toml"
        toml.write_text(f'[[datasets]]\n[[datasets.subsets]]\nimage_dir = "{tmp_path / "img"}"\n{extra}\n')
        with pytest.raises(DataError, match=match):
            load_dataset_toml(toml)


def test_kohya_folder_with_absurd_repeats(tmp_path):
    from lib_ti.data import DataError
    from lib_ti.data.spec import subsets_from_train_dir

    (tmp_path / "99999999999999_dog").mkdir()
    with pytest.raises(DataError, match="repeats is over 10000"):
        subsets_from_train_dir(tmp_path)
