"""Inference-tensor weights made trainable for a run without a copy, and put back exactly.

Forge loads and moves every weight under torch.inference_mode, and reForge moves and casts its
model there too (a GPU load in its generation loop, a CLIP move in every encode): such weights are
inference tensors, which autograd cannot save for backward. Both adapters (forge_model.py,
host_model.py) give the run ordinary tensors on the same storage and hand the originals back at
the end. Host-free: torch only."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

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
def trainable(roots: list[torch.nn.Module]) -> Iterator[Trainable]:
    t = Trainable(roots)
    try:
        t.ensure()
        yield t
    finally:
        t.restore()
