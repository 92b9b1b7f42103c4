"""Torch pickles (.pt/.bin embeddings): loading them without ever running code, and writing the
zip layout that A1111's own safe unpickler (modules/safe.py) accepts whatever torch writes it."""

from __future__ import annotations

import io
import pickle
import re
import types
import zipfile
from typing import Any

import torch


class UnsafeFileError(ValueError):
    """The pickle asks for something an embedding never needs, or is not a torch file at all."""


# Everything an A1111/paper-code .pt needs, and nothing that can call out: no getattr, no eval,
# no arbitrary classes. Storage types never reach here (torch's wrapper resolves them first).
_SAFE_GLOBALS = {
    "collections": {"OrderedDict"},
    "builtins": {"set", "frozenset", "dict", "list", "tuple", "int", "float", "str", "bool", "bytes"},
    "torch._utils": {"_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_tensor_v3",
                     "_rebuild_parameter", "_rebuild_parameter_with_state"},
    "torch._tensor": {"_rebuild_from_type_v2"},
    "torch": {"Tensor", "Size"},
    "torch.nn.parameter": {"Parameter"},
    "torch.nn.modules.container": {"ParameterDict"},
}
_OLD_MODULES = {"__builtin__": "builtins", "copy_reg": "copyreg"}  # protocol-2 pickles from Python 2 era


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        module = _OLD_MODULES.get(module, module)
        is_dtype = module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        if name in _SAFE_GLOBALS.get(module, ()) or is_dtype:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refused to load {module}.{name}: an embedding never needs it")


# torch.load accepts a pickle module; giving it ours keeps torch's storage handling (zip and legacy
# formats) while every global still passes our allow-list.
_safe_pickle = types.ModuleType("lib_ti_safe_pickle")
_safe_pickle.Unpickler = _RestrictedUnpickler  # type: ignore[attr-defined]
_safe_pickle.load = lambda f, **kw: _RestrictedUnpickler(f, **kw).load()  # type: ignore[attr-defined]


def load(path: str) -> Any:
    # weights_only first; an unknown global (an old ParameterDict) retries with our allow-list
    for kw in ({"weights_only": True}, {"weights_only": False, "pickle_module": _safe_pickle}):
        try:  # a file object: torch >= 2.10 would treat a *.safetensors path as safetensors
            with open(path, "rb") as f:
                return torch.load(f, map_location="cpu", **kw)
        except pickle.UnpicklingError as e:
            if not kw["weights_only"]:
                raise UnsafeFileError(f"{path}: {_first_line(e)}; the file was not loaded") from None
        except Exception as e:
            raise UnsafeFileError(f"{path}: not a readable torch file ({type(e).__name__}: {_first_line(e)})") from None
    return None  # unreachable: the second attempt returns or raises


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [""])[0][:300]


# Entries A1111 1.10.1's check_zip_filenames allows. Newer torch adds `.format_version` and
# `.storage_alignment`, which it refuses as "bad file inside"; torch.load needs neither.
_A1111_ENTRY = re.compile(r"^[^/]+/(data/\d+|version|byteorder|\.data/serialization_id|data\.pkl)$")


def dumps(obj: Any) -> bytes:
    """torch.save's zip, rewritten with only the entries every host's loader accepts. Entries stay
    uncompressed (torch reads them in place)."""
    raw = io.BytesIO()
    torch.save(obj, raw)
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(raw.getvalue())) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            if _A1111_ENTRY.match(info.filename):
                dst.writestr(zipfile.ZipInfo(info.filename, date_time=(1980, 1, 1, 0, 0, 0)), src.read(info))
    return out.getvalue()
