"""Stand-in for reForge's `ldm_patched` (ComfyUI's UNet code as reForge carries it): the UNet
blocks, written anew and small, with reForge's structure; see tests/fakehost/reforge_host.py."""
