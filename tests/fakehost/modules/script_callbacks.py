"""modules/script_callbacks.py: on_*(callback, *, name=None) record callbacks (no ordering here)."""

from collections import defaultdict

callbacks: dict = defaultdict(list)


def _adder(category):
    def add(callback, *, name=None):
        callbacks[category].append((name, callback))

    add.__name__ = f"on_{category}"
    return add


on_ui_train_tabs = _adder("ui_train_tabs")
on_ui_tabs = _adder("ui_tabs")
on_ui_settings = _adder("ui_settings")
on_app_started = _adder("app_started")
on_script_unloaded = _adder("script_unloaded")
on_model_loaded = _adder("model_loaded")


def clear_callbacks():
    callbacks.clear()
