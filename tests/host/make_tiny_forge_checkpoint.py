"""Write a tiny SD1.5-shaped checkpoint that a real Forge (lllyasviel/stable-diffusion-webui-forge)
detects as SD15 and loads offline, for the opt-in Forge tests.

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


def build(forge_dir: str, out: str, seed: int = 0) -> str:
    sys.argv = [sys.argv[0], "--always-cpu"]  # memory_management probes the device at import
    sys.path[:0] = [forge_dir, os.path.join(forge_dir, "packages_3rdparty")]  # as modules/paths.py
    import safetensors.torch
    import torch
    import transformers
    from backend.nn.unet import IntegratedUNet2DConditionModel
    from backend.nn.vae import IntegratedAutoencoderKL

    torch.manual_seed(seed)
    cfg_dir = os.path.join(forge_dir, "backend", "huggingface", "runwayml", "stable-diffusion-v1-5")
    unet = IntegratedUNet2DConditionModel(
        4, 320, 4, num_res_blocks=[1], channel_mult=[1], num_heads=8, num_head_channels=-1,
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
    a = ap.parse_args()
    if not a.forge_dir:
        ap.error("--forge-dir (or TI_TRAINER_FORGE_DIR) is needed")
    print(build(os.path.abspath(a.forge_dir), a.out, a.seed))
