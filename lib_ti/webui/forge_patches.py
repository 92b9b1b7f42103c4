"""What a training run changes on Forge's loaded model, each change undone exactly on exit:
inference-tensor weights replaced by ordinary tensors on the same storage (the weights are held
once), frozen weights, clones before Forge's in-place residual adds, gradient checkpointing of the
UNet blocks, the attention function, and the training embedding in every text engine's database.
Used by forge_model.py; imported only inside Forge (lllyasviel/stable-diffusion-webui-forge,
`backend`)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from lib_ti.webui import host_patches
from lib_ti.webui.host_patches import frozen  # noqa: F401  (one for both hosts)


def _transformer_block_classes() -> tuple[type, ...]:
    from backend.nn import unet

    return (unet.BasicTransformerBlock,)


def _clone_input(_module: Any, args: tuple) -> tuple:
    return (args[0].clone(), *args[1:])


@contextlib.contextmanager
def out_of_place_norms(dm: torch.nn.Module) -> Iterator[None]:
    """Forge's BasicTransformerBlock._forward adds residuals in place (`x += n`, `x += x_skip`)
    after norm1/norm2/norm3 (and norm_in) saved `x` for backward: backward fails with "modified by
    an inplace operation", and under checkpointing the recomputation silently sees the changed
    tensor. A pre-hook hands each norm a clone instead; removed on exit."""
    handles = []
    try:
        for mod in dm.modules():
            if isinstance(mod, _transformer_block_classes()):
                for name in ("norm_in", "norm1", "norm2", "norm3"):
                    norm = getattr(mod, name, None)
                    if isinstance(norm, torch.nn.Module):
                        handles.append(norm.register_forward_pre_hook(_clone_input))
        yield
    finally:
        for h in handles:
            h.remove()


def checkpointed(dm: torch.nn.Module) -> contextlib.AbstractContextManager[None]:
    """Each transformer and res block's `_forward` under non-reentrant torch.utils.checkpoint
    (Forge's own `checkpoint()` raises NotImplementedError when enabled), the block input cloned
    inside the checkpointed function: `_forward` adds into its input in place."""
    from backend.nn import unet

    return host_patches.checkpointed(dm, (unet.BasicTransformerBlock, unet.ResBlock), clone_input=True)


@contextlib.contextmanager
def pytorch_attention() -> Iterator[None]:
    """Split and sub-quadratic attention write in place into tensors autograd saved; the UNet
    uses scaled_dot_product_attention for the run (Forge's default on NVIDIA anyway)."""
    from backend import attention
    from backend.nn import unet

    old = unet.attention_function
    unet.attention_function = attention.attention_pytorch
    try:
        yield
    finally:
        unet.attention_function = old


class Registration:
    """The training Embedding in one engine's database (Forge's API: no model argument) for the
    length of a run, and the database as it was before."""

    def __init__(self, db: Any, emb: Any):
        self.db, self.emb, self.name = db, emb, emb.name
        self.before = list(db.word_embeddings.items())
        self.lookup_before = {k: list(v) for k, v in db.ids_lookup.items()}
        self.ensure()

    def ensure(self) -> None:
        """(Re)register if a reload replaced our entry meanwhile."""
        if self.db.word_embeddings.get(self.name) is not self.emb:
            self.db.register_embedding_by_name(self.emb, self.name)

    def restore(self) -> None:
        db = self.db
        if db.word_embeddings.get(self.name) is not self.emb:
            return  # a reload rebuilt the db from disk meanwhile; that state is newer
        db.register_embedding_by_name(None, self.name)
        prev = dict(self.before).get(self.name)
        if prev is not None:
            db.register_embedding_by_name(prev, self.name)
        now = db.word_embeddings
        if len(now) == len(self.before) and all(now.get(k) is v for k, v in self.before):
            now.clear()  # the same entries: the exact order too, in the same dict objects
            now.update(self.before)
            db.ids_lookup.clear()
            db.ids_lookup.update({k: list(v) for k, v in self.lookup_before.items()})


def load_for_step(patchers: list[Any]) -> None:
    """Forge's placement: both the text encoder and the UNet loaded for the step (outside
    inference_mode), then refuse weight streaming: with "CPU swap" Forge moves weights per layer
    during forward, and backward would keep every streamed copy alive."""
    from backend import memory_management as mm

    mm.load_models_gpu(patchers)
    for lm in mm.current_loaded_models:
        if getattr(lm, "model_accelerated", False) and any(lm.model is p for p in patchers):
            from lib_ti.webui.host_embeddings import HostError

            raise HostError("Forge is streaming the model's weights from CPU memory (the 'GPU Weights' slider "
                            "leaves too little room): backward would hold every streamed layer. Raise "
                            "'GPU Weights' at the top of the page until the whole model fits, then train again")
