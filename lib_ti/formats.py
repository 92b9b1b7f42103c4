"""Every embedding file layout we read or write, in one place.

Reading sniffs the content (safetensors header or torch pickle), then the keys, in the order the
hosts check them (A1111 `create_embedding_from_data`, kohya `load_weights`), plus the layouts only
trainers write: OneTrainer `emp_params`, the diffusers SDXL two-file pair and LoRA `bundle_emb.*`.
Pickles never run code: torch's weights_only loader first, then an allow-list unpickler that also
accepts the old `ParameterDict` files.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable
from typing import Any

import safetensors
import safetensors.torch
import torch

from lib_ti import files, safe_pickle
from lib_ti.embedding import Embedding
from lib_ti.model import SDXL_SLOTS, SINGLE_SLOT

FIELDS = ("step", "name", "sd_checkpoint", "sd_checkpoint_name")
SAVE_FORMATS = ("safetensors", "a1111-pt", "diffusers")
FAMILY_WIDTHS = {"SD1": {SINGLE_SLOT: 768}, "SD2": {SINGLE_SLOT: 1024}, "SDXL": {"clip_l": 768, "clip_g": 1280}}
A1111_TOKEN_ID = 265  # the constant A1111 writes into string_to_token; every reader ignores it
MAX_NORM = 65504.0  # float16 max: beyond it the host's half-precision text encoder overflows
NOTE = "note"  # metadata key for what the reader dropped or guessed


class FormatError(ValueError):
    """A file that is not an embedding we understand, or an embedding that cannot be written as asked."""


class OverwriteError(FormatError, FileExistsError):
    """The target exists and overwrite was not asked for."""


def _load_pickle_checked(path: str) -> Any:
    try:
        return safe_pickle.load(path)
    except safe_pickle.UnsafeFileError as e:
        raise FormatError(str(e)) from None


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [""])[0][:300]


def _sniff(path: str) -> str:
    with open(path, "rb") as f:
        head = f.read(16)
    if not head:
        raise FormatError(f"{path}: the file is empty")
    n = int.from_bytes(head[:8], "little")
    if len(head) >= 9 and head[8:9] == b"{" and 0 < n <= os.path.getsize(path) - 8:
        return "safetensors"
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":
        return "pickle"
    if head.startswith(b"\x89PNG") or head[8:12] == b"WEBP":
        raise FormatError(f"{path}: image embeddings (PNG/WebP) are not supported; convert it in the WebUI first")
    raise FormatError(f"{path}: neither a safetensors file nor a torch pickle")


def _vec(t: Any, path: str, key: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise FormatError(f"{path}: {key!r} is a {type(t).__name__}, not a tensor")
    t = t.detach()
    if t.dim() == 1:  # single-vector diffusers/InvokeAI files store [width]
        t = t.unsqueeze(0)
    if t.dim() != 2 or t.shape[0] < 1 or t.shape[1] < 1:
        raise FormatError(f"{path}: {key!r} has shape {list(t.shape)}; an embedding is [vectors, width]")
    return _clean(t)


def _keys_text(keys: list[str]) -> str:
    return ", ".join(keys[:12]) + (f", ... ({len(keys)} keys)" if len(keys) > 12 else "") or "none"


def _split_meta(meta: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """(fields for Embedding, the rest as strings). A step that is not a number stays in the rest."""
    fields: dict[str, Any] = {}
    rest: dict[str, str] = {}
    for k, v in meta.items():
        if v is None:
            continue
        if k == "step" and re.fullmatch(r"\s*-?\d+\s*", str(v)):
            fields[k] = int(v)
        elif k in FIELDS and k != "step":
            fields[k] = str(v)
        elif k == "metadata" and isinstance(v, dict):
            rest.update({str(a): str(b) for a, b in v.items()})
        elif isinstance(v, (str, int, float, bool)):
            rest[str(k)] = str(v)
    return fields, rest


def _make(vectors: dict[str, torch.Tensor], meta: dict[str, Any], default_name: str,
          notes: list[str], path: str) -> Embedding:
    if len(vectors) > 1 and len({v.shape[0] for v in vectors.values()}) > 1:
        counts = ", ".join(f"{k} {v.shape[0]}" for k, v in vectors.items())
        raise FormatError(f"{path}: the text encoders have different vector counts ({counts})")
    fields, rest = _split_meta(meta)
    if notes:
        rest[NOTE] = "; ".join([rest[NOTE], *notes] if NOTE in rest else notes)
    fields.setdefault("name", default_name)
    return Embedding(vectors, metadata=rest, **fields)


def _stem(path: str) -> str:
    return os.path.splitext(os.path.basename(path))[0]


_LEARNED = re.compile(r"learned_embeds(_2)?(?=[-.]|$)")


def partner_path(path: str) -> tuple[str, bool]:
    """(the other file of a diffusers SDXL pair, whether `path` is the second encoder's file).
    diffusers names them learned_embeds* / learned_embeds_2*; other names get `_2` before the extension."""
    folder, base = os.path.split(path)
    m = _LEARNED.search(base)
    if m:
        other = "learned_embeds" if m.group(1) else "learned_embeds_2"
        return os.path.join(folder, base[:m.start()] + other + base[m.end():]), bool(m.group(1))
    stem, ext = os.path.splitext(base)
    if stem.endswith("_2"):
        return os.path.join(folder, stem[:-2] + ext), True
    return os.path.join(folder, stem + "_2" + ext), False


def _read(path: str, name: str | None = None, pair: bool = True) -> tuple[Embedding, str, list[str]]:
    """(embedding, layout name, files read)."""
    if _sniff(path) == "safetensors":
        try:
            with safetensors.safe_open(path, framework="pt", device="cpu") as f:
                keys = list(f.keys())
                return _from_tensors(path, keys, f.get_tensor, dict(f.metadata() or {}), name, pair, False)
        except safetensors.SafetensorError as e:
            raise FormatError(f"{path}: damaged safetensors file ({_first_line(e)})") from None
    data = _load_pickle_checked(path)
    if not isinstance(data, dict):
        raise FormatError(f"{path}: holds a {type(data).__name__}, not a dict of tensors")
    if "string_to_param" in data:
        return _from_a1111(path, data), "a1111-pt", [path]
    tensors = {str(k): v for k, v in data.items() if isinstance(v, torch.Tensor)}
    meta = {str(k): v for k, v in data.items() if not isinstance(v, torch.Tensor)}
    return _from_tensors(path, list(tensors), tensors.__getitem__, meta, name, pair, True)


def _from_a1111(path: str, data: dict[str, Any]) -> Embedding:
    params = data["string_to_param"]
    params = getattr(params, "_parameters", params)  # old pickles hold a ParameterDict
    if not hasattr(params, "items") or len(params) != 1:
        found = list(params) if hasattr(params, "keys") else type(params).__name__
        raise FormatError(f"{path}: string_to_param must hold exactly one entry, found {found}")
    (value,) = params.values()
    if isinstance(value, dict) and set(SDXL_SLOTS) <= set(value):  # A1111's save() of an SDXL vec
        vectors = {s: _vec(value[s], path, s) for s in SDXL_SLOTS}
    else:
        vectors = {SINGLE_SLOT: _vec(value, path, "string_to_param")}
    meta = {k: v for k, v in data.items() if k not in ("string_to_param", "string_to_token")}
    return _make(vectors, meta, _stem(path), [], path)


# single keys that name a layout, not a token (a lone clip_l/clip_h/clip_g: ComfyUI's per-encoder keys)
_NAMED_KEYS = {"emb_params", "emp_params", "*", "clip_l", "clip_h", "clip_g"}


def _from_tensors(path: str, keys: list[str], get: Callable[[str], Any], meta: dict[str, Any],
                  name: str | None, pair: bool, pickled: bool) -> tuple[Embedding, str, list[str]]:
    if any(k.startswith("bundle_emb.") for k in keys):
        return _from_bundle(path, keys, get, name), "lora-bundle", [path]
    notes = []
    # OneTrainer's output embeddings sit next to their input keys; hosts only use the inputs
    outs = [k for k in keys if k.endswith("_out") and k[:-4] in keys]
    main = [k for k in keys if k not in outs]
    if outs:
        notes.append(f"ignored output-embedding keys {', '.join(outs)}")
    if set(SDXL_SLOTS) <= set(main):
        used = list(SDXL_SLOTS)
    elif "emp_params" in main:  # OneTrainer's spelling
        used = ["emp_params"]
    elif len(main) == 1:
        used = main
    else:
        raise FormatError(f"{path}: not an embedding layout we know; tensor keys found: {_keys_text(keys)}")
    extra = [k for k in main if k not in used]
    if extra:
        notes.append(f"ignored keys {', '.join(extra)}")
    key = used[0]
    if len(used) == 2:
        vectors = {s: _vec(get(s), path, s) for s in SDXL_SLOTS}
    else:
        vectors = {SINGLE_SLOT: _vec(get(key), path, key)}
    if len(used) == 2 or key in _NAMED_KEYS or key.startswith("string_to_param"):
        kohya = pickled or any(k.startswith(("modelspec.", "ss_")) for k in meta)  # SAI model-spec header
        fmt = "onetrainer" if outs or key == "emp_params" else "kohya" if kohya else "safetensors"
        return _make(vectors, meta, _stem(path), notes, path), fmt, [path]
    # any other single key is a diffusers/InvokeAI {token: tensor}; it may be half of an SDXL pair
    meta = {k: v for k, v in meta.items() if not (k == "format" and v == "pt")}
    emb = _make(vectors, meta, key, notes, path)
    return (pair and _diffusers_pair(path, emb)) or (emb, "diffusers", [path])


def _diffusers_pair(path: str, emb: Embedding) -> tuple[Embedding, str, list[str]] | None:
    other, second = partner_path(path)
    strict = bool(_LEARNED.search(os.path.basename(path)))  # diffusers' own names must pair up
    try:
        half = _read(other, pair=False) if os.path.isfile(other) else None
    except FormatError:
        half = None
    vec = emb.vectors[SINGLE_SLOT]
    # both halves hold the same token (or, from our writer, the same header name) and vector count
    ok = half is not None and half[1] == "diffusers" and half[0].name == emb.name
    vec2 = half[0].vectors[SINGLE_SLOT] if ok else vec  # type: ignore[index]
    ok = ok and vec2.shape[0] == vec.shape[0]
    # two separate SD1 embeddings saved as x and x_2 have equal widths; a real pair never does
    if not ok or (not strict and vec2.shape[1] == vec.shape[1]):
        if strict and second and half is None:
            raise FormatError(f"{path} is the second text encoder's half of a diffusers SDXL pair, "
                              f"but its partner {os.path.basename(other)} is not in the same folder")
        if strict and half is not None:
            raise FormatError(f"{path} and {os.path.basename(other)} look like a diffusers SDXL pair "
                              f"but do not hold the same token {emb.name!r} with the same number of vectors")
        return None
    if second:  # the first file carries the metadata, and reading it pairs back with this one
        return _read(other)
    both = Embedding({"clip_l": vec, "clip_g": vec2}, emb.step, emb.name, emb.sd_checkpoint,
                     emb.sd_checkpoint_name, emb.metadata)
    return both, "diffusers-sdxl-pair", [path, other]


_BUNDLE = re.compile(r"bundle_emb\.(.+?)\.(clip_l|clip_g|string_to_param\..*)$")  # names may hold dots


def _from_bundle(path: str, keys: list[str], get: Callable[[str], Any], name: str | None) -> Embedding:
    found: dict[str, dict[str, str]] = {}
    for m in filter(None, map(_BUNDLE.match, keys)):
        found.setdefault(m[1], {})[m[2].split(".")[0]] = m[0]
    names = ", ".join(sorted(found)) or "none"
    if name is None and len(found) > 1:
        raise FormatError(f"{path} bundles several embeddings ({names}); pick one by name")
    emb_name = name if name is not None else next(iter(found), "")
    parts = found.get(emb_name, {})
    if set(SDXL_SLOTS) <= set(parts):
        vectors = {s: _vec(get(parts[s]), path, parts[s]) for s in SDXL_SLOTS}
    elif "string_to_param" in parts:
        vectors = {SINGLE_SLOT: _vec(get(parts["string_to_param"]), path, parts["string_to_param"])}
    else:
        raise FormatError(f"{path}: no complete bundled embedding {emb_name!r}; bundled: {names}")
    # the header describes the LoRA, not the embedding, so it is not copied
    return _make(vectors, {}, emb_name, [f"read from the LoRA bundle in {os.path.basename(path)}"], path)


def read_embedding(path: str | os.PathLike[str], name: str | None = None) -> Embedding:
    """Read any layout peers write. `name` picks one embedding out of a LoRA bundle."""
    return _read(os.fspath(path), name)[0]


def inspect_embedding(path: str | os.PathLike[str], name: str | None = None) -> dict[str, Any]:
    emb, fmt, files = _read(os.fspath(path), name)
    single = len(emb.vectors) == 1
    norms = emb.norms()
    return {"path": os.path.abspath(path), "files": [os.path.abspath(f) for f in files], "format": fmt,
            "family": emb.family, "num_vectors": emb.num_vectors,
            "width": next(iter(emb.widths.values())) if single else emb.widths,
            "norms": next(iter(norms.values())) if single else norms,
            "step": emb.step, "name": emb.name, "sd_checkpoint": emb.sd_checkpoint,
            "sd_checkpoint_name": emb.sd_checkpoint_name, "metadata": dict(emb.metadata)}


def describe_widths(widths: dict[str, int]) -> str:
    """{"emb": 768} -> "SD1 (768 wide)"; unknown (tiny test) widths are described by numbers."""
    widths, fam = dict(widths), ""
    for f, w in FAMILY_WIDTHS.items():
        if widths == w or (len(w) == 1 and list(widths.values()) == list(w.values())):
            widths, fam = w, f
    text = f"{next(iter(widths.values()))} wide" if len(widths) == 1 else " + ".join(f"{k} {v}" for k, v in widths.items())
    return f"{fam} ({text})" if fam else text


def check_widths(emb: Embedding, expected: dict[str, int]) -> None:
    """Raise unless the embedding's slots and widths fit the model's (the vector count is free)."""
    got = emb.widths
    single = len(got) == 1 and len(expected) == 1
    if (single and list(got.values()) == list(expected.values())) or got == dict(expected):
        return
    raise FormatError(f"embedding is {describe_widths(got)} but the model is {describe_widths(expected)}")


def _clean(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu", torch.float32).contiguous().clone()


def _layout(emb: Embedding) -> str:
    if set(emb.vectors) == set(SDXL_SLOTS):
        if emb.vectors["clip_l"].shape[0] != emb.vectors["clip_g"].shape[0]:
            raise FormatError("clip_l and clip_g must have the same number of vectors")
        return "sdxl"
    if len(emb.vectors) == 1:
        return "single"
    raise FormatError(f"cannot save an embedding with slots {sorted(emb.vectors)}")


def _header(emb: Embedding, **extra: str) -> dict[str, str]:
    meta = {str(k): str(v) for k, v in emb.metadata.items()}
    meta.update({k: str(getattr(emb, k)) for k in FIELDS if getattr(emb, k) is not None})
    meta.update(extra)
    return meta


def _atomic(jobs: list[tuple[str, Callable[[Any], None]]], overwrite: bool) -> list[str]:
    try:
        return files.atomic_write(jobs, overwrite)
    except files.Exists as e:
        raise OverwriteError(str(e)) from None


def _st_writer(tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> Callable[[Any], None]:
    data = safetensors.torch.save({k: _clean(v) for k, v in tensors.items()}, metadata=meta)
    return lambda f: f.write(data)


def write_safetensors(emb: Embedding, path: str | os.PathLike[str], overwrite: bool = False) -> list[str]:
    """SD1/SD2: one key `emb_params`; SDXL: exactly `clip_l` and `clip_g` (A1111 needs every value
    to be a tensor there). Step, name and checkpoint go to the header metadata as strings."""
    if _layout(emb) == "sdxl":
        tensors = {s: emb.vectors[s] for s in SDXL_SLOTS}
    else:
        tensors = {"emb_params": next(iter(emb.vectors.values()))}
    return _atomic([(os.fspath(path), _st_writer(tensors, _header(emb)))], overwrite)


def write_a1111_pt(emb: Embedding, path: str | os.PathLike[str], overwrite: bool = False) -> list[str]:
    """A1111's own .pt layout: readable by every host, even with torch.load(weights_only=True)."""
    if _layout(emb) == "sdxl":
        raise FormatError("an SDXL embedding (clip_l + clip_g) cannot be stored in A1111's .pt layout, "
                          "which holds one tensor; save it as safetensors instead")
    path = os.fspath(path)
    data: dict[str, Any] = {
        "string_to_token": {"*": A1111_TOKEN_ID}, "string_to_param": {"*": _clean(next(iter(emb.vectors.values())))},
        "name": emb.name if emb.name is not None else _stem(path), "step": None if emb.step is None else int(emb.step),
        "sd_checkpoint": emb.sd_checkpoint, "sd_checkpoint_name": emb.sd_checkpoint_name,
    }
    if emb.metadata:  # hosts ignore unknown keys; a plain str dict keeps the file weights_only-safe
        data["metadata"] = {str(k): str(v) for k, v in emb.metadata.items()}
    return _atomic([(path, lambda f: f.write(safe_pickle.dumps(data)))], overwrite)


def write_diffusers(emb: Embedding, path: str | os.PathLike[str], token: str,
                    overwrite: bool = False) -> list[str]:
    """`{token: [n, D]}` as diffusers' load_textual_inversion wants (`.bin`: a torch pickle, one vector 1-D,
    as InvokeAI's learned_embeds.bin); SDXL as diffusers' two files (clip_l in `path`, clip_g in `_2`)."""
    if not token:
        raise FormatError("the diffusers layout needs a token (the placeholder the vectors are stored under)")
    path, meta = os.fspath(path), _header(emb, format="pt")

    def writer(t: torch.Tensor) -> Callable[[Any], None]:
        one = {token: _clean(t[0] if t.shape[0] == 1 else t)}
        return (lambda f: f.write(safe_pickle.dumps(one))) if path.endswith(".bin") else _st_writer({token: t}, meta)
    if _layout(emb) == "single":
        return _atomic([(path, writer(next(iter(emb.vectors.values()))))], overwrite)
    second, is_second = partner_path(path)
    if is_second:
        raise FormatError(f"{path} names the second encoder's file; give the first one (without _2)")
    return _atomic([(path, writer(emb.vectors["clip_l"])), (second, writer(emb.vectors["clip_g"]))], overwrite)


def save_embedding(emb: Embedding, path: str | os.PathLike[str], fmt: str, overwrite: bool = False,
                   token: str | None = None) -> list[str]:
    """Write `emb` as fmt ("safetensors", "a1111-pt" or "diffusers"); returns the files written.
    Vectors with a non-finite (or overflowing) norm are never written: the host would produce NaN."""
    bad = {k: n for k, ns in emb.norms().items() for n in ns if not math.isfinite(n) or n > MAX_NORM}
    if bad:
        raise FormatError(f"refusing to write {os.fspath(path)}: vector norms {bad} are not finite or overflow")
    if fmt == "safetensors":
        return write_safetensors(emb, path, overwrite)
    if fmt == "a1111-pt":
        return write_a1111_pt(emb, path, overwrite)
    if fmt == "diffusers":
        return write_diffusers(emb, path, token or emb.name or "", overwrite)
    raise FormatError(f"unknown format {fmt!r}; choose one of {', '.join(SAVE_FORMATS)}")
