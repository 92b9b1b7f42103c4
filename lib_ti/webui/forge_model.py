"""Forge's loaded model as a `TrainableModel` (lllyasviel/stable-diffusion-webui-forge, `backend`),
borrowed, never copied. `host_model.borrow()` hands over to `borrow()` here when the host is Forge.

How a training prompt is encoded: the trainable vectors become the `vec` of a Forge `Embedding`
registered under the token in every text engine's database, and the prompt goes through the
engines themselves (outside inference_mode), so emphasis, BREAK, chunking, clip skip and every
other embedding behave as in txt2img; SDXL's `vector` is built as Forge's sdxl.py builds it, per
image. The UNet is `forge_objects.unet.model.diffusion_model`, called as KModel.apply_model calls
it. For the run (see forge_patches): ordinary tensors in place of the inference-tensor weights, on
the same storage (no copy: the weights are held once), frozen weights, clones before Forge's
in-place residual adds, PyTorch attention, optional checkpointing; all put back on exit, also
after an exception.

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
from lib_ti.webui import forge_embeddings as fe
from lib_ti.webui import forge_patches as patches
from lib_ti.webui import inference_weights
from lib_ti.webui.host_embeddings import HostError
from lib_ti.webui.host_model import family_of  # the same flags on both hosts

QUANTIZED = ("nf4", "fp4", "gguf")


def borrow(clip_skip: int | None = None) -> ForgeModel:
    """The loaded Forge model as a TrainableModel (built first if Forge has not yet). `clip_skip`
    None follows the host's "Clip skip" setting, as txt2img does."""
    m = fe.loaded_model()
    family = family_of(m)
    refuse_unsupported(m)
    return ForgeModel(m, family, clip_skip)


def refuse_unsupported(m: Any) -> None:
    """What training through Forge cannot do, with what to do instead."""
    if getattr(m, "is_sdxl", False) and getattr(m, "text_processing_engine_l", None) is None:
        raise HostError("the loaded model is an SDXL refiner (clip_g only); textual inversion trains against "
                        "the SDXL base model: load the base checkpoint, train, and use the embedding with it")
    if getattr(m, "is_inpaint", False):
        raise HostError("the loaded model is an inpainting model; train with the regular checkpoint of the same "
                        "family (the embedding then works with its inpainting variant too)")
    kmodel = _fo(m).unet.model
    kind = _prediction_type(kmodel)
    if kind not in ("epsilon", "v_prediction"):
        raise HostError(f"the loaded model predicts '{kind}'; training supports eps and v-prediction models")
    storage = getattr(kmodel, "storage_dtype", None)
    if isinstance(storage, str) and storage in QUANTIZED:
        raise HostError(f"the UNet is stored as {storage}; gradients cannot pass through quantized weights here. "
                        "Set 'Diffusion in Low Bits' to Automatic (or load an fp16/bf16 checkpoint) for training")


def _fo(m: Any) -> Any:
    """The patchers without LoRA: forge_objects_original (forge_objects once a prompt applied LoRA)."""
    return getattr(m, "forge_objects_original", None) or m.forge_objects


def _prediction_type(kmodel: Any) -> str:
    kind = str(getattr(kmodel.predictor, "prediction_type", "epsilon"))
    return "epsilon" if kind == "eps" else kind


