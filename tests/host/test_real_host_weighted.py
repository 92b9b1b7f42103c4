"""Opt-in: weighted_captions' chunking and weights against the real host's (A1111's prompt parser
and sd_hijack_clip.tokenize_line, run by chunk_reference.py): token ids, vector positions and
emphasis multipliers must match exactly, except where this trainer differs on purpose:
  - a BREAK inside a (group): A1111 multiplies its marker's weight, so it no longer breaks and
    the word 'BREAK' is encoded with weight -1.1; here it still ends the chunk;
  - a comma backtrack that moves the token to the next chunk (test_chunks_a1111)."""

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

T = "mytok123"
CAT70 = " ".join(["cat"] * 70)
PROMPTS = {
    "break": f"a photo of {T} BREAK in a garden",
    "parens": f"a (photo) of [{T}] \\(x\\)",
    "nest": f"((a ({T}:1.3) b)) [[c]], d",
    "unbalanced": "a) b] (c [d e",
    "numbers": "(a:0.5) (b: 1.25 ) (c:+.5) (d:-1) x:2) (e:1e2)",
    "escapes": "\\\\ a \\[b\\] \\c \\(d:1.2\\)",
    "breaks": "BREAK a BREAK BREAK b, BREAKx x-BREAK",
    "glued": f"{T}({T}){T} (my)tok123",
    "long": f"{CAT70} cat cat cat cat cat, (dog dog dog:1.4) ({T}:0.8) dog [dog]",
    "empty": "",
    "only_break": "BREAK",
}
DIFFER = {"break_in_group": f"(b BREAK c) {T}",
          "comma_moves_token": f"{CAT70}, (cat cat cat:1.2) {T} " + " ".join(["dog"] * 10)}


def test_weighted_chunks_match_the_real_host(tmp_path, tokenizer_dir):
    from test_real_host import host_python
    from transformers import CLIPTokenizer

    from lib_ti.diffusers_backend.inject import PromptTokenizer

    prompts = {**PROMPTS, **DIFFER}
    spec = tmp_path / "prompts.json"
    spec.write_text(json.dumps({"token": T, "vectors": [1, 3], "prompts": prompts}), encoding="utf-8")
    out = tmp_path / "host.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    r = subprocess.run([host_python(), str(HERE / "chunk_reference.py"), HOST, str(tmp_path / "data"),
                        str(tokenizer_dir), str(spec), str(out)], cwd=HOST, capture_output=True, text=True,
                       timeout=600, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    ref = json.loads(out.read_text(encoding="utf-8"))
    tok = PromptTokenizer(CLIPTokenizer.from_pretrained(str(tokenizer_dir)))
    tok.weighted = True
    differ = set()
    for key, chunks in ref.items():
        n, name = key.split("|", 1)
        pad = [tok.eos] * 77
        ours = [(list(c.ids) + pad[len(c.ids):], [i for i, s in enumerate(c.slot) if s == 0],
                 list(c.weight or [1.0] * len(c.ids)) + [1.0] * (77 - len(c.ids)))
                for c in tok.row(prompts[name], T, int(n)).chunks]
        theirs = [(c["tokens"], [f + 1 for f in c["fixes"]], c["multipliers"]) for c in chunks]
        if ours != theirs:
            differ.add(name)
    assert differ == set(DIFFER)
