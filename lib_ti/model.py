"""The model-family seam: everything the training loop needs from a model, and nothing more.

Each family (SD1, SD2, SDXL) and each host (diffusers folders, the A1111 WebUI) implements this
protocol once (lib_ti/diffusers_backend, lib_ti/webui/host_model.py); the loop never asks which
family it is talking to. Host-free and backend-free: no diffusers or transformers here.

Vector "slots" name the text encoders an embedding has vectors for:
  SD1 / SD2 -> {"emb": width}            (one encoder: CLIP-L 768 or OpenCLIP-H 1024)
  SDXL      -> {"clip_l": 768, "clip_g": 1280}
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch

FAMILIES = ("sd1", "sd2", "sdxl")
SINGLE_SLOT = "emb"
SDXL_SLOTS = ("clip_l", "clip_g")


@dataclass(frozen=True)
class SizeCond:
    """SDXL micro-conditioning of one training image (ignored by SD1/SD2).

    Sizes are (height, width) in pixels, as SDXL and kohya order them.
    """

    original_hw: tuple[int, int]
    crop_top_left: tuple[int, int]
    target_hw: tuple[int, int]


@runtime_checkable
class TrainableModel(Protocol):
    """What TI training needs from a model. Implementations hold the model; they never copy it."""

    family: str  # "sd1" | "sd2" | "sdxl"
    prediction_type: str  # "epsilon" | "v_prediction"
    device: torch.device
    dtype: torch.dtype  # compute dtype of the UNet weights
    cache_key: str  # identifies the VAE for on-disk latent caches

    def slots(self) -> dict[str, int]:
        """Vector slot name -> width, e.g. {"emb": 768}."""
        ...

    def tokenize(self, text: str) -> list[int]:
        """BPE ids of `text` without BOS/EOS, with the tokenizer that matches prompt names
        (clip_l's for SDXL, as the host does)."""
        ...

    def decode_tokens(self, ids: list[int]) -> list[str]:
        """Vocabulary strings of `ids` (for messages such as 'photograph</w>')."""
        ...

    def token_embeddings(self, text: str) -> dict[str, torch.Tensor]:
        """Per slot, the raw token-embedding rows of `text`'s tokens: [n_tokens, width] float32 CPU.
        Used to initialise vectors from an init word."""
        ...

    def alphas_cumprod(self) -> torch.Tensor:
        """The unmodified training noise schedule, float32 [num_train_timesteps] on CPU."""
        ...

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B,3,H,W] float32 in [-1, 1] -> scaled latents float32 [B,C,H/8,W/8]; no grad."""
        ...

    def encode_prompts(
        self,
        texts: list[str],
        token: str,
        vectors: dict[str, torch.Tensor],
        sizes: list[SizeCond] | None = None,
    ) -> Any:
        """Conditioning for `texts`, with `vectors` spliced in wherever `token` appears.
        Gradients must flow back into `vectors`. The result is only passed to `predict`."""
        ...

    def predict(self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, cond: Any) -> torch.Tensor:
        """The UNet's output (eps or v, see `prediction_type`) for integer timesteps [B]."""
        ...

    def training(self, gradient_checkpointing: bool = False) -> AbstractContextManager[None]:
        """Freeze every weight (requires_grad False), set train-time flags, and restore exactly
        what was there on exit, also after an exception."""
        ...


def vector_shape(vectors: dict[str, torch.Tensor], slots: dict[str, int], family: str) -> tuple[int, int]:
    """(vectors per token, total width) of `vectors` for a model with these `slots`, or ValueError
    saying what does not fit; the host adapters check before registering vectors with the host."""
    if set(vectors) != set(slots):
        raise ValueError(f"vectors have slots {sorted(vectors)}, the loaded {family} model needs {sorted(slots)}")
    ns = {int(v.shape[0]) for v in vectors.values()}
    if len(ns) != 1 or any(v.ndim != 2 or v.shape[-1] != slots[k] for k, v in vectors.items()):
        shapes = {k: tuple(v.shape) for k, v in vectors.items()}
        raise ValueError(f"vector shapes {shapes} do not fit widths {slots} with one vector count")
    return ns.pop(), sum(slots.values())
