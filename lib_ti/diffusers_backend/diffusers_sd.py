"""SD1 and SD2 from diffusers components (UNet2DConditionModel, AutoencoderKL, CLIP text model),
plus the base that SDXL shares: tokenizing, the noise schedule, VAE encoding and training flags."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import warnings
from collections.abc import Callable, Iterator

import torch
from diffusers import DDPMScheduler

from lib_ti.diffusers_backend import inject
from lib_ti.model import SINGLE_SLOT, SizeCond, TrainableModel

log = logging.getLogger("lib_ti")


class DiffusersModel(TrainableModel):
    """What every diffusers family shares. Subclasses name their text encoders in `text_encoders`
    (slot -> CLIP text model) and implement encode_prompts / predict."""

    family = "unknown"

    def __init__(self, unet, vae, tokenizer, scheduler, prediction_type: str | None = None):
        self.unet = unet
        self.vae = vae
        self.tokenizer = tokenizer
        self.scheduler = scheduler
        self.prediction_type = prediction_type or scheduler.config.get("prediction_type", "epsilon")
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"prediction type '{self.prediction_type}' is not supported (epsilon or v_prediction)")
        if vae.dtype != torch.float32:
            vae.to(torch.float32)  # the SDXL VAE overflows to NaN in fp16; latents are encoded once anyway
        self.prompts = inject.PromptTokenizer(tokenizer)
        self._cache_key: str | None = None
        self.source = ""  # the folder it was loaded from, if any
        self.vae_decoder_loader: Callable[[], None] | None = None  # single files load the decoder on demand

    # -- overridden per family --------------------------------------------------------------------
    @property
    def text_encoders(self) -> dict[str, torch.nn.Module]:
        raise NotImplementedError

    # -- shared protocol ----------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device  # unet.device walks every parameter too

    @property
    def dtype(self) -> torch.dtype:
        # not unet.dtype: diffusers walks every parameter for it, ~2 ms a call on SDXL (bench/step_overhead)
        return next(self.unet.parameters()).dtype

    @property
    def cache_key(self) -> str:
        """A fingerprint of the VAE's config and weights (a sample of each tensor: cheap, yet any
        other VAE differs), so a latent cache is reused only with the VAE that made it."""
        if self._cache_key is None:
            # "_"-keys (version, source path) change on save/load without changing the VAE
            cfg = {k: v for k, v in self.vae.config.items() if not k.startswith("_")}
            h = hashlib.sha1(json.dumps(cfg, sort_keys=True, default=str).encode())
            with torch.no_grad():
                for name, p in self.vae.state_dict().items():
                    h.update(name.encode())
                    h.update(p.detach().flatten()[:256].float().cpu().numpy().tobytes())
            self._cache_key = f"diffusers-vae-{h.hexdigest()[:16]}"
        return self._cache_key

    @property
    def vae_scale(self) -> int:
        """Pixels per latent cell (8 for every SD VAE)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def slots(self) -> dict[str, int]:
        return {k: int(te.get_input_embeddings().embedding_dim) for k, te in self.text_encoders.items()}

    def tokenize(self, text: str) -> list[int]:
        return list(self.prompts.ids(text))

    def decode_tokens(self, ids: list[int]) -> list[str]:
        return list(self.tokenizer.convert_ids_to_tokens(list(ids)))

    def token_embeddings(self, text: str) -> dict[str, torch.Tensor]:
        # SDXL too: the clip_l ids index both tables, the vocabularies are the same.
        idx = torch.tensor(self.prompts.ids(text), dtype=torch.long)
        out = {}
        for slot, te in self.text_encoders.items():
            weight = te.get_input_embeddings().weight
            out[slot] = weight.detach()[idx.to(weight.device)].float().cpu().clone()
        return out

    def alphas_cumprod(self) -> torch.Tensor:
        # Any diffusers scheduler config (PNDM, Euler, ...) gives the training schedule through DDPM.
        sched = DDPMScheduler.from_config(self.scheduler.config)
        return sched.alphas_cumprod.to(torch.float32).cpu().clone()

    def ensure_vae_decoder(self) -> None:
        """The VAE decoder, for previews (a single-file model loads it on first use)."""
        if self.vae_decoder_loader is not None:
            self.vae_decoder_loader()
            self.vae_decoder_loader = None

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        x = pixels.to(self.vae.device, torch.float32)
        with _no_autocast(x.device):
            latents = self.vae.encode(x).latent_dist.sample()
        return (latents * self.vae.config.scaling_factor).float()

    @contextlib.contextmanager
    def training(self, gradient_checkpointing: bool = False) -> Iterator[None]:
        mods = [self.unet, self.vae, *self.text_encoders.values()]
        params = [(p, p.requires_grad) for m in mods for p in m.parameters()]
        modes = [(sub, sub.training) for m in mods for sub in m.modules()]
        ckpt = [(sub, sub.gradient_checkpointing) for m in mods for sub in m.modules()
                if hasattr(sub, "gradient_checkpointing")]
        try:
            for m in mods:
                m.requires_grad_(False)
                m.eval()
            if gradient_checkpointing:
                # Both libraries only checkpoint in train mode; all dropouts of SD models are 0, so
                # train mode changes nothing else.
                self.unet.enable_gradient_checkpointing()
                self.unet.train()
                for te in self.text_encoders.values():
                    te.gradient_checkpointing_enable()
                    te.train()
            with warnings.catch_warnings():
                # transformers 4.30 (A1111's pin) calls checkpoint() without use_reentrant; the
                # reentrant default it gets is correct here, the warning is only noise
                warnings.filterwarnings("ignore", message=r"torch\.utils\.checkpoint: the use_reentrant")
                yield
        finally:
            for p, flag in params:
                p.requires_grad_(flag)
            for sub, flag in modes:
                sub.training = flag
            for sub, flag in ckpt:
                sub.gradient_checkpointing = flag

    # -- helpers for subclasses ------------------------------------------------------------------------
    def _n_vectors(self, vectors: dict[str, torch.Tensor]) -> int:
        want = self.slots()
        if set(vectors) != set(want):
            raise ValueError(f"vectors have slots {sorted(vectors)}, this {self.family} model needs {sorted(want)}")
        ns = {int(v.shape[0]) for v in vectors.values()}
        bad = {k: tuple(v.shape) for k, v in vectors.items() if v.ndim != 2 or v.shape[-1] != want[k]}
        if len(ns) != 1 or bad:
            raise ValueError(f"vector shapes {bad or {k: tuple(v.shape) for k, v in vectors.items()}} do not fit "
                             f"widths {want} with one vector count")
        return ns.pop()


