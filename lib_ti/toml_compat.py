"""tomllib on Python 3.11+, tomli on 3.10 (which A1111 recommends; install.py adds it there),
imported on use so that a host without either can still train from folders and the tab."""

from __future__ import annotations

from types import ModuleType


def toml_module() -> ModuleType | None:
    try:
        import tomllib  # novermin: 3.10 takes the tomli fallback below
    except ModuleNotFoundError:
        try:
            import tomli as tomllib
        except ModuleNotFoundError:
            return None
    return tomllib


MISSING = "reading TOML on Python 3.10 needs the 'tomli' package"
