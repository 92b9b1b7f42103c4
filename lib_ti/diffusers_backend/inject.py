"""Prompt tokenization with embedding slots, and splicing trainable vectors into a text encoder.

The same mechanism A1111 uses (sd_hijack_clip + EmbeddingsWithFixes): the embedding name is
found in the prompt as a BPE id sequence, replaced by N placeholder positions (id 0), and the
token-embedding layer's output at those positions is overwritten with the vectors. Prompts are
cut into chunks of 75 tokens, each encoded as its own 77-token sequence and the results joined,
so a token anywhere in a long caption trains. Shared by all diffusers families; SDXL runs both
encoders over the same slot positions. With `weighted` on (kohya's weighted_captions), prompts are
read with A1111's emphasis syntax (lib_ti.prompt_weights) and weighted as A1111's "Original"
emphasis does.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from lib_ti import prompt_weights

PLACEHOLDER_ID = 0  # A1111 writes 0 where embedding vectors go; the value is never looked at
_CACHE_SIZE = 8192


CHUNK = 75  # tokens a chunk holds between BOS and EOS; longer prompts get more chunks (A1111)
COMMA_BACKTRACK = 20  # A1111's comma_padding_backtrack default: a full chunk breaks after a recent comma
_COMMA = ","


@dataclass(frozen=True)
class Chunk:
    """One 77-token encoder input: ids with BOS/EOS (not padded), and per position the index of
    the vector spliced there or -1."""

    ids: tuple[int, ...]
    slot: tuple[int, ...]
    weight: tuple[float, ...] = ()  # emphasis per position; () when all are 1.0


@dataclass(frozen=True)
class Row:
    """One prompt, tokenized into chunks of at most 75 tokens, as A1111 encodes it."""

    chunks: tuple[Chunk, ...]

    @property
    def ids(self) -> tuple[int, ...]:
        return tuple(i for c in self.chunks for i in c.ids)

    @property
    def slot(self) -> tuple[int, ...]:
        return tuple(s for c in self.chunks for s in c.slot)


@dataclass
class Batch:
    """Tensors for one encode: ids [B*K, 77] padded with the encoder's pad id, slot [B*K, 77]
    (-1 = none); rows b*K .. b*K+K-1 are prompt b's K chunks (shorter prompts get empty chunks)."""

    ids: torch.Tensor
    slot: torch.Tensor
    has_slots: bool  # known on the CPU, so checking it never waits for the device
    chunks: int = 1
    weights: torch.Tensor | None = None  # [B*K, 77] emphasis, None when every weight is 1.0

    def join(self, states: torch.Tensor) -> torch.Tensor:
        """Encoder output [B*K, 77, W] -> conditioning [B, K*77, W] (A1111 concatenates chunks)."""
        n, length = states.shape[:2]
        return states.reshape(n // self.chunks, self.chunks * length, *states.shape[2:])

    def emphasize(self, states: torch.Tensor) -> torch.Tensor:
        """A1111's "Original" emphasis on encoder output [B*K, 77, W]: each position times its
        weight, then the chunk rescaled so its mean is the unweighted one. Per prompt and chunk
        (A1111 takes one mean over the batch's chunks; the same for one prompt at a time)."""
        if self.weights is None:
            return states
        x = states.float()
        z = x * self.weights.to(x.device).unsqueeze(-1)
        z = z * (x.mean(dim=(1, 2), keepdim=True) / z.mean(dim=(1, 2), keepdim=True))
        return z.to(states.dtype)

    def first(self, pooled: torch.Tensor) -> torch.Tensor:
        """Per-chunk vectors [B*K, P] -> the first chunk's [B, P] (A1111's pooled output for SDXL)."""
        return pooled.reshape(-1, self.chunks, *pooled.shape[1:])[:, 0]


class PromptTokenizer:
    """Tokenizes prompts once and remembers them, so unchanged captions are not re-tokenized
    every step. The tokenizer lowercases, so names match case-insensitively as in A1111."""

    def __init__(self, tokenizer, max_length: int = 77):
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.bos = int(tokenizer.bos_token_id)
        self.eos = int(tokenizer.eos_token_id)
        self.comma = int(tokenizer.convert_tokens_to_ids(_COMMA + "</w>"))
        self._ids: OrderedDict[str, tuple[int, ...]] = OrderedDict()
        self._rows: OrderedDict[tuple[str, tuple[int, ...], int, bool], Row] = OrderedDict()
        self.weighted = False  # read A1111's (word:1.2) / [word] / BREAK syntax (weighted_captions)

    def ids(self, text: str) -> tuple[int, ...]:
        """BPE ids of `text` without BOS/EOS (cached)."""
        got = self._ids.get(text)
        if got is None:
            got = tuple(self.tokenizer(text, add_special_tokens=False, truncation=False, verbose=False).input_ids)
            _remember(self._ids, text, got)
        return got

    def row(self, text: str, token: str, n_vectors: int) -> Row:
        name = self.ids(token) if token else ()
        key = (text, name, n_vectors, self.weighted)
        got = self._rows.get(key)
        if got is None:
            pieces = prompt_weights.parse(text) if self.weighted else [(text, 1.0)]
            got = self._build(pieces, name, n_vectors)
            _remember(self._rows, key, got)
        return got

    def _build(self, pieces: list[tuple[str, float] | None], name: tuple[int, ...], n: int) -> Row:
        """A1111's tokenize_line: each piece (text of one weight) tokenized on its own, left to
        right, name matches within a piece and not overlapping; a chunk is closed at a BREAK
        (None), when full (after a comma within the last 20 tokens, if there is one) or when the
        vectors would not fit, so the N vectors always sit together in one chunk (N <= 75)."""
        chunks: list[Chunk] = []
        ids: list[int] = []
        slot: list[int] = []
        wts: list[float] = []
        last_comma = -1

        def close() -> None:
            nonlocal last_comma
            weight = (1.0, *wts, 1.0) if any(w != 1.0 for w in wts) else ()
            chunks.append(Chunk((self.bos, *ids, self.eos), (-1, *slot, -1), weight))
            ids.clear()
            slot.clear()
            wts.clear()
            last_comma = -1

        k, room = len(name), self.max_length - 2
        for piece in pieces:
            if piece is None:
                close()
                continue
            toks, weight, i = self.ids(piece[0]), piece[1], 0
            while i < len(toks):
                tok = toks[i]
                if tok == self.comma:
                    last_comma = len(ids)
                elif len(ids) == room and last_comma != -1 and len(ids) - last_comma <= COMMA_BACKTRACK:
                    cut = last_comma + 1
                    moved = ids[cut:], slot[cut:], wts[cut:]
                    del ids[cut:], slot[cut:], wts[cut:]
                    close()
                    ids[:], slot[:], wts[:] = moved
                if len(ids) == room:
                    close()
                if k and toks[i : i + k] == name:
                    if len(ids) + n > room:
                        close()
                    ids += [PLACEHOLDER_ID] * n
                    slot += range(n)
                    wts += [weight] * n
                    i += k
                else:
                    ids.append(tok)
                    slot.append(-1)
                    wts.append(weight)
                    i += 1
        if ids or not chunks:
            close()
        return Row(tuple(chunks))

    def batch(self, texts: list[str], token: str, n_vectors: int, pad_id: int,
              device: torch.device | str = "cpu") -> Batch:
        rows = [self.row(t, token, n_vectors) for t in texts]
        k = max(len(r.chunks) for r in rows)
        empty = Chunk((self.bos, self.eos), (-1, -1))  # A1111 fills shorter prompts up with empty chunks
        ids = torch.full((len(rows) * k, self.max_length), pad_id, dtype=torch.long)
        slot = torch.full((len(rows) * k, self.max_length), -1, dtype=torch.long)
        weighted = any(c.weight for r in rows for c in r.chunks)
        weights = torch.ones((len(rows) * k, self.max_length)) if weighted else None
        for b, r in enumerate(rows):
            for c, ch in enumerate(r.chunks + (empty,) * (k - len(r.chunks))):
                ids[b * k + c, : len(ch.ids)] = torch.tensor(ch.ids)
                slot[b * k + c, : len(ch.slot)] = torch.tensor(ch.slot)
                if weights is not None and ch.weight:  # padding keeps 1.0, as in A1111
                    weights[b * k + c, : len(ch.weight)] = torch.tensor(ch.weight)
        has = any(s >= 0 for r in rows for s in r.slot)
        return Batch(ids.to(device), slot.to(device), has, k, None if weights is None else weights.to(device))


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
