"""modules/ui_extra_networks_textual_inversion.py: the Extra Networks cards' own A1111-style
database, loaded at import with sync_with_sd_model=False; it lists files, prompts never read it."""

from modules import shared
from modules.textual_inversion import textual_inversion


class ListingDatabase(textual_inversion.EmbeddingDatabase):
    def load_textual_inversion_embeddings(self, force_reload=False, sync_with_sd_model=True):
        return super().load_textual_inversion_embeddings(force_reload=force_reload)


embedding_db = ListingDatabase()
embedding_db.add_embedding_dir(shared.cmd_opts.embeddings_dir)
embedding_db.load_textual_inversion_embeddings(force_reload=True, sync_with_sd_model=False)
