"""The host's own "Install from URL" (Extensions tab), run with the host's python:

    <host python> tests/host/install_from_url.py --host-dir HOST --data-dir DIR --url URL

Boots the host's modules the way webui.py does (no model, no server) with DIR as --data-dir and
calls modules/ui_extensions.py `install_extension_from_url`: it clones URL into
DIR/extensions/<name> and runs the extension's install.py, as the button does. Prints
`INSTALLED <dir>` on success.
"""

from __future__ import annotations

import argparse
import os
import sys


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--host-dir", required=True)
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--url", required=True)
    a = ap.parse_args()
    host = os.path.abspath(a.host_dir)
    os.chdir(host)
    sys.path.insert(0, host)
    sys.argv = ["webui.py", "--data-dir", os.path.abspath(a.data_dir), "--skip-prepare-environment",
                "--skip-torch-cuda-test", "--use-cpu", "all", "--no-half", "--no-download-sd-model"]
    from modules import initialize

    initialize.imports()
    from modules import extensions, ui_extensions

    extensions.list_extensions()
    _table, message = ui_extensions.install_extension_from_url(None, a.url)
    print(message, flush=True)
    target = os.path.join(extensions.extensions_dir, "sd-webui-ti-trainer")
    if not os.path.isfile(os.path.join(target, "install.py")):
        sys.exit(f"nothing installed at {target}")
    print(f"INSTALLED {target}", flush=True)


if __name__ == "__main__":
    main()
