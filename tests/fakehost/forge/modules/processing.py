"""modules/processing.py in Forge: txt2img as the trainer's previews and the tests use it. The
cond caches are 3-element lists (args, cond, infotext); conditioning and sampling run under
torch.inference_mode; the engines' used embeddings reach the infotext as "TI: names"; embedding
databases are never reloaded here (Forge's per-generation reload is commented out)."""

import random

import numpy as np
import torch
from PIL import Image

from modules import sd_models, shared


class SdConditioning(list):
    def __init__(self, prompts, is_negative_prompt=False, width=None, height=None):
        super().__init__(prompts)
        self.is_negative_prompt = is_negative_prompt
        self.width = width
        self.height = height


class Processed:
    def __init__(self, p, images, seed, infotext):
        self.images = images
        self.prompt = p.prompt
        self.seed = seed
        self.info = infotext


class StableDiffusionProcessing:
    cached_uc = [None, None, None]
    cached_c = [None, None, None]

    def __init__(self, sd_model=None, prompt="", negative_prompt="", steps=20, sampler_name="Euler a",
                 cfg_scale=7.0, seed=-1, width=512, height=512, do_not_save_grid=False, do_not_save_samples=False,
                 do_not_reload_embeddings=False, **kwargs):
        self.sd_model = sd_model
        self.prompt, self.negative_prompt = prompt, negative_prompt
        self.steps, self.sampler_name, self.cfg_scale = int(steps), sampler_name, float(cfg_scale)
        self.seed, self.width, self.height = int(seed), int(width), int(height)
        self.extra_generation_params = {}
        self.cached_uc = StableDiffusionProcessing.cached_uc
        self.cached_c = StableDiffusionProcessing.cached_c

    def close(self):
        if not shared.opts.persistent_cond_cache:
            StableDiffusionProcessing.cached_c = [None, None]
            StableDiffusionProcessing.cached_uc = [None, None]

    def get_conds_with_caching(self, prompts, cache):
        from backend.text_processing import classic_engine

        m = shared.sd_model
        params = (tuple(prompts), self.steps, self.width, self.height, m.sd_model_hash,
                  shared.opts.CLIP_stop_at_last_layers, shared.opts.emphasis)
        if cache[0] is not None and cache[0] == params:
            if len(cache) > 2:
                m.extra_generation_params.update(cache[2])
            return cache[1]
        m.set_clip_skip(int(shared.opts.CLIP_stop_at_last_layers))
        cache[1] = m.get_learned_conditioning(prompts)
        extra = classic_engine.last_extra_generation_params.copy()
        m.extra_generation_params.update(extra)
        if len(cache) > 2:
            cache[2] = extra
        classic_engine.last_extra_generation_params = {}
        cache[0] = params
        return cache[1]

    def setup_conds(self):
        prompts = SdConditioning([self.prompt], width=self.width, height=self.height)
        negatives = SdConditioning([self.negative_prompt], width=self.width, height=self.height,
                                   is_negative_prompt=True)
        self.uc = self.get_conds_with_caching(negatives, self.cached_uc)
        self.c = self.get_conds_with_caching(prompts, self.cached_c)


class StableDiffusionProcessingTxt2Img(StableDiffusionProcessing):
    cached_hr_uc = [None, None, None]
    cached_hr_c = [None, None, None]


def _eps(m, x, t, cond):
    dm = m.forge_objects.unet.model.diffusion_model
    if isinstance(cond, dict):
        return dm(x, t.float(), context=cond["crossattn"], y=cond["vector"], transformer_options={})
    return dm(x, t.float(), context=cond, transformer_options={})


def process_images(p):
    from backend import memory_management

    m, _ = sd_models.forge_model_reload()
    p.sd_model = m
    m.extra_generation_params = {}
    seed = p.seed if p.seed >= 0 else random.randrange(2**31)
    state = shared.state
    with torch.inference_mode():
        p.setup_conds()
        fo = m.forge_objects
        memory_management.load_models_gpu([fo.unet])
        x = torch.randn((1, 4, p.height // 8, p.width // 8), generator=torch.Generator().manual_seed(seed))
        a = fo.unet.model.predictor.alphas_cumprod.float()
        ts = torch.linspace(999, 0, max(1, p.steps)).round().long().tolist()
        for i, t in enumerate(ts):
            if state.interrupted or state.skipped:
                break
            tt = torch.full((1,), t, dtype=torch.long)
            eps_c, eps_u = _eps(m, x, tt, p.c), _eps(m, x, tt, p.uc)
            eps = eps_u + p.cfg_scale * (eps_c - eps_u)
            a_t = a[t]
            a_prev = a[ts[i + 1]] if i + 1 < len(ts) else torch.tensor(1.0)
            x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
            x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
        img = ((m.decode_first_stage(x)[0].float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    image = Image.fromarray(np.ascontiguousarray(img.permute(1, 2, 0).numpy()))
    params = {**m.extra_generation_params, **p.extra_generation_params}
    info = f"{p.prompt}\nSteps: {p.steps}, Seed: {seed}" + "".join(f", {k}: {v}" for k, v in params.items())
    state.nextjob()
    return Processed(p, [image], seed, info)
