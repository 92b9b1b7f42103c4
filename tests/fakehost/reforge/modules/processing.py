"""modules/processing.py in reForge: txt2img as the trainer's previews and the tests use it.
Where it differs from A1111 (and the A1111 stand-in): conditioning and sampling run under
torch.inference_mode, through forge_objects.unet (loaded by model_management first), and the
batch loop reads p.scripts.alwayson_scripts without checking p.scripts for None, so a job built
without a script runner fails there. The cond caches are 3-element lists (args, cond, infotext)
that close() resets to 2-element ones, as reForge's do. Sampling is a few deterministic DDIM steps."""

import random

import numpy as np
import torch
from ldm_patched.modules import model_management
from PIL import Image

from modules import devices, sd_hijack, shared


class SdConditioning(list):
    def __init__(self, prompts, is_negative_prompt=False, width=None, height=None):
        super().__init__(prompts)
        self.is_negative_prompt = is_negative_prompt
        self.width = width
        self.height = height


class Processed:
    def __init__(self, p, images, seed):
        self.images = images
        self.prompt = p.prompt
        self.seed = seed
        self.info = f"{p.prompt}\nSteps: {p.steps}, Sampler: {p.sampler_name}, CFG scale: {p.cfg_scale}, Seed: {seed}"


class StableDiffusionProcessing:
    cached_uc = [None, None, None]
    cached_c = [None, None, None]

    def __init__(self, sd_model=None, prompt="", negative_prompt="", steps=20, sampler_name="Euler a",
                 cfg_scale=7.0, seed=-1, width=512, height=512, do_not_save_grid=False, do_not_save_samples=False,
                 do_not_reload_embeddings=False, scripts=None, script_args=None, **kwargs):
        self.sd_model = sd_model
        self.prompt, self.negative_prompt = prompt, negative_prompt
        self.steps, self.sampler_name, self.cfg_scale = int(steps), sampler_name, float(cfg_scale)
        self.seed, self.width, self.height = int(seed), int(width), int(height)
        self.do_not_reload_embeddings = do_not_reload_embeddings
        self.scripts, self.script_args = scripts, script_args  # the dataclass defaults: None
        self.extra_generation_params = {}
        self.cached_uc = StableDiffusionProcessing.cached_uc
        self.cached_c = StableDiffusionProcessing.cached_c

    def close(self):
        self.c = None
        self.uc = None
        if not shared.opts.persistent_cond_cache:
            StableDiffusionProcessing.cached_c = [None, None]
            StableDiffusionProcessing.cached_uc = [None, None]

    def cached_params(self, prompts):
        return (tuple(prompts), self.steps, self.width, self.height, getattr(self.sd_model, "sd_model_hash", None),
                shared.opts.CLIP_stop_at_last_layers, shared.opts.emphasis)

    def get_conds_with_caching(self, prompts, cache):
        params = self.cached_params(prompts)
        if cache[0] is not None and cache[0] == params:
            if len(cache) > 2:
                sd_hijack.model_hijack.extra_generation_params.update(cache[2])
            return cache[1]
        with devices.autocast():
            cache[1] = self.sd_model.get_learned_conditioning(prompts)
            if len(cache) > 2:
                cache[2] = sd_hijack.model_hijack.extra_generation_params
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

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.cached_hr_uc = StableDiffusionProcessingTxt2Img.cached_hr_uc
        self.cached_hr_c = StableDiffusionProcessingTxt2Img.cached_hr_c

    def close(self):
        super().close()
        if not shared.opts.persistent_cond_cache:
            StableDiffusionProcessingTxt2Img.cached_hr_uc = [None, None]
            StableDiffusionProcessingTxt2Img.cached_hr_c = [None, None]


def _eps(unet, x, t, cond):
    if isinstance(cond, dict):
        return unet.model.apply_model(x, t, c_crossattn=cond["crossattn"], y=cond["vector"])
    return unet.model.apply_model(x, t, c_crossattn=cond)


def process_images(p):
    if p.scripts is not None:
        p.scripts.before_process(p)
    m = p.sd_model = p.sd_model or shared.sd_model
    seed = p.seed if p.seed >= 0 else random.randrange(2**31)
    state = shared.state
    if not p.do_not_reload_embeddings:
        sd_hijack.model_hijack.embedding_db.load_textual_inversion_embeddings()
    if p.scripts is not None:
        p.scripts.process(p)
    sd_hijack.model_hijack.clear_comments()
    with torch.inference_mode():
        m.forge_objects = m.forge_objects_original.shallow_copy()
        m.forge_objects = m.forge_objects_after_applying_lora.shallow_copy()
        p.setup_conds()
        # reForge: `next(x for x in p.scripts.alwayson_scripts if ...)`, no None check
        sampling_script = next((x for x in p.scripts.alwayson_scripts
                                if x.name == "advanced model sampling for reforge"), None)
        if sampling_script is not None and p.script_args[sampling_script.args_from:sampling_script.args_to][0]:
            raise NotImplementedError("the stand-in has no zero-terminal-SNR schedule")
        unet = m.forge_objects.unet
        model_management.load_models_gpu([unet])
        x = torch.randn((1, 4, p.height // 8, p.width // 8), generator=torch.Generator().manual_seed(seed))
        a = unet.model.model_sampling.alphas_cumprod.float()
        ts = torch.linspace(999, 0, max(1, p.steps)).round().long().tolist()
        state.sampling_steps = len(ts)
        for i, t in enumerate(ts):
            if state.interrupted or state.skipped:
                break
            tt = torch.full((1,), t, dtype=torch.long)
            eps_c, eps_u = _eps(unet, x, tt, p.c), _eps(unet, x, tt, p.uc)
            eps = eps_u + p.cfg_scale * (eps_c - eps_u)
            a_t = a[t]
            a_prev = a[ts[i + 1]] if i + 1 < len(ts) else torch.tensor(1.0)
            x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
            x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
            state.sampling_step = i + 1
        img = ((m.decode_first_stage(x)[0].float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    image = Image.fromarray(np.ascontiguousarray(img.permute(1, 2, 0).numpy()))
    processed = Processed(p, [image], seed)
    if p.scripts is not None:
        p.scripts.postprocess(p, processed)
    state.nextjob()
    return processed
