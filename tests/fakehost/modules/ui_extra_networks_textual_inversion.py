"""modules/ui_extra_networks_textual_inversion.py: one card per embedding in the db."""

import os

from modules import sd_hijack, shared, ui_extra_networks
from modules.ui_extra_networks import quote_js


class ExtraNetworksPageTextualInversion(ui_extra_networks.ExtraNetworksPage):
    def __init__(self):
        super().__init__("Textual Inversion")
        self.allow_negative_prompt = True

    def refresh(self):
        sd_hijack.model_hijack.embedding_db.load_textual_inversion_embeddings(force_reload=True)

    def create_item(self, name, index=None, enable_filter=True):
        embedding = sd_hijack.model_hijack.embedding_db.word_embeddings.get(name)
        if embedding is None:
            return None
        path, _ext = os.path.splitext(embedding.filename)
        return {
            "name": name,
            "filename": embedding.filename,
            "shorthash": embedding.shorthash,
            "preview": self.find_preview(path),
            "description": self.find_description(path),
            "prompt": quote_js(embedding.name),
            "local_preview": f"{path}.preview.{shared.opts.samples_format}",
        }

    def list_items(self):
        for index, name in enumerate(list(sd_hijack.model_hijack.embedding_db.word_embeddings)):
            item = self.create_item(name, index)
            if item is not None:
                yield item
