"""What a training run changes on the host's loaded model, each change undone exactly on exit:
frozen weights, the training embedding in the db, SDXL embedder flags, a setting, gradient
checkpointing of the UNet blocks, and --medvram placement; plus where the token-embedding layers
sit. (reForge's inference-tensor weights: inference_weights.py.) Used by host_model.py; imported
only inside the host."""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator
from typing import Any

import torch

MISSING = object()


def set_or_del(obj: Any, name: str, value: Any) -> None:
    """Put back an attribute read with getattr(obj, name, MISSING)."""
    if value is MISSING:
        if name in vars(obj):
            delattr(obj, name)
    else:
        setattr(obj, name, value)


def token_embedding_layer(text_model: Any) -> Any:
    """A host text-encoder wrapper's token-embedding layer (the host's EmbeddingsWithFixes)."""
    inner = text_model.wrapped
    if hasattr(inner, "transformer"):  # HF CLIP: SD1, SDXL clip_l
        return inner.transformer.text_model.embeddings.token_embedding
    return inner.model.token_embedding  # OpenCLIP: SD2, SDXL clip_g


def raw_token_embedding(text_model: Any) -> torch.nn.Embedding:
    """The nn.Embedding under it: the rows the host's encode_embedding_init_text reads."""
    layer = token_embedding_layer(text_model)
    return getattr(layer, "wrapped", layer)


def ti_key(text_model: Any) -> str:
    """The key ("clip_l" / "clip_g") under which this encoder reads an SDXL embedding's vec dict."""
    return getattr(token_embedding_layer(text_model), "textual_inversion_key", "clip_l")


@contextlib.contextmanager
def option_override(key: str, value: Any) -> Iterator[None]:
    """A host setting (shared.opts) changed while the block runs, without saving or callbacks."""
    from modules import shared

    data = shared.opts.data
    old = data.get(key, MISSING)
    data[key] = value
    try:
        yield
    finally:
        if old is MISSING:
            data.pop(key, None)
        else:
            data[key] = old


@contextlib.contextmanager
def frozen(model: torch.nn.Module) -> Iterator[None]:
    """Every weight requires_grad False, each flag put back as it was. Weak references: a strong
    one would keep the storage of a tensor a host replaces or moves during the run alive (the
    run's aliases are frozen from the start and dropped at restore anyway)."""
    flags = [(weakref.ref(p), p.requires_grad) for p in model.parameters()]
    try:
        model.requires_grad_(False)
        yield
    finally:
        for ref, flag in flags:
            p = ref()
            if p is not None:
                p.requires_grad_(flag)


@contextlib.contextmanager
def trainable_text_embedders(embedders: list[Any], text_embedders: list[Any]) -> Iterator[None]:
    """SDXL: GeneralConditioner.forward runs an embedder under no_grad unless is_trainable, and
    drops prompts at random while ucg_rate > 0. Both set for the run and put back (an attribute
    that was absent is removed again)."""
    texts = {id(e) for e in text_embedders}
    saved = [(e, getattr(e, "is_trainable", MISSING), getattr(e, "ucg_rate", MISSING)) for e in embedders]
    try:
        for e in embedders:
            e.ucg_rate = 0.0
            if id(e) in texts:
                e.is_trainable = True
        yield
    finally:
        for e, trainable, ucg in saved:
            set_or_del(e, "is_trainable", trainable)
            set_or_del(e, "ucg_rate", ucg)


class Registration:
    """The training Embedding in the host's db for the length of a run, and the db as it was."""

    def __init__(self, db: Any, model: Any, name: str, vec: Any, n: int, width: int):
        from modules.textual_inversion.textual_inversion import Embedding

        self.db, self.model, self.name = db, model, name
        self.before = list(db.word_embeddings.items())
        self.lookup_before = {k: list(v) for k, v in db.ids_lookup.items()}
        self.emb = Embedding(vec, name)
        self.emb.vectors = n
        self.emb.shape = width
        self.ensure()

    def ensure(self) -> None:
        """(Re)register if a reload replaced our entry meanwhile."""
        if self.db.word_embeddings.get(self.name) is not self.emb:
            self.db.register_embedding_by_name(self.emb, self.model, self.name)

    def restore(self) -> None:
        db = self.db
        if db.word_embeddings.get(self.name) is not self.emb:
            return  # a forced reload rebuilt the db from disk meanwhile; that state is newer
        db.register_embedding_by_name(None, self.model, self.name)  # the host's own unregister
        prev = dict(self.before).get(self.name)
        if prev is not None:
            db.register_embedding_by_name(prev, self.model, self.name)
        now = db.word_embeddings
        if len(now) == len(self.before) and all(now.get(k) is v for k, v in self.before):
            # Same entries: put back the exact order too, in the same dict objects (others hold them).
            now.clear()
            now.update(self.before)
            db.ids_lookup.clear()
            db.ids_lookup.update({k: list(v) for k, v in self.lookup_before.items()})


