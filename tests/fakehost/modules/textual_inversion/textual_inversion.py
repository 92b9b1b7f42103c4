"""modules/textual_inversion/textual_inversion.py: Embedding and the EmbeddingDatabase.

The db maps names to Embeddings (`word_embeddings`), keeps those whose width does not fit the
loaded model in `skipped_embeddings`, and indexes names by their first token id (`ids_lookup`,
longest id sequence first) for the text wrappers' walk over a prompt."""

import hashlib
import os

import safetensors.torch
import torch
from modules import devices, safe, shared


class Embedding:
    def __init__(self, vec, name, step=None):
        self.vec = vec
        self.name = name
        self.step = step
        self.shape = None
        self.vectors = 0
        self.cached_checksum = None
        self.sd_checkpoint = None
        self.sd_checkpoint_name = None
        self.optimizer_state_dict = None
        self.filename = None
        self.hash = None
        self.shorthash = None

    def set_hash(self, v):
        self.hash = v
        self.shorthash = self.hash[0:12]


class DirWithTextualInversionEmbeddings:
    def __init__(self, path):
        self.path = path
        self.mtime = None

    def has_changed(self):
        # only the top-level folder's mtime: files overwritten in place or in sub-folders go unseen
        if not os.path.isdir(self.path):
            return False
        mt = os.path.getmtime(self.path)
        return self.mtime is None or mt > self.mtime

    def update(self):
        if os.path.isdir(self.path):
            self.mtime = os.path.getmtime(self.path)


class EmbeddingDatabase:
    def __init__(self):
        self.ids_lookup = {}
        self.word_embeddings = {}
        self.skipped_embeddings = {}
        self.expected_shape = -1
        self.embedding_dirs = {}
        self.previously_displayed_embeddings = ()

    def add_embedding_dir(self, path):
        self.embedding_dirs[path] = DirWithTextualInversionEmbeddings(path)

    def clear_embedding_dirs(self):
        self.embedding_dirs.clear()

    def register_embedding(self, embedding, model):
        return self.register_embedding_by_name(embedding, model, embedding.name)

    def register_embedding_by_name(self, embedding, model, name):
        # The name's ids come from the model's (first) tokenizer. An existing entry of that name
        # leaves the lookup list (matched by embedding.name); embedding=None unregisters the name.
        ids = model.cond_stage_model.tokenize([name])[0]
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

    def get_expected_shape(self):
        return shared.sd_model.cond_stage_model.encode_embedding_init_text(",", 1).shape[1]

    def load_from_file(self, path, filename):
        name, ext = os.path.splitext(filename)
        ext = ext.upper()
        if ext in (".BIN", ".PT"):
            data = safe.load(path, map_location="cpu")  # the host replaced torch.load with this check
        elif ext == ".SAFETENSORS":
            data = safetensors.torch.load_file(path, device="cpu")
        else:
            return
        embedding = create_embedding_from_data(data, name, filename=filename, filepath=path)
        if self.expected_shape == -1 or self.expected_shape == embedding.shape:
            self.register_embedding(embedding, shared.sd_model)
        else:
            self.skipped_embeddings[name] = embedding

    def load_from_dir(self, embdir):
        if not os.path.isdir(embdir.path):
            return
        for root, _, fns in os.walk(embdir.path, followlinks=True):
            for fn in fns:
                fullfn = os.path.join(root, fn)
                if os.stat(fullfn).st_size == 0:
                    continue
                try:
                    self.load_from_file(fullfn, fn)
                except Exception as e:  # the host reports and goes on with the next file
                    print(f"Error loading embedding {fn}: {e}")

    def load_textual_inversion_embeddings(self, force_reload=False):
        if not force_reload and not any(d.has_changed() for d in self.embedding_dirs.values()):
            return
        self.ids_lookup.clear()
        self.word_embeddings.clear()
        self.skipped_embeddings.clear()
        self.expected_shape = self.get_expected_shape()
        for embdir in self.embedding_dirs.values():
            self.load_from_dir(embdir)
            embdir.update()
        # re-sorted case-insensitively, in the same dict object (others hold references to it)
        ordered = {e.name: e for e in sorted(self.word_embeddings.values(), key=lambda e: e.name.lower())}
        self.word_embeddings.clear()
        self.word_embeddings.update(ordered)

    def find_embedding_at_position(self, tokens, offset):
        for ids, embedding in self.ids_lookup.get(tokens[offset], ()):
            if tokens[offset:offset + len(ids)] == ids:
                return embedding, len(ids)
        return None, None


def create_embedding_from_data(data, name, filename="unknown embedding file", filepath=None):
    # The three layouts, tried in the host's order: string_to_param, SDXL clip_g/clip_l, one tensor.
    if "string_to_param" in data:
        params = data["string_to_param"]
        assert len(params) == 1, "embedding file has multiple terms in it"
        vec = next(iter(params.values())).detach().to(devices.device, dtype=torch.float32)
        shape, vectors = vec.shape[-1], vec.shape[0]
    elif type(data) is dict and "clip_g" in data and "clip_l" in data:
        vec = {k: v.detach().to(devices.device, dtype=torch.float32) for k, v in data.items()}
        shape, vectors = data["clip_g"].shape[-1] + data["clip_l"].shape[-1], data["clip_g"].shape[0]
    elif type(data) is dict and type(next(iter(data.values()))) is torch.Tensor:
        assert len(data.keys()) == 1, "embedding file has multiple terms in it"
        emb = next(iter(data.values()))
        if len(emb.shape) == 1:
            emb = emb.unsqueeze(0)
        vec = emb.detach().to(devices.device, dtype=torch.float32)
        shape, vectors = vec.shape[-1], vec.shape[0]
    else:
        raise Exception(f"Couldn't identify {filename} as neither textual inversion embedding nor diffuser concept.")
    embedding = Embedding(vec, name)
    embedding.step = data.get("step", None)
    embedding.sd_checkpoint = data.get("sd_checkpoint", None)
    embedding.sd_checkpoint_name = data.get("sd_checkpoint_name", None)
    embedding.vectors = vectors
    embedding.shape = shape
    if filepath:
        embedding.filename = filepath
        with open(filepath, "rb") as f:
            embedding.set_hash(hashlib.sha256(f.read()).hexdigest())
    return embedding
