"""Single-file checkpoints (A1111's ldm/sgm layout) in the CLI: SD1, SD2-v and SDXL load offline,
match the diffusers folder with the same weights, train through `python -m lib_ti train`, and
unsafe or unknown inputs are refused. The checkpoints come from tests/single_file_fixture.py."""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import pytest
import torch
from single_file_fixture import images, write_checkpoint

from lib_ti import cli, formats
from lib_ti.diffusers_backend.load import ModelFolderError, load_diffusers_model

TOKEN = "mytok123"
FAMILIES = ["sd1", "sd2", "sdxl"]
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tokenizer_dir):
    """family -> (checkpoint file with .yaml beside it, diffusers folder with the same weights)."""
    root = tmp_path_factory.mktemp("single_file")
    return {fam: write_checkpoint(fam, root / fam, tokenizer_dir) for fam in FAMILIES}


def train(argv: list[str], capsys) -> tuple[int, str, str]:
    code = cli.main(["train", *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("family", FAMILIES)
def test_checkpoint_matches_the_diffusers_folder(family, checkpoints):
    ckpt, folder = checkpoints[family]
    single, ref = load_diffusers_model(ckpt), load_diffusers_model(folder)
    assert (single.family, single.prediction_type, single.slots()) == (ref.family, ref.prediction_type, ref.slots())
    assert single.prediction_type == ("v_prediction" if family == "sd2" else "epsilon")
    assert single.vae.decoder is None  # only the encoder is loaded for training
    vec = {k: torch.randn(3, w, generator=torch.Generator().manual_seed(1)) for k, w in single.slots().items()}
    texts = [f"a photo of {TOKEN}", " ".join(["cat"] * 80) + f" {TOKEN}"]
    with torch.no_grad():
        a, b = single.encode_prompts(texts, TOKEN, vec), ref.encode_prompts(texts, TOKEN, vec)
        if family == "sdxl":
            torch.testing.assert_close(a.pooled, b.pooled, rtol=0, atol=0)
            a, b = a.crossattn, b.crossattn
        torch.testing.assert_close(a, b, rtol=0, atol=0)  # the same text encoders, weight for weight
        x, t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2)), torch.tensor([10, 900])
        cond = single.encode_prompts(texts, TOKEN, vec)
        torch.testing.assert_close(single.predict(x, t, cond), ref.predict(x, t, cond), rtol=1e-4, atol=1e-4)
        px = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(3)) * 2 - 1
        torch.manual_seed(0)
        la = single.encode_images(px)
        torch.manual_seed(0)
        torch.testing.assert_close(la, ref.encode_images(px), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(single.alphas_cumprod(), ref.alphas_cumprod())
    # the decoder follows when a preview needs it
    single.ensure_vae_decoder()
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(single.vae.decode(z).sample, ref.vae.decode(z).sample, rtol=1e-5, atol=1e-5)


def test_dtype_and_options(checkpoints):
    ckpt, _ = checkpoints["sd2"]
    half = load_diffusers_model(ckpt, dtype=torch.bfloat16, v_parameterization=False)
    assert half.dtype == torch.bfloat16 and half.text_encoder.dtype == torch.bfloat16
    assert half.vae.dtype == torch.float32 and half.prediction_type == "epsilon"
    params = [p for m in (half.unet, half.vae, half.text_encoder) for p in m.parameters()]
    assert not any(p.is_meta for p in params)
    # SD2's penultimate layer: the checkpoint holds one more OpenCLIP block than the encoder runs
    assert half.text_encoder.config.num_hidden_layers == 2


def test_ckpt_is_read_without_running_code(checkpoints, tmp_path, tokenizer_dir):
    ckpt, _ = write_checkpoint("sd1", tmp_path / "pickled", tokenizer_dir, ckpt=True)
    assert ckpt.suffix == ".ckpt"
    a = load_diffusers_model(ckpt)
    b = load_diffusers_model(checkpoints["sd1"][0])
    vec = {"emb": torch.randn(1, 32)}
    with torch.no_grad():
        assert torch.equal(a.encode_prompts([TOKEN], TOKEN, vec), b.encode_prompts([TOKEN], TOKEN, vec))

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (Path.write_text, (marker, "ran"))

    bad = tmp_path / "evil.ckpt"
    with open(bad, "wb") as f:
        pickle.dump({"state_dict": {}, "x": Evil()}, f)
    with pytest.raises(ModelFolderError, match="refused"):
        load_diffusers_model(bad)
    assert not marker.exists()


def test_refusals_exit_2_and_download_nothing(tmp_path, capsys, checkpoints):
    data = images(tmp_path / "data", f"a photo of {TOKEN}")
    common = ["--set", f"train_data_dir={data}", "--set", f"output_dir={tmp_path / 'out'}",
              "--set", f"token_string={TOKEN}", "--set", "resolution=64", "--set", "max_train_steps=1"]
    code, _, err = train(["--set", "pretrained_model_name_or_path=runwayml/stable-diffusion-v1-5", *common], capsys)
    assert code == 2 and "nothing is downloaded" in err and "runwayml/stable-diffusion-v1-5" in err
    assert ".safetensors" in err  # says what to pass instead
    bad = tmp_path / "evil.ckpt"
    with open(bad, "wb") as f:
        pickle.dump({"state_dict": {}, "x": type("E", (), {"__reduce__": lambda s: (print, ("ran",))})()}, f)
    code, out, err = train(["--set", f"pretrained_model_name_or_path={bad}", *common], capsys)
    assert code == 2 and "refused" in err and "ran" not in out
    other = tmp_path / "model.bin"
    other.write_bytes(b"x")
    code, _, err = train(["--set", f"pretrained_model_name_or_path={other}", *common], capsys)
    assert code == 2 and "pretrained_model_name_or_path" in err
    # a yaml beside the file that does not describe it: a clear message, not a traceback
    ckpt, _ = checkpoints["sd1"]
    wrong = tmp_path / "wrong" / ckpt.name
    wrong.parent.mkdir()
    wrong.write_bytes(ckpt.read_bytes())
    wrong.with_suffix(".yaml").write_text(checkpoints["sdxl"][0].with_suffix(".yaml").read_text())
    code, _, err = train(["--set", f"pretrained_model_name_or_path={wrong}", *common], capsys)
    assert code == 2 and "wrong" in err


def readme_examples() -> list[str]:
    """The kohya guide's two commands as TOML, from the README section that shows them."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("<!-- single-file examples -->", 2)[1]
    return re.findall(r"```toml\n(.*?)```", section, flags=re.S)


@pytest.mark.slow
def test_readme_kohya_examples_run_on_tiny_checkpoints(checkpoints, tmp_path, capsys):
    """The seed's two commands, verbatim apart from paths; a short run (the guide's 1600 steps
    would take minutes on CPU), on 64 px images."""
    sd, xl = readme_examples()
    assert 'pretrained_model_name_or_path = "path/to/model.safetensors"' in sd
    assert 'pretrained_model_name_or_path = "path/to/sdxl_model.safetensors"' in xl
    images(tmp_path / "images", "mychar, 1girl, red disc")
    dataset = tmp_path / "dataset_config.toml"
    dataset.write_text(f"""
