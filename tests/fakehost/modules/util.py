"""modules/util.py: MassFileLister, the directory-listing cache the Extra Networks pages use.
A directory is listed once, on first use, and answers from that listing until reset()."""

import os


class MassFileLister:
    def __init__(self):
        self.cached_dirs = {}  # dirname -> {lowercase file name: (name, mtime, ctime)}

    def find(self, path):
        dirname, filename = os.path.split(path)
        listing = self.cached_dirs.get(dirname)
        if listing is None:
            listing = {}
            for entry in os.scandir(dirname):
                st = entry.stat(follow_symlinks=False)
                listing[entry.name.lower()] = (entry.name, st.st_mtime, st.st_ctime)
            self.cached_dirs[dirname] = listing
        return listing.get(filename.lower())

    def exists(self, path):
        return self.find(path) is not None

    def mctime(self, path):
        stats = self.find(path)
        return (0, 0) if stats is None else stats[1:3]

    def reset(self):
        self.cached_dirs.clear()

    def update_file_entry(self, path):
        dirname, filename = os.path.split(path)
        listing = self.cached_dirs.get(dirname)
        if listing is not None:
            st = os.stat(path)
            listing[filename.lower()] = (filename, st.st_mtime, st.st_ctime)
