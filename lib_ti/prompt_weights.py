"""A1111's prompt emphasis syntax, for kohya's `weighted_captions` in the CLI.

`(text)` weighs 1.1, `[text]` 1/1.1, `(text:1.3)` 1.3, nested groups multiply; `\\(`, `\\)`, `\\[`,
`\\]` and `\\\\` are the literal characters (a backslash before anything else is dropped); a bracket
that never opens is plain text, one never closed weighs everything after it; `BREAK` (upper case,
a whole word) ends the current 75-token chunk. These are the rules of the WebUI's prompt parser,
so a caption trains with the weights the WebUI gives the same text at generation time. The
WebUI front ends never use this module: the host's own parser reads their captions.
"""

from __future__ import annotations

import re

ROUND, SQUARE = 1.1, 1 / 1.1
_BREAK = re.compile(r"\s*\bBREAK\b\s*")
_WEIGHT = re.compile(r":\s*([+-]?[.\d]+)\s*\)")  # ':1.3)' closes the innermost '(' with that weight
_SPECIAL = "\\()[]:"
_ESCAPABLE = "()[]\\"

def parse(text: str) -> list[tuple[str, float] | None]:
    """`text` as pieces of equal weight, in order, with None where a BREAK is. Adjacent pieces of
    the same weight are merged (each piece is tokenized on its own, as in the WebUI)."""
    res: list[list | None] = []  # [text, weight] entries; weights are multiplied as groups close
    round_open: list[int] = []
    square_open: list[int] = []

    def weigh(start: int, factor: float) -> None:
        for entry in res[start:]:
            if entry is not None:
                entry[1] *= factor

    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c == "\\":
            nxt = text[i + 1 : i + 2]
            if nxt and nxt in _ESCAPABLE:
                res.append([nxt, 1.0])
                i += 2
            else:
                i += 1  # the WebUI drops a backslash that escapes nothing
            continue
        if c == "(":
            round_open.append(len(res))
        elif c == "[":
            square_open.append(len(res))
        elif c == ":" and round_open and (w := _weight_at(text, i)):
            weigh(round_open.pop(), w[0])
            i = w[1]
            continue
        elif c == ")" and round_open:
            weigh(round_open.pop(), ROUND)
        elif c == "]" and square_open:
            weigh(square_open.pop(), SQUARE)
        else:
            end = i + 1 if c in _SPECIAL else _run_end(text, i)
            for k, part in enumerate(_BREAK.split(text[i:end])):
                if k:
                    res.append(None)
                res.append([part, 1.0])
            i = end
            continue
        i += 1
    for start in round_open:
        weigh(start, ROUND)
    for start in square_open:
        weigh(start, SQUARE)
    return _merge(res)


def is_plain(pieces: list[tuple[str, float] | None]) -> bool:
    return all(p is not None and p[1] == 1.0 for p in pieces)


def _run_end(text: str, i: int) -> int:
    while i < len(text) and text[i] not in _SPECIAL:
        i += 1
    return i


def _weight_at(text: str, i: int) -> tuple[float, int] | None:
    """(weight, end) of ':1.3)' at i, or None."""
    m = _WEIGHT.match(text, i)
    if not m:
        return None
    try:
        return float(m.group(1)), m.end()
    except ValueError:  # '1.2.3' or '.': the WebUI stops with an error; here the text stays as written
        return None


def _merge(res: list) -> list[tuple[str, float] | None]:
    out: list[tuple[str, float] | None] = []
    for entry in res:
        if entry is None:
            out.append(None)
        elif out and out[-1] is not None and out[-1][1] == entry[1]:
            out[-1] = (out[-1][0] + entry[0], entry[1])
        else:
            out.append((entry[0], entry[1]))
    return [p for p in out if p is None or p[0]] or [("", 1.0)]
