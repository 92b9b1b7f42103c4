"""Stand-ins for the ldm classes the host model is built from (Stability-AI/stablediffusion)."""
