"""The tiny models the stand-in Forge builds (modules/sd_models.forge_model_reload, under
torch.inference_mode, so every weight is an inference tensor as in Forge): random CLIP text
encoders with the real vocabulary and a diffusers VAE (tests/support/random_models.py) around
the `backend` stand-ins, shaped like Forge's diffusion engines (backend/diffusion_engine/sd15.py,
sdxl.py): forge_objects (unet patcher -> KModel -> diffusion_model + predictor, clip, vae), one
text engine per encoder with its own embedding database."""

from types import SimpleNamespace

import torch
from backend import memory_management
from backend.nn.unet import IntegratedUNet2DConditionModel, Timestep
from backend.text_processing.classic_engine import ClassicTextProcessingEngine

SIZE_DIM = 8  # Timestep(256) in Forge's SDXL


class Predictor(torch.nn.Module):
    def __init__(self, alphas_cumprod, prediction_type="epsilon"):
        super().__init__()
        self.prediction_type = prediction_type
        self.register_buffer("alphas_cumprod", alphas_cumprod)
        self.register_buffer("sigmas", ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5)


class KModel(torch.nn.Module):
    def __init__(self, diffusion_model, predictor, storage_dtype=torch.float32):
        super().__init__()
        self.diffusion_model = diffusion_model
        self.predictor = predictor
        self.storage_dtype = storage_dtype
        self.computation_dtype = torch.float32


class TextEncoder(torch.nn.Module):
    """IntegratedCLIP: the HF text model under `.transformer`."""

    def __init__(self, transformer):
        super().__init__()
        self.transformer = transformer


class ForgeObjects:
    def __init__(self, unet, clip, vae, clipvision=None):
        self.unet, self.clip, self.vae, self.clipvision = unet, clip, vae, clipvision

    def shallow_copy(self):
        return ForgeObjects(self.unet, self.clip, self.vae, self.clipvision)


class Engine:
    """ForgeDiffusionEngine with what processing and the trainer use."""

    is_sd1 = is_sd2 = is_sdxl = is_sd3 = False

    def __init__(self, unet, encoders, tokenizers, vae, inpaint=False):
        cond = torch.nn.Module()
        for k, enc in encoders.items():
            setattr(cond, k, enc)
        clip = SimpleNamespace(cond_stage_model=cond, tokenizer=SimpleNamespace(**tokenizers),
                               patcher=SimpleNamespace(model=cond))
        self.forge_objects = ForgeObjects(SimpleNamespace(model=unet), clip, SimpleNamespace(first_stage_model=vae))
        self.forge_objects_original = self.forge_objects.shallow_copy()
        self.forge_objects_after_applying_lora = self.forge_objects.shallow_copy()
        self.is_inpaint = inpaint
        self.first_stage_model = self.cond_stage_model = None

    def _engines(self):
        return [getattr(self, a) for a in ("text_processing_engine", "text_processing_engine_l",
                                           "text_processing_engine_g") if hasattr(self, a)]

    def set_clip_skip(self, clip_skip):
        for e in self._engines():
            e.clip_skip = clip_skip

    @torch.inference_mode()
    def encode_first_stage(self, x):
        vae = self.forge_objects.vae.first_stage_model
        return vae.encode(x.float()).latent_dist.mean * vae.config.scaling_factor

    @torch.inference_mode()
    def decode_first_stage(self, x):
        vae = self.forge_objects.vae.first_stage_model
        return vae.decode(x / vae.config.scaling_factor).sample


class StableDiffusion(Engine):
    is_sd1 = True

    def __init__(self, parts, unet, embeddings_dir, **kw):
        enc = TextEncoder(parts["text_encoder"])
        super().__init__(unet, {"clip_l": enc}, {"clip_l": parts["tokenizer"]}, parts["vae"], **kw)
        self.text_processing_engine = ClassicTextProcessingEngine(
            enc, parts["tokenizer"], embedding_dir=embeddings_dir, embedding_key="clip_l",
            embedding_expected_shape=enc.transformer.config.hidden_size)

    @torch.inference_mode()
    def get_learned_conditioning(self, prompt):
        memory_management.load_model_gpu(self.forge_objects.clip.patcher)
        return self.text_processing_engine(prompt)


