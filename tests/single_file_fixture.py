"""Tiny single-file checkpoints in the ldm/sgm key layout A1111 saves, written without any host code.

Starts from the random diffusers models (tests.support.random_models) and maps their keys back to
the ldm/sgm layout (the inverse of diffusers' single-file conversion, as diffusers' scripts
convert_diffusers_to_original_stable_diffusion[_sdxl].py do). `write_checkpoint` checks its UNet and
VAE inverse by running diffusers' own ldm->diffusers converters on the result and requiring the
original keys and tensors back. A `.yaml` beside the checkpoint describes the tiny architecture as
the ldm/sgm configs do; the same weights are also saved as a diffusers folder for comparisons.

ldm/sgm normalise with 32 groups everywhere, so the UNet is rebuilt with 32 groups (same weights)
and the VAE with 32 channels a level.
"""

from __future__ import annotations

from pathlib import Path

import torch
import yaml
from diffusers import AutoencoderKL, StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
from diffusers.loaders import single_file_utils as sfu
from PIL import Image, ImageDraw
from safetensors.torch import save_file

from tests.support import random_models

TEXT_PREFIX = {"sd1": ["cond_stage_model.transformer."], "sd2": ["cond_stage_model.model."],
               "sdxl": ["conditioner.embedders.0.transformer.", "conditioner.embedders.1.model."]}


def tiny_parts(family: str, tokenizer_dir, seed: int = 0) -> dict:
    parts = random_models.components("tiny", family, seed, tokenizer_dir=tokenizer_dir)
    unet = UNet2DConditionModel.from_config({**parts["unet"].config, "norm_num_groups": 32})
    unet.load_state_dict(parts["unet"].state_dict())  # GroupNorm weights do not depend on the group count
    parts["unet"] = unet.eval()
    torch.manual_seed(seed * 1000 + 11)
    vae = AutoencoderKL.from_config({**parts["vae"].config, "block_out_channels": [32] * 4, "norm_num_groups": 32})
    parts["vae"] = vae.eval()
    return parts


# -- diffusers -> ldm keys --------------------------------------------------------------------------
_RESNET = [("in_layers.0", "norm1"), ("in_layers.2", "conv1"), ("out_layers.0", "norm2"), ("out_layers.3", "conv2"),
           ("emb_layers.1", "time_emb_proj"), ("skip_connection", "conv_shortcut")]


def unet_to_ldm(sd: dict, cfg) -> dict:
    lpb, n = cfg.layers_per_block, len(cfg.block_out_channels)
    down_attn = [t.startswith("CrossAttn") for t in cfg.down_block_types]
    up_attn = [t.startswith("CrossAttn") for t in cfg.up_block_types]
    pairs = [("time_embed.0.", "time_embedding.linear_1."), ("time_embed.2.", "time_embedding.linear_2."),
             ("input_blocks.0.0.", "conv_in."), ("out.0.", "conv_norm_out."), ("out.2.", "conv_out."),
             ("label_emb.0.0.", "add_embedding.linear_1."), ("label_emb.0.2.", "add_embedding.linear_2."),
             ("middle_block.1.", "mid_block.attentions.0."), ("middle_block.0.", "mid_block.resnets.0."),
             ("middle_block.2.", "mid_block.resnets.1.")]
    for i in range(n):
        for j in range(lpb):
            k = (lpb + 1) * i + j + 1
            pairs.append((f"input_blocks.{k}.0.", f"down_blocks.{i}.resnets.{j}."))
            if down_attn[i]:
                pairs.append((f"input_blocks.{k}.1.", f"down_blocks.{i}.attentions.{j}."))
        for j in range(lpb + 1):
            k = (lpb + 1) * i + j
            pairs.append((f"output_blocks.{k}.0.", f"up_blocks.{i}.resnets.{j}."))
            if up_attn[i]:
                pairs.append((f"output_blocks.{k}.1.", f"up_blocks.{i}.attentions.{j}."))
        if i < n - 1:
            pairs.append((f"input_blocks.{(lpb + 1) * (i + 1)}.0.op.", f"down_blocks.{i}.downsamplers.0.conv."))
            up = (lpb + 1) * i + lpb
            pairs.append((f"output_blocks.{up}.{2 if up_attn[i] else 1}.", f"up_blocks.{i}.upsamplers.0."))
    out = {}
    for key, value in sd.items():
        ldm, hf = max(((a, b) for a, b in pairs if key.startswith(b)), key=lambda p: len(p[1]))
        rest = key[len(hf):]
        if ".resnets." in hf:
            for a, b in _RESNET:
                rest = rest.replace(b, a)
        out["model.diffusion_model." + ldm + rest] = value
    return out


