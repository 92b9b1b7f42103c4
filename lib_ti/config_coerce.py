"""Turning the values TOML, JSON, gradio and `--set k=v` give into `TrainConfig` field types."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

_INT_LIMIT = 2**63  # beyond int64 every consumer (torch, range checks in messages) misbehaves


def coerce(f: dataclasses.Field, value: Any) -> Any:
    """Accept what TOML, JSON, gradio (floats for ints) and `--set k=v` strings give."""
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= _INT_LIMIT:
        raise ValueError("number is too large")
    if f.name == "learning_rate":
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ValueError(f"expected a number or a piecewise string, got {value!r:.60}")
        return str(value).strip()
    if f.name == "resolution":
        if isinstance(value, (list, tuple)):
            try:
                return ",".join(str(int(v)) for v in value)
            except (TypeError, ValueError, OverflowError):  # [null], [1e999], ["a"]
                raise ValueError(f"expected 'N', 'W,H' or [W, H] of whole numbers, got {value!r:.60}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ValueError(f"expected 'N', 'W,H' or [W, H] of whole numbers, got {value!r:.60}")
        return str(value)
    if f.name == "face_crop_aug_range" and isinstance(value, (list, tuple)):  # TOML/JSON [low, high]
        try:
            if len(value) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
                raise ValueError
            return f"{float(value[0])},{float(value[1])}"
        except (ValueError, OverflowError):  # also [10**400, 1]
            raise ValueError(f"expected [low, high] or 'low,high', got {value!r:.60}") from None
    if f.name == "seed" and value is None:
        return -1
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        if isinstance(value, (int, float)) and value in (0, 1):
            return bool(value)
        raise ValueError(f"expected true or false, got {value!r}")
    if isinstance(default, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        try:
            num = float(value) if not isinstance(value, bool) else math.nan
        except (TypeError, ValueError, OverflowError):
            num = math.nan
        if not math.isfinite(num) or num != int(num):
            raise ValueError(f"expected a whole number, got {value!r:.60}")
        if abs(num) >= _INT_LIMIT:
            raise ValueError("number is too large")
        return int(num)
    if isinstance(default, float):
        try:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        except (TypeError, ValueError, OverflowError):
            raise ValueError(f"expected a number, got {value!r:.60}") from None
    if isinstance(default, list):
        if isinstance(value, str):
            return [p for p in value.split() if p]
        if isinstance(value, (list, tuple)):
            return [str(v) for v in value]
        raise ValueError(f"expected a list, got {value!r:.60}")
    if isinstance(default, str):
        if value is None:
            return ""
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ValueError(f"expected text, got {value!r:.60}")
        return str(value)
    return value
