"""modules/extra_networks.py: the user-metadata file beside a network (`<file without ext>.json`),
which the card editor writes and the card's description comes from."""

import json
import os


def get_user_metadata(filename, lister=None):
    if filename is None:
        return {}
    metadata_filename = os.path.splitext(filename)[0] + ".json"
    exists = lister.exists(metadata_filename) if lister else os.path.exists(metadata_filename)
    if not exists:
        return {}
    try:
        with open(metadata_filename, encoding="utf8") as file:
            return json.load(file)
    except Exception as e:  # the host reports and shows the card without metadata
        print(f"*** reading extra network user metadata from {metadata_filename}: {e}")
        return {}
