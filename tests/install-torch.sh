#!/usr/bin/env bash
# Install the CPU build of torch 2.13.0 into the active Python (tests/run.sh calls this first, before
# anything that depends on torch). Asked for explicitly, because a plain `torch==2.13.0` from PyPI is
# the CUDA build on Linux and drags in gigabytes of nvidia packages:
#   1. `torch==2.13.0+cpu` from the configured indexes and find-links (a local wheel, a mirror, or a
#      pip config that already points at the CPU index): no network beyond what pip is set up for;
#   2. else the same pin from PyTorch's CPU wheel index (PyPI stays the index for its dependencies);
#   3. macOS has no +cpu builds: its plain wheel is CPU-only.
# Then it checks that what got installed really has no CUDA.
set -euo pipefail
PY=${1:-python}
VERSION=2.13.0
CPU_INDEX=${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}  # a mirror of it may be given

pip_install() { "$PY" -m pip install -q "$@"; }

if [ "$(uname -s)" = Darwin ]; then
    pip_install "torch==$VERSION"
elif ! pip_install "torch==$VERSION+cpu" 2>/dev/null; then
    echo "torch==$VERSION+cpu is not on the configured indexes; using $CPU_INDEX"
    pip_install "torch==$VERSION+cpu" --index-url "$CPU_INDEX" --extra-index-url https://pypi.org/simple
fi

"$PY" - <<'EOF'
import torch

assert torch.version.cuda is None, f"torch {torch.__version__} is a CUDA build (CUDA {torch.version.cuda}); the tests want the CPU build"
print(f"torch {torch.__version__} (CPU build)")
EOF
