"""sgm/modules/encoders/modules.py: SDXL's GeneralConditioner and its embedders (small, same shapes
of call). Text embedders run under no_grad unless `is_trainable`; `ucg_rate` > 0 randomly zeroes
outputs (classifier-free-guidance dropout)."""

from contextlib import nullcontext

import torch
from ldm.modules.diffusionmodules.openaimodel import timestep_embedding
from torch import nn


class AbstractEmbModel(nn.Module):
    def __init__(self):
        super().__init__()
        self._is_trainable = None
        self._ucg_rate = None
        self._input_key = None

    @property
    def is_trainable(self):
        return self._is_trainable

    @is_trainable.setter
    def is_trainable(self, value):
        self._is_trainable = value

    @property
    def ucg_rate(self):
        return self._ucg_rate

    @ucg_rate.setter
    def ucg_rate(self, value):
        self._ucg_rate = value

    @property
    def input_key(self):
        return self._input_key

    @input_key.setter
    def input_key(self, value):
        self._input_key = value


class FrozenCLIPEmbedder(AbstractEmbModel):
    """clip_l: an HF CLIPTextModel read at hidden layer `layer_idx`."""

    def __init__(self, tokenizer, transformer, layer="hidden", layer_idx=-2):
        super().__init__()
        self.tokenizer = tokenizer
        self.transformer = transformer
        self.layer = layer
        self.layer_idx = layer_idx
        self.return_pooled = False


class _OpenCLIPText(nn.Module):
    """What sgm reads from open_clip's CLIP text tower (`token_embedding`, the transformer, the
    final norm and projection), over an HF CLIPTextModelWithProjection."""

    def __init__(self, hf):
        super().__init__()
        self.hf = hf
        self.token_embedding = hf.text_model.embeddings.token_embedding


class FrozenOpenCLIPEmbedder2(AbstractEmbModel):
    """clip_g: penultimate hidden states, plus the pooled (projected) end-of-text state."""

    def __init__(self, hf_with_projection, layer="penultimate", always_return_pooled=True, legacy=False):
        super().__init__()
        self.model = _OpenCLIPText(hf_with_projection)
        self.layer = layer
        self.layer_idx = 1 if layer == "penultimate" else 0
        self.return_pooled = always_return_pooled
        self.legacy = legacy
        for p in self.parameters():
            p.requires_grad = False

    def encode_with_transformer(self, text):
        tm = self.model.hf.text_model
        x = self.model.token_embedding(text)  # the host's EmbeddingsWithFixes after the hijack
        h = tm.embeddings(inputs_embeds=x)
        n = h.shape[1]
        mask = torch.full((n, n), float("-inf"), device=h.device, dtype=h.dtype).triu(1)[None, None]
        out = tm.encoder(inputs_embeds=h, causal_attention_mask=mask.expand(h.shape[0], 1, n, n),
                         output_hidden_states=True)
        o = {"last": out.last_hidden_state, "penultimate": out.hidden_states[-2]}
        final = tm.final_layer_norm(out.last_hidden_state)
        o["pooled"] = self.model.hf.text_projection(final[torch.arange(final.shape[0]), text.argmax(dim=-1)])
        return o


class ConcatTimestepEmbedderND(AbstractEmbModel):
    """Each number of a (B, d) input as a sinusoidal embedding of width outdim, concatenated."""

    def __init__(self, outdim):
        super().__init__()
        self.outdim = outdim

    def forward(self, x):
        if x.ndim == 1:
            x = x[:, None]
        b, dims = x.shape
        return timestep_embedding(x.reshape(-1), self.outdim).reshape(b, dims * self.outdim)


class GeneralConditioner(nn.Module):
    OUTPUT_DIM2KEYS = {2: "vector", 3: "crossattn", 4: "concat", 5: "concat"}
    KEY2CATDIM = {"vector": 1, "crossattn": 2, "concat": 1}

    def __init__(self, embedders):
        """embedders: (module, input_key, is_trainable, ucg_rate) as the yaml's emb_models give them."""
        super().__init__()
        mods = []
        for embedder, input_key, is_trainable, ucg_rate in embedders:
            embedder.is_trainable = is_trainable
            embedder.ucg_rate = ucg_rate
            if not is_trainable:
                for param in embedder.parameters():
                    param.requires_grad = False
                embedder.eval()
            embedder.input_key = input_key
            embedder.legacy_ucg_val = None
            mods.append(embedder)
        self.embedders = nn.ModuleList(mods)

    def forward(self, batch, force_zero_embeddings=None):
        output = {}
        force_zero_embeddings = force_zero_embeddings or []
        for embedder in self.embedders:
            with nullcontext() if embedder.is_trainable else torch.no_grad():
                emb_out = embedder(batch[embedder.input_key])
            if not isinstance(emb_out, (list, tuple)):
                emb_out = [emb_out]
            for emb in emb_out:
                out_key = self.OUTPUT_DIM2KEYS[emb.dim()]
                if embedder.ucg_rate > 0.0 and embedder.legacy_ucg_val is None:
                    keep = torch.bernoulli((1.0 - embedder.ucg_rate) * torch.ones(emb.shape[0], device=emb.device))
                    emb = keep.reshape(-1, *([1] * (emb.dim() - 1))) * emb
                if embedder.input_key in force_zero_embeddings:
                    emb = torch.zeros_like(emb)
                if out_key in output:
                    output[out_key] = torch.cat((output[out_key], emb), self.KEY2CATDIM[out_key])
                else:
                    output[out_key] = emb
        return output

    # modules/sd_models_xl.py adds these so the conditioner can stand in as cond_stage_model
    def _text(self, attr):
        return [e for e in self.embedders if hasattr(e, attr)]

    def encode_embedding_init_text(self, init_text, nvpt):
        return torch.cat([e.encode_embedding_init_text(init_text, nvpt) for e in self._text("encode_embedding_init_text")],
                         dim=1)

    def tokenize(self, texts):
        for embedder in self._text("tokenize"):
            return embedder.tokenize(texts)
        raise AssertionError("no tokenizer available")

    def process_texts(self, texts):
        for embedder in self._text("process_texts"):
            return embedder.process_texts(texts)
        return None

    def get_target_prompt_token_count(self, token_count):
        for embedder in self._text("get_target_prompt_token_count"):
            return embedder.get_target_prompt_token_count(token_count)
        return None
