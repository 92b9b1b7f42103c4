"""Learning-rate schedules as pure functions of the step.

Two syntaxes combine: the base rate is a number or A1111's piecewise string
("0.005:100, 1e-3:1000, 1e-5": each rate holds until its step, the last one to the end), and
the scheduler (kohya/diffusers names) scales it, warmup included.
"""

from __future__ import annotations

import math

SCHEDULERS = (
    "constant",
    "constant_with_warmup",
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
)


def parse_piecewise(text: str | float) -> list[tuple[float, int]]:
    """[(rate, until_step)], until_step -1 meaning 'to the end'. Raises ValueError with the bad part."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        return [(float(text), -1)]
    parts = [p.strip() for p in str(text).split(",") if p.strip()]
    if not parts:
        raise ValueError("is empty")
    out: list[tuple[float, int]] = []
    last_until = 0
    for i, part in enumerate(parts):
        rate_s, _, until_s = part.partition(":")
        try:
            rate = float(rate_s)
        except ValueError:
            raise ValueError(f"'{rate_s.strip()}' in '{part}' is not a number") from None
        if not math.isfinite(rate) or rate <= 0:
            raise ValueError(f"rate {rate_s.strip()} must be a positive number")
        if until_s.strip():
            try:
                until = int(until_s)
            except ValueError:
                raise ValueError(f"step '{until_s.strip()}' in '{part}' is not an integer") from None
            if until != -1 and until <= last_until:
                raise ValueError(f"steps must increase: '{part}' ends at or before step {last_until}")
            last_until = until if until != -1 else last_until
        else:
            until = -1
        if until == -1 and i != len(parts) - 1:
            raise ValueError(f"'{part}' runs to the end, so nothing may follow it")
        out.append((rate, until))
    return out


def base_rate(pieces: list[tuple[float, int]], step: int) -> float:
    for rate, until in pieces:
        if until == -1 or step < until:
            return rate
    return pieces[-1][0]  # past the last stated step: keep the last rate, as A1111 does


def scheduler_factor(
    name: str, step: int, total: int, warmup: int = 0, num_cycles: int = 1, power: float = 1.0
) -> float:
    """Multiplier in [0, 1] at optimizer step `step` (0-based) of `total`, diffusers' formulas."""
    if name == "constant":
        return 1.0
    if warmup > 0 and step < warmup:
        return step / warmup
    if name == "constant_with_warmup":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    progress = min(max(progress, 0.0), 1.0)
    if name == "linear":
        return max(0.0, 1.0 - progress)
    if name == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if name == "cosine_with_restarts":
        if progress >= 1.0:
            return 0.0
        return 0.5 * (1.0 + math.cos(math.pi * ((num_cycles * progress) % 1.0)))
    if name == "polynomial":
        end = 1e-7  # diffusers' lr_end, as a fraction of the initial rate
        return (1.0 - end) * (1.0 - progress) ** power + end
    raise ValueError(f"unknown lr_scheduler '{name}' (one of {', '.join(SCHEDULERS)})")


def lr_at(
    pieces: list[tuple[float, int]],
    name: str,
    step: int,
    total: int,
    warmup: int = 0,
    num_cycles: int = 1,
    power: float = 1.0,
    scale: float = 1.0,
) -> float:
    return base_rate(pieces, step) * scale * scheduler_factor(name, step, total, warmup, num_cycles, power)
