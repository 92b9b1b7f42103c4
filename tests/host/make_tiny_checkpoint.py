"""Write tiny random checkpoints the real WebUI host can load offline, for the opt-in host tests.

    <host python> tests/host/make_tiny_checkpoint.py --out DIR [--host-dir HOST] [--family sd1 sd2 sdxl]

Writes into DIR:
  hf-home/                      an HF cache (point HF_HOME at it) with
    hub/models--openai--clip-vit-large-patch14   tokenizer from the real CLIP BPE vocabulary (the
                                                 file open_clip ships) + a tiny CLIP config
    hub/models--ti-trainer-tests--tiny-open-clip (sdxl) tiny OpenCLIP config + weights for clip_g
    hub/models--ti-trainer-tests--tiny-open-clip-h (sd2) the same for SD2's OpenCLIP-H-like encoder
  models/Stable-diffusion/tiny-sd1.safetensors   + tiny-sd1.yaml   (ldm LatentDiffusion layout)
  models/Stable-diffusion/tiny-sd2.safetensors   + tiny-sd2.yaml   (ldm, 768-v style: v-prediction,
                                                 FrozenOpenCLIPEmbedder, penultimate layer)
  models/Stable-diffusion/tiny-sdxl.safetensors  + tiny-sdxl.yaml  (sgm DiffusionEngine layout)

The checkpoint part builds the models with the host's own `ldm` / `sgm` classes (found under
HOST/repositories, HOST defaults to $TI_TRAINER_HOST_DIR), so the state-dict keys are exactly the
ones the host loads; run it with the host's python. Nothing of the host is copied here.
The tokenizer part (`write_clip_l_hf_cache`) needs no host: only transformers and the open_clip
package files (never imported).

Tiny shapes: CLIP-L text hidden 64 / 2 layers; OpenCLIP (clip_g) text width 96 / 2 layers; SD2's
OpenCLIP text width 80 / 3 layers (penultimate: 2 used); UNet 32
channels, two levels; VAE 32 channels, downscale 8. ldm/sgm initialise some output layers to
zero (`zero_module`), which would make every gradient reaching an embedding zero, so those are
re-randomised.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if REPO not in sys.path:  # run as a script: lib_ti comes from this checkout
    sys.path.insert(0, REPO)

CLIP_L_REPO = "openai/clip-vit-large-patch14"
OPEN_CLIP_REPO = "ti-trainer-tests/tiny-open-clip"  # clip_g, loaded by open_clip as "hf-hub:<repo>"
OPEN_CLIP_H_REPO = "ti-trainer-tests/tiny-open-clip-h"  # SD2's text encoder, the same way
REVISION = "0" * 40  # any 40-hex "commit"; refs/main points at it

CLIP_L_HIDDEN = 64
CLIP_G_WIDTH = 96
CLIP_LAYERS = 2
CLIP_H_WIDTH = 80
CLIP_H_LAYERS = 3
VOCAB_SIZE = 49408


# --------------------------------------------------------------------------- tokenizer (no host needed)

def write_clip_tokenizer(folder: str) -> str:
    """vocab.json, merges.txt and the tokenizer/special-token configs of openai/clip-vit-large-patch14.
    The vocabulary comes from the BPE file open_clip ships (lib_ti.diffusers_backend.vocab, which finds it
    without importing open_clip)."""
    from lib_ti.diffusers_backend.vocab import write_tokenizer_files

    write_tokenizer_files(folder)
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
               "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}
    with open(os.path.join(folder, "special_tokens_map.json"), "w", encoding="utf-8") as f:
        json.dump(special, f)
    with open(os.path.join(folder, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump({**special, "model_max_length": 77, "do_lower_case": True, "errors": "replace",
                   "add_prefix_space": False, "tokenizer_class": "CLIPTokenizer"}, f)
    return folder


def tiny_clip_config(hidden: int = CLIP_L_HIDDEN, layers: int = CLIP_LAYERS) -> dict:
    """A CLIPConfig shaped like the real repo's config.json (model_type "clip" with text and
    vision parts), but tiny. Token ids and the 77 positions are the real ones."""
    text = {"model_type": "clip_text_model", "vocab_size": VOCAB_SIZE, "hidden_size": hidden,
            "intermediate_size": hidden * 4, "num_hidden_layers": layers, "num_attention_heads": 2,
            "max_position_embeddings": 77, "hidden_act": "quick_gelu", "projection_dim": hidden,
            "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1, "layer_norm_eps": 1e-5}
    vision = {"model_type": "clip_vision_model", "hidden_size": 32, "intermediate_size": 64,
              "num_hidden_layers": 1, "num_attention_heads": 2, "image_size": 32, "patch_size": 16,
              "projection_dim": hidden, "hidden_act": "quick_gelu"}
    return {"architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": hidden,
            "text_config": text, "vision_config": vision, "torch_dtype": "float32"}


def _snapshot_dir(hf_home: str, repo: str) -> str:
    repo_dir = os.path.join(hf_home, "hub", "models--" + repo.replace("/", "--"))
    os.makedirs(os.path.join(repo_dir, "refs"), exist_ok=True)
    with open(os.path.join(repo_dir, "refs", "main"), "w") as f:
        f.write(REVISION)
    snap = os.path.join(repo_dir, "snapshots", REVISION)
    os.makedirs(snap, exist_ok=True)
    return snap


def write_clip_l_hf_cache(hf_home: str, hidden: int = CLIP_L_HIDDEN, layers: int = CLIP_LAYERS) -> str:
    """The HF cache entry for openai/clip-vit-large-patch14 under `hf_home` (use it as HF_HOME):
    the real tokenizer plus a tiny config. Returns the snapshot folder."""
    snap = _snapshot_dir(hf_home, CLIP_L_REPO)
    write_clip_tokenizer(snap)
    with open(os.path.join(snap, "config.json"), "w", encoding="utf-8") as f:
        json.dump(tiny_clip_config(hidden, layers), f, indent=1)
    return snap


# --------------------------------------------------------------------------- configs (yaml text)

SD1_YAML = """\
# Tiny SD1 for tests: the layout of configs/v1-inference.yaml with small widths.
model:
  target: ldm.models.diffusion.ddpm.LatentDiffusion
  params:
    linear_start: 0.00085
    linear_end: 0.0120
    num_timesteps_cond: 1
    log_every_t: 200
    timesteps: 1000
    first_stage_key: "jpg"
    cond_stage_key: "txt"
    image_size: 8
    channels: 4
    cond_stage_trainable: false
    conditioning_key: crossattn
    monitor: val/loss_simple_ema
    scale_factor: 0.18215
    use_ema: False
    unet_config:
      target: ldm.modules.diffusionmodules.openaimodel.UNetModel
      params:
        image_size: 8
        in_channels: 4
        out_channels: 4
        model_channels: 32
        attention_resolutions: [ 1, 2 ]
        num_res_blocks: 1
        channel_mult: [ 1, 2 ]
        num_heads: 2
        use_spatial_transformer: True
        transformer_depth: 1
        context_dim: {ctx}
        use_checkpoint: False
        legacy: False
    first_stage_config:
      target: ldm.models.autoencoder.AutoencoderKL
      params:
        embed_dim: 4
        monitor: val/rec_loss
        ddconfig:
          double_z: true
          z_channels: 4
          resolution: 64
          in_channels: 3
          out_ch: 3
          ch: 32
          ch_mult: [ 1, 1, 1, 1 ]
          num_res_blocks: 1
          attn_resolutions: []
          dropout: 0.0
        lossconfig:
          target: torch.nn.Identity
    cond_stage_config:
      target: ldm.modules.encoders.modules.FrozenCLIPEmbedder