class StableDiffusionXL(Engine):
    is_sdxl = True

    def __init__(self, parts, unet, embeddings_dir, refiner=False, **kw):
        enc_l, enc_g = TextEncoder(parts["text_encoder"]), TextEncoder(parts["text_encoder_2"])
        width = enc_l.transformer.config.hidden_size + enc_g.transformer.config.hidden_size
        encoders = {"clip_g": enc_g} if refiner else {"clip_l": enc_l, "clip_g": enc_g}
        super().__init__(unet, encoders, {"clip_l": parts["tokenizer"], "clip_g": parts["tokenizer_2"]},
                         parts["vae"], **kw)
        if not refiner:
            self.text_processing_engine_l = ClassicTextProcessingEngine(
                enc_l, parts["tokenizer"], embedding_dir=embeddings_dir, embedding_key="clip_l",
                embedding_expected_shape=width, minimal_clip_skip=2, clip_skip=2, final_layer_norm=False)
        self.text_processing_engine_g = ClassicTextProcessingEngine(
            enc_g, parts["tokenizer_2"], embedding_dir=embeddings_dir, embedding_key="clip_g",
            embedding_expected_shape=width, text_projection=True, minimal_clip_skip=2, clip_skip=2,
            return_pooled=True, final_layer_norm=False)
        self.embedder = Timestep(SIZE_DIM)

    @torch.inference_mode()
    def get_learned_conditioning(self, prompt):
        from modules import shared

        memory_management.load_model_gpu(self.forge_objects.clip.patcher)
        cond_l = self.text_processing_engine_l(prompt)
        cond_g, pooled = self.text_processing_engine_g(prompt)
        w = getattr(prompt, "width", 1024) or 1024
        h = getattr(prompt, "height", 1024) or 1024
        top, left = shared.opts.sdxl_crop_top, shared.opts.sdxl_crop_left
        out = [self.embedder(torch.Tensor([v])) for v in (h, w, top, left, h, w)]
        flat = torch.flatten(torch.cat(out)).unsqueeze(dim=0).repeat(pooled.shape[0], 1).to(pooled)
        return dict(crossattn=torch.cat([cond_l, cond_g], dim=2), vector=torch.cat([pooled, flat], dim=1))


def build(family, seed, embeddings_dir, prediction_type="epsilon", storage_dtype=torch.float32, refiner=False,
          inpaint=False):
    from diffusers import DDPMScheduler

    from tests.support.random_models import components

    parts = components("tiny", family, seed=seed)
    te = parts["text_encoder"]
    # Forge keeps CLIP's token embedding in fp16 and turns it to float32 per call (classic_engine.py)
    te.get_input_embeddings().half()
    alphas = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).alphas_cumprod
    torch.manual_seed(seed * 1000 + 20)
    if family == "sdxl":
        from transformers import CLIPTextModel

        with_projection = parts["text_encoder_2"]
        te2 = CLIPTextModel(with_projection.config)  # Forge's clip_g: text model + text_projection beside it
        te2.text_model, te2.text_projection = with_projection.text_model, with_projection.text_projection
        parts["text_encoder_2"] = te2
        te2.get_input_embeddings().half()
        ctx = te.config.hidden_size + te2.config.hidden_size
        dm = IntegratedUNet2DConditionModel(ctx, adm_in_channels=te2.config.projection_dim + 6 * SIZE_DIM)
        unet = KModel(dm, Predictor(alphas.float(), prediction_type), storage_dtype)
        return StableDiffusionXL(parts, unet, embeddings_dir, refiner=refiner, inpaint=inpaint)
    dm = IntegratedUNet2DConditionModel(te.config.hidden_size)
    unet = KModel(dm, Predictor(alphas.float(), prediction_type), storage_dtype)
    return StableDiffusion(parts, unet, embeddings_dir, inpaint=inpaint)