def vae_to_ldm(sd: dict, cfg) -> dict:
    n, lpb = len(cfg.block_out_channels), cfg.layers_per_block
    pairs = [("nin_shortcut", "conv_shortcut"), ("norm_out", "conv_norm_out"), ("mid.attn_1.", "mid_block.attentions.0.")]
    for i in range(n):
        pairs += [(f"encoder.down.{i}.block.{j}.", f"encoder.down_blocks.{i}.resnets.{j}.") for j in range(lpb)]
        pairs += [(f"decoder.up.{n - 1 - i}.block.{j}.", f"decoder.up_blocks.{i}.resnets.{j}.") for j in range(lpb + 1)]
        if i < n - 1:
            pairs += [(f"down.{i}.downsample.", f"down_blocks.{i}.downsamplers.0."),
                      (f"up.{n - 1 - i}.upsample.", f"up_blocks.{i}.upsamplers.0.")]
    pairs += [(f"mid.block_{i + 1}.", f"mid_block.resnets.{i}.") for i in range(2)]
    attn = [("norm.", "group_norm."), ("q.", "to_q."), ("k.", "to_k."), ("v.", "to_v."), ("proj_out.", "to_out.0.")]
    out = {}
    for key, value in sd.items():
        new = key
        for a, b in pairs:
            new = new.replace(b, a)
        if "attentions" in key:
            for a, b in attn:
                new = new.replace(b, a)
            if value.ndim == 2:  # ldm's attention projections are 1x1 convolutions
                value = value[:, :, None, None]
        out["first_stage_model." + new] = value
    return out


def open_clip_to_ldm(te, prefix: str, extra_layer: bool, seed: int) -> dict:
    """An OpenCLIP text tower's keys; `extra_layer` adds the final block SD2 does not use."""
    t = te.text_model
    out = {prefix + "token_embedding.weight": t.embeddings.token_embedding.weight,
           prefix + "positional_embedding": t.embeddings.position_embedding.weight,
           prefix + "ln_final.weight": t.final_layer_norm.weight, prefix + "ln_final.bias": t.final_layer_norm.bias,
           prefix + "logit_scale": torch.tensor(4.6052)}
    width = t.embeddings.token_embedding.weight.shape[1]
    g = torch.Generator().manual_seed(seed + 99)
    proj = te.text_projection.weight.T if hasattr(te, "text_projection") else torch.randn(width, width, generator=g)
    out[prefix + "text_projection"] = proj
    layers = list(t.encoder.layers)
    for i, layer in enumerate(layers + ([layers[-1]] if extra_layer else [])):
        p = f"{prefix}transformer.resblocks.{i}."
        a = layer.self_attn
        blk = {"ln_1.weight": layer.layer_norm1.weight, "ln_1.bias": layer.layer_norm1.bias,
               "ln_2.weight": layer.layer_norm2.weight, "ln_2.bias": layer.layer_norm2.bias,
               "attn.in_proj_weight": torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]),
               "attn.in_proj_bias": torch.cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias]),
               "attn.out_proj.weight": a.out_proj.weight, "attn.out_proj.bias": a.out_proj.bias,
               "mlp.c_fc.weight": layer.mlp.fc1.weight, "mlp.c_fc.bias": layer.mlp.fc1.bias,
               "mlp.c_proj.weight": layer.mlp.fc2.weight, "mlp.c_proj.bias": layer.mlp.fc2.bias}
        if i == len(layers):  # the unused last block: other weights, so dropping it is what matters
            blk = {k: v + 0.5 * torch.randn(v.shape, generator=g) for k, v in blk.items()}
        out.update({p + k: v for k, v in blk.items()})
    return out


