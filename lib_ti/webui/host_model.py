"""The host's loaded model as a `TrainableModel`, borrowed (never copied), plus the functions the
job needs after saving: where embeddings live, forced reload, and whether the host loaded a file.

The functions the job needs after saving (embeddings_dir, reload_embeddings, host_load_check...)
live in host_embeddings and are re-exported here.

Written against A1111 v1.10.1 (and reForge, which keeps its model code). Every host import sits
inside a function: this module is imported only inside the host, and `shared.sd_model` is lazy.

How a training prompt is encoded: the trainable vectors become the `vec` of a host
`textual_inversion.Embedding` registered in `sd_hijack.model_hijack.embedding_db` under the token,
and the prompt goes through the host's own text-encoder wrapper, so emphasis, BREAK, chunking,
clip skip and every other embedding are handled exactly as in txt2img. The registration lasts for
`training()` (previews rendered meanwhile see the live vectors) and the db entry that was there
before is put back on exit.

    model = borrow()
    with model.training(gradient_checkpointing=True):
        cond = model.encode_prompts(texts, "mytoken", vectors)
        pred = model.predict(x_t, t, cond)
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator
from typing import Any

import torch

from lib_ti.model import SDXL_SLOTS, SINGLE_SLOT, SizeCond, vector_shape
from lib_ti.webui import host_patches as patches
from lib_ti.webui import inference_weights

# The thin functions over the host live in host_embeddings; they are part of this module's API.
from lib_ti.webui.host_embeddings import (  # noqa: F401
    HostError,
    checkpoint_ids,
    clear_cond_caches,
    embedding_db,
    embeddings_dir,
    host_load_check,
    reload_embeddings,
    sd_model,
)


def family_of(m: Any) -> str:
    if getattr(m, "is_sdxl", False):
        return "sdxl"
    if getattr(m, "is_sd2", False):
        return "sd2"
    if getattr(m, "is_sd1", False):
        return "sd1"
    kind = "SD3" if getattr(m, "is_sd3", False) else type(m).__name__
    raise HostError(f"the loaded model ({kind}) is not SD1, SD2 or SDXL; textual inversion training needs one")


def borrow(clip_skip: int | None = None) -> HostModel:
    """The loaded model as a TrainableModel. `clip_skip` None follows the host's "Clip skip"
    setting, as txt2img does; a number overrides it for training prompts only (SD1).
    On Forge the Forge adapter (forge_model.py) answers instead."""
    from lib_ti.webui import forge_embeddings

    if forge_embeddings.is_forge():
        from lib_ti.webui import forge_model

        return forge_model.borrow(clip_skip)
    m = sd_model()
    embedding_db()
    family = family_of(m)
    _refuse_unsupported(m)
    if family == "sdxl":
        return HostSDXL(m, clip_skip)
    return HostSD(m, family, clip_skip)


def _refuse_unsupported(m: Any) -> None:
    from modules import sd_unet, shared

    if getattr(shared.cmd_opts, "lowvram", False):
        raise HostError("training is not possible with --lowvram: it keeps only one part of a model on the GPU "
                        "at a time, and backward needs the text encoder and the UNet together. Restart without "
                        "--lowvram (--medvram works: the trainer keeps both on the GPU for the run)")
    if getattr(sd_unet, "current_unet", None) is not None:
        raise HostError(f"a replacement UNet is active ({sd_unet.current_unet}); set 'SD Unet' to Automatic/None "
                        "for training, gradients cannot pass through it")


# -- the adapter ----------------------------------------------------------------------------------

class HostModel:
    """What SD1/SD2 and SDXL share. Subclasses define the text side (slots, encode_prompts)."""

    family = "unknown"

    def __init__(self, m: Any, clip_skip: int | None = None):
        from modules import devices

        self.m = m
        self.clip_skip = clip_skip
        self.device = torch.device(devices.device)
        self.dtype = devices.dtype_unet
        param = self.m.parameterization if hasattr(self.m, "parameterization") else "eps"
        if param not in ("eps", "v"):
            raise HostError(f"the loaded model predicts '{param}'; training supports eps and v models")
        self.prediction_type = "v_prediction" if param == "v" else "epsilon"
        self._cache_key: str | None = None
        self._reg: patches.Registration | None = None
        self._in_training = False
        self._trainable: inference_weights.Trainable | None = None
        self._medvram: patches.Placement | None = None
        self._concat: dict[tuple, torch.Tensor] = {}

    # -- text side, per family ---------------------------------------------------------------------
    def text_models(self) -> dict[str, Any]:
        """slot -> the host's text-encoder wrapper for it."""
        raise NotImplementedError

    def name_model(self) -> Any:
        """The wrapper whose tokenizer matches prompt names (the db uses cond_stage_model.tokenize)."""
        raise NotImplementedError

    def _vec(self, vectors: dict[str, torch.Tensor]) -> Any:
        raise NotImplementedError

    # -- protocol ------------------------------------------------------------------------------------
    @property
    def cache_key(self) -> str:
        """Fingerprint of the VAE weights (a sample of every tensor) and the encode dtype."""
        if self._cache_key is None:
            h = hashlib.sha1(f"{self.family}:{self._vae_dtype()}".encode())
            with torch.no_grad():
                for name, p in self.m.first_stage_model.state_dict().items():
                    h.update(name.encode())
                    h.update(p.detach().flatten()[:256].float().cpu().numpy().tobytes())
            self._cache_key = f"a1111-vae-{h.hexdigest()[:16]}"
        return self._cache_key

    def slots(self) -> dict[str, int]:
        return {k: int(patches.raw_token_embedding(t).embedding_dim) for k, t in self.text_models().items()}

    def tokenize(self, text: str) -> list[int]:
        return [int(i) for i in self.m.cond_stage_model.tokenize([text])[0]]

    def decode_tokens(self, ids: list[int]) -> list[str]:
        tm = self.name_model()
        tok = getattr(tm.wrapped, "tokenizer", None)
        if tok is not None and hasattr(tok, "convert_ids_to_tokens"):
            return list(tok.convert_ids_to_tokens([int(i) for i in ids]))
        from modules import sd_hijack_open_clip  # SD2: OpenCLIP's SimpleTokenizer

        return [sd_hijack_open_clip.tokenizer.decoder[int(i)] for i in ids]

    def token_embeddings(self, text: str) -> dict[str, torch.Tensor]:
        out = {}
        for slot, tm in self.text_models().items():
            ids = torch.tensor(tm.tokenize([text])[0], dtype=torch.long)
            weight = patches.raw_token_embedding(tm).weight
            out[slot] = weight.detach()[ids.to(weight.device)].float().cpu().clone()
        return out

    def alphas_cumprod(self) -> torch.Tensor:
        # The original schedule: alphas_cumprod itself may carry the last generation's overrides
        # (downcast alpha bar, zero terminal SNR).
        a = getattr(self.m, "alphas_cumprod_original", None)
        if a is None:
            a = self.m.alphas_cumprod
        return torch.as_tensor(a).detach().to("cpu", torch.float32).clone()

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        from modules import devices

        m = self.m
        vae = m.first_stage_model
        fp32 = self.family == "sdxl"  # the SDXL VAE overflows to NaN in fp16
        was = next(vae.parameters()).dtype
        try:
            with torch.no_grad():
                if fp32:
                    if was != torch.float32:
                        vae.float()
                    with devices.without_autocast():
                        z = m.get_first_stage_encoding(m.encode_first_stage(pixels.to(self.device, torch.float32)))
                else:
                    x = pixels.to(self.device, devices.dtype_vae)
                    with devices.autocast():
                        z = m.get_first_stage_encoding(m.encode_first_stage(x))
        finally:
            if fp32 and was != torch.float32:
                vae.to(was)  # back to the host's VAE dtype (fp16 -> fp32 -> fp16 is exact)
            self._vae_off_device()
        return z.float()

    def encode_prompts(self, texts: list[str], token: str, vectors: dict[str, torch.Tensor],
                       sizes: list[SizeCond] | None = None) -> Any:
        from modules import devices

        self._vae_off_device()
        clear_cond_caches()  # cached conditioning holding our vectors is stale after every step
        n, width = vector_shape(vectors, self.slots(), self.family)
        if self._trainable is not None and self._trainable.ensure():  # reForge: a preview moved
            self.m.requires_grad_(False)  # weights under inference_mode; ordinary aliases again
        vec = self._vec(vectors)
        with self._registered(token, vec, n, width), self._clip_skip(), devices.autocast():
            return self._encode(list(texts), sizes)

    def predict(self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, cond: Any) -> torch.Tensor:
        cond = self._with_image_conditioning(noisy_latents, cond)
        return self.m.apply_model(noisy_latents, timesteps, cond).float()

    @contextlib.contextmanager
    def training(self, gradient_checkpointing: bool = False) -> Iterator[None]:
        _refuse_unsupported(self.m)
        with contextlib.ExitStack() as stack:  # undone in reverse order, also after an exception
            stack.callback(clear_cond_caches)
            # reForge on a GPU: weights moved under inference_mode (held once, put back exactly)
            self._trainable = stack.enter_context(inference_weights.trainable([self.m]))
            stack.callback(setattr, self, "_trainable", None)
            stack.enter_context(patches.frozen(self.m))
            stack.enter_context(self._train_flags())
            if getattr(self.m, "lowvram", False):
                self._medvram = patches.Placement([self.m.model, *self._text_roots()])
                stack.callback(self._end_placement)
            if gradient_checkpointing:
                stack.enter_context(patches.checkpointed(self.m.model.diffusion_model))
            self._in_training = True
            stack.callback(self._end_registration)
            yield

    # -- internals -----------------------------------------------------------------------------------
    def _encode(self, texts: list[str], sizes: list[SizeCond] | None) -> Any:
        raise NotImplementedError

    def _text_roots(self) -> list[torch.nn.Module]:
        """The modules medvram moves as a whole for the text side."""
        raise NotImplementedError

    def _train_flags(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def _registered(self, token: str, vec: Any, n: int, width: int) -> Iterator[None]:
        reg = self._reg
        if reg is not None and (reg.name != token or reg.emb.vectors != n):
            reg.restore()
            reg = self._reg = None
        if reg is None:
            reg = patches.Registration(embedding_db(), self.m, token, vec, n, width)
            self._reg = reg
        reg.emb.vec = vec
        reg.ensure()
        try:
            yield
        finally:
            if not self._in_training:  # outside a run nothing stays registered
                self._end_registration()

    def _end_registration(self) -> None:
        self._in_training = False
        reg, self._reg = self._reg, None
        if reg is not None:
            reg.restore()

    def _clip_skip(self) -> contextlib.AbstractContextManager[None]:
        if self.clip_skip is None or self.family != "sd1":  # SD2 ignores it; SDXL has its own option
            return contextlib.nullcontext()
        return patches.option_override("CLIP_stop_at_last_layers", int(self.clip_skip))

    def _with_image_conditioning(self, x: torch.Tensor, cond: Any) -> Any:
        """Inpainting models get the host's txt2img conditioning: a fully masked blank image."""
        m = self.m
        inpaint = m.model.conditioning_key in {"hybrid", "concat"} or getattr(m, "is_sdxl_inpaint", False)
        if not inpaint:
            return cond
        from modules import processing

        key = (tuple(x.shape), x.dtype, x.device)
        if key not in self._concat:
            with torch.no_grad():
                self._concat[key] = processing.txt2img_image_conditioning(m, x, x.shape[3] * 8, x.shape[2] * 8)
            self._vae_off_device()
        if isinstance(cond, dict):
            return {**cond, "c_concat": [self._concat[key]]}
        return {"c_concat": [self._concat[key]], "c_crossattn": [cond]}

    def _vae_off_device(self) -> None:
        if self._medvram is not None:
            self._medvram.vae_off()

    def _vae_dtype(self) -> torch.dtype:
        return next(self.m.first_stage_model.parameters()).dtype

    def _end_placement(self) -> None:
        placement, self._medvram = self._medvram, None
        if placement is not None:
            placement.give_back()


class HostSD(HostModel):
    """SD1 (CLIP-L) and SD2 (OpenCLIP-H): one text encoder, `sd_model.cond_stage_model(texts)`."""

    def __init__(self, m: Any, family: str, clip_skip: int | None = None):
        super().__init__(m, clip_skip)
        self.family = family

    def text_models(self) -> dict[str, Any]:
        return {SINGLE_SLOT: self.m.cond_stage_model}

    def name_model(self) -> Any:
        return self.m.cond_stage_model

    def _vec(self, vectors: dict[str, torch.Tensor]) -> Any:
        return vectors[SINGLE_SLOT]

    def _encode(self, texts: list[str], sizes: list[SizeCond] | None) -> torch.Tensor:
        return self.m.cond_stage_model(texts)

    def _text_roots(self) -> list[torch.nn.Module]:
        return [self.m.cond_stage_model]


class HostSDXL(HostModel):
    """SDXL: `sd_model.conditioner(batch)` with both text embedders trainable for the run.

    The conditioner, not the embedders one by one: it is the exact txt2img path (size embedders,
    concatenation order), and with --medvram-sdxl the host's placement hook sits on the
    conditioner as a whole. Its text embedders would run under no_grad (is_trainable False) and
    could drop prompts (ucg_rate); both are set for the run and put back."""

    family = "sdxl"

    def __init__(self, m: Any, clip_skip: int | None = None):
        super().__init__(m, clip_skip)
        texts = self._text_embedders()
        keys = sorted(patches.ti_key(e) for e in texts)
        if keys != sorted(SDXL_SLOTS):
            raise HostError(f"this SDXL model has text encoders {keys} (an SDXL refiner?); training needs the "
                            "base model's clip_l and clip_g")

    def _text_embedders(self) -> list[Any]:
        return [e for e in self.m.conditioner.embedders if hasattr(e, "tokenize") and hasattr(e, "wrapped")]

    def text_models(self) -> dict[str, Any]:
        return {patches.ti_key(e): e for e in self._text_embedders()}

    def name_model(self) -> Any:
        return self.text_models()["clip_l"]  # GeneralConditioner.tokenize uses the first: clip_l

    def _vec(self, vectors: dict[str, torch.Tensor]) -> Any:
        return {k: vectors[k] for k in SDXL_SLOTS}

    def _encode(self, texts: list[str], sizes: list[SizeCond] | None) -> dict[str, torch.Tensor]:
        from modules import devices, shared

        opts = shared.opts
        if sizes is None or any(s is None for s in sizes):
            top, left = int(opts.sdxl_crop_top), int(opts.sdxl_crop_left)
            sizes = [SizeCond((1024, 1024), (top, left), (1024, 1024))] * len(texts)
        # Built as sd_models_xl.get_learned_conditioning does (devices.dtype, (h, w) order), per image.
        args = dict(device=devices.device, dtype=devices.dtype)
        batch = {
            "txt": texts,
            "original_size_as_tuple": torch.tensor([list(s.original_hw) for s in sizes], **args),
            "crop_coords_top_left": torch.tensor([list(s.crop_top_left) for s in sizes], **args),
            "target_size_as_tuple": torch.tensor([list(s.target_hw) for s in sizes], **args),
            "aesthetic_score": torch.tensor([[float(opts.sdxl_refiner_high_aesthetic_score)]] * len(texts), **args),
        }
        return self.m.conditioner(batch)

    def _text_roots(self) -> list[torch.nn.Module]:
        return [self.m.conditioner]

    def _train_flags(self) -> contextlib.AbstractContextManager[None]:
        return patches.trainable_text_embedders(list(self.m.conditioner.embedders), self._text_embedders())