@contextlib.contextmanager
def _no_autocast(device: torch.device) -> Iterator[None]:
    if device.type in ("cuda", "cpu"):
        with torch.autocast(device_type=device.type, enabled=False):
            yield
    else:
        yield


class DiffusersSD(DiffusersModel):
    """SD1 (CLIP-L, clip skip as A1111) or SD2 (OpenCLIP-H; diffusers' converted encoder already
    ends at the penultimate layer + final norm, which is what the host uses, so clip skip does not
    apply there, as in A1111)."""

    def __init__(self, family: str, unet, vae, text_encoder, tokenizer, scheduler,
                 prediction_type: str | None = None, clip_skip: int = 1):
        if family not in ("sd1", "sd2"):
            raise ValueError(f"DiffusersSD is for sd1/sd2, not '{family}'")
        super().__init__(unet, vae, tokenizer, scheduler, prediction_type)
        self.family = family
        self.text_encoder = text_encoder
        layers = int(text_encoder.config.num_hidden_layers)
        if family == "sd2" and clip_skip > 1:
            log.info("clip skip %d ignored: SD2 always uses the penultimate layer, as A1111 does", clip_skip)
            clip_skip = 1
        if not 1 <= clip_skip <= layers:
            raise ValueError(f"clip_skip must be between 1 and {layers} for this text encoder, got {clip_skip}")
        self.clip_skip = clip_skip

    @property
    def text_encoders(self) -> dict[str, torch.nn.Module]:
        return {SINGLE_SLOT: self.text_encoder}

    def encode_prompts(self, texts: list[str], token: str, vectors: dict[str, torch.Tensor],
                       sizes: list[SizeCond] | None = None) -> torch.Tensor:
        n = self._n_vectors(vectors)
        te = self.text_encoder
        batch = self.prompts.batch(texts, token, n, int(self.tokenizer.pad_token_id), te.device)
        vec = vectors[SINGLE_SLOT]
        if self.clip_skip > 1:
            out = inject.encode(te, batch, vec, output_hidden_states=True)
            states = te.text_model.final_layer_norm(out.hidden_states[-self.clip_skip])
        else:
            states = inject.encode(te, batch, vec)[0]
        return batch.join(batch.emphasize(states))  # weights after clip skip and norm, as A1111

    def predict(self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        out = self.unet(noisy_latents.to(self.dtype), timesteps, encoder_hidden_states=cond.to(self.dtype)).sample
        return out.float()
