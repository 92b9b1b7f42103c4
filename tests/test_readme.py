"""README facts that drift silently when the code changes: the Options tables against TrainConfig,
the CLI lines against the argparse parser, the internal links against the headings."""

import dataclasses
import re
from pathlib import Path

from lib_ti.cli import build_parser
from lib_ti.config import OPTIMIZERS, TrainConfig

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")


def _section(title: str) -> str:
    start = README.index(f"\n## {title}\n")
    end = README.find("\n## ", start + 1)
    return README[start:end if end > 0 else None]


def _allowed(meta: dict) -> str:
    if meta["choices"]:
        return " / ".join(meta["choices"])
    lo, hi = meta["lo"], meta["hi"]
    return "" if lo is None and hi is None else f"{'' if lo is None else lo}..{'' if hi is None else hi}"


def test_options_tables_match_the_config():
    rows = {}
    for line in _section("Options").splitlines():
        m = re.match(r"\| `(\w+)` \| (.*?) \| (.*?) \| .* \|$", line)
        if m:
            assert m.group(1) not in rows, f"{m.group(1)} listed twice"
            rows[m.group(1)] = (m.group(2), m.group(3))
    wrong = {}
    for f in dataclasses.fields(TrainConfig):
        if f.name == "ignored":
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        default_cell, allowed_cell = rows.pop(f.name, (None, None))
        allowed = " / ".join(OPTIMIZERS) if f.name == "optimizer_type" else _allowed(f.metadata)
        # a range the config checks elsewhere (face_crop_aug_range) may be written out in words
        if default_cell != f"`{default!r}`" or (allowed_cell != allowed and (allowed or not allowed_cell)):
            wrong[f.name] = (default_cell, allowed_cell, f"`{default!r}`", allowed)
    assert not wrong, wrong
    assert not rows, f"not options: {sorted(rows)}"


def test_cli_lines_use_existing_flags():
    parser = build_parser()
    subs = next(a for a in parser._actions if a.choices and "train" in a.choices).choices
    lines = [ln for ln in README.splitlines() if re.match(r"\s*python -m lib_ti \w", ln)]
    assert lines
    for line in lines:
        command = line.split("python -m lib_ti ", 1)[1].split()[0]
        known = {o for a in subs[command]._actions for o in a.option_strings}
        used = set(re.findall(r"(--\w[\w-]*)", line.split("#")[0]))
        assert used <= known, (line, used - known)


def _anchor(heading: str) -> str:
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())  # GitHub's slugs: punctuation dropped
    return text.replace(" ", "-")


def test_internal_links_resolve():
    anchors = {_anchor(h) for h in re.findall(r"^#+ (.+)$", README, flags=re.M)}
    missing = [a for a in re.findall(r"\]\(#([^)]+)\)", README) if a not in anchors]
    assert not missing, missing
    files = [p for p in re.findall(r"\]\(([^)#:]+)\)", README)]
    assert files and all((ROOT / p).exists() for p in files), files
