"""Which architecture a single-file checkpoint has: the `.yaml` beside it, or A1111's guess.

The standard families' configs are constants here (the parts of the ldm/sgm yaml files that the
conversion reads: v1-inference, v2-inference(-v), sd_xl_base, A1111's sd_xl_v), so nothing is ever
fetched. A `.yaml` with the checkpoint's name beside it wins, as in A1111
(`find_checkpoint_config_near_filename`); it describes anything else, tiny test models included.

Text-encoder widths and depths are read from the weights' shapes; only the head count is not in
the weights. It is width / 64 for every real CLIP/OpenCLIP; other models (tiny test checkpoints)
name it in a top-level section the WebUI ignores:

    ti_trainer:
      text_encoder_heads: 4      # or one per text encoder: [4, 4]
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from lib_ti.prepare import PrepareError

_VAE = {"embed_dim": 4, "ddconfig": {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3,
                                     "out_ch": 3, "ch": 128, "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2,
                                     "attn_resolutions": [], "dropout": 0.0}}
_LDM_SCHEDULE = {"linear_start": 0.00085, "linear_end": 0.012, "timesteps": 1000}
_CLIP_L = "ldm.modules.encoders.modules.FrozenCLIPEmbedder"
_OPEN_CLIP = "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder"


def _sd(context_dim: int, image_size: int, v2: bool, **extra) -> dict:
    unet = {"image_size": image_size, "in_channels": 4, "out_channels": 4, "model_channels": 320,
            "attention_resolutions": [4, 2, 1], "num_res_blocks": 2, "channel_mult": [1, 2, 4, 4],
            "use_spatial_transformer": True, "transformer_depth": 1, "context_dim": context_dim, "legacy": False}
    unet.update({"num_head_channels": 64, "use_linear_in_transformer": True} if v2 else {"num_heads": 8})
    cond = {"target": _OPEN_CLIP, "params": {"freeze": True, "layer": "penultimate"}} if v2 else {"target": _CLIP_L}
    return {"model": {"target": "ldm.models.diffusion.ddpm.LatentDiffusion",
                      "params": {**_LDM_SCHEDULE, **extra, "scale_factor": 0.18215,
                                 "unet_config": {"params": unet}, "first_stage_config": {"params": _VAE},
                                 "cond_stage_config": cond}}}


def _sdxl(v: bool) -> dict:
    time = {"target": "sgm.modules.encoders.modules.ConcatTimestepEmbedderND", "params": {"outdim": 256}}
    scaling = "VScaling" if v else "EpsScaling"
    return {"model": {"target": "sgm.models.diffusion.DiffusionEngine", "params": {
        "scale_factor": 0.13025,
        "denoiser_config": {"params": {"scaling_config": {
            "target": f"sgm.modules.diffusionmodules.denoiser_scaling.{scaling}"}}},
        "network_config": {"params": {
            "adm_in_channels": 2816, "num_classes": "sequential", "in_channels": 4, "out_channels": 4,
            "model_channels": 320, "attention_resolutions": [4, 2], "num_res_blocks": 2, "channel_mult": [1, 2, 4],
            "num_head_channels": 64, "use_linear_in_transformer": True, "transformer_depth": [1, 2, 10],
            "context_dim": 2048, "image_size": 128}},
        "conditioner_config": {"params": {"emb_models": [
            {"target": "sgm.modules.encoders.modules.FrozenCLIPEmbedder", "params": {"layer": "hidden", "layer_idx": 11}},
            {"target": "sgm.modules.encoders.modules.FrozenOpenCLIPEmbedder2", "params": {"layer": "penultimate"}},
            time, time, time]}},
        "first_stage_config": {"params": _VAE}}}}


STANDARD = {
    "v1-inference": _sd(768, 64, False),
    "v2-inference": _sd(1024, 64, True),
    "v2-inference-v": _sd(1024, 96, True, parameterization="v"),
    "sd_xl_base": _sdxl(False),
    "sd_xl_v": _sdxl(True),
}

UNET, VAE = "model.diffusion_model.", "first_stage_model."
SD1_TEXT, SD2_TEXT = "cond_stage_model.transformer.", "cond_stage_model.model."
SDXL_L_TEXT, SDXL_G_TEXT = "conditioner.embedders.0.transformer.", "conditioner.embedders.1.model."
TEXT_PREFIXES = {"sd1": (SD1_TEXT,), "sd2": (SD2_TEXT,), "sdxl": (SDXL_L_TEXT, SDXL_G_TEXT)}


class CheckpointError(PrepareError):
    """A checkpoint that cannot be used, said about `pretrained_model_name_or_path` (CLI exit 2;
    the CLI puts the field name before the message)."""

    def __init__(self, message: str):
        super().__init__("pretrained_model_name_or_path", message)


@dataclass
class Spec:
    """What a checkpoint is: family, the ldm/sgm config it follows and where that came from."""

    family: str  # sd1 | sd2 | sdxl
    config: dict
    source: str  # for messages: "tiny.yaml beside the file" or "standard v1-inference (guessed as A1111 does)"
    detect_v: bool = False  # standard SD2 without a yaml: tell eps from v by running the UNet, as A1111 does

    @property
    def params(self) -> dict:
        return self.config["model"]["params"]

    @property
    def unet_params(self) -> dict:
        return _section(_section(self.params, "unet_config") or _section(self.params, "network_config"), "params")

    def prediction(self) -> str:
        if self.params.get("parameterization") == "v":
            return "v_prediction"
        scaling = str(_section(_section(_section(self.params, "denoiser_config"), "params"), "scaling_config").get("target"))
        return "v_prediction" if scaling.rsplit(".", 1)[-1].startswith("VScaling") else "epsilon"

    def check_numbers(self) -> None:
        """The yaml's plain numbers, which diffusers takes as given and which would otherwise fail
        (or allocate without bound) only once used: the noise schedule, the latent scale, the size."""
        p, where = self.params, self.source

        def num(key: str, default: float, lo: float, hi: float, whole: bool = False, d: dict | None = None) -> None:
            v = (p if d is None else d).get(key, default)
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and (not whole or float(v).is_integer())
            if not ok or not lo <= v <= hi:
                raise CheckpointError(f"{where}: {key} must be a {'whole ' if whole else ''}number in {lo}..{hi}, "
                                      f"got {v!r:.40}")

        num("timesteps", 1000, 1, 100000, whole=True)
        num("linear_start", 0.00085, 1e-8, 1.0)
        num("linear_end", 0.012, 1e-8, 1.0)
        num("scale_factor", 0.18215, 1e-6, 100.0)
        num("image_size", 64, 1, 4096, whole=True, d=self.unet_params)

    def text_heads(self) -> list[int | None]:
        heads = _section(self.config, "ti_trainer").get("text_encoder_heads")
        n = len(TEXT_PREFIXES[self.family])
        if heads is None:
            return [None] * n
        heads = heads if isinstance(heads, list) else [heads] * n
        if len(heads) != n or not all(isinstance(h, int) and h > 0 for h in heads):
            raise CheckpointError(f"{self.source}: ti_trainer.text_encoder_heads must be a positive number or "
                                  f"{n} of them, got {heads!r}")
        return heads

    def sd2_last_layer(self) -> bool:
        """Whether SD2's OpenCLIP runs all its layers: ldm's default `layer: last`; SD2's own yaml
        files (and the standard config here) say `penultimate`, so the last block is dropped."""
        return _section(_section(self.params, "cond_stage_config"), "params").get("layer", "last") == "last"

    def time_embed_dim(self) -> int:
        dims = [_section(m, "params").get("outdim") for m in _emb_models(self.params)
                if "ConcatTimestepEmbedderND" in str(m.get("target"))]
        return int(dims[0]) if dims and isinstance(dims[0], int) and dims[0] > 0 else 256


def _section(d: dict, key: str) -> dict:
    """d[key] as a mapping ({} when absent); a yaml whose section is not one is refused by name."""
    value = d.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise CheckpointError(f"the model yaml's '{key}' must be a mapping, not {type(value).__name__} {value!r:.60}")
    return value


def _emb_models(params: dict) -> list[dict]:
    models = _section(_section(params, "conditioner_config"), "params").get("emb_models") or []
    if not isinstance(models, list) or not all(isinstance(m, dict) for m in models):
        raise CheckpointError("the model yaml's 'emb_models' must be a list of mappings")
    return models


def yaml_beside(path: str | os.PathLike) -> Path | None:
    cand = Path(path).with_suffix(".yaml")
    return cand if cand.is_file() else None


_YAML_MAX = 1 << 20  # ldm/sgm configs are a few KB; a bigger file beside a checkpoint is not one


def read_yaml(path: Path) -> dict:
    try:
        if path.stat().st_size > _YAML_MAX:
            raise CheckpointError(f"{path} is {path.stat().st_size} bytes: too large for a model config")
        cfg = yaml.safe_load(path.read_text(encoding="utf-8"))  # safe_load: data only, never objects
    except (OSError, UnicodeDecodeError, yaml.YAMLError, RecursionError) as e:
        first = " ".join(str(e).split())[:300]  # yaml's messages span lines; one line here
        raise CheckpointError(f"cannot read {path}: {first}") from None
    if not isinstance(cfg, dict) or not isinstance(cfg.get("model"), dict) \
            or not isinstance(cfg["model"].get("params"), dict):
        raise CheckpointError(f"{path} is not an ldm/sgm model config (no model.params)")
    return cfg


def _family_of_config(cfg: dict, where: str) -> str:
    params = cfg["model"]["params"]
    if params.get("network_config"):
        models = _emb_models(params)
        targets = [str(m.get("target", "")).rsplit(".", 1)[-1] for m in models]
        if targets[:2] == ["FrozenCLIPEmbedder", "FrozenOpenCLIPEmbedder2"]:
            return "sdxl"
        raise CheckpointError(f"{where}: an sgm model whose text encoders are {targets[:2]} (an SDXL refiner?); "
                              "embeddings train on SD1, SD2 or the SDXL base")
    target = str(_section(params, "cond_stage_config").get("target", "")).rsplit(".", 1)[-1]
    fam = {"FrozenCLIPEmbedder": "sd1", "FrozenOpenCLIPEmbedder": "sd2"}.get(target)
    if fam is None:
        raise CheckpointError(f"{where}: text encoder '{target or '-'}' is not CLIP-L (SD1) or OpenCLIP-H (SD2)")
    return fam


def describe(path: str | os.PathLike, shapes: dict[str, tuple[int, ...]]) -> Spec:
    """The Spec of the checkpoint at `path` whose tensor shapes are `shapes` (key -> shape)."""
    near = yaml_beside(path)
    if near is not None:
        cfg = read_yaml(near)
        spec = Spec(_family_of_config(cfg, str(near)), cfg, f"{near.name} beside the file")
    else:
        spec = _guess(shapes)
    _check(spec, shapes, path)
    spec.check_numbers()
    return spec


def _guess(shapes: dict[str, tuple[int, ...]]) -> Spec:
    """A1111's guess_model_config_from_state_dict, for the families TI can train."""
    unet_in = shapes.get(UNET + "input_blocks.0.0.weight")
    if UNET + "x_embedder.proj.weight" in shapes:
        raise CheckpointError("an SD3 checkpoint: not supported (SD1, SD2 and the SDXL base are)")
    if SDXL_G_TEXT + "ln_final.weight" in shapes:
        name = "sd_xl_v" if "v_pred" in shapes else "sd_xl_base"
        return Spec("sdxl", copy.deepcopy(STANDARD[name]), f"standard {name} (guessed as A1111 does)")
    if "conditioner.embedders.0.model.ln_final.weight" in shapes:
        raise CheckpointError("an SDXL refiner: embeddings train on the SDXL base")
    qkv = shapes.get(SD2_TEXT + "transformer.resblocks.0.attn.in_proj_weight")
    if qkv is not None and len(qkv) == 2 and qkv[1] == 1024:
        return Spec("sd2", copy.deepcopy(STANDARD["v2-inference"]), "standard v2-inference (guessed as A1111 does)",
                    detect_v=True)
    if unet_in is None:
        raise CheckpointError("not a Stable Diffusion checkpoint: no UNet weights (model.diffusion_model.*)")
    return Spec("sd1", copy.deepcopy(STANDARD["v1-inference"]), "standard v1-inference (guessed as A1111 does)")


