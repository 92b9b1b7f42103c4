"""backend/memory_management.py: the device and the loaded-model list. On a GPU Forge moves
patchers' weights under torch.inference_mode when a generation loads them; the stand-in (CPU)
does the same to the weights' objects: loaded under inference_mode they come back as inference
tensors, as after a real device round trip. `model_accelerated` marks weight streaming ("CPU swap")."""

import torch

current_loaded_models = []
cpu_swap = False  # tests set it: the next load streams weights


def get_torch_device():
    return torch.device("cpu")


def text_encoder_device():
    return torch.device("cpu")


class LoadedModel:
    def __init__(self, model):
        self.model = model
        self.model_accelerated = False

    def model_load(self):
        if torch.is_inference_mode_enabled():
            for p in self.model.model.parameters():
                if not p.is_inference():
                    p.data = p.data.clone()
        self.model_accelerated = cpu_swap


def load_models_gpu(models, memory_required=0, hard_memory_preservation=0):
    for patcher in models:
        lm = next((x for x in current_loaded_models if x.model is patcher), None)
        if lm is None:
            lm = LoadedModel(patcher)
            current_loaded_models.insert(0, lm)
        lm.model_load()


def load_model_gpu(model):
    return load_models_gpu([model])
