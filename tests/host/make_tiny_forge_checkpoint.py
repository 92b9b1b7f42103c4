"""Write a tiny SD1.5-shaped checkpoint that a real Forge (lllyasviel/stable-diffusion-webui-forge)
detects as SD15 and loads offline, for the opt-in Forge tests (--family sd2: an SD2 v-prediction
one, see build_sd2, ~1 GB; --family sdxl: a small SDXL one, see build_sdxl, ~2.6 GB, for runs by
hand; --inpaint: the SD1.5 one with a 9-channel UNet input, which Forge takes for inpainting).

    <forge python> tests/host/make_tiny_forge_checkpoint.py --forge-dir FORGE --out FILE.safetensors

Built with Forge's own classes (found under FORGE, run with Forge's python), so the keys are the
ones Forge loads; nothing of Forge is copied here. Forge detects the family from the UNet's shape
(huggingface_guess: 320 model channels, context 768, no label_emb, conv projections), and builds
CLIP-L and the VAE from its bundled SD1.5 configs, so those two are full size; the UNet is one
level with one res block and one transformer block (about 26 M parameters). Random weights, LayerNorm
biases put off zero (the "Original" emphasis divides by the conditioning mean). fp16, about 440 MiB.
"""

from __future__ import annotations

import argparse
import os
import sys


def build_sdxl(forge_dir: str, out: str, seed: int = 0) -> str:
    """The smallest UNet Forge detects as SDXL (KOALA-700M-like: transformer depth [0, 2, 5], one res
    block per level, no middle or output transformers, ~418 M parameters) with full CLIP-L, CLIP-G
    and VAE from Forge's bundled SDXL configs (~1.3 B parameters, ~2.6 GB fp16). The text encoders
    are written in the original checkpoint layout by huggingface_guess's own SDXL converter."""
    import safetensors.torch
    import torch
    import transformers
    from backend.nn.unet import IntegratedUNet2DConditionModel
    from backend.nn.vae import IntegratedAutoencoderKL
    from huggingface_guess import model_list

    torch.manual_seed(seed)
    cfg_dir = os.path.join(forge_dir, "backend", "huggingface", "stabilityai", "stable-diffusion-xl-base-1.0")
    unet = IntegratedUNet2DConditionModel(
        4, 320, 4, num_res_blocks=[1, 1, 1], channel_mult=[1, 2, 4], num_head_channels=64,
        use_spatial_transformer=True, use_linear_in_transformer=True, transformer_depth=[0, 2, 5],
        transformer_depth_middle=-1, transformer_depth_output=[0] * 6, context_dim=2048,
        adm_in_channels=2816, num_classes="sequential")
    clip_l = transformers.CLIPTextModel(transformers.CLIPTextConfig.from_pretrained(os.path.join(cfg_dir, "text_encoder")))
    clip_g = transformers.CLIPTextModelWithProjection(
        transformers.CLIPTextConfig.from_pretrained(os.path.join(cfg_dir, "text_encoder_2")))
    vae = IntegratedAutoencoderKL.from_config(IntegratedAutoencoderKL.load_config(os.path.join(cfg_dir, "vae")))
    with torch.no_grad():
        for mod in [*clip_l.modules(), *clip_g.modules()]:
            if isinstance(mod, torch.nn.LayerNorm):
                mod.bias.uniform_(0.2, 0.6)
    clip = {f"clip_l.transformer.{k}": v for k, v in clip_l.state_dict().items()}
    clip.update({f"clip_g.transformer.{k}": v for k, v in clip_g.state_dict().items()})
    sd = model_list.SDXL.process_clip_state_dict_for_saving(None, clip)
    sd.update({f"model.diffusion_model.{k}": v for k, v in unet.state_dict().items()})
    sd.update({f"first_stage_model.{k}": v for k, v in vae.state_dict().items()})
    sd = {k: (v.detach().to(torch.float16) if v.is_floating_point() else v.detach()).contiguous() for k, v in sd.items()}
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    safetensors.torch.save_file(sd, out)
    return out


