"""modules/ui_extra_networks.py: the Extra Networks pages (cards under txt2img). Only what a card
is made of: the registered pages, each with its file lister, preview and description lookup, and
the user metadata (`read_user_metadata`), plus the single-card refresh the card editor triggers."""

import os

from modules import extra_networks, shared, util

default_allowed_preview_extensions = ["png", "jpg", "jpeg", "webp", "gif"]
extra_pages = []


def allowed_preview_extensions():
    return list(dict.fromkeys([*default_allowed_preview_extensions, shared.opts.samples_format]))


def register_page(page):
    extra_pages.append(page)


def initialize():
    extra_pages.clear()


def register_default_pages():
    from modules.ui_extra_networks_textual_inversion import ExtraNetworksPageTextualInversion

    register_page(ExtraNetworksPageTextualInversion())


def quote_js(s):
    s = s.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{s}"'


class ExtraNetworksPage:
    def __init__(self, title):
        self.title = title
        self.name = title.lower()
        self.extra_networks_tabname = self.name.replace(" ", "_")
        self.items = {}
        self.lister = util.MassFileLister()

    def refresh(self):
        pass

    def link_preview(self, filename):
        return "./sd_extra_networks/thumb?filename=" + filename.replace("\\", "/")

    def find_preview(self, path):
        for ext in allowed_preview_extensions():
            for file in (f"{path}.{ext}", f"{path}.preview.{ext}"):
                if self.lister.exists(file):
                    return self.link_preview(file)
        return None

    def find_description(self, path):
        for file in (f"{path}.txt", f"{path}.description.txt"):
            if self.lister.exists(file):
                with open(file, encoding="utf-8", errors="replace") as f:
                    return f.read()
        return None

    def read_user_metadata(self, item, use_cache=True):
        metadata = extra_networks.get_user_metadata(item.get("filename"), lister=self.lister if use_cache else None)
        if metadata.get("description") is not None:
            item["description"] = metadata["description"]
        item["user_metadata"] = metadata

    def create_html(self, tabname):
        """The page's cards (here: the items); a full refresh lists the folders anew."""
        self.lister.reset()
        self.items = {x["name"]: x for x in self.list_items()}
        for item in self.items.values():
            if "user_metadata" not in item:
                self.read_user_metadata(item)
        return self.items


def get_single_card(page="", tabname="", name=""):
    """/sd_extra_networks/get-single-card, after the card editor saved: one item made anew."""
    page = next(x for x in extra_pages if x.name == page)
    item = page.create_item(name, enable_filter=False)
    page.items[name] = item
    page.read_user_metadata(item, use_cache=False)
    return item


def path_is_parent(parent_path, child_path):
    return os.path.abspath(child_path).startswith(os.path.abspath(parent_path))
