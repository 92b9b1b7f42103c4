"""TI Trainer: registers the extension's callbacks with the WebUI. All logic lives in lib_ti.

The host runs every top-level file in scripts/ as a script and puts the extension folder on
sys.path only while it does, so lib_ti is imported here, at the top, and nowhere later.
"""

from modules import script_callbacks

from lib_ti.webui import entry

script_callbacks.on_ui_train_tabs(entry.on_ui_train_tabs, name="ti_trainer_tab")
# Train tabs are built before on_ui_tabs, so this only adds a top-level tab on hosts without one (Forge).
script_callbacks.on_ui_tabs(entry.on_ui_tabs, name="ti_trainer_fallback_tab")
script_callbacks.on_ui_settings(entry.on_ui_settings, name="ti_trainer_settings")
script_callbacks.on_app_started(entry.on_app_started, name="ti_trainer_api")
script_callbacks.on_script_unloaded(entry.on_script_unloaded, name="ti_trainer_unload")
