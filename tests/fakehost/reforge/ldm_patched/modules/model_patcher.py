"""ldm_patched/modules/model_patcher.py: ModelPatcher, the wrapper model_management loads and
offloads (patches and LoRA weights are left out: the stand-in has none)."""


class ModelPatcher:
    def __init__(self, model, load_device, offload_device):
        self.model = model
        self.load_device = load_device
        self.offload_device = offload_device
        self.patches = {}
        self.model_options = {"transformer_options": {}}

    def model_size(self):
        return sum(p.numel() * p.element_size() for p in self.model.parameters())
