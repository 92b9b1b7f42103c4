"""modules/ui_extra_networks_textual_inversion.py: the Extra Networks cards' own A1111-style
database, loaded at import with sync_with_sd_model=False; it lists files, prompts never read it.
Forge's modules/textual_inversion keeps A1111's class with the model taken out: every name gets
ids [0, 0, 0] and no width check (ListingDatabase is that class here; the API has one too)."""

from modules import shared
from modules.textual_inversion import textual_inversion


class ListingDatabase(textual_inversion.EmbeddingDatabase):
    def register_embedding_by_name(self, embedding, model, name):
        ids = [0, 0, 0]  # Forge: model.cond_stage_model.tokenize([name])[0] commented out
        lookup = [x for x in self.ids_lookup.get(ids[0], []) if x[1].name != name]
        if embedding is not None:
            lookup.append((ids, embedding))
            self.word_embeddings[name] = embedding
        else:
            self.word_embeddings.pop(name, None)
        self.ids_lookup[ids[0]] = lookup
        return embedding

    def get_expected_shape(self):
        return -1  # only asked with sync_with_sd_model=True, which Forge's listings never use

    def load_textual_inversion_embeddings(self, force_reload=False, sync_with_sd_model=True):
        return super().load_textual_inversion_embeddings(force_reload=force_reload)


embedding_db = ListingDatabase()
embedding_db.add_embedding_dir(shared.cmd_opts.embeddings_dir)
embedding_db.load_textual_inversion_embeddings(force_reload=True, sync_with_sd_model=False)
