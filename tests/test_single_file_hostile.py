"""Hostile or broken single-file checkpoints, as an attacker or a careless user brings them: each is
refused with one clear line naming pretrained_model_name_or_path (CLI exit 2), before anything
large is built, and nothing in the file or its .yaml is ever run."""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import struct
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from single_file_fixture import images, write_checkpoint
from transformers import CLIPTextConfig, CLIPTextModel

from lib_ti import cli
from lib_ti.diffusers_backend.load import ModelFolderError, check_model_path, load_model
from lib_ti.diffusers_backend.single_file_configs import CheckpointError, _check_widths, describe

TOKEN = "mytok123"


@pytest.fixture(scope="module")
def sd1(tmp_path_factory, tokenizer_dir):
    path, _ = write_checkpoint("sd1", tmp_path_factory.mktemp("hostile") / "sd1", tokenizer_dir)
    return path


def _variant(src: Path, dst: Path, edit=None, yaml: str | None = None) -> Path:
    """A copy of checkpoint `src` at `dst` with its tensors passed through `edit`, and its yaml
    (or `yaml` as the text beside it)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if edit is None:
        shutil.copy(src, dst)
    else:
        save_file(edit(load_file(str(src))), str(dst))
    dst.with_suffix(".yaml").write_text(src.with_suffix(".yaml").read_text() if yaml is None else yaml)
    return dst


def _one_line(e: pytest.ExceptionInfo) -> str:
    text = str(e.value)
    assert "\n" not in text and e.value.field == "pretrained_model_name_or_path"
    return text


def _raw_safetensors(path: Path, header: dict, data: bytes = b"") -> Path:
    h = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(h)) + h + data)
    return path


@pytest.mark.parametrize("name, content, why", [
    ("huge_header_length", struct.pack("<Q", 10**15) + b"{}", "HeaderTooLarge"),
    ("two_bytes", b"\x01\x02", "HeaderTooSmall"),
    ("empty", b"", "HeaderTooSmall"),
])
def test_malformed_safetensors_headers(tmp_path, name, content, why):
    p = tmp_path / f"{name}.safetensors"
    p.write_bytes(content)
    with pytest.raises(CheckpointError, match=why) as e:
        check_model_path(p)
    _one_line(e)


def test_header_claiming_a_huge_tensor_is_refused_unread(tmp_path):
    key = "model.diffusion_model.input_blocks.0.0.weight"
    p = _raw_safetensors(tmp_path / "huge.safetensors",
                         {key: {"dtype": "F32", "shape": [100000, 100000, 3, 3], "data_offsets": [0, 16]}}, b"\0" * 16)
    with pytest.raises(CheckpointError, match="safetensors") as e:
        load_model(p)
    _one_line(e)


def test_truncated_file(sd1, tmp_path):
    data = sd1.read_bytes()
    p = _variant(sd1, tmp_path / "cut.safetensors")
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cannot read .* as safetensors"):
        load_model(p)


@pytest.mark.parametrize("key, dtype, where", [
    ("model.diffusion_model.input_blocks.0.0.weight", torch.int32, "UNet"),
    ("cond_stage_model.transformer.text_model.embeddings.token_embedding.weight", torch.bool, "text encoder"),
])
def test_integer_weights_are_refused_not_cast(sd1, tmp_path, key, dtype, where):
    p = _variant(sd1, tmp_path / "int.safetensors", lambda sd: {**sd, key: sd[key].to(dtype)})
    with pytest.raises(CheckpointError, match=f"the {where} does not fit.*{dtype}") as e:
        load_model(p)
    _one_line(e)


@pytest.mark.parametrize("drop", ["mlp.fc1.weight", "position_embedding", "encoder.layers.0."])
def test_missing_text_encoder_keys(sd1, tmp_path, drop):
    p = _variant(sd1, tmp_path / "gap.safetensors",
                 lambda sd: {k: v for k, v in sd.items() if not (k.startswith("cond_stage_model.") and drop in k)})
    with pytest.raises(CheckpointError, match="the text encoder lacks") as e:
        load_model(p)
    _one_line(e)


def test_text_encoder_of_another_width_is_refused_before_loading(sd1, tmp_path):
    """An SD1 file whose CLIP is not the UNet's (48 channels into a 32-channel cross-attention):
    refused from the header, not by a shape error mid-training."""
    other = CLIPTextModel(CLIPTextConfig(hidden_size=48, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=4, max_position_embeddings=77))

    def swap(sd):
        sd = {k: v for k, v in sd.items() if not k.startswith("cond_stage_model.")}
        return {**sd, **{"cond_stage_model.transformer." + k: v for k, v in other.state_dict().items()}}

    p = _variant(sd1, tmp_path / "wide.safetensors", swap)
    with pytest.raises(CheckpointError, match="48 channels but the UNet attends to 32") as e:
        check_model_path(p)
    _one_line(e)


def test_sdxl_pooled_width_must_fit_the_unet(tmp_path, tokenizer_dir):
    path, _ = write_checkpoint("sdxl", tmp_path / "sdxl", tokenizer_dir)
    from lib_ti.diffusers_backend.single_file import Weights

    shapes = Weights(path).shapes
    spec = describe(path, shapes)  # the real file passes
    proj = "conditioner.embedders.1.model.text_projection"
    bad = {**shapes, proj: (shapes[proj][0], shapes[proj][1] + 8)}
    with pytest.raises(CheckpointError, match="size/pooled input"):
        _check_widths(spec, bad, path)


@pytest.mark.parametrize("text, match", [
    ("!!python/object/apply:os.system ['touch {marker}']\n", "cannot read .*constructor"),
    ("model: !!python/object/new:os.system ['touch {marker}']\n", "cannot read .*constructor"),
    ("model: !!python/name:os.system\n", "cannot read .*constructor"),
    ("a: &a [*a, *a]\n", "not an ldm/sgm model config"),
    ("model:\n  params:\n    cond_stage_config: {{target: evil.module.Thing}}\n", "'Thing' is not CLIP-L"),
    ("model:\n  params:\n    cond_stage_config: 7\n", "'cond_stage_config' must be a mapping"),
    ("model:\n  params:\n    network_config: {{params: {{}}}}\n    conditioner_config: {{params: {{emb_models: 3}}}}\n",
     "'emb_models' must be a list"),
])
def test_yaml_beside_the_file_is_data_only(sd1, tmp_path, text, match):
    marker = tmp_path / "PWNED"
    p = _variant(sd1, tmp_path / "m.safetensors", yaml=text.format(marker=marker))
    with pytest.raises(CheckpointError, match=match) as e:
        check_model_path(p)
    _one_line(e)
    assert not marker.exists()


@pytest.mark.parametrize("edit, match", [
    (("unet_config:", "unet_config: 5\n    _was:"), "'unet_config' must be a mapping"),
    (("ti_trainer:", "ti_trainer: 5\n_was:"), "'ti_trainer' must be a mapping"),
    (("model_channels: 32", "model_channels: x"), "m.yaml beside the file"),
    (("ch_mult:", "ch_mult: 3\n          _was:"), "m.yaml beside the file"),
    # numbers diffusers takes as given, which would fail (or allocate without bound) only when used
    (("timesteps: 1000", "timesteps: -5"), "timesteps must be a whole number"),
    (("timesteps: 1000", "timesteps: 1000000000000"), "timesteps must be a whole number"),
    (("linear_start: 0.00085", "linear_start: x"), "linear_start must be a number"),
    (("scale_factor: 0.18215", "scale_factor: abc"), "scale_factor must be a number"),
    (("image_size: 8", "image_size: 100000000"), "image_size must be a whole number"),
])
def test_yaml_values_of_the_wrong_kind(sd1, tmp_path, edit, match):
    text = sd1.with_suffix(".yaml").read_text()
    assert edit[0] in text
    p = _variant(sd1, tmp_path / "m.safetensors", yaml=text.replace(edit[0], edit[1], 1))
    with pytest.raises(CheckpointError, match=match) as e:
        check_model_path(p)  # the cheap check finds what loading would
    _one_line(e)
    with pytest.raises(CheckpointError, match=match):
        load_model(p)


def _zip_pickle(tmp_path: Path, main: bytes) -> Path:
    """A torch zip checkpoint whose data.pkl is `main`."""
    base = tmp_path / "base.pt"
    torch.save({"a": 1}, base)
    out = io.BytesIO()
    with zipfile.ZipFile(base) as zin, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            zout.writestr(info, main if info.filename.endswith("data.pkl") else zin.read(info.filename))
    p = tmp_path / "trick.ckpt"
    p.write_bytes(out.getvalue())
    return p


@pytest.mark.parametrize("main, match", [
    (b"\x80\x02cbuiltins\neval\nX\x0a\x00\x00\x00print(666)\x85R.", "builtins.eval"),
    (b"\x80\x02cbuiltins\ngetattr\n.", "builtins.getattr"),
    (b"\x80\x02c__builtin__\nexec\n.", "builtins.exec"),
    (b"\x80\x02cbuiltins\ndict\ncbuiltins\nlist\n)\x85R\x85R.", "no UNet weights"),  # nested reduce: inert
    (b"\x80\x02h\x05.", "refused"),  # memo read of nothing
    # a training global lets the second, lenient pass run: it still refuses anything else
    (b"\x80\x02cpytorch_lightning.callbacks.model_checkpoint\nModelCheckpoint\n)\x81cos\nsystem\n"
     b"X\x04\x00\x00\x00echo\x85R\x86.", "os.system"),
    (b"\x80\x02cnumpy\ndtype\n)R)R}b.", "refused"),  # calling a stand-in does nothing
    (b"\x80\x02cbuiltins\nbytes\n\x8a\x06\x00\x00\x00\x00\x00\x10\x85R.", "refused"),  # 17 TB: MemoryError, said
])
def test_ckpt_pickle_tricks(tmp_path, main, match):
    with pytest.raises(CheckpointError, match=match) as e:
        load_model(_zip_pickle(tmp_path, main))
    _one_line(e)


def test_paths_that_are_not_checkpoints(tmp_path, monkeypatch):
    (tmp_path / "dir.safetensors").mkdir()
    with pytest.raises(ModelFolderError, match="a folder named like a checkpoint file"):
        check_model_path(tmp_path / "dir.safetensors")
    os.symlink(tmp_path / "b.safetensors", tmp_path / "a.safetensors")
    os.symlink(tmp_path / "a.safetensors", tmp_path / "b.safetensors")
    for f in (check_model_path, load_model):
        with pytest.raises(ModelFolderError, match="symbolic link to nothing"):
            f(str(tmp_path / "a.safetensors"))
    monkeypatch.chdir(tmp_path)
    for f in (check_model_path, load_model):
        with pytest.raises(ModelFolderError, match=r"'\./x/y' does not exist") as e:  # a path, not a hub id
            f("./x/y")
        assert "Hugging Face" not in str(e.value)
        with pytest.raises(ModelFolderError, match="is a URL; nothing is downloaded"):
            f("https://huggingface.co/x/y/resolve/main/m.safetensors")


def test_a_path_the_system_cannot_stat(tmp_path):
    """An OSError other than "not there" (here: a name too long; as for a folder without
    permission) is said about the option, not raised as a Python exception."""
    for f in (check_model_path, load_model):
        with pytest.raises(ModelFolderError, match="cannot read .*File name too long"):
            f(str(tmp_path / ("x" * 300 + ".safetensors")))


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root reads any file")
def test_unreadable_file(sd1, tmp_path):
    p = _variant(sd1, tmp_path / "locked.safetensors")
    p.chmod(0)
    with pytest.raises(CheckpointError, match="cannot read"):
        check_model_path(p)


def test_cli_exit_2_and_one_line(sd1, tmp_path, capsys):
    data = images(tmp_path / "data", f"a photo of {TOKEN}")
    bad = _variant(sd1, tmp_path / "int.safetensors",
                   lambda sd: {k: (v.to(torch.int8) if "input_blocks.0.0" in k else v) for k, v in sd.items()})
    for model in (bad, tmp_path / "nowhere.safetensors", _zip_pickle(tmp_path, pickle.dumps(print))):
        code = cli.main(["train", "--set", f"pretrained_model_name_or_path={model}", "--set", f"train_data_dir={data}",
                         "--set", f"output_dir={tmp_path / 'out'}", "--set", f"token_string={TOKEN}",
                         "--set", "resolution=64", "--set", "max_train_steps=1"])
        err = capsys.readouterr().err.strip()
        assert code == 2 and err.count("\n") == 0 and err.startswith("error: pretrained_model_name_or_path: "), err
        assert err.count("pretrained_model_name_or_path") == 1, err  # said once


def test_oversized_yaml_is_not_read(sd1, tmp_path):
    p = _variant(sd1, tmp_path / "big.safetensors", yaml="model: {params: {}}\n" + "#" * (2 << 20))
    with pytest.raises(CheckpointError, match="too large for a model config"):
        check_model_path(p)
