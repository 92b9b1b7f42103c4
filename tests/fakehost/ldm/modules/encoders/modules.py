"""ldm/modules/encoders/modules.py: FrozenCLIPEmbedder, the SD1 text encoder (HF tokenizer + CLIPTextModel)."""

from torch import nn


class FrozenCLIPEmbedder(nn.Module):
    def __init__(self, tokenizer, transformer, max_length=77, layer="last", layer_idx=None):
        super().__init__()
        self.tokenizer = tokenizer
        self.transformer = transformer
        self.max_length = max_length
        self.layer = layer
        self.layer_idx = layer_idx
        self.freeze()

    def freeze(self):
        self.transformer = self.transformer.eval()
        for param in self.parameters():
            param.requires_grad = False
