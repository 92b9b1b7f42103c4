"""Run by the host's python (test_real_host_chunks.py): A1111's own prompt chunking
(modules/sd_hijack_clip.py tokenize_line, with its default options) on the prompts in a json file,
for an embedding of 1, 3 and 75 vectors. Writes, per "<vectors>|<name>", each chunk's 77 token ids,
the offsets of its embedding fixes and its emphasis multipliers."""

import json
import sys
import types
from pathlib import Path


def main(host: str, data_dir: str, tokenizer: str, prompts_json: str, out_json: str) -> None:
    sys.argv = [sys.argv[0], "--skip-torch-cuda-test", "--data-dir", data_dir]
    sys.path.insert(0, host)
    from modules import initialize

    initialize.imports()
    import torch
    from modules import sd_hijack, sd_hijack_clip
    from modules.textual_inversion.textual_inversion import Embedding
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(tokenizer)

    class Clip(sd_hijack_clip.TextConditionalModel):  # the chunking of the host's CLIP-L wrapper
        def __init__(self):
            super().__init__()
            self.comma_token = tok.get_vocab()[",</w>"]
            self.id_start, self.id_end = tok.bos_token_id, tok.eos_token_id
            self.id_pad = self.id_end

        def tokenize(self, texts):
            return tok(texts, truncation=False, add_special_tokens=False)["input_ids"]

    spec = json.loads(Path(prompts_json).read_text(encoding="utf-8"))
    clip, db, out = Clip(), sd_hijack.model_hijack.embedding_db, {}
    for n in spec["vectors"]:
        db.ids_lookup.clear()
        db.word_embeddings.clear()
        emb = Embedding(torch.zeros(n, 8), spec["token"])
        emb.vectors = n
        db.register_embedding(emb, types.SimpleNamespace(cond_stage_model=clip))
        for name, text in spec["prompts"].items():
            chunks, _ = clip.tokenize_line(text)
            out[f"{n}|{name}"] = [{"tokens": c.tokens, "fixes": [f.offset for f in c.fixes],
                                   "multipliers": c.multipliers} for c in chunks]
    Path(out_json).write_text(json.dumps(out), encoding="utf-8")


if __name__ == "__main__":
    main(*sys.argv[1:6])
