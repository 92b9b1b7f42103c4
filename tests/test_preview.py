"""CLI previews: kohya's prompt-line options and real renders with the live vectors."""

import torch

from lib_ti.config import TrainConfig
from lib_ti.diffusers_backend.preview import render
from lib_ti.embedding import Embedding
from lib_ti.sample_prompts import parse_line as parse_prompt_line
from lib_ti.tokens import init_vectors
from lib_ti.train_cli import render_samples


def test_kohya_prompt_options():
    assert parse_prompt_line("a photo of tok --n blurry, dark --w 768 --h 512 --d 5 --l 6.5 --s 12") == {
        "prompt": "a photo of tok", "negative_prompt": "blurry, dark", "width": 768, "height": 512,
        "seed": 5, "cfg_scale": 6.5, "steps": 12}
    assert parse_prompt_line("plain prompt --w abc") == {"prompt": "plain prompt"}


def test_render_follows_the_vectors(tiny_sd1):
    # What the UNet is conditioned on is compared (with margin), not the uint8 images: a tiny random
    # model may round two different renders to the same bytes.
    seen: list[torch.Tensor] = []

    def watch(_module, args, kwargs):
        seen.append(kwargs["encoder_hidden_states"].detach().clone())

    vecs = init_vectors(tiny_sd1, "ball", 1)
    other_vecs = {"emb": vecs["emb"] + torch.randn(vecs["emb"].shape, generator=torch.Generator().manual_seed(0))}
    hook = tiny_sd1.unet.register_forward_pre_hook(watch, with_kwargs=True)
    try:
        a = render(tiny_sd1, "mytok123", vecs, "a photo of mytok123", width=64, height=64, steps=3, seed=1)
        n = len(seen)
        again = render(tiny_sd1, "mytok123", vecs, "a photo of mytok123", width=64, height=64, steps=3, seed=1)
        render(tiny_sd1, "mytok123", other_vecs, "a photo of mytok123", width=64, height=64, steps=3, seed=1)
    finally:
        hook.remove()
    assert a.size == (64, 64) and a.tobytes() == again.tobytes()
    first, other = seen[0], seen[2 * n]
    cond = tiny_sd1.encode_prompts(["a photo of mytok123"], "mytok123", vecs)
    assert first.shape[0] == 2 and torch.allclose(first[1], cond[0], atol=1e-5)  # [uncond, cond] under CFG
    assert (other[1] - first[1]).abs().max() > 1e-2 and torch.equal(other[0], first[0])


def test_sdxl_samples_written(tiny_sdxl, tmp_path):
    cfg = TrainConfig.from_dict({"token_string": "mytok123", "train_data_dir": str(tmp_path), "resolution": 64,
                                 "output_dir": str(tmp_path / "out"),
                                 "sample_prompts": "mytok123 on a table --s 2\nmytok123 --s 2 --w 128"})
    emb = Embedding({k: v for k, v in init_vectors(tiny_sdxl, "ball", 2).items()}, step=7)
    paths = render_samples(cfg, tiny_sdxl, emb, 7)
    assert [p.rsplit("/", 1)[-1] for p in paths] == ["mytok123-000007-0.png", "mytok123-000007-1.png"]
    from PIL import Image

    assert Image.open(paths[1]).size == (128, 64)
    assert torch.isfinite(torch.tensor(list(Image.open(paths[0]).getdata()), dtype=torch.float32)).all()
