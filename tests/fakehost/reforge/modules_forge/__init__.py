"""Stand-in for reForge's `modules_forge` (its Forge-1 loader); see tests/fakehost/reforge_host.py."""
