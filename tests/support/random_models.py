"""Random-weight SD1 / SD2 / SDXL models built from configs: tiny ones for CPU tests and full-size
ones (real SD1.5 / SDXL architectures) for GPU benchmarks. Nothing is downloaded; the tokenizer
is the real CLIP vocabulary (lib_ti/diffusers_backend/vocab.py), so prompts tokenize as with real checkpoints.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from lib_ti.diffusers_backend import vocab
from lib_ti.diffusers_backend.diffusers_sd import DiffusersModel
from lib_ti.diffusers_backend.load import wrap

PRESETS = ("tiny", "sd15", "sdxl")
_ALIASES = {"sd2v": "sd2"}  # the SD2 random models are v-prediction (like SD 2.x 768-v)


def _text(hidden: int, layers: int, heads: int, act: str, projection: int | None = None) -> dict:
    return dict(vocab_size=49408, max_position_embeddings=77, hidden_size=hidden, intermediate_size=4 * hidden,
                num_hidden_layers=layers, num_attention_heads=heads, hidden_act=act,
                projection_dim=projection or hidden, bos_token_id=49406, eos_token_id=49407, pad_token_id=1)


def _vae(blocks: tuple[int, ...], layers: int, groups: int, size: int, scale: float) -> dict:
    # len(blocks) == 4 keeps the real 8x downscale: every block but the last halves the size.
    return dict(in_channels=3, out_channels=3, latent_channels=4, down_block_types=["DownEncoderBlock2D"] * 4,
                up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=list(blocks), layers_per_block=layers,
                norm_num_groups=groups, sample_size=size, scaling_factor=scale)


_TINY_UNET = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
                  down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=(2, 4),
                  norm_num_groups=16)
_TINY_VAE = _vae((16, 16, 32, 32), 1, 8, 64, 0.18215)

# family -> (text encoder configs by pipeline name, unet config, vae config)
CONFIGS: dict[str, dict[str, tuple[dict, dict, dict]]] = {
    "tiny": {
        "sd1": ({"text_encoder": _text(32, 2, 4, "quick_gelu")}, {**_TINY_UNET, "cross_attention_dim": 32},
                _TINY_VAE),
        "sd2": ({"text_encoder": _text(64, 2, 4, "gelu")},
                {**_TINY_UNET, "cross_attention_dim": 64, "use_linear_projection": True}, _TINY_VAE),
        "sdxl": ({"text_encoder": _text(32, 2, 4, "quick_gelu"), "text_encoder_2": _text(64, 2, 4, "gelu", 64)},
                 {**_TINY_UNET, "cross_attention_dim": 96, "use_linear_projection": True,
                  "addition_embed_type": "text_time", "addition_time_embed_dim": 8,
                  "projection_class_embeddings_input_dim": 64 + 6 * 8},
                 {**_TINY_VAE, "scaling_factor": 0.13025}),
    },
    "sd15": {
        "sd1": ({"text_encoder": _text(768, 12, 12, "quick_gelu")},
                dict(sample_size=64, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280),
                     layers_per_block=2, attention_head_dim=8, cross_attention_dim=768,
                     down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                     up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3),
                _vae((128, 256, 512, 512), 2, 32, 512, 0.18215)),
    },
    "sdxl": {
        "sdxl": ({"text_encoder": _text(768, 12, 12, "quick_gelu"),
                  "text_encoder_2": _text(1280, 32, 20, "gelu", 1280)},
                 dict(sample_size=128, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280),
                      layers_per_block=2, attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10),
                      cross_attention_dim=2048, use_linear_projection=True,
                      down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                      up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                      addition_embed_type="text_time", addition_time_embed_dim=256,
                      projection_class_embeddings_input_dim=1280 + 6 * 256),
                 _vae((128, 256, 512, 512), 2, 32, 1024, 0.13025)),
    },
}


def _family(preset: str, family: str) -> str:
    family = _ALIASES.get(family, family)
    if preset not in CONFIGS:
        raise ValueError(f"unknown preset '{preset}'; choose one of {PRESETS}")
    if family not in CONFIGS[preset]:
        raise ValueError(f"preset '{preset}' has no '{family}' model; it has {sorted(CONFIGS[preset])}")
    return family


def _scheduler(family: str) -> DDPMScheduler:
    # SD's training schedule; steps_offset 1 and clip_sample False are what the pipelines expect.
    return DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         prediction_type="v_prediction" if family == "sd2" else "epsilon", clip_sample=False,
                         steps_offset=1)


def _rerandomize_zeros(module: torch.nn.Module) -> None:
    """Give any all-zero weight matrix (zero-initialised output layers) a default init, so a random
    model passes gradients all the way back to the text embedding."""
    for p in module.parameters():
        if p.ndim >= 2 and not bool(p.detach().any()):
            torch.nn.init.kaiming_uniform_(p.data, a=math.sqrt(5))


# Tiny models only. With plain random weights the UNet all but ignores the text (the loss moves by
# ~1% whatever the vectors are), so no test could tell that training learns. Trained SD models
# attend sharply and strongly to the prompt; these gains give a random model that property:
# peaky cross-attention (keys x4) whose outputs dominate the residual stream (x16). The output
# is scaled to std 1.5 on a probe input, above the target's 1, so the vectors have a sizeable,
# text-dependent error to learn away (the validation loss falls 20-45% in 40 steps).
_TINY_KEY_GAIN, _TINY_CROSS_GAIN, _TINY_OUT_STD = 4.0, 16.0, 1.5


@torch.no_grad()
def _make_text_matter(unet: UNet2DConditionModel, seed: int) -> None:
    for name, mod in unet.named_modules():
        if name.endswith("attn2"):  # cross-attention (attn1 is self-attention)
            mod.to_k.weight.mul_(_TINY_KEY_GAIN)
            mod.to_out[0].weight.mul_(_TINY_CROSS_GAIN)
    cfg, dev = unet.config, unet.device
    g = torch.Generator().manual_seed(seed)  # the probe is drawn on the CPU: the same on any device

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, device="cpu").to(dev)

    kw = {}
    if cfg.addition_embed_type == "text_time":
        pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        side = cfg.sample_size * 8.0
        kw["added_cond_kwargs"] = {"text_embeds": randn(2, pooled),
                                   "time_ids": torch.tensor([[side, side, 0.0, 0.0, side, side]] * 2, device=dev)}
    out = unet(randn(2, cfg.in_channels, cfg.sample_size, cfg.sample_size), torch.tensor([100, 800], device=dev),
               encoder_hidden_states=randn(2, 77, cfg.cross_attention_dim), **kw).sample
    scale = _TINY_OUT_STD / float(out.std())
    unet.conv_out.weight.mul_(scale)
    unet.conv_out.bias.mul_(scale)


@torch.no_grad()
def _randomize_final_norm(text_encoder: torch.nn.Module) -> None:
    """A fresh LayerNorm has bias 0, so a random encoder's output averages exactly 0 and the host's
    emphasis rescaling (z * mean / z.mean()) divides 0 by 0. Trained encoders never do that."""
    ln = text_encoder.text_model.final_layer_norm
    ln.bias.normal_(0.1, 0.05, generator=torch.Generator().manual_seed(7))


def components(preset: str = "tiny", family: str = "sd1", seed: int = 0, device: str | torch.device = "cpu",
               tokenizer_dir: str | os.PathLike | None = None) -> dict:
    """Pipeline keyword arguments (unet, vae, text_encoder[_2], tokenizer[_2], scheduler), fp32,
    deterministic for a seed on a given device. Each part has its own seed, so changing one config
    leaves the others' weights as they were."""
    family = _family(preset, family)
    texts, unet_cfg, vae_cfg = CONFIGS[preset][family]
    device = torch.device(device)
    parts: dict = {}
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), device:
        for k, (name, cfg) in enumerate(sorted(texts.items())):
            torch.manual_seed(seed * 1000 + k)
            cls = CLIPTextModelWithProjection if name == "text_encoder_2" else CLIPTextModel
            parts[name] = cls(CLIPTextConfig(**cfg))
        torch.manual_seed(seed * 1000 + 10)
        parts["unet"] = UNet2DConditionModel(**unet_cfg)
        if preset == "tiny" and device.type != "meta":
            _make_text_matter(parts["unet"], seed)
        torch.manual_seed(seed * 1000 + 11)
        parts["vae"] = AutoencoderKL(**vae_cfg)
        for m in parts.values():
            if device.type != "meta":  # meta: shapes only, for checking the full-size configs cheaply
                _rerandomize_zeros(m)
        if preset == "tiny" and device.type != "meta":
            for name in texts:
                _randomize_final_norm(parts[name])
            m.eval()
    parts["tokenizer"] = vocab.make_tokenizer(vocab.PAD_OPENCLIP if family == "sd2" else vocab.PAD_SD1, tokenizer_dir)
    if family == "sdxl":
        parts["tokenizer_2"] = vocab.make_tokenizer(vocab.PAD_OPENCLIP, tokenizer_dir)
    parts["scheduler"] = _scheduler(family)
    return parts


