"""modules/sd_unet.py: a replacement UNet (e.g. TensorRT) selected in settings, else None."""

current_unet = None
