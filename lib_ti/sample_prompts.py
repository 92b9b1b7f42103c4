"""`sample_prompts`, parsed once for every front end: a file (one prompt a line, `#` comments) or
the prompts themselves, each line with kohya's options `--n negative --w 512 --h 512 --d seed
--l cfg --s steps`. The CLI renders them with diffusers, the WebUI with the host's txt2img."""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

OPTIONS = {"n": ("negative_prompt", str), "w": ("width", int), "h": ("height", int), "d": ("seed", int),
           "l": ("cfg_scale", float), "s": ("steps", int)}


def parse_line(line: str) -> dict[str, Any]:
    """'a photo of tok --w 768 --s 30' -> {'prompt': 'a photo of tok', 'width': 768, 'steps': 30}."""
    head, *rest = re.split(r"\s--(?=[nwhdls]\s)", " " + line.strip())
    out: dict[str, Any] = {"prompt": head.strip()}
    for part in rest:
        key, _, value = part.partition(" ")
        name, conv = OPTIONS[key]
        try:
            out[name] = conv(" ".join(shlex.split(value)) if conv is str else value.strip())
        except ValueError:
            continue  # a malformed option is left out, as kohya does
    return out


def lines(text: str) -> list[str]:
    text = (text or "").strip()
    if text and "\n" not in text and Path(text).is_file():
        text = Path(text).read_text(encoding="utf-8")
    return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]


def parse(cfg: Any) -> list[dict[str, Any]]:
    """Structured prompts for previews; without any, one plain prompt naming the token."""
    return [parse_line(ln) for ln in lines(cfg.sample_prompts)] or [{"prompt": f"a photo of {cfg.token_string}"}]