# ----------------------------------------------------------------------------------------------
# Gradient checkpointing (ldm and sgm UNet blocks)
# ----------------------------------------------------------------------------------------------

def _block_classes() -> tuple[type, ...]:
    classes: list[type] = []
    for pkg in ("ldm", "sgm", "ldm_patched.ldm"):  # ldm_patched: reForge's UNet
        try:
            a = __import__(f"{pkg}.modules.attention", fromlist=["BasicTransformerBlock"])
            o = __import__(f"{pkg}.modules.diffusionmodules.openaimodel", fromlist=["ResBlock"])
        except ImportError:
            continue
        classes += [a.BasicTransformerBlock, o.ResBlock]
        classes += [o.AttentionBlock] if hasattr(o, "AttentionBlock") else []
    return tuple(classes)


@contextlib.contextmanager
def checkpointed(unet: torch.nn.Module, classes: tuple[type, ...] | None = None,
                 clone_input: bool = False) -> Iterator[None]:
    """Run each transformer / res / attention block's `_forward` under torch.utils.checkpoint,
    non-reentrant (it works with frozen weights, unlike ldm/sgm's CheckpointFunction). An instance
    attribute shadows the class's forward, so nothing global changes and removal is `del`; the
    host's own sd_hijack_checkpoint patches the classes instead and is left alone. `clone_input`
    (Forge, whose blocks add into their input in place): the recomputation must see the input as
    it was."""
    classes = classes or _block_classes()
    patched = []
    try:
        for mod in unet.modules():
            if isinstance(mod, classes) and "forward" not in vars(mod):
                # ldm_patched's transformer block has no _forward; its forward adds out of place
                mod.forward = _checkpointed(getattr(mod, "_forward", mod.forward), clone_input)
                patched.append(mod)
        yield
    finally:
        for mod in patched:
            if getattr(vars(mod).get("forward"), "ti_trainer_checkpoint", False):
                del mod.forward


def _checkpointed(fn: Any, clone_input: bool) -> Any:
    def run(x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        return fn(x.clone() if clone_input else x, *args, **kwargs)

    def forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(run, x, *args, use_reentrant=False, **kwargs)
        return fn(x, *args, **kwargs)  # previews: nothing to save for backward

    forward.ti_trainer_checkpoint = True
    return forward


# ----------------------------------------------------------------------------------------------
# --medvram: keep the text encoder and the UNet on the device for the run
# ----------------------------------------------------------------------------------------------

class Placement:
    """medvram moves one big module at a time to the GPU from forward pre-hooks
    (modules/lowvram.py: send_me_to_gpu), evicting the previous one in place; backward through the
    text encoder after the UNet evicted it would meet CPU tensors. For the run we take those hooks
    off the UNet and text side, keep both on the device, and leave the VAE hook alone (it only
    runs for encoding and previews; the VAE is sent back off the device afterwards)."""

    def __init__(self, roots: list[torch.nn.Module]):
        from modules import devices, lowvram

        self.lowvram = lowvram
        self.roots = roots
        lowvram.send_everything_to_cpu()
        self.hooks: list[tuple[torch.nn.Module, dict]] = []
        try:
            for root in roots:
                for sub in root.modules():
                    hooks = sub._forward_pre_hooks
                    ours = [k for k, h in hooks.items() if getattr(h, "__name__", "") == "send_me_to_gpu"]
                    if ours:
                        self.hooks.append((sub, dict(hooks)))
                        for k in ours:
                            del hooks[k]
            for root in roots:
                root.to(devices.device)
        except BaseException:
            self.give_back()
            raise

    def vae_off(self) -> None:
        if self.lowvram.module_in_gpu is not None:  # only the VAE can be there during the run
            self.lowvram.send_everything_to_cpu()

    def give_back(self) -> None:
        from modules import devices

        self.lowvram.send_everything_to_cpu()
        for root in self.roots:
            root.to(devices.cpu)
        for sub, hooks in self.hooks:
            sub._forward_pre_hooks.clear()
            sub._forward_pre_hooks.update(hooks)
        self.hooks = []
