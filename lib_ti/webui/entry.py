"""The callbacks scripts/ti_trainer.py registers. Each one hands over to the module that owns it."""

from __future__ import annotations

from typing import Any

_built = {"train_tab": False}


def on_ui_train_tabs(params: Any) -> None:
    from lib_ti.webui import tab

    _built["train_tab"] = True
    tab.build_train_tab(params)


def on_ui_tabs() -> list:
    if _built["train_tab"]:
        return []
    from lib_ti.webui import forge_embeddings, tab

    if forge_embeddings.is_forge():  # Forge never builds a Train tab: the same tab, top level
        import gradio as gr

        with gr.Blocks(analytics_enabled=False) as blocks:
            tab.build_contents([])
        return [(blocks, "TI Trainer", "ti_trainer")]
    return tab.build_fallback_tab()


def on_ui_settings() -> None:
    from lib_ti.webui import settings

    settings.register()


def on_app_started(_demo: Any, app: Any) -> None:
    from lib_ti.webui import api, forge_embeddings

    forge_embeddings.remember_app(app)  # Forge: the API's own embedding list is reloaded after a save
    api.register(app)


def on_script_unloaded() -> None:
    # A run restores the model itself when it ends; a UI reload mid-run must not leave the next
    # build thinking the train tab exists.
    _built["train_tab"] = False
