"""Open an A1111-style single-file checkpoint (.safetensors, or .ckpt without running its pickle)
as a TrainableModel: SD1, SD2 (eps or v) and the SDXL base, offline.

The UNet and VAE keys are converted by diffusers' own single-file functions
(convert_ldm_unet_checkpoint / convert_ldm_vae_checkpoint with configs from
create_unet_diffusers_config / create_vae_diffusers_config). The text encoders use diffusers'
key tables (LDM_CLIP_PREFIX_TO_REMOVE, DIFFUSERS_TO_LDM_MAPPING["openclip"]) but not its
text-encoder functions: without accelerate those drop the position_ids buffer that transformers
4.30 (A1111's pin) keeps in the state dict and then fail to load; they also read the text config
by hub id. Here the config comes from the weights' shapes (single_file_configs.py).

Memory: a .safetensors file is read one component at a time, onto the training device; each
model is built on the meta device and takes the converted tensors themselves
(load_state_dict(assign=True)), cast one by one, so no component exists twice. Only the VAE encoder is loaded; the decoder follows when a
preview needs it (ensure_vae_decoder).
"""

from __future__ import annotations

import contextlib
import os
import re
import types
from collections.abc import Iterable
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from diffusers.loaders import single_file_utils as sfu
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from lib_ti import safe_pickle
from lib_ti.diffusers_backend import vocab
from lib_ti.diffusers_backend.diffusers_sd import DiffusersModel
from lib_ti.diffusers_backend.single_file_configs import (
    SD1_TEXT,
    SD2_TEXT,
    SDXL_G_TEXT,
    SDXL_L_TEXT,
    UNET,
    VAE,
    CheckpointError,
    Spec,
    describe,
)

CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt")
VOCAB_SIZE = 49408  # the CLIP BPE vocabulary every SD text encoder uses (vocab.py)
_OLD_CLIP = ("embeddings.", "encoder.", "final_layer_norm.")


