"""Preview images for the CLI, with the live vectors, through diffusers' own pipelines.

The WebUI renders its previews with the host's txt2img instead; this is the headless path.
Prompt lines and their kohya options are parsed by `lib_ti.sample_prompts`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from diffusers import EulerDiscreteScheduler
from PIL import Image

from lib_ti.diffusers_backend.diffusers_sd import DiffusersModel


@torch.no_grad()
def render(model: DiffusersModel, token: str, vectors: dict[str, torch.Tensor], prompt: str,
           negative_prompt: str = "", width: int = 512, height: int = 512, steps: int = 20,
           cfg_scale: float = 7.0, seed: int = 0) -> Image.Image:
    """One image: our own prompt encoding (vectors spliced in) fed to the family's pipeline as
    prompt embeddings; latents decoded here in fp32, since the VAE always stays fp32."""
    dev = model.device
    vecs = {k: v.to(dev) for k, v in vectors.items()}
    # encoded together, so both get the same number of 75-token chunks (the pipeline needs equal lengths)
    both = model.encode_prompts([prompt, negative_prompt], token, vecs)
    if model.family == "sdxl":
        cond, uncond = (type(both)(both.crossattn[i : i + 1], both.pooled[i : i + 1], None) for i in (0, 1))
    else:
        cond, uncond = both[0:1], both[1:2]
    model.ensure_vae_decoder()
    kw: dict[str, Any] = dict(num_inference_steps=steps, guidance_scale=cfg_scale, width=width, height=height,
                              generator=torch.Generator(device="cpu").manual_seed(seed), output_type="latent")
    scheduler = EulerDiscreteScheduler.from_config(model.scheduler.config)
    if model.family == "sdxl":
        from diffusers import StableDiffusionXLPipeline

        pipe = StableDiffusionXLPipeline(vae=model.vae, text_encoder=model.text_encoder,
                                         text_encoder_2=model.text_encoder_2, tokenizer=model.tokenizer,
                                         tokenizer_2=model.tokenizer_2, unet=model.unet, scheduler=scheduler)
        kw.update(prompt_embeds=cond.crossattn.to(model.dtype), pooled_prompt_embeds=cond.pooled.to(model.dtype),
                  negative_prompt_embeds=uncond.crossattn.to(model.dtype),
                  negative_pooled_prompt_embeds=uncond.pooled.to(model.dtype))
    else:
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline(vae=model.vae, text_encoder=model.text_encoder, tokenizer=model.tokenizer,
                                       unet=model.unet, scheduler=scheduler, safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)
        kw.update(prompt_embeds=cond.to(model.dtype), negative_prompt_embeds=uncond.to(model.dtype))
    pipe.set_progress_bar_config(disable=True)
    latents = pipe(**kw).images
    image = model.vae.decode(latents.float() / model.vae_scale).sample[0]
    arr = ((image.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(np.ascontiguousarray(arr))
