"""`python -m lib_ti inspect/convert/train`: the real entry point in a subprocess for --help, a user
error and the table; the rest through the same `cli.main` in this process (no interpreter start)."""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import lib_ti
from lib_ti import cli, formats

ROOT = Path(__file__).resolve().parent.parent
XL = {"clip_l": 768, "clip_g": 1280}


def run_process(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lib_ti", *map(str, args)], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)


def run(*args: str) -> subprocess.CompletedProcess:
    """What `python -m lib_ti` runs (`__main__` only calls cli.main), without starting an interpreter."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main([str(a) for a in args])
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def vec(n: int, width: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, width, generator=torch.Generator().manual_seed(seed))


def a1111(t):
    return {"string_to_token": {"*": 265}, "string_to_param": t, "name": "tok", "step": 9,
            "sd_checkpoint": "abc", "sd_checkpoint_name": "m"}


# one file per layout peers write: (file, format, family, num_vectors, width)
def make_a1111_pt(d):
    torch.save(a1111({"*": vec(2, 768)}), d / "a.pt")
    return "a.pt", "a1111-pt", "sd1", 2, 768


def make_a1111_parameterdict(d):
    torch.save(a1111(torch.nn.ParameterDict({"*": torch.nn.Parameter(vec(3, 1024))})), d / "pd.pt")
    return "pd.pt", "a1111-pt", "sd2", 3, 1024


def make_kohya_sd1(d):
    save_file({"emb_params": vec(4, 768)}, d / "k.safetensors", {"modelspec.title": "k"})
    return "k.safetensors", "kohya", "sd1", 4, 768


def make_kohya_pt(d):
    torch.save({"emb_params": vec(1, 768)}, d / "k.pt")
    return "k.pt", "kohya", "sd1", 1, 768


def make_kohya_sdxl(d):
    save_file({"clip_l": vec(2, 768), "clip_g": vec(2, 1280)}, d / "kxl.safetensors", {"ss_steps": "5"})
    return "kxl.safetensors", "kohya", "sdxl", 2, XL


def make_onetrainer(d):
    save_file({"emp_params": vec(2, 768), "emp_params_out": vec(2, 768)}, d / "ot.safetensors")
    return "ot.safetensors", "onetrainer", "sd1", 2, 768


def make_diffusers_1d(d):
    save_file({"<t>": vec(1, 768)[0]}, d / "learned_embeds.safetensors", {"format": "pt"})
    return "learned_embeds.safetensors", "diffusers", "sd1", 1, 768


def make_diffusers_2d(d):
    torch.save({"<t>": vec(5, 1024)}, d / "learned_embeds.bin")
    return "learned_embeds.bin", "diffusers", "sd2", 5, 1024


def make_diffusers_pair(d):
    save_file({"<t>": vec(2, 768)}, d / "learned_embeds-steps-10.safetensors", {"format": "pt"})
    save_file({"<t>": vec(2, 1280)}, d / "learned_embeds_2-steps-10.safetensors", {"format": "pt"})
    return "learned_embeds_2-steps-10.safetensors", "diffusers-sdxl-pair", "sdxl", 2, XL


def make_lora_bundle(d):
    save_file({"lora_unet_x.lora_down.weight": vec(4, 8), "bundle_emb.b.clip_l": vec(3, 768),
               "bundle_emb.b.clip_g": vec(3, 1280)}, d / "lora.safetensors")
    return "lora.safetensors", "lora-bundle", "sdxl", 3, XL


def make_invoke_training(d):
    save_file({"emb_params": vec(6, 768)}, d / "inv.safetensors")
    return "inv.safetensors", "safetensors", "sd1", 6, 768


MAKERS = [make_a1111_pt, make_a1111_parameterdict, make_kohya_sd1, make_kohya_pt, make_kohya_sdxl,
          make_onetrainer, make_diffusers_1d, make_diffusers_2d, make_diffusers_pair, make_lora_bundle,
          make_invoke_training]


@pytest.mark.parametrize("make", MAKERS, ids=lambda m: m.__name__[5:])
def test_inspect_json_every_layout(tmp_path, make):
    name, fmt, family, n, width = make(tmp_path)
    r = run("inspect", tmp_path / name, "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert (info["format"], info["family"], info["num_vectors"], info["width"]) == (fmt, family, n, width)
    norms = info["norms"]
    assert all(len(v) == n for v in norms.values()) if isinstance(norms, dict) else len(norms) == n


def test_inspect_table(tmp_path):
    make_kohya_sdxl(tmp_path)
    r = run_process("inspect", tmp_path / "kxl.safetensors")
    assert r.returncode == 0, r.stderr
    for text in ("sdxl", "clip_l 768 + clip_g 1280", "clip_g", "ss_steps: 5", "vectors"):
        assert text in r.stdout
    assert len([ln for ln in r.stdout.splitlines() if ln.strip().startswith(("0 ", "1 "))]) == 2


@pytest.mark.parametrize("to, out, fmt", [("a1111", "o.safetensors", "safetensors"), ("a1111-pt", "o.pt", "a1111-pt"),
                                          ("diffusers", "o.safetensors", "diffusers")])
def test_convert_round_trip(tmp_path, to, out, fmt):
    make_a1111_pt(tmp_path)
    r = run("convert", tmp_path / "a.pt", tmp_path / out, "--to", to)
    assert r.returncode == 0, r.stderr
    src, dst = formats.read_embedding(tmp_path / "a.pt"), formats.read_embedding(tmp_path / out)
    assert torch.equal(src.vectors["emb"], dst.vectors["emb"])
    assert (dst.step, dst.name, dst.sd_checkpoint) == (9, "tok", "abc")
    assert formats.inspect_embedding(tmp_path / out)["format"] == fmt


def test_convert_diffusers_pair_to_a1111_and_back(tmp_path):
    make_diffusers_pair(tmp_path)
    assert run("convert", tmp_path / "learned_embeds-steps-10.safetensors", tmp_path / "xl.safetensors",
               "--to", "a1111").returncode == 0
    assert set(load_file(tmp_path / "xl.safetensors")) == {"clip_l", "clip_g"}
    r = run("convert", tmp_path / "xl.safetensors", tmp_path / "back.safetensors", "--to", "diffusers", "--token", "<z>")
    assert r.returncode == 0, r.stderr
    assert list(load_file(tmp_path / "back_2.safetensors")) == ["<z>"]
    a, b = formats.read_embedding(tmp_path / "xl.safetensors"), formats.read_embedding(tmp_path / "back.safetensors")
    assert all(torch.equal(a.vectors[k], b.vectors[k]) for k in XL)


def one_error_line(r: subprocess.CompletedProcess, code: int, *needles: str) -> None:
    assert r.returncode == code, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert "Traceback" not in r.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def test_bad_input_is_one_line_exit_2(tmp_path, capsys):
    one_error_line(run_process("inspect", tmp_path / "missing.pt"), 2, "missing.pt")  # the real entry point

    def check(args, *needles):  # the rest in-process: same code, no interpreter start-up
        code = cli.main([str(a) for a in args])
        err = capsys.readouterr().err
        one_error_line(subprocess.CompletedProcess(args, code, "", err), 2, *needles)

    (tmp_path / "junk.pt").write_bytes(b"not an embedding at all")
    check(["inspect", tmp_path / "junk.pt"], "junk.pt")
    make_kohya_sdxl(tmp_path)
    check(["convert", tmp_path / "kxl.safetensors", tmp_path / "x.pt", "--to", "a1111-pt"], "safetensors")
    check(["convert", tmp_path / "kxl.safetensors", tmp_path / "x.pt", "--to", "a1111"], ".safetensors")
    check(["convert", tmp_path / "kxl.safetensors", tmp_path / "o.safetensors", "--to", "ckpt"], "--to")
    check(["convert", tmp_path / "kxl.safetensors", tmp_path / "o.safetensors"], "--to")
    check(["frobnicate"])
    check(["inspect"])
    check(["inspect", tmp_path])
    assert not (tmp_path / "x.pt").exists() and not (tmp_path / "o.safetensors").exists()


def test_convert_refuses_to_overwrite(tmp_path):
    make_a1111_pt(tmp_path)
    (tmp_path / "o.safetensors").write_bytes(b"keep me")
    one_error_line(run("convert", tmp_path / "a.pt", tmp_path / "o.safetensors", "--to", "a1111"), 2, "already exists")
    assert (tmp_path / "o.safetensors").read_bytes() == b"keep me"
    assert run("convert", tmp_path / "a.pt", tmp_path / "o.safetensors", "--to", "a1111", "--overwrite").returncode == 0


def test_malicious_pt_is_refused(tmp_path):
    import os

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'PWNED'}",))

    torch.save(a1111({"*": Evil()}), tmp_path / "evil.pt")
    one_error_line(run("inspect", tmp_path / "evil.pt"), 2, "refused")
    assert not (tmp_path / "PWNED").exists()


def test_help_exits_0():
    r = run_process("--help")
    assert r.returncode == 0 and "inspect" in r.stdout and "convert" in r.stdout and "train" in r.stdout


# in-process: the train subcommand hands its arguments to lib_ti.train_cli


def test_train_passes_arguments(monkeypatch):
    seen = {}
    fake = types.ModuleType("lib_ti.train_cli")
    fake.main = lambda args: seen.update(vars(args)) or 0
    monkeypatch.setitem(sys.modules, "lib_ti.train_cli", fake)
    monkeypatch.setattr(lib_ti, "train_cli", fake, raising=False)
    code = cli.main(["train", "--config_file", "a.toml", "--dataset_config", "d.toml",
                     "--set", "max_train_steps=5", "--set", "learning_rate=0.01"])
    assert code == 0
    assert (seen["config_file"], seen["dataset_config"], seen["set"]) == \
        ("a.toml", "d.toml", ["max_train_steps=5", "learning_rate=0.01"])


def test_train_without_train_cli_says_so(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "lib_ti.train_cli", None)
    monkeypatch.delattr(lib_ti, "train_cli", raising=False)
    assert cli.main(["train", "--config_file", "a.toml"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "train command is not available" in err[0]


def test_unexpected_failure_is_one_line_exit_1(monkeypatch, capsys):
    def broken(*a, **k):
        raise RuntimeError("something odd\nsecond line")
    monkeypatch.setattr(formats, "inspect_embedding", broken)
    monkeypatch.delenv("LIB_TI_DEBUG", raising=False)
    assert cli.main(["inspect", "x.pt"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: RuntimeError: something odd (set LIB_TI_DEBUG=1 for details)"]
