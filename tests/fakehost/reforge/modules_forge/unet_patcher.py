"""modules_forge/unet_patcher.py: UnetPatcher, the ModelPatcher reForge keeps the UNet in."""

from ldm_patched.modules.model_patcher import ModelPatcher


class UnetPatcher(ModelPatcher):
    def clone(self):
        n = UnetPatcher(self.model, self.load_device, self.offload_device)
        n.patches = dict(self.patches)
        return n
