"""The CLIP BPE vocabulary as Hugging Face tokenizer files, built offline from the copy open_clip ships.

Every SD text encoder (CLIP-L, OpenCLIP-H, OpenCLIP-bigG) uses this one vocabulary; only the pad
token differs. The files are byte-identical in meaning to openai/clip-vit-large-patch14's
vocab.json + merges.txt, so ids match real checkpoints (bos 49406, eos 49407).
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import shutil
import tempfile
from functools import cache
from pathlib import Path

from transformers import CLIPTokenizer

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
PAD_SD1 = EOS  # diffusers' SD1 tokenizer (and SDXL's first) pads with the end token
PAD_OPENCLIP = "!"  # diffusers' SD2 tokenizer and SDXL tokenizer_2 pad with "!" (id 0)
MAX_LENGTH = 77
_N_MERGES = 49152 - 256 - 2  # the slice CLIP's SimpleTokenizer and HF's CLIPTokenizer both take
_FILES = ("vocab.json", "merges.txt")


def _bpe_gz() -> Path:
    # find_spec only locates the package: importing open_clip would pull in torchvision.
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("open_clip is needed for its BPE vocabulary (bpe_simple_vocab_16e6.txt.gz)")
    return Path(next(iter(spec.submodule_search_locations))) / "bpe_simple_vocab_16e6.txt.gz"


@cache
def _bytes_to_unicode() -> tuple[str, ...]:
    """The 256 printable stand-ins for bytes, in CLIP's order (same code as CLIP's tokenizer)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return tuple(chr(c) for c in cs)


def write_tokenizer_files(folder: str | os.PathLike) -> Path:
    """Write vocab.json and merges.txt for CLIPTokenizer into `folder` (created if needed)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lines = gzip.open(_bpe_gz()).read().decode("utf-8").split("\n")
    merges = lines[1 : _N_MERGES + 1]
    base = list(_bytes_to_unicode())
    vocab = base + [b + "</w>" for b in base] + ["".join(m.split()) for m in merges] + [BOS, EOS]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False),
                                       encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return folder


def tokenizer_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """A folder holding the tokenizer files, built on first use and reused afterwards.

    Built in a sibling temp folder and renamed into place, so parallel processes never see
    half-written files.
    """
    folder = Path(cache_dir) if cache_dir is not None else Path(tempfile.gettempdir()) / "lib_ti_clip_tokenizer"
    if all((folder / f).is_file() for f in _FILES):
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=folder.parent))
    try:
        write_tokenizer_files(tmp)
        if folder.exists():  # an empty or partial folder (e.g. a fixture's mktemp): fill it in place
            for f in _FILES:
                os.replace(tmp / f, folder / f)
        else:
            try:
                os.replace(tmp, folder)
            except OSError:  # another process won the race; its files are just as good
                pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def make_tokenizer(pad_token: str = PAD_SD1, cache_dir: str | os.PathLike | None = None) -> CLIPTokenizer:
    """A slow CLIPTokenizer (the class diffusers' model_index names) with `pad_token`."""
    folder = tokenizer_dir(cache_dir)
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token=pad_token,
                         model_max_length=MAX_LENGTH)
