"""Each benchmark runs end to end with its smallest settings and ends with its figure in the agreed
`name=<number>` form. Smoke only: no timing or memory assertion (those live in bench/RESULTS.md)."""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent

TINY = ["--quick", "--threads", "1", "--resolution", "64", "--batch", "1", "--steps", "2", "--warmup", "1"]
CASES = {
    "step_overhead": (["bench/step_overhead.py", *TINY], "overhead_ratio"),
    "step_overhead_sdxl": (["bench/step_overhead.py", *TINY, "--family", "sdxl"], "overhead_ratio"),
    "memory": (["bench/memory.py", *TINY], "extra_peak_ratio"),
    "quality": (["bench/quality.py", "--quick", "--threads", "1"], "concept_recovery"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bench_runs_and_prints_its_figure(case, tmp_path):
    argv, name = CASES[case]
    run = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    last = run.stdout.strip().splitlines()[-1]
    m = re.fullmatch(rf"{name}=(\d+\.\d+)", last)
    assert m, f"last line is {last!r}"
    assert math.isfinite(float(m.group(1))) and float(m.group(1)) >= 0
    if case.startswith("step_overhead"):  # the run layer's guard and the resume state's size, same run
        assert re.search(r"^guard_share=\d+\.\d+$", run.stdout, re.M)
        assert re.search(r"^resume_state_ratio=\d+\.\d+$", run.stdout, re.M) and "SDXL width" in run.stdout
