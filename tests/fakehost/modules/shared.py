"""modules/shared.py: cmd_opts, opts, state and the loaded model (a plain attribute here; the host's
is a property that loads the selected checkpoint on first use)."""

import os
from types import SimpleNamespace

from modules import devices, shared_state
from modules.options import OptionInfo, Options, options_section  # noqa: F401 (the host re-exports them)

cmd_opts = SimpleNamespace(
    data_dir=os.getcwd(), embeddings_dir=os.path.join(os.getcwd(), "embeddings"),
    textual_inversion_templates_dir=None, lowvram=False, medvram=False, medvram_sdxl=False, no_half=True,
    no_half_vae=False, precision="full", api=False, api_auth=None, nowebui=False, freeze_settings=False,
    disable_safe_unpickle=False, cors_allow_origins=None, cors_allow_origins_regex=None,
)  # the host's defaults (modules/cmd_args.py): no --api, no CORS origins

# The few settings the code under test reads, with the host's defaults (modules/shared_options.py).
opts = Options({
    "CLIP_stop_at_last_layers": OptionInfo(1, "Clip skip"),
    "emphasis": OptionInfo("Original", "Emphasis mode"),
    "sdxl_clip_l_skip": OptionInfo(False, "Clip skip SDXL"),
    "sdxl_crop_top": OptionInfo(0, "crop top"),
    "sdxl_crop_left": OptionInfo(0, "crop left"),
    "sdxl_refiner_low_aesthetic_score": OptionInfo(2.5, "SDXL low aesthetic score"),
    "sdxl_refiner_high_aesthetic_score": OptionInfo(6.0, "SDXL high aesthetic score"),
    "persistent_cond_cache": OptionInfo(True, "Persistent cond cache"),
    "samples_format": OptionInfo("png", "File format for images"),
    "textual_inversion_print_at_load": OptionInfo(False, "Print TI at load"),
    "textual_inversion_add_hashes_to_infotext": OptionInfo(True, "TI hashes in infotext"),
    "live_previews_enable": OptionInfo(True, "Live previews"),
    "training_xattention_optimizations": OptionInfo(False, "xattention while training"),
    "save_optimizer_state": OptionInfo(False, "Save optimizer state"),
})

state = shared_state.State()
sd_model = None
device = devices.device
parallel_processing_allowed = True
config_filename = os.path.join(cmd_opts.data_dir, "config.json")
