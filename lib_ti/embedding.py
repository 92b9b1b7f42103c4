"""The in-memory embedding: vectors per text-encoder slot plus the little metadata hosts keep."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lib_ti.model import SDXL_SLOTS, SINGLE_SLOT

# Widths of the real encoders; tiny test models use other widths and get family "unknown"
# from the width alone (the model they belong to knows better).
WIDTH_FAMILY = {768: "sd1", 1024: "sd2"}


@dataclass
class Embedding:
    """vectors: slot -> [n, width] float32 CPU tensor. Slots are "emb" (SD1/SD2) or
    "clip_l" + "clip_g" (SDXL), with the same n."""

    vectors: dict[str, torch.Tensor]
    step: int | None = None
    name: str | None = None
    sd_checkpoint: str | None = None
    sd_checkpoint_name: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def num_vectors(self) -> int:
        return next(iter(self.vectors.values())).shape[0]

    @property
    def widths(self) -> dict[str, int]:
        return {k: int(v.shape[-1]) for k, v in self.vectors.items()}

    @property
    def family(self) -> str:
        if set(self.vectors) == set(SDXL_SLOTS):
            return "sdxl"
        if set(self.vectors) == {SINGLE_SLOT}:
            return WIDTH_FAMILY.get(self.widths[SINGLE_SLOT], "unknown")
        return "unknown"

    def norms(self) -> dict[str, list[float]]:
        return {k: [float(x) for x in v.float().norm(dim=-1)] for k, v in self.vectors.items()}

    def detached(self) -> Embedding:
        """A CPU float32 copy, safe to save while training goes on."""
        vecs = {k: v.detach().to("cpu", torch.float32).clone() for k, v in self.vectors.items()}
        return Embedding(vecs, self.step, self.name, self.sd_checkpoint, self.sd_checkpoint_name,
                         dict(self.metadata))
