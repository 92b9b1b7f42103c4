"""Which files an API request may make the server read, decided by the server, not the request.

Readable: the host's textual inversion templates folder plus the folders listed in Settings ->
TI Trainer -> "Folders the API may read" (empty: the WebUI data folder and the host's training
folder). A path outside them is refused with one message that names that setting, whether or not
the path exists, so the API is no oracle for the server's files. Resume weights come only from the
embeddings folder or the trainer's log folder; nothing the API writes is placed by the request.
The tab is not subject to this: its user is at the server.
"""

from __future__ import annotations

import os
from typing import Any

from lib_ti import data
from lib_ti.config import TrainConfig
from lib_ti.webui import host, host_model, settings

# The host decides where the model comes from and where files go; a request must not. (v2, a kohya
# flag the model makes moot, is only type-checked.)
HOST_DECIDES = tuple(f for f in TrainConfig.host_decided() if f != "v2")
NAME_FIELDS = ("token_string", "output_name", "caption_extension")
READ_FIELDS = ("train_data_dir", "reg_data_dir", "dataset_config", "template_file", "sample_prompts")
PATH_FIELDS = (*NAME_FIELDS, "weights", *READ_FIELDS)
OUTSIDE = (f"is outside the folders the API may read; add its folder to Settings -> TI Trainer -> "
           f"'{settings.API_READ_LABEL}'")
EMBEDDING_EXTS = (".safetensors", ".pt", ".bin")

Loc = tuple  # ('field',) or ('preview', 'key')


def inside(path: str, root: str) -> bool:
    """True when `path`, with every symlink resolved, lies within `root` (also resolved)."""
    try:
        real, base = os.path.realpath(path), os.path.realpath(root)
        return os.path.commonpath([real, base]) == base
    except ValueError:  # a NUL byte, or different drives on Windows
        return False


def templates_dir() -> str | None:
    from modules import shared

    return getattr(shared.cmd_opts, "textual_inversion_templates_dir", None) or None


def training_dir() -> str:
    """Where the host's own trainer writes (<data>/textual_inversion); our log folders are in it."""
    return os.path.join(host.data_dir(), "textual_inversion")


def read_roots() -> list[str]:
    listed = [ln.strip() for ln in settings.api_read_folders().splitlines() if ln.strip()]
    roots = listed or [host.data_dir(), training_dir()]
    if templates_dir():
        roots.append(templates_dir())
    return [os.path.realpath(os.path.expanduser(r)) for r in roots]


def readable(path: str) -> bool:
    return any(inside(os.path.expanduser(path), root) for root in read_roots())


def bad_name(name: str) -> str | None:
    """Why `name` cannot be a bare file name or extension, or None."""
    if any(c in name for c in ("/", "\\", "\0", ":")):
        return "must be a plain name without path separators or ':'"
    if ".." in name:
        return "must not contain '..'"
    return None


def looks_like_path(text: str) -> bool:
    return os.path.isabs(text) or "/" in text or "\\" in text or text.startswith("~") or \
        text.lower().endswith((".txt", ".toml", ".csv"))


def check_paths(values: dict[str, Any]) -> tuple[dict[str, Any], dict[Loc, str]]:
    """The path policy for a train request: (values to use, errors by field)."""
    values, errors = dict(values), {}
    for key in PATH_FIELDS:
        v = values.get(key)
        # numbers would become text in TrainConfig and slip past the rules below
        if v is not None and not isinstance(v, str):
            errors[(key,)] = "expected text"
            del values[key]
        elif v and "\0" in v:
            errors[(key,)] = "must not contain a NUL character"
            del values[key]
    for key in HOST_DECIDES:
        if key in values:
            errors[(key,)] = "is decided by the host; not accepted from the API"
            del values[key]
    if "v2" in values and not isinstance(values["v2"], bool):  # job.py drops it: the model tells the family
        errors[("v2",)] = "expected true or false"
    for key in NAME_FIELDS:
        v = values.get(key)
        if isinstance(v, str) and bad_name(v):
            errors[(key,)] = bad_name(v)

    for key in ("train_data_dir", "reg_data_dir"):
        v = values.get(key)
        if isinstance(v, str) and v:
            if not readable(v):
                errors[(key,)] = OUTSIDE
            elif not os.path.isdir(v):
                errors[(key,)] = f"folder '{v}' does not exist"
    _check_dataset_config(values, errors)
    _check_weights(values, errors)
    _check_template(values, errors)
    lines = _lines(values.get("sample_prompts"))
    # job.py reads a one-line value that names an existing file as a prompts file (a plain prompt
    # was moved out by inline_prompt; one with kohya options is no plausible file name)
    if len(lines) == 1 and looks_like_path(lines[0]) and not readable(lines[0]):
        errors[("sample_prompts",)] = OUTSIDE
    return values, errors


def _lines(v: Any) -> list[str]:
    return [ln.strip() for ln in v.splitlines() if ln.strip()] if isinstance(v, str) else []


