"""modules/safe.py (A1111 v1.10.1): the restricted check that runs before every torch.load of a
.pt/.bin (the host replaces torch.load with `load`). Written anew from the host's logic: a zip may
hold only `<dir>/data.pkl`, `<dir>/data/<n>`, `<dir>/version`, `<dir>/byteorder` and
`<dir>/.data/serialization_id` (so newer torch's `.format_version` / `.storage_alignment` are "bad
files"); the pickle may name only a short list of globals. On any refusal the host reports the file
and `load` returns None."""

import collections
import pickle
import re
import zipfile

import torch
from modules import shared

_ALLOWED = re.compile(r"^([^/]+)/((data/\d+)|version|byteorder|.data/serialization_id|(data\.pkl))$")
_DATA_PKL = re.compile(r"^([^/]+)/data\.pkl$")
_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("__builtin__", "set"): set,
}
_TORCH_UTILS = ("_rebuild_tensor_v2", "_rebuild_parameter", "_rebuild_device_tensor_from_numpy")
_TORCH = ("FloatStorage", "HalfStorage", "IntStorage", "LongStorage", "DoubleStorage", "ByteStorage",
          "float32", "BFloat16Storage")


class RestrictedUnpickler(pickle.Unpickler):
    def persistent_load(self, saved_id):
        assert saved_id[0] == "storage"
        return torch.storage.TypedStorage(_internal=True)

    def find_class(self, module, name):
        if (module, name) in _GLOBALS:
            return _GLOBALS[(module, name)]
        if module == "torch._utils" and name in _TORCH_UTILS:
            return getattr(torch._utils, name)
        if module == "torch" and name in _TORCH:
            return getattr(torch, name)
        if module == "torch.nn.modules.container" and name == "ParameterDict":
            return torch.nn.modules.container.ParameterDict
        raise Exception(f"global '{module}/{name}' is forbidden")


def check_pt(filename):
    try:
        with zipfile.ZipFile(filename) as z:
            for n in z.namelist():
                if not _ALLOWED.match(n):
                    raise Exception(f"bad file inside {filename}: {n}")
            pkls = [n for n in z.namelist() if _DATA_PKL.match(n)]
            if len(pkls) != 1:
                raise Exception(f"expected one data.pkl in {filename}, found {len(pkls)}")
            with z.open(pkls[0]) as f:
                RestrictedUnpickler(f).load()
    except zipfile.BadZipfile:  # the legacy format: five pickles in a row
        with open(filename, "rb") as f:
            unpickler = RestrictedUnpickler(f)
            for _ in range(5):
                unpickler.load()


def load(filename, *args, **kwargs):
    try:
        if not shared.cmd_opts.disable_safe_unpickle:
            check_pt(filename)
    except Exception as e:
        print(f"Error verifying pickled file from {filename}: {e}")
        return None
    kwargs.setdefault("weights_only", False)
    return torch.load(filename, *args, **kwargs)