def _check(spec: Spec, shapes: dict[str, tuple[int, ...]], path: Any) -> None:
    unet_in = shapes.get(UNET + "input_blocks.0.0.weight")
    if unet_in is None:
        raise CheckpointError(f"'{path}' has no UNet weights (model.diffusion_model.*): not a full SD checkpoint")
    if len(unet_in) == 4 and unet_in[1] != 4:
        kind = {9: "an inpainting", 8: "an instruct-pix2pix"}.get(unet_in[1], f"a {unet_in[1]}-channel")
        raise CheckpointError(f"'{path}' is {kind} model: embeddings train on a plain text-to-image checkpoint")
    for prefix in TEXT_PREFIXES[spec.family]:
        if not any(k.startswith(prefix) for k in shapes):
            raise CheckpointError(f"'{path}' ({spec.family}, from {spec.source}) has no text encoder weights "
                                  f"under '{prefix}'")
    if not any(k.startswith(VAE + "encoder.") for k in shapes):
        raise CheckpointError(f"'{path}' has no VAE weights (first_stage_model.*)")
    _check_widths(spec, shapes, path)


_TOKEN_EMBEDDING = {SD1_TEXT: ("text_model.embeddings.token_embedding.weight", "embeddings.token_embedding.weight"),
                    SDXL_L_TEXT: ("text_model.embeddings.token_embedding.weight",),
                    SD2_TEXT: ("token_embedding.weight",), SDXL_G_TEXT: ("token_embedding.weight",)}


