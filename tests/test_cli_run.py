"""The headless CLI's lifecycle (issue 13 items 2-7): Ctrl-C/SIGTERM save what was learned, names
stay inside output_dir, cheap checks run before the model loads and leave nothing behind, user
errors exit 2 in one line, the loss file is named after the run, one name across layouts; and the
CLI path of an exact resume."""

from __future__ import annotations

import csv
import signal
import subprocess
import sys

import pytest
import torch
from test_train_e2e import TOKEN, cli_config

from lib_ti import formats, resume

pytestmark = pytest.mark.slow


def train_here(toml, capsys, with_stdout=False):
    """In this process (no interpreter start): (exit code, stderr), or (code, stdout, stderr)."""
    from lib_ti import cli

    code = cli.main(["train", "--config_file", str(toml)])
    out = capsys.readouterr()
    return (code, out.out, out.err) if with_stdout else (code, out.err)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_saves_what_was_learned_and_exits_non_zero(tiny_sd1_dir, tmp_path, sig):
    toml, out = cli_config(tiny_sd1_dir, tmp_path, """
max_train_steps = 100000
validation_every_n_steps = 1
validation_batch_size = 1
""")
    proc = subprocess.Popen([sys.executable, "-m", "lib_ti", "train", "--config_file", str(toml)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stdout:  # wait until a step is done, then stop it as a user would
            if line.startswith("step 2/"):
                proc.send_signal(sig)
                break
        rest, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 128 + sig, err
    assert "interrupted" in rest
    emb = formats.read_embedding(out / f"{TOKEN}.safetensors")
    assert 2 <= emb.step < 100000
    assert (out / f"{TOKEN}.safetensors{resume.SUFFIX}").is_file()  # and it can resume exactly


@pytest.mark.parametrize("name", ["../escaped", "/tmp/abs", "sub/x", "..mytok", ".hidden"])
def test_output_name_stays_a_plain_name_checked_before_the_model(tmp_path, name, capsys):
    not_a_model = tmp_path / "nomodel"
    not_a_model.mkdir()
    toml, out = cli_config(not_a_model, tmp_path, f'output_name = "{name}"\n')
    code, err = train_here(toml, capsys)
    assert code == 2 and "output_name" in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists() and not (tmp_path / "escaped").exists()


def test_user_errors_exit_2_plainly_and_leave_no_folder(tmp_path, tiny_sd1_dir, capsys):
    not_a_model = tmp_path / "nomodel"
    not_a_model.mkdir()
    cases = [(not_a_model, "", "pretrained_model_name_or_path"),
             (tmp_path / "missing", "", "does not exist"),
             (tiny_sd1_dir, 'device = "tpu9"\n', "device"),
             (tiny_sd1_dir, 'train_data_dir = "/nonexistent/data"\n', "train_data_dir")]
    if not torch.cuda.is_available():
        cases.append((tiny_sd1_dir, 'device = "cuda"\n', "CUDA"))
    for model, extra, word in cases:
        toml, out = cli_config(model, tmp_path, extra)
        if "train_data_dir" in extra:  # the last key wins in TOML? no: rewrite the data line instead
            toml.write_text(toml.read_text().replace(f'train_data_dir = "{tmp_path / "data"}"\n', ""))
        code, err = train_here(toml, capsys)
        assert code == 2 and word in err and len(err.strip().splitlines()) == 1, (extra, err)
        assert not out.exists(), err


def test_loss_file_is_named_after_the_run_and_one_name_covers_every_layout(tiny_sd1_dir, tmp_path, capsys):
    toml, out = cli_config(tiny_sd1_dir, tmp_path, """
max_train_steps = 4
validation_every_n_steps = 2
validation_batch_size = 1
""")
    assert train_here(toml, capsys)[0] == 0
    rows = list(csv.DictReader((out / f"{TOKEN}.loss.csv").read_text().splitlines()))
    assert [r["step"] for r in rows] == ["1", "2", "3", "4"]
    assert [bool(r["val_loss"]) for r in rows] == [False, True, False, True]  # empty where none ran
    assert not (out / "loss.csv").exists()

    toml.write_text(toml.read_text() + 'save_model_as = "pt"\n')
    code, err = train_here(toml, capsys)  # <name>.pt beside <name>.safetensors: the hosts would load one of the two
    assert code == 2 and f"{TOKEN}.safetensors" in err and not (out / f"{TOKEN}.pt").exists()


def test_cli_resume_continues_exactly_and_pt_passes_the_hosts_check(tiny_sd1_dir, tmp_path, capsys):
    common = 'validation_every_n_steps = 0\nflip_aug = true\ntrain_batch_size = 2\nseed = 5\nsave_model_as = "pt"\n'
    toml, out = cli_config(tiny_sd1_dir, tmp_path, common + "max_train_steps = 6\n")
    assert train_here(toml, capsys)[0] == 0
    straight = formats.read_embedding(out / f"{TOKEN}.pt")
    half, _ = cli_config(tiny_sd1_dir, tmp_path, common + 'max_train_steps = 3\noutput_name = "half"\n')
    assert train_here(half, capsys)[0] == 0
    more, _ = cli_config(tiny_sd1_dir, tmp_path, common + f"""max_train_steps = 6
output_name = "half"
overwrite = true
weights = "{out / 'half.pt'}"
""")
    code, stdout, err = train_here(more, capsys, with_stdout=True)
    assert code == 0 and "resuming exactly from step 3" in stdout, stdout + err
    resumed = formats.read_embedding(out / "half.pt")
    assert resumed.step == 6 and torch.allclose(resumed.vectors["emb"], straight.vectors["emb"], atol=1e-6, rtol=0)

    from conftest import fake_host_modules

    with fake_host_modules() as fakehost:
        fakehost.install(data_dir=str(tmp_path / "webui"), family="sd1")
        from modules import safe

        safe.check_pt(str(out / "half.pt"))  # A1111's own check: raises on a refused layout
