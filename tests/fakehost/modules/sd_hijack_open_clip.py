"""modules/sd_hijack_open_clip.py: the OpenCLIP text wrappers (SDXL clip_g here; SD2's is alike).

`tokenizer` stands in for open_clip.tokenizer._tokenizer (CLIP's SimpleTokenizer): encode(text)
gives ids without start/end, encoder/decoder map strings <-> ids, with "<start_of_text>" and
"<end_of_text>" as its special names. Built over the real CLIP vocabulary."""

import torch
from modules import devices, sd_hijack_clip


class _SimpleTokenizer:
    def __init__(self):
        from lib_ti.diffusers_backend import vocab

        self._hf = vocab.make_tokenizer(vocab.PAD_OPENCLIP)
        self.encoder = dict(self._hf.get_vocab())
        self.encoder["<start_of_text>"] = self._hf.bos_token_id
        self.encoder["<end_of_text>"] = self._hf.eos_token_id
        self.decoder = {v: k for k, v in self._hf.get_vocab().items()}

    def encode(self, text):
        return list(self._hf(text, add_special_tokens=False, truncation=False)["input_ids"])


tokenizer = _SimpleTokenizer()


class FrozenOpenCLIPEmbedder2WithCustomWords(sd_hijack_clip.FrozenCLIPEmbedderWithCustomWordsBase):
    def __init__(self, wrapped, hijack):
        super().__init__(wrapped, hijack)
        self.comma_token = tokenizer.encoder.get(",</w>")
        self.id_start = tokenizer.encoder["<start_of_text>"]
        self.id_end = tokenizer.encoder["<end_of_text>"]
        self.id_pad = 0

    def tokenize(self, texts):
        return [tokenizer.encode(text) for text in texts]

    def encode_with_transformers(self, tokens):
        d = self.wrapped.encode_with_transformer(tokens)
        z = d[self.wrapped.layer]
        pooled = d.get("pooled")
        if pooled is not None:
            z.pooled = pooled
        return z

    def encode_embedding_init_text(self, init_text, nvpt):
        ids = torch.asarray([tokenizer.encode(init_text)], device=devices.device, dtype=torch.int)
        layer = self.wrapped.model.token_embedding.wrapped
        return layer(ids.to(layer.weight.device)).squeeze(0)
