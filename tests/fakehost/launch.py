"""Stand-in for the host's launch.py helpers (modules/launch_utils.py) that install.py uses."""

import importlib.metadata
import importlib.util

pip_calls: list[str] = []


def is_installed(package: str) -> bool:
    # launch_utils.is_installed: distribution metadata, else an importable module of that name
    try:
        importlib.metadata.distribution(package)
        return True
    except importlib.metadata.PackageNotFoundError:
        return importlib.util.find_spec(package) is not None


def run_pip(command: str, desc: str | None = None, live: bool = False) -> str:
    # launch_utils.run_pip runs "<python> -m pip <command>"; the stand-in only records it
    pip_calls.append(command)
    return ""