def inline_prompt(values: dict[str, Any]) -> str | None:
    """A one-line sample_prompts that is plainly a prompt, not a path: taken out of `values` (so the
    run never looks for a file of that name) and returned, to be used as the preview prompt."""
    lines = _lines(values.get("sample_prompts"))
    # a line with kohya options ('... --w 512') stays: those are parsed from sample_prompts only
    if len(lines) == 1 and not looks_like_path(lines[0]) and "\0" not in lines[0] and " --" not in lines[0]:
        del values["sample_prompts"]
        return lines[0]
    return None


def _check_dataset_config(values: dict[str, Any], errors: dict[Loc, str]) -> None:
    v = values.get("dataset_config")
    if not isinstance(v, str) or not v:
        return
    if not readable(v):
        errors[("dataset_config",)] = OUTSIDE
        return
    if not os.path.isfile(v):
        errors[("dataset_config",)] = f"file '{v}' does not exist"
        return
    try:
        spec = data.load_dataset_toml(v)
    except (data.DataError, OSError, ValueError) as e:  # messages name keys and types, never values
        errors[("dataset_config",)] = str(e)
        return
    for n, subset in enumerate(spec.subsets, 1):
        if not readable(subset.image_dir):
            errors[("dataset_config",)] = f"image_dir of subset #{n} {OUTSIDE}"
            return


def _check_weights(values: dict[str, Any], errors: dict[Loc, str]) -> None:
    v = values.get("weights")
    if not isinstance(v, str) or not v:
        return
    emb_dir = host_model.embeddings_dir()
    path = os.path.abspath(os.path.join(emb_dir, os.path.expanduser(v)))  # relative: in the embeddings folder
    if not (inside(path, emb_dir) or inside(path, training_dir())):
        errors[("weights",)] = "must be a file in the embeddings folder or the trainer's log folder"
    elif not os.path.isfile(path):
        errors[("weights",)] = f"file '{v}' does not exist"
    else:
        values["weights"] = path


def _check_template(values: dict[str, Any], errors: dict[Loc, str]) -> None:
    v = values.get("template_file")
    if not isinstance(v, str) or not v:
        return
    tdir = templates_dir()
    if not bad_name(v) and tdir and os.path.isfile(os.path.join(tdir, v)):
        values["template_file"] = os.path.join(tdir, v)  # a name from the host's templates, as its own API takes
        return
    if not bad_name(v) and v.removesuffix(".txt") in data.A1111_TEMPLATES:
        return  # built in
    if not looks_like_path(v):
        errors[("template_file",)] = (f"no template '{v}' in the host's templates folder; built in: "
                                      + ", ".join(data.A1111_TEMPLATES))
        return
    if not readable(v):
        errors[("template_file",)] = OUTSIDE
    elif not os.path.isfile(v):
        errors[("template_file",)] = f"file '{v}' does not exist"


def find_embedding(name: str) -> str | None:
    """The file `name` (with or without extension) at any depth of the embeddings folder.
    Exact names beat case-insensitive ones, then shallower files, then .safetensors over .pt/.bin.
    Symlinks that lead out of the folder are ignored."""
    root = host_model.embeddings_dir()
    if not os.path.isdir(root):
        return None
    found = []
    for dirpath, _dirs, files in os.walk(root):  # followlinks=False: no walking out through a linked dir
        depth = os.path.relpath(dirpath, root).count(os.sep)
        for fn in files:
            stem, ext = os.path.splitext(fn)
            if ext.lower() not in EMBEDDING_EXTS:
                continue
            exact = name in (fn, stem)
            if exact or name.lower() in (fn.lower(), stem.lower()):
                found.append((not exact, depth, EMBEDDING_EXTS.index(ext.lower()), os.path.join(dirpath, fn)))
    for *_rank, path in sorted(found):
        if inside(path, root) and os.path.isfile(path):
            return path
    return None


# ---------------------------------------------------------------- what responses show


def _known_folders() -> list[tuple[str, str]]:
    """(absolute folder, how the user knows it), the most specific first."""
    folders = [(host_model.embeddings_dir(), ""), (training_dir(), "textual_inversion/"),
               (host.data_dir(), "")]
    return [(os.path.abspath(p), label) for p, label in folders]


def shown(path: str | None) -> str | None:
    """A server path as the user knows it: relative to the embeddings folder (a bare file name) or
    to the WebUI data folder (textual_inversion/<date>/<name>/...); never an absolute path."""
    if not path:
        return path
    full = os.path.abspath(path)
    for folder, label in _known_folders():
        if inside(full, folder) and full != folder:
            rel = os.path.relpath(full, folder).replace(os.sep, "/")
            return rel if not label or rel.startswith(label) else label + rel
    return os.path.basename(full)


def redact(text: str) -> str:
    """Free text (error messages, notes) with the server's own folders replaced by their names."""
    for folder, name in ((host_model.embeddings_dir(), "<embeddings folder>"),
                         (training_dir(), "<log folder>"), (host.data_dir(), "<webui data folder>")):
        for form in {os.path.abspath(folder), os.path.realpath(folder)}:
            text = text.replace(form + os.sep, name + "/").replace(form, name)
    return text
