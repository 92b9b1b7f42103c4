#!/usr/bin/env bash
# The one command that sets up the test environment and runs every check:
#   bash tests/run.sh [pytest args...]
# Creates .venv/ in the repository root (git-ignored): torch 2.13 (CPU build) and the library, UI and API
# versions A1111 v1.10.1 pins (see README, "Running the tests"), then runs ruff, vermin (code must run
# on Python 3.10) and pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

pick_python() {
    if [ -n "${PYTHON:-}" ]; then echo "$PYTHON"; return; fi
    for v in python3.11 python3.10 python3.12 python3; do
        if command -v "$v" >/dev/null 2>&1; then echo "$v"; return; fi
    done
    echo "no python3 found" >&2; exit 1
}

stamp_src=$(cat tests/requirements.txt tests/requirements-ui.txt tests/constraints.txt tests/run.sh tests/install-torch.sh | sha1sum | cut -c1-16)
if [ ! -f .venv/.stamp ] || [ "$(cat .venv/.stamp)" != "$stamp_src" ]; then
    rm -rf .venv
    "$(pick_python)" -m venv .venv
    . .venv/bin/activate
    python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
    # torch first and alone, the CPU build asked for explicitly (+cpu), so nothing can pull a CUDA one;
    # the script fails if the installed torch has CUDA.
    bash tests/install-torch.sh python
    python -m pip install -q -c tests/constraints.txt -r tests/requirements.txt
    # open_clip only for its BPE vocabulary file; --no-deps keeps (CUDA) torchvision out.
    python -m pip install -q --no-deps open-clip-torch==2.20.0
    # The host's UI stack (A1111 1.10.1 pins): gradio 3.41.2, fastapi 0.94.0, pydantic 1.
    python -m pip install -q -c tests/constraints.txt -r tests/requirements-ui.txt
    echo "$stamp_src" > .venv/.stamp
else
    . .venv/bin/activate
fi

echo "== ruff"
ruff check .
echo "== vermin (Python 3.10 compatibility)"
vermin -q --no-tips --violations -t=3.10- --eval-annotations --backport dataclasses lib_ti scripts install.py bench tests
echo "== pytest"
set +e
python -m pytest -q "$@"
rc=$?
set -e
# pytest exit 5 = no tests collected: that is a failure for us, not a pass.
exit $rc
