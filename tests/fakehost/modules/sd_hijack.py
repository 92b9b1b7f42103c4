"""modules/sd_hijack.py: the hijack that puts textual-inversion vectors into prompts.

`EmbeddingsWithFixes` wraps a text encoder's token-embedding layer; `model_hijack.fixes` (set by
the text wrapper per chunk, one-shot) says where each embedding's vectors go. `hijack(m)` wraps
the text encoders the way StableDiffusionModelHijack.hijack does for ldm/sgm models."""

import torch
from modules import devices, sd_hijack_clip, sd_hijack_open_clip


class StableDiffusionModelHijack:
    fixes = None
    layers = None
    clip = None

    def __init__(self):
        from modules.textual_inversion.textual_inversion import EmbeddingDatabase

        self.extra_generation_params = {}
        self.comments = []
        self.embedding_db = EmbeddingDatabase()

    def hijack(self, m):
        # StableDiffusionModelHijack.hijack: SDXL conditioner embedders by type name, else cond_stage_model
        conditioner = getattr(m, "conditioner", None)
        if conditioner is not None:
            text_models = []
            for i, embedder in enumerate(conditioner.embedders):
                typename = type(embedder).__name__
                if typename == "FrozenCLIPEmbedder":
                    emb = embedder.transformer.text_model.embeddings
                    emb.token_embedding = EmbeddingsWithFixes(emb.token_embedding, self)
                    conditioner.embedders[i] = sd_hijack_clip.FrozenCLIPEmbedderForSDXLWithCustomWords(embedder, self)
                    text_models.append(conditioner.embedders[i])
                if typename == "FrozenOpenCLIPEmbedder2":
                    embedder.model.token_embedding = EmbeddingsWithFixes(embedder.model.token_embedding, self,
                                                                         textual_inversion_key="clip_g")
                    conditioner.embedders[i] = sd_hijack_open_clip.FrozenOpenCLIPEmbedder2WithCustomWords(embedder,
                                                                                                          self)
                    text_models.append(conditioner.embedders[i])
            m.cond_stage_model = text_models[0] if len(text_models) == 1 else conditioner
        elif type(m.cond_stage_model).__name__ == "FrozenCLIPEmbedder":
            emb = m.cond_stage_model.transformer.text_model.embeddings
            emb.token_embedding = EmbeddingsWithFixes(emb.token_embedding, self)
            m.cond_stage_model = sd_hijack_clip.FrozenCLIPEmbedderWithCustomWords(m.cond_stage_model, self)
        self.clip = m.cond_stage_model

    def clear_comments(self):
        self.comments = []
        self.extra_generation_params = {}


class EmbeddingsWithFixes(torch.nn.Module):
    def __init__(self, wrapped, embeddings, textual_inversion_key="clip_l"):
        super().__init__()
        self.wrapped = wrapped
        self.embeddings = embeddings
        self.textual_inversion_key = textual_inversion_key

    def forward(self, input_ids):
        # EmbeddingsWithFixes.forward: take the fixes (and clear them), embed the ids, then per prompt
        # splice each embedding's vectors in after position `offset` (+1 for BOS) with torch.cat,
        # which keeps the autograd graph back to the vectors.
        batch_fixes, self.embeddings.fixes = self.embeddings.fixes, None
        inputs_embeds = self.wrapped(input_ids)
        if not batch_fixes or max(len(f) for f in batch_fixes) == 0:
            return inputs_embeds
        rows = []
        for fixes, row in zip(batch_fixes, inputs_embeds):
            for offset, embedding in fixes:
                vec = embedding.vec[self.textual_inversion_key] if isinstance(embedding.vec, dict) else embedding.vec
                emb = devices.cond_cast_unet(vec)
                n = min(row.shape[0] - offset - 1, emb.shape[0])
                row = torch.cat([row[0:offset + 1], emb[0:n], row[offset + 1 + n:]]).to(dtype=inputs_embeds.dtype)
            rows.append(row)
        return torch.stack(rows)


model_hijack = StableDiffusionModelHijack()
