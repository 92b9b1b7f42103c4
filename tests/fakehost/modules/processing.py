"""modules/processing.py: txt2img as the trainer's previews use it, and the class-level cond caches.

The caches are keyed on the prompt text and sampling parameters, not on embedding contents, so a
changed embedding under the same name keeps old conditioning until they are reset (host-api.md
§4.7). Sampling here is a few deterministic DDIM steps with classifier-free guidance."""

import random

import numpy as np
import torch
from modules import devices, sd_hijack, shared
from PIL import Image


class SdConditioning(list):
    """prompt_parser.SdConditioning: a list of prompts that carries the image size (SDXL uses it)."""

    def __init__(self, prompts, is_negative_prompt=False, width=None, height=None):
        super().__init__(prompts)
        self.is_negative_prompt = is_negative_prompt
        self.width = width
        self.height = height


def txt2img_image_conditioning(sd_model, x, width, height):
    if sd_model.model.conditioning_key in {"hybrid", "concat"}:
        # a blank, fully masked image: mask channel of ones + the VAE latents of a 0.5 grey image
        grey = torch.ones(x.shape[0], 3, height, width, device=x.device) * 0.5
        latents = sd_model.get_first_stage_encoding(sd_model.encode_first_stage(grey * 2 - 1))
        return torch.nn.functional.pad(latents, (0, 0, 0, 0, 1, 0), value=1.0).to(x.dtype)
    return x.new_zeros(x.shape[0], 5, 1, 1, dtype=x.dtype, device=x.device)


class Processed:
    def __init__(self, p, images, seed):
        self.images = images
        self.prompt = p.prompt
        self.seed = seed
        self.info = f"{p.prompt}\nSteps: {p.steps}, Sampler: {p.sampler_name}, CFG scale: {p.cfg_scale}, Seed: {seed}"


class StableDiffusionProcessing:
    cached_uc = [None, None]
    cached_c = [None, None]

    def __init__(self, sd_model=None, prompt="", negative_prompt="", steps=20, sampler_name="Euler a",
                 cfg_scale=7.0, seed=-1, width=512, height=512, do_not_save_grid=False, do_not_save_samples=False,
                 do_not_reload_embeddings=False, **kwargs):
        self.sd_model = sd_model
        self.prompt = prompt
        self.negative_prompt = negative_prompt
        self.steps = int(steps)
        self.sampler_name = sampler_name
        self.cfg_scale = float(cfg_scale)
        self.seed = int(seed)
        self.width = int(width)
        self.height = int(height)
        self.do_not_save_grid = do_not_save_grid
        self.do_not_save_samples = do_not_save_samples
        self.do_not_reload_embeddings = do_not_reload_embeddings
        self.extra = kwargs
        self.cached_uc = StableDiffusionProcessing.cached_uc
        self.cached_c = StableDiffusionProcessing.cached_c

    def close(self):
        self.c = None
        self.uc = None
        if not shared.opts.persistent_cond_cache:
            StableDiffusionProcessing.cached_c = [None, None]
            StableDiffusionProcessing.cached_uc = [None, None]

    def cached_params(self, prompts):
        m = self.sd_model
        return (tuple(prompts), self.steps, self.width, self.height, getattr(m, "sd_model_hash", None),
                shared.opts.CLIP_stop_at_last_layers, shared.opts.emphasis)

    def get_conds_with_caching(self, prompts, cache):
        params = self.cached_params(prompts)
        if cache[0] is not None and cache[0] == params:
            return cache[1]
        with devices.autocast():
            cache[1] = self.sd_model.get_learned_conditioning(prompts)
        cache[0] = params
        return cache[1]

    def setup_conds(self):
        prompts = SdConditioning([self.prompt], width=self.width, height=self.height)
        negatives = SdConditioning([self.negative_prompt], width=self.width, height=self.height,
                                   is_negative_prompt=True)
        self.uc = self.get_conds_with_caching(negatives, self.cached_uc)
        self.c = self.get_conds_with_caching(prompts, self.cached_c)


class StableDiffusionProcessingTxt2Img(StableDiffusionProcessing):
    cached_hr_uc = [None, None]
    cached_hr_c = [None, None]

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.cached_hr_uc = StableDiffusionProcessingTxt2Img.cached_hr_uc
        self.cached_hr_c = StableDiffusionProcessingTxt2Img.cached_hr_c

    def close(self):
        super().close()
        if not shared.opts.persistent_cond_cache:
            StableDiffusionProcessingTxt2Img.cached_hr_uc = [None, None]
            StableDiffusionProcessingTxt2Img.cached_hr_c = [None, None]


def process_images(p):
    m = p.sd_model or shared.sd_model
    p.sd_model = m
    seed = p.seed if p.seed >= 0 else random.randrange(2**31)
    state = shared.state
    with torch.no_grad():
        if not p.do_not_reload_embeddings:
            sd_hijack.model_hijack.embedding_db.load_textual_inversion_embeddings()
        sd_hijack.model_hijack.clear_comments()
        p.setup_conds()
        x = torch.randn((1, 4, p.height // 8, p.width // 8), generator=torch.Generator().manual_seed(seed))
        x = x.to(devices.device)
        a = m.alphas_cumprod.to(devices.device, torch.float32)
        ts = torch.linspace(999, 0, max(1, p.steps)).round().long().tolist()
        state.sampling_steps = len(ts)
        for i, t in enumerate(ts):
            if state.interrupted or state.skipped:
                break
            tt = torch.full((1,), t, device=devices.device, dtype=torch.long)
            eps_c = m.apply_model(x, tt, p.c)
            eps_u = m.apply_model(x, tt, p.uc)
            eps = eps_u + p.cfg_scale * (eps_c - eps_u)
            a_t = a[t]
            a_prev = a[ts[i + 1]] if i + 1 < len(ts) else torch.tensor(1.0, device=a.device)
            x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
            x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
            state.sampling_step = i + 1
        img = ((m.decode_first_stage(x)[0].float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    image = Image.fromarray(np.ascontiguousarray(img.permute(1, 2, 0).cpu().numpy()))
    state.nextjob()
    return Processed(p, [image], seed)
