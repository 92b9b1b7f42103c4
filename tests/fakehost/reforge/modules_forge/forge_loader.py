"""modules_forge/forge_loader.py: load_model_for_a1111, reForge's Forge-1 hybrid model: the A1111
ldm/sgm shell (the A1111 stand-in's, tests/fakehost/models.py) whose UNet is replaced by an
ldm_patched UNet held in forge_objects.unet, whose VAE encode/decode are swapped for ones that run
under torch.inference_mode (so encoded latents are inference tensors), and whose text encoders
are wrapped here rather than by sd_hijack: token embeddings in sd_hijack.EmbeddingsWithFixes, the
embedders in forge_clip's wrappers; SDXL's clip_g embedder gets an HF-style `transformer`,
`tokenizer` and `text_projection` in place of its OpenCLIP model (a FakeObject)."""

from types import SimpleNamespace

import torch
from ldm_patched.ldm.modules.diffusionmodules.openaimodel import UNetModel
from ldm_patched.modules import model_management
from ldm_patched.modules.model_base import BaseModel
from ldm_patched.modules.model_patcher import ModelPatcher
from modules import sd_hijack
from torch import nn

from modules_forge import forge_clip
from modules_forge.unet_patcher import UnetPatcher


class FakeObject:
    """What reForge instantiates in place of the checkpoint's own UNet / VAE / OpenCLIP."""

    def __init__(self, *args, **kwargs):
        self.visual = None

    def eval(self, *args, **kwargs):
        return self

    def parameters(self, *args, **kwargs):
        return []


class ForgeSD:
    def __init__(self, unet, clip, vae, clipvision):
        self.unet, self.clip, self.vae, self.clipvision = unet, clip, vae, clipvision

    def shallow_copy(self):
        return ForgeSD(self.unet, self.clip, self.vae, self.clipvision)


class _ClipGTransformer(nn.Module):
    """ldm_patched's clip_g text model as forge_clip calls it: `.text_model`, (tokens, output_hidden_states)."""

    def __init__(self, text_model):
        super().__init__()
        self.text_model = text_model

    def forward(self, input_ids, output_hidden_states=False):
        return self.text_model(input_ids=input_ids, output_hidden_states=output_hidden_states)


def _with_fixes(transformer, key="clip_l"):
    emb = transformer.text_model.embeddings
    emb.token_embedding = sd_hijack.EmbeddingsWithFixes(emb.token_embedding, sd_hijack.model_hijack,
                                                        textual_inversion_key=key)
    return transformer


def _wrap_text(sd_model):
    hijack = sd_hijack.model_hijack
    conditioner = getattr(sd_model, "conditioner", None)
    if conditioner is None:  # SD1.5
        _with_fixes(sd_model.cond_stage_model.transformer)
        sd_model.cond_stage_model = forge_clip.CLIP_SD_15_L(sd_model.cond_stage_model, hijack)
        return [sd_model.cond_stage_model.wrapped.transformer]
    from lib_ti.diffusers_backend import vocab

    transformers = []
    for i, embedder in enumerate(conditioner.embedders):
        typename = type(embedder).__name__
        if typename == "FrozenCLIPEmbedder":
            _with_fixes(embedder.transformer)
            conditioner.embedders[i] = forge_clip.CLIP_SD_XL_L(embedder, hijack)
        elif typename == "FrozenOpenCLIPEmbedder2":
            hf = embedder.model.hf
            del embedder.model
            embedder.model = FakeObject()
            embedder.tokenizer = vocab.make_tokenizer(vocab.PAD_OPENCLIP)
            embedder.transformer = _with_fixes(_ClipGTransformer(hf.text_model), "clip_g")
            embedder.text_projection = nn.Parameter(hf.text_projection.weight.detach().t().contiguous())
            conditioner.embedders[i] = forge_clip.CLIP_SD_XL_G(embedder, hijack)
        else:
            continue
        transformers.append(embedder.transformer)
    sd_model.cond_stage_model = conditioner
    return transformers


@torch.no_grad()
def load_model_for_a1111(family, seed=0):
    from fakehost import models

    sd_model = models.build(family, seed)  # the ldm/sgm shell, as instantiate_from_config builds it
    old = sd_model.model.diffusion_model
    label = getattr(old, "label_emb", None)
    torch.manual_seed(seed * 1000 + 21)
    unet = UNetModel(context_dim=old.transformer.transformer_blocks[0].attn2.to_k.in_features,
                     adm_in_channels=label[0].in_features if label is not None else None)
    unet.eval()
    device, offload = model_management.get_torch_device(), model_management.unet_offload_device()
    clip = SimpleNamespace(patcher=ModelPatcher(nn.ModuleList(_wrap_text(sd_model)), device, offload))
    forge_objects = ForgeSD(UnetPatcher(BaseModel(unet, sd_model.alphas_cumprod), device, offload), clip,
                            None, None)
    sd_model.model.diffusion_model = forge_objects.unet.model.diffusion_model
    sd_model.forge_objects = forge_objects
    sd_model.forge_objects_original = forge_objects.shallow_copy()
    sd_model.forge_objects_after_applying_lora = forge_objects.shallow_copy()
    del sd_model.lowvram  # reForge's loader never sets it (A1111's send_model_to_device does)
    scale = sd_model.scale_factor
    vae = sd_model.first_stage_model

    @torch.inference_mode()
    def patched_decode_first_stage(x):
        return vae.decode(x / scale).sample.to(x)

    @torch.inference_mode()
    def patched_encode_first_stage(x):
        return (vae.encode(x).latent_dist.sample() * scale).to(x)

    sd_model.get_first_stage_encoding = lambda x: x
    sd_model.decode_first_stage = patched_decode_first_stage
    sd_model.encode_first_stage = patched_encode_first_stage
    sd_model.ztsnr = False
    return sd_model
