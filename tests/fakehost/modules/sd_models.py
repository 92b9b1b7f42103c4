"""modules/sd_models.py: the type flags and checkpoint info a loaded model carries."""

from dataclasses import dataclass


@dataclass
class CheckpointInfo:
    filename: str
    title: str
    model_name: str
    hash: str
    shorthash: str


def set_model_type(model):
    # sd_models.set_model_type: SDXL has a conditioner, SD2 an OpenCLIP (`.model`) text encoder
    model.is_sdxl = hasattr(model, "conditioner")
    model.is_sdxl_inpaint = False
    model.is_sd2 = not model.is_sdxl and hasattr(model.cond_stage_model, "model")
    model.is_sd1 = not model.is_sdxl and not model.is_sd2
    model.is_ssd = False
    model.is_sd3 = False
    model.model_type = "SDXL" if model.is_sdxl else ("SD2" if model.is_sd2 else "SD1")
    model.latent_channels = 4
