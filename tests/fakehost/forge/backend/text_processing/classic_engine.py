"""backend/text_processing/classic_engine.py: Forge's text engine. It owns an EmbeddingDatabase,
wraps the encoder's token embedding in CLIPEmbeddingForTextualInversion (vectors spliced in with
torch.cat, so gradients reach them), walks prompts in 75-token chunks with the db's names, turns
the token embedding to float32 on every call (`.to` on the module: under inference_mode that makes
its weight an inference tensor again), and notes the embeddings used for the infotext ("TI")."""

import math

import torch
from modules.shared import opts

last_extra_generation_params = {}


class PromptChunk:
    def __init__(self):
        self.tokens = []
        self.multipliers = []
        self.fixes = []


class CLIPEmbeddingForTextualInversion(torch.nn.Module):
    def __init__(self, wrapped, embeddings, textual_inversion_key="clip_l"):
        super().__init__()
        self.wrapped = wrapped
        self.embeddings = embeddings
        self.textual_inversion_key = textual_inversion_key
        self.weight = self.wrapped.weight

    def forward(self, input_ids):
        batch_fixes = self.embeddings.fixes
        self.embeddings.fixes = None
        inputs_embeds = self.wrapped(input_ids)
        if batch_fixes is None or len(batch_fixes) == 0 or max([len(x) for x in batch_fixes]) == 0:
            return inputs_embeds
        vecs = []
        for fixes, tensor in zip(batch_fixes, inputs_embeds):
            for offset, embedding in fixes:
                vec = embedding.vec
                emb = vec[self.textual_inversion_key] if isinstance(vec, dict) else vec
                emb = emb.to(inputs_embeds)
                emb_len = min(tensor.shape[0] - offset - 1, emb.shape[0])
                tensor = torch.cat([tensor[0:offset + 1], emb[0:emb_len], tensor[offset + 1 + emb_len:]])
            vecs.append(tensor)
        return torch.stack(vecs)


class ClassicTextProcessingEngine:
    def __init__(self, text_encoder, tokenizer, chunk_length=75, embedding_dir=None, embedding_key="clip_l",
                 embedding_expected_shape=768, text_projection=False, minimal_clip_skip=1, clip_skip=1,
                 return_pooled=False, final_layer_norm=True):
        from backend.text_processing.textual_inversion import EmbeddingDatabase

        self.embeddings = EmbeddingDatabase(tokenizer, embedding_expected_shape)
        if isinstance(embedding_dir, str):
            self.embeddings.add_embedding_dir(embedding_dir)
            self.embeddings.load_textual_inversion_embeddings()
        self.embedding_key = embedding_key
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.text_projection = text_projection
        self.minimal_clip_skip = minimal_clip_skip
        self.clip_skip = clip_skip
        self.return_pooled = return_pooled
        self.final_layer_norm = final_layer_norm
        self.chunk_length = chunk_length
        self.id_start = tokenizer.bos_token_id
        self.id_end = tokenizer.eos_token_id
        self.id_pad = tokenizer.pad_token_id
        emb = text_encoder.transformer.text_model.embeddings
        emb.token_embedding = CLIPEmbeddingForTextualInversion(emb.token_embedding, self.embeddings,
                                                               textual_inversion_key=embedding_key)

    def tokenize(self, texts):
        return self.tokenizer(texts, truncation=False, add_special_tokens=False)["input_ids"]

    def encode_with_transformers(self, tokens):
        embeddings = self.text_encoder.transformer.text_model.embeddings
        embeddings.token_embedding = embeddings.token_embedding.to(dtype=torch.float32)
        outputs = self.text_encoder.transformer(tokens, output_hidden_states=True)
        z = outputs.hidden_states[-max(self.clip_skip, self.minimal_clip_skip)]
        if self.final_layer_norm:
            z = self.text_encoder.transformer.text_model.final_layer_norm(z)
        if self.return_pooled:
            pooled = outputs.pooler_output
            if self.text_projection and self.embedding_key != "clip_l":
                pooled = self.text_encoder.transformer.text_projection(pooled)
            z.pooled = pooled
        return z

    def tokenize_line(self, line):
        tokens = self.tokenize([line])[0]
        chunks, chunk = [], PromptChunk()

        def next_chunk():
            nonlocal chunk
            to_add = self.chunk_length - len(chunk.tokens)
            chunk.tokens = [self.id_start] + chunk.tokens + [self.id_end] * (to_add + 1)
            chunk.multipliers = [1.0] + chunk.multipliers + [1.0] * (to_add + 1)
            chunks.append(chunk)
            chunk = PromptChunk()

        position = 0
        while position < len(tokens):
            if len(chunk.tokens) == self.chunk_length:
                next_chunk()
            embedding, length = self.embeddings.find_embedding_at_position(tokens, position)
            if embedding is None:
                chunk.tokens.append(tokens[position])
                chunk.multipliers.append(1.0)
                position += 1
                continue
            emb_len = int(embedding.vectors)
            if len(chunk.tokens) + emb_len > self.chunk_length:
                next_chunk()
            chunk.fixes.append((len(chunk.tokens), embedding))
            chunk.tokens += [0] * emb_len
            chunk.multipliers += [1.0] * emb_len
            position += length
        if chunk.tokens or not chunks:
            next_chunk()
        return chunks, len(tokens)

    def __call__(self, texts):
        global last_extra_generation_params
        batch_chunks = [self.tokenize_line(t)[0] for t in texts]
        used = {}
        zs = []
        for i in range(max(len(x) for x in batch_chunks)):
            batch = [c[i] if i < len(c) else self.tokenize_line("")[0][0] for c in batch_chunks]
            self.embeddings.fixes = [x.fixes for x in batch]
            for fixes in self.embeddings.fixes:
                for _, embedding in fixes:
                    used[embedding.name] = embedding
            zs.append(self.process_tokens([x.tokens for x in batch], [x.multipliers for x in batch]))
        if used:
            names = ", ".join(used)
            prev = last_extra_generation_params.get("TI")
            last_extra_generation_params["TI"] = f"{prev}, {names}" if prev else names
        if self.return_pooled:
            return torch.hstack(zs), zs[0].pooled
        return torch.hstack(zs)

    def process_tokens(self, batch_tokens, batch_multipliers):
        tokens = torch.asarray(batch_tokens)
        if self.id_end != self.id_pad:
            for b, row in enumerate(batch_tokens):
                tokens[b, row.index(self.id_end) + 1:] = self.id_pad
        z = self.encode_with_transformers(tokens)
        pooled = getattr(z, "pooled", None)
        # emphasis "Original": multiply, then restore the mean (Forge reads opts.emphasis each call)
        if opts.emphasis != "None":
            mult = torch.asarray(batch_multipliers).to(z)
            original_mean = z.mean()
            z = z * mult.reshape(mult.shape + (1,)).expand(z.shape)
            z = z * (original_mean / z.mean())
        if pooled is not None:
            z.pooled = pooled
        return z

    def get_target_prompt_token_count(self, token_count):
        return math.ceil(max(token_count, 1) / self.chunk_length) * self.chunk_length
