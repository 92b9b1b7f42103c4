"""modules_forge/forge_clip.py: reForge's text wrappers, subclasses of A1111's
FrozenCLIPEmbedderWithCustomWords (the A1111 stand-in's here) that read the transformer reForge
put into the ldm/sgm embedder (`wrapped.transformer.text_model`, also for SDXL's clip_g, which
A1111 reads as OpenCLIP instead). SD1's wrapper first loads the text encoder through
model_management (`move_clip_to_gpu`), in whatever mode the caller runs."""

from ldm_patched.modules import model_management
from modules import shared
from modules.sd_hijack_clip import FrozenCLIPEmbedderWithCustomWords


def move_clip_to_gpu():
    m = shared.sd_model  # reForge reads sd_models.model_data.sd_model, the same object
    if m is None:
        print("Error: CLIP called before SD is loaded!")
        return
    model_management.load_model_gpu(m.forge_objects.clip.patcher)


def _hidden(wrapper, outputs):
    """SDXL's layer choice: clip skip beyond the minimum, else the embedder's own layer (no final norm)."""
    skip = shared.opts.CLIP_stop_at_last_layers
    if skip > wrapper.minimal_clip_skip:
        return outputs.hidden_states[-skip]
    if wrapper.wrapped.layer == "last":
        return outputs.last_hidden_state
    return outputs.hidden_states[wrapper.wrapped.layer_idx]


class CLIP_SD_15_L(FrozenCLIPEmbedderWithCustomWords):
    def __init__(self, wrapped, hijack):
        super().__init__(wrapped, hijack)
        self.minimal_clip_skip = 1

    def encode_with_transformers(self, tokens):
        move_clip_to_gpu()
        transformer = self.wrapped.transformer
        transformer.text_model.embeddings.to(tokens.device)
        skip = shared.opts.CLIP_stop_at_last_layers
        outputs = transformer(input_ids=tokens, output_hidden_states=-skip)
        if skip > self.minimal_clip_skip:
            return transformer.text_model.final_layer_norm(outputs.hidden_states[-skip])
        return outputs.last_hidden_state


class CLIP_SD_XL_L(FrozenCLIPEmbedderWithCustomWords):
    def __init__(self, wrapped, hijack):
        super().__init__(wrapped, hijack)
        self.minimal_clip_skip = 2

    def encode_with_transformers(self, tokens):
        self.wrapped.transformer.text_model.embeddings.to(tokens.device)
        outputs = self.wrapped.transformer(tokens, output_hidden_states=self.wrapped.layer == "hidden")
        return _hidden(self, outputs)


class CLIP_SD_XL_G(FrozenCLIPEmbedderWithCustomWords):
    def __init__(self, wrapped, hijack):
        super().__init__(wrapped, hijack)
        if self.wrapped.layer == "penultimate":
            self.wrapped.layer = "hidden"
            self.wrapped.layer_idx = -2
        self.id_start, self.id_end, self.id_pad = 49406, 49407, 0
        self.minimal_clip_skip = 2

    def encode_with_transformers(self, tokens):
        self.wrapped.transformer.text_model.embeddings.to(tokens.device)
        outputs = self.wrapped.transformer(tokens, output_hidden_states=self.wrapped.layer == "hidden")
        z = _hidden(self, outputs)
        projection = self.wrapped.text_projection
        z.pooled = outputs.pooler_output.float().to(projection.device) @ projection.float()
        return z
