"""modules/paths_internal.py: data_path is --data-dir or the webui root (set by fakehost.install)."""

import os

data_path = os.getcwd()
models_path = os.path.join(data_path, "models")