class Weights:
    """The tensors of a checkpoint, taken out by key prefix. A .safetensors file is only read for
    the keys taken; a .ckpt is unpickled whole (code-free) and each part released once taken."""

    def __init__(self, path: str | os.PathLike, device: torch.device | str = "cpu"):
        self.path = Path(path)
        suffix = self.path.suffix.lower()
        self._file = None
        self._dict: dict[str, torch.Tensor] = {}
        if suffix == ".safetensors":
            from safetensors import safe_open

            try:
                # straight to the training device: a GPU run never holds the weights in CPU RAM
                self._file = safe_open(str(self.path), framework="pt", device=str(torch.device(device)))
                names = list(self._file.keys())  # a safe_open handle is not iterable
                self.shapes = {k: tuple(self._file.get_slice(k).get_shape()) for k in names}
            except Exception as e:  # safetensors raises its own error types for a bad header
                raise CheckpointError(f"cannot read '{self.path}' as safetensors: {_line(e)}") from None
        elif suffix == ".ckpt":
            obj = _load_ckpt(self.path)
            sd = obj.get("state_dict", obj) if isinstance(obj, dict) else None
            if not isinstance(sd, dict):
                raise CheckpointError(f"'{self.path}' holds no state dict")
            self._dict = {k: v for k, v in sd.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
            self.shapes = {k: tuple(v.shape) for k, v in self._dict.items()}
        else:
            raise CheckpointError(f"'{self.path}': a checkpoint file must end in {' or '.join(CHECKPOINT_SUFFIXES)}")

    def take(self, prefix: str | tuple[str, ...]) -> dict[str, torch.Tensor]:
        """Every tensor whose key starts with `prefix` (keys unchanged); a .ckpt lets go of them."""
        keys = [k for k in self.shapes if k.startswith(prefix)]
        if self._file is not None:
            return {k: self._file.get_tensor(k) for k in keys}
        return {k: self._dict.pop(k) for k in keys if k in self._dict}


class _Inert:
    """Stands in for what a training framework pickled beside the weights (lightning's
    ModelCheckpoint as a dict key, numpy's global_step): built from nothing, never run."""

    def __init__(self, *args, **kwargs) -> None:
        pass

    def __setstate__(self, state) -> None:
        pass


# The globals A1111's own restricted unpickler (modules/safe.py) lets through for training
# checkpoints such as sd-v1-4.ckpt, answered with inert stand-ins instead of the real thing.
# (_codecs.encode only ever feeds numpy's scalar bytes here, so it is a stand-in too.)
_TRAINING_GLOBALS = {("pytorch_lightning.callbacks.model_checkpoint", "ModelCheckpoint"), ("numpy", "dtype"),
                     ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"), ("_codecs", "encode")}


class _CkptUnpickler(safe_pickle._RestrictedUnpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _TRAINING_GLOBALS:
            return _Inert
        return super().find_class(module, name)


_ckpt_pickle = types.ModuleType("lib_ti_ckpt_pickle")
_ckpt_pickle.Unpickler = _CkptUnpickler  # type: ignore[attr-defined]
_ckpt_pickle.load = lambda f, **kw: _CkptUnpickler(f, **kw).load()  # type: ignore[attr-defined]


def _load_ckpt(path: Path):
    """The project's code-free loader; a training checkpoint's framework objects become _Inert."""
    try:
        return safe_pickle.load(str(path))
    except safe_pickle.UnsafeFileError as first:
        if not any(f"{m}.{n}" in str(first) for m, n in _TRAINING_GLOBALS):
            raise CheckpointError(f"refused '{path}': {_line(first)}") from None
    try:
        with open(path, "rb") as f:
            return torch.load(f, map_location="cpu", weights_only=False, pickle_module=_ckpt_pickle)
    except Exception as e:  # the allow-list refused something else too
        raise CheckpointError(f"refused '{path}': {_line(e)}; the file was not loaded") from None


def describe_file(path: Path) -> str:
    """'sd1' | 'sd2' | 'sdxl' ('' for a .ckpt, whose keys are only known once unpickled)."""
    if path.suffix.lower() == ".ckpt":
        return ""
    spec = describe(path, Weights(path).shapes)
    with _config_errors(spec):  # what loading reads from the yaml first, checked without loading
        _unet_config(spec)
        spec.text_heads()
    return spec.family


def load_single_file(path: str | os.PathLike, device: str | torch.device = "cpu",
                     dtype: torch.dtype = torch.float32, clip_skip: int = 1,
                     v_parameterization: bool | None = None) -> DiffusersModel:
    """UNet and text encoders in `dtype`, the VAE encoder in fp32, all on `device`."""
    device = torch.device(device)
    w = Weights(path, device)
    spec = describe(path, w.shapes)
    with _config_errors(spec):
        return _build(path, w, spec, device, dtype, clip_skip, v_parameterization)


@contextlib.contextmanager
def _config_errors(spec: Spec):
    """A yaml value of the wrong kind (a string for a channel count, a missing section) surfaces
    deep in diffusers' config code as a Python error: said here about the config, once."""
    try:
        yield
    except CheckpointError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, AssertionError, IndexError, ZeroDivisionError) as e:
        raise CheckpointError(f"cannot build the model from {spec.source}: {type(e).__name__}: {_line(e)}") from None


def _build(path, w: Weights, spec: Spec, device: torch.device, dtype: torch.dtype, clip_skip: int,
           v_parameterization: bool | None) -> DiffusersModel:
    from lib_ti.diffusers_backend.load import wrap  # load dispatches here; imported late to avoid a cycle

    unet = _unet(w, spec, device, dtype)
    if v_parameterization is not None:
        prediction = "v_prediction" if v_parameterization else "epsilon"
    elif spec.detect_v:
        prediction = "v_prediction" if _is_v(unet) else "epsilon"
    else:
        prediction = spec.prediction()
    parts = {"unet": unet, "vae": _vae(w, spec, device, ("encoder.", "quant_conv.")),
             "scheduler": _scheduler(spec, prediction)}
    heads = spec.text_heads()
    pad = vocab.PAD_OPENCLIP if spec.family == "sd2" else vocab.PAD_SD1
    parts["tokenizer"] = vocab.make_tokenizer(pad)
    if spec.family == "sd1":
        parts["text_encoder"] = _clip_l(w, SD1_TEXT, heads[0], device, dtype)
    elif spec.family == "sd2":
        parts["text_encoder"] = _open_clip(w, SD2_TEXT, heads[0], device, dtype, projection=False,
                                           drop_last=not spec.sd2_last_layer())
    else:
        parts["text_encoder"] = _clip_l(w, SDXL_L_TEXT, heads[0], device, dtype)
        parts["text_encoder_2"] = _open_clip(w, SDXL_G_TEXT, heads[1], device, dtype, projection=True)
        parts["tokenizer_2"] = vocab.make_tokenizer(vocab.PAD_OPENCLIP)
    model = wrap(spec.family, parts, clip_skip, prediction)
    model.source = str(Path(path).resolve())
    model.vae_decoder_loader = lambda: _add_vae_decoder(model.vae, path, spec)
    return model


# -- UNet and VAE: diffusers' converters -------------------------------------------------------------
def _image_size(spec: Spec) -> int:
    """The model's native size in pixels (diffusers' sample_size; only a default for previews)."""
    scale = 2 ** (len(spec.params["first_stage_config"]["params"]["ddconfig"]["ch_mult"]) - 1)
    return int(spec.unet_params.get("image_size") or (128 if spec.family == "sdxl" else 64)) * scale


def _unet_config(spec: Spec) -> dict:
    params = spec.unet_params
    params.setdefault("transformer_depth", 1)  # ldm's default, which diffusers reads unconditionally
    params.setdefault("context_dim", None)
    try:
        cfg = sfu.create_unet_diffusers_config(spec.config, image_size=_image_size(spec))
    except (KeyError, TypeError, AssertionError) as e:
        raise CheckpointError(f"{spec.source}: UNet config incomplete ({type(e).__name__}: {_line(e)})") from None
    if cfg["attention_head_dim"] is None and params.get("num_head_channels", -1) > 0:
        # diffusers derives head counts from num_head_channels only for linear-projection UNets
        cfg["attention_head_dim"] = [params["model_channels"] * m // params["num_head_channels"]
                                     for m in params["channel_mult"]]
    if spec.family == "sdxl":
        # diffusers recognises SDXL by the real context widths (2048/1280); tiny test models differ
        cfg.update(class_embed_type=None, addition_embed_type="text_time",
                   addition_time_embed_dim=spec.time_embed_dim())
    return cfg


def _unet(w: Weights, spec: Spec, device: torch.device, dtype: torch.dtype) -> UNet2DConditionModel:
    cfg = _unet_config(spec)
    with torch.device("meta"):
        unet = UNet2DConditionModel(**cfg)
    _assign(unet, sfu.convert_ldm_unet_checkpoint(w.take(UNET), cfg), device, dtype, "UNet", spec)
    return unet.eval()


def _vae(w: Weights, spec: Spec, device: torch.device, keep: Iterable[str]) -> AutoencoderKL:
    cfg = sfu.create_vae_diffusers_config(spec.config, image_size=_image_size(spec))
    with torch.device("meta"):
        vae = AutoencoderKL(**cfg)
    keep = tuple(keep)
    sd = sfu.convert_ldm_vae_checkpoint(w.take(tuple(VAE + k for k in keep)), cfg)  # only those parts are read
    for name in ("encoder", "quant_conv", "decoder", "post_quant_conv"):
        if name + "." not in keep:
            setattr(vae, name, None)  # not loaded: no meta tensors left behind
    _assign(vae, sd, device, torch.float32, "VAE", spec)
    return vae.eval()


def _add_vae_decoder(vae: AutoencoderKL, path: str | os.PathLike, spec: Spec) -> None:
    dev = next(vae.parameters()).device
    full = _vae(Weights(path, dev), spec, dev, ("decoder.", "post_quant_conv."))
    vae.decoder, vae.post_quant_conv = full.decoder, full.post_quant_conv


@torch.no_grad()
def _is_v(unet: UNet2DConditionModel) -> bool:
    """A1111's is_using_v_parameterization_for_sd2: a v model's output at t=999 on a constant
    input sits far below the input."""
    dev, dt = unet.device, unet.dtype
    x = torch.full((1, 4, 8, 8), 0.5, device=dev, dtype=dt)
    cond = torch.full((1, 2, unet.config.cross_attention_dim), 0.5, device=dev, dtype=dt)
    out = unet(x, torch.tensor([999], device=dev), encoder_hidden_states=cond).sample
    return float((out.float() - x.float()).mean()) < -1


def _scheduler(spec: Spec, prediction: str) -> DDPMScheduler:
    p = spec.params
    return DDPMScheduler(num_train_timesteps=int(p.get("timesteps", 1000)), beta_start=float(p.get("linear_start", 0.00085)),
                         beta_end=float(p.get("linear_end", 0.012)), beta_schedule="scaled_linear",
                         prediction_type=prediction, clip_sample=False, steps_offset=1)


# -- text encoders: diffusers' key tables ----------------------------------------------------------
def _text_config(width: int, layers: int, inner: int, positions: int, vocab_size: int, heads: int | None,
                 act: str, projection: int | None = None) -> CLIPTextConfig:
    if vocab_size != VOCAB_SIZE:
        raise CheckpointError(f"text encoder has {vocab_size} token embeddings, not CLIP's {VOCAB_SIZE}")
    heads = heads or width // 64  # every real CLIP/OpenCLIP: 64 channels a head
    if heads < 1 or width % heads:
        raise CheckpointError(f"text width {width} does not split into {heads} heads; name the head count in the "
                              "yaml (ti_trainer: text_encoder_heads: N)")
    return CLIPTextConfig(vocab_size=vocab_size, hidden_size=width, intermediate_size=inner, num_hidden_layers=layers,
                          num_attention_heads=heads, max_position_embeddings=positions, hidden_act=act,
                          projection_dim=projection or width, layer_norm_eps=1e-5, bos_token_id=49406,
                          eos_token_id=49407, pad_token_id=1)


def _count(keys: Iterable[str], pattern: str) -> int:
    found = {int(m.group(1)) for k in keys if (m := re.match(pattern, k))}
    return max(found) + 1 if found else 0


def _clip_l(w: Weights, prefix: str, heads: int | None, device, dtype) -> CLIPTextModel:
    assert prefix in sfu.LDM_CLIP_PREFIX_TO_REMOVE  # diffusers' own prefixes: the rest is the HF layout
    sd = {k[len(prefix):]: v for k, v in w.take(prefix).items()}
    # checkpoints saved with transformers < 4.x lack the "text_model." level (A1111 renames them too)
    sd = {k if k.startswith("text_model.") or not k.startswith(_OLD_CLIP) else "text_model." + k: v
          for k, v in sd.items()}
    tok = sd.get("text_model.embeddings.token_embedding.weight")
    if tok is None:
        raise CheckpointError(f"no {prefix}text_model.embeddings.token_embedding.weight: not a CLIP-L text encoder")
    cfg = _text_config(tok.shape[1], _count(sd, r"text_model\.encoder\.layers\.(\d+)\."),
                       _need(sd, "text_model.encoder.layers.0.mlp.fc1.weight", prefix).shape[0],
                       _need(sd, "text_model.embeddings.position_embedding.weight", prefix).shape[0], tok.shape[0],
                       heads, "quick_gelu")
    return _text_model(CLIPTextModel, cfg, sd, device, dtype)


def _open_clip(w: Weights, prefix: str, heads: int | None, device, dtype, projection: bool,
               drop_last: bool = False) -> CLIPTextModel:
    ldm = w.take(prefix)
    tok = ldm.get(prefix + "token_embedding.weight")
    if tok is None:
        raise CheckpointError(f"no {prefix}token_embedding.weight: not an OpenCLIP text encoder")
    block = re.escape(prefix) + r"transformer\.resblocks\.(\d+)\."
    layers = _count(ldm, block)
    if drop_last:  # the penultimate layer is the output (+ final norm), as diffusers' SD2 encoder has it
        layers -= 1
        ldm = {k: v for k, v in ldm.items() if not k.startswith(f"{prefix}transformer.resblocks.{layers}.")}
    proj = ldm.get(prefix + "text_projection")
    if projection and proj is None:
        raise CheckpointError(f"no {prefix}text_projection: the SDXL OpenCLIP-bigG needs it")
    cfg = _text_config(tok.shape[1], layers, _need(ldm, f"{prefix}transformer.resblocks.0.mlp.c_fc.weight").shape[0],
                       _need(ldm, prefix + "positional_embedding").shape[0], tok.shape[0], heads, "gelu",
                       int(proj.shape[1]) if projection else None)
    table = sfu.DIFFUSERS_TO_LDM_MAPPING["openclip"]
    sd = {}
    for new, old in table["layers"].items():
        if new == "text_projection.weight" and not projection:
            continue
        if prefix + old in ldm:
            value = ldm.pop(prefix + old)
            sd[new] = value.T if old == "text_projection" else value
    inner = prefix + "transformer."
    for key in [k for k in ldm if k.startswith(inner)]:
        new = key[len(inner):]
        for n, o in table["transformer"].items():
            new = new.replace(o, n)
        value = ldm.pop(key)
        if key.endswith((".in_proj_weight", ".in_proj_bias")):  # fused q,k,v -> three projections
            base, kind = new.rsplit(".in_proj_", 1)
            for name, part in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)):
                sd[f"{base}.{name}.{kind}"] = part
        else:
            sd[new] = value
    return _text_model(CLIPTextModelWithProjection if projection else CLIPTextModel, cfg, sd, device, dtype)


