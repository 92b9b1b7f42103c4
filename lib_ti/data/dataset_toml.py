"""kohya sd-scripts dataset TOML (`--dataset_config`): [general], [[datasets]], [[datasets.subsets]].

Precedence: subset > dataset > general > the caller's defaults. kohya writes `resolution` as
`512` or `[width, height]`; DatasetSpec keeps (height, width), and so do `defaults`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lib_ti.config_compat import REFUSED_WHEN_ON, check_caption_extension, face_crop_problem
from lib_ti.data.spec import MAX_REPEATS, SUBSET_OPTIONS, DataError, DatasetSpec, SubsetSpec
from lib_ti.toml_compat import MISSING, toml_module

DATASET_KEYS = ("resolution", "batch_size", "enable_bucket", "min_bucket_reso", "max_bucket_reso",
                "bucket_reso_steps", "bucket_no_upscale", "center_crop")
# kohya keys this trainer does not use: accepted (as a copied kohya TOML has them) with the reason
# in config_compat; those whose effect is missing are refused there when switched on.
EXPLAINED = ("cache_info", "network_multiplier")
DEFAULTABLE = tuple(k for k in SUBSET_OPTIONS)  # any subset option may be set higher up
ALLOWED = {
    "top level": ("general", "datasets"),
    "[general]": DATASET_KEYS + DEFAULTABLE + EXPLAINED,
    "[[datasets]]": DATASET_KEYS + DEFAULTABLE + EXPLAINED + ("subsets",),
    "[[datasets.subsets]]": ("image_dir",) + SUBSET_OPTIONS + EXPLAINED,
}
_BOOL = {"enable_bucket", "bucket_no_upscale", "shuffle_caption", "flip_aug", "random_crop", "is_reg", "center_crop",
         "enable_wildcard", "cache_info", "color_aug"}
_STR = {"caption_extension", "caption_separator", "class_tokens", "image_dir", "keep_tokens_separator",
        "secondary_separator", "caption_prefix", "caption_suffix"}
_FLOAT = {"caption_dropout_rate": (0.0, 1.0), "caption_tag_dropout_rate": (0.0, 1.0),
          "token_warmup_step": (0.0, None), "network_multiplier": (None, None)}
_MIN = {"batch_size": 1, "min_bucket_reso": 1, "max_bucket_reso": 1, "bucket_reso_steps": 1,
        "num_repeats": 1, "keep_tokens": 0}


def _where(table: str, n: int | None, path: str) -> str:
    return f"{table}" + (f" #{n}" if n is not None else "") + f" of {path}"


def _check_table(table: Any, name: str, n: int | None, path: str) -> dict[str, Any]:
    if not isinstance(table, dict):
        raise DataError(f"{_where(name, n, path)} must be a table, got {type(table).__name__}")
    for key in table:
        if key not in ALLOWED[name]:
            raise DataError(f"unknown key '{key}' in {_where(name, n, path)}; allowed keys: "
                            + ", ".join(ALLOWED[name]))
    out = {}
    for key, v in table.items():
        if key in ("general", "datasets", "subsets"):
            out[key] = v
            continue
        v = _check_value(key, v, _where(name, n, path))
        if key in EXPLAINED:
            if key in REFUSED_WHEN_ON and v:
                raise DataError(f"'{key}' in {_where(name, n, path)}: {REFUSED_WHEN_ON[key]}")
            continue  # explained in the README; nothing to pass on
        out[key] = v
    return out


def _check_value(key: str, v: Any, where: str) -> Any:
    def bad(expected: str) -> DataError:
        # the type only, never the value: the file may hold secrets (the HTTP API reports this)
        return DataError(f"'{key}' in {where} must be {expected}, got a {type(v).__name__}")

    if key == "resolution":
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return (v, v)
        if (isinstance(v, list) and len(v) == 2
                and all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in v)):
            return (v[1], v[0])  # kohya [width, height] -> (h, w)
        raise bad("a positive integer or [width, height]")
    if key in _BOOL:
        if not isinstance(v, bool):
            raise bad("true or false")
        return v
    if key in _STR:
        if not isinstance(v, str):
            raise bad("a string")
        if key == "caption_extension" and check_caption_extension(v):
            raise bad("a file extension such as .txt (letters, digits, '_', '-', '.')")
        return v
    if key in _FLOAT:
        lo, hi = _FLOAT[key]
        if not isinstance(v, (int, float)) or isinstance(v, bool) or (lo is not None and v < lo) or (
                hi is not None and v > hi):
            raise bad("a number" + (f" in {lo}..{hi}" if hi is not None else f" >= {lo}" if lo is not None else ""))
        return float(v)
    if key == "face_crop_aug_range":
        if not (isinstance(v, list) and len(v) == 2 and all(
                isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)):
            raise bad("[low, high], e.g. [2.0, 4.0]")
        if why := face_crop_problem(v):
            raise DataError(f"'{key}' in {where} {why}")
        return (float(v[0]), float(v[1]))
    if not isinstance(v, int) or isinstance(v, bool):
        raise bad("an integer")
    if v < _MIN.get(key, 0):
        raise bad(f"an integer >= {_MIN.get(key, 0)}")
    if key == "num_repeats" and v > MAX_REPEATS:
        raise bad(f"an integer up to {MAX_REPEATS}")
    return v


def _image_dir(raw: str, base: Path) -> str:
    """Relative image_dir: beside the TOML when it exists there, else as given (kohya: the cwd)."""
    p = Path(raw).expanduser()
    if not p.is_absolute() and (base / p).is_dir():
        return str(base / p)
    return str(p)


def load_dataset_toml(path: str | Path, defaults: dict[str, Any] | None = None) -> DatasetSpec:
    path_s = str(path)
    defaults = dict(defaults or {})
    known = set(DATASET_KEYS) | set(SUBSET_OPTIONS)
    unknown = set(defaults) - known
    if unknown:
        raise DataError(f"unknown default(s) {sorted(unknown)}; allowed: {sorted(known)}")
    if "resolution" in defaults:
        defaults["resolution"] = tuple(defaults["resolution"])
    tomllib = toml_module()
    if tomllib is None:
        raise DataError(MISSING)
    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except OSError as e:
        raise DataError(f"cannot read dataset config '{path_s}': {e}") from None
    except tomllib.TOMLDecodeError as e:
        raise DataError(f"dataset config '{path_s}' is not valid TOML: {e}") from None
    doc = _check_table(doc, "top level", None, path_s)
    general = _check_table(doc.get("general", {}), "[general]", None, path_s)
    datasets = doc.get("datasets")
    if not isinstance(datasets, list) or not datasets:
        raise DataError(f"{path_s} has no [[datasets]] table (each with [[datasets.subsets]])")
    base = Path(path).resolve().parent

    specs: list[DatasetSpec] = []
    for n, raw_ds in enumerate(datasets, 1):
        ds = _check_table(raw_ds, "[[datasets]]", n, path_s)
        level = {**defaults, **general, **ds}
        subsets_raw = ds.get("subsets")
        if not isinstance(subsets_raw, list) or not subsets_raw:
            raise DataError(f"{_where('[[datasets]]', n, path_s)} has no [[datasets.subsets]]")
        subsets = []
        for m, raw_sub in enumerate(subsets_raw, 1):
            sub = _check_table(raw_sub, "[[datasets.subsets]]", m, f"dataset #{n} of {path_s}")
            if "image_dir" not in sub:
                raise DataError(f"{_where('[[datasets.subsets]]', m, f'dataset #{n} of {path_s}')} "
                                "needs image_dir")
            opts = {k: v for k, v in {**level, **sub}.items() if k in SUBSET_OPTIONS}
            subsets.append(SubsetSpec(image_dir=_image_dir(sub["image_dir"], base), **opts))
        specs.append(DatasetSpec(subsets=subsets, **{k: v for k, v in level.items() if k in DATASET_KEYS}))
    return _merge(specs, path_s)


def _merge(specs: list[DatasetSpec], path: str) -> DatasetSpec:
    """One bucket set per run: several [[datasets]] merge only if their dataset options agree."""
    first = specs[0]
    for n, s in enumerate(specs[1:], 2):
        diff = [k for k in DATASET_KEYS if getattr(s, k) != getattr(first, k)]
        if diff:
            detail = "; ".join(f"{k}: dataset #1 has {getattr(first, k)!r}, dataset #{n} has {getattr(s, k)!r}"
                               for k in diff)
            raise DataError(f"{path}: the [[datasets]] differ in {', '.join(diff)} ({detail}). kohya can train "
                            "datasets with different resolutions or buckets side by side; this trainer uses one "
                            "bucket set, so put all subsets in one [[datasets]] or make these options equal")
    merged = DatasetSpec(subsets=[sub for s in specs for sub in s.subsets],
                         **{k: getattr(first, k) for k in DATASET_KEYS})
    return merged
