"""Prompt tokenization with embedding slots, and splicing trainable vectors into a text encoder.

The same mechanism A1111 uses (sd_hijack_clip + EmbeddingsWithFixes): the embedding name is
found in the prompt as a BPE id sequence, replaced by N placeholder positions (id 0), and the
token-embedding layer's output at those positions is overwritten with the vectors. Shared by all
diffusers families; SDXL runs both encoders over the same slot positions.
"""

from __future__ import annotations

import contextlib
import logging
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass

import torch

log = logging.getLogger("lib_ti")

PLACEHOLDER_ID = 0  # A1111 writes 0 where embedding vectors go; the value is never looked at
_CACHE_SIZE = 8192


@dataclass(frozen=True)
class Row:
    """One prompt, tokenized: ids with BOS/EOS (not padded), and per position the index of the
    vector spliced there or -1."""

    ids: tuple[int, ...]
    slot: tuple[int, ...]


@dataclass
class Batch:
    """Tensors for one encode: ids [B, L] padded with the encoder's pad id, slot [B, L] (-1 = none)."""

    ids: torch.Tensor
    slot: torch.Tensor
    has_slots: bool  # known on the CPU, so checking it never waits for the device


class PromptTokenizer:
    """Tokenizes prompts once and remembers them, so unchanged captions are not re-tokenized
    every step. The tokenizer lowercases, so names match case-insensitively as in A1111."""

    def __init__(self, tokenizer, max_length: int = 77):
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.bos = int(tokenizer.bos_token_id)
        self.eos = int(tokenizer.eos_token_id)
        self._ids: OrderedDict[str, tuple[int, ...]] = OrderedDict()
        self._rows: OrderedDict[tuple[str, tuple[int, ...], int], Row] = OrderedDict()
        self._warned = False

    def ids(self, text: str) -> tuple[int, ...]:
        """BPE ids of `text` without BOS/EOS (cached)."""
        got = self._ids.get(text)
        if got is None:
            got = tuple(self.tokenizer(text, add_special_tokens=False, truncation=False).input_ids)
            _remember(self._ids, text, got)
        return got

    def row(self, text: str, token: str, n_vectors: int) -> Row:
        name = self.ids(token) if token else ()
        key = (text, name, n_vectors)
        got = self._rows.get(key)
        if got is None:
            got = self._build(text, name, n_vectors)
            _remember(self._rows, key, got)
        return got

    def _build(self, text: str, name: tuple[int, ...], n: int) -> Row:
        ids, slot = [], []
        toks, i, k = self.ids(text), 0, len(name)
        while i < len(toks):  # left to right, matches do not overlap (A1111's walk)
            if k and toks[i : i + k] == name:
                ids += [PLACEHOLDER_ID] * n
                slot += range(n)
                i += k
            else:
                ids.append(toks[i])
                slot.append(-1)
                i += 1
        room = self.max_length - 2
        if len(ids) > room:
            if not self._warned:
                self._warned = True
                log.warning("a prompt is longer than %d tokens and was truncated (only the first chunk of "
                            "77 is trained): %r", room, text[:200])
            ids, slot = ids[:room], slot[:room]
        return Row((self.bos, *ids, self.eos), (-1, *slot, -1))

    def batch(self, texts: list[str], token: str, n_vectors: int, pad_id: int,
              device: torch.device | str = "cpu") -> Batch:
        rows = [self.row(t, token, n_vectors) for t in texts]
        ids = torch.full((len(rows), self.max_length), pad_id, dtype=torch.long)
        slot = torch.full((len(rows), self.max_length), -1, dtype=torch.long)
        for b, r in enumerate(rows):
            ids[b, : len(r.ids)] = torch.tensor(r.ids)
            slot[b, : len(r.slot)] = torch.tensor(r.slot)
        has = any(s >= 0 for r in rows for s in r.slot)
        return Batch(ids.to(device), slot.to(device), has)


def _remember(cache: OrderedDict, key, value) -> None:
    cache[key] = value
    if len(cache) > _CACHE_SIZE:  # captions are finite, but random prompt templates need not be
        cache.popitem(last=False)


def splice(embeds: torch.Tensor, slot: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    """`embeds` [B,L,W] with row slot[b,l] of `vectors` [N,W] wherever slot >= 0. Differentiable in
    `vectors`; one gather and one where for the whole batch."""
    picked = vectors.to(embeds.device, embeds.dtype)[slot.clamp(min=0)]
    return torch.where((slot >= 0).unsqueeze(-1), picked, embeds)


@contextlib.contextmanager
def spliced(embedding: torch.nn.Module, slot: torch.Tensor, vectors: torch.Tensor) -> Iterator[None]:
    """While open, `embedding`'s output gets `vectors` spliced in at `slot`. The hook is removed on
    exit, also after an exception, so nothing stays on the model."""

    def hook(_module, _inputs, out):
        if out.shape[:2] != slot.shape:  # not the call we are encoding for
            return out
        return splice(out, slot, vectors)

    handle = embedding.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def encode(text_encoder: torch.nn.Module, batch: Batch, vectors: torch.Tensor | None, **kwargs):
    """Run a transformers CLIP text model on `batch`, with `vectors` spliced in (none if None or the
    batch has no slots)."""
    if vectors is None or not batch.has_slots:
        return text_encoder(batch.ids, **kwargs)
    with spliced(text_encoder.get_input_embeddings(), batch.slot, vectors):
        return text_encoder(batch.ids, **kwargs)