def _check_widths(spec: Spec, shapes: dict[str, tuple[int, ...]], path: Any) -> None:
    """The text encoders must feed the UNet: their widths (summed for SDXL) are its cross-attention
    width, and SDXL's pooled projection plus the size embeddings its label_emb input. A mismatch
    (a text encoder swapped in from another model) would otherwise fail mid-training."""
    widths = []
    for prefix in TEXT_PREFIXES[spec.family]:
        tok = next((shapes[prefix + k] for k in _TOKEN_EMBEDDING[prefix] if prefix + k in shapes), None)
        if tok is None or len(tok) != 2:
            return  # said precisely when the text encoder is built
        widths.append(tok[1])
    context = next((s for k, s in shapes.items() if k.startswith(UNET) and k.endswith(".attn2.to_k.weight")), None)
    if context is not None and len(context) == 2 and context[1] != sum(widths):
        raise CheckpointError(f"'{path}': the text encoder{'s give' if len(widths) > 1 else ' gives'} "
                              f"{'+'.join(map(str, widths))} channels but the UNet attends to {context[1]}: "
                              "the text encoder is not this model's")
    label = shapes.get(UNET + "label_emb.0.0.weight")
    proj = shapes.get(SDXL_G_TEXT + "text_projection")
    if spec.family == "sdxl" and label and proj and len(label) == 2 and len(proj) == 2:
        want = proj[1] + 6 * spec.time_embed_dim()  # pooled text + original/crop/target sizes
        if label[1] != want:
            raise CheckpointError(f"'{path}': the UNet's size/pooled input takes {label[1]} channels, the text "
                                  f"projection and size embeddings give {want}")
