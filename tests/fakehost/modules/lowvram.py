"""modules/lowvram.py: --medvram / --lowvram keep big modules off the GPU and move one in at a time
from forward pre-hooks named send_me_to_gpu, sending the previous one back with .to(cpu)."""

import torch
from modules import devices, shared

module_in_gpu = None
cpu = torch.device("cpu")


def send_everything_to_cpu():
    global module_in_gpu
    if module_in_gpu is not None:
        module_in_gpu.to(cpu)
    module_in_gpu = None


def is_needed(sd_model):
    return shared.cmd_opts.lowvram or shared.cmd_opts.medvram or (
        shared.cmd_opts.medvram_sdxl and hasattr(sd_model, "conditioner"))


def apply(sd_model):
    enable = is_needed(sd_model)
    shared.parallel_processing_allowed = not enable
    if enable:
        setup_for_low_vram(sd_model, not shared.cmd_opts.lowvram)
    else:
        sd_model.lowvram = False


def setup_for_low_vram(sd_model, use_medvram):
    # Runs before the hijack, as in sd_models.load_model. The stand-in covers medvram (the UNet as a
    # whole); --lowvram's per-block hooks are not needed: the trainer refuses --lowvram.
    if getattr(sd_model, "lowvram", False):
        return
    sd_model.lowvram = True
    parents = {}

    def send_me_to_gpu(module, _):
        global module_in_gpu
        module = parents.get(module, module)
        if module_in_gpu == module:
            return
        if module_in_gpu is not None:
            module_in_gpu.to(cpu)
        module.to(devices.device)
        module_in_gpu = module

    vae = sd_model.first_stage_model
    vae_encode, vae_decode = vae.encode, vae.decode

    def first_stage_model_encode_wrap(x):
        send_me_to_gpu(vae, None)
        return vae_encode(x)

    def first_stage_model_decode_wrap(z):
        send_me_to_gpu(vae, None)
        return vae_decode(z)

    if hasattr(sd_model, "conditioner"):
        sd_model.conditioner.register_forward_pre_hook(send_me_to_gpu)
    else:
        sd_model.cond_stage_model.transformer.register_forward_pre_hook(send_me_to_gpu)
        parents[sd_model.cond_stage_model.transformer] = sd_model.cond_stage_model
    vae.register_forward_pre_hook(send_me_to_gpu)
    vae.encode = first_stage_model_encode_wrap
    vae.decode = first_stage_model_decode_wrap
    sd_model.model.register_forward_pre_hook(send_me_to_gpu)


def is_enabled(sd_model):
    return sd_model.lowvram