def _need(sd: dict, key: str, prefix: str = "") -> torch.Tensor:
    if key not in sd:
        raise CheckpointError(f"the text encoder lacks {prefix}{key}: the file is incomplete or not this model")
    return sd[key]


def _text_model(cls, cfg: CLIPTextConfig, sd: dict, device, dtype):
    with torch.device("meta"):
        model = cls(cfg)
    positions = torch.arange(cfg.max_position_embeddings, device=device).expand((1, -1))
    if "text_model.embeddings.position_ids" in model.state_dict():  # persistent in transformers 4.30
        sd["text_model.embeddings.position_ids"] = positions
    _assign(model, sd, device, dtype, "text encoder", None)
    if model.text_model.embeddings.position_ids.is_meta:  # a non-persistent buffer (newer transformers)
        model.text_model.embeddings.position_ids = positions
    _no_meta(model, "text encoder")
    return model.eval()


# -- shared ---------------------------------------------------------------------------------------------
def _assign(module: torch.nn.Module, sd: dict, device, dtype: torch.dtype, what: str, spec: Spec | None) -> None:
    """Load `sd` into a meta-built `module` by taking its tensors (cast one by one, each original
    released as it goes). Every weight must be there with its shape."""
    want = module.state_dict()
    missing = [k for k in want if k not in sd]
    wrong = [f"{k} {tuple(sd[k].shape)} != {tuple(t.shape)}" for k, t in want.items()
             if k in sd and sd[k].shape != t.shape]
    # an integer or bool tensor where a weight belongs: a broken or hostile file, not a cast to make
    wrong += [f"{k} is {sd[k].dtype}" for k, t in want.items()
              if k in sd and t.is_floating_point() and not sd[k].is_floating_point()]
    if missing or wrong:
        hint = f" (does {spec.source} describe this checkpoint?)" if spec is not None else ""
        detail = f"{len(missing)} weights missing, e.g. {missing[:2]}" if missing else f"weights differ: {wrong[:2]}"
        raise CheckpointError(f"the {what} does not fit its config: {detail}{hint}")
    taken = {}
    for k in want:
        v = sd.pop(k)
        taken[k] = v.to(device, dtype if v.is_floating_point() else v.dtype).contiguous()
    module.load_state_dict(taken, strict=True, assign=True)
    if what != "text encoder":  # its position ids may be a buffer outside the state dict: checked after
        _no_meta(module, what)


def _no_meta(module: torch.nn.Module, what: str) -> None:
    left = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    if left:
        raise CheckpointError(f"the {what} has tensors the checkpoint did not fill: {left[:3]}")


def _line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [""])[0][:300]
