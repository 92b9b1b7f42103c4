"""Our conditioning equals what diffusers computes at inference, with and without a textual
inversion loaded the way diffusers loads one: proof that a trained embedding works there."""

from __future__ import annotations

import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from safetensors.torch import save_file

from lib_ti.model import SizeCond

TOKEN = "mytok123"
CPU = torch.device("cpu")


def vectors(widths: dict[str, int], n: int, seed: int = 3) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(n, w, generator=g) * 0.02 for k, w in widths.items()}


def exact(a, b):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", ["tiny_sd1", "tiny_sd2v"])
def test_sd_matches_diffusers_textual_inversion(family, request, tmp_path):
    model = request.getfixturevalue(family)
    pipe = StableDiffusionPipeline.from_pretrained(str(request.getfixturevalue(family + "_dir")),
                                                   local_files_only=True, safety_checker=None)
    vec = vectors(model.slots(), n=3)
    path = tmp_path / "learned_embeds.safetensors"
    save_file({TOKEN: vec["emb"]}, str(path))  # diffusers' own {token: [n, width]} format
    pipe.load_textual_inversion(str(path), token=TOKEN)
    prompts = [f"a photo of {TOKEN} on a table", f"{TOKEN}, {TOKEN} style", "no token here"]
    with torch.no_grad():
        ours = model.encode_prompts(prompts, TOKEN, vec)
        other = model.encode_prompts(prompts, TOKEN, vectors(model.slots(), n=3, seed=4))
        assert not torch.allclose(ours[:2], other[:2]) and torch.equal(ours[2], other[2])
        for i, p in enumerate(prompts):
            theirs = pipe.encode_prompt(p, CPU, 1, False)[0]
            exact(ours[i : i + 1], theirs)


def test_sd1_clip_skip_matches_diffusers(tiny_sd1, tiny_sd1_dir):
    from lib_ti.diffusers_backend.load import load_diffusers_model

    skip2 = load_diffusers_model(tiny_sd1_dir, clip_skip=2)
    pipe = StableDiffusionPipeline(**{k: getattr(skip2, k) for k in
                                      ("vae", "text_encoder", "tokenizer", "unet", "scheduler")},
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    with torch.no_grad():
        ours = skip2.encode_prompts(["a photo of a cat"], TOKEN, vectors(skip2.slots(), 1))
        # diffusers counts skipped layers from 0, A1111 and kohya from 1
        exact(ours, pipe.encode_prompt("a photo of a cat", CPU, 1, False, clip_skip=1)[0])
        assert not torch.allclose(ours, tiny_sd1.encode_prompts(["a photo of a cat"], TOKEN,
                                                                vectors(skip2.slots(), 1)))


def sdxl_pipe(model):
    return StableDiffusionXLPipeline(
        vae=model.vae, text_encoder=model.text_encoder, text_encoder_2=model.text_encoder_2,
        tokenizer=model.tokenizer, tokenizer_2=model.tokenizer_2, unet=model.unet, scheduler=model.scheduler,
        add_watermarker=False)


def test_sdxl_conditioning_matches_the_pipeline(tiny_sdxl):
    pipe = sdxl_pipe(tiny_sdxl)
    prompts = ["a photo of a cat", "a watercolor of a lighthouse at dusk"]
    with torch.no_grad():
        cond = tiny_sdxl.encode_prompts(prompts, TOKEN, vectors(tiny_sdxl.slots(), 2))
        embeds, _, pooled, _ = pipe.encode_prompt(prompts, device=CPU, num_images_per_prompt=1,
                                                  do_classifier_free_guidance=False)
    exact(cond.crossattn, embeds)
    exact(cond.pooled, pooled)
    size = SizeCond(original_hw=(96, 80), crop_top_left=(8, 0), target_hw=(64, 64))
    proj = tiny_sdxl.text_encoder_2.config.projection_dim
    theirs = pipe._get_add_time_ids((96, 80), (8, 0), (64, 64), torch.float32, text_encoder_projection_dim=proj)
    exact(tiny_sdxl.time_ids([size, None], 2, (8, 8)),
          torch.cat([theirs, pipe._get_add_time_ids((64, 64), (0, 0), (64, 64), torch.float32, proj)]))


def test_sdxl_matches_diffusers_textual_inversion(tiny_sdxl, tiny_sdxl_dir):
    pipe = StableDiffusionXLPipeline.from_pretrained(str(tiny_sdxl_dir), local_files_only=True)
    vec = vectors(tiny_sdxl.slots(), n=2)
    # the diffusers recipe for an SDXL embedding: one load per text encoder
    pipe.load_textual_inversion(vec["clip_l"], token=TOKEN, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(vec["clip_g"], token=TOKEN, text_encoder=pipe.text_encoder_2,
                                tokenizer=pipe.tokenizer_2)
    prompt = f"a photo of {TOKEN} in the snow"
    with torch.no_grad():
        cond = tiny_sdxl.encode_prompts([prompt], TOKEN, vec)
        embeds, _, pooled, _ = pipe.encode_prompt(prompt, device=CPU, num_images_per_prompt=1,
                                                  do_classifier_free_guidance=False)
    exact(cond.crossattn, embeds)
    # pooled is not compared: HF pools at argmax(input_ids), which the added tokens' ids (> eos) move.


def test_sdxl_predict_uses_size_conditioning(tiny_sdxl):
    lat = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([500])
    with torch.no_grad():
        a = tiny_sdxl.encode_prompts(["a cat"], TOKEN, vectors(tiny_sdxl.slots(), 1))
        b = tiny_sdxl.encode_prompts(["a cat"], TOKEN, vectors(tiny_sdxl.slots(), 1),
                                     [SizeCond((64, 64), (0, 0), (64, 64))])
        c = tiny_sdxl.encode_prompts(["a cat"], TOKEN, vectors(tiny_sdxl.slots(), 1),
                                     [SizeCond((1024, 512), (32, 0), (64, 64))])
        pa, pb, pc = (tiny_sdxl.predict(lat, t, x) for x in (a, b, c))
    exact(pa, pb)  # the default is the uncropped latent size
    assert not torch.allclose(pa, pc)


@pytest.mark.parametrize(("family", "folder"), [("sd2", "tiny_sd2v_dir"), ("sdxl", "tiny_sdxl_dir")])
def test_clip_skip_where_it_does_not_apply_is_said_not_silently_dropped(family, folder, request, caplog):
    from lib_ti.diffusers_backend.load import load_diffusers_model

    with caplog.at_level("INFO", logger="lib_ti"):
        model = load_diffusers_model(request.getfixturevalue(folder), clip_skip=2)
    assert model.family == family
    assert any("clip skip 2 ignored" in r.getMessage() for r in caplog.records), caplog.text