[general]
shuffle_caption = false
caption_extension = ".txt"
keep_tokens = 1

[[datasets]]
resolution = 64
batch_size = 2
enable_bucket = true
min_bucket_reso = 64

  [[datasets.subsets]]
  image_dir = "{tmp_path / 'images'}"
  caption_extension = ".txt"
  num_repeats = 10
""")
    for example, family, name in ((sd, "sd1", "my_textual_inversion"), (xl, "sdxl", "my_sdxl_textual_inversion")):
        out = tmp_path / f"output-{family}"
        toml = tmp_path / f"{family}.toml"
        toml.write_text(example.replace(f"path/to/{'sdxl_' if family == 'sdxl' else ''}model.safetensors",
                                        str(checkpoints[family][0]))
                        .replace('"dataset_config.toml"', f'"{dataset}"').replace('"output"', f'"{out}"'))
        code, stdout, err = train(["--config_file", str(toml), "--set", "max_train_steps=2"], capsys)
        assert code == 0, err + stdout
        emb = formats.read_embedding(str(out / f"{name}.safetensors"))
        slots = {"clip_l", "clip_g"} if family == "sdxl" else {"emb"}  # tiny widths: no family name
        assert set(emb.vectors) == slots and emb.num_vectors == 4 and emb.step == 2


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_cli_trains_a_single_file_like_the_folder(family, checkpoints, tmp_path, capsys):
    """The same run on the checkpoint and on the folder with its weights learns the same vectors
    (plain SGD: Adam would turn float noise in near-zero gradients into whole steps)."""
    data = images(tmp_path / "data", f"a photo of {TOKEN}, red disc")
    got = {}
    for kind, model in zip(("file", "folder"), checkpoints[family]):
        out = tmp_path / kind
        code, stdout, err = train(["--set", f"pretrained_model_name_or_path={model}", "--set", f"train_data_dir={data}",
                                   "--set", f"output_dir={out}", "--set", f"token_string={TOKEN}",
                                   "--set", "init_word=ball", "--set", "resolution=64", "--set", "max_train_steps=4",
                                   "--set", "learning_rate=2", "--set", "optimizer_type=SGD",
                                   "--set", "seed=3"], capsys)
        assert code == 0, err + stdout
        got[kind] = formats.read_embedding(str(out / f"{TOKEN}.safetensors"))
    start = load_diffusers_model(checkpoints[family][0]).token_embeddings("ball")
    assert set(got["file"].vectors) == ({"clip_l", "clip_g"} if family == "sdxl" else {"emb"})
    for slot, v in got["file"].vectors.items():
        torch.testing.assert_close(v, got["folder"].vectors[slot], rtol=1e-3, atol=1e-4)
        assert (v - start[slot]).abs().max() > 1e-2  # and it did learn



@pytest.mark.parametrize(("name", "family", "unet_params", "prediction"), [
    ("v1-inference", "sd1", 859_520_964, "epsilon"),
    ("v2-inference-v", "sd2", 865_910_724, "v_prediction"),
    ("sd_xl_base", "sdxl", 2_567_463_684, "epsilon"),
    ("sd_xl_v", "sdxl", 2_567_463_684, "v_prediction"),
])
def test_built_in_configs_are_the_real_architectures(name, family, unet_params, prediction):
    """The offline constants give diffusers the real SD1.5 / SD2 / SDXL UNets (built on meta: no memory)."""
    import copy

    from diffusers import UNet2DConditionModel

    from lib_ti.diffusers_backend.single_file import _unet_config
    from lib_ti.diffusers_backend.single_file_configs import STANDARD, Spec

    spec = Spec(family, copy.deepcopy(STANDARD[name]), name)
    with torch.device("meta"):
        unet = UNet2DConditionModel(**_unet_config(spec))
    assert sum(p.numel() for p in unet.parameters()) == unet_params and spec.prediction() == prediction


def test_the_family_is_guessed_as_a1111_does(tmp_path):
    from lib_ti.diffusers_backend.single_file_configs import describe

    unet, vae = {"model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3)}, {"first_stage_model.encoder.x": (1,)}
    sd1 = {**unet, **vae, "cond_stage_model.transformer.text_model.x": (1,)}
    sd2 = {**unet, **vae, "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight": (3072, 1024)}
    xl = {**unet, **vae, "conditioner.embedders.0.transformer.x": (1,), "conditioner.embedders.1.model.ln_final.weight": (1280,)}
    path = tmp_path / "m.safetensors"
    assert describe(path, sd1).family == "sd1" and describe(path, sd1).prediction() == "epsilon"
    spec = describe(path, sd2)
    assert spec.family == "sd2" and spec.detect_v  # eps or v: A1111's UNet test decides at load
    assert describe(path, xl).prediction() == "epsilon" and describe(path, {**xl, "v_pred": ()}).prediction() == "v_prediction"
    refusals = {"refiner": {**unet, **vae, "conditioner.embedders.0.model.ln_final.weight": (1280,)},
                "inpainting": {**sd1, "model.diffusion_model.input_blocks.0.0.weight": (320, 9, 3, 3)},
                "no UNet": {k: v for k, v in sd1.items() if "diffusion_model" not in k}}
    for what, shapes in refusals.items():
        with pytest.raises(ModelFolderError, match=what.split()[-1]):
            describe(path, shapes)
    # a yaml beside the file wins over the guess
    path.with_suffix(".yaml").write_text("model:\n  params:\n    cond_stage_config:\n"
                                         "      target: ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder\n")
    with pytest.raises(ModelFolderError, match="m.yaml"):
        describe(path, sd1)  # it says SD2, the weights have no OpenCLIP


def test_old_clip_key_layout_loads(checkpoints, tmp_path):
    """SD1 files saved with old transformers have no `text_model.` level; A1111 renames it, so do we."""
    from safetensors.torch import load_file, save_file

    ckpt, _ = checkpoints["sd1"]
    sd = {k.replace("cond_stage_model.transformer.text_model.", "cond_stage_model.transformer."): v
          for k, v in load_file(str(ckpt)).items()}
    old = tmp_path / ckpt.name
    save_file(sd, str(old))
    old.with_suffix(".yaml").write_text(ckpt.with_suffix(".yaml").read_text())
    vec = {"emb": torch.randn(1, 32)}
    with torch.no_grad():
        a = load_diffusers_model(old).encode_prompts([TOKEN], TOKEN, vec)
        assert torch.equal(a, load_diffusers_model(ckpt).encode_prompts([TOKEN], TOKEN, vec))


def test_training_ckpt_with_lightning_objects_loads_without_them(checkpoints, tmp_path, monkeypatch):
    """sd-v1-4.ckpt-style files pickle lightning's ModelCheckpoint and numpy scalars beside the
    weights (A1111's unpickler lets them through); they load as inert stand-ins, never run."""
    import sys
    import types

    import numpy as np
    from safetensors.torch import load_file

    ran = []
    fake = types.ModuleType("pytorch_lightning.callbacks.model_checkpoint")

    class ModelCheckpoint:
        def __setstate__(self, state):
            ran.append(state)

    ModelCheckpoint.__module__, ModelCheckpoint.__qualname__ = fake.__name__, "ModelCheckpoint"
    fake.ModelCheckpoint = ModelCheckpoint
    for name in ("pytorch_lightning", "pytorch_lightning.callbacks", fake.__name__):
        monkeypatch.setitem(sys.modules, name, fake if name == fake.__name__ else types.ModuleType(name))
    ckpt, _ = checkpoints["sd1"]
    path = tmp_path / ckpt.with_suffix(".ckpt").name
    cb = ModelCheckpoint()
    cb.__dict__["monitor"] = "val/loss"
    torch.save({"state_dict": load_file(str(ckpt)), "global_step": np.int64(470000),
                "callbacks": {ModelCheckpoint: {"best": cb}}}, path)
    monkeypatch.delitem(sys.modules, fake.__name__)  # as on a machine without lightning
    path.with_suffix(".yaml").write_text(ckpt.with_suffix(".yaml").read_text())
    vec = {"emb": torch.randn(1, 32)}
    with torch.no_grad():
        a = load_diffusers_model(path).encode_prompts([TOKEN], TOKEN, vec)
        assert torch.equal(a, load_diffusers_model(ckpt).encode_prompts([TOKEN], TOKEN, vec))
    assert not ran
    # the stand-ins open no door: anything else in such a file is still refused, unrun
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (Path.write_text, (marker, "x"))

    monkeypatch.setitem(sys.modules, fake.__name__, fake)
    torch.save({"state_dict": {}, "callbacks": {ModelCheckpoint: {}}, "x": Evil()}, path)
    with pytest.raises(ModelFolderError, match="refused"):
        load_diffusers_model(path)
    assert not marker.exists()


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_preview_loads_the_decoder_and_takes_long_prompts(family, checkpoints):
    """CLI previews from a checkpoint: the VAE decoder comes on first use; a prompt of two chunks
    beside a one-chunk negative prompt renders (both are encoded to the same length)."""
    from lib_ti.diffusers_backend.preview import render

    model = load_diffusers_model(checkpoints[family][0])
    assert model.vae.decoder is None
    vec = {k: torch.randn(1, w) for k, w in model.slots().items()}
    image = render(model, TOKEN, vec, " ".join(["cat"] * 80) + f" {TOKEN}", negative_prompt="blurry",
                   width=64, height=64, steps=2)
    assert image.size == (64, 64) and model.vae.decoder is not None


def test_cheap_check_before_loading(checkpoints, tmp_path):
    """check_model_path: what loading would refuse, from headers and json only."""
    from lib_ti.diffusers_backend.load import check_model_path

    assert [check_model_path(checkpoints[f][0]) for f in FAMILIES] == FAMILIES
    assert check_model_path(checkpoints["sdxl"][1]) == "sdxl"
    with pytest.raises(ModelFolderError, match="nothing is downloaded"):
        check_model_path("stabilityai/stable-diffusion-xl-base-1.0")
    (tmp_path / "x.safetensors").write_bytes(b"not a header")
    with pytest.raises(ModelFolderError, match="safetensors"):
        check_model_path(tmp_path / "x.safetensors")
