"""SDXL from diffusers components: CLIP-L + OpenCLIP-bigG text encoders and size micro-conditioning.

Computes exactly what StableDiffusionXLPipeline.encode_prompt / _get_add_time_ids give at
inference, which is also what A1111 computes: both encoders' penultimate hidden states (no final
norm) concatenated, the pooled output from clip_g's projection, and time ids
original_size + crop_top_left + target_size, all (height, width) / (top, left). Clip skip does
not apply (A1111's default: clip_l's penultimate layer is already the SDXL design).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lib_ti.diffusers_backend import inject
from lib_ti.diffusers_backend.diffusers_sd import DiffusersModel
from lib_ti.model import SDXL_SLOTS, SizeCond

CLIP_L, CLIP_G = SDXL_SLOTS


@dataclass
class SDXLCond:
    crossattn: torch.Tensor  # [B, K*77, 768 + 1280] for prompts of K chunks
    pooled: torch.Tensor  # [B, 1280]
    sizes: list[SizeCond | None] | None  # None entries: taken from the latent size in predict


class DiffusersSDXL(DiffusersModel):
    family = "sdxl"

    def __init__(self, unet, vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2, scheduler,
                 prediction_type: str | None = None):
        super().__init__(unet, vae, tokenizer, scheduler, prediction_type)
        self.text_encoder = text_encoder  # CLIPTextModel (clip_l)
        self.text_encoder_2 = text_encoder_2  # CLIPTextModelWithProjection (clip_g)
        self.tokenizer_2 = tokenizer_2  # only its pad token differs ("!"); names use clip_l's ids

    @property
    def text_encoders(self) -> dict[str, torch.nn.Module]:
        return {CLIP_L: self.text_encoder, CLIP_G: self.text_encoder_2}

    def encode_prompts(self, texts: list[str], token: str, vectors: dict[str, torch.Tensor],
                       sizes: list[SizeCond] | None = None) -> SDXLCond:
        n = self._n_vectors(vectors)
        if sizes is not None and len(sizes) != len(texts):
            raise ValueError(f"{len(sizes)} sizes for {len(texts)} prompts")
        outs, states = {}, []
        for slot, te, tok in ((CLIP_L, self.text_encoder, self.tokenizer),
                              (CLIP_G, self.text_encoder_2, self.tokenizer_2)):
            # same slot positions, chunks and weights in both encoders; only the padding id differs
            batch = self.prompts.batch(texts, token, n, int(tok.pad_token_id), te.device)
            outs[slot] = inject.encode(te, batch, vectors[slot], output_hidden_states=True)
            # emphasis per encoder (each its own mean), as A1111 weighs clip_l and clip_g apart
            states.append(batch.join(batch.emphasize(outs[slot].hidden_states[-2]).to(self.dtype)))
        crossattn = torch.cat(states, dim=-1)
        pooled = batch.first(outs[CLIP_G].text_embeds)  # the first chunk's, unweighted, as A1111 takes it
        return SDXLCond(crossattn, pooled, list(sizes) if sizes is not None else None)

    def time_ids(self, sizes: list[SizeCond | None] | None, batch: int, latent_hw: tuple[int, int]) -> torch.Tensor:
        """[B, 6] original_size + crop_top_left + target_size; missing sizes mean an uncropped image
        of the latent's pixel size (what the pipeline uses by default)."""
        hw = (latent_hw[0] * self.vae_scale, latent_hw[1] * self.vae_scale)
        default = SizeCond(hw, (0, 0), hw)
        rows = []
        for i in range(batch):
            s = sizes[i] if sizes is not None and sizes[i] is not None else default
            rows.append([*s.original_hw, *s.crop_top_left, *s.target_hw])
        return torch.tensor(rows, dtype=self.dtype, device=self.device)

    def predict(self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, cond: SDXLCond) -> torch.Tensor:
        b = noisy_latents.shape[0]
        added = {"text_embeds": cond.pooled.to(self.dtype),
                 "time_ids": self.time_ids(cond.sizes, b, tuple(noisy_latents.shape[-2:]))}
        out = self.unet(noisy_latents.to(self.dtype), timesteps, encoder_hidden_states=cond.crossattn.to(self.dtype),
                        added_cond_kwargs=added).sample
        return out.float()
