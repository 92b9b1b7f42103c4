"""modules/devices.py: the device and dtypes the host computes with, and its autocast helpers.
The stand-in is the --use-cpu all --no-half host: everything float32 on the CPU."""

import contextlib

import torch

cpu = torch.device("cpu")
device = cpu
dtype = torch.float32
dtype_vae = torch.float32
dtype_unet = torch.float32
dtype_inference = torch.float32
unet_needs_upcast = False
force_fp16 = False


def cond_cast_unet(input):
    # devices.cond_cast_unet: to the UNet dtype only when sampling upcasts
    if force_fp16:
        return input.to(torch.float16)
    return input.to(dtype_unet) if unet_needs_upcast else input


def cond_cast_float(input):
    return input.float() if unet_needs_upcast else input


def autocast(disable=False):
    # devices.autocast: no autocast for float32 (and on the CPU); torch.autocast("cuda") otherwise
    if disable or dtype == torch.float32 or dtype_inference == torch.float32 or device.type != "cuda":
        return contextlib.nullcontext()
    return torch.autocast("cuda")


def without_autocast(disable=False):
    return torch.autocast("cuda", enabled=False) if torch.is_autocast_enabled() and not disable else \
        contextlib.nullcontext()


def torch_gc():
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def torch_npu_set_device():
    pass
