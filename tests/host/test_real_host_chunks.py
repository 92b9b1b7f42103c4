"""Opt-in: lib_ti's prompt chunking against the real host's (A1111 sd_hijack_clip.tokenize_line)
on the edge cases of tests/test_chunks_a1111.py. Plain-text prompts must chunk identically (token
ids, padding, vector positions); the documented differences (A1111's prompt syntax, its comma
backtrack leaving the vectors behind) must be exactly those."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
HOST = os.environ.get("TI_TRAINER_HOST_DIR", "")
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

pytestmark = [
    pytest.mark.host,
    pytest.mark.skipif(not HOST, reason="set TI_TRAINER_HOST_DIR to a WebUI root (tests/host/README.md)"),
]


def test_chunks_match_the_real_host(tmp_path, tokenizer_dir):
    from test_chunks_a1111 import RELOCATED, SYNTAX, T, chunk_prompts
    from test_real_host import host_python
    from transformers import CLIPTokenizer

    from lib_ti.diffusers_backend.inject import PromptTokenizer

    prompts = {**chunk_prompts(), **SYNTAX, **RELOCATED}
    spec = tmp_path / "prompts.json"
    spec.write_text(json.dumps({"token": T, "vectors": [1, 3, 75], "prompts": prompts}), encoding="utf-8")
    out = tmp_path / "host.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    r = subprocess.run([host_python(), str(HERE / "chunk_reference.py"), HOST, str(tmp_path / "data"),
                        str(tokenizer_dir), str(spec), str(out)], cwd=HOST, capture_output=True, text=True,
                       timeout=600, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    ref = json.loads(out.read_text(encoding="utf-8"))
    tok = PromptTokenizer(CLIPTokenizer.from_pretrained(str(tokenizer_dir)))
    differ = set()
    for key, chunks in ref.items():
        n, name = key.split("|", 1)
        row = tok.row(prompts[name], T, int(n))
        ours = [(list(c.ids) + [tok.eos] * (77 - len(c.ids)), [i for i, s in enumerate(c.slot) if s == 0])
                for c in row.chunks]
        theirs = [(c["tokens"], [f + 1 for f in c["fixes"]]) for c in chunks]  # fixes count from after BOS
        if ours != theirs:
            differ.add(name)
        elif name not in SYNTAX:
            assert all(m == 1.0 for c in chunks for m in c["multipliers"])
    assert differ == set(SYNTAX) | set(RELOCATED)
