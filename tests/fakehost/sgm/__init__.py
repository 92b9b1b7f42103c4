"""Stand-ins for the sgm classes of SDXL models (Stability-AI/generative-models)."""
