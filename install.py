"""Run by the WebUI launcher on every start and after "Install from URL".

The extension needs nothing beyond what A1111 v1.10.1, reForge and Forge already ship (torch,
safetensors, numpy, PIL, gradio). The only optional extra is tomli on Python 3.10 for dataset TOML
files (3.11+ has tomllib). Nothing here may move one of the host's pins, so nothing is upgraded.
"""

import sys


def main() -> None:
    try:
        import launch
    except ImportError:  # run by hand outside the host
        return
    if sys.version_info < (3, 11) and not launch.is_installed("tomli"):
        try:
            launch.run_pip("install tomli", "tomli for TI Trainer dataset TOML files")
        except Exception as e:  # a failed optional install must not break the host's start
            print(f"TI Trainer: could not install tomli ({e}); dataset TOML files need Python 3.11+ then")


main()
