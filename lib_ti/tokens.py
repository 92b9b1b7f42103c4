"""Checks on the new token and its initial vectors, against the model's own tokenizer."""

from __future__ import annotations

import re

import torch

from lib_ti.model import TrainableModel

# The token is also the file stem the WebUI loads it by, so it must be a safe file name too.
_SAFE = re.compile(r"^[A-Za-z0-9_.\-]+$")


class TokenError(ValueError):
    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(message)


def check_token_string(model: TrainableModel, token: str) -> list[int]:
    """The token's BPE ids. It must not be a word the model already knows: prompts would
    replace every use of that word with the embedding."""
    if not token or not _SAFE.match(token):
        raise TokenError("token_string", f"'{token}' may contain only letters, digits, '_', '-' and '.' "
                         "(it is also the file name)")
    ids = model.tokenize(token)
    if not ids:
        raise TokenError("token_string", f"'{token}' tokenizes to nothing")
    if len(ids) == 1:
        word = model.decode_tokens(ids)[0]
        raise TokenError(
            "token_string",
            f"'{token}' is already the known word '{word}': every '{token}' in a prompt would become the "
            f"embedding. Use something unique, e.g. '{_suggest(token)}'",
        )
    return ids


def _suggest(token: str) -> str:
    return f"{token.rstrip('.-_')}-ti{len(token) * 7 % 90 + 10}"


def init_vectors(
    model: TrainableModel, init_word: str, n: int, spread: bool = False
) -> dict[str, torch.Tensor]:
    """Initial vectors per slot, [n, width] float32.

    One token: every vector starts as its embedding (kohya, diffusers). Several tokens only with
    `spread`, distributed as A1111's create_embedding does: vec[i] = emb[i * k // n] over the first
    k = min(len, n) tokens. An empty init word gives zeros (A1111).
    """
    widths = model.slots()
    if not init_word.strip():
        return {k: torch.zeros(n, w) for k, w in widths.items()}
    ids = model.tokenize(init_word)
    pieces = model.decode_tokens(ids)
    if len(ids) != 1 and not spread:
        raise TokenError(
            "init_word",
            f"'{init_word}' is {len(ids)} tokens {pieces}, not one word. Use a single word, "
            "or turn on init_word_spread to spread it over the vectors as A1111 does",
        )
    rows = model.token_embeddings(init_word)
    out = {}
    for slot, emb in rows.items():
        emb = emb[: max(1, min(emb.shape[0], n))].float()
        k = emb.shape[0]
        idx = torch.tensor([i * k // n for i in range(n)])
        out[slot] = emb[idx].clone()
    return out