class ForgeModel:
    """SD1 / SD2 (one engine) and SDXL (clip_l and clip_g engines) on Forge."""

    def __init__(self, m: Any, family: str, clip_skip: int | None = None):
        from backend import memory_management as mm

        self.m, self.family, self.clip_skip = m, family, clip_skip
        self.fo = _fo(m)
        self.kmodel = self.fo.unet.model
        self.prediction_type = _prediction_type(self.kmodel)
        self.device = torch.device(mm.get_torch_device())
        self.dtype = self.kmodel.computation_dtype
        if family == "sdxl":
            self.engines = {"clip_l": m.text_processing_engine_l, "clip_g": m.text_processing_engine_g}
        else:
            self.engines = {SINGLE_SLOT: m.text_processing_engine}
        self._cache_key: str | None = None
        self._regs: list[patches.Registration] = []
        self._reg_key: tuple | None = None
        self._trainable: inference_weights.Trainable | None = None
        self._in_training = False

    # -- protocol ------------------------------------------------------------------------------------
    @property
    def cache_key(self) -> str:
        """Fingerprint of the VAE weights (a sample of every tensor)."""
        if self._cache_key is None:
            h = hashlib.sha1(f"forge:{self.family}".encode())
            with torch.no_grad():
                for name, p in self.fo.vae.first_stage_model.state_dict().items():
                    h.update(name.encode())
                    h.update(p.detach().flatten()[:256].float().cpu().numpy().tobytes())
            self._cache_key = f"forge-vae-{h.hexdigest()[:16]}"
        return self._cache_key

    def slots(self) -> dict[str, int]:
        return {k: int(self._raw_embedding(e).embedding_dim) for k, e in self.engines.items()}

    def name_engine(self) -> Any:
        """The engine whose tokenizer the prompt names are matched with (clip_l's on SDXL)."""
        return self.engines["clip_l" if self.family == "sdxl" else SINGLE_SLOT]

    def tokenize(self, text: str) -> list[int]:
        return [int(i) for i in self.name_engine().tokenize([text])[0]]

    def decode_tokens(self, ids: list[int]) -> list[str]:
        return list(self.name_engine().tokenizer.convert_ids_to_tokens([int(i) for i in ids]))

    def token_embeddings(self, text: str) -> dict[str, torch.Tensor]:
        out = {}
        for slot, eng in self.engines.items():
            ids = torch.tensor(eng.tokenize([text])[0], dtype=torch.long)
            weight = self._raw_embedding(eng).weight
            out[slot] = weight.detach()[ids.to(weight.device)].float().cpu().clone()
        return out

    def alphas_cumprod(self) -> torch.Tensor:
        # the predictor's own schedule; zero terminal SNR only swaps sigmas per generation
        return self.kmodel.predictor.alphas_cumprod.detach().to("cpu", torch.float32).clone()

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        z = self.m.encode_first_stage(pixels.to(torch.float32))  # Forge loads and places the VAE itself
        return z.float().clone()  # an inference tensor from Forge: an ordinary copy

    def encode_prompts(self, texts: list[str], token: str, vectors: dict[str, torch.Tensor],
                       sizes: list[SizeCond] | None = None) -> Any:
        from backend.text_processing import classic_engine

        self._prepare_step()
        fe.clear_cond_caches()  # cached conditioning holding our vectors is stale after every step
        n, width = vector_shape(vectors, self.slots(), self.family)
        vec = vectors[SINGLE_SLOT] if self.family != "sdxl" else {k: vectors[k] for k in SDXL_SLOTS}
        infotext = dict(classic_engine.last_extra_generation_params)  # the engines add to it in place
        try:
            with self._registered(token, vec, n, width), self._clip_skip(), torch.inference_mode(False):
                if self.family != "sdxl":
                    return self.engines[SINGLE_SLOT](list(texts))
                return self._encode_sdxl(list(texts), sizes)
        finally:
            # the engines note used embeddings for the next infotext; ours is no generation
            classic_engine.last_extra_generation_params = infotext

    def predict(self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, cond: Any) -> torch.Tensor:
        dt = self.dtype  # as KModel.apply_model casts its inputs
        context, y = (cond["crossattn"], cond["vector"].to(dt)) if isinstance(cond, dict) else (cond, None)
        out = self.kmodel.diffusion_model(noisy_latents.to(dt), timesteps.float(), context=context.to(dt), y=y,
                                          transformer_options={})
        return out.float()

    @contextlib.contextmanager
    def training(self, gradient_checkpointing: bool = False) -> Iterator[None]:
        refuse_unsupported(self.m)
        dm = self.kmodel.diffusion_model
        roots = [self.kmodel, self.fo.clip.cond_stage_model]
        with contextlib.ExitStack() as stack:  # undone in reverse order, also after an exception
            stack.callback(fe.clear_cond_caches)
            self._trainable = stack.enter_context(inference_weights.trainable(roots))
            stack.callback(setattr, self, "_trainable", None)
            for root in roots:
                stack.enter_context(patches.frozen(root))
            stack.enter_context(patches.pytorch_attention())
            stack.enter_context(patches.out_of_place_norms(dm))
            if gradient_checkpointing:
                stack.enter_context(patches.checkpointed(dm))
            self._in_training = True
            stack.callback(self._end_registration)
            yield

    # -- internals -----------------------------------------------------------------------------------
    @staticmethod
    def _raw_embedding(engine: Any) -> torch.nn.Embedding:
        layer = engine.text_encoder.transformer.text_model.embeddings.token_embedding
        return getattr(layer, "wrapped", layer)

    def _prepare_step(self) -> None:
        """Both models placed for the step, and the weights ordinary tensors again if a preview
        (inference_mode) made any of them inference tensors."""
        if self._trainable is None:
            return  # outside training(): an encode for reading only
        patches.load_for_step([self.fo.clip.patcher, self.fo.unet])
        if self._trainable.ensure():
            for root in self._trainable.roots:
                root.requires_grad_(False)

    def _encode_sdxl(self, texts: list[str], sizes: list[SizeCond] | None) -> dict[str, torch.Tensor]:
        from modules import shared

        cond_l = self.engines["clip_l"](texts)
        cond_g, pooled = self.engines["clip_g"](texts)
        if sizes is None or any(s is None for s in sizes):
            top, left = int(shared.opts.sdxl_crop_top), int(shared.opts.sdxl_crop_left)
            sizes = [SizeCond((1024, 1024), (top, left), (1024, 1024))] * len(texts)
        emb = self.m.embedder  # sdxl.py: height, width, crop_h, crop_w, target_height, target_width
        flat = torch.stack([
            torch.flatten(torch.cat([emb(torch.Tensor([float(v)])) for v in (*s.original_hw, *s.crop_top_left,
                                                                              *s.target_hw)]))
            for s in sizes]).to(pooled)
        return {"crossattn": torch.cat([cond_l, cond_g], dim=2), "vector": torch.cat([pooled, flat], dim=1)}

    @contextlib.contextmanager
    def _registered(self, token: str, vec: Any, n: int, width: int) -> Iterator[None]:
        from backend.text_processing.textual_inversion import Embedding

        if self._regs and self._reg_key != (token, n):
            self._end_registration(keep_training=True)
        if not self._regs:
            emb = Embedding(vec, token)
            emb.vectors, emb.shape = n, width
            self._regs = [patches.Registration(e.embeddings, emb) for e in self.engines.values()]
            self._reg_key = (token, n)
        for reg in self._regs:
            reg.emb.vec = vec
            reg.ensure()
        try:
            yield
        finally:
            if not self._in_training:  # outside a run nothing stays registered
                self._end_registration()

    def _end_registration(self, keep_training: bool = False) -> None:
        self._in_training = self._in_training and keep_training
        regs, self._regs = self._regs, []
        for reg in reversed(regs):
            reg.restore()

    @contextlib.contextmanager
    def _clip_skip(self) -> Iterator[None]:
        """Forge sets every engine's clip_skip from the "Clip skip" setting before each generation
        (processing.py: set_clip_skip); training does the same, or uses its own value, and puts
        the engines' values back."""
        from modules import shared

        value = int(self.clip_skip if self.clip_skip is not None else shared.opts.CLIP_stop_at_last_layers)
        saved = [(e, e.clip_skip) for e in self.engines.values()]
        try:
            self.m.set_clip_skip(value)
            yield
        finally:
            for e, v in saved:
                e.clip_skip = v
