"""Settings → TI Trainer: the defaults the tab starts with.

on_ui_settings does not run in --nowebui mode, so these options may not exist; every read goes
through `default()` with the config's own default as the fallback.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from lib_ti.config import TrainConfig

SECTION = ("ti_trainer", "TI Trainer")
# option key -> (config field, label). The labels say where they apply: only to a fresh tab.
OPTIONS = {
    "ti_trainer_learning_rate": ("learning_rate", "Default learning rate (number or '0.005:100, 1e-3')"),
    "ti_trainer_max_train_steps": ("max_train_steps", "Default max training steps"),
    "ti_trainer_validation_every_n_steps": ("validation_every_n_steps",
                                            "Default validation interval in steps (0: off)"),
    "ti_trainer_sample_every_n_steps": ("sample_every_n_steps", "Default preview interval in steps (0: off)"),
}
FIELD_TO_KEY = {field: key for key, (field, _label) in OPTIONS.items()}
# Not a tab default: the server-side path policy of the HTTP API (lib_ti/webui/api_paths.py).
API_READ_KEY = "ti_trainer_api_read_folders"
API_READ_LABEL = "Folders the API may read"


def config_default(field: str) -> Any:
    f = {f.name: f for f in dataclasses.fields(TrainConfig)}[field]
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()


def register() -> None:
    """Called from on_ui_settings (before any tab is built, so the tab sees these values)."""
    from modules import shared

    for key, (field, label) in OPTIONS.items():
        info = shared.OptionInfo(config_default(field), label, section=SECTION)
        try:
            info = shared.OptionInfo(config_default(field), label, section=SECTION, category_id="training")
        except TypeError:  # hosts before the settings categories (A1111 < 1.7)
            pass
        shared.opts.add_option(key, info.info("applies to the TI Trainer tab after a UI reload"))
    try:  # restrict_api: /sdapi/v1/options cannot widen it (A1111 >= 1.6); a multi-line text box
        info = shared.OptionInfo("", API_READ_LABEL, component_args={"lines": 3}, section=SECTION,
                                 restrict_api=True, category_id="training")
    except TypeError:
        info = shared.OptionInfo("", API_READ_LABEL, component_args={"lines": 3}, section=SECTION)
    shared.opts.add_option(API_READ_KEY, info.info(
        "one folder per line; datasets, templates, dataset TOML and prompt files that /ti-trainer/v1 requests "
        "name must lie in one (or in the host's templates folder). Empty: the WebUI data folder and its "
        "textual_inversion folder. The tab is not limited"))


def api_read_folders() -> str:
    """The setting's text. Read with a fallback: in --nowebui mode on_ui_settings never ran, but a
    value saved in config.json is still in shared.opts."""
    try:
        from modules import shared

        value = getattr(shared.opts, API_READ_KEY, "")
    except Exception:  # no host options at all
        return ""
    return value if isinstance(value, str) else ""


def default(field: str) -> Any:
    """The tab's starting value of `field`: the user's setting if there is one, else the config's."""
    fallback = config_default(field)
    key = FIELD_TO_KEY.get(field)
    if key is None:
        return fallback
    try:
        from modules import shared

        value = getattr(shared.opts, key, fallback)
    except Exception:  # no host options at all (tests, --nowebui before options load)
        return fallback
    if value is None or value == "":
        return fallback
    try:
        return type(fallback)(value) if not isinstance(fallback, str) else str(value)
    except (TypeError, ValueError):
        return fallback
