"""Textual Inversion training core: host-free (torch, safetensors, PIL, numpy; diffusers and
transformers only in lib_ti.diffusers_backend).

`lib_ti.webui` is the only subpackage that may touch the WebUI host or gradio; nothing else in
`lib_ti` imports it.
"""

__version__ = "0.1.0"
