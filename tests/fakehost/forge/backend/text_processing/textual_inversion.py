"""backend/text_processing/textual_inversion.py: Forge's per-engine EmbeddingDatabase. Unlike
A1111's: a tokenizer of its own, register_embedding(emb) / register_embedding_by_name(emb, name)
without a model, and load_textual_inversion_embeddings() always a full reload."""

import os

import safetensors.torch
import torch


class Embedding:
    def __init__(self, vec, name, step=None):
        self.vec = vec
        self.name = name
        self.step = step
        self.shape = None
        self.vectors = 0
        self.sd_checkpoint = None
        self.sd_checkpoint_name = None


class DirWithTextualInversionEmbeddings:
    def __init__(self, path):
        self.path = path
        self.mtime = None

    def update(self):
        if os.path.isdir(self.path):
            self.mtime = os.path.getmtime(self.path)


class EmbeddingDatabase:
    def __init__(self, tokenizer, expected_shape=-1):
        self.ids_lookup = {}
        self.word_embeddings = {}
        self.embedding_dirs = {}
        self.skipped_embeddings = {}
        self.expected_shape = expected_shape
        self.tokenizer = tokenizer
        self.fixes = []

    def add_embedding_dir(self, path):
        self.embedding_dirs[path] = DirWithTextualInversionEmbeddings(path)

    def clear_embedding_dirs(self):
        self.embedding_dirs.clear()

    def register_embedding(self, embedding):
        return self.register_embedding_by_name(embedding, embedding.name)

    def register_embedding_by_name(self, embedding, name):
        ids = self.tokenizer([name], truncation=False, add_special_tokens=False)["input_ids"][0]
        first_id = ids[0]
        if first_id not in self.ids_lookup:
            self.ids_lookup[first_id] = []
        if name in self.word_embeddings:
            lookup = [x for x in self.ids_lookup[first_id] if x[1].name != name]
        else:
            lookup = self.ids_lookup[first_id]
        if embedding is not None:
            lookup += [(ids, embedding)]
        self.ids_lookup[first_id] = sorted(lookup, key=lambda x: len(x[0]), reverse=True)
        if embedding is None:
            if name in self.word_embeddings:
                del self.word_embeddings[name]
            if len(self.ids_lookup[first_id]) == 0:
                del self.ids_lookup[first_id]
            return None
        self.word_embeddings[name] = embedding
        return embedding

    def load_from_file(self, path, filename):
        name, ext = os.path.splitext(filename)
        if ext.upper() != ".SAFETENSORS":
            return
        data = safetensors.torch.load_file(path, device="cpu")
        embedding = create_embedding_from_data(data, name, filename=filename, filepath=path)
        if self.expected_shape == -1 or self.expected_shape == embedding.shape:
            self.register_embedding(embedding)
        else:
            self.skipped_embeddings[name] = embedding

    def load_textual_inversion_embeddings(self):
        self.ids_lookup.clear()
        self.word_embeddings.clear()
        self.skipped_embeddings.clear()
        for embdir in self.embedding_dirs.values():
            if os.path.isdir(embdir.path):
                for root, _, fns in os.walk(embdir.path, followlinks=True):
                    for fn in fns:
                        self.load_from_file(os.path.join(root, fn), fn)
            embdir.update()

    def find_embedding_at_position(self, tokens, offset):
        for ids, embedding in self.ids_lookup.get(tokens[offset], []):
            if tokens[offset:offset + len(ids)] == ids:
                return embedding, len(ids)
        return None, None


def create_embedding_from_data(data, name, filename="unknown embedding file", filepath=None):
    if "string_to_param" in data:
        vec = next(iter(data["string_to_param"].values())).detach().to(dtype=torch.float32)
        shape, vectors = vec.shape[-1], vec.shape[0]
    elif "clip_g" in data and "clip_l" in data:
        vec = {k: v.detach().to(dtype=torch.float32) for k, v in data.items() if k in ("clip_l", "clip_g")}
        shape, vectors = data["clip_g"].shape[-1] + data["clip_l"].shape[-1], data["clip_g"].shape[0]
    else:
        vec = next(iter(data.values())).detach().to(dtype=torch.float32)
        vec = vec.unsqueeze(0) if vec.ndim == 1 else vec
        shape, vectors = vec.shape[-1], vec.shape[0]
    embedding = Embedding(vec, name)
    embedding.vectors, embedding.shape = vectors, shape
    if filepath:
        embedding.filename = filepath
    return embedding