def build_random_model(preset: str = "tiny", family: str = "sd1", seed: int = 0, device: str | torch.device = "cpu",
                       dtype: torch.dtype = torch.float32, clip_skip: int = 1,
                       tokenizer_dir: str | os.PathLike | None = None) -> DiffusersModel:
    """A random-weight TrainableModel. Full-size presets are best built straight on the GPU."""
    family = _family(preset, family)
    parts = components(preset, family, seed, device, tokenizer_dir)
    for name in ("unet", "text_encoder", "text_encoder_2"):
        if name in parts:
            parts[name].to(device, dtype)
    parts["vae"].to(device, torch.float32)
    return wrap(family, parts, clip_skip)


def save_random_model(preset: str, family: str, folder: str | os.PathLike, seed: int = 0,
                      tokenizer_dir: str | os.PathLike | None = None, device: str | torch.device = "cpu") -> Path:
    """Write a complete diffusers folder (model_index.json, fp32 safetensors weights, tokenizers,
    scheduler) that diffusers' own pipelines and `load_diffusers_model` open. `device` only says
    where the weights are initialised (a GPU is much faster for the full-size presets)."""
    family = _family(preset, family)
    parts = components(preset, family, seed, device, tokenizer_dir)
    if family == "sdxl":
        pipe = StableDiffusionXLPipeline(**parts, add_watermarker=False)
    else:
        pipe = StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    folder = Path(folder)
    pipe.save_pretrained(str(folder), safe_serialization=True)
    return folder