def build_sd2(forge_dir: str, out: str, seed: int = 0) -> str:
    """What huggingface_guess takes for SD20 with v prediction: context 1024, 320 channels, linear
    transformer projections, no label_emb, and `output_blocks.11.1.transformer_blocks.0.norm1.bias`
    with a standard deviation above 0.09 (SD20.model_type). So one level of 11 res blocks (12
    output blocks, no downsampling) with a transformer only in the first input and the last output
    block (~80 M parameters), full CLIP-H (Forge's bundled 23-layer config, written in the
    OpenCLIP layout by huggingface_guess's own SD20 converter) and VAE; ~1 GB fp16. Forge
    (dfdcbab6, backend/loader.py:461) calls model_type without the UNet's key prefix, so that check
    never finds the key in a single-file checkpoint and reads eps: as for a real SD2-v checkpoint,
    a `.yaml` beside it with `parameterization: v` (written here too) makes Forge load it as v."""
    import safetensors.torch
    import torch
    import transformers
    from backend.nn.unet import IntegratedUNet2DConditionModel
    from backend.nn.vae import IntegratedAutoencoderKL
    from huggingface_guess import model_list

    torch.manual_seed(seed)
    cfg_dir = os.path.join(forge_dir, "backend", "huggingface", "stabilityai", "stable-diffusion-2-1")
    unet = IntegratedUNet2DConditionModel(
        4, 320, 4, num_res_blocks=[11], channel_mult=[1], num_heads=-1, num_head_channels=64,
        use_spatial_transformer=True, use_linear_in_transformer=True, transformer_depth=[1] + [0] * 10,
        transformer_depth_middle=-1, transformer_depth_output=[1] + [0] * 11, context_dim=1024)  # popped from the end
    clip_h = transformers.CLIPTextModel(transformers.CLIPTextConfig.from_pretrained(os.path.join(cfg_dir, "text_encoder")))
    vae = IntegratedAutoencoderKL.from_config(IntegratedAutoencoderKL.load_config(os.path.join(cfg_dir, "vae")))
    with torch.no_grad():
        for mod in [*clip_h.modules(), *unet.modules()]:
            if isinstance(mod, torch.nn.LayerNorm):
                mod.bias.uniform_(0.2, 0.6)  # std 0.115: SD20.model_type reads v prediction from it
    sd = model_list.SD20.process_clip_state_dict_for_saving(
        None, {f"clip_h.transformer.{k}": v for k, v in clip_h.state_dict().items()})
    sd.update({f"model.diffusion_model.{k}": v for k, v in unet.state_dict().items()})
    sd.update({f"first_stage_model.{k}": v for k, v in vae.state_dict().items()})
    sd = {k: (v.detach().to(torch.float16) if v.is_floating_point() else v.detach()).contiguous() for k, v in sd.items()}
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    safetensors.torch.save_file(sd, out)
    with open(os.path.splitext(out)[0] + ".yaml", "w", encoding="utf-8") as f:
        f.write("model:\n  params:\n    parameterization: v\n")
    return out


def build(forge_dir: str, out: str, seed: int = 0, in_channels: int = 4) -> str:
    import safetensors.torch
    import torch
    import transformers
    from backend.nn.unet import IntegratedUNet2DConditionModel
    from backend.nn.vae import IntegratedAutoencoderKL

    torch.manual_seed(seed)
    cfg_dir = os.path.join(forge_dir, "backend", "huggingface", "runwayml", "stable-diffusion-v1-5")
    unet = IntegratedUNet2DConditionModel(
        in_channels, 320, 4, num_res_blocks=[1], channel_mult=[1], num_heads=8, num_head_channels=-1,
        use_spatial_transformer=True, transformer_depth=[1], transformer_depth_middle=1,
        transformer_depth_output=[1, 1], context_dim=768)
    text = transformers.CLIPTextModel(transformers.CLIPTextConfig.from_pretrained(os.path.join(cfg_dir, "text_encoder")))
    vae = IntegratedAutoencoderKL.from_config(IntegratedAutoencoderKL.load_config(os.path.join(cfg_dir, "vae")))
    with torch.no_grad():
        for mod in text.modules():
            if isinstance(mod, torch.nn.LayerNorm):
                mod.bias.uniform_(0.2, 0.6)
    sd = {}
    for prefix, module in (("model.diffusion_model.", unet), ("cond_stage_model.transformer.", text),
                           ("first_stage_model.", vae)):
        for k, v in module.state_dict().items():
            sd[prefix + k] = v.detach().to(torch.float16).contiguous()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    safetensors.torch.save_file(sd, out)
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--forge-dir", default=os.environ.get("TI_TRAINER_FORGE_DIR"), required=False)
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--family", choices=("sd1", "sd2", "sdxl"), default="sd1")
    ap.add_argument("--inpaint", action="store_true", help="sd1 with a 9-channel UNet input (an inpainting model)")
    a = ap.parse_args()
    if not a.forge_dir:
        ap.error("--forge-dir (or TI_TRAINER_FORGE_DIR) is needed")
    forge = os.path.abspath(a.forge_dir)
    sys.argv = [sys.argv[0], "--always-cpu"]  # memory_management probes the device at import
    sys.path[:0] = [forge, os.path.join(forge, "packages_3rdparty"),  # as modules/paths.py
                    os.path.join(forge, "repositories", "huggingface_guess")]
    if a.family == "sd1":
        print(build(forge, a.out, a.seed, in_channels=9 if a.inpaint else 4))
    else:
        print({"sd2": build_sd2, "sdxl": build_sdxl}[a.family](forge, a.out, a.seed))
