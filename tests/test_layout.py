"""The layout rules the host imposes, checked so they stay true."""

import ast
from pathlib import Path

from lib_ti.config import NOTED_KEYS, TrainConfig

ROOT = Path(__file__).resolve().parent.parent
BANNED = {"modules", "launch", "gradio"}


def imported(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names |= {f"{node.module}.{a.name}" for a in node.names}
    return names


def test_lib_ti_is_host_free_outside_webui():
    offenders = {}
    for path in (ROOT / "lib_ti").rglob("*.py"):
        rel = path.relative_to(ROOT)
        if rel.parts[1] == "webui":
            continue
        names = imported(path)
        bad = {n for n in names if n.split(".")[0] in BANNED or n.startswith("lib_ti.webui")}
        if bad:
            offenders[str(rel)] = sorted(bad)
    assert not offenders, offenders


def test_scripts_holds_one_short_entry():
    files = sorted((ROOT / "scripts").glob("*.py"))
    assert [f.name for f in files] == ["ti_trainer.py"]
    assert len(files[0].read_text().splitlines()) <= 60


def test_modules_stay_small():
    big = {str(p.relative_to(ROOT)): n for p in (ROOT / "lib_ti").rglob("*.py")
           if (n := len(p.read_text(encoding="utf-8").splitlines())) > 400}
    assert not big, big


def test_readme_explains_every_option_and_the_test_command():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    missing = [f for f in [*TrainConfig.field_names(), *NOTED_KEYS] if f"`{f}`" not in readme]
    assert not missing, missing
    assert "bash tests/run.sh" in readme
    assert "bash tests/run.sh" in (ROOT / ".ci" / "run").read_text()


def test_the_loop_the_run_layer_and_the_webui_never_import_diffusers_or_transformers():
    """Only the diffusers backend (lib_ti/family) may: the WebUI trains the host's own model objects."""
    core = ["train.py", "prepare.py", "run.py", "resume.py", "files.py", "sample_prompts.py"]
    paths = [ROOT / "lib_ti" / f for f in core] + sorted((ROOT / "lib_ti" / "webui").glob("*.py"))
    offenders = {str(p.relative_to(ROOT)): sorted(n for n in imported(p) if n.split(".")[0] in {"diffusers",
                                                                                              "transformers"})
                 for p in paths}
    assert not {k: v for k, v in offenders.items() if v}
    # nor through what they import (run in a fresh interpreter: this one may have loaded them already)
    import subprocess
    import sys

    mods = "lib_ti.run, lib_ti.train, lib_ti.prepare, lib_ti.webui.job, lib_ti.webui.host_model"
    code = f"import sys; import {mods}; print(sorted(m for m in sys.modules if m in ('diffusers', 'transformers')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr + out.stdout