"""

SDXL_YAML = """\
# Tiny SDXL for tests: the layout of generative-models configs/inference/sd_xl_base.yaml with
# small widths. clip_l comes from the HF cache entry openai/clip-vit-large-patch14, clip_g from the
# open_clip "hf-hub:{openclip}" cache entry.
model:
  target: sgm.models.diffusion.DiffusionEngine
  params:
    scale_factor: 0.13025
    disable_first_stage_autocast: True
    denoiser_config:
      target: sgm.modules.diffusionmodules.denoiser.DiscreteDenoiser
      params:
        num_idx: 1000
        weighting_config:
          target: sgm.modules.diffusionmodules.denoiser_weighting.EpsWeighting
        scaling_config:
          target: sgm.modules.diffusionmodules.denoiser_scaling.EpsScaling
        discretization_config:
          target: sgm.modules.diffusionmodules.discretizer.LegacyDDPMDiscretization
    network_config:
      target: sgm.modules.diffusionmodules.openaimodel.UNetModel
      params:
        adm_in_channels: {adm}
        num_classes: sequential
        use_checkpoint: False
        in_channels: 4
        out_channels: 4
        model_channels: 32
        attention_resolutions: [ 1, 2 ]
        num_res_blocks: 1
        channel_mult: [ 1, 2 ]
        num_head_channels: 16
        use_spatial_transformer: True
        use_linear_in_transformer: True
        transformer_depth: [ 1, 1 ]
        context_dim: {ctx}
        spatial_transformer_attn_type: softmax
        legacy: False
    conditioner_config:
      target: sgm.modules.GeneralConditioner
      params:
        emb_models:
          - is_trainable: False
            input_key: txt
            target: sgm.modules.encoders.modules.FrozenCLIPEmbedder
            params:
              layer: hidden
              layer_idx: {clip_l_layer}
          - is_trainable: False
            input_key: txt
            target: sgm.modules.encoders.modules.FrozenOpenCLIPEmbedder2
            params:
              arch: hf-hub:{openclip}
              version: null
              freeze: True
              layer: penultimate
              always_return_pooled: True
              legacy: False
          - is_trainable: False
            input_key: original_size_as_tuple
            target: sgm.modules.encoders.modules.ConcatTimestepEmbedderND
            params:
              outdim: 256
          - is_trainable: False
            input_key: crop_coords_top_left
            target: sgm.modules.encoders.modules.ConcatTimestepEmbedderND
            params:
              outdim: 256
          - is_trainable: False
            input_key: target_size_as_tuple
            target: sgm.modules.encoders.modules.ConcatTimestepEmbedderND
            params:
              outdim: 256
    first_stage_config:
      target: sgm.models.autoencoder.AutoencoderKLInferenceWrapper
      params:
        embed_dim: 4
        monitor: val/rec_loss
        ddconfig:
          attn_type: vanilla
          double_z: true
          z_channels: 4
          resolution: 64
          in_channels: 3
          out_ch: 3
          ch: 32
          ch_mult: [ 1, 1, 1, 1 ]
          num_res_blocks: 1
          attn_resolutions: []
          dropout: 0.0
        lossconfig:
          target: torch.nn.Identity
