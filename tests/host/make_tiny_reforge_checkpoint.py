"""Write tiny checkpoints that a real reForge (Panchovix/stable-diffusion-webui-reForge) detects and
loads offline, for the opt-in reForge tests, plus the offline HF cache its A1111 shell reads.

    <reforge python> tests/host/make_tiny_reforge_checkpoint.py --reforge-dir REFORGE --out TINY [--family sd1 sdxl]

writes TINY/models/Stable-diffusion/tiny-<family>.safetensors and TINY/hf-home/. Built with
reForge's own ldm_patched classes (found under REFORGE, run with its python); nothing of reForge is
copied here. reForge detects the family from the UNet's shape (ldm_patched model_detection against
its supported_models: SD15 needs 320 model channels, context 768, conv projections, no label_emb)
and builds the text encoders from its bundled full-size configs, so CLIP-L (and CLIP-G) and the VAE
are full size; the SD1 UNet is one level with one res block and one transformer block (~26 M
parameters; the file is ~440 MiB fp16). --family sdxl: the smallest UNet it detects as SDXL
(KOALA_700M: transformer depth [0, 2, 5], one res block per level, no middle or output
transformers, ~418 M parameters) with CLIP-L, CLIP-G and the VAE: ~2.6 GB, minutes on a CPU.
Random weights; LayerNorm biases off zero (the "Original" emphasis divides by the conditioning mean).
"""

from __future__ import annotations

import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
UNETS = {
    "sd1": dict(num_res_blocks=[1], channel_mult=[1], num_heads=8, num_head_channels=-1, transformer_depth=[1],
                transformer_depth_middle=1, transformer_depth_output=[1, 1], context_dim=768),
    "sdxl": dict(num_res_blocks=[1, 1, 1], channel_mult=[1, 2, 4], num_head_channels=64, use_linear_in_transformer=True,
                 transformer_depth=[0, 2, 5], transformer_depth_middle=-1, transformer_depth_output=[0] * 6,
                 context_dim=2048, adm_in_channels=2816, num_classes="sequential"),
}
VAE = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
       "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}


def _initialise(module, seed: int) -> None:
    """ldm_patched's layers skip weight init (their reset_parameters does nothing): run torch's."""
    import torch

    torch.manual_seed(seed)
    kinds = (torch.nn.Linear, torch.nn.Conv2d, torch.nn.GroupNorm, torch.nn.LayerNorm, torch.nn.Embedding)
    with torch.no_grad():
        for mod in module.modules():
            for kind in kinds:
                if isinstance(mod, kind):
                    kind.reset_parameters(mod)
                    break


def _text_encoder(config: str, seed: int, projection: bool = False):
    import torch
    import transformers

    torch.manual_seed(seed)
    cls = transformers.CLIPTextModelWithProjection if projection else transformers.CLIPTextModel
    model = cls(transformers.CLIPTextConfig.from_json_file(config))
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, torch.nn.LayerNorm):
                mod.bias.uniform_(0.2, 0.6)
    return model


def build(reforge: str, family: str, out: str, seed: int = 0) -> str:
    import safetensors.torch
    import torch
    from ldm_patched.ldm.models.autoencoder import AutoencoderKL
    from ldm_patched.ldm.modules.diffusionmodules.openaimodel import UNetModel
    from ldm_patched.modules import supported_models

    unet = UNetModel(image_size=32, in_channels=4, model_channels=320, out_channels=4, use_spatial_transformer=True,
                     legacy=False, **UNETS[family])
    _initialise(unet, seed)
    vae = AutoencoderKL(ddconfig=VAE, embed_dim=4)
    _initialise(vae, seed + 1)
    configs = os.path.join(reforge, "ldm_patched", "modules")
    clip_l = _text_encoder(os.path.join(configs, "sd1_clip_config.json"), seed + 2)
    if family == "sd1":
        sd = {f"cond_stage_model.transformer.{k}": v for k, v in clip_l.state_dict().items()}
    else:  # the checkpoint layout (OpenCLIP keys for clip_g) by reForge's own SDXL converter
        clip_g = _text_encoder(os.path.join(configs, "clip_config_bigg.json"), seed + 3, projection=True)
        clip = {f"clip_l.transformer.{k}": v for k, v in clip_l.state_dict().items()}
        clip.update({f"clip_g.transformer.{k}": v for k, v in clip_g.state_dict().items()})
        sd = supported_models.SDXL.process_clip_state_dict_for_saving(None, clip)
    sd.update({f"model.diffusion_model.{k}": v for k, v in unet.state_dict().items()})
    sd.update({f"first_stage_model.{k}": v for k, v in vae.state_dict().items()})
    sd = {k: (v.detach().to(torch.float16) if v.is_floating_point() else v.detach()).contiguous() for k, v in sd.items()}
    path = os.path.join(out, "models", "Stable-diffusion", f"tiny-{family}.safetensors")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    safetensors.torch.save_file(sd, path)
    return path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reforge-dir", default=os.environ.get("TI_TRAINER_REFORGE_DIR", ""))
    ap.add_argument("--out", required=True, help="folder to write hf-home/ and models/ into")
    ap.add_argument("--family", nargs="+", choices=sorted(UNETS), default=["sd1"])
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    if not a.reforge_dir:
        ap.error("--reforge-dir (or TI_TRAINER_REFORGE_DIR) is needed")
    out, reforge = os.path.abspath(a.out), os.path.abspath(a.reforge_dir)
    sys.path[:0] = [HERE, os.path.dirname(os.path.dirname(HERE))]  # make_tiny_checkpoint, lib_ti
    from make_tiny_checkpoint import write_clip_l_hf_cache

    write_clip_l_hf_cache(os.path.join(out, "hf-home"))  # the A1111 shell's CLIP-L tokenizer
    sys.argv = [sys.argv[0], "--always-cpu"]  # ldm_patched's model_management probes the device at import
    sys.path.insert(0, reforge)
    from ldm_patched.modules import args_parser

    args_parser.args, _ = args_parser.parser.parse_known_args()  # what reForge's initialize_forge does
    for family in a.family:
        print(f"wrote {build(reforge, family, out, a.seed)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
