"""Stand-in for Forge's `backend` package (lllyasviel/stable-diffusion-webui-forge): the text
engines with their per-engine embedding databases, the UNet blocks, attention and placement,
written anew and small; see tests/fakehost/forge_host.py."""
