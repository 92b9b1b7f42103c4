"""modules/sd_models.py in Forge: a FakeInitialModel until the first generation, and
forge_model_reload() that builds the model under torch.inference_mode (so every weight is an
inference tensor) with the embeddings folder in dynamic_args."""

from dataclasses import dataclass

import torch


@dataclass
class CheckpointInfo:
    filename: str
    title: str
    model_name: str
    hash: str
    shorthash: str


class FakeInitialModel:
    def __init__(self):
        self.cond_stage_model = None
        self.chunk_length = 75


class SdModelData:
    def __init__(self):
        self.sd_model = FakeInitialModel()
        self.forge_loading_parameters = {}
        self.forge_hash = ""


model_data = SdModelData()


@torch.inference_mode()
def forge_model_reload():
    from modules import shared

    current = str(model_data.forge_loading_parameters)
    if model_data.forge_hash == current:
        return model_data.sd_model, False
    from fakehost import forge_models

    params = model_data.forge_loading_parameters
    m = forge_models.build(params["family"], params.get("seed", 0), shared.cmd_opts.embeddings_dir,
                           **params.get("options", {}))
    m.extra_generation_params = {}
    name = f"tiny-forge-{params['family']}"
    m.sd_checkpoint_info = CheckpointInfo(f"{name}.safetensors", f"{name}.safetensors [0123456789]", name,
                                          "0123456789abcdef", "0123456789")
    m.sd_model_hash = "0123456789"
    model_data.sd_model = shared.sd_model = m
    model_data.forge_hash = current
    return m, True