def ldm_yaml(family: str, parts: dict) -> dict:
    u, v = parts["unet"].config, parts["vae"].config
    b0 = u.block_out_channels[0]
    heads = u.attention_head_dim if isinstance(u.attention_head_dim, (list, tuple)) else [u.attention_head_dim] * 2
    unet = {"image_size": u.sample_size, "in_channels": 4, "out_channels": 4, "model_channels": b0,
            "attention_resolutions": [2 ** i for i, t in enumerate(u.down_block_types) if t.startswith("CrossAttn")],
            "num_res_blocks": u.layers_per_block, "channel_mult": [c // b0 for c in u.block_out_channels],
            "num_head_channels": b0 // heads[0], "use_spatial_transformer": True, "transformer_depth": 1,
            "use_linear_in_transformer": bool(u.use_linear_projection), "context_dim": u.cross_attention_dim,
            "legacy": False}
    vae = {"embed_dim": 4, "ddconfig": {"double_z": True, "z_channels": 4, "resolution": v.sample_size,
                                        "in_channels": 3, "out_ch": 3, "ch": v.block_out_channels[0],
                                        "ch_mult": [c // v.block_out_channels[0] for c in v.block_out_channels],
                                        "num_res_blocks": v.layers_per_block, "attn_resolutions": [], "dropout": 0.0}}
    te_heads = [parts[n].config.num_attention_heads for n in ("text_encoder", "text_encoder_2") if n in parts]
    extra = {"ti_trainer": {"text_encoder_heads": te_heads}}
    if family == "sdxl":
        time = {"target": "sgm.modules.encoders.modules.ConcatTimestepEmbedderND",
                "params": {"outdim": u.addition_time_embed_dim}}
        return {"model": {"target": "sgm.models.diffusion.DiffusionEngine", "params": {
            "scale_factor": v.scaling_factor,
            "network_config": {"target": "sgm.modules.diffusionmodules.openaimodel.UNetModel", "params": {
                **unet, "adm_in_channels": u.projection_class_embeddings_input_dim, "num_classes": "sequential"}},
            "conditioner_config": {"target": "sgm.modules.GeneralConditioner", "params": {"emb_models": [
                {"target": "sgm.modules.encoders.modules.FrozenCLIPEmbedder", "params": {"layer": "hidden"}},
                {"target": "sgm.modules.encoders.modules.FrozenOpenCLIPEmbedder2",
                 "params": {"layer": "penultimate", "always_return_pooled": True, "legacy": False}},
                time, time, time]}},
            "first_stage_config": {"params": vae}}}, **extra}
    cond = ({"target": "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder", "params": {"layer": "penultimate"}}
            if family == "sd2" else {"target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder"})
    params = {"linear_start": 0.00085, "linear_end": 0.012, "timesteps": 1000, "scale_factor": v.scaling_factor,
              "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": unet},
              "first_stage_config": {"params": vae}, "cond_stage_config": cond}
    if family == "sd2":
        params["parameterization"] = "v"
    return {"model": {"target": "ldm.models.diffusion.ddpm.LatentDiffusion", "params": params}, **extra}


def ldm_state_dict(family: str, parts: dict, seed: int = 0) -> dict:
    sd = {**unet_to_ldm(parts["unet"].state_dict(), parts["unet"].config),
          **vae_to_ldm(parts["vae"].state_dict(), parts["vae"].config)}
    if family == "sd2":
        sd.update(open_clip_to_ldm(parts["text_encoder"], TEXT_PREFIX["sd2"][0], True, seed))
    else:
        prefix = TEXT_PREFIX[family][0]
        sd.update({prefix + k: v for k, v in parts["text_encoder"].state_dict().items()})
    if family == "sdxl":
        sd.update(open_clip_to_ldm(parts["text_encoder_2"], TEXT_PREFIX["sdxl"][1], False, seed))
    _check_inverse(sd, parts)
    return {k: v.detach().contiguous().clone() for k, v in sd.items()}


def _check_inverse(sd: dict, parts: dict) -> None:
    """diffusers' own converters must give back exactly the diffusers weights."""
    for name, convert, prefix in (("unet", sfu.convert_ldm_unet_checkpoint, "model.diffusion_model."),
                                  ("vae", sfu.convert_ldm_vae_checkpoint, "first_stage_model.")):
        want = parts[name].state_dict()
        got = convert({k: v for k, v in sd.items() if k.startswith(prefix)}, dict(parts[name].config))
        assert set(got) == set(want), (name, sorted(set(got) ^ set(want))[:5])
        assert all(torch.equal(got[k].reshape(want[k].shape), want[k]) for k in want), name


def write_checkpoint(family: str, folder, tokenizer_dir, seed: int = 0, ckpt: bool = False) -> tuple[Path, Path]:
    """(checkpoint file with its .yaml, diffusers folder with the same weights) under `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    parts = tiny_parts(family, tokenizer_dir, seed)
    sd = ldm_state_dict(family, parts, seed)
    path = folder / f"tiny-{family}.{'ckpt' if ckpt else 'safetensors'}"
    if ckpt:
        torch.save({"state_dict": sd, "global_step": 0}, path)
    else:
        save_file(sd, str(path))
    path.with_suffix(".yaml").write_text(yaml.safe_dump(ldm_yaml(family, parts), sort_keys=False), encoding="utf-8")
    pipe_cls = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    extra = {"add_watermarker": False} if family == "sdxl" else {
        "safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
    pipe_cls(**parts, **extra).save_pretrained(str(folder / f"diffusers-{family}"), safe_serialization=True)
    return path, folder / f"diffusers-{family}"


def images(folder: Path, caption: str, n: int = 2) -> Path:
    """n 64 px pictures of a red disc, each with `caption` beside it."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        img = Image.new("RGB", (64, 64), (20, 40, 200))
        ImageDraw.Draw(img).ellipse([8 + 8 * i, 10, 36 + 8 * i, 38], fill=(220, 30, 30))
        img.save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(caption)
    return folder
