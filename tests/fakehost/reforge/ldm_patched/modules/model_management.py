"""ldm_patched/modules/model_management.py: load_models_gpu moves a patcher's model to its load
device with `.to()`, in whatever mode the caller runs: during txt2img that is torch.inference_mode,
so on a GPU the moved weights become inference tensors; on the CPU (--always-cpu, the stand-in)
load and offload device are the same and `.to()` changes nothing."""

import torch

current_loaded_models = []


def get_torch_device():
    return torch.device("cpu")


def unet_offload_device():
    return torch.device("cpu")


def load_models_gpu(models, memory_required=0):
    for patcher in models:
        patcher.model.to(patcher.load_device)
        patcher.model.device = patcher.load_device
        if patcher not in current_loaded_models:
            current_loaded_models.insert(0, patcher)


def load_model_gpu(model):
    return load_models_gpu([model])
