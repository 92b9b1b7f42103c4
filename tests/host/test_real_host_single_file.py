"""Opt-in: the CLI's single-file loader on the checkpoints the real host's ldm/sgm classes wrote.

Skipped unless TI_TRAINER_HOST_DIR names a WebUI root (tests/host/README.md). Uses
TI_TRAINER_HOST_CKPT_DIR (make_tiny_checkpoint.py's output) when set, else writes one. The host's
python computes reference outputs (single_file_reference.py); lib_ti, in this venv, must give the
same text conditioning, UNet output and VAE mean, and train on the file through the CLI.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

HERE = Path(__file__).resolve().parent
HOST = os.environ.get("TI_TRAINER_HOST_DIR", "")
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

pytestmark = [
    pytest.mark.host,
    pytest.mark.skipif(not HOST, reason="set TI_TRAINER_HOST_DIR to a WebUI root (tests/host/README.md)"),
]


def host_run(args: list[str]) -> subprocess.CompletedProcess:
    from test_real_host import host_python

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return subprocess.run([host_python(), *args], capture_output=True, text=True, timeout=900, env=env)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    given = os.environ.get("TI_TRAINER_HOST_CKPT_DIR", "")
    if given and all((Path(given) / "models" / "Stable-diffusion" / f"tiny-{f}.safetensors").is_file()
                     for f in ("sd1", "sd2", "sdxl")):
        return Path(given)
    out = tmp_path_factory.mktemp("tiny")
    r = host_run([str(HERE / "make_tiny_checkpoint.py"), "--out", str(out), "--host-dir", HOST,
                  "--family", "sd1", "sd2", "sdxl"])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return out


def with_heads(tiny: Path, family: str, dest: Path) -> Path:
    """A copy of the checkpoint whose .yaml also names the tiny text encoders' head count (the
    host reads it from its HF cache; real CLIP widths need no such line)."""
    import make_tiny_checkpoint as mtc

    heads = [mtc.tiny_clip_config()["text_config"]["num_attention_heads"]]
    if family != "sd1":
        heads = ([] if family == "sd2" else heads) + [mtc.tiny_open_clip_config()["model_cfg"]["text_cfg"]["heads"]]
    src = tiny / "models" / "Stable-diffusion" / f"tiny-{family}"
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy(src.with_suffix(".safetensors"), dest)
    (dest / f"tiny-{family}.yaml").write_text(src.with_suffix(".yaml").read_text() + f"\nti_trainer:\n  text_encoder_heads: {heads}\n")
    return dest / f"tiny-{family}.safetensors"


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_single_file_loader_matches_the_host(tiny, tmp_path, family, capsys):
    from single_file_fixture import images
    from single_file_reference import PROMPT

    from lib_ti import cli, formats
    from lib_ti.diffusers_backend.load import load_diffusers_model

    ref_file = tmp_path / "ref.safetensors"
    r = host_run([str(HERE / "single_file_reference.py"), "--host-dir", HOST, "--tiny-dir", str(tiny),
                  "--family", family, "--out", str(ref_file)])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    ref = load_file(str(ref_file))
    ckpt = with_heads(tiny, family, tmp_path / "model")
    model = load_diffusers_model(ckpt)
    assert model.family == family and model.prediction_type == ("v_prediction" if family == "sd2" else "epsilon")
    zeros = {k: torch.zeros(1, w) for k, w in model.slots().items()}
    t = torch.tensor([500])
    with torch.no_grad():
        cond = model.encode_prompts([PROMPT], "", zeros)
        if family == "sdxl":
            torch.testing.assert_close(cond.crossattn, ref["cond"], rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(cond.pooled, ref["vector"][:, : cond.pooled.shape[1]], rtol=1e-4, atol=1e-4)
            time_ids = torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]])
            out = model.unet(ref["x"], t, encoder_hidden_states=ref["cond"],
                             added_cond_kwargs={"text_embeds": ref["vector"][:, : cond.pooled.shape[1]],
                                                "time_ids": time_ids}).sample
        else:
            torch.testing.assert_close(cond, ref["cond"], rtol=1e-4, atol=1e-4)
            out = model.unet(ref["x"], t, encoder_hidden_states=ref["cond"]).sample
        torch.testing.assert_close(out, ref["unet"], rtol=1e-4, atol=1e-4)
        mean = model.vae.encode(ref["px"]).latent_dist.mean
        torch.testing.assert_close(mean, ref["vae_mean"], rtol=1e-4, atol=1e-4)
    data = images(tmp_path / "data", "a photo of tiok-ti42, red disc")
    code = cli.main(["train", "--set", f"pretrained_model_name_or_path={ckpt}", "--set", f"train_data_dir={data}",
                     "--set", f"output_dir={tmp_path / 'out'}", "--set", "token_string=tiok-ti42",
                     "--set", "resolution=64", "--set", "max_train_steps=2"])
    assert code == 0, capsys.readouterr().err
    emb = formats.read_embedding(str(tmp_path / "out" / "tiok-ti42.safetensors"))
    assert {k: v.shape[1] for k, v in emb.vectors.items()} == model.slots()
