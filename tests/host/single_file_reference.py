"""Reference outputs of a tiny checkpoint computed by the host's own ldm/sgm classes: run with the host's python.

    <host python> tests/host/single_file_reference.py --tiny-dir TINY --family sd1|sd2|sdxl --out OUT.safetensors

TINY is what make_tiny_checkpoint.py wrote. The model is built from the .yaml beside the checkpoint
with the host's `instantiate_from_config` and loaded strictly from the file; the script writes the
text conditioning of PROMPT, the UNet's output and the VAE encoder's mean for fixed inputs, so
test_real_host_single_file.py can compare lib_ti's single-file loader with them. Nothing of the
host is copied.
"""

from __future__ import annotations

import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
PROMPT = "a photo of a cat, red disc"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--host-dir", default=os.environ.get("TI_TRAINER_HOST_DIR", ""))
    ap.add_argument("--tiny-dir", required=True)
    ap.add_argument("--family", choices=["sd1", "sd2", "sdxl"], required=True)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    os.environ["HF_HOME"] = os.path.join(os.path.abspath(a.tiny_dir), "hf-home")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    sys.path.insert(0, HERE)
    import make_tiny_checkpoint as mtc

    mtc._host_paths(os.path.abspath(a.host_dir))
    mtc._patch_from_pretrained()  # the text weights come from the checkpoint below
    import torch
    from omegaconf import OmegaConf
    from safetensors.torch import load_file, save_file

    base = os.path.join(a.tiny_dir, "models", "Stable-diffusion", f"tiny-{a.family}")
    cfg = OmegaConf.load(base + ".yaml")
    if a.family == "sdxl":
        from sgm.util import instantiate_from_config
    else:
        from ldm.util import instantiate_from_config
    model = instantiate_from_config(cfg.model).eval()
    missing, _ = model.load_state_dict(load_file(base + ".safetensors"), strict=False)
    assert not missing, missing[:5]
    for m in model.modules():  # ldm/sgm text embedders default to device "cuda"
        if isinstance(m.__dict__.get("device"), str):
            m.device = "cpu"
    g = torch.Generator().manual_seed(0)
    x, px, t = torch.randn(1, 4, 8, 8, generator=g), torch.rand(1, 3, 64, 64, generator=g) * 2 - 1, torch.tensor([500])
    out = {"x": x, "px": px}
    with torch.no_grad():
        if a.family == "sdxl":
            size = torch.tensor([[64, 64]])
            c = model.conditioner({"txt": [PROMPT], "original_size_as_tuple": size, "target_size_as_tuple": size,
                                   "crop_coords_top_left": torch.tensor([[0, 0]])})
            out.update(cond=c["crossattn"], vector=c["vector"],
                       unet=model.model.diffusion_model(x, t, context=c["crossattn"], y=c["vector"]))
        else:
            c = model.cond_stage_model.encode([PROMPT])
            out.update(cond=c, unet=model.model.diffusion_model(x, t, context=c))
        vae = model.first_stage_model  # ldm and sgm alike: moments = quant_conv(encoder(x)), mean first
        out["vae_mean"] = vae.quant_conv(vae.encoder(px)).chunk(2, dim=1)[0]
    save_file({k: v.float().contiguous() for k, v in out.items()}, a.out)
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
