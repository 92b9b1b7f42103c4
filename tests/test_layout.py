"""The layout rules the host imposes, checked so they stay true."""

import ast
import subprocess
import sys
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


BACKEND = "lib_ti.diffusers_backend"
HEAVY = {"diffusers", "transformers"}
# The CLI loads diffusers models; everything else in lib_ti (the loop, prepare, the run layer, the
# protocol, the WebUI, which trains the host's own model objects) works on any TrainableModel.
LOADERS = {"lib_ti/__main__.py", "lib_ti/cli.py", "lib_ti/train_cli.py"}


def _module_file(name: str) -> Path | None:
    base = ROOT.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _reached(path: Path) -> set[str]:
    """Every name imported by `path` and, through lib_ti modules, by what it imports (function-level
    imports included: a lazy import of diffusers still imports it)."""
    seen, todo, names = set(), [path], set()
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        for n in imported(p):
            names.add(n)
            parts = n.split(".")
            for i in range(1, len(parts) + 1):  # a.b.c imports a, a.b and a.b.c
                f = _module_file(".".join(parts[:i])) if parts[0] == "lib_ti" else None
                if f is not None:
                    todo.append(f)
    return names


def _lib_ti_files(skip_backend: bool = True) -> list[Path]:
    return [p for p in sorted((ROOT / "lib_ti").rglob("*.py"))
            if not (skip_backend and p.relative_to(ROOT).parts[1] == "diffusers_backend")]


def test_only_the_diffusers_backend_imports_diffusers_or_transformers():
    direct = {str(p.relative_to(ROOT)): sorted({n.split(".")[0] for n in imported(p)} & HEAVY)
              for p in _lib_ti_files()}
    direct = {k: v for k, v in direct.items() if v}
    assert not direct, direct
    # train.py, prepare.py, the run layer, model.py and webui/ do not reach them through lib_ti either
    reached = {}
    for p in _lib_ti_files():
        rel = p.relative_to(ROOT).as_posix()
        if rel not in LOADERS:
            names = _reached(p)
            bad = sorted({n.split(".")[0] for n in names} & HEAVY)
            bad += [BACKEND] if any(n.startswith(BACKEND) for n in names) else []
            if bad:
                reached[rel] = bad
    assert not reached, reached
    # and importing the core for real loads neither (a fresh interpreter: this one may have them)
    core = [m for m in ("lib_ti.model", "lib_ti.train", "lib_ti.prepare", "lib_ti.run", "lib_ti.webui.job",
                        "lib_ti.webui.host_model") if _module_file(m)]
    code = f"import sys, {', '.join(core)}; print(sorted(m for m in sys.modules if m.split('.')[0] in {sorted(HEAVY)}))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr + out.stdout


def test_lib_ti_never_imports_the_tests():
    """tests/support (random-weight models) is for the tests and bench/ only; an installed extension
    must not depend on its tests."""
    bad = {str(p.relative_to(ROOT)): sorted(n for n in imported(p) if n.split(".")[0] in {"tests", "support"})
           for p in _lib_ti_files(skip_backend=False)}
    bad = {k: v for k, v in bad.items() if v}
    assert not bad, bad
