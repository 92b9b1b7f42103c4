"""modules/sd_hijack.py in Forge: a stub; no embedding_db (each text engine keeps its own)."""


class StableDiffusionModelHijack:
    extra_generation_params = {}
    comments = []

    def hijack(self, m):
        pass

    def undo_hijack(self, m):
        pass

    def clear_comments(self):
        self.comments = []
        self.extra_generation_params = {}


model_hijack = StableDiffusionModelHijack()
