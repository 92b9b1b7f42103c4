"""What a training run changes on Forge's loaded model, each change undone exactly on exit:
inference-tensor weights replaced by ordinary tensors on the same storage (the weights are held
once), frozen weights, clones before Forge's in-place residual adds, gradient checkpointing of the
UNet blocks, the attention function, and the training embedding in every text engine's database.
Used by forge_model.py; imported only inside Forge (lllyasviel/stable-diffusion-webui-forge,
`backend`)."""

from __future__ import annotations

import contextlib
import sys
import weakref
from collections.abc import Iterator
from typing import Any

import torch


class _Original:
    """One weight object as Forge had it, the slots it sat in, and whether its storage was handed
    over to the run's ordinary alias (then it holds nothing until restore)."""

    def __init__(self, t: torch.Tensor):
        self.t, self.shape, self.slots, self.released = t, tuple(t.shape), [], False


class Trainable:
    """Forge loads and moves every weight under torch.inference_mode, so its parameters are
    inference tensors that autograd cannot save for backward ("Inference tensors cannot be saved
    for backward"); `p.data = clone` is not enough either (no version counter). So each such
    Parameter / buffer *object* is replaced for the run by an ordinary frozen tensor that *aliases
    its storage* (no copy: the weights are held once), one per object, so a weight registered twice,
    as CLIPEmbeddingForTextualInversion.weight is, stays one. The original object then lets go of
    the storage (unless something outside the roots still holds it), so when Forge moves or casts
    the run's tensor, the old memory is freed as in Forge's own moves. Forge makes weights
    inference tensors again on any move under inference_mode (previews do), hence `ensure()`
    before every step: it aliases those again. `restore()` puts the original objects back, each
    taking over the storage of what sits in its slot then: no copy either, and the values, device
    and dtype are exactly what Forge's own moves and casts made of its weights during the run
    (bit-identical to before when it made none)."""

    def __init__(self, roots: list[torch.nn.Module]):
        self.roots = roots
        self.originals: dict[int, _Original] = {}  # by id of the original object
        self.slots: set[tuple[int, str, str]] = set()  # slots whose original is recorded

    def ensure(self) -> int:
        n, fresh = self._swap()
        for rec in fresh:  # after _swap returned: no local name holds an original any more
            self._release(rec)
        return n

    def _swap(self) -> tuple[int, list[_Original]]:
        aliases: dict[int, torch.Tensor] = {}
        fresh: list[_Original] = []
        n = 0
        for root in self.roots:
            for mod in root.modules():
                for kind in ("_parameters", "_buffers"):
                    table = getattr(mod, kind)
                    for name, t in list(table.items()):
                        if t is None or not t.is_inference():
                            continue
                        rec = self.originals.get(id(t))
                        if rec is not None and rec.released:
                            raise RuntimeError(f"Forge put back the weight {name!r} of {type(mod).__name__} that "
                                               "the training run had taken over; the run cannot continue safely")
                        new = aliases.get(id(t))
                        if new is None:
                            new = aliases[id(t)] = _alias(t, kind == "_parameters")
                        key = (id(mod), kind, name)
                        if key not in self.slots:  # the object Forge had here: put back at restore
                            if rec is None:
                                rec = self.originals[id(t)] = _Original(t)
                                fresh.append(rec)
                            rec.slots.append((mod, kind, name))
                            self.slots.add(key)
                        table[name] = new
                        n += 1
        return n, fresh

    @staticmethod
    def _release(rec: _Original) -> None:
        """The original lets go of its storage (the alias keeps it) if nothing but this record
        holds the object: a holder outside the roots would read an empty tensor, so such a weight
        keeps it (it may then exist twice if Forge moves the alias)."""
        probe = _Original(torch.empty(0))  # held the same way by nothing else
        if sys.getrefcount(rec.t) > sys.getrefcount(probe.t):
            return
        with torch.inference_mode():
            rec.t.data = torch.empty(0, dtype=rec.t.dtype, device=rec.t.device)
        rec.released = True

    def restore(self) -> None:
        lost = []
        for rec in self.originals.values():
            tables = [getattr(mod, kind) for mod, kind, _ in rec.slots]
            now = [table.get(name) for table, (_, _, name) in zip(tables, rec.slots)]
            source = next((x for x in now if x is not None and tuple(x.shape) == rec.shape), None)
            if source is None:
                lost.append(rec.slots[0][2])
                continue  # leave what Forge has there: a working model, not an empty weight
            if source is not rec.t:
                with torch.inference_mode():
                    rec.t.data = _alias(source, inference=True)
            for table, (_, _, name) in zip(tables, rec.slots):
                table[name] = rec.t
        self.originals.clear()
        self.slots.clear()
        if lost:
            raise RuntimeError(f"weights removed from Forge's model during training could not be put back: {lost}")


def _alias(t: torch.Tensor, parameter: bool = False, inference: bool = False) -> torch.Tensor:
    """A tensor on the same storage as `t` (same dtype, offset, shape, strides): an ordinary one
    (a frozen Parameter if `parameter`) or, with `inference`, an inference tensor."""
    with torch.inference_mode(inference):
        a = torch.empty(0, dtype=t.dtype, device=t.device)
        a.set_(t.untyped_storage(), t.storage_offset(), t.size(), t.stride())
    return torch.nn.Parameter(a, requires_grad=False) if parameter else a


@contextlib.contextmanager
def frozen(model: torch.nn.Module) -> Iterator[None]:
    """Every weight requires_grad False, each flag put back as it was. Weak references: a strong
    one would keep the storage of a tensor Forge replaces or moves during the run alive (the
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
def trainable(roots: list[torch.nn.Module]) -> Iterator[Trainable]:
    t = Trainable(roots)
    try:
        t.ensure()
        yield t
    finally:
        t.restore()


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


@contextlib.contextmanager
def checkpointed(dm: torch.nn.Module) -> Iterator[None]:
    """Each transformer and res block's `_forward` under non-reentrant torch.utils.checkpoint
    (Forge's own `checkpoint()` raises NotImplementedError when enabled). The block input is
    cloned inside the checkpointed function: `_forward` adds into its input in place, and the
    recomputation must see the input as it was. An instance attribute shadows the class's forward;
    removal is `del`."""
    from backend.nn import unet

    classes = (unet.BasicTransformerBlock, unet.ResBlock)
    patched = []
    try:
        for mod in dm.modules():
            if isinstance(mod, classes) and "forward" not in vars(mod):
                mod.forward = _checkpointed(mod._forward)
                patched.append(mod)
        yield
    finally:
        for mod in patched:
            if getattr(vars(mod).get("forward"), "ti_trainer_checkpoint", False):
                del mod.forward


def _checkpointed(fn: Any) -> Any:
    def run(x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        return fn(x.clone(), *args, **kwargs)

    def forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(run, x, *args, use_reentrant=False, **kwargs)
        return fn(x, *args, **kwargs)  # previews: nothing to save for backward

    forward.ti_trainer_checkpoint = True
    return forward


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