"""

# SD2 (768-v): the layout of stablediffusion's configs/stable-diffusion/v2-inference-v.yaml, small.
SD2_YAML = (SD1_YAML
            .replace("# Tiny SD1 for tests: the layout of configs/v1-inference.yaml with small widths.",
                     "# Tiny SD2-v for tests: the layout of configs/stable-diffusion/v2-inference-v.yaml with small\n"
                     "# widths. The text encoder comes from the open_clip \"hf-hub:{openclip}\" cache entry.")
            .replace("  params:\n    linear_start", "  params:\n    parameterization: \"v\"\n    linear_start")
            .replace("        num_heads: 2\n", "        num_head_channels: 16\n        use_linear_in_transformer: True\n")
            .replace("FrozenCLIPEmbedder\n", "FrozenOpenCLIPEmbedder\n      params:\n        arch: hf-hub:{openclip}\n"
                     "        version: null\n        freeze: True\n        layer: \"penultimate\"\n"))


def tiny_open_clip_config(width: int = CLIP_G_WIDTH, layers: int = CLIP_LAYERS) -> dict:
    """open_clip_config.json for a tiny ViT-bigG/ViT-H-shaped OpenCLIP (only the text tower is kept)."""
    return {
        "model_cfg": {
            "embed_dim": width,
            "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
            "text_cfg": {"context_length": 77, "vocab_size": VOCAB_SIZE, "width": width,
                         "heads": 2, "layers": layers},
        },
        "preprocess_cfg": {"mean": [0.48145466, 0.4578275, 0.40821073],
                           "std": [0.26862954, 0.26130258, 0.27577711]},
    }


# --------------------------------------------------------------------------- checkpoints (host python)

def _host_paths(host_dir: str) -> None:
    for sub in ("repositories/stable-diffusion-stability-ai", "repositories/generative-models"):
        path = os.path.join(host_dir, sub)
        if not os.path.isdir(path):
            raise SystemExit(f"{path} not found: --host-dir / TI_TRAINER_HOST_DIR must be a WebUI root "
                             "whose repositories/ were cloned (a normal first start does that)")
        if path not in sys.path:
            sys.path.insert(0, path)


def _patch_from_pretrained() -> None:
    """In this process only: CLIPTextModel.from_pretrained(repo) builds from the cached config with
    random weights (the cache has no weights, as the host's DisableInitialization expects)."""
    import transformers

    def from_config(cls, name, *args, **kwargs):
        return cls(transformers.CLIPTextConfig.from_pretrained(name))

    transformers.CLIPTextModel.from_pretrained = classmethod(from_config)


def _rerandomise(module, seed: int) -> int:
    """Give every all-zero weight/bias a random value (ldm/sgm zero_module layers, biases): with
    zero output layers no gradient reaches the text conditioning."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    n = 0
    with torch.no_grad():
        for _name, p in module.named_parameters():
            if p.numel() and not p.any():
                if p.dim() > 1:
                    p.copy_(torch.randn(p.shape, generator=gen) * (0.5 / p[0].numel() ** 0.5))
                else:
                    # biases (norms included) off zero, as in a trained model: a text encoder whose final
                    # norm outputs mean ~0 makes the host's emphasis step (z * mean / mean') blow up
                    # gradients
                    p.copy_(0.2 + 0.05 * torch.randn(p.shape, generator=gen))
                n += 1
    return n


def _save(model, path: str) -> None:
    import torch
    from safetensors.torch import save_file

    sd = {k: v.detach().to(torch.float32).contiguous().clone() for k, v in model.state_dict().items()
          if v.dtype.is_floating_point or v.dtype == torch.int64}
    save_file(sd, path)


def make_sd1(out: str, seed: int) -> str:
    import torch
    from ldm.util import instantiate_from_config
    from omegaconf import OmegaConf

    ckpt_dir = os.path.join(out, "models", "Stable-diffusion")
    os.makedirs(ckpt_dir, exist_ok=True)
    yaml_text = SD1_YAML.replace("{ctx}", str(CLIP_L_HIDDEN))
    yaml_path = os.path.join(ckpt_dir, "tiny-sd1.yaml")
    with open(yaml_path, "w") as f:
        f.write(yaml_text)
    torch.manual_seed(seed)
    model = instantiate_from_config(OmegaConf.create(yaml_text).model)
    _rerandomise(model, seed)
    path = os.path.join(ckpt_dir, "tiny-sd1.safetensors")
    _save(model, path)
    return path


def write_open_clip_hf_cache(hf_home: str, repo: str, width: int, layers: int, seed: int) -> None:
    """open_clip reads "hf-hub:<repo>" as open_clip_config.json + weights from the HF cache."""
    import open_clip  # the host's copy; only here, in the host's python
    import torch

    snap = _snapshot_dir(hf_home, repo)
    cfg = tiny_open_clip_config(width, layers)
    with open(os.path.join(snap, "open_clip_config.json"), "w") as f:
        json.dump(cfg, f, indent=1)
    torch.manual_seed(seed)
    clip = open_clip.model.CLIP(**cfg["model_cfg"])
    # Legacy (non-zip) torch format: the host's restricted unpickler (modules/safe.py) rejects the
    # zip entries new torch writes, and open_clip 2.20 reads weights with plain torch.load.
    torch.save(clip.state_dict(), os.path.join(snap, "open_clip_pytorch_model.bin"),
               _use_new_zipfile_serialization=False)


def make_sd2(out: str, hf_home: str, seed: int) -> str:
    """SD2 768-v style: v-prediction, FrozenOpenCLIPEmbedder (penultimate). The text weights in the
    checkpoint (cond_stage_model.model.*) replace the cache entry's when the host loads it."""
    import torch
    from ldm.util import instantiate_from_config
    from omegaconf import OmegaConf

    write_open_clip_hf_cache(hf_home, OPEN_CLIP_H_REPO, CLIP_H_WIDTH, CLIP_H_LAYERS, seed)
    ckpt_dir = os.path.join(out, "models", "Stable-diffusion")
    os.makedirs(ckpt_dir, exist_ok=True)
    yaml_text = SD2_YAML.replace("{ctx}", str(CLIP_H_WIDTH)).replace("{openclip}", OPEN_CLIP_H_REPO)
    with open(os.path.join(ckpt_dir, "tiny-sd2.yaml"), "w") as f:
        f.write(yaml_text)
    torch.manual_seed(seed)
    model = instantiate_from_config(OmegaConf.create(yaml_text).model)
    _rerandomise(model, seed)  # UNet/VAE zero layers and the text side's zero biases (ln_final among them)
    path = os.path.join(ckpt_dir, "tiny-sd2.safetensors")
    _save(model, path)
    return path


def make_sdxl(out: str, hf_home: str, seed: int) -> str:
    from omegaconf import OmegaConf
    from sgm.util import instantiate_from_config

    write_open_clip_hf_cache(hf_home, OPEN_CLIP_REPO, CLIP_G_WIDTH, CLIP_LAYERS, seed)

    ckpt_dir = os.path.join(out, "models", "Stable-diffusion")
    os.makedirs(ckpt_dir, exist_ok=True)
    adm = CLIP_G_WIDTH + 3 * 2 * 256  # pooled clip_g + three (h, w) pairs embedded at 256 each
    yaml_text = (SDXL_YAML.replace("{adm}", str(adm)).replace("{ctx}", str(CLIP_L_HIDDEN + CLIP_G_WIDTH))
                 .replace("{clip_l_layer}", str(CLIP_LAYERS - 1)).replace("{openclip}", OPEN_CLIP_REPO))
    yaml_path = os.path.join(ckpt_dir, "tiny-sdxl.yaml")
    with open(yaml_path, "w") as f:
        f.write(yaml_text)
    model = instantiate_from_config(OmegaConf.create(yaml_text).model)
    _rerandomise(model.model, seed)
    _rerandomise(model.first_stage_model, seed + 1)
    path = os.path.join(ckpt_dir, "tiny-sdxl.safetensors")
    _save(model, path)
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="folder to write hf-home/ and models/ into")
    ap.add_argument("--host-dir", default=os.environ.get("TI_TRAINER_HOST_DIR", ""),
                    help="WebUI root (default $TI_TRAINER_HOST_DIR)")
    ap.add_argument("--family", nargs="+", choices=["sd1", "sd2", "sdxl"], default=["sd1"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tokenizer-only", action="store_true", help="only write the HF cache entry for CLIP-L")
    a = ap.parse_args(argv)

    out = os.path.abspath(a.out)
    hf_home = os.path.join(out, "hf-home")
    # before anything imports transformers / huggingface_hub: they read these once, at import
    os.environ["HF_HOME"] = hf_home
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    write_clip_l_hf_cache(hf_home)
    if a.tokenizer_only:
        print(f"HF_HOME={hf_home}")
        return 0
    if not a.host_dir:
        ap.error("--host-dir or TI_TRAINER_HOST_DIR is needed to build checkpoints")
    _host_paths(os.path.abspath(a.host_dir))
    _patch_from_pretrained()
    for fam in a.family:
        make = {"sd1": lambda: make_sd1(out, a.seed), "sd2": lambda: make_sd2(out, hf_home, a.seed),
                "sdxl": lambda: make_sdxl(out, hf_home, a.seed)}[fam]
        path = make()
        print(f"wrote {path}")
    print(f"HF_HOME={hf_home}")
    print(f"--ckpt-dir {os.path.join(out, 'models', 'Stable-diffusion')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
